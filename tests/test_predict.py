"""segment.predict (folder CLI, outputs, failures) and segment.databar."""
import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from skimage.draw import disk
from torch import nn

from pretrain.io import read_pixel_size_nm, write_tiff
from pretrain.synthetic_materials import superalloy
from segment.databar import detect_databar, find_databar, row_profile
from segment.infer import Predictor
from segment.batch import expand_inputs, output_keys, predict_paths
from segment.predict import main, parse_particle_classes
from segment.records import PredictOptions

NAMES = ["matrix", "secondary", "tertiary"]
COLORS = [[0, 0, 0], [0, 0, 255], [255, 0, 0]]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Threshold(nn.Module):
    """Class 1 wherever the normalised intensity is positive (brighter than the mean), else 0;
    class 2 never. Per-pixel, so blending cannot move a boundary: the prediction is exact."""

    def forward(self, x):
        return torch.cat([-x, x, torch.full_like(x, -100.0)], dim=1) * 10


def disc_image(shape=(150, 170), specs=((40, 40, 12), (90, 110, 15), (120, 30, 8), (0, 150, 9))):
    img = np.full(shape, 25, np.uint8)
    for cy, cx, r in specs:
        rr, cc = disk((cy, cx), r, shape=shape)
        img[rr, cc] = 230
    return img


