"""Bad inputs (issue 12, items 8-11): every failure names the file and the problem, on tiny files.

8: segment.evaluate records every pair it cannot score in failures.csv and exits non-zero.
9: colour-overlay masks: non-gray colours outside the class map are reported, above 0.1 % an error.
10: NaN/Inf or constant images are errors naming the image (predict, evaluate, training, pretrain).
11: the shard writer reports duplicate images and can drop them.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch import nn

import segment.infer
from pretrain import shards as sh
from pretrain.data import list_shards
from pretrain.io import ImageReadError, read_raw, write_tiff
from pretrain.samples import _decode_field
from pretrain.shard_format import MANIFEST_NAME
from segment.class_maps import CLASS_MAPS, MaskError
from segment.data import SegmentationDataset
from segment.evaluate import evaluate_sets, main
from segment.infer import Predictor
from segment.sources import open_source
from segment.stream import predict_stream

CLASS_MAP = {"names": ["bg", "a", "b"], "values": [[0], [1], [2]]}


class NearestLevel(nn.Module):
    """Per-pixel classifier on the normalised intensity (as tests/test_evaluate.py): images written
    as label * 127 are segmented perfectly."""

    def forward(self, x):
        centres = torch.tensor([-2.0, 0.0, 2.0]).view(1, -1, 1, 1)
        return -((x[:, :1] - centres) ** 2)


def predictor() -> Predictor:
    return Predictor(NearestLevel(), tile_size=8, overlap=0.5, batch_size=4)


def labels(shape=(16, 16)) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[shape[0] // 2 :] = 1
    out[:, shape[1] // 2 :] = 2
    return out


def write_pair(root: Path, name: str, lab: np.ndarray, split: str = "test") -> tuple[Path, Path]:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / f"{split}_annot").mkdir(parents=True, exist_ok=True)
    image, mask = root / split / f"{name}.png", root / f"{split}_annot" / f"{name}.png"
    Image.fromarray((lab * 127).astype(np.uint8)).save(image)
    Image.fromarray(lab).save(mask)
    return image, mask


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- item 8: one way to handle every bad pair in segment.evaluate ---------------------------------


def test_evaluate_lists_every_bad_pair_in_failures_csv(tmp_path):
    d = tmp_path / "d"
    good = write_pair(d, "good", labels())
    no_mask_img, gone = write_pair(d, "nomask", labels())
    gone.unlink()
    size_img, size_mask = write_pair(d, "size", labels())
    Image.fromarray((labels((12, 16)) * 127).astype(np.uint8)).save(size_img)  # image 12x16, mask 16x16
    off_img, off_mask = write_pair(d, "offmap", labels())
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(off_mask)  # value 7: not in the class map
    bad_img, bad_img_mask = write_pair(d, "corrupt", labels())
    bad_img.write_bytes(b"not an image")
    orphan = write_pair(d, "orphan", labels())[0]
    pairs = [good, (no_mask_img, gone), (size_img, size_mask), (off_img, off_mask), (bad_img, bad_img_mask),
             (orphan, None)]
    out = tmp_path / "eval"
    res = evaluate_sets(predictor(), {"s": pairs}, CLASS_MAP, out, overlays=False, progress=False)

    assert res["s"]["n_images"] == 1 and res["s"]["nasa_iou_mean"] == 1.0  # the rest is still scored
    rows = read_csv(out / "failures.csv")
    assert list(rows[0]) == ["set", "image", "file", "problem", "message"]
    by_image = {Path(r["image"]).name: r for r in rows}
    assert {name: r["problem"] for name, r in by_image.items()} == {
        "nomask.png": "missing_mask", "size.png": "size_mismatch", "offmap.png": "bad_mask",
        "corrupt.png": "unreadable_image", "orphan.png": "missing_mask"}
    for r in rows:
        assert r["set"] == "s" and Path(r["file"]).name in r["message"]  # the message names the file
    assert by_image["offmap.png"]["file"] == str(off_mask) and "7 x 256 px" in by_image["offmap.png"]["message"]
    assert "12x16" in by_image["size.png"]["message"] and "16x16" in by_image["size.png"]["message"]
    md = (out / "summary.md").read_text()
    assert "| s | 1 (5 failed) |" in md and "size_mismatch" in md and "failures.csv" in md
    # a run without failures still writes the (empty) table, so its absence never means "all fine"
    evaluate_sets(predictor(), {"s": [good]}, CLASS_MAP, tmp_path / "clean", overlays=False, progress=False)
    assert read_csv(tmp_path / "clean" / "failures.csv") == []


def test_evaluate_cli_fails_on_any_bad_image_unless_allowed(tmp_path, monkeypatch, caplog):
    root = tmp_path / "Set"
    write_pair(root, "x1", labels())
    write_pair(root, "x2", labels())[1].unlink()  # an image without a mask: was a traceback from find_pairs
    meta = {"class_map": CLASS_MAP, "tile_size": 8, "mean": [0.5], "std": [0.25], "in_chans": 1,
            "class_names": CLASS_MAP["names"]}
    monkeypatch.setattr(segment.infer, "load_model", lambda path: (NearestLevel(), meta))
    args = [str(tmp_path / "ckpt"), "--set", f"mine={root}", "--device", "cpu", "--no-progress", "--no-overlays"]
    with caplog.at_level(logging.ERROR, logger="segment.evaluate"):
        assert main([*args, "--out", str(tmp_path / "e1")]) == 1
    assert "x2.png" in caplog.text and "missing_mask" in caplog.text
    rows = read_csv(tmp_path / "e1" / "failures.csv")
    assert [(Path(r["image"]).name, r["problem"]) for r in rows] == [("x2.png", "missing_mask")]
    assert read_csv(tmp_path / "e1" / "metrics.csv")[0]["image"] == "x1.png"  # the good image is scored
    assert main([*args, "--out", str(tmp_path / "e2"), "--allow-failures"]) == 0
    assert len(read_csv(tmp_path / "e2" / "failures.csv")) == 1


def test_finetune_evaluate_best_records_a_bad_test_image(tmp_path, monkeypatch):
    from segment import finetune_state
    from segment.finetune_data import Data

    d = tmp_path / "d"
    good = write_pair(d, "good", labels())
    bad_img, bad_mask = write_pair(d, "bad", labels())
    bad_img.write_bytes(b"")
    meta = {"tile_size": 8, "mean": [0.5], "std": [0.25], "intensity": "dtype"}
    monkeypatch.setattr(segment.infer, "load_model", lambda path: (NearestLevel(), meta))
    cfg = SimpleNamespace(train=SimpleNamespace(tile_overlap=0.5, tta=False, batch_size=4), overlays=1)
    data = Data(CLASS_MAP, [], [], {"test": [good, (bad_img, bad_mask)]})
    result = finetune_state.evaluate_best(tmp_path / "run", data, cfg, "cpu")  # must not raise after training
    assert result["test"]["n_images"] == 1
    rows = read_csv(tmp_path / "run" / "eval" / "failures.csv")
    assert [(r["problem"], Path(r["file"]).name) for r in rows] == [("unreadable_image", "bad.png")]


def test_finetune_keeps_a_test_set_whose_image_lacks_a_mask(tmp_path):
    """One image without a mask must not drop the whole test set: it is scored as a failure."""
    from segment.finetune_data import load_data

    d = tmp_path / "d"
    for split in ("train", "val", "test"):
        write_pair(d, "a", labels(), split)
    write_pair(d, "b", labels(), "test")
    (d / "test_annot" / "b.png").unlink()
    data = SimpleNamespace(class_map=CLASS_MAP, root=str(d), layout="auto", train_split="train", val_split="val",
                           train_names=[], n_train=None, test_splits=["test", "nothing"], extra_tests={})
    loaded = load_data(SimpleNamespace(data=data, train=SimpleNamespace(seed=0)))
    assert list(loaded.test_sets) == ["test"]  # the missing split is skipped, the test set kept
    assert [(i.name, m is None) for i, m in loaded.test_sets["test"]] == [("a.png", False), ("b.png", True)]


# --- item 9: stray colours in colour-overlay masks ------------------------------------------------


def overlay_mask(shape=(100, 100)) -> np.ndarray:
    """RGBA Super-style overlay: gray image, a blue block (secondary), a red block (tertiary)."""
    gray = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    rgba = np.dstack([gray, gray, gray, np.full(shape, 255, np.uint8)])
    rgba[10:40, 10:40, :3] = (0, 0, 255)
    rgba[60:70, 60:70, :3] = (255, 0, 0)
    return rgba


def test_stray_overlay_colours_warn_below_and_fail_above_a_share(tmp_path, caplog):
    rgba = overlay_mask()
    rgba[0, :5, :3] = (0, 0, 250)  # 5 of 10000 px (0.05 %): a few lossy near-blue pixels
    path = write_tiff(tmp_path / "few_mask.tif", rgba)
    with caplog.at_level(logging.WARNING, logger="segment.class_maps"):
        out = CLASS_MAPS["super"].encode(read_raw(path), path)
    assert (out[0, :5] == 0).all() and (out[10:40, 10:40] == 1).all()  # read as matrix, reported
    assert "few_mask.tif" in caplog.text and "(0, 0, 250) x 5 px" in caplog.text

    caplog.clear()
    clean = write_tiff(tmp_path / "clean_mask.tif", overlay_mask())
    with caplog.at_level(logging.WARNING, logger="segment.class_maps"):
        CLASS_MAPS["super"].encode(read_raw(clean), clean)
    assert caplog.text == ""  # gray, blue and red only: nothing to report

    rgba[80:85, :, :3] = (255, 255, 0)  # a yellow annotation: 500 px
    path = write_tiff(tmp_path / "yellow_mask.tif", rgba)
    with pytest.raises(MaskError) as err:
        CLASS_MAPS["super"].encode(read_raw(path), path)
    message = str(err.value)
    assert "yellow_mask.tif" in message and "(255, 255, 0) x 500 px" in message
    assert "(0, 0, 250) x 5 px" in message and "505 of 10000 pixels" in message


def test_real_super_masks_hold_no_stray_colours(shared_data, caplog):
    from segment.class_maps import UNKNOWN_COLOUR_MAX_SHARE  # noqa: F401 - the named threshold exists

    masks = sorted((shared_data / "nasa").glob("Super*/*_annot/*_mask.tif"))
    assert len(masks) >= 60
    with caplog.at_level(logging.WARNING, logger="segment.class_maps"):
        for mask in masks:
            CLASS_MAPS["super"].encode(read_raw(mask), mask)
    assert caplog.text == ""  # NASA's overlays are exactly gray, pure blue or pure red


# --- item 10: NaN/Inf and constant images ---------------------------------------------------------


def float_image(value: float | None = None) -> np.ndarray:
    image = np.linspace(0, 1, 20 * 24, dtype=np.float32).reshape(20, 24)
    if value is not None:
        image[3, 4] = value
    return image


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_image_is_named_in_predict_and_evaluate(tmp_path, value):
    path = write_tiff(tmp_path / "bad pixels.tif", float_image(value))
    for intensity in ("dtype", "percentile"):
        p = Predictor(NearestLevel(), tile_size=8, intensity=intensity)
        with pytest.raises(ImageReadError, match=r"bad pixels\.tif.*not finite") as err, open_source(path) as src:
            predict_stream(p, src)
        assert "model" not in str(err.value)
    mask = write_tiff(tmp_path / "bad pixels_mask.tif", np.zeros((20, 24), np.uint8))
    res = evaluate_sets(predictor(), {"s": [(path, mask)]}, CLASS_MAP, tmp_path / "eval", overlays=False,
                        progress=False)
    (row,) = read_csv(tmp_path / "eval" / "failures.csv")
    assert row["problem"] == "bad_image" and "bad pixels.tif" in row["message"] and "model" not in row["message"]
    assert res["s"]["n_images"] == 0


def test_non_finite_image_is_named_in_training_data_shards_and_loader(tmp_path):
    from pretrain.samples import _Prepare

    bad = write_tiff(tmp_path / "nan.tif", float_image(float("nan")))
    mask = write_tiff(tmp_path / "nan_mask.tif", np.zeros((20, 24), np.uint8))
    with pytest.raises(ImageReadError, match=r"nan\.tif.*1 NaN"):
        SegmentationDataset([(bad, mask)], "ebc")  # at load time, before any training step
    good = write_tiff(tmp_path / "ok.tif", float_image())
    manifest = sh.write_shards([bad, good], tmp_path / "shards", workers=0, progress=False)
    assert manifest.total_samples == 1
    (skip,) = manifest.all_skipped
    assert skip["path"] == str(bad) and "NaN" in skip["reason"]
    # a shard written elsewhere: the loader names the sample's source file
    sample = {"__key__": "k", "__url__": "x.tar", "tif": float_image(float("inf")),
              "json": {"source": "/data/inf.tif"}}
    with pytest.raises(ImageReadError, match=r"/data/inf\.tif.*1 Inf"):
        _Prepare(False, (0.5, 99.5), None)(sample)


def test_constant_image_is_named_in_predict_evaluate_and_training(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((16, 16), 40, np.uint8)).save(blank)
    with pytest.raises(ImageReadError, match=r"blank\.png: constant image") as err:
        predict_stream(predictor(), open_source(blank))
    assert "model" not in str(err.value)
    mask = tmp_path / "blank_mask.png"
    Image.fromarray(labels()).save(mask)
    evaluate_sets(predictor(), {"s": [(blank, mask)]}, CLASS_MAP, tmp_path / "eval", overlays=False, progress=False)
    (row,) = read_csv(tmp_path / "eval" / "failures.csv")
    assert row["problem"] == "bad_image" and "blank.png: constant image" in row["message"]
    with pytest.raises(ImageReadError, match=r"blank\.png: constant image"):
        SegmentationDataset([(blank, mask)], CLASS_MAP)


# --- item 11: duplicate images in the shard writer ------------------------------------------------


@pytest.fixture()
def with_copies(tmp_path: Path) -> Path:
    """a.png; b.tif: a's pixels in another container (other bytes); c.png: other pixels; d.png: a again."""
    rng = np.random.default_rng(1)
    root = tmp_path / "raw"
    root.mkdir()
    a = rng.integers(0, 256, (12, 14), dtype=np.uint8)
    Image.fromarray(a).save(root / "a.png")
    write_tiff(root / "b.tif", a, pixel_size_nm=3.0)
    Image.fromarray(rng.integers(0, 256, (12, 14), dtype=np.uint8)).save(root / "c.png")
    Image.fromarray(a).save(root / "d.png")
    return root


