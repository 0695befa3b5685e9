"""Predicted vs ground-truth phase area fractions on real test images, through `segment.predict`.

    python bench/phase_fractions.py runs/real/super1_unet_lite ../shared/data/nasa/Super1 \
        --split test --out runs/fractions_super1

Runs `python -m segment.predict CHECKPOINT ROOT/SPLIT --out OUT` (the product path, end to end), reads
its `summary.csv`, encodes the ground-truth masks with the checkpoint's class map, and prints one row
per image and class: truth %, predicted %, difference in percentage points; then the mean absolute
error per class.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pretrain.io import read_raw
from segment.checkpoint import resolve_checkpoint
from segment.class_maps import get_class_map
from segment.pairs import find_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("root", type=Path, help="NASA-layout set")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    meta = json.loads((resolve_checkpoint(args.checkpoint) / "model.json").read_text())
    class_map = get_class_map(meta["class_map"])
    pairs = find_pairs(args.root, args.split)
    cmd = [sys.executable, "-m", "segment.predict", str(args.checkpoint), str(args.root / args.split),
           "--out", str(args.out), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    predicted: dict[tuple[str, str], float] = {}
    for row in csv.DictReader((args.out / "summary.csv").open()):
        predicted[(Path(row["image"]).stem, row["class"])] = float(row["area_fraction"])

    names = list(class_map.names)
    print("\n| image | class | truth % | predicted % | difference (pp) |\n|---|---|---:|---:|---:|")
    errors: dict[str, list[float]] = {n: [] for n in names}
    for image, mask in pairs:
        labels = class_map.encode(read_raw(mask), mask)
        truth = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
        for k, name in enumerate(names):
            if k == (class_map.default if class_map.default is not None else 0):
                continue
            pred = predicted.get((image.stem, name))
            if pred is None:
                continue
            errors[name].append(abs(pred - truth[k]) * 100)
            print(f"| {image.name} | {name} | {100 * truth[k]:.2f} | {100 * pred:.2f} | {100 * (pred - truth[k]):+.2f} |")
    print("\n| class | mean absolute error (pp) | images |\n|---|---:|---:|")
    for name, errs in errors.items():
        if errs:
            print(f"| {name} | {np.mean(errs):.2f} | {len(errs)} |")


if __name__ == "__main__":
    main()
