"""Planning the shards of a run (:func:`pretrain.shards.write_shards`): the input files
(:func:`collect_inputs`), their estimated encoded sizes (:func:`estimate_bytes`), the cut into shards
(:func:`plan_chunks`) with a digest per shard (:func:`plan_digest`), and whether a shard on disk is
already the planned one (:func:`is_complete`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tifffile
from PIL import Image

from pretrain.io import IMAGE_SUFFIXES, list_images
from pretrain.shard_format import FORMAT_VERSION, ShardEntry

__all__ = [
    "PlannedFile",
    "SAMPLE_OVERHEAD",
    "ShardTask",
    "collect_inputs",
    "estimate_bytes",
    "is_complete",
    "plan_chunks",
    "plan_digest",
]

SAMPLE_OVERHEAD = 4096  # tar headers and padding (2 x 512-1024 B) + json, per sample


@dataclass(frozen=True)
class PlannedFile:
    index: int
    path: str
    key: str
    label: str | None
    label_index: int | None


@dataclass(frozen=True)
class ShardTask:
    name: str
    out_dir: str
    items: tuple[PlannedFile, ...]
    digest: str
    drop: tuple[tuple[int, str], ...] = ()  # (index, path of the kept copy): hashed, not written
    passthrough: int = 0  # 0: decode + re-encode every file; N: copy eligible files, decode every N-th


def collect_inputs(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[tuple[Path, Path]], list[dict[str, str]]]:
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


def estimate_bytes(path: Path) -> int:
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
    return int(est * 1.002) + int(math.sqrt(max(est, 1))) + SAMPLE_OVERHEAD


def plan_chunks(sizes: Sequence[int], maxcount: int, maxsize: int) -> list[tuple[int, int]]:
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


def plan_digest(items: Sequence[PlannedFile], options: dict[str, Any]) -> str:
    payload = json.dumps([FORMAT_VERSION, options, [asdict(it) for it in items]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def is_complete(entry: ShardEntry | None, task: ShardTask, verify: bool) -> bool:
    """Whether the shard on disk is the planned one (which duplicates it leaves out is checked
    later, by ``pretrain.shards._duplicates``, once every shard's hashes are known)."""
    if entry is None or entry.digest != task.digest or entry.hashes is None:
        return False
    path = Path(task.out_dir) / task.name
    if not path.is_file() or path.stat().st_size != entry.bytes:
        return False
    return not verify or file_sha256(path) == entry.sha256
