"""Streaming input for pretraining: WebDataset shards -> decoded micrographs -> augmented views.

Training (:func:`make_loader`), per DESIGN 2.2::

    shards of this rank --resample--> tar samples --shuffle (encoded bytes)--> decode (16-bit kept)
    --> robust intensity normalisation --> views --> worker batches
    WebLoader(...).unbatched().shuffle(n).batched(bs, partial=False).with_epoch(steps)

Facts of webdataset 1.0.2 this module is built around (read from its source):

* Resample, then split (issue 16 item 6): every rank and worker runs the same
  ``ResampledShards(all shards, deterministic=True)`` sequence, seeded from (seed, epoch) only, and
  keeps every ``world``-th draw from position ``rank`` (``wds.split_by_node``'s rule), then every
  ``num_workers``-th of those from position ``worker`` (``wds.split_by_worker``'s). Ranks and workers
  thus take disjoint positions of one random stream over *all* shards: each sees every shard in
  proportion to the draws, whatever the shard count or sizes, and no rank is stuck with the short
  last shard. (``WebDataset(resampled=True)`` seeds from pid, time and ``os.urandom``: splitting its
  stream would not give disjoint positions.) No rank ever runs dry: the stream is infinite and the
  epoch length is fixed on the loader, so every rank yields exactly ``steps_per_epoch`` full
  batches and collectives never hang. Splitting the shard *list* first (``urls[rank::world]``, as
  before) gave ranks different data and, with few shards, idle workers.
* ``wds.warn_and_continue`` sleeps 0.5 s per error. :class:`SkipCounter` is the handler used for
  reading, decoding and mapping instead: it logs, counts and continues. Worker processes cannot
  share a counter with the caller, so every sample carries the number of failures its worker met
  since its previous sample; :attr:`Batch.skipped` is their sum (failures still riding on samples
  in a shuffle buffer when an epoch ends are not reported).
* No built-in decoder keeps 16 bits: decoding and the per-frame intensity mapping are
  :mod:`pretrain.samples` (:func:`pretrain.io.decode_image`, :func:`pretrain.samples.normalize_intensity`).

Do **not** pass the loader to ``accelerator.prepare``: with default settings only rank 0 would read
and broadcast, or (dispatch off) each rank would drop (N-1)/N of its stream. Iterate it on every
rank and move :class:`Batch` tensors to the device yourself.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import webdataset as wds
from torch import Tensor

from pretrain.samples import _decode_field, _EvalSample, _Prepare
from pretrain.shard_format import MANIFEST_NAME

__all__ = [
    "Batch",
    "SkipCounter",
    "iterate_samples",
    "list_shards",
    "make_loader",
]

logger = logging.getLogger(__name__)


# --- error handling --------------------------------------------------------------------------


class SkipCounter:
    """webdataset exception handler that logs, counts and continues (no sleep).

    One instance serves every stage of a pipeline; in a DataLoader each worker holds its own copy.
    :meth:`take` returns the failures since its last call. More than ``max_consecutive`` failures
    without a good sample in between raise, so a dataset that is entirely unreadable fails loudly
    instead of looping forever.
    """

    def __init__(self, *, log_first: int = 20, log_every: int = 1000, max_consecutive: int = 10_000) -> None:
        self.count = 0
        self.pending = 0
        self.log_first, self.log_every, self.max_consecutive = log_first, log_every, max_consecutive

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        self.pending += 1
        cause = exn.__cause__ or exn
        if self.count <= self.log_first or self.count % self.log_every == 0:
            logger.warning("skipped a corrupt or unreadable sample (%d so far in pid %d): %s: %s",
                           self.count, os.getpid(), type(cause).__name__, cause)
        if self.pending > self.max_consecutive:
            raise RuntimeError(f"{self.pending} consecutive samples failed; last error: {cause!r}") from exn
        return True

    def take(self) -> int:
        """Failures since the previous call (and resets the consecutive-failure guard)."""
        taken, self.pending = self.pending, 0
        return taken


# --- shard lists -----------------------------------------------------------------------------


def list_shards(directory: str | os.PathLike[str], *, include_empty: bool = False) -> list[str]:
    """Paths of the shards in ``directory`` as listed by its ``manifest.json`` (shards without
    samples left out unless ``include_empty``). Without a manifest: the sorted ``*.tar`` files."""
    root = Path(directory)
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        entries = json.loads(manifest.read_text())["shards"]
        names = [e["name"] for e in entries if include_empty or e.get("samples", 1) > 0]
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} shard(s) in the manifest are missing, "
                                    f"e.g. {missing[0]}; rerun `python -m pretrain.shards` to resume")
        urls = [str(root / n) for n in names]
    else:
        logger.warning("%s: no %s, using every *.tar file", root, MANIFEST_NAME)
        urls = sorted(str(p) for p in root.glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"{root}: no shards")
    return urls


def _resolve_urls(urls_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """A shard folder, a brace pattern (``shard-{000000..000009}.tar``), one path or a list."""
    if isinstance(urls_or_dir, (str, os.PathLike)):
        if Path(urls_or_dir).is_dir():
            return list_shards(urls_or_dir)
        return wds.shardlists.expand_urls(str(urls_or_dir))
    urls = [str(u) for u in urls_or_dir]
    if not urls:
        raise ValueError("no shard urls given")
    return urls


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed, else the RANK/WORLD_SIZE environment, else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = rank, world_size
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= r < w:
        raise ValueError(f"invalid rank {r} for world size {w}")
    return r, w


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


# --- pipeline stages (module-level classes so DataLoader workers can pickle them) -----------


class _SharedSeed:
    """``ResampledShards`` worker seed: the same on every rank and worker, so all of them draw one
    shared shard sequence (per epoch) which :class:`_SplitDraws` divides by position."""

    def __call__(self) -> int:
        return 0


class _SplitDraws:
    """Keep draws ``rank + world x i`` of the shared shard stream (``wds.split_by_node``), then
    every ``num_workers``-th of those from this worker's position (``wds.split_by_worker``), with
    explicit rank/world instead of torch.distributed's."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return itertools.islice(source, self.rank + self.world * worker, None, self.world * workers)


