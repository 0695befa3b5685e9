"""bench/output_granularity.py: the block-majority oracle on hand-made label maps (no data, no torch)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "output_granularity.py"


def _script():
    spec = importlib.util.spec_from_file_location("output_granularity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_majority_identity_majorities_ties_and_edges():
    bm = _script().block_majority

    label = np.array([[0, 0, 1, 2],
                      [0, 1, 1, 1],
                      [2, 2, 0, 1],
                      [2, 0, 2, 1]], dtype=np.uint8)
    # block 1 is the identity (same values, shape and dtype, a copy)
    same = bm(label, 1)
    assert same.dtype == np.uint8 and np.array_equal(same, label) and same is not label

    # block 2 on 4x4: majorities 0 (three 0s), 1 (three 1s), 2 (three 2s), 1 (two 1s vs one 0, one 2)
    expected = np.array([[0, 0, 1, 1],
                         [0, 0, 1, 1],
                         [2, 2, 1, 1],
                         [2, 2, 1, 1]], dtype=np.uint8)
    got = bm(label, 2, num_classes=3)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)

    # ties go to the lowest class index: 2-2 ties and a 1-1-1-1 four-way tie
    ties = np.array([[2, 1, 3, 2],
                     [1, 2, 0, 1]])
    assert np.array_equal(bm(ties, 2, num_classes=4), np.array([[1, 1, 0, 0], [1, 1, 0, 0]]))

    # partial edge blocks (5x5 map, block 2) are blocks of their own: only pixels inside the map count
    edge = np.zeros((5, 5), dtype=np.int64)
    edge[4, :] = 2           # bottom partial row: blocks of 2 pixels, all class 2 except the corner
    edge[:4, 4] = 1          # right partial column: blocks of 2 pixels, class 1
    edge[4, 4] = 1           # bottom-right corner: a 1-pixel block of class 1
    got = bm(edge, 2, num_classes=3)
    assert np.array_equal(got[:4, :4], np.zeros((4, 4)))
    assert np.array_equal(got[:4, 4], [1, 1, 1, 1])
    assert np.array_equal(got[4, :4], [2, 2, 2, 2])
    assert got[4, 4] == 1
    # ... and not edge-replicated: in this 3x4 partial block, 7 zeros beat 5 ones (replicating the last
    # row to fill the 4x4 block would make it 7 zeros against 9 ones)
    strip = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert np.array_equal(bm(strip, 4, num_classes=2), np.zeros((3, 4)))
    # a block larger than the map is one block over the whole map (5 pixels of class 1 beat 4 of class 2
    # and lose to 16 of class 0)
    assert np.array_equal(bm(edge, 8, num_classes=3), np.zeros((5, 5)))

    with pytest.raises(ValueError):
        bm(label, 0)
    with pytest.raises(ValueError):
        bm(label, 2, num_classes=2)  # label 2 is outside 0..1
