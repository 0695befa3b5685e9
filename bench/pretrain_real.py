"""DINO pretraining of swin_lite on the real micrographs, k-NN curve on a disjoint labelled holdout.

    nice -n 5 .venv/bin/python bench/pretrain_real.py --out runs/bench/pretrain_real

Pretrain issue, acceptance item 2: pretrain on ``../shared/data/unlabeled`` plus the benchmark images
(labels ignored) and report the k-NN accuracy curve on a labelled holdout (superalloy / coating /
melt pool) against the same encoder at random initialisation.

Method (everything generated goes under ``--out``; the real data are only read or linked):

* corpus (labels ignored): ``unlabeled/meltpool/train`` (199 tiles of six slices) + ``nasa/Super1/{train,val}``
  (14) + ``nasa/EBC1/{train,val}`` (19, 1024 px). Only Super1 and EBC1 are used: the Super1..4 and
  EBC1..3 sets split one pool each, so another set's training images are Super1/EBC1 test images.
  Sharded with ``python -m pretrain.shards`` (full frames); the loader tiles frames larger than
  ``--max-side`` (512) randomly, so every material is seen at about the same pixel scale.
* holdout (``OUT/holdout/{train,test}/<class>/``, symlinks; split per source image, so crops of one
  frame never sit on both sides): ``superalloy`` = Super1/test (4 images: 2 bank, 2 query),
  ``coating`` = EBC1/test (3 images: 2 bank, 1 query), ``meltpool`` = 4 tiles of
  unlabeled/meltpool/validation (one slice never in the corpus; every 8th tile, 2048 px apart, no
  overlap; alternately bank/query). ``load_holdout`` cuts each image into ``--knn-crops`` (16: a 4x4
  grid) crops of ``--knn-crop`` (256) native pixels, resized to the global crop size: a balanced bank
  of 32 crops per class and 32/16/32 queries.
* ``python -m pretrain.main`` with DINO on ``swin_lite`` (global crops ``--global-size`` 128, local
  ``--local-size`` 48), ``data.shards=OUT/shards knn.holdout=OUT/holdout``: k-NN top-1 (weighted
  k-NN, k=20, DINO's protocol) at step 0 (random init), every ``--knn-every`` steps and at the end;
  batch 32, 6 x 20 steps (peak lr 5e-4, teacher momentum 0.99 -> 1), sized for ~20 min on 2 shared CPU
  cores. ``--max-minutes`` stops it early (checkpoint; the curve then ends at the last periodic probe).
* context: k-NN of randomly initialised swin_lite and resnet18 (BatchNorm refitted on the bank, as
  the probe does) on the same holdout, seeds 0..2, no training.

Prints markdown: the k-NN curve from ``OUT/run/metrics.csv`` (random init first) and the random-init
baselines; writes them to ``OUT/table.md``. Rerunning resumes the run (``out`` is kept) and reprints.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = ["unlabeled/meltpool/train", "nasa/Super1/train", "nasa/Super1/val", "nasa/EBC1/train", "nasa/EBC1/val"]
HOLDOUT = {"superalloy": "nasa/Super1/test", "coating": "nasa/EBC1/test", "meltpool": "unlabeled/meltpool/validation"}
IMAGE_EXT = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXT)


def _meltpool_x(path: Path) -> int:
    """Tile names are ``<slice>_<x0>_<y0>_<x1>_<y1>``: x offset of the tile along the slice."""
    return int(path.stem.split("_")[-4])


def build_holdout(data: Path, root: Path) -> dict[str, dict[str, list[str]]]:
    """Symlink the holdout images into ``root/{train,test}/<class>/``; returns the file names per side."""
    sides: dict[str, dict[str, list[Path]]] = {}
    for cls, rel in HOLDOUT.items():
        files = _images(data / rel)
        if cls == "meltpool":
            # overlapping 512 px tiles at a 256 px stride along one slice: take every 8th (no overlap)
            files = sorted(files, key=_meltpool_x)[::8][:4]
        sides[cls] = {"train": files[0::2], "test": files[1::2]}
    listing: dict[str, dict[str, list[str]]] = {}
    for cls, split in sides.items():
        for side, files in split.items():
            folder = root / side / cls
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():
                stale.unlink()
            for f in files:
                (folder / f.name).symlink_to(f.resolve())
            listing.setdefault(cls, {})[side] = [f.name for f in files]
    return listing


def run(cmd: list[str], log: Path | None = None, *, max_minutes: float | None = None,
        preempt: Path | None = None) -> float:
    """Run ``cmd``; after ``max_minutes`` create ``preempt`` (the run checkpoints and exits 0)."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with (log.open("a") if log is not None else open(os.devnull, "w")) as fh:
        sink = dict(stdout=fh, stderr=subprocess.STDOUT) if log is not None else {}
        proc = subprocess.Popen(cmd, cwd=ROOT, **sink)
        try:
            proc.wait(timeout=None if max_minutes is None else max_minutes * 60)
        except subprocess.TimeoutExpired:
            print(f"time limit ({max_minutes} min): asking the run to stop at its next poll", flush=True)
            preempt.touch()
            proc.wait()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return time.time() - t0


