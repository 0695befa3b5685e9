"""bench/plain_baseline.py runs end to end on a tiny synthetic NASA-layout set and reports sane numbers."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from pretrain.synthetic import write_nasa_set

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "plain_baseline.py"


def _script():
    spec = importlib.util.spec_from_file_location("plain_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_baseline_two_steps(tmp_path):
    root = write_nasa_set(tmp_path / "Super9", "superalloy", n_train=2, n_val=1, n_test=2, n_shifted=2,
                          size=(64, 64), seed=0)
    out = tmp_path / "result.json"
    pb = _script()
    pb.main([str(root), "--steps", "2", "--crop", "64", "--batch", "2", "--threads", "1",
             "--test", f"{root}:different_test", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["seed"] == 0 and report["crop"] == 64
    assert report["class_map"] == ["matrix", "secondary", "tertiary"]
    assert set(report["tests"]) == {"Super9:test", "Super9:different_test"}
    for r in report["tests"].values():
        assert r["n_images"] == 2
        assert list(r["iou_per_class"]) == ["matrix", "secondary", "tertiary"]
        values = [r["nasa_iou_mean"], r["miou"], r["pixel_accuracy"], *r["per_image_nasa_iou"],
                  *(v for v in r["iou_per_class"].values() if not math.isnan(v))]
        assert all(0.0 <= v <= 1.0 for v in values), r


def test_random_crop_pads_and_keeps_pairs_aligned():
    pb = _script()
    image = np.arange(40 * 50, dtype=np.float32).reshape(40, 50)
    label = (np.arange(40 * 50) % 3).astype(np.uint8).reshape(40, 50)
    crop, lab = pb.random_crop(np.random.default_rng(0), image, label, 64)
    assert crop.shape == lab.shape == (64, 64)
    assert np.array_equal(crop.astype(np.int64) % 3, lab)  # same geometry applied to both
    z = pb.zscore(np.array([[0, 10], [20, 30]], dtype=np.uint16))
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    assert np.array_equal(pb.zscore(np.full((4, 4), 7, np.uint8)), np.zeros((4, 4), np.float32))