def _sources(out: Path) -> list[str]:
    ds = wds.WebDataset(list_shards(out), shardshuffle=False, empty_check=False).decode(_decode_field)
    return sorted(Path(s["json"]["source"]).name for s in ds)


def test_shard_writer_reports_duplicates_and_keeps_them_by_default(with_copies, tmp_path):
    out = tmp_path / "shards"
    manifest = sh.write_shards([with_copies], out, maxcount=10, workers=0, progress=False)
    assert _sources(out) == ["a.png", "b.tif", "c.png", "d.png"]
    a = str(with_copies / "a.png")
    assert manifest.duplicates == [{"path": str(with_copies / "b.tif"), "duplicate_of": a, "dropped": False},
                                   {"path": str(with_copies / "d.png"), "duplicate_of": a, "dropped": False}]
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk["totals"]["duplicates"] == 2 and on_disk["totals"]["dropped"] == 0
    assert len(on_disk["duplicates"]) == 2


def test_shard_writer_dedupe_drops_copies_and_resumes(with_copies, tmp_path):
    out = tmp_path / "shards"
    first = sh.write_shards([with_copies], out, maxcount=1, workers=0, progress=False, dedupe=True)
    assert _sources(out) == ["a.png", "c.png"] and first.total_samples == 2
    assert [d["dropped"] for d in first.duplicates] == [True, True]
    stats = {e.name: (out / e.name).stat() for e in first.shards}

    again = sh.write_shards([with_copies], out, maxcount=1, workers=0, progress=False, dedupe=True)
    for entry in again.shards:  # complete and already deduplicated: nothing rewritten
        now, before = (out / entry.name).stat(), stats[entry.name]
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    damaged = out / "shard-000002.tar"
    data = bytearray(damaged.read_bytes())
    data[600] ^= 0xFF
    damaged.write_bytes(bytes(data))
    repaired = sh.write_shards([with_copies], out, maxcount=1, workers=0, progress=False, dedupe=True)
    assert [e.sha256 for e in repaired.shards] == [e.sha256 for e in first.shards]  # caught, rewritten
    assert _sources(out) == ["a.png", "c.png"]

    kept = sh.write_shards([with_copies], out, maxcount=1, workers=0, progress=False)  # without --dedupe
    assert _sources(out) == ["a.png", "b.tif", "c.png", "d.png"] and kept.total_samples == 4
    manifest = sh.main([str(with_copies), "--out", str(tmp_path / "cli"), "--workers", "0", "--quiet", "--dedupe"])
    assert manifest.total_samples == 2 and manifest.options["dedupe"] is True