def random_init_baselines(holdout: Path, args, seeds=(0, 1, 2)) -> list[tuple[str, list[float]]]:
    """k-NN top-1 of randomly initialised encoders on the holdout, same crops and probe as the run."""
    import torch

    from pretrain.encoders import build_encoder
    from pretrain.knn import KnnProbe, load_holdout

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    h = load_holdout(holdout, crop_size=args.knn_crop, img_size=args.global_size, crops_per_image=args.knn_crops,
                     max_images_per_class=40, in_chans=1, mean=0.5, std=0.25)
    print(h.summary(), flush=True)
    probe = KnnProbe(h, k=20, temperature=0.07)
    out = []
    for name in ("swin_lite", "resnet18"):
        accs = []
        for seed in seeds:
            torch.manual_seed(seed)
            encoder, _ = build_encoder(name, in_chans=1, img_size=args.global_size)
            accs.append(probe(encoder, "cpu")["knn_top1"])
        out.append((name, accs))
        print(f"random-init {name}: " + ", ".join(f"{a:.3f}" for a in accs), flush=True)
    return out


def per_class(holdout: Path, export: Path, args) -> str:
    """Per-class k-NN top-1 of the random-init swin_lite (seed 0, the run's step 0) and of the export:
    on the run's bank/query split, and leave-one-image-out (each holdout image queried against the
    crops of all the others: every image is a query once, so one odd coating frame weighs less)."""
    import torch
    import torch.nn.functional as F

    from pretrain.encoders import build_encoder
    from pretrain.knn import extract_features, holdout_crops, load_holdout
    from pretrain.views import EvalView
    from segment.weight_formats import read_checkpoint

    h = load_holdout(holdout, crop_size=args.knn_crop, img_size=args.global_size, crops_per_image=args.knn_crops,
                     max_images_per_class=40, in_chans=1, mean=0.5, std=0.25)
    classes = h.classes
    view = EvalView(args.global_size, resize=True, channels=1, mean=0.5, std=0.25)
    images = [(f, classes.index(c)) for side in ("train", "test") for c in classes
              for f in sorted((holdout / side / c).iterdir())]
    crops = [torch.stack(holdout_crops(f, crop_size=args.knn_crop, n=args.knn_crops, view=view)) for f, _ in images]
    torch.manual_seed(0)
    encoders = [("swin_lite, random init (seed 0)", build_encoder("swin_lite", in_chans=1, img_size=args.global_size)[0])]
    weights = export / "encoder.safetensors"
    if weights.is_file():
        encoder, _ = build_encoder("swin_lite", in_chans=1, img_size=args.global_size)
        state, meta = read_checkpoint(weights)
        encoder.load_state_dict(state)
        encoders.append((f"swin_lite, DINO {meta.get('steps', '?')} steps (export)", encoder))

    def vote(bank, bank_y, queries):
        sim, idx = (F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T).topk(min(20, len(bank)), dim=1)
        votes = torch.zeros(len(queries), len(classes)).scatter_add_(1, bank_y[idx], (sim / 0.07).exp())
        return votes.argmax(1)

    def accs(pred, truth):
        return [float((pred == truth).float().mean())] + [float((pred[truth == i] == i).float().mean())
                                                         for i in range(len(classes))]

    head = " | ".join(classes)
    lines = [f"| encoder | split: all | {head} | leave-one-image-out: all | {head} |",
             "|---|" + "---:|" * (2 * len(classes) + 2)]
    for name, encoder in encoders:
        split = accs(vote(extract_features(encoder, h.train_images), h.train_labels,
                          extract_features(encoder, h.test_images)), h.test_labels)
        feats = [extract_features(encoder, c) for c in crops]
        labels = [torch.full((len(f),), y) for f, (_, y) in zip(feats, images)]
        preds = [vote(torch.cat(feats[:i] + feats[i + 1:]), torch.cat(labels[:i] + labels[i + 1:]), feats[i])
                 for i in range(len(feats))]
        loio = accs(torch.cat(preds), torch.cat(labels))
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in split + loio) + " |")
    n = {c: sum(y == i for _, y in images) for i, c in enumerate(classes)}
    lines.append(f"\n(query crops: split {int(len(h.test_labels))}, leave-one-image-out "
                 f"{sum(len(c) for c in crops)}; images per class {n})")
    return "\n".join(lines)


def curve(metrics: Path, batch: int) -> list[tuple[int, float, float | None]]:
    rows = list(csv.DictReader(metrics.open()))
    minutes = {int(float(r["step"])): float(r["minutes"]) for r in rows if r.get("minutes")}
    return [(int(float(r["step"])), float(r["knn_top1"]), minutes.get(int(float(r["step"]))))
            for r in rows if r.get("knn_top1")]


