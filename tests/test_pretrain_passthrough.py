"""pretrain.shards --passthrough: encoded gray TIFF/PNG/JPEG bytes copied into shards, checked by header
and by decoding a sample (issue 16, shard writer throughput)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import tifffile
from PIL import Image

from pretrain import shards as sh
from pretrain.data import iterate_samples
from pretrain.io import write_tiff
from pretrain.passthrough import probe
from pretrain.shard_write import TAR_MTIME, TarStream


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "in" / "a"
    root.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / "p8.png")
    Image.fromarray(rng.integers(0, 65535, (18, 22), dtype=np.uint16)).save(root / "p16.png")
    write_tiff(root / "t16.tif", rng.integers(0, 65535, (16, 20), dtype=np.uint16))
    tifffile.imwrite(root / "t8.tif", rng.integers(0, 256, (16, 20), dtype=np.uint8), compression="zlib")
    gray = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(root / "rgb_equal.png")  # collapsed: re-encoded
    tifffile.imwrite(root / "float.tif", rng.random((12, 12), dtype=np.float32))  # float: re-encoded
    (root / "p8_copy.png").write_bytes((root / "p8.png").read_bytes())
    return tmp_path / "in"


def members(shard_dir):
    out = {}
    for path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                out[m.name] = tar.extractfile(m).read()
    return out


def test_eligible_files_are_copied_byte_for_byte_and_load_like_re_encoded_ones(folder, tmp_path):
    plain = sh.write_shards([folder], tmp_path / "plain", maxcount=3, workers=0, progress=False)
    copied = sh.write_shards([folder], tmp_path / "pass", maxcount=3, workers=0, progress=False, passthrough=True,
                             check_every=2)
    assert copied.total_samples == plain.total_samples == 7 and not copied.all_skipped
    got = members(tmp_path / "pass")
    passed = {}
    for name, data in got.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            passed[meta["source"].rsplit("/", 1)[-1]] = meta.get("passthrough", False)
    assert passed == {"p8.png": True, "p16.png": True, "t16.tif": True, "t8.tif": True, "p8_copy.png": True,
                      "rgb_equal.png": False, "float.tif": False}
    assert any(n.endswith("rgb_equal.tif") for n in got)  # converted files: lossless zstd TIFF in this mode
    for name, data in got.items():
        stem, ext = name.rsplit(".", 1)
        source = next((f for f in folder.rglob("*") if f.stem == stem.split("_", 1)[1].rsplit("_", 1)[-1]), None)
        if ext in ("png", "tif") and source is not None and passed.get(source.name):
            assert data == source.read_bytes(), name
    # the loader reads the same pixels either way
    a = {k: img for img, _, k in iterate_samples(tmp_path / "plain")}
    b = {k: img for img, _, k in iterate_samples(tmp_path / "pass")}
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # a byte-identical copy is still reported as a duplicate
    assert [d["path"].rsplit("/", 1)[-1] for d in copied.duplicates] == ["p8_copy.png"]
    assert copied.options["passthrough"] is True and copied.options["check_every"] == 2


def test_probe_refuses_what_must_be_converted(folder, tmp_path):
    a = folder / "a"
    assert probe(a / "p16.png").dtype == "uint16" and probe(a / "t8.tif").ext == "tif"
    assert probe(a / "rgb_equal.png") is None and probe(a / "float.tif") is None
    tifffile.imwrite(tmp_path / "two_pages.tif", np.zeros((2, 8, 8), np.uint8))
    assert probe(tmp_path / "two_pages.tif") is None


def test_a_corrupt_file_that_is_decoded_is_skipped_and_listed(folder, tmp_path):
    data = (folder / "a" / "p8.png").read_bytes()
    (folder / "a" / "p8.png").write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    manifest = sh.write_shards([folder], tmp_path / "pass", maxcount=10, workers=0, progress=False,
                               passthrough=True, check_every=1)
    assert [s["path"].rsplit("/", 1)[-1] for s in manifest.all_skipped] == ["p8.png"]
    assert manifest.total_samples == 6


def test_tar_stream_writes_what_webdataset_writes_byte_for_byte():
    import webdataset as wds

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:08d}_k", "png": rng.integers(0, 256, 700 + 5000 * i, dtype=np.uint8).tobytes(),
                "json": b'{"i": %d}' % i} for i in range(5)]
    a, b = io.BytesIO(), io.BytesIO()
    with wds.TarWriter(a, encoder=False, mtime=TAR_MTIME) as writer:
        for s in samples:
            writer.write(s)
    with TarStream(b) as writer:
        for s in samples:
            writer.write(s)
    assert a.getvalue() == b.getvalue()
