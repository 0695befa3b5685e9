"""Fine-tune several models on real NASA benchmark sets with one recipe and tabulate the test scores.

    python bench/real_finetune.py --data super1 ebc1 --models cs_unet_lite unet_lite \
        --out runs/real -- train.epochs=20 data.crop_size=256 train.batch_size=4

Each (data, model) pair is one `python -m segment.finetune` run (same epochs, crops and seed), resumed
if its folder exists. Prints a markdown table of NASA IoU, per-class IoU, mIoU and wall time.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path


def run(data: str, model: str, out: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "segment.finetune", f"data={data}", f"model={model}", f"out={out}", *overrides]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t0


def table(rows: list[dict]) -> str:
    lines = ["| data | model | test set | NASA IoU | per-class IoU | mIoU | train min | best epoch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['model']} | {r['set']} | {r['nasa']} | {r['classes']} | {r['miou']} | {r['minutes']} | {r['best_epoch']} |")
    return "\n".join(lines)


def collect(data: str, model: str, out: Path) -> list[dict]:
    summary = out / "eval" / "summary.csv"
    meta = json.loads((out / "best" / "model.json").read_text())
    hist = list(csv.DictReader((out / "history.csv").open()))
    minutes = float(hist[-1]["minutes"]) if hist else float("nan")
    names = meta["class_names"]
    rows = []
    for r in csv.DictReader(summary.open()):
        classes = ", ".join(f"{n} {100 * float(r[f'iou_{n}']):.1f}" for n in names)
        rows.append(dict(data=data, model=model, set=r["set"],
                         nasa=f"{100 * float(r['nasa_iou_mean']):.2f} ± {100 * float(r['nasa_iou_std']):.2f}",
                         classes=classes, miou=f"{100 * float(r['miou']):.1f}", minutes=f"{minutes:.1f}",
                         best_epoch=meta.get("epoch")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["super1", "ebc1"])
    ap.add_argument("--models", nargs="+", default=["cs_unet_lite", "unet_lite"])
    ap.add_argument("--out", type=Path, default=Path("runs/real"))
    ap.add_argument("overrides", nargs="*", help="finetune overrides shared by every run (after --)")
    args = ap.parse_args()
    rows = []
    for data in args.data:
        for model in args.models:
            out = (args.out / f"{data}_{model}").resolve()
            if not (out / "eval" / "summary.csv").is_file():
                run(data, model, out, args.overrides)
            rows += collect(data, model, out)
            print(table(rows), flush=True)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