def tables(points, baselines, batch: int, n_query: int) -> str:
    init = points[0][1]
    lines = [f"| step | images seen | train min | k-NN top-1 ({n_query} queries) | vs random init |",
             "|---:|---:|---:|---:|---:|"]
    for step, acc, minutes in points:
        label = f"{step} (random init)" if step == 0 else str(step)
        lines.append(f"| {label} | {step * batch} | {'' if minutes is None else f'{minutes:.1f}'} | {acc:.3f} | "
                     f"{acc - init:+.3f} |")
    if baselines:
        lines += ["", "| encoder, random init (no training) | k-NN top-1, seeds 0/1/2 | mean |", "|---|---|---:|"]
        for name, accs in baselines:
            lines.append(f"| {name} | {' / '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "pretrain_real")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--knn-every", type=int, default=20)
    ap.add_argument("--max-minutes", type=float, default=24.0,
                    help="stop the pretraining (checkpoint, exit 0) after this many minutes")
    ap.add_argument("--global-size", type=int, default=128)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--n-local", type=int, default=4)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--knn-crop", type=int, default=256)
    ap.add_argument("--knn-crops", type=int, default=16)
    ap.add_argument("--report-only", action="store_true",
                    help="no sharding or training: probe the baselines and the export, print the tables")
    ap.add_argument("--no-baselines", action="store_true", help="skip the random-init swin_lite/resnet18 probes")
    ap.add_argument("overrides", nargs="*", help="further pretrain.main overrides (after --)")
    args = ap.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    missing = [p for p in CORPUS + list(HOLDOUT.values()) if not (data / p).is_dir()]
    if missing:
        sys.exit(f"missing under {data}: {missing}")
    out.mkdir(parents=True, exist_ok=True)
    print("load:", os.getloadavg(), flush=True)

    holdout = out / "holdout"
    for cls, sides in build_holdout(data, holdout).items():
        print(f"holdout {cls}: bank {sides['train']}, queries {sides['test']}")

    t_shards = t_train = float("nan")
    run_dir = out / "run"
    if not args.report_only:
        t_shards, t_train = shard_and_train(data, out, holdout, run_dir, args)

    t0 = time.time()
    baselines = [] if args.no_baselines else random_init_baselines(holdout, args)
    classes = per_class(holdout, run_dir / "export", args)
    t_base = time.time() - t0

    from pretrain.knn import load_holdout

    n_query = len(load_holdout(holdout, crop_size=args.knn_crop, img_size=args.global_size,
                               crops_per_image=args.knn_crops).test_labels)
    points = curve(run_dir / "metrics.csv", args.batch_size)
    text = tables(points, baselines, args.batch_size, n_query) + "\n\nper class, k-NN top-1:\n\n" + classes
    text += (f"\n\nwall time: shards {t_shards:.0f} s, pretraining (incl. probes) {t_train / 60:.1f} min, "
             f"baselines and per-class probes {t_base:.0f} s; load {os.getloadavg()}")
    (out / "table.md").write_text(text + "\n")
    print(text)


def shard_and_train(data: Path, out: Path, holdout: Path, run_dir: Path, args) -> tuple[float, float]:
    t_shards = run([sys.executable, "-m", "pretrain.shards", *(str(data / p) for p in CORPUS),
                    "--out", str(out / "shards"), "--maxcount", "32", "--workers", "1", "--quiet"])
    overrides = [
        "pretrain/data=shards", "pretrain/encoder=swin_lite", "pretrain/method=dino", f"out={run_dir}",
        f"data.shards={out / 'shards'}", f"data.max_side={args.max_side}",
        # decoding + views cost ~10 ms an image; a loader worker competing with the training threads
        # for 2 shared cores was several times slower (17 s/step vs ~8) in this benchmark's calibration
        "data.num_workers=0",
        "data.shuffle_buffer=256",
        f"data.views.global_size={args.global_size}", f"data.views.local_size={args.local_size}",
        f"data.views.n_local={args.n_local}",
        f"optim.batch_size={args.batch_size}", f"optim.epochs={args.epochs}",
        f"optim.steps_per_epoch={args.steps_per_epoch}",
        f"knn.holdout={holdout}", f"knn.every={args.knn_every}", f"knn.crop_size={args.knn_crop}",
        f"knn.crops_per_image={args.knn_crops}", "knn.k=20",
        "checkpoint.every=50", "log.every=5", "log.progress=false", *args.overrides,
    ]
    t_train = run([sys.executable, "-m", "pretrain.main", *overrides], log=out / "pretrain.log",
                  max_minutes=args.max_minutes, preempt=run_dir / "PREEMPT")
    return t_shards, t_train


if __name__ == "__main__":
    main()
