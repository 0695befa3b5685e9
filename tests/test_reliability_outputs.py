"""Output reliability (issue 12): outputs honour the umask; segment.predict resumes an interrupted run."""
import csv
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.draw import disk
from torch import nn

import segment.batch as predict_mod
from pretrain.io import write_tiff
from pretrain.outputs import atomic_write_text
from segment.infer import Predictor
from segment.batch import predict_paths
from segment.predict import main
from segment.records import PredictOptions

NAMES = ["matrix", "secondary", "tertiary"]
COLORS = [[0, 0, 0], [0, 0, 255], [255, 0, 0]]


class Threshold(nn.Module):
    """Class 1 where the normalised intensity is positive, else 0; exact and deterministic."""

    def forward(self, x):
        return torch.cat([-x, x, torch.full_like(x, -100.0)], dim=1) * 10


def disc_image(seed, shape=(70, 80)):
    """Dark background with a few bright discs placed by ``seed`` (some touch the border)."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, 25, np.uint8)
    for _ in range(4):
        rr, cc = disk((rng.integers(0, shape[0]), rng.integers(0, shape[1])), rng.integers(4, 10), shape=shape)
        img[rr, cc] = 230
    return img


def make_inputs(folder):
    """Four small images: two calibrated TIFFs, two PNGs in pixels (both pooled groups)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tiff(folder / "a.tif", disc_image(1), pixel_size_nm=4.0)
    Image.fromarray(disc_image(2)).save(folder / "b.png")
    write_tiff(folder / "c.tif", disc_image(3), pixel_size_nm=4.0)
    Image.fromarray(disc_image(4)).save(folder / "d.png")
    return [folder / n for n in ("a.tif", "b.png", "c.tif", "d.png")]


def options(**kw):
    return PredictOptions(class_names=NAMES, colors=COLORS, progress=False, **kw)


@pytest.fixture
def predictor():
    return Predictor(Threshold(), tile_size=64, batch_size=4, mean=(0.5,), std=(0.25,))


