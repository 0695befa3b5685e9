"""CS-UNet vs segmentation-models-pytorch Unet (same timm CNN encoder): training-step and inference
throughput at 512x512, measured back to back in one process; prints a table and the ratios.

    python bench/model_throughput.py [--pairs lite paper] [--batch 2] [--repeats 3] [--device cpu]

Peer: `smp.Unet(encoder_name="tu-<cnn>")`, smp's own encoder wrapper, so the comparison is against the
library as users get it, not our wrapper of it.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import segmentation_models_pytorch as smp
import torch

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


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Images/s for one AdamW training step and for inference (no grad)."""
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

    n = x.shape[0]
    return n / timed(train_step, repeats), n / timed(infer, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", nargs="+", default=["lite", "paper"], choices=list(PAIRS))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
    x = torch.randn(args.batch, 1, args.size, args.size, device=dev)
    y = torch.randint(0, 3, (args.batch, args.size, args.size), device=dev)
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
