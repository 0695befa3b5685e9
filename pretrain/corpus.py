"""The training corpus of a pretraining run: the synthetic corpus written into the run
(:func:`prepare_corpus`) or the configured shards (:func:`shard_urls`), what the run records about them
(:class:`Corpus`, :class:`ShardIndex`) and the rank's training stream (:func:`make_train_loader`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import signal
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from pretrain.config import PretrainConfig
from pretrain.data import list_shards, make_loader
from pretrain.outputs import atomic_write_text
from pretrain.shard_format import Manifest
from pretrain.shards import write_shards
from pretrain.synthetic import write_unlabeled

__all__ = [
    "COMPLETE",
    "Corpus",
    "SYNTHETIC_KINDS",
    "ShardIndex",
    "make_train_loader",
    "marker_matches",
    "prepare_corpus",
    "resolve_corpus",
    "shard_urls",
]

log = logging.getLogger(__name__)

SYNTHETIC_KINDS = ("superalloy", "coating")
COMPLETE = "COMPLETE"  # marker file of a finished corpus / k-NN holdout, recording its settings


def marker_matches(marker: Path, params: dict[str, Any]) -> bool:
    """Whether ``marker`` (a :data:`COMPLETE` file) records ``params``."""
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("params") == params
    except json.JSONDecodeError:
        return False


def prepare_corpus(cfg: PretrainConfig, out: Path, accelerator) -> Path:
    """Write the synthetic corpus into ``out/corpus`` and shard it (rank 0; the others wait).

    Skipped when ``corpus/COMPLETE`` records the same settings. Returns the shard folder.
    """
    s = cfg.data.synthetic
    root = out / "corpus"
    params = {"n_per_kind": s.n_per_kind, "size": s.size, "seed": s.seed, "shard_size": s.shard_size,
              "kinds": list(SYNTHETIC_KINDS)}
    marker = root / COMPLETE
    if accelerator.is_main_process and not marker_matches(marker, params):
        t0 = time.monotonic()
        log.info("writing the synthetic corpus (%d images per material, %d px) to %s", s.n_per_kind, s.size, root)
        images = root / "images"
        write_unlabeled(images, s.n_per_kind, (s.size, s.size), s.seed, SYNTHETIC_KINDS)
        manifest = write_shards([images], root / "shards", maxcount=s.shard_size, workers=1, labels="folder:1",
                                progress=False)
        atomic_write_text(marker, json.dumps({"params": params, "samples": manifest.total_samples,
                                              "shards": len(manifest.shards)}) + "\n")
        log.info("corpus ready: %d samples in %d shards (%.1f s)", manifest.total_samples, len(manifest.shards),
                 time.monotonic() - t0)
    accelerator.wait_for_everyone()
    return root / "shards"


def shard_urls(spec: Any) -> list[str]:
    """Shard paths from a folder (its manifest), a brace pattern, one path or a list."""
    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    elif Path(str(spec)).expanduser().is_dir():
        urls = list_shards(Path(str(spec)).expanduser())
    else:
        urls = list(wds.shardlists.expand_urls(str(spec)))
    if not urls:
        raise ValueError(f"data.shards={spec!r} names no shards")
    return urls


@dataclass
class ShardIndex:
    """Which shard a sample key came from (keys start with the global file index; pretrain.shards)."""

    names: list[str] = field(default_factory=list)
    firsts: list[int] = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder: Path | None) -> ShardIndex:
        if folder is None or not (folder / "manifest.json").is_file():
            return cls()
        entries = sorted(Manifest.load(folder).shards, key=lambda e: e.first)
        return cls([e.name for e in entries], [e.first for e in entries])

    def shard_of(self, key: str) -> str | None:
        head = key.split("_", 1)[0]
        if not self.names or not head.isdigit():
            return None
        i = bisect_right(self.firsts, int(head)) - 1
        return self.names[i] if i >= 0 else None


@dataclass
class Corpus:
    """The training shards and what the run records about them."""

    urls: list[str]
    description: str
    labels: list[str] | None = None  # the manifest's label vocabulary, when labelled
    index: ShardIndex = field(default_factory=ShardIndex)


def resolve_corpus(cfg: PretrainConfig, out: Path, accelerator) -> Corpus:
    """``data.shards``, or the synthetic corpus written into the run (collective)."""
    if cfg.data.shards is None:
        folder: Path | None = prepare_corpus(cfg, out, accelerator)
        s = cfg.data.synthetic
        description = (f"synthetic corpus: {s.n_per_kind} images per material ({', '.join(SYNTHETIC_KINDS)}), "
                       f"{s.size} px, seed {s.seed}")
    else:
        spec = cfg.data.shards
        folder = None if isinstance(spec, (list, tuple)) else Path(str(spec)).expanduser()
        folder = folder if folder is not None and folder.is_dir() else None
        description = f"shards: {spec}"
    urls = shard_urls(folder if folder is not None else cfg.data.shards)
    labels = None
    if folder is not None and (folder / "manifest.json").is_file():
        labels = Manifest.load(folder).labels
    return Corpus(urls, f"{description} ({len(urls)} shards)", labels, ShardIndex.from_folder(folder))


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_train_loader(cfg: PretrainConfig, urls: Sequence[str], views, *, start_step: int, with_labels: bool,
                      rank: int, world_size: int):
    """The rank's infinite stream, cut into epochs of ``steps_per_epoch x grad_accum`` micro-batches.

    Seeded from ``(seed, start_step)``: a resumed run draws a fresh sequence rather than replaying one.
    """
    return make_loader(
        list(urls), batch_size=cfg.optim.batch_size, steps_per_epoch=cfg.optim.steps_per_epoch * cfg.optim.grad_accum,
        views=views, num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
        seed=_seed_for(cfg.seed, start_step), with_labels=with_labels, rank=rank, world_size=world_size,
        max_side=cfg.data.max_side, intensity=cfg.data.intensity, pin=torch.cuda.is_available(),
        **({"worker_init_fn": _ignore_preemption_signals} if cfg.data.num_workers > 0 else {}),
    )


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1: SLURM signals every process of the job, and a
    worker killed by it would crash the main process before it can write its checkpoint. Workers
    still exit with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
