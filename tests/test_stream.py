"""segment.stream: band-wise bounded-memory sliding window == the whole-image Predictor."""
import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from _tiles import interior_mask
from pretrain.intensity import intensity_range, intensity_window, scale_intensity, to_float
from pretrain.io import read_micrograph, write_tiff
from segment.infer import Predictor
from segment.sources import (
    ArraySource,
    CroppedSource,
    TiffSource,
    open_source,
    source_intensity_window,
    thumbnail,
)
from segment.stream import iter_logit_rows, predict_stream
from segment.tiling import accumulator_bytes, compute_steps, plan_bands


class Identity(nn.Module):
    def forward(self, x):
        return x.clone()


def small_conv(in_ch=1, k=3, seed=0):
    """Translation-equivariant net with a 2-pixel receptive radius (two 3x3 convs)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k, 3, padding=1)).eval()


def stream_logits(predictor, source):
    blocks = list(iter_logit_rows(predictor, source))
    ys = [y for y, _ in blocks]
    assert ys == sorted(ys) and ys[0] == 0  # consecutive blocks, top to bottom
    return torch.cat([b.cpu() for _, b in blocks], dim=1)


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("hw", [(1000, 777), (64, 64), (30, 500), (513, 20)])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_plan_bands_bounded_and_final(hw, batch):
    tile = (64, 48)
    plan = plan_bands(hw, tile, 0.5, batch)
    ph, pw = plan.padded_hw
    origins = [o for b in plan.batches for o in b]
    assert origins == sorted(origins) and len(set(origins)) == len(origins)
    lo = 0
    for b, final in zip(plan.batches, plan.final_after):
        assert b[0][0] == lo  # the accumulators start at the batch's first tile row ...
        assert max(y for y, _ in b) + tile[0] - lo <= plan.capacity  # ... and hold all of it
        later = [o for bb in plan.batches[plan.batches.index(b) + 1 :] for o in bb]
        assert all(y >= final for y, _ in later)  # no later tile touches a final row
        lo = final
    assert lo == ph
    n_x = len(compute_steps(pw, tile[1], 0.5))
    max_step = max(np.diff(compute_steps(ph, tile[0], 0.5)), default=0)
    rows_spanned = -(-batch // n_x) + 1  # tile rows one batch can touch
    assert plan.capacity <= tile[0] + (rows_spanned - 1) * max_step


def test_accumulator_height_does_not_grow_with_image_height():
    caps = {h: plan_bands((h, 300), (64, 64), 0.5, 4).capacity for h in (200, 2000, 20000)}
    assert max(caps.values()) <= 64 + 32  # one tile plus at most one step, whatever the height
    # 10k x 10k, 3 classes, 256 tiles: tens of MB of float state instead of 1.2 GB for K x H x W
    small = accumulator_bytes((10_000, 10_000), 3, 1, (256, 256), 0.5, 8)
    assert small < 0.08 * 3 * 10_000 * 10_000 * 4
    assert accumulator_bytes((40_000, 10_000), 3, 1, (256, 256), 0.5, 8) <= small * 1.01


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("gaussian", [True, False])
def test_identity_model_reproduces_1000x777_input(gaussian):
    image = np.random.default_rng(0).random((1000, 777), dtype=np.float32)
    p = Predictor(Identity(), tile_size=128, gaussian=gaussian, batch_size=16, mean=(0.0,), std=(1.0,))
    out = stream_logits(p, ArraySource(image))
    assert out.shape == (1, 1000, 777) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), image, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("hw", "tile", "batch", "tta"),
    [((300, 211), 64, 5, False), ((20, 300), 64, 3, False), ((300, 20), (64, 48), 2, False),
     ((50, 50), 64, 1, False), ((129, 64), 64, 7, False), ((140, 97), 48, 4, True)],
)
def test_stream_equals_predictor(hw, tile, batch, tta):
    model = small_conv(k=3)
    image = np.random.default_rng(1).random(hw, dtype=np.float32)
    p = Predictor(model, tile_size=tile, batch_size=batch, tta=tta)
    full = p.predict_logits(p.normalize(image))
    streamed = stream_logits(p, ArraySource(image))
    assert streamed.shape == full.shape
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-5)
    labels = predict_stream(p, image)
    np.testing.assert_array_equal(labels, full.argmax(0).numpy().astype(np.uint8))


@pytest.mark.parametrize(("hw", "zoom", "tile", "batch"),
                         [((300, 211), 0.5, 64, 5), ((257, 130), 0.37, 32, 3), ((90, 70), 1.7, 48, 4),
                          ((40, 300), 0.5, 64, 2), ((1000, 61), 0.25, 32, 8)])
def test_stream_equals_predictor_with_zoom(hw, zoom, tile, batch):
    """data.zoom: the band-wise path (input resampled down the rows as bands arrive, logits resampled
    back band by band) equals the whole-image resize -> tiles -> resize back of Predictor."""
    model = small_conv(k=3)
    image = np.random.default_rng(3).random(hw, dtype=np.float32)
    p = Predictor(model, tile_size=tile, batch_size=batch, zoom=zoom)
    full = p.predict_logits(p.normalize(image))
    assert full.shape == (3, *hw)  # logits come back on the image's own grid
    streamed = stream_logits(p, ArraySource(image))
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(predict_stream(p, image) == full.argmax(0).numpy(), True)


def test_zoom_changes_what_the_model_sees():
    """zoom 0.5 on an identity model: the logits are the image averaged over 2x2 blocks and brought
    back bilinearly, so a one-pixel checkerboard (invisible at half resolution) comes back flat."""
    image = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    p = Predictor(Identity(), tile_size=32, mean=(0.0,), std=(1.0,), zoom=0.5)
    out = p.predict_logits(p.normalize(image))[0].numpy()
    np.testing.assert_allclose(out, 0.5, atol=1e-6)
    np.testing.assert_allclose(stream_logits(p, ArraySource(image))[0].numpy(), 0.5, atol=1e-6)


def test_stream_matches_full_forward_away_from_tile_borders():
    model = small_conv(k=3)
    h, w, tile, radius = 700, 530, 96, 2
    image = np.random.default_rng(2).random((h, w), dtype=np.float32)
    p = Predictor(model, tile_size=tile, overlap=0.5, batch_size=8)
    out = stream_logits(p, ArraySource(image))
    with torch.no_grad():
        full = model(p.normalize(image)[None])[0]

    mask = interior_mask(h, w, tile, p.step_fraction, radius)
    assert mask.float().mean() > 0.5
    torch.testing.assert_close(out[:, mask], full[:, mask], rtol=1e-4, atol=1e-5)


def test_probabilities_and_label_sinks():
    model = small_conv(k=3)
    image = (np.random.default_rng(3).random((90, 70)) * 65535).astype(np.uint16)
    p = Predictor(model, tile_size=32, batch_size=3)
    logits = p.predict_logits(p.normalize(to_float(image)))
    labels = np.full((90, 70), 255, np.uint8)
    probs = np.zeros((3, 90, 70), np.uint8)
    out = predict_stream(p, image, labels_out=labels, probs_out=probs)
    assert out is labels
    np.testing.assert_array_equal(labels, logits.argmax(0).numpy())
    expected = np.round(torch.softmax(logits, 0).numpy() * 255)
    assert np.abs(probs.astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match="labels_out"):
        predict_stream(p, image, labels_out=np.zeros((10, 10), np.uint8))


# ----------------------------------------------------------------------------- sources
@pytest.fixture
def u16_image():
    return (np.random.default_rng(4).random((203, 157)) * 65535).astype(np.uint16)


@pytest.mark.parametrize("layout", ["memmap", "strips", "tiles"])
def test_tiff_source_rows(tmp_path, u16_image, layout):
    path = tmp_path / f"{layout}.tif"
    if layout == "memmap":
        tifffile.imwrite(path, u16_image)
    elif layout == "strips":
        tifffile.imwrite(path, u16_image, compression="zlib", rowsperstrip=16)
    else:
        tifffile.imwrite(path, u16_image, compression="zlib", tile=(32, 48))
    with TiffSource(path) as src:
        assert src.shape == u16_image.shape and src.memory_mapped == (layout == "memmap")
        for y0, y1 in [(0, 1), (5, 40), (15, 17), (100, 203), (0, 203), (40, 40)]:
            np.testing.assert_array_equal(src.rows(y0, y1), u16_image[y0:y1])
        with pytest.raises(IndexError):
            src.rows(0, 204)


def test_identity_through_compressed_tiff_stream(tmp_path, u16_image):
    path = write_tiff(tmp_path / "a.tif", u16_image, pixel_size_nm=2.5)  # deflate: chunk decoding
    with open_source(path) as src:
        assert isinstance(src, TiffSource) and not src.memory_mapped
        assert src.pixel_size_nm == pytest.approx(2.5)
        p = Predictor(Identity(), tile_size=64, batch_size=5, mean=(0.0,), std=(1.0,))
        out = stream_logits(p, src)
    np.testing.assert_allclose(out[0].numpy(), to_float(u16_image), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("intensity", ["percentile", "zscore", "robust"])
def test_stream_uses_one_intensity_window_per_image(tmp_path, u16_image, intensity):
    """Per-image modes: one window from a strided read of the whole image, applied to every band, so
    the stream equals Predictor on the whole image scaled at once (not a stretch per tile)."""
    raw = (u16_image // 8 + 1000).astype(np.uint16)
    raw[7, 9] = 65535  # hot pixel
    path = write_tiff(tmp_path / "a.tif", raw)  # deflate: chunk decoding
    p = Predictor(Identity(), tile_size=64, batch_size=5, mean=(0.0,), std=(1.0,), intensity=intensity)
    with open_source(path) as src:
        assert source_intensity_window(src, intensity) == pytest.approx(intensity_window(raw, intensity), rel=1e-9)
        out = stream_logits(p, src)
    np.testing.assert_allclose(out[0].numpy(), scale_intensity(raw, intensity), rtol=1e-5, atol=1e-6)
    model = small_conv(k=3)
    p = Predictor(model, tile_size=48, batch_size=4, intensity=intensity)
    labels = predict_stream(p, ArraySource(raw))
    np.testing.assert_array_equal(labels, p.predict_image(raw)[0])


def test_source_intensity_window_strided_for_large_images():
    big = np.random.default_rng(6).integers(0, 60000, (4100, 4100)).astype(np.uint16)  # > 4M pixels
    src = ArraySource(big)
    assert source_intensity_window(src, band=1000) == intensity_range(big) == intensity_range(big[::3, ::3])
    assert source_intensity_window(src, "zscore", band=1000) == pytest.approx(intensity_window(big[::3, ::3], "zscore"))
    assert source_intensity_window(src, "dtype") is None


def test_open_source_falls_back_for_png_and_colour(tmp_path, u16_image):
    from PIL import Image

    Image.fromarray(u16_image).save(tmp_path / "a.png")
    rgb = np.random.default_rng(5).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    with open_source(tmp_path / "a.png") as src:
        assert isinstance(src, ArraySource)
        np.testing.assert_array_equal(src.rows(0, 203), u16_image)
    with pytest.warns(UserWarning, match="luminance"):
        src = open_source(tmp_path / "rgb.tif")  # colour: read whole, converted like read_micrograph
        expected = read_micrograph(tmp_path / "rgb.tif").image
    assert isinstance(src, ArraySource)
    np.testing.assert_array_equal(src.rows(0, 40), expected)


def test_cropped_source_and_thumbnail(u16_image):
    src = CroppedSource(ArraySource(u16_image), 150)
    assert src.shape == (150, 157)
    with pytest.raises(IndexError):
        src.rows(0, 151)
    with pytest.raises(ValueError):
        CroppedSource(ArraySource(u16_image), 0)
    thumb, stride = thumbnail(src, max_side=50, band=7)
    assert stride == 4
    np.testing.assert_array_equal(thumb, to_float(u16_image[:150:4, ::4]))