@pytest.fixture
def calls(monkeypatch):
    """Keys of the images that reach the model (segment.predict's call of predict_stream)."""
    seen = []
    real = predict_mod.predict_stream

    def counting(predictor, source, **kw):
        seen.append(kw.get("desc"))
        return real(predictor, source, **kw)

    monkeypatch.setattr(predict_mod, "predict_stream", counting)
    return seen


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def leftovers(folder):
    """Temporary files (hidden names, ``*.tmp``) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.startswith(".") or p.name.endswith(".tmp"))


def modes(folder):
    """{relative path: (is folder, permission bits)} of everything under ``folder``."""
    return {str(p.relative_to(folder)): (p.is_dir(), stat.S_IMODE(p.stat().st_mode)) for p in folder.rglob("*")}


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------- item 3: umask
def test_atomic_writers_honour_umask(tmp_path, umask):
    """atomic_write_text, write_tiff, save_panel and save_model (folder and files) get the modes a
    plain open/mkdir gives under the umask, not mkstemp's 0600 / mkdtemp's 0700."""
    from segment.checkpoint import save_model
    from segment.models import create_model
    from segment.overlay import save_panel

    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    atomic_write_text(tmp_path / "t.txt", "x")
    write_tiff(tmp_path / "m.tif", np.zeros((8, 8), np.uint8))
    labels = np.zeros((16, 16), np.uint8)
    save_panel(tmp_path / "p.png", labels / 1.0, labels, labels, NAMES, COLORS, "t")
    kwargs = dict(num_classes=3, in_chans=1, img_size=64)
    ckpt = save_model(tmp_path / "ckpt", create_model("unet_test", **kwargs), dict(model="unet_test", model_kwargs=kwargs))
    for name in ("t.txt", "m.tif", "p.png", "ckpt/model.safetensors", "ckpt/model.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE(ckpt.stat().st_mode) == dir_mode
    save_model(ckpt, create_model("unet_test", **kwargs), dict(model="unet_test", model_kwargs=kwargs))  # replace
    assert stat.S_IMODE(ckpt.stat().st_mode) == dir_mode
    assert leftovers(tmp_path) == []


def test_predict_outputs_honour_umask(tmp_path, predictor, umask):
    """Every file segment.predict writes (masks, overlays, probabilities, CSVs, histograms, README,
    records) is 0666 & ~umask and every folder 0777 & ~umask: colleagues can read a shared drive."""
    paths = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    result = predict_paths(predictor, paths, out, options(save_probs=True, particle_classes=[1]))
    assert result.ok
    found = modes(out)
    for rel in ("masks/a.png", "overlays/a.png", "probabilities/a.tif", "particles/a.csv", "summary.csv",
                "images.csv", "failures.csv", "README.md", "histograms/ecd_secondary_nm.png"):
        assert rel in found, rel
    wrong = {rel: oct(m) for rel, (is_dir, m) in found.items() if m != (0o777 if is_dir else 0o666) & ~umask}
    assert wrong == {}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# ----------------------------------------------------------------------------- item 5: resume
def _interrupting_save(key):
    """PIL's save, except that the overlay of ``key`` is cut off mid-write by a KeyboardInterrupt
    (its mask is already written: the image's outputs are partial)."""
    real = Image.Image.save

    def save(self, fp, *args, **kw):
        p = Path(fp)
        if p.parent.name == "overlays" and p.name.startswith(f".{key}.png"):
            p.write_bytes(b"\x89PNG\r\n\x1a\n partial")
            raise KeyboardInterrupt
        return real(self, fp, *args, **kw)

    return save


def test_interrupted_predict_leaves_no_temps_and_resumes(tmp_path, predictor, calls, monkeypatch):
    """Ctrl-C during image 3 (c) leaves no temporary file; a stale one of a killed run is removed;
    the rerun segments only c and d (c's partial outputs redone) and writes the same summary as an
    uninterrupted run, the skipped images read back from their records."""
    paths = make_inputs(tmp_path / "in")
    opts = options(particle_classes=[1])
    full = predict_paths(predictor, paths, tmp_path / "full", opts)
    assert full.ok and calls == ["a", "b", "c", "d"]

    out = tmp_path / "out"
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", _interrupting_save("c"))
        with pytest.raises(KeyboardInterrupt):
            predict_paths(predictor, paths, out, opts)
    assert calls == ["a", "b", "c"]
    assert (out / "masks" / "c.png").is_file() and not (out / "overlays" / "c.png").exists()  # partial
    assert leftovers(out) == []
    (out / "masks" / ".b.png.k1ll3d.tmp").write_bytes(b"half a png")  # as a SIGKILLed writer leaves it
    (out / ".summary.csv.x7.tmp").write_text("image,class\n")

    calls.clear()
    resumed = predict_paths(predictor, paths, out, opts)
    assert calls == ["c", "d"]
    assert resumed.ok and resumed.skipped == ["a", "b"]
    assert leftovers(out) == []
    assert (out / "summary.csv").read_bytes() == (tmp_path / "full" / "summary.csv").read_bytes()
    def strip(rows):  # timings and the output folder differ
        return [{k: v for k, v in r.items() if k not in ("seconds", "mask")} for r in rows]

    assert strip(read_csv(out / "images.csv")) == strip(read_csv(tmp_path / "full" / "images.csv"))
    assert [r["mask"] for r in read_csv(out / "images.csv")] == [str(out / "masks" / f"{k}.png") for k in "abcd"]
    for key in "abcd":
        for folder, suffix in (("masks", "png"), ("overlays", "png"), ("particles", "csv")):
            assert (out / folder / f"{key}.{suffix}").read_bytes() == \
                (tmp_path / "full" / folder / f"{key}.{suffix}").read_bytes(), (folder, key)
    assert "2 of them by an earlier run" in (out / "README.md").read_text()

    calls.clear()
    assert predict_paths(predictor, paths, out, opts).skipped == ["a", "b", "c", "d"] and calls == []


def test_resume_redoes_changed_inputs_settings_and_missing_outputs(tmp_path, predictor, calls):
    """A record counts only for the same input file, model and options, with its outputs present;
    a failing image is listed in failures.csv on every run and tried again."""
    paths = make_inputs(tmp_path / "in")
    bad = tmp_path / "in" / "e.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    out = tmp_path / "out"
    opts = options(particle_classes=[1])
    first = predict_paths(predictor, [*paths, bad], out, opts)
    assert [Path(p).name for p, _ in first.failures] == ["e.tif"] and len(first.images) == 4

    calls.clear()
    write_tiff(paths[0], disc_image(9), pixel_size_nm=4.0)  # a.tif replaced by another image
    (out / "particles" / "b.csv").unlink()  # an output deleted
    again = predict_paths(predictor, [*paths, bad], out, opts)
    assert calls == ["a", "b"] and again.skipped == ["c", "d"]  # e fails again before the model
    assert [Path(p).name for p, _ in read_csv_pairs(out / "failures.csv")] == ["e.tif"]
    assert len(again.images) == 4

    calls.clear()
    predict_paths(predictor, paths, out, options(particle_classes=[1], watershed=True))  # other options
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    predictor.model = nn.Sequential(Threshold(), nn.Conv2d(3, 3, 1))  # other weights
    predict_paths(predictor, paths, out, options(particle_classes=[1], watershed=True))
    assert calls == ["a", "b", "c", "d"]


def read_csv_pairs(path):
    return [(r["input"], r["error"]) for r in read_csv(path)]


def test_cli_overwrite_redoes_every_image(tmp_path, calls):
    """predict's CLI: a rerun on the same --out skips finished images; --overwrite redoes them all."""
    from segment.checkpoint import save_model
    from segment.models import create_model

    torch.manual_seed(0)
    kwargs = dict(num_classes=3, in_chans=1, img_size=64)
    ckpt = save_model(tmp_path / "ckpt", create_model("unet_test", **kwargs),
                      dict(model="unet_test", model_kwargs=kwargs, class_names=NAMES, colors=COLORS, tile_size=64,
                           in_chans=1, mean=[0.5], std=[0.25]))
    make_inputs(tmp_path / "in")
    args = [str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0 and len(calls) == 4
    summary = (tmp_path / "out" / "summary.csv").read_bytes()
    calls.clear()
    assert main(args) == 0 and calls == []
    assert (tmp_path / "out" / "summary.csv").read_bytes() == summary
    assert main([*args, "--overwrite"]) == 0 and sorted(calls) == ["a", "b", "c", "d"]
    assert (tmp_path / "out" / "summary.csv").read_bytes() == summary
