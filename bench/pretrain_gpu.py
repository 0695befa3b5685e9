"""DINO on Swin-T at 224 px through the real training loop (pretrain/main.py): images/s and peak GPU
memory for fp32 DDP, bf16 DDP and bf16 DeepSpeed ZeRO-2 (optionally ZeRO-1/3), back to back on the same
machine; prints a table and the ratios to the first configuration.

    python bench/pretrain_gpu.py [--gpus 1] [--batch 64] [--steps 40] [--repeats 3]
                                 [--configs fp32 bf16 zero2_bf16] [--out runs/bench/pretrain_gpu]

Each configuration runs ``--repeats`` times as a fresh process on the synthetic corpus (written once,
256 px images, 2 global 224 px + 6 local 96 px crops per image, 8 loader workers per GPU); k-NN probes
and checkpoints are off. images/s is the median over runs of the global images/s of the logged windows
after the first (warm-up); peak memory is ``torch.cuda.max_memory_allocated`` on rank 0 (GiB). Name
the card with the numbers (the table prints it). Needs a CUDA GPU: on a CPU-only machine it refuses.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, list[str]] = {  # name -> overrides
    "fp32": ["precision=no"],
    "bf16": ["precision=bf16"],
    "zero1_bf16": ["precision=bf16", "distributed.deepspeed=zero1"],
    "zero2_bf16": ["precision=bf16", "distributed.deepspeed=zero2"],
    "zero3_bf16": ["precision=bf16", "distributed.deepspeed=zero3"],
}


def command(gpus: int, overrides: list[str]) -> list[str]:
    if gpus == 1:
        return [sys.executable, "pretrain/main.py", *overrides]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
            "pretrain/main.py", *overrides]


def read_run(run: Path) -> tuple[float, float]:
    """(median images/s over the logged windows after the first, peak memory GiB) of one run."""
    with (run / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("images_per_s")]
    if len(rows) < 2:
        raise RuntimeError(f"{run}: too few logged windows; raise --steps")
    speeds = [float(r["images_per_s"]) for r in rows[1:]]
    memory = max(float(r.get("max_memory_gb") or "nan") for r in rows)
    return statistics.median(speeds), memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="images per GPU per step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="loader workers per GPU")
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16", "zero2_bf16"], choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "pretrain_gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/pretrain_gpu.py measures GPU throughput and memory and needs a CUDA GPU; none is visible "
                 "here. On CPU, run the default `python -m pretrain.main` instead (it reports images/s).")
    if args.gpus > torch.cuda.device_count():
        sys.exit(f"--gpus {args.gpus}, but only {torch.cuda.device_count()} GPU(s) are visible")

    corpus = args.out / "corpus_run"
    common = [
        "pretrain/encoder=swin_t", "data.views.global_size=224", "data.views.local_size=96", "data.views.n_local=6",
        "method.options.out_dim=65536", "method.options.hidden_dim=2048", "method.options.bottleneck_dim=256",
        f"data.num_workers={args.workers}", f"optim.batch_size={args.batch}", "optim.epochs=1",
        f"optim.steps_per_epoch={args.steps}", "optim.warmup_epochs=0.5", "knn.every=0", "checkpoint.every=0",
        f"log.every={args.log_every}", "log.progress=false", "log.tensorboard=false",
    ]
    # The synthetic corpus once (every run then reuses its shards).
    subprocess.run([sys.executable, "pretrain/main.py", f"out={corpus}", *common, "optim.steps_per_epoch=1",
                    "log.every=1"], cwd=REPO, check=True)
    shards = corpus / "corpus" / "shards"

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, tuple[float, float]] = {}
    for name in args.configs:
        speeds, memories = [], []
        for r in range(args.repeats):
            run = args.out / f"{name}_{r}"
            shutil.rmtree(run, ignore_errors=True)
            overrides = [f"out={run}", f"data.shards={shards}", *common, *CONFIGS[name]]
            subprocess.run(command(args.gpus, overrides), cwd=REPO, env=env, check=True)
            speed, memory = read_run(run)
            speeds.append(speed)
            memories.append(memory)
            print(f"{name} run {r + 1}/{args.repeats}: {speed:.1f} images/s, peak {memory:.2f} GiB", flush=True)
        results[name] = (statistics.median(speeds), max(memories))

    card = torch.cuda.get_device_name(0)
    base = results[args.configs[0]][0]
    print(f"\nDINO, Swin-T at 224 (2 x 224 + 6 x 96 crops), {args.gpus} x {card}, batch {args.batch}/GPU, "
          f"median of {args.repeats} runs of {args.steps} steps")
    print(f"| config | images/s | vs {args.configs[0]} | peak memory GiB |")
    print("|---|---:|---:|---:|")
    for name, (speed, memory) in results.items():
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {memory:.2f} |")


if __name__ == "__main__":
    main()