def shard_stream(urls: Sequence[str], *, seed: int, rank: int, world: int, epoch: int = 0,
                 worker: int = 0, num_workers: int = 1) -> Iterable[str]:
    """The shard urls a (rank, worker) reads in ``epoch``, in order (infinite): what
    :func:`make_loader` iterates, exposed for tests and diagnostics."""
    shards = wds.ResampledShards(list(urls), seed=seed, worker_seed=_SharedSeed(), deterministic=True)
    shards.epoch = epoch - 1
    start = rank + world * worker
    return (d["url"] for d in itertools.islice(iter(shards), start, None, world * num_workers))


class _SeededShuffle:
    """Shuffle buffer seeded per (seed, rank, worker, epoch); placed before decoding so it holds
    encoded bytes, not decoded frames."""

    def __init__(self, bufsize: int, seed: int, rank: int) -> None:
        self.bufsize, self.seed, self.rank, self.epoch = bufsize, seed, rank, -1

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        self.epoch += 1
        rng = random.Random(wds.utils.make_seed(self.seed, self.rank, _worker_id(), self.epoch))
        return wds.shuffle(self.bufsize, initial=min(100, self.bufsize), rng=rng)(source)


class _ApplyViews:
    """``(key, label, image)`` -> flat ``(key, label, skipped, view_0, ..., view_k)``."""

    def __init__(self, views: Callable[[Tensor], Sequence[Tensor]], counter: SkipCounter) -> None:
        self.views, self.counter = views, counter

    def __call__(self, sample: tuple[str, int, Tensor]) -> tuple[Any, ...]:
        key, label, image = sample
        views = self.views(image)
        if isinstance(views, Tensor):
            views = [views]
        return (key, label, self.counter.take(), *views)


