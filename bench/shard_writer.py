"""Shard writer throughput: `pretrain.shards.write_shards` (1 and 2 worker processes) against GNU
`tar` packing the same files, in MB/s of input (bytes of the source files / wall time).

    nice -n 5 .venv/bin/python bench/shard_writer.py [--n 128] [--n16 32] [--workers 1 2] \
        [--repeats 3] [--maxcount 64] [--corpus /tmp/sw_corpus] [--out bench/results/shard_writer.json]

Input: the mixed micrograph folder of `bench/input_pipeline.py` (`--n` synthetic 8-bit 512x512
deflate TIFFs, `--n16` 16-bit ones, plus links to the 23 NASA Super TIFFs and 231 melt-pool PNGs
when /work/shared/data is present), generated into a temporary folder and removed at the end (or
kept in `--corpus DIR`). Every file is read once before timing, so both sides start from the page cache.

Ours: `write_shards([folder], out, maxcount=--maxcount, workers=W, progress=False)` into a fresh
folder: plans shards from the image headers, decodes every file (16 bits kept, equal RGB channels
collapsed), re-encodes it as a lossless gray PNG (zlib level ``pretrain.shard_write.PNG_LEVEL``) with a JSON record, sha256 of every
shard, fsync + rename, manifest. W = 1 runs in this process; W = 2 starts a 'spawn' pool (its start-up
is part of the time). Peer: `tar -c -h -f out.tar -C folder .` (links followed) plus an fsync of the
archive, so both sides end with data on disk; tar only copies bytes. The ratio ours/tar is therefore
the price of the lossless re-encode, checksums and the resumable plan, not of a slower tar writer.
`--passthrough-workers 1` (default) adds `write_shards(..., passthrough=True, check_every=--check-every)`:
gray 8/16-bit TIFF/PNG/JPEG bytes copied after a header check, every N-th file decoded and compared
with the loader's decoding, the rest (here the NASA RGB-with-equal-channels TIFFs) re-encoded.
The writers alternate (order rotated every repeat); the table gives the median of `--repeats`.

``--png-levels 6 1`` adds an encode-only table: `pretrain.shard_write.encode_image` of every corpus image (gray,
native dtype) at each zlib level, levels alternating, median of `--repeats`: MB/s of raw pixels and
encoded size. It is how the writer's level (1) was chosen.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import add_corpus_args, build_corpus, machine_line, report  # noqa: E402  (sibling script)


def run_ours(images: Path, out: Path, workers: int, maxcount: int, passthrough: bool = False,
             check_every: int = 32) -> tuple[float, int, int]:
    from pretrain.shards import write_shards

    t0 = time.perf_counter()
    manifest = write_shards([images], out, maxcount=maxcount, workers=workers, progress=False,
                            passthrough=passthrough, check_every=check_every)
    wall = time.perf_counter() - t0
    return wall, manifest.total_bytes, manifest.total_samples


def encode_levels(files: list[Path], levels: list[int], repeats: int) -> str:
    """Encode-only throughput and size of the shard PNG encoding at each zlib level (see the docstring)."""
    import numpy as np

    import pretrain.shard_write as shard_write
    from pretrain.io import read_raw

    images = []
    for f in files:
        a = np.asarray(read_raw(f))
        images.append(a if a.ndim == 2 else np.ascontiguousarray(a[..., 0]))
    raw = sum(a.nbytes for a in images)
    walls: dict[int, list[float]] = {lvl: [] for lvl in levels}
    sizes: dict[int, int] = {}
    saved = shard_write.PNG_LEVEL
    try:
        for _ in range(repeats):
            for lvl in levels:
                shard_write.PNG_LEVEL = lvl
                t0 = time.perf_counter()
                sizes[lvl] = sum(len(shard_write.encode_image(a)[1]) for a in images)
                walls[lvl].append(time.perf_counter() - t0)
    finally:
        shard_write.PNG_LEVEL = saved
    base = statistics.median(walls[levels[0]])
    lines = [f"PNG encoding only, {len(images)} images, {raw / 1e6:.1f} MB of raw pixels, median of {repeats}", "",
             f"| zlib level | s | raw MB/s | encoded MB | encoded / raw | speed vs level {levels[0]} |",
             "|---|---|---|---|---|---|"]
    for lvl in levels:
        wall = statistics.median(walls[lvl])
        lines.append(f"| {lvl} | {wall:.2f} | {raw / wall / 1e6:.1f} | {sizes[lvl] / 1e6:.1f} | {sizes[lvl] / raw:.3f} | "
                     f"{base / wall:.2f} |")
    return "\n".join(lines)


def run_tar(images: Path, out: Path) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    subprocess.run(["tar", "-c", "-h", "-f", str(out), "-C", str(images), "--exclude=./.*", "."], check=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    return wall, out.stat().st_size, -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_corpus_args(parser, n=128, n16=32)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="write_shards processes (none: leave the re-encoding writer out)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--maxcount", type=int, default=64, help="samples per shard (enough shards for the pool)")
    parser.add_argument("--corpus", type=Path, help="build/reuse the image folder here (kept)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here (e.g. bench/results/)")
    parser.add_argument("--passthrough-workers", type=int, nargs="*", default=[1],
                        help="also time write_shards --passthrough with these worker counts (none: leave it out)")
    parser.add_argument("--check-every", type=int, default=32, help="--passthrough: decode every N-th file")
    parser.add_argument("--png-levels", type=int, nargs="+", help="also time the PNG encoding alone at these zlib levels")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    images = (args.corpus or tmp) / "images"
    writers = ([("write_shards", w) for w in args.workers] + [("passthrough", w) for w in args.passthrough_workers]
               + [("tar", 0)])
    runs: dict[str, list[float]] = {f"{name}/{w}": [] for name, w in writers}
    sizes: dict[str, int] = {}
    try:
        t0 = time.perf_counter()
        info = build_corpus(images, args.n, args.n16, args.size, args.seed, real=not args.no_real)
        files = sorted(p for p in images.rglob("*") if p.is_file() and not p.name.startswith("."))
        for path in files:  # page cache warm for everyone
            path.read_bytes()
        mb = info["bytes"] / 1e6
        print(f"corpus: {info['files']} files {info['counts']}, {mb:.1f} MB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        if args.png_levels:
            levels_table = encode_levels(files, args.png_levels, args.repeats)
            print(levels_table + "\n", flush=True)
        for r in range(args.repeats):
            order = writers[r % len(writers):] + writers[:r % len(writers)]
            for name, w in order:
                out = tmp / f"out_{r}_{name}_{w}"
                if name == "tar":
                    wall, size, samples = run_tar(images, out.with_suffix(".tar"))
                else:
                    wall, size, samples = run_ours(images, out, w, args.maxcount, name == "passthrough",
                                                   args.check_every)
                    if samples != info["files"]:
                        raise SystemExit(f"write_shards wrote {samples} of {info['files']} files")
                key = f"{name}/{w}"
                runs[key].append(wall)
                sizes[key] = size
                print(f"repeat {r + 1} {name} workers {w}: {wall:.2f} s, {mb / wall:.1f} MB/s, "
                      f"output {size / 1e6:.1f} MB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
                out.with_suffix(".tar").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tar_rate = mb / statistics.median(runs["tar/0"])
    lines = ["| writer | workers | wall s | input MB/s | output MB | ours / tar |", "|---|---|---|---|---|---|"]
    for name, w in writers:
        wall = statistics.median(runs[f"{name}/{w}"])
        label = {"write_shards": "`write_shards` (PNG re-encode + sha256 + fsync)",
                 "passthrough": f"`write_shards --passthrough` (copy + header check, 1/{args.check_every} decoded, "
                                "sha256 + fsync)",
                 "tar": "`tar -c -h` + fsync"}[name]
        lines.append(f"| {label} | {w if name != 'tar' else '-'} | {wall:.2f} | {mb / wall:.1f} | "
                     f"{sizes[f'{name}/{w}'] / 1e6:.1f} | {mb / wall / tar_rate:.3f} |")
    table = "\n".join(lines)
    header = (f"Shard writing, {info['files']} files {info['counts']}, {mb:.1f} MB input, maxcount "
              f"{args.maxcount}, median of {args.repeats}; {machine_line()}")
    report(header, table, args, runs=runs, sizes=sizes)


if __name__ == "__main__":
    main()
