"""segment.infer: tile geometry, Gaussian weights and the sliding-window Predictor."""
import numpy as np
import pytest
import torch
from torch import nn

from _tiles import interior_mask
from pretrain.intensity import scale_intensity, to_float
from segment.infer import Predictor, dihedral_transforms
from segment.tiling import class_labels, compute_steps, gaussian_importance, tile_origins


# ----------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    ("size", "tile", "frac", "expected"),
    [
        (256, 128, 0.5, [0, 64, 128]),  # exact multiple of the step
        (128, 128, 0.5, [0]),  # exactly one tile
        (100, 128, 0.5, [0]),  # smaller than a tile: one (padded) tile
        (300, 128, 0.5, [0, 57, 115, 172]),  # non-multiple: 4 evenly spread steps <= 64
        (256, 128, 1.0, [0, 128]),  # overlap 0, exact
        (300, 128, 1.0, [0, 86, 172]),  # overlap 0, non-multiple: tiles overlap a little
        (129, 128, 0.5, [0, 1]),
    ],
)
def test_compute_steps_cases(size, tile, frac, expected):
    assert compute_steps(size, tile, frac) == expected


@pytest.mark.parametrize("size", [64, 65, 97, 200, 513, 1000])
@pytest.mark.parametrize("frac", [0.25, 0.5, 0.75, 1.0])
def test_compute_steps_invariants(size, frac):
    tile = 64
    steps = compute_steps(size, tile, frac)
    assert steps[0] == 0 and steps[-1] + tile == max(size, tile)  # flush with both borders
    gaps = np.diff(steps)
    assert (gaps > 0).all() and (gaps <= tile * frac + 1).all()
    if len(steps) > 2:  # as few tiles as possible: one fewer would need a longer step
        assert (size - tile) / (len(steps) - 2) > tile * frac


def test_compute_steps_rejects_bad_arguments():
    for args in [(100, 0, 0.5), (0, 64, 0.5), (100, 64, 0.0), (100, 64, 1.5)]:
        with pytest.raises(ValueError):
            compute_steps(*args)


def test_tile_origins_row_major_cover():
    origins = tile_origins((100, 70), (32, 32), 0.5)
    assert origins == sorted(origins)  # row bands in order, as a streaming version needs
    cover = np.zeros((100, 70), int)
    for y, x in origins:
        cover[y : y + 32, x : x + 32] += 1
    assert cover.min() >= 1


def test_gaussian_importance_properties():
    g = gaussian_importance((64, 64))
    assert g.shape == (64, 64) and g.dtype == np.float32
    assert g.max() == pytest.approx(1.0) and g.min() > 0
    assert np.unravel_index(g.argmax(), g.shape) in {(31, 31), (31, 32), (32, 31), (32, 32)}
    np.testing.assert_allclose(g, g[::-1], rtol=1e-6)  # dihedral symmetry: TTA keeps weights
    np.testing.assert_allclose(g, g[:, ::-1], rtol=1e-6)
    np.testing.assert_allclose(g, g.T, rtol=1e-6)
    assert gaussian_importance((64, 64)) is g  # cached ...
    assert not g.flags.writeable  # ... and therefore read-only
    assert gaussian_importance(64) is g
    r = gaussian_importance((16, 40))
    assert r.shape == (16, 40) and r[8, 0] < r[8, 20]
    # a narrow Gaussian underflows at the borders: clipped to the smallest non-zero value
    narrow = gaussian_importance((128, 128), sigma_scale=0.01)
    assert narrow.min() > 0 and narrow[0, 0] == narrow.min()


# ----------------------------------------------------------------------------- predictor
class Identity(nn.Module):
    def forward(self, x):
        return x.clone()


class SignTwoClass(nn.Module):
    """Logits [x, -x]: class 0 where the normalised input is positive."""

    def forward(self, x):
        return torch.cat([x, -x], dim=1)