def _collate(samples: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """Column-wise: tensors stacked, strings listed, numbers to an int64 tensor."""
    columns = []
    for column in zip(*samples, strict=True):
        first = column[0]
        if isinstance(first, Tensor):
            columns.append(torch.stack(column))
        elif isinstance(first, str):
            columns.append(list(column))
        else:
            columns.append(torch.tensor(column, dtype=torch.int64))
    return tuple(columns)


class _Collate:
    """:func:`_collate` for the main process; with ``pin`` tensors are stacked into pinned memory."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin

    def __call__(self, samples: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        if not self.pin:
            return _collate(samples)
        columns = []
        for column in zip(*samples, strict=True):
            if isinstance(column[0], Tensor):
                out = torch.empty((len(column), *column[0].shape), dtype=column[0].dtype, pin_memory=True)
                columns.append(torch.stack(column, out=out))
            else:
                columns.append(_collate([(c,) for c in column])[0])
        return tuple(columns)


class Batch(NamedTuple):
    """One training batch.

    ``views``: one ``B x C x H x W`` float32 tensor per view position (2 for TwoViews, 2 + n_local
    for MultiCrop); ``labels``: int64 ``B`` (``-1`` = no label); ``skipped``: corrupt or unreadable
    samples/shard tails dropped by the workers, reported with this batch; ``keys``: sample keys.
    """

    views: list[Tensor]
    labels: Tensor
    skipped: int
    keys: list[str]


def _to_batch(columns: tuple[Any, ...]) -> Batch:
    keys, labels, skipped, *views = columns
    return Batch(views=list(views), labels=labels, skipped=int(skipped.sum()), keys=keys)


# --- public entry points ---------------------------------------------------------------------


def make_loader(
    urls_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    batch_size: int,
    steps_per_epoch: int,
    views: Callable[[Tensor], Sequence[Tensor]],
    num_workers: int,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    with_labels: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    intensity: str = "percentile",
    max_side: int | None = None,
    mix_buffer: int | None = None,
    pin: bool = False,
    **loader_kwargs: Any,
) -> wds.WebLoader:
    """Infinite resampled training stream cut into epochs of exactly ``steps_per_epoch`` full
    :class:`Batch` es of ``batch_size`` on every rank (``len(loader) == steps_per_epoch``).

    ``views`` maps a float ``1 x H x W`` tensor in [0, 1] to a list of crops (:mod:`pretrain.views`).
    ``shuffle_buffer`` samples (encoded) per worker are shuffled before decoding; ``mix_buffer``
    decoded samples (default ``4 * batch_size``) are mixed across workers in the main process.
    ``rank``/``world_size`` default to torch.distributed, then the RANK/WORLD_SIZE environment.
    ``with_labels`` skips (and counts) samples without a ``label_index`` in their metadata.
    ``max_side`` randomly tiles larger frames before the views. Extra keyword arguments go to the
    DataLoader (``prefetch_factor``, ``multiprocessing_context``, ...). ``pin``: the batches the
    main process re-collates are stacked straight into page-locked memory (for non-blocking copies
    to the GPU); the workers' batches are not pinned, since they are unbatched at once.
    Do not pass the result to ``accelerator.prepare`` (see the module notes).
    """
    if batch_size < 1 or steps_per_epoch < 1:
        raise ValueError("batch_size and steps_per_epoch must be positive")
    urls = _resolve_urls(urls_or_dir)
    rank, world = _rank_world(rank, world_size)
    logger.info("rank %d/%d: resampling all %d shards, every %d-th draw; %d workers", rank, world, len(urls),
                world, num_workers)

    counter = SkipCounter()
    dataset = wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=_SharedSeed(), deterministic=True),
        _SplitDraws(rank, world),
        wds.tarfile_to_samples(handler=counter),
        _SeededShuffle(shuffle_buffer, seed, rank) if shuffle_buffer > 0 else None,
        wds.decode(_decode_field, post=[], handler=counter),
        wds.map(_Prepare(with_labels, intensity, max_side), handler=counter),
        wds.map(_ApplyViews(views, counter), handler=counter),
        wds.batched(min(batch_size, 32), collation_fn=_collate, partial=True),
    )
    if num_workers > 0:
        loader_kwargs.setdefault("persistent_workers", True)  # workers keep their epoch counters
    generator = torch.Generator().manual_seed(wds.utils.make_seed(seed, rank, 1))
    mix = mix_buffer if mix_buffer is not None else 4 * batch_size
    loader = (
        wds.WebLoader(dataset, batch_size=None, num_workers=num_workers, generator=generator, **loader_kwargs)
        .unbatched()
        .shuffle(mix, initial=min(mix, batch_size), rng=random.Random(wds.utils.make_seed(seed, rank, 2)))
        .batched(batch_size, collation_fn=_Collate(pin), partial=False)
        .map(_to_batch)
        .with_epoch(steps_per_epoch)
    )
    return loader.with_length(steps_per_epoch, silent=True)


def iterate_samples(
    urls_or_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    transform: Callable[[Tensor], Any] | None = None,
    intensity: str = "percentile",
) -> wds.WebDataset:
    """One ordered pass over every sample (evaluation, k-NN): yields ``(image, label, key)`` with
    ``image`` the normalised ``1 x H x W`` float tensor (or ``transform(image)``, e.g.
    :class:`pretrain.views.EvalView`) and ``label`` -1 when unknown.

    Not resampled, not split between ranks (every rank that iterates sees every sample); split
    between DataLoader workers when wrapped in one. Corrupt samples are logged and skipped.
    """
    counter = SkipCounter()
    return (
        wds.WebDataset(_resolve_urls(urls_or_dir), shardshuffle=False, nodesplitter=None,
                       workersplitter=wds.split_by_worker, handler=counter, empty_check=False)
        .decode(_decode_field, post=[], handler=counter)
        .map(_EvalSample(transform, intensity), handler=counter)
    )
