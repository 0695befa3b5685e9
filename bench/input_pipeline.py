"""Pretraining input pipeline throughput: our WebDataset stream (`pretrain.data.make_loader`: tar
shards -> decode (16 bits kept) -> percentile normalisation -> two augmented views) against a
torchvision `ImageFolder` + `DataLoader` over the same image files with the same view transform.

    nice -n 5 .venv/bin/python bench/input_pipeline.py [--n 512] [--n16 64] [--workers 0 1 2] [--repeats 3] \
        [--batches 6] [--warmup 4] [--threads 1] [--corpus /tmp/ip_corpus] [--out bench/results/input_pipeline.json]

Images (generated into a temporary folder, removed at the end unless `--corpus DIR` keeps them for
the next run): `--n` synthetic 8-bit 512x512 micrographs (`pretrain.synthetic.write_unlabeled`,
half superalloy, half coating, deflate TIFF), `--n16` 16-bit deflate TIFFs (synthetic, full 16-bit
range), and, when /work/shared/data is present (`--no-real` leaves them out), symbolic links to the
23 distinct NASA Super images (512x512 RGB-with-equal-channels TIFF, 6 of them 16-bit) and the 231
melt-pool PNG tiles. One class folder per source, so `ImageFolder` reads the folder as is.

Ours: `write_shards(folder, maxcount=64)` once (not timed; `bench/shard_writer.py` times it), then
`make_loader(shards, batch_size=32, views=TwoViews(...), num_workers=W, shuffle_buffer=1000,
max_side=1024)` as `pretrain.main` builds it (shards recipe). Peer: `ImageFolder(folder,
loader=read_micrograph(path).image, transform=TwoViews(...))` in `DataLoader(batch_size=32,
sampler=RandomSampler(num_samples=warm-up + timed images), drop_last=True, num_workers=W)`: both
decode with our readers (the peer needs a loader that keeps 16-bit TIFF; PIL's default would not;
it also collapses the NASA files' equal RGB channels on every read, which the shards did once) and
run the same `TwoViews` object:
224 px, scale (0.2, 1.0), 1 channel, mean 0.5 / std 0.25 (the config defaults used by
`pretrain.train.build_views` for SimCLR/MoCo/BYOL; `--views multicrop` gives DINO's 2x224 + 6x96).

Since issue 16 the training loop splits the views (`data.device_augment=true`, the default): the
workers cut the crops (`photometric=False`) and `pretrain.device_augment.PhotometricAugment` applies
jitter, gamma, blur, noise and normalisation to whole batches on the training device. Here there is
no GPU, so ours applies it to every batch in the main process on the CPU, inside the timing (a GPU
would take that work off the CPU entirely); the peer keeps the whole `TwoViews` per image in its
workers, as a torchvision user would. `--no-device-augment` measures the old all-in-workers way.

Each measurement builds a fresh loader, drops `--warmup` batches (worker start, our 4 x 32-sample
cross-worker mix buffer filling), then times `--batches` batches of 32; images/s = 32 x batches /
wall (keep both multiples of the worker count: workers deliver batches in step). Ours and the peer
alternate within each repeat (order swapped every repeat); the table gives the median of `--repeats`.

`--threads` (default 1) sets torch's intra-op threads in the main process for both sides (DataLoader
workers always use 1). On a 2-core machine shared with other jobs, 2 OpenMP threads make every torch
op spin: TwoViews of one image took 11-13 ms at 1 thread and 45-200 ms at 2 under load 6, so
`--workers 0` measures the contention, not the pipeline. `--threads 0` keeps torch's default: it
also shows that our main process (unbatch -> cross-worker shuffle -> re-collate: one more
`torch.stack` per view and batch, done there) is the part exposed to that contention; the peer's
main process only receives batches collated in the workers.

Budget on a loaded 2-core machine: one worker count per run keeps each run under 3 minutes, e.g.

    for w in 2 1 0; do nice -n 5 .venv/bin/python bench/input_pipeline.py --workers $w --corpus /tmp/ip_corpus; done
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BATCH = 32


# --- corpus (shared with bench/shard_writer.py) -----------------------------------------------


def _write_kind(task: tuple[str, str, int, int, int]) -> int:
    """Worker: ``n`` 8-bit synthetic images of one kind into ``root/<kind>/``."""
    from pretrain.synthetic import write_unlabeled

    root, kind, n, size, seed = task
    write_unlabeled(root, n, (size, size), seed, (kind,))
    return n


def _write_16bit(task: tuple[str, str, int, int, int]) -> int:
    """Worker: ``n`` 16-bit micrographs (synthetic 8-bit pattern x 256 plus a deterministic low byte,
    i.e. the whole 16-bit range with sensor-like noise) into ``root/synthetic16/``."""
    from pretrain.io import write_tiff
    from pretrain.synthetic_materials import coating, superalloy

    root, _, n, size, seed = task
    for i in range(n):
        image_seed = int(np.random.SeedSequence([seed, 16, i]).generate_state(1)[0])
        image, _ = (superalloy if i % 2 == 0 else coating)((size, size), image_seed)
        low = np.random.default_rng(image_seed).integers(0, 256, image.shape, dtype=np.uint16)
        write_tiff(Path(root) / "synthetic16" / f"sem16_{i:05d}.tif", image.astype(np.uint16) * 256 + low)
    return n


def real_images(data: Path = DATA) -> dict[str, list[Path]]:
    """Distinct NASA Super images (by file name; the four sets share one pool) and melt-pool tiles."""
    found: dict[str, list[Path]] = {"nasa_super": [], "meltpool": []}
    seen: set[str] = set()
    for path in sorted((data / "nasa").glob("Super*/*/*.tif")):
        if path.parent.name.endswith("_annot") or path.name in seen:
            continue
        seen.add(path.name)
        found["nasa_super"].append(path)
    found["meltpool"] = sorted((data / "unlabeled" / "meltpool").glob("*/*.png"))
    return found


def build_corpus(root: Path, n: int, n16: int, size: int = 512, seed: int = 0,
                 real: bool = True) -> dict[str, Any]:
    """Write (or reuse) the mixed benchmark folder ``root/<source>/...``; returns its composition.

    Deterministic for given arguments. Real images are symbolic links (never copies) to
    /work/shared/data. Generation runs in two processes."""
    root = Path(root)
    stamp = root / ".corpus.json"
    spec = {"n": n, "n16": n16, "size": size, "seed": seed, "real": real and DATA.is_dir()}
    if stamp.is_file() and json.loads(stamp.read_text()).get("spec") == spec:
        return json.loads(stamp.read_text())
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tasks = [(str(root), "superalloy", (n + 1) // 2, size, seed), (str(root), "coating", n // 2, size, seed)]
    with mp.get_context("spawn").Pool(2) as pool:
        pending = [pool.apply_async(_write_kind, (t,)) for t in tasks if t[2] > 0]
        if n16 > 0:
            pending.append(pool.apply_async(_write_16bit, ((str(root), "", n16, size, seed),)))
        for job in pending:
            job.get()
    if spec["real"]:
        for source, paths in real_images().items():
            (root / source).mkdir()
            for path in paths:
                (root / source / path.name).symlink_to(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    counts: dict[str, int] = {}
    for path in files:
        counts[path.parent.name] = counts.get(path.parent.name, 0) + 1
    info = {"spec": spec, "counts": counts, "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}  # stat follows the links: real sizes
    stamp.write_text(json.dumps(info))
    return info


def machine_line() -> str:
    load = os.getloadavg()
    return (f"{platform.node()} {os.cpu_count()} CPU(s), load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f} (`uptime`: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()})")


# --- the two pipelines -------------------------------------------------------------------------


def read_gray(path: str) -> np.ndarray:
    """ImageFolder loader: our reader (16-bit kept, equal RGB channels collapsed), as the sharder reads."""
    from pretrain.io import read_micrograph

    return read_micrograph(path, gray=True).image


def make_views(kind: str, photometric: bool = True):
    """The recipe's views from the config defaults (as ``pretrain.train.build_views``); with
    ``photometric=False`` the crops only (the rest: ``pretrain.device_augment.PhotometricAugment``)."""
    from pretrain.config import DataConfig, EncoderConfig, ViewsConfig
    from pretrain.views import MultiCrop, TwoViews

    v, d = ViewsConfig(), DataConfig()
    common = dict(channels=EncoderConfig().in_chans, mean=d.mean, std=d.std, photometric=photometric)
    if kind == "multicrop":
        return MultiCrop(224, 96, 6, tuple(v.global_scale), tuple(v.local_scale), **common)
    return TwoViews(224, tuple(v.two_view_scale), **common)


def ours(shards: Path, views, workers: int, steps: int, seed: int):
    from pretrain.data import make_loader

    return make_loader(str(shards), batch_size=BATCH, steps_per_epoch=steps, views=views, num_workers=workers,
                       shuffle_buffer=1000, seed=seed, max_side=1024, rank=0, world_size=1)


def peer(folder: Path, views, workers: int, steps: int, seed: int):
    import torch
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), loader=read_gray, transform=views)
    # shuffle=True, as many samples as timed (whole permutations repeated if the folder is smaller)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=steps * BATCH,
                                             generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True,
                                       num_workers=workers)


def views_of(batch: Any) -> list:
    return batch.views if hasattr(batch, "views") else batch[0]


def images_per_s(loader, warmup: int, batches: int, n_views: int, augment=None) -> float:
    """Images/s of ``batches`` batches after ``warmup``; ``augment`` (ours with the photometric half
    split off) is applied to every batch in this process, inside the timing, as the training loop
    does on its device (here the CPU: the conservative case; on a GPU it leaves the CPU entirely)."""
    iterator = iter(loader)
    finish = (lambda b: augment(b.views)) if augment is not None else (lambda b: views_of(b))  # noqa: E731
    try:
        for _ in range(warmup):
            finish(next(iterator))
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
            out = finish(batch)
        wall = time.perf_counter() - t0
        batch = batch._replace(views=out) if augment is not None else batch
        views = views_of(batch)
        assert len(views) == n_views and views[0].shape[0] == BATCH and views[0].shape[-1] == 224, \
            [tuple(v.shape) for v in views]
    finally:
        del iterator
        gc.collect()
    return BATCH * batches / wall


# --- main --------------------------------------------------------------------------------------


def report(header: str, table: str, args: argparse.Namespace, **results: object) -> None:
    """Print the header and the table; with ``--out``, also write them, ``results`` and the arguments as JSON."""
    print(f"\n{header}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header, "table": table, **results,
                                        "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


def add_corpus_args(parser: argparse.ArgumentParser, n: int, n16: int) -> None:
    """The options of :func:`build_corpus`, for this script and its siblings (``--corpus`` is each one's own)."""
    parser.add_argument("--n", type=int, default=n, help="synthetic 8-bit micrographs (half per material)")
    parser.add_argument("--n16", type=int, default=n16, help="synthetic 16-bit TIFFs")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--no-real", action="store_true", help="leave out the real NASA/melt-pool images")
    parser.add_argument("--seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_args(parser, n=512, n16=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6, help="timed batches of 32 per measurement")
    parser.add_argument("--warmup", type=int, default=4,
                        help="untimed batches first (>= 4: our 4 x 32 cross-worker mix buffer fills in the first 4)")
    parser.add_argument("--views", choices=["two", "multicrop"], default="two")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the main process, both sides (0: torch's default)")
    parser.add_argument("--no-device-augment", dest="device_augment", action="store_false",
                        help="ours applies every augmentation per image in the workers (data.device_augment=false)")
    parser.add_argument("--passthrough", action="store_true", help="write our shards with --passthrough")
    parser.add_argument("--cpu-side-only", action="store_true",
                        help="ours does not run the photometric half at all: the CPU's share of a GPU run (the "
                             "views then differ from the peer's; a bound, not the comparison)")
    parser.add_argument("--corpus", type=Path, help="build/reuse the image folder and shards here (kept)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here (e.g. bench/results/)")
    args = parser.parse_args()

    import torch
    import torchvision

    from pretrain.shards import write_shards

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    tmp = None if args.corpus else Path(tempfile.mkdtemp(prefix="bench_input_"))
    base = args.corpus or tmp
    try:
        t0 = time.perf_counter()
        info = build_corpus(base / "images", args.n, args.n16, args.size, args.seed, real=not args.no_real)
        t1 = time.perf_counter()
        manifest = write_shards([base / "images"], base / "shards", maxcount=64, workers=2, progress=False,
                                passthrough=args.passthrough)
        print(f"corpus: {info['files']} files {info['counts']}, {info['bytes'] / 1e6:.1f} MB "
              f"({t1 - t0:.0f} s); shards: {manifest.total_samples} samples in {len(manifest.shards)} shards, "
              f"{manifest.total_bytes / 1e6:.1f} MB ({time.perf_counter() - t1:.0f} s)", flush=True)
        if manifest.total_samples != info["files"]:
            raise SystemExit(f"sharding skipped files: {manifest.all_skipped}")
        views = make_views(args.views)
        if args.device_augment:
            from pretrain.device_augment import PhotometricAugment

            our_views = make_views(args.views, photometric=False)
            augment = None if args.cpu_side_only else PhotometricAugment.for_views(our_views)
        else:
            our_views, augment = views, None
        n_views = 2 if args.views == "two" else 8
        steps = args.warmup + args.batches
        runs: dict[int, dict[str, list[float]]] = {w: {"ours": [], "peer": []} for w in args.workers}
        for r in range(args.repeats):
            for w in args.workers:
                order = ("ours", "peer") if r % 2 == 0 else ("peer", "ours")
                for name in order:
                    loader = (ours(base / "shards", our_views, w, steps, args.seed + r) if name == "ours"
                              else peer(base / "images", views, w, steps, args.seed + r))
                    rate = images_per_s(loader, args.warmup, args.batches, n_views,
                                        augment if name == "ours" else None)
                    del loader
                    gc.collect()
                    runs[w][name].append(rate)
                    print(f"repeat {r + 1} workers {w} {name}: {rate:.1f} img/s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    lines = ["| workers | ours img/s | ImageFolder img/s | ratio |", "|---|---|---|---|"]
    for w in args.workers:
        a, b = statistics.median(runs[w]["ours"]), statistics.median(runs[w]["peer"])
        lines.append(f"| {w} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    table = "\n".join(lines)
    split = ("ours: crops in the workers, photometric half batched in the main process (CPU), timed"
             if args.device_augment else "ours: every augmentation per image in the workers")
    if args.device_augment and args.cpu_side_only:
        split = "ours: crops in the workers, photometric half NOT run (the CPU's share when a GPU runs it)"
    header = (f"Input pipeline ({split}), {args.views} views at 224 px, batch {BATCH}, {args.batches} timed batches after "
              f"{args.warmup} warm-up, median of {args.repeats}; main-process torch threads "
              f"{torch.get_num_threads()}; corpus {info['files']} files "
              f"{info['counts']}; torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"{machine_line()}")
    report(header, table, args, runs=runs)


if __name__ == "__main__":
    main()
