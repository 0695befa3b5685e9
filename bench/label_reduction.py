"""Where whole-image prediction spends its time outside the model: the class-axis reduction and the tile loop.

    OMP_NUM_THREADS=1 python bench/label_reduction.py [--size 4096] [--classes 3] [--repeats 3]

1. Labels from ``K x H x W`` float logits on the CPU: PyTorch's ``argmax(0)`` against ``max(0).indices``
   (``segment.tiling.class_labels``); both give the same labels (checked).
2. The tile loop with a 1x1-convolution model (so the model costs next to nothing): ``Predictor.predict_labels``
   against MONAI's ``sliding_window_inference`` + the same reduction, tile 512, overlap 0.5, Gaussian, batch 8.
Medians of ``--repeats`` after one warm-up, one thread (``torch.set_num_threads(1)``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segment.infer import Predictor  # noqa: E402
from segment.tiling import class_labels  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.randn(args.classes, args.size, args.size)
    assert torch.equal(class_labels(logits).long(), logits.argmax(0))
    a = median_seconds(lambda: logits.argmax(0), args.repeats)
    m = median_seconds(lambda: class_labels(logits), args.repeats)
    print(f"labels of {args.classes} x {args.size}²: argmax(0) {a:.2f} s, max(0).indices {m:.2f} s ({a / m:.1f}x)")

    model = torch.nn.Conv2d(1, args.classes, 1).eval()
    image = torch.rand(1, args.size, args.size)
    predictor = Predictor(model, tile_size=512, overlap=0.5, gaussian=True, batch_size=8)

    @torch.inference_mode()
    def monai():
        out = sliding_window_inference(image[None], (512, 512), 8, model, overlap=0.5, mode="gaussian",
                                       sigma_scale=0.125)
        class_labels(out[0])

    ours = median_seconds(lambda: predictor.predict_labels(image), args.repeats)
    peer = median_seconds(monai, args.repeats)
    print(f"tile loop, 1x1-conv model, {args.size}²: Predictor.predict_labels {ours:.2f} s, "
          f"MONAI sliding_window_inference {peer:.2f} s (ours/peer time {ours / peer:.2f})")


if __name__ == "__main__":
    main()
