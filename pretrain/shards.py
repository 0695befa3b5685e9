"""Micrograph folders -> WebDataset tar shards + ``manifest.json``.

``python -m pretrain.shards INPUT... --out DIR [--maxcount 1000] [--maxsize 256MB] [--workers 2]
[--labels folder:LEVEL | csv:PATH] [--synthetic N] [--dedupe] [--passthrough [--check-every 32]]``

Each sample is ``<key>.png`` (8- or 16-bit gray PNG: lossless and pixel-exact, 16 bits kept; float
images are stored as ``<key>.tif``, zlib TIFF) plus ``<key>.json`` (source path, height, width,
dtype, bit depth, pixel_size_nm or null, label and label_index or null, reader warnings). Keys are
``<8-digit file index>_<sanitised relative path>``: unique, deterministic, only ``[A-Za-z0-9_-]``
(webdataset splits keys at the first dot).

Shards are planned before anything is written: the sorted file list is cut into shards of at most
``maxcount`` files whose estimated encoded size (pixels x bytes per sample from the image header,
an upper bound for PNG) stays under ``maxsize``, so shard i's contents depend only on the inputs and
options. Worker processes write whole shards (temp name, fsync, rename) with ``wds.TarWriter``.
A rerun skips every shard whose manifest entry matches the plan (digest of its files, keys, labels
and format) and whose file has the recorded size and sha256: an interrupted or partly deleted run
resumes with only the missing shards. Unreadable or empty files, and float images with NaN/Inf
pixels, are skipped and listed with their reason in the manifest; the run continues.

Pass-through (``--passthrough``): files already in a format the loader decodes to the same pixels
(single-page gray 8/16-bit TIFF, 8/16-bit gray PNG, gray JPEG) are copied byte for byte after a
header check, every ``--check-every``-th one also decoded and compared (:mod:`pretrain.passthrough`);
the rest are re-encoded. Sharding then runs at about the speed of copying the files.

Duplicates: every sample's decoded pixels are hashed (sha256 of dtype, shape and pixels, 64 bits
kept, recorded per shard). The decoded pixels, not the file bytes, because the same micrograph is
often stored twice in different containers (the instrument's TIFF and a PNG export, a copy re-saved
with other tags or compression): different bytes, one training sample. The pixels are decoded for
writing anyway, so the hash costs no extra read. Every image whose pixels equal an earlier one's
(sorted input order) is listed under ``duplicates`` in the manifest and logged. By default
duplicates are only reported (every input file stays in the shards, as the user listed them);
``--dedupe`` drops the later copies: once all hashes are known, the shards holding them are
rewritten without them (and a rerun without ``--dedupe`` puts them back).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import multiprocessing.pool
import os
import re
import sys
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pretrain.intensity import check_finite
from pretrain.io import IMAGE_SUFFIXES, ImageReadError, list_images, read_micrograph

__all__ = [
    "FORMAT_VERSION",
    "LabelSpec",
    "MANIFEST_NAME",
    "Manifest",
    "SHARD_PATTERN",
    "ShardEntry",
    "main",
    "parse_size",
    "pixel_hash",
    "sanitize_key",
    "write_shards",
]

logger = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
"""Bumped whenever the sample encoding changes; part of every shard digest."""
_TAR_MTIME = 0  # fixed member mtime: identical inputs give byte-identical shards
_PNG_LEVEL = 1  # zlib 1 vs 6: 2.0x faster encoding, 9.5 % more bytes (bench/shard_writer.py --png-levels 6 1)
_SAMPLE_OVERHEAD = 4096  # tar headers and padding (2 x 512-1024 B) + json, per sample
_SAVE_INTERVAL_S = 5.0


# --- keys, sizes, labels ---------------------------------------------------------------------


def sanitize_key(text: str, max_len: int = 60) -> str:
    """``text`` reduced to ``[A-Za-z0-9_-]`` (no dots, slashes, spaces, '#'), at most ``max_len``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:max_len] or "x"


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"256MB"`` -> 256_000_000 (k/M/G/T are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 1GiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


@dataclass(frozen=True)
class LabelSpec:
    """Where sample labels (material classes) come from.

    ``folder:LEVEL``: the LEVEL-th folder below the input root (``folder:1`` = first level).
    ``csv:PATH``: rows ``path,label`` (optional header); paths absolute, relative to the CSV's
    folder, or relative to the input root.
    """

    kind: str
    level: int = 1
    csv_path: Path | None = None

    @classmethod
    def parse(cls, spec: str | LabelSpec) -> LabelSpec:
        if isinstance(spec, LabelSpec):
            return spec
        kind, _, arg = spec.partition(":")
        if kind == "folder" and arg.isdigit() and int(arg) >= 1:
            return cls("folder", level=int(arg))
        if kind == "csv" and arg:
            return cls("csv", csv_path=Path(arg))
        raise ValueError(f"labels must be 'folder:LEVEL' (LEVEL >= 1) or 'csv:PATH', got {spec!r}")

    def __str__(self) -> str:
        return f"folder:{self.level}" if self.kind == "folder" else f"csv:{self.csv_path}"

    def resolver(self) -> Callable[[Path, Path], str | None]:
        """``(file, input_root) -> label or None``."""
        if self.kind == "folder":
            def by_folder(path: Path, root: Path) -> str | None:
                parts = path.relative_to(root).parts[:-1]
                return parts[self.level - 1] if len(parts) >= self.level else None
            return by_folder
        assert self.csv_path is not None
        by_path, by_text = self._read_csv(self.csv_path)

        def by_csv(path: Path, root: Path) -> str | None:
            return by_path.get(path.resolve()) or by_text.get(path.relative_to(root).as_posix())
        return by_csv

    @staticmethod
    def _read_csv(path: Path) -> tuple[dict[Path, str], dict[str, str]]:
        by_path: dict[Path, str] = {}
        by_text: dict[str, str] = {}
        with path.open(newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2 or not row[1].strip():
                    raise ValueError(f"{path}:{i + 1}: expected 'path,label', got {row}")
                file, label = row[0].strip(), row[1].strip()
                if i == 0 and (file.lower(), label.lower()) == ("path", "label"):
                    continue
                p = Path(file)
                by_path[(p if p.is_absolute() else path.parent / p).resolve()] = label
                by_text[p.as_posix()] = label
        return by_path, by_text


# --- manifest --------------------------------------------------------------------------------


@dataclass
class ShardEntry:
    """One shard: ``files`` planned from global index ``first``, ``samples`` written.

    ``hashes``: per planned file, the 64-bit pixel hash (hex) or None when it was skipped (None
    for the whole list in manifests written before hashing: such shards are rewritten).
    ``dropped``: duplicates left out by ``dedupe`` (``path``, ``duplicate_of``).
    """

    name: str
    first: int
    files: int
    samples: int
    bytes: int
    sha256: str
    digest: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    hashes: list[str | None] | None = None
    dropped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Manifest:
    """Contents of ``manifest.json``: shards in order, skipped files, label vocabulary."""

    shards: list[ShardEntry]
    labels: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Files skipped while planning (not in any shard); per-shard skips are in the entries."""
    created: str = ""
    version: int = FORMAT_VERSION
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    """Files whose pixels equal an earlier file's: ``path``, ``duplicate_of``, ``dropped``."""

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def all_skipped(self) -> list[dict[str, str]]:
        """Every skipped file with its reason."""
        return self.skipped + [s for entry in self.shards for s in entry.skipped]

    def urls(self, root: str | os.PathLike[str]) -> list[str]:
        """Paths of the non-empty shards under ``root``."""
        return [str(Path(root) / s.name) for s in self.shards if s.samples > 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "micrograph-webdataset", "version": self.version, "created": self.created,
            "options": self.options, "labels": self.labels,
            "totals": {"shards": len(self.shards), "samples": self.total_samples, "bytes": self.total_bytes,
                       "files": sum(s.files for s in self.shards) + len(self.skipped),
                       "skipped": len(self.all_skipped), "duplicates": len(self.duplicates),
                       "dropped": sum(bool(d.get("dropped")) for d in self.duplicates)},
            "shards": [asdict(s) for s in self.shards],
            "skipped": self.all_skipped,
            "planning_skipped": self.skipped,
            "duplicates": self.duplicates,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(shards=[ShardEntry(**s) for s in data["shards"]], labels=data.get("labels"),
                   options=data.get("options", {}), skipped=data.get("planning_skipped", []),
                   created=data.get("created", ""), version=data.get("version", FORMAT_VERSION),
                   duplicates=data.get("duplicates", []))

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``out_dir/manifest.json`` atomically."""
        path = Path(out_dir) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> Manifest:
        return cls.from_dict(json.loads((Path(out_dir) / MANIFEST_NAME).read_text()))


# --- planning --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    index: int
    path: str
    key: str
    label: str | None
    label_index: int | None


@dataclass(frozen=True)
class _ShardTask:
    name: str
    out_dir: str
    items: tuple[_Item, ...]
    digest: str
    drop: tuple[tuple[int, str], ...] = ()  # (index, path of the kept copy): hashed, not written
    passthrough: int = 0  # 0: decode + re-encode every file; N: copy eligible files, decode every N-th


def _collect(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[tuple[Path, Path]], list[dict[str, str]]]:
    """``(file, input_root)`` pairs in input order (folders recursively, sorted), duplicates
    dropped; files with unsupported suffixes listed as skipped."""
    pairs: list[tuple[Path, Path]] = []
    skipped: list[dict[str, str]] = []
    seen: set[Path] = set()
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = [(p, path) for p in list_images(path, recursive=True)]
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append({"path": str(path), "reason": f"unsupported file type {path.suffix!r}"})
                continue
            found = [(path, path.parent)]
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        for file, root in found:
            resolved = file.resolve()
            if resolved not in seen:
                seen.add(resolved)
                pairs.append((file, root))
    return pairs, skipped


def _estimate_bytes(path: Path) -> int:
    """Upper bound of the encoded sample size: gray pixels x bytes per sample from the header
    (Pillow, then tifffile), else the file size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(path)
        with img:
            w, h = img.size
            per = 1 if img.mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr") else (
                2 if img.mode.startswith("I;16") or img.mode.startswith("RGB;16") else 4)
            est = w * h * per
    except Exception:  # noqa: BLE001 - fall through to tifffile / file size
        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                est = int(page.shape[0]) * int(page.shape[1]) * page.dtype.itemsize
        except Exception:  # noqa: BLE001 - unreadable files fail properly when the shard is written
            est = path.stat().st_size if path.exists() else 0
    # PNG worst case: a filter byte per row and deflate block headers (5 B per 64 KiB).
    return int(est * 1.002) + int(math.sqrt(max(est, 1))) + _SAMPLE_OVERHEAD


def _chunks(sizes: Sequence[int], maxcount: int, maxsize: int) -> list[tuple[int, int]]:
    """Greedy ``[start, stop)`` ranges of at most ``maxcount`` items and ``maxsize`` estimated bytes
    (an item larger than ``maxsize`` gets a shard of its own)."""
    ranges: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= maxcount or total + size > maxsize):
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _digest(items: Sequence[_Item], options: dict[str, Any]) -> str:
    payload = json.dumps([FORMAT_VERSION, options, [asdict(it) for it in items]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# --- writing (runs in worker processes) ------------------------------------------------------


class _HashingWriter:
    """Write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


class _TarStream:
    """What ``wds.TarWriter(fileobj, encoder=False, mtime=_TAR_MTIME)`` writes (PAX members, mode 0444,
    owner bigdata, stream padding to whole 10 KiB records), byte for byte, with three writes per member
    instead of tarfile's 10 KiB-chunked copy (a third of the time of pass-through sharding went there)."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.size = raw, 0

    def __enter__(self) -> _TarStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _put(self, data: bytes) -> None:
        if data:
            self.raw.write(data)
            self.size += len(data)

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for field in sorted(sample):  # members in sorted order, as webdataset writes them
            if field.startswith("__"):
                continue
            value = sample[field]
            data = value if isinstance(value, bytes) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), _TAR_MTIME, 0o444, "bigdata", "bigdata"
            self._put(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
            self._put(data)
            self._put(b"\0" * (-len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._put(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._put(b"\0" * (-self.size % tarfile.RECORDSIZE))


def _encode(image: np.ndarray, fast: bool = False) -> tuple[str, bytes]:
    """Lossless gray encoding: PNG for uint8/uint16 (16 bits kept), zlib TIFF for anything else.
    ``fast`` (pass-through runs): uint8/uint16 as zstd (level 1) TIFF with horizontal differencing,
    about 25x faster to write than PNG level 1 and a little smaller (measured on the NASA Super
    TIFFs: 4.8 vs 129 ms per 512 x 512 image under load, 0.74 vs 0.78 of the raw size)."""
    buf = io.BytesIO()
    if fast and image.dtype in (np.uint8, np.uint16):
        tifffile.imwrite(buf, image, photometric="minisblack", compression="zstd", compressionargs={"level": 1},
                         predictor=True)
        return "tif", buf.getvalue()
    if image.dtype in (np.uint8, np.uint16):
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=_PNG_LEVEL)
        return "png", buf.getvalue()
    tifffile.imwrite(buf, image, photometric="minisblack", compression="zlib")
    return "tif", buf.getvalue()


def pixel_hash(image: np.ndarray) -> str:
    """64-bit content hash (16 hex digits) of decoded pixels: sha256 of dtype, shape and values."""
    image = np.ascontiguousarray(image)
    sha = hashlib.sha256(f"{image.dtype.name}{image.shape}".encode())
    sha.update(memoryview(image).cast("B"))
    return sha.hexdigest()[:16]


def _passthrough_sample(item: _Item, check_every: int) -> tuple[dict[str, Any], str] | None:
    """The sample with the file's own bytes (:mod:`pretrain.passthrough`), or None when the file
    must be decoded and re-encoded."""
    from pretrain.passthrough import probe, read_checked

    info = probe(item.path)
    if info is None:
        return None
    data, content = read_checked(item.path, info, decode=item.index % check_every == 0)
    meta = {
        "source": item.path, "key": item.key, "index": item.index, "height": info.height, "width": info.width,
        "dtype": info.dtype, "bit_depth": info.bit_depth, "pixel_size_nm": info.pixel_size_nm, "format": info.ext,
        "label": item.label, "label_index": item.label_index, "passthrough": True,
    }
    return {"__key__": item.key, info.ext: data, "json": json.dumps(meta).encode()}, content


def _sample(item: _Item, passthrough: int = 0) -> tuple[dict[str, Any], str]:
    """The sample's tar members and its :func:`pixel_hash` (pass-through: see :func:`_passthrough_sample`)."""
    if passthrough:
        copied = _passthrough_sample(item, passthrough)
        if copied is not None:
            return copied
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mg = read_micrograph(item.path, gray=True)
    image = mg.image
    if image.size == 0:
        raise ImageReadError(item.path, "empty image")
    if image.ndim != 2:
        raise ImageReadError(item.path, f"not a gray image after reading (shape {image.shape})")
    check_finite(image, item.path)  # NaN/Inf would reach pretraining as NaN losses
    ext, data = _encode(image, fast=bool(passthrough))
    meta = {
        "source": item.path, "key": item.key, "index": item.index,
        "height": int(image.shape[0]), "width": int(image.shape[1]), "dtype": str(image.dtype),
        "bit_depth": mg.bit_depth, "pixel_size_nm": mg.pixel_size_nm, "format": ext,
        "label": item.label, "label_index": item.label_index,
    }
    if caught:
        meta["warnings"] = [str(w.message) for w in caught]
    return {"__key__": item.key, ext: data, "json": json.dumps(meta).encode()}, pixel_hash(image)


def _write_shard(task: _ShardTask) -> ShardEntry:
    """Write one shard to a temp file, fsync, rename; return its manifest entry."""
    out_dir = Path(task.out_dir)
    final = out_dir / task.name
    tmp = out_dir / f".{task.name}.tmp-{os.getpid()}"
    skipped: list[dict[str, str]] = []
    hashes: list[str | None] = []
    drop = dict(task.drop)
    dropped: list[dict[str, str]] = []
    samples = 0
    try:
        with tmp.open("wb") as raw:
            sink = _HashingWriter(raw)
            with _TarStream(sink) as writer:
                for item in task.items:
                    try:
                        sample, content = _sample(item, task.passthrough)
                    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped and listed
                        reason = exc.reason if isinstance(exc, ImageReadError) else f"{type(exc).__name__}: {exc}"
                        skipped.append({"path": item.path, "reason": reason})
                        hashes.append(None)
                        continue
                    hashes.append(content)
                    if item.index in drop:
                        dropped.append({"path": item.path, "duplicate_of": drop[item.index]})
                        continue
                    writer.write(sample)
                    samples += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardEntry(name=task.name, first=task.items[0].index, files=len(task.items), samples=samples,
                      bytes=sink.size, sha256=sink.sha.hexdigest(), digest=task.digest, skipped=skipped,
                      hashes=hashes, dropped=dropped)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _is_complete(entry: ShardEntry | None, task: _ShardTask, verify: bool) -> bool:
    """Whether the shard on disk is the planned one (which duplicates it leaves out is checked
    later, by :func:`_duplicates`, once every shard's hashes are known)."""
    if entry is None or entry.digest != task.digest or entry.hashes is None:
        return False
    path = Path(task.out_dir) / task.name
    if not path.is_file() or path.stat().st_size != entry.bytes:
        return False
    return not verify or _file_sha256(path) == entry.sha256


# --- driver ----------------------------------------------------------------------------------


def write_shards(
    files_or_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    maxcount: int = 1000,
    maxsize: int | str = "256MB",
    workers: int = 2,
    labels: str | LabelSpec | None = None,
    verify: bool = True,
    progress: bool = True,
    dedupe: bool = False,
    passthrough: bool = False,
    check_every: int = 32,
) -> Manifest:
    """Write (or complete) the shards of ``files_or_dirs`` in ``out_dir`` and return the manifest.

    ``workers`` processes write whole shards (0 or 1: in this process). Shards already complete
    (matching plan digest, size and, with ``verify``, sha256) are kept as they are. Images with the
    pixels of an earlier one are listed in ``manifest.duplicates``; ``dedupe`` leaves them out of
    the shards (those shards are rewritten once all hashes are known; see the module docstring).

    ``passthrough``: gray 8/16-bit single-page TIFF, PNG and gray JPEG files are copied into the shards
    byte for byte after a header check; every ``check_every``-th is also decoded and compared with
    what the loader will decode (:mod:`pretrain.passthrough`); other files are re-encoded as usual.
    The plan then sizes shards by file sizes (one ``stat`` per file instead of a header read).
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    maxsize = parse_size(maxsize)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tar.tmp-*"):
        stale.unlink(missing_ok=True)

    pairs, planning_skipped = _collect(files_or_dirs)
    spec = LabelSpec.parse(labels) if labels is not None else None
    names: list[str | None] = [None] * len(pairs)
    if spec is not None:
        resolve = spec.resolver()
        names = [resolve(path, root) for path, root in pairs]
    vocabulary = sorted({n for n in names if n is not None}) if spec is not None else None
    if spec is not None and None in names:
        logger.warning("%d of %d files have no label (label null in their metadata)",
                       names.count(None), len(names))
    items = [
        _Item(index=i, path=str(path), key=f"{i:08d}_{sanitize_key(path.relative_to(root).with_suffix('').as_posix())}",
              label=name, label_index=vocabulary.index(name) if vocabulary and name is not None else None)
        for i, ((path, root), name) in enumerate(zip(pairs, names, strict=True))
    ]
    if not items:
        logger.warning("no images found in %s", ", ".join(str(p) for p in files_or_dirs))
    options = {"maxcount": maxcount, "maxsize": maxsize, "labels": str(spec) if spec is not None else None,
               "dedupe": dedupe, **({"passthrough": True, "check_every": check_every} if passthrough else {})}
    mode = check_every if passthrough else 0

    previous: dict[str, ShardEntry] = {}
    if (out / MANIFEST_NAME).is_file():
        try:
            previous = {e.name: e for e in Manifest.load(out).shards}
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: unreadable manifest (%s), rewriting every shard", out / MANIFEST_NAME, exc)

    pool = _pool(workers) if workers > 1 and len(items) > 1 else None
    try:
        if passthrough:
            sizes = [Path(it.path).stat().st_size + _SAMPLE_OVERHEAD for it in items]
        elif pool:
            sizes = list(pool.imap(_estimate_bytes, (Path(it.path) for it in items), chunksize=64))
        else:
            sizes = [_estimate_bytes(Path(it.path)) for it in items]
        tasks = []
        for shard, (start, stop) in enumerate(_chunks(sizes, maxcount, maxsize)):
            chunk = tuple(items[start:stop])
            how = {"labels": vocabulary, **({"passthrough": mode} if mode else {})}
            tasks.append(_ShardTask(SHARD_PATTERN % shard, str(out), chunk, _digest(chunk, how), passthrough=mode))

        entries: dict[str, ShardEntry] = {}
        todo = []
        for task in tasks:
            if _is_complete(previous.get(task.name), task, verify):
                entries[task.name] = previous[task.name]
            else:
                todo.append(task)
        planned = {t.name for t in tasks}
        extra = sorted(p.name for p in out.glob("shard-*.tar") if p.name not in planned)
        if extra:
            logger.warning("%s: %d shard file(s) not in this plan (e.g. %s) are ignored", out, len(extra), extra[0])
        logger.info("%d files -> %d shards (%d complete, %d to write) in %s",
                    len(items), len(tasks), len(entries), len(todo), out)

        manifest = Manifest(shards=[], labels=vocabulary, options=options, skipped=planning_skipped,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

        def snapshot() -> None:
            manifest.shards = [entries[t.name] for t in tasks if t.name in entries]
            manifest.save(out)

        done_files = sum(len(t.items) for t in tasks if t.name in entries)
        bar = tqdm(total=len(items), initial=done_files, unit="img", desc="shards", disable=not progress,
                   dynamic_ncols=True)
        try:
            _run(todo, pool, entries, bar, snapshot)
            copies = _duplicates(tasks, entries)
            redo = _redo_for_drops(tasks, entries, copies if dedupe else {})
            if redo:
                logger.info("rewriting %d shard(s) %s duplicates", len(redo), "without" if dedupe else "with their")
                bar.reset(total=sum(len(t.items) for t in redo))
                bar.set_description("dedupe")
                _run(redo, pool, entries, bar, snapshot)
            manifest.duplicates = [{"path": it.path, "duplicate_of": copies[it.index], "dropped": dedupe}
                                   for t in tasks for it in t.items if it.index in copies]
        finally:
            bar.close()
            snapshot()  # keep whatever finished, so a rerun resumes
    except BaseException:
        if pool is not None:
            pool.terminate()  # finished shards are in the manifest; the next run removes temp files
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    skipped = manifest.all_skipped
    logger.info("%d samples in %d shards (%.1f MB); %d file(s) skipped, listed in %s",
                manifest.total_samples, len(manifest.shards), manifest.total_bytes / 1e6, len(skipped),
                out / MANIFEST_NAME)
    if manifest.duplicates:
        first = manifest.duplicates[0]
        logger.warning("%d image(s) repeat the pixels of an earlier one (%s), listed under 'duplicates' "
                       "in %s; e.g. %s = %s", len(manifest.duplicates),
                       "dropped" if dedupe else "kept; pass --dedupe to drop them", out / MANIFEST_NAME,
                       first["path"], first["duplicate_of"])
    return manifest


def _run(todo: Sequence[_ShardTask], pool: mp.pool.Pool | None, entries: dict[str, ShardEntry], bar: Any,
         snapshot: Callable[[], None]) -> None:
    """Write the shards of ``todo`` (in ``pool`` if any) into ``entries``, saving the manifest
    every few seconds so that an interrupted run resumes."""
    results = pool.imap_unordered(_write_shard, todo) if pool else map(_write_shard, todo)
    last_save = time.monotonic()
    for entry in results:
        entries[entry.name] = entry
        bar.update(entry.files)
        for skip in entry.skipped:
            logger.warning("skipped %s: %s", skip["path"], skip["reason"])
        if time.monotonic() - last_save > _SAVE_INTERVAL_S:
            snapshot()
            last_save = time.monotonic()


def _duplicates(tasks: Sequence[_ShardTask], entries: dict[str, ShardEntry]) -> dict[int, str]:
    """``{index: path of the first file with the same pixels}`` for every later copy, in plan
    (sorted input) order, from the hashes recorded in the shard entries."""
    first: dict[str, str] = {}
    copies: dict[int, str] = {}
    for task in tasks:
        hashes = entries[task.name].hashes or []
        for item, content in zip(task.items, hashes, strict=True):
            if content is None:
                continue
            if content in first:
                copies[item.index] = first[content]
            else:
                first[content] = item.path
    return copies


def _redo_for_drops(tasks: Sequence[_ShardTask], entries: dict[str, ShardEntry],
                    drop: dict[int, str]) -> list[_ShardTask]:
    """The tasks whose shard leaves out other files than ``drop`` says, with ``drop`` set."""
    redo = []
    for task in tasks:
        want = tuple((it.index, drop[it.index]) for it in task.items if it.index in drop)
        have = {(d["path"], d["duplicate_of"]) for d in entries[task.name].dropped}
        if have != {(task.items[index - task.items[0].index].path, of) for index, of in want}:
            redo.append(replace(task, drop=want))
    return redo


def _pool(workers: int) -> mp.pool.Pool:
    """Process pool; 'spawn' so no thread/lock state of the parent is inherited."""
    return mp.get_context("spawn").Pool(workers)


# --- command line ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Manifest:
    """``python -m pretrain.shards``."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT",
                        help="image folders (searched recursively: tif, tiff, png, jpg, jpeg) or files")
    parser.add_argument("--out", type=Path, required=True, help="shard folder (created; rerun to resume)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    parser.add_argument("--maxsize", default="256MB", help="bytes per shard at most, e.g. 256MB, 1GiB")
    parser.add_argument("--workers", type=int, default=2, help="writer processes (default 2)")
    parser.add_argument("--labels", metavar="folder:LEVEL|csv:PATH",
                        help="material labels from a folder level below each input (folder:1 = first) "
                             "or a CSV of path,label")
    parser.add_argument("--synthetic", type=int, metavar="N",
                        help="first write N synthetic micrographs per material (superalloy, coating) to "
                             "OUT/synthetic/ and include them; alone, labels default to folder:1")
    parser.add_argument("--synthetic-size", type=int, default=256, metavar="PX")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--dedupe", action="store_true",
                        help="leave out images whose pixels repeat an earlier file's (default: keep them and "
                             "only list them under 'duplicates' in the manifest)")
    parser.add_argument("--passthrough", action="store_true",
                        help="copy gray 8/16-bit TIFF/PNG/JPEG files as they are (header checked, every "
                             "--check-every-th decoded and compared) instead of re-encoding them as PNG")
    parser.add_argument("--check-every", type=int, default=32, metavar="N",
                        help="with --passthrough: decode and compare every N-th file (1 = all; default 32)")
    parser.add_argument("--no-verify", action="store_true",
                        help="trust existing shards' sizes without re-hashing them on resume")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.inputs and not args.synthetic:
        parser.error("give at least one INPUT or --synthetic N")
    try:
        maxsize = parse_size(args.maxsize)
        labels = LabelSpec.parse(args.labels) if args.labels else None
    except ValueError as exc:
        parser.error(str(exc))
    inputs = list(args.inputs)
    if args.synthetic:
        from pretrain.synthetic import write_unlabeled

        folder = args.out / "synthetic"
        write_unlabeled(folder, args.synthetic, (args.synthetic_size, args.synthetic_size), args.seed)
        inputs.insert(0, folder)
        if labels is None and not args.inputs:
            labels = LabelSpec("folder", level=1)
    manifest = write_shards(inputs, args.out, maxcount=args.maxcount, maxsize=maxsize, workers=args.workers,
                            labels=labels, verify=not args.no_verify, progress=not args.quiet,
                            dedupe=args.dedupe, passthrough=args.passthrough, check_every=args.check_every)
    n_dup = len(manifest.duplicates)
    print(f"{manifest.total_samples} samples in {len(manifest.shards)} shards, "
          f"{len(manifest.all_skipped)} file(s) skipped, {n_dup} duplicate(s) "
          f"{'dropped' if args.dedupe else 'kept'} -> {args.out / MANIFEST_NAME}")
    return manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    main()