def small_conv(in_ch=1, k=3, seed=0):
    """Translation-equivariant net with a 2-pixel receptive radius (two 3x3 convs)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, k, 3, padding=1))


@pytest.mark.parametrize("gaussian", [True, False])
def test_identity_model_reproduces_large_input(gaussian):
    torch.manual_seed(0)
    image = torch.randn(2, 1000, 777)
    p = Predictor(Identity(), tile_size=128, gaussian=gaussian, batch_size=16)
    out = p.predict_logits(image)
    assert out.dtype == torch.float32 and out.shape == image.shape
    torch.testing.assert_close(out, image, rtol=1e-5, atol=1e-5)


def test_tta_with_equivariant_model_equals_no_tta():
    torch.manual_seed(1)
    image = torch.randn(3, 150, 97)
    plain = Predictor(Identity(), tile_size=64).predict_logits(image)
    tta = Predictor(nn.Identity(), tile_size=64, tta=True).predict_logits(image)  # returns its input
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tta, image, rtol=1e-5, atol=1e-5)


def test_tta_undoes_each_transform():
    """One tile covering the image: TTA = mean over the 8 dihedral views, each mapped back."""
    model = small_conv(k=2).eval()
    x = torch.randn(1, 32, 32)
    expected = torch.zeros(2, 32, 32)
    with torch.no_grad():
        for flip in (False, True):
            v = torch.flip(x, (-1,)) if flip else x
            for k in range(4):
                y = torch.rot90(model(torch.rot90(v, k, (-2, -1))[None])[0], -k, (-2, -1))
                expected += torch.flip(y, (-1,)) if flip else y
    expected /= 8
    out = Predictor(model, tile_size=32, tta=True).predict_logits(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert len(dihedral_transforms(square=True)) == 8 and len(dihedral_transforms(square=False)) == 4


def test_conv_model_matches_full_forward_away_from_tile_borders():
    model = small_conv(k=3).eval()
    h, w, tile, radius = 90, 70, 32, 2
    image = torch.randn(1, h, w)
    p = Predictor(model, tile_size=tile, overlap=0.5, batch_size=5)
    out = p.predict_logits(image)
    with torch.no_grad():
        full = model(image[None])[0]

    mask = interior_mask(h, w, tile, p.step_fraction, radius)
    assert mask.float().mean() > 0.5
    torch.testing.assert_close(out[:, mask], full[:, mask], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, full, atol=1e-5)  # the borders really differ: the mask matters


def test_batch_size_does_not_change_result():
    model = small_conv(k=2)
    image = torch.randn(1, 77, 51)
    a = Predictor(model, tile_size=24, batch_size=1).predict_logits(image)
    b = Predictor(model, tile_size=24, batch_size=7).predict_logits(image)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hw", [(20, 25), (1, 9), (50, 13)])
def test_images_smaller_than_tile_are_padded_and_cropped(hw):
    image = torch.randn(1, *hw)
    out = Predictor(Identity(), tile_size=32).predict_logits(image)
    torch.testing.assert_close(out, image)


def _any_size_model():
    """The project's tiny CS-UNet when available, else a down/up conv net that pads internally."""
    try:
        from segment.models import create_model

        return create_model("cs_unet_test", num_classes=3, in_chans=1, img_size=64)
    except (ImportError, KeyError, ValueError, RuntimeError):

        class DownUp(nn.Module):
            def __init__(self):
                super().__init__()
                self.down = nn.Conv2d(1, 4, 3, stride=4, padding=1)
                self.head = nn.Conv2d(4, 3, 1)

            def forward(self, x):
                y = self.head(self.down(x))
                return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear")

        torch.manual_seed(0)
        return DownUp()


def test_model_accepts_tiles_of_any_size():
    model = _any_size_model()
    image = np.random.default_rng(0).random((70, 45), dtype=np.float32)
    p = Predictor(model, tile_size=48, batch_size=2, mean=(0.5,), std=(0.25,))
    labels, probs = p.predict_image(image, return_probs=True)
    assert labels.shape == (70, 45) and labels.dtype == np.uint8 and labels.max() < 3
    assert probs.shape == (3, 70, 45) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), labels)
    assert not model.training


