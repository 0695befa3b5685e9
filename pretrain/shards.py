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

This module is the driver and the command line; the format (names, keys, labels, manifest) is
:mod:`pretrain.shard_format`, the plan :mod:`pretrain.shard_plan`, the writing of one shard
:mod:`pretrain.shard_write`.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import multiprocessing.pool
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretrain.outputs import TMP_SUFFIX
from pretrain.shard_format import (
    MANIFEST_NAME,
    SHARD_PATTERN,
    LabelSpec,
    Manifest,
    ShardEntry,
    parse_size,
    sanitize_key,
)
from pretrain.shard_plan import (
    SAMPLE_OVERHEAD,
    PlannedFile,
    ShardTask,
    collect_inputs,
    estimate_bytes,
    is_complete,
    plan_chunks,
    plan_digest,
)
from pretrain.shard_write import write_shard

__all__ = ["main", "write_shards"]

logger = logging.getLogger(__name__)

_SAVE_INTERVAL_S = 5.0


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
    for stale in out.glob(f".shard-*.tar.*{TMP_SUFFIX}"):  # left by a killed writer (pretrain.outputs.atomic_path)
        stale.unlink(missing_ok=True)

    pairs, planning_skipped = collect_inputs(files_or_dirs)
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
        PlannedFile(index=i, path=str(path), key=f"{i:08d}_{sanitize_key(path.relative_to(root).with_suffix('').as_posix())}",
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
            sizes = [Path(it.path).stat().st_size + SAMPLE_OVERHEAD for it in items]
        elif pool:
            sizes = list(pool.imap(estimate_bytes, (Path(it.path) for it in items), chunksize=64))
        else:
            sizes = [estimate_bytes(Path(it.path)) for it in items]
        tasks = []
        for shard, (start, stop) in enumerate(plan_chunks(sizes, maxcount, maxsize)):
            chunk = tuple(items[start:stop])
            how = {"labels": vocabulary, **({"passthrough": mode} if mode else {})}
            tasks.append(ShardTask(SHARD_PATTERN % shard, str(out), chunk, plan_digest(chunk, how), passthrough=mode))

        entries: dict[str, ShardEntry] = {}
        todo = []
        for task in tasks:
            if is_complete(previous.get(task.name), task, verify):
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


def _run(todo: Sequence[ShardTask], pool: mp.pool.Pool | None, entries: dict[str, ShardEntry], bar: Any,
         snapshot: Callable[[], None]) -> None:
    """Write the shards of ``todo`` (in ``pool`` if any) into ``entries``, saving the manifest
    every few seconds so that an interrupted run resumes."""
    results = pool.imap_unordered(write_shard, todo) if pool else map(write_shard, todo)
    last_save = time.monotonic()
    for entry in results:
        entries[entry.name] = entry
        bar.update(entry.files)
        for skip in entry.skipped:
            logger.warning("skipped %s: %s", skip["path"], skip["reason"])
        if time.monotonic() - last_save > _SAVE_INTERVAL_S:
            snapshot()
            last_save = time.monotonic()


def _duplicates(tasks: Sequence[ShardTask], entries: dict[str, ShardEntry]) -> dict[int, str]:
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


def _redo_for_drops(tasks: Sequence[ShardTask], entries: dict[str, ShardEntry],
                    drop: dict[int, str]) -> list[ShardTask]:
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
        from pretrain.synthetic import (
            write_unlabeled,  # scipy + scikit-image (0.5 s): only for --synthetic
        )

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
