"""pretrain.shards: folders -> WebDataset shards + manifest, on tiny files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pretrain import shards as sh
from pretrain.data import list_shards
from pretrain.io import write_tiff
from pretrain.samples import _decode_field
from pretrain.shard_format import MANIFEST_NAME, LabelSpec, parse_size, sanitize_key
from pretrain.shard_plan import plan_chunks


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """alloyA: 16-bit TIFF with pixel size and awkward name, 8-bit PNG; alloyB: dotted name,
    a corrupt TIFF and an empty PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "raw"
    images = {
        "alloyA/img 1.5nm#a.tif": rng.integers(0, 65536, (20, 24), dtype=np.uint16),
        "alloyA/b.png": rng.integers(0, 256, (16, 18), dtype=np.uint8),
        "alloyB/c.d.png": rng.integers(0, 256, (12, 10), dtype=np.uint8),
    }
    for rel, image in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".tif":
            write_tiff(path, image, pixel_size_nm=2.5)
        else:
            Image.fromarray(image).save(path)
    (root / "alloyB" / "broken.tif").write_bytes(b"II*\x00 definitely not a tiff")
    (root / "alloyB" / "empty.png").write_bytes(b"")
    return root, images


def _read_all(out: Path) -> dict[str, dict]:
    """Every sample of every shard, decoded with the training decoder, by source path."""
    ds = wds.WebDataset(list_shards(out), shardshuffle=False, empty_check=False).decode(_decode_field)
    return {s["json"]["source"]: s for s in ds}


def test_round_trip_keeps_pixels_metadata_labels(corpus, tmp_path):
    root, images = corpus
    out = tmp_path / "shards"
    manifest = sh.write_shards([root], out, maxcount=2, workers=0, labels="folder:1", progress=False)

    assert manifest.labels == ["alloyA", "alloyB"]
    assert manifest.total_samples == 3 and len(manifest.all_skipped) == 2
    samples = _read_all(out)
    assert len(samples) == 3
    keys = [s["__key__"] for s in samples.values()]
    assert len(set(keys)) == 3
    for key in keys:
        assert "." not in key and " " not in key and "#" not in key and "/" not in key
    for rel, image in images.items():
        sample = samples[str(root / rel)]
        decoded = sample["png"]
        assert decoded.dtype == image.dtype and np.array_equal(decoded, image)  # pixel-exact
        meta = sample["json"]
        assert (meta["height"], meta["width"]) == image.shape
        assert meta["bit_depth"] == image.dtype.itemsize * 8
        assert meta["label"] == rel.split("/")[0]
        assert manifest.labels[meta["label_index"]] == meta["label"]
    tif_meta = samples[str(root / "alloyA/img 1.5nm#a.tif")]["json"]
    assert tif_meta["pixel_size_nm"] == pytest.approx(2.5, rel=1e-6)
    assert samples[str(root / "alloyA/b.png")]["json"]["pixel_size_nm"] is None

    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk["totals"]["samples"] == 3 and on_disk["labels"] == ["alloyA", "alloyB"]
    for entry in on_disk["shards"]:
        assert hashlib.sha256((out / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]
        assert (out / entry["name"]).stat().st_size == entry["bytes"]


def test_corrupt_and_empty_files_are_listed_not_fatal(corpus, tmp_path):
    root, _ = corpus
    manifest = sh.write_shards([root], tmp_path / "out", maxcount=10, workers=0, progress=False)
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest.all_skipped}
    assert set(skipped) == {"broken.tif", "empty.png"}
    assert "empty" in skipped["empty.png"]
    assert all(reason for reason in skipped.values())
    listed = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())["skipped"]
    assert {Path(s["path"]).name for s in listed} == {"broken.tif", "empty.png"}
    assert manifest.labels is None


def test_resume_rewrites_only_missing_or_damaged_shards(corpus, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    first = sh.write_shards([root], out, maxcount=1, workers=0, progress=False)
    assert len(first.shards) == 5  # one file per shard; two of them hold only a skipped file
    stats = {e.name: (out / e.name).stat() for e in first.shards}

    (out / "shard-000001.tar").unlink()
    damaged = out / "shard-000003.tar"
    data = bytearray(damaged.read_bytes())
    data[600] ^= 0xFF  # same size, different content: caught by the checksum
    damaged.write_bytes(bytes(data))  # rewritten in place: same inode

    second = sh.write_shards([root], out, maxcount=1, workers=0, progress=False)
    for entry in second.shards:
        now, before = (out / entry.name).stat(), stats[entry.name]
        if entry.name == "shard-000003.tar":
            assert now.st_ino != before.st_ino  # replaced by a freshly written file
        elif entry.name != "shard-000001.tar":
            assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # untouched
        assert hashlib.sha256((out / entry.name).read_bytes()).hexdigest() == entry.sha256
    # deterministic encoding: rewritten shards are byte-identical to the first run
    assert [e.sha256 for e in second.shards] == [e.sha256 for e in first.shards]
    assert not list(out.glob(".shard-*"))


def test_parallel_workers_match_serial(corpus, tmp_path):
    root, _ = corpus
    serial = sh.write_shards([root], tmp_path / "a", maxcount=2, workers=0, progress=False)
    parallel = sh.write_shards([root], tmp_path / "b", maxcount=2, workers=2, progress=False)
    assert [(e.name, e.samples, e.sha256) for e in parallel.shards] == \
        [(e.name, e.samples, e.sha256) for e in serial.shards]


def test_maxsize_caps_shards(tmp_path):
    root = tmp_path / "big"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.full((64, 64), i * 40, np.uint8)).save(root / f"{i}.png")
    manifest = sh.write_shards([root], tmp_path / "out", maxcount=100, maxsize=3 * 64 * 64 + 3 * 6000,
                               workers=0, progress=False)
    assert [e.samples for e in manifest.shards] == [3, 3]
    assert all(e.bytes <= 3 * 64 * 64 + 3 * 6000 for e in manifest.shards)


def test_csv_labels_and_cli_synthetic(tmp_path):
    out = tmp_path / "syn"
    manifest = sh.main(["--synthetic", "2", "--synthetic-size", "40", "--out", str(out),
                        "--workers", "0", "--maxcount", "3", "--quiet"])
    assert manifest.labels == ["coating", "superalloy"] and manifest.total_samples == 4
    assert len(list_shards(out)) == 2

    table = tmp_path / "labels.csv"
    files = sorted((out / "synthetic").rglob("*.tif"))
    table.write_text("path,label\n" + "".join(f"{f},{'x' if i % 2 else 'y'}\n" for i, f in enumerate(files)))
    relabeled = sh.write_shards([out / "synthetic"], tmp_path / "csv", workers=0, labels=f"csv:{table}",
                                progress=False)
    assert relabeled.labels == ["x", "y"]


def test_helpers():
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")
    assert sanitize_key("a b/c.1.5nm#x") == "a_b_c_1_5nm_x"
    assert LabelSpec.parse("folder:2").level == 2
    with pytest.raises(ValueError):
        LabelSpec.parse("folder:0")
    assert plan_chunks([5, 5, 5, 20, 1], maxcount=2, maxsize=12) == [(0, 2), (2, 3), (3, 4), (4, 5)]