def test_predict_image_normalises_with_mean_std():
    image = np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(40, 30)
    p = Predictor(SignTwoClass(), tile_size=16, mean=(0.3,), std=(0.1,))
    labels, probs = p.predict_image(image)
    assert probs is None
    np.testing.assert_array_equal(labels, np.where(image > 0.3, 0, 1).astype(np.uint8))
    torch.testing.assert_close(p.normalize(image)[0], torch.from_numpy((image - 0.3) / 0.1))
    # gray image, 3-channel model: repeated; RGB image, 1-channel model: averaged
    p3 = Predictor(Identity(), tile_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert p3.normalize(image).shape == (3, 40, 30)
    assert p.normalize(np.stack([image] * 3, -1)).shape == (1, 40, 30)


@pytest.mark.parametrize("intensity", ["percentile", "dtype"])
def test_predict_image_scales_raw_pixels_like_training(intensity):
    """predict_image(raw) == labels of the manually scaled (scale_intensity) and normalised image."""
    rng = np.random.default_rng(3)
    raw = (1000 + 2000 * rng.random((50, 37))).astype(np.uint16)  # narrow 16-bit band
    raw[5, 5] = 65535  # hot pixel
    model = small_conv(k=3)
    p = Predictor(model, tile_size=24, batch_size=3, mean=(0.5,), std=(0.25,), intensity=intensity)
    assert p.intensity == intensity
    labels, _ = p.predict_image(raw)
    manual = (scale_intensity(raw, intensity) - 0.5) / 0.25
    expected = p.predict_logits(torch.from_numpy(manual)[None]).argmax(0).numpy()
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(p.scale(raw), scale_intensity(raw, intensity))
    if intensity == "percentile":  # brightness/contrast shifts do not change the prediction
        shifted = (raw.astype(np.float64) * 0.5 + 7000).astype(np.uint16)
        np.testing.assert_array_equal(p.scale(shifted), scale_intensity(shifted))
    else:  # the default keeps the old behaviour: float [0, 1] input passes unchanged
        assert Predictor(Identity(), tile_size=8).intensity == "dtype"
        np.testing.assert_array_equal(p.scale(to_float(raw)), to_float(raw))


def test_predictor_intensity_from_checkpoint_meta(tmp_path):
    from segment.checkpoint import save_model
    from segment.models import create_model

    kwargs = dict(num_classes=2, in_chans=1, img_size=32)
    meta = dict(model="unet_test", model_kwargs=kwargs, tile_size=32, in_chans=1, mean=[0.5], std=[0.25])
    old = save_model(tmp_path / "old", create_model("unet_test", **kwargs), meta)
    new = save_model(tmp_path / "new", create_model("unet_test", **kwargs), {**meta, "intensity": "percentile"})
    assert Predictor.from_checkpoint(old).intensity == "dtype"  # no "intensity" key: trained that way
    assert Predictor.from_checkpoint(new).intensity == "percentile"
    assert Predictor.from_checkpoint(new, intensity="dtype").intensity == "dtype"
    with pytest.raises(ValueError, match="intensity must be"):
        Predictor(Identity(), tile_size=8, intensity="minmax")


def test_predict_labels_and_errors():
    p = Predictor(SignTwoClass(), tile_size=16)
    image = torch.tensor([[[1.0, -1.0] * 10] * 20])
    labels = p.predict_labels(image)
    assert labels.dtype == np.uint8 and labels[0, 0] == 0 and labels[0, 1] == 1
    with pytest.raises(ValueError, match="C x H x W"):
        p.predict_logits(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="logits"):
        Predictor(nn.Flatten(), tile_size=8).predict_logits(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError):
        Predictor(Identity(), tile_size=8, overlap=1.0)
    with pytest.raises(RuntimeError, match="non-finite"):
        Predictor(Identity(), tile_size=8).predict_logits(torch.full((1, 8, 8), float("nan")))


def test_class_labels_equal_argmax_ties_to_the_lowest_class():
    torch.manual_seed(0)
    logits = torch.randn(4, 37, 53)
    assert torch.equal(class_labels(logits).long(), logits.argmax(0))
    assert class_labels(logits).dtype == torch.uint8
    tied = torch.zeros(3, 5, 5)
    tied[1:, 2, 2] = 1.0  # classes 1 and 2 tie at one pixel, all three tie elsewhere
    labels = class_labels(tied)
    assert labels[2, 2] == 1 and int(labels.sum()) == 1
    with pytest.raises(ValueError, match="uint8"):
        class_labels(torch.zeros(257, 2, 2))


@pytest.mark.parametrize("zoom", [1.0, 0.5])
def test_predict_labels_equal_argmax_of_predict_logits(zoom):
    torch.manual_seed(0)
    p = Predictor(small_conv(k=3), tile_size=16, batch_size=3, zoom=zoom)
    image = torch.randn(1, 45, 61)
    expected = p.predict_logits(image).argmax(0).numpy()
    np.testing.assert_array_equal(p.predict_labels(image), expected)


def test_predict_labels_at_zoom_1_never_assembles_the_logits(monkeypatch):
    """Labels are reduced block by block where the logits are (one byte per pixel to the host)."""
    p = Predictor(small_conv(k=3), tile_size=16, batch_size=3)
    image = torch.randn(1, 45, 61)
    expected = p.predict_logits(image).argmax(0).numpy()
    monkeypatch.setattr(Predictor, "predict_logits", lambda self, x: pytest.fail("whole-image logits built"))
    monkeypatch.setattr(Predictor, "_predict_logits", lambda self, x: pytest.fail("whole-image logits built"))
    np.testing.assert_array_equal(p.predict_labels(image), expected)


def test_amp_bfloat16_on_cpu_runs():
    model = small_conv(k=2)
    image = torch.randn(1, 40, 40)
    out = Predictor(model, tile_size=32, amp_dtype=torch.bfloat16).predict_logits(image)
    ref = Predictor(model, tile_size=32).predict_logits(image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_inference_settings_come_from_model_json_with_legacy_meanings(tmp_path):
    """Tile, overlap, mean/std, intensity and zoom are read from model.json; keys an older file lacks mean
    what those checkpoints ran with; CLI values (not None) win; a missing tile size is a clear error."""
    import json

    from segment.checkpoint import LEGACY_INFERENCE, inference_settings, save_model
    from segment.models import create_model

    model = create_model("unet_test", num_classes=2, in_chans=1, img_size=32)
    new = dict(model="unet_test", model_kwargs=dict(num_classes=2, in_chans=1, img_size=32), tile_size=32,
               overlap=0.25, mean=[0.4], std=[0.2], intensity="zscore", zoom=0.5)
    p = Predictor.from_checkpoint(save_model(tmp_path / "new", model, new))
    assert (p.tile_hw, p.overlap, p.mean, p.std, p.intensity, p.zoom) == ((32, 32), 0.25, (0.4,), (0.2,), "zscore", 0.5)
    p = Predictor.from_checkpoint(tmp_path / "new", overlap=None, zoom=1.0, tile_size=None)
    assert (p.overlap, p.zoom, p.tile_hw) == (0.25, 1.0, (32, 32))
    old = {k: v for k, v in new.items() if k not in ("overlap", "intensity", "zoom")}
    p = Predictor.from_checkpoint(save_model(tmp_path / "old", model, old))
    assert (p.overlap, p.intensity, p.zoom) == (LEGACY_INFERENCE["overlap"], "dtype", 1.0)
    meta = json.loads((tmp_path / "old" / "model.json").read_text())
    del meta["tile_size"]
    with pytest.raises(KeyError, match="'tile_size'"):
        inference_settings(meta, tmp_path / "old")
