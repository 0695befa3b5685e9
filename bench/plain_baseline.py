"""Plain baseline: the simplest recipe that works, the peer every recipe and model decision is measured against.

    nice -n 5 python bench/plain_baseline.py ../shared/data/nasa/Super3 --minutes 15 \
        --test ../shared/data/nasa/Super4:test            # one training image, + out of distribution
    nice -n 5 python bench/plain_baseline.py ../shared/data/nasa/Super1 --minutes 15 \
        --test ../shared/data/nasa/Super4:test
    nice -n 5 python bench/plain_baseline.py ../shared/data/nasa/EBC1 --minutes 15 \
        --test ../shared/data/nasa/EBC3:test              # EBC3 test: a sample held out of training

Method: `smp.Unet("resnet18", encoder_weights=None, in_channels=1)` (random init) trained on the set's
`train` split only: every image z-scored as a whole ((x - mean) / std, float32, std floored at 1e-6),
random 256x256 crops (reflect-padded when smaller) with random rot90 and flips, batch 8, cross-entropy,
AdamW lr 1e-3 constant, weight decay 1e-4, for `--steps` or `--minutes` of training wall time (the first
reached). Images and masks are read with the product's readers (`read_micrograph(gray=True)`,
`ClassMap.encode(read_raw(mask))`), so labels are identical to `segment.data.SegmentationDataset`'s.
Test images are segmented whole by the product's `segment.infer.Predictor` (tiles of the crop size,
overlap 0.5, Gaussian weights, no TTA) fed the z-scored image (its mean/std set to 0/1, so its own
normalisation is the identity) and scored by `segment.metrics`, as `segment.evaluate` does: NASA IoU
per image averaged over the test images (± population std), per-class IoU and mIoU of the summed
confusion matrix. Prints one markdown row per test set and the machine load, writes the same to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch.nn import functional as F

from pretrain.io import read_micrograph, read_raw
from pretrain.outputs import atomic_write_text
from segment.class_maps import get_class_map
from segment.pairs import find_pairs
from segment.infer import Predictor
from segment.metrics import aggregate, confusion_matrix

REPO = Path(__file__).resolve().parents[1]


def zscore(image: np.ndarray) -> np.ndarray:
    """Whole image -> float32 (x - mean) / std (statistics in float64, std floored at 1e-6)."""
    x = np.asarray(image, dtype=np.float32)
    return ((x - x.mean(dtype=np.float64)) / max(float(x.std(dtype=np.float64)), 1e-6)).astype(np.float32)


def load(root: Path, split: str, class_map) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """(image path, z-scored image, class indices) of every pair of a split, read as the product reads them."""
    return [(i, zscore(read_micrograph(i, gray=True).image), class_map.encode(read_raw(m), m))
            for i, m in find_pairs(root, split)]


def random_crop(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, size: int):
    """A random size x size crop (reflect-padded if smaller), random rot90 and flip, of image and label alike."""
    ph, pw = max(size - image.shape[0], 0), max(size - image.shape[1], 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)), mode="reflect")
        label = np.pad(label, ((0, ph), (0, pw)), mode="reflect")
    y = rng.integers(0, image.shape[0] - size + 1)
    x = rng.integers(0, image.shape[1] - size + 1)
    image, label = image[y:y + size, x:x + size], label[y:y + size, x:x + size]
    k = int(rng.integers(4))
    image, label = np.rot90(image, k), np.rot90(label, k)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def parse_test(spec: str) -> tuple[Path, str]:
    root, sep, split = spec.rpartition(":")
    return (Path(root), split) if sep and split and "/" not in split else (Path(spec), "test")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train", type=Path, help="NASA-layout set; its train split is used for training")
    ap.add_argument("--test", action="append", help="ROOT[:SPLIT] to evaluate (repeatable; the train set's "
                                                    "own test split is always included)")
    ap.add_argument("--class-map", help="segment.data preset (default: 'ebc' for EBC*, else 'super')")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--minutes", type=float, help="training wall-clock budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=256, help="training crop and prediction tile size")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.steps is None and args.minutes is None:
        ap.error("give --steps and/or --minutes")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    name = args.train.name
    class_map = get_class_map(args.class_map or ("ebc" if name.lower().startswith("ebc") else "super"))
    out = args.out or REPO / "bench" / "results" / "plain_baseline" / f"{name}_s{args.seed}.json"
    load_start = os.getloadavg()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
          f"{args.threads} threads, {args.device}", flush=True)

    train = load(args.train, "train", class_map)
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=class_map.num_classes).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    steps, t0 = 0, time.perf_counter()
    while not ((args.steps is not None and steps >= args.steps)
               or (args.minutes is not None and time.perf_counter() - t0 >= 60 * args.minutes)):
        crops = [random_crop(rng, *train[rng.integers(len(train))][1:], args.crop) for _ in range(args.batch)]
        x = torch.from_numpy(np.stack([c[0] for c in crops]))[:, None].to(args.device)
        y = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64)).to(args.device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps % 50 == 0:
            print(f"step {steps} loss {loss.item():.4f} {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    minutes = (time.perf_counter() - t0) / 60

    predictor = Predictor(model, tile_size=args.crop, overlap=0.5, tta=False, mean=(0.0,), std=(1.0,),
                          device=args.device)
    tests = [(args.train, "test")] + [parse_test(t) for t in args.test or []]
    results = {}
    for root, split in dict.fromkeys(tests):
        cms = []
        for path, image, truth in load(root, split, class_map):
            x = predictor.normalize(image)  # mean 0, std 1: the z-scored image itself
            assert torch.equal(x[0], torch.from_numpy(image)), path
            cms.append(confusion_matrix(predictor.predict_labels(x), truth, class_map.num_classes))
        r = aggregate(cms, class_map.names)
        results[f"{root.name}:{split}"] = {
            "root": str(root), "split": split, "n_images": r["n_images"], "nasa_iou_mean": r["nasa_iou_mean"],
            "nasa_iou_std": r["nasa_iou_std"], "per_image_nasa_iou": r["per_image_nasa_iou"],
            "iou_per_class": dict(zip(class_map.names, r["iou_per_class"])), "miou": r["miou"],
            "pixel_accuracy": r["pixel_accuracy"]}
    load_end = os.getloadavg()
    report = {"train": str(args.train), "class_map": class_map.names, "seed": args.seed, "steps": steps,
              "minutes": minutes, "crop": args.crop, "batch": args.batch, "threads": args.threads,
              "device": args.device, "load_start": load_start, "load_end": load_end, "tests": results}

    print("\n| train set | seed | steps | train min | test set | NASA IoU | per-class IoU | mIoU |")
    print("|---|---|---|---|---|---|---|---|")
    for test, r in results.items():
        classes = ", ".join(f"{n} {100 * v:.1f}" for n, v in r["iou_per_class"].items())
        print(f"| {name} | {args.seed} | {steps} | {minutes:.1f} | {test} | {100 * r['nasa_iou_mean']:.2f} ± "
              f"{100 * r['nasa_iou_std']:.2f} | {classes} | {100 * r['miou']:.1f} |")
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
