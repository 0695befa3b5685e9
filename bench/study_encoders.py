"""Pretrain the study's encoders (issue 7) on the unlabeled corpus: DINO on resnet18 and swin_lite.

    OMP_NUM_THREADS=1 .venv/bin/python bench/study_encoders.py --out runs/encoders

Writes ``OUT/resnet18/export`` and ``OUT/swin_lite/export`` (the study's ``encoders.cnn`` / ``encoders.swin``
defaults), each ``encoder.json`` carrying the k-NN top-1 at random init and at the end of pretraining.

Corpus (labels and masks never read), deduplicated by file content (the Super1..4 and EBC1..3 sets are
drawn from one pool each, so the same frame can sit in several sets):

* ``unlabeled/meltpool/train`` (199 tiles of six laser melt-pool slices);
* every benchmark image, ``nasa/*/{train,val,test}`` (not the ``*_annot`` mask folders): this is
  transductive pretraining, as in the CS-UNet paper, which pretrains on unlabeled microscopy including the
  target domain; the fine-tuning labels stay unseen;
* ``--synthetic`` synthetic micrographs per material (``pretrain.synthetic.write_unlabeled``, 512 px).

k-NN holdout: ``bench/pretrain_real.py``'s (Super1 test, EBC1 test, four melt-pool validation tiles; classes
superalloy / coating / meltpool). Its superalloy and coating images are in the corpus (unlabeled), its
melt-pool tiles are not. The probe measures whether the features separate materials, not segmentation.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pretrain_real import HOLDOUT, _images, build_holdout, run  # noqa: E402

ENCODERS = ("resnet18", "swin_lite")


def corpus_folders(data: Path) -> list[Path]:
    folders = [data / "unlabeled" / "meltpool" / "train"]
    for s in sorted((data / "nasa").iterdir()):
        folders += [s / split for split in ("train", "val", "test") if (s / split).is_dir()]
    return folders


def link_corpus(data: Path, root: Path) -> dict[str, int]:
    """Symlink the real images into ``root/<source>/``, one link per distinct file content."""
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for folder in corpus_folders(data):
        source = "meltpool" if "unlabeled" in folder.parts else folder.parent.name
        dest = root / source
        dest.mkdir(parents=True, exist_ok=True)
        for f in _images(folder):
            digest = hashlib.sha1(f.read_bytes()).hexdigest()
            if digest in seen:
                counts["duplicates"] = counts.get("duplicates", 0) + 1
                continue
            seen.add(digest)
            link = dest / f"{folder.name}_{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
            counts[source] = counts.get(source, 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "encoders")
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    ap.add_argument("--synthetic", type=int, default=32, help="synthetic micrographs per material")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--global-size", type=int, default=128)
    ap.add_argument("--local-size", type=int, default=48)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--knn-every", type=int, default=60)
    ap.add_argument("overrides", nargs="*", help="further pretrain.main overrides (after --)")
    args = ap.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    missing = [str(data / p) for p in ["unlabeled/meltpool/train", "nasa", *HOLDOUT.values()] if not (data / p).is_dir()]
    if missing:
        sys.exit(f"missing: {missing}")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    counts = link_corpus(data, out / "corpus")
    print("corpus (distinct images per source):", counts, flush=True)
    holdout = out / "holdout"
    build_holdout(data, holdout)
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        run([sys.executable, "-m", "pretrain.shards", str(out / "corpus"), "--synthetic", str(args.synthetic),
             "--synthetic-size", "512", "--out", str(shards), "--maxcount", "64", "--workers", "1", "--quiet"])
    print(f"shards in {time.time() - t0:.0f} s", flush=True)

    summary = {}
    for name in args.encoders:
        run_dir = out / name
        export = run_dir / "export" / "encoder.json"
        if not export.is_file():
            overrides = [
                "pretrain/data=shards", f"pretrain/encoder={name}", "pretrain/method=dino", f"out={run_dir}",
                f"data.shards={shards}", f"data.max_side={args.max_side}", "data.num_workers=0",
                "data.shuffle_buffer=256", f"data.views.global_size={args.global_size}",
                f"data.views.local_size={args.local_size}", f"optim.batch_size={args.batch_size}",
                f"optim.epochs={args.epochs}", f"optim.steps_per_epoch={args.steps_per_epoch}",
                f"knn.holdout={holdout}", f"knn.every={args.knn_every}", "knn.crop_size=256",
                "knn.crops_per_image=16", "checkpoint.every=60", "log.every=10", "log.progress=false",
                *args.overrides,
            ]
            minutes = run([sys.executable, "-m", "pretrain.main", *overrides], log=out / f"{name}.log") / 60
            print(f"{name}: pretrained in {minutes:.1f} min", flush=True)
        meta = json.loads(export.read_text())
        summary[name] = {"export": str(export.parent), "steps": meta["steps"], **meta.get("knn", {})}
        print(name, summary[name], flush=True)
    (out / "encoders.json").write_text(json.dumps({"corpus": counts, "encoders": summary}, indent=2) + "\n")
    print("load:", os.getloadavg())


if __name__ == "__main__":
    main()