def with_databar(img, rows=24, seed=0):
    """A black band with white text rows and a white separator line at the bottom."""
    out = img.copy()
    out[-rows:] = 0
    rng = np.random.default_rng(seed)
    w = img.shape[1]
    out[-rows + 6 : -rows + 14, 5 : w // 2] = np.where(rng.random((8, w // 2 - 5)) < 0.35, 255, 0)
    out[-rows - 1] = 255
    return out


@pytest.fixture
def threshold_predictor():
    return Predictor(Threshold(), tile_size=64, batch_size=4, mean=(0.5,), std=(0.25,))


def options(**kw):
    return PredictOptions(class_names=NAMES, colors=COLORS, progress=False, **kw)


# ----------------------------------------------------------------------------- pipeline numbers
def test_known_particles_through_the_pipeline(tmp_path, threshold_predictor):
    img = disc_image()
    write_tiff(tmp_path / "in" / "discs.tif", img, pixel_size_nm=4.0)
    result = predict_paths(threshold_predictor, [tmp_path / "in" / "discs.tif"], tmp_path / "out",
                           options(particle_classes=[1], mask_format="tif"))
    assert result.ok and len(result.images) == 1
    mask_path = tmp_path / "out" / "masks" / "discs.tif"
    mask = tifffile.imread(mask_path)
    np.testing.assert_array_equal(mask, (img > 128).astype(np.uint8))
    assert read_pixel_size_nm(mask_path) == pytest.approx(4.0)
    rows = {r["class"]: r for r in read_csv(tmp_path / "out" / "summary.csv") if r["image"] == "discs"}
    sec = rows["secondary"]
    assert sec["unit"] == "nm" and sec["kind"] == "particles" and rows["tertiary"]["kind"] == "phase"
    assert (int(sec["count_interior"]), int(sec["count_border"])) == (3, 1)
    assert float(sec["area_fraction"]) == pytest.approx((img > 128).mean(), abs=1e-6)
    assert float(sec["ecd_median"]) == pytest.approx(2 * 12 * 4.0, abs=8)  # median disc r=12, in nm
    particles = read_csv(tmp_path / "out" / "particles" / "discs.csv")
    assert len(particles) == 4 and "ecd_nm" in particles[0] and "area_nm2" in particles[0]
    assert sum(int(p["touches_border"]) for p in particles) == 1
    assert (tmp_path / "out" / "histograms" / "ecd_secondary.png").is_file()
    assert (tmp_path / "out" / "overlays" / "discs.png").is_file()
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "EXCLUDED" in readme and "Gundersen" in readme


def test_pixel_size_option_and_pixels(tmp_path, threshold_predictor):
    Image.fromarray(disc_image()).save(tmp_path / "a.png")
    write_tiff(tmp_path / "b.tif", disc_image(), pixel_size_nm=4.0)
    r = predict_paths(threshold_predictor, [tmp_path / "a.png", tmp_path / "b.tif"], tmp_path / "o1", options())
    got = [(i.pixel_size_nm, i.pixel_size_source) for i in r.images]
    assert got == [(None, "none"), (pytest.approx(4.0), "metadata")]
    assert {p.image for p in r.pooled} == {"ALL [nm]", "ALL [px]"}
    assert "ecd_px" in read_csv(tmp_path / "o1" / "particles" / "a.csv")[0]
    r = predict_paths(threshold_predictor, [tmp_path / "a.png", tmp_path / "b.tif"], tmp_path / "o2",
                      options(pixel_size_nm=2.5, pixel_size_override=True))
    assert [i.pixel_size_nm for i in r.images] == [2.5, 2.5] and {p.image for p in r.pooled} == {"ALL"}


def test_images_are_resized_to_the_model_grid_pixel_size(tmp_path, threshold_predictor):
    """A model trained at 8 nm/px (model.json model_pixel_size_nm): a 4 nm/px image is segmented at
    zoom 0.5, a 16 nm/px one at 2, one without a pixel size at the model's zoom (1); masks and
    particle statistics stay in native pixels and the discs are still found."""
    threshold_predictor.meta = {"model_pixel_size_nm": 8.0}
    img = disc_image()
    img[130:150, 130:170] = np.where(np.indices((20, 40)).sum(0) % 2, 200, 25)  # 1-px checkerboard
    Image.fromarray(img).save(tmp_path / "a.png")
    write_tiff(tmp_path / "b.tif", img, pixel_size_nm=4.0)
    write_tiff(tmp_path / "c.tif", img, pixel_size_nm=16.0)
    paths = [tmp_path / n for n in ("a.png", "b.tif", "c.tif")]
    r = predict_paths(threshold_predictor, paths, tmp_path / "o", options(particle_classes=[1]))
    assert [i.zoom for i in r.images] == [1.0, 0.5, 2.0]
    assert [row["zoom"] for row in read_csv(tmp_path / "o" / "images.csv")] == ["1", "0.5", "2"]
    assert "model grid's 8 nm/px" in (tmp_path / "o" / "README.md").read_text()
    masks = {k: np.asarray(Image.open(tmp_path / "o" / "masks" / f"{k}.png")) for k in ("a", "b", "c")}
    for mask in masks.values():
        assert mask.shape == img.shape and (mask == (img > 128)).mean() > 0.97
    # the zoom really reached the band-wise predictor: at native size the checkerboard's bright pixels
    # are class 1; at half size they average with the dark ones (112.5 < 127.5) and vanish
    assert masks["a"][132:148, 132:168].mean() == pytest.approx(0.5, abs=0.02)
    assert masks["b"][132:148, 132:168].max() == 0
    assert threshold_predictor.zoom == 1.0  # the caller's predictor is left as it was
    r = predict_paths(threshold_predictor, paths, tmp_path / "o2", options(match_pixel_size=False))
    assert [i.zoom for i in r.images] == [1.0, 1.0, 1.0]


def test_crop_bottom_and_auto_databar(tmp_path, threshold_predictor):
    img = with_databar(disc_image(), rows=24)
    Image.fromarray(img).save(tmp_path / "bar.png")
    r = predict_paths(threshold_predictor, [tmp_path / "bar.png"], tmp_path / "auto", options(databar="auto"))
    assert r.images[0].databar_rows == 25 and r.images[0].height == img.shape[0] - 25
    mask = np.asarray(Image.open(tmp_path / "auto" / "masks" / "bar.png"))
    np.testing.assert_array_equal(mask, (img[:-25] > 128).astype(np.uint8))
    r = predict_paths(threshold_predictor, [tmp_path / "bar.png"], tmp_path / "fixed", options(crop_bottom=30))
    assert r.images[0].height == img.shape[0] - 30
    assert read_csv(tmp_path / "fixed" / "images.csv")[0]["databar_rows"] == "30"


def test_probability_maps(tmp_path, threshold_predictor):
    Image.fromarray(disc_image((70, 90), ((35, 45, 10),))).save(tmp_path / "p.png")  # not blank: that is an error
    r = predict_paths(threshold_predictor, [tmp_path / "p.png"], tmp_path / "o", options(save_probs=True))
    probs = tifffile.imread(r.images[0].outputs["probabilities"])
    assert probs.shape == (3, 70, 90) and probs.dtype == np.uint8
    assert np.abs(probs.astype(int).sum(0) - 255).max() <= 2
    assert not list((tmp_path / "o" / "probabilities").glob(".*"))  # no temporary files left


# ----------------------------------------------------------------------------- CLI and failures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from segment.checkpoint import save_model
    from segment.models import create_model

    torch.manual_seed(0)
    kwargs = dict(num_classes=3, in_chans=1, img_size=64)
    model = create_model("unet_test", **kwargs)
    path = tmp_path_factory.mktemp("ckpt") / "best"
    return save_model(path, model, dict(model="unet_test", model_kwargs=kwargs, class_names=NAMES, colors=COLORS,
                                        tile_size=64, in_chans=1, mean=[0.5], std=[0.25]))


def test_cli_bad_file_does_not_stop_the_batch(tmp_path, checkpoint):
    inp = tmp_path / "in"
    img = superalloy((90, 100), seed=1)[0]
    write_tiff(inp / "good1.tif", img, pixel_size_nm=3.0)
    (inp / "sub").mkdir()
    Image.fromarray(img[:70]).save(inp / "sub" / "good2.png")
    (inp / "corrupt.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    (inp / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "out"
    rc = main([str(checkpoint), str(inp), str(tmp_path / "nothing*.tif"), "--out", str(out), "--no-progress",
               "--particle-classes", "secondary,tertiary", "--watershed"])
    assert rc == 1
    for key in ("good1", "sub/good2"):
        assert (out / "masks" / f"{key}.png").is_file() and (out / "overlays" / f"{key}.png").is_file()
        assert (out / "particles" / f"{key}.csv").is_file()
    failures = read_csv(out / "failures.csv")
    failed = {Path(f["input"]).name for f in failures}
    assert failed == {"corrupt.tif", "truncated.png", "nothing*.tif"}
    assert all(f["error"] for f in failures)
    summary = read_csv(out / "summary.csv")
    assert {r["image"] for r in summary} == {"good1", "sub/good2", "ALL [nm]", "ALL [px]"}
    assert {r["unit"] for r in summary if r["image"] == "good1"} == {"nm"}
    images = read_csv(out / "images.csv")
    assert [(r["image"], r["pixel_size_source"]) for r in images] == [("good1", "metadata"), ("sub/good2", "none")]


def test_cli_all_good_exit_zero_and_pixel_size(tmp_path, checkpoint):
    Image.fromarray(superalloy((80, 80), seed=2)[0]).save(tmp_path / "a.png")
    rc = main([str(checkpoint), str(tmp_path / "*.png"), "--out", str(tmp_path / "o"), "--no-progress",
               "--pixel-size", "0.01um", "--no-overlays", "--mask-format", "tif"])
    assert rc == 0
    assert read_csv(tmp_path / "o" / "images.csv")[0]["pixel_size_nm"] == "10"
    assert (tmp_path / "o" / "masks" / "a.tif").is_file() and not (tmp_path / "o" / "overlays").exists()
    assert read_csv(tmp_path / "o" / "failures.csv") == []
    rc = main([str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "z"), "--no-progress",
               "--zoom", "0.5", "--no-overlays"])
    assert rc == 0 and read_csv(tmp_path / "z" / "images.csv")[0]["zoom"] == "0.5"
    assert np.asarray(Image.open(tmp_path / "z" / "masks" / "a.png")).shape == (80, 80)


def test_cli_rejects_bad_arguments(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), str(tmp_path), "--out", str(tmp_path / "o"), "--pixel-size", "2.5"])
    assert e.value.code == 2 and "no unit" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([str(checkpoint), str(tmp_path), "--out", str(tmp_path / "o"), "--zoom", "-1"])
    assert e.value.code == 2 and "zoom must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown class"):
        main([str(checkpoint), str(tmp_path), "--out", str(tmp_path / "o"), "--particle-classes", "gamma"])
    with pytest.raises(SystemExit, match="no images"):
        main([str(checkpoint), str(tmp_path / "empty*"), "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------- inputs
def test_expand_inputs_and_keys(tmp_path):
    for rel in ("a/x.tif", "a/y.png", "a/deep/z.tif", "b/x.png", "a/notes.txt", "a/.hidden.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    paths, failures = expand_inputs([tmp_path / "a", str(tmp_path / "b" / "*.png"), tmp_path / "a" / "x.tif",
                                     str(tmp_path / "missing*.tif")])
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["a/deep/z.tif", "a/x.tif", "a/y.png", "b/x.png"]
    assert len(failures) == 1 and "missing" in failures[0][0]
    keys = output_keys(paths)
    assert sorted(keys.values()) == ["a/deep/z", "a/x", "a/y", "b/x"]
    same_stem = [tmp_path / "a" / "x.tif", tmp_path / "a" / "x.png"]
    assert sorted(output_keys(same_stem).values()) == ["x_png", "x_tif"]


def test_parse_particle_classes():
    assert parse_particle_classes("secondary, Tertiary", NAMES) == [1, 2]
    assert parse_particle_classes("2,1", NAMES) == [1, 2]
    assert parse_particle_classes("none", NAMES) == []
    with pytest.raises(ValueError, match="unknown class"):
        parse_particle_classes("gamma", NAMES)
    assert options().particle_indices == [1, 2]  # default: every class but the background
    with pytest.raises(ValueError):
        options(databar="auto", crop_bottom=3)


# ----------------------------------------------------------------------------- data bar
def test_databar_detection_synthetic():
    img = superalloy((300, 256), seed=1)[0]
    assert detect_databar(img).rows == 0
    bar = detect_databar(with_databar(img, rows=40))
    assert bar.rows == 41 and bar.level < 0.01  # the band plus its separator line
    white = img.copy()
    white[-30:] = 255
    white[-22:-12, 5:120] = np.where(np.random.default_rng(1).random((10, 115)) < 0.4, 0, 255)
    assert detect_databar(white).rows == 30
    assert detect_databar(with_databar(img, rows=40).astype(np.uint16) * 257).rows == 41
    flat = np.full((200, 100), 128, np.uint8)
    assert detect_databar(flat).rows == 0  # one level everywhere: no abrupt change


def test_find_databar_pure():
    frac = np.r_[np.full(50, 0.02), np.full(10, 0.9), [0.6, 0.55], np.full(8, 0.95)]
    flat = np.zeros_like(frac, bool)
    assert find_databar(frac, flat, image_rows=200)[0] == 20
    flat[49] = True  # a frame line joins the bar
    assert find_databar(frac, flat, image_rows=200)[0] == 21
    assert find_databar(frac, flat, image_rows=40)[0] == 0  # more than 40 % of the image
    assert find_databar(np.full(30, 0.02), np.zeros(30, bool), image_rows=200)[0] == 0
    f, fl = row_profile(np.array([[0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]]), level=0.0, tol=0.01)
    np.testing.assert_allclose(f, [0.75, 0.0])
    assert fl.tolist() == [False, True]
