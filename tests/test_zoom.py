"""segment.zoom: resampling between the micrograph's grid and the model's (data.zoom)."""
import numpy as np
import pytest
import torch

from segment.zoom import (
    RowResampler,
    check_zoom,
    image_mode,
    resize_columns,
    resize_image,
    resize_labels,
    resize_logits,
    zoomed_hw,
)


def pushed(resampler, x, sizes, width, mode):
    """Feed ``x`` (C x H x W) to ``resampler`` in blocks of the given row counts (cycled)."""
    out, y, i = [], 0, 0
    while y < x.shape[1]:
        n = min(sizes[i % len(sizes)], x.shape[1] - y)
        for y0, block in resampler.push(resize_columns(x[:, y : y + n], width, mode)):
            assert y0 == sum(b.shape[1] for b in out)  # output rows come in order, none twice
            out.append(block)
        y, i = y + n, i + 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(("hw", "out_hw"), [((100, 77), (50, 38)), ((100, 77), (33, 25)), ((37, 41), (80, 90)),
                                            ((5, 9), (1, 2)), ((10, 10), (23, 23)), ((64, 64), (64, 32))])
@pytest.mark.parametrize("sizes", [[1], [7, 1, 13], [1000]])
def test_row_resampler_equals_whole_image_resize(hw, out_hw, sizes):
    x = torch.randn(3, *hw, generator=torch.Generator().manual_seed(0))
    mode = image_mode(hw, out_hw)
    r = RowResampler(hw[0], out_hw[0], mode)
    torch.testing.assert_close(pushed(r, x, sizes, out_hw[1], mode), resize_image(x, out_hw), rtol=0, atol=2e-5)
    assert r.buf is None  # nothing held once the last row is out
    logits = torch.randn(2, *out_hw, generator=torch.Generator().manual_seed(1))
    back = RowResampler(out_hw[0], hw[0], "bilinear")
    torch.testing.assert_close(pushed(back, logits, sizes, hw[1], "bilinear"), resize_logits(logits, hw),
                               rtol=0, atol=2e-5)


def test_row_resampler_holds_only_the_rows_it_needs():
    r = RowResampler(10_000, 2_500, "area")
    held = 0
    for y in range(0, 10_000, 100):
        list(r.push(torch.zeros(1, 100, 8)))
        held = max(held, 0 if r.buf is None else r.buf.shape[1])
    assert held <= 100 + 4


def test_row_resampler_refuses_too_many_rows():
    r = RowResampler(4, 2)
    list(r.push(torch.zeros(1, 4, 3)))
    with pytest.raises(ValueError, match="5 rows pushed, the image has 4"):
        list(r.push(torch.zeros(1, 1, 3)))


def test_resize_labels_keeps_classes_and_alignment():
    labels = np.zeros((100, 100), dtype=np.uint8)
    labels[20:60, 40:80] = 2
    small = resize_labels(labels, (50, 50))
    assert small.dtype == np.uint8 and set(np.unique(small)) == {0, 2}
    assert small[10:30, 20:40].min() == 2 and small[:10].max() == 0 and small[30:].max() == 0
    assert resize_labels(labels, (100, 100)) is labels


def test_zoom_values_and_sizes():
    assert zoomed_hw((1024, 1000), 0.5) == (512, 500) and zoomed_hw((3, 3), 0.1) == (1, 1)
    assert check_zoom("0.25") == 0.25
    for bad in (0, -1, float("nan"), float("inf"), "x", None):
        with pytest.raises(ValueError, match="zoom must be a positive number"):
            check_zoom(bad)
