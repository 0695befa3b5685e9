"""CS-UNet vs segmentation-models-pytorch Unet (same timm CNN encoder): training-step and inference
throughput at 512x512, measured back to back in one process; prints a table and the ratios.

    python bench/model_throughput.py [--pairs lite paper] [--batch 2] [--repeats 3] [--device cpu]

Peer: `smp.Unet(encoder_name="tu-<cnn>")`, smp's own encoder wrapper, so the comparison is against the
library as users get it, not our wrapper of it.

`--models A B ...` instead times registry models against the first one (e.g. `unet_lite`), taking
turns for `--rounds` rounds so that a changing machine load falls on all of them alike, each in the
memory format fine-tuning trains it in (`pretrain.throughput.channels_last`: NHWC for CNNs and for the
convolutional parts of hybrids); it prints
median seconds per training step and per inference call, and each model's ratio to the first:

    python bench/model_throughput.py --models unet_lite cs_unet_hybrid_lite cs_unet_lite \
        --size 256 --batch 4 --repeats 2 --rounds 3 [--clock cpu --threads 1]

On a machine busy with other jobs, `--clock cpu --threads 1` times this process's own CPU seconds,
which the other jobs barely disturb (wall-clock ratios there swing by several x between rounds; CPU-time
ratios still swing by ~0.2 between rounds on a shared 2-core machine, so the fastest-step ratio is
printed too).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import segmentation_models_pytorch as smp
import torch

from pretrain.throughput import channels_last
from segment.models import create_model

PAIRS = {  # name -> (our model, smp encoder, crop used to build our Swin)
    "lite": ("cs_unet_lite", "resnet18"),
    "paper": ("cs_unet", "resnet50"),
}


def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_functions(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(train_step, infer): one AdamW training step (forward, CE, backward, step) and one no-grad forward."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    @torch.inference_mode()
    def infer():
        model.eval()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()

    return train_step, infer


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Images/s for one AdamW training step and for inference (no grad)."""
    train_step, infer = step_functions(model, x, y)
    n = x.shape[0]
    return n / timed(train_step, repeats), n / timed(infer, repeats)


def compare_models(
    names: list[str], x: torch.Tensor, y: torch.Tensor, repeats: int, rounds: int, clock=time.perf_counter
) -> None:
    """Median train-step and inference seconds of registry models, in turns; ratios to `names[0]`.

    `clock`: `time.perf_counter` (wall) or `time.process_time` (this process's CPU time, which other
    processes on a busy machine barely disturb; use it with one thread, where no thread spins).
    """
    dev, size = x.device, x.shape[-1]
    models = {n: create_model(n, num_classes=3, in_chans=x.shape[1], img_size=size).to(dev) for n in names}
    nhwc = {n: channels_last(m) for n, m in models.items()}  # as segment.finetune trains them
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    fns = {n: step_functions(m, x_nhwc if nhwc[n] else x, y) for n, m in models.items()}
    for train_step, infer in fns.values():  # warm-up (allocator, first-call overheads)
        train_step()
        infer()
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for _ in range(rounds):
        for n, (train_step, infer) in fns.items():
            for fn, out in zip((train_step, infer), times[n]):
                for _ in range(repeats):
                    t0 = clock()
                    fn()
                    out.append(clock() - t0)
    base_train, base_infer = (statistics.median(t) for t in times[names[0]])
    print(f"| model | params (M) | NHWC parts | train step (s) | infer (s) | train step / {names[0]} | "
          f"infer / {names[0]} |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        tr, inf = (statistics.median(t) for t in times[n])
        params = sum(p.numel() for p in models[n].parameters()) / 1e6
        print(f"| {n} | {params:.2f} | {nhwc[n]} | {tr:.3f} | {inf:.3f} | {tr / base_train:.2f} | "
              f"{inf / base_infer:.2f} |")
    print(f"\n{rounds} rounds x {repeats} calls per model, medians; per-round train-step ratios to {names[0]}:")
    for n in names[1:]:
        per_round = [
            statistics.median(times[n][0][r * repeats:(r + 1) * repeats])
            / statistics.median(times[names[0]][0][r * repeats:(r + 1) * repeats])
            for r in range(rounds)
        ]
        print(f"  {n}: " + ", ".join(f"{v:.2f}" for v in per_round))
    # other load only ever adds time, so the fastest call is the least disturbed estimate
    base_min = min(times[names[0]][0])
    print("fastest train step (s), ratio: " + "; ".join(
        f"{n} {min(times[n][0]):.3f}, {min(times[n][0]) / base_min:.2f}" for n in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["lite", "paper"], choices=list(PAIRS))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", help="registry models timed against the first (replaces --pairs)")
    ap.add_argument("--rounds", type=int, default=3, help="with --models: turns taken by the models")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="with --models: wall time, or the process's CPU time (robust to other load; use --threads 1)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    x = torch.randn(args.batch, 1, args.size, args.size, device=dev)
    y = torch.randint(0, 3, (args.batch, args.size, args.size), device=dev)
    if args.models:
        print(f"device: {card}; input {args.batch}x1x{args.size}x{args.size}; {args.clock} clock")
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        compare_models(args.models, x, y, args.repeats, args.rounds, clock)
        return
    print(f"device: {card}; input {args.batch}x1x{args.size}x{args.size}; median of {args.repeats}")
    print("| pair | model | params (M) | train img/s | infer img/s |")
    print("|---|---|---|---|---|")
    ratios = []
    for pair in args.pairs:
        ours_name, cnn = PAIRS[pair]
        ours = create_model(ours_name, num_classes=3, in_chans=1, img_size=args.size).to(dev)
        peer = smp.Unet(encoder_name=f"tu-{cnn}", encoder_weights=None, in_channels=1, classes=3).to(dev)
        rows = {}
        for label, model in ((ours_name, ours), (f"smp.Unet(tu-{cnn})", peer)):
            tr, inf = measure(model, x, y, args.repeats)
            rows[label] = (tr, inf)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"| {pair} | {label} | {params:.1f} | {tr:.2f} | {inf:.2f} |")
        (tr_o, in_o), (tr_p, in_p) = rows.values()
        ratios.append((pair, tr_o / tr_p, in_o / in_p))
        del ours, peer
    print("\n| pair | CS-UNet / Unet train throughput | CS-UNet / Unet inference throughput |")
    print("|---|---|---|")
    for pair, rt, ri in ratios:
        print(f"| {pair} | {rt:.2f} | {ri:.2f} |")


if __name__ == "__main__":
    main()
