"""The on-disk format of a shard folder: shard and manifest names, sample keys (:func:`sanitize_key`),
size limits (:func:`parse_size`), label sources (:class:`LabelSpec`) and ``manifest.json``
(:class:`Manifest`, one :class:`ShardEntry` per shard). Written by :mod:`pretrain.shards`; read by the
loader and the pretraining run.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.outputs import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "LabelSpec",
    "MANIFEST_NAME",
    "Manifest",
    "SHARD_PATTERN",
    "ShardEntry",
    "parse_size",
    "sanitize_key",
]

SHARD_PATTERN = "shard-%06d.tar"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
"""Bumped whenever the sample encoding changes; part of every shard digest."""


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
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> Manifest:
        return cls.from_dict(json.loads((Path(out_dir) / MANIFEST_NAME).read_text()))
