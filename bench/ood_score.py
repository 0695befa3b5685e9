"""Does the OOD score (segment.ood) separate shifted tiles and predict failure? (issue 17 item 1)

    python bench/ood_score.py [--checkpoint runs/study_intensity/unet_lite__zscore__super1__s0/best]
        [--nasa ../shared/data/nasa] [--train Super1] [--id Super1] [--ood Super4] [--k 5]
        [--out bench/results/ood_score.md]

Fits the summary on the training images of ``--train`` (k-NN bank of 256^2 tile features) with the
threshold from its validation images, then scores every 256^2 tile (the grid predict uses) of
Super1 val/test and Super2/3/4 test with the model's features (k-NN) and the mean predictive
entropy of the band-wise prediction, and reports:

(a) tile AUROC, ``--ood`` test tiles vs ``--id`` val + test tiles, for the k-NN score, the entropy
    and the product's score combining both;
(b) Spearman rho between tile score and tile error (1 - NASA IoU of the tile) over the test tiles
    of Super1-4;
(d) the share of images flagged (image score > threshold) per set (Super1 val is the calibration set).
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "runs" / "study_intensity" / "unet_lite__zscore__super1__s0" / "best"
NASA = ROOT.parent / "shared" / "data" / "nasa"


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def score_set(predictor, model, summary, class_map, pairs, tile):
    from segment.evaluate import read_truth
    from segment.metrics import confusion_matrix, nasa_iou
    from segment.ood import EntropyTiles, native_tile, tile_features
    from segment.sources import open_source
    from segment.stream import iter_logit_rows
    from segment.tiling import class_labels

    rows = []
    for image, mask in pairs:
        truth = read_truth(mask, class_map)
        with open_source(image, gray=True) as src:
            origins, feats = tile_features(predictor, model, src, tile)
            side = native_tile(tile, predictor.zoom)  # grid cell in image pixels
            ent = EntropyTiles(src.shape, side)
            labels = np.empty(src.shape, np.uint8)
            for y0, logits in iter_logit_rows(predictor, src, progress=False):
                ent(y0, logits)
                labels[y0 : y0 + logits.shape[1]] = class_labels(logits).numpy()
        knn = summary.knn(feats)
        ents = ent.means().ravel()
        scores = summary.combine(knn, ents)
        digest = hashlib.sha256(Path(image).read_bytes()).hexdigest()
        for (y, x), s, e, c in zip(origins, knn, ents, scores, strict=True):
            t, p = truth[y : y + side, x : x + side], labels[y : y + side, x : x + side]
            err = 1 - nasa_iou(confusion_matrix(p, t, len(class_map.names)))
            rows.append(dict(image=image.name, digest=digest, y=y, x=x, knn=float(s), entropy=float(e),
                             score=float(c), error=float(err)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    p.add_argument("--nasa", type=Path, default=NASA)
    p.add_argument("--train", default="Super1")
    p.add_argument("--id", default="Super1")
    p.add_argument("--ood", default="Super4")
    p.add_argument("--failure-sets", default="Super1,Super4",
                   help="sets whose test tiles enter (b); Super2/3 test are the same files as Super1 test here")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ood_score.md")
    args = p.parse_args()

    import torch
    from scipy.stats import spearmanr

    from pretrain.outputs import atomic_write_text
    from segment.class_maps import get_class_map
    from segment.infer import Predictor
    from segment.ood import fit
    from segment.pairs import find_pairs

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    predictor = Predictor.from_checkpoint(args.checkpoint, batch_size=4)
    model, tile = predictor.model, predictor.tile_hw[0]
    class_map = get_class_map(predictor.meta["class_map"])
    root = args.nasa / args.train
    summary = fit(predictor, model, [i for i, _ in find_pairs(root, "train")], [i for i, _ in find_pairs(root, "val")],
                  k=args.k)
    sets = {f"{args.id} val": (args.nasa / args.id, "val")}
    for name in dict.fromkeys([args.id, *args.failure_sets.split(","), args.ood]):
        sets[f"{name} test"] = (args.nasa / name, "test")
    tiles = {}
    for label, (folder, split) in sets.items():
        tiles[label] = score_set(predictor, model, summary, class_map, find_pairs(folder, split), tile)
        print(f"{label}: {len(tiles[label])} tiles, median score {np.median([r['score'] for r in tiles[label]]):.3f}, "
              f"median error {np.median([r['error'] for r in tiles[label]]):.3f}", flush=True)

    def col(labels, key, unique=False):
        seen: set[str] = set()
        out = []
        for lab in labels:
            for r in tiles[lab]:
                k = (r["digest"], r["y"], r["x"])
                if unique and k in seen:
                    continue
                seen.add(k)
                out.append(r[key])
        return np.array(out)

    neg_sets, pos_sets = [f"{args.id} val", f"{args.id} test"], [f"{args.ood} test"]
    keys = (("knn", "k-NN distance"), ("entropy", "mean predictive entropy"),
            ("score", "OOD score (product: both, scaled by their val medians)"))
    lines = [f"# OOD score: {args.checkpoint}", "",
             f"Summary: {summary.meta['bank_tiles']} training tiles ({args.train} train) x {summary.meta['dims']} "
             f"features, k = {summary.k}; threshold {summary.threshold:.4g} = {summary.meta['quantile']:.0%} of "
             f"{summary.meta['val_tiles']} {args.train} val tiles' scores. Tiles {tile}^2, non-overlapping grid. "
             f"Run time {time.perf_counter() - t0:.0f} s (2 CPU cores shared with a running study).", "",
             f"## (a) tile AUROC, {args.ood} test ({len(col(pos_sets, 'knn'))} tiles) vs {args.id} val + test "
             f"({len(col(neg_sets, 'knn'))} tiles)", "", "| score | AUROC |", "|---|---:|"]
    for key, name in keys:
        lines.append(f"| {name} | {auroc(col(pos_sets, key), col(neg_sets, key)):.3f} |")
    fail_sets = [f"{s} test" for s in args.failure_sets.split(",")]
    err = col(fail_sets, "error", unique=True)
    lines += ["", f"## (b) Spearman rho, tile score vs tile error (1 - NASA IoU), test tiles of "
              f"{', '.join(args.failure_sets.split(','))}, identical images counted once ({len(err)} tiles)", "",
              "| score | rho | p |", "|---|---:|---:|"]
    for key, name in keys:
        r = spearmanr(col(fail_sets, key, unique=True), err)
        lines.append(f"| {name} | {r.statistic:.3f} | {r.pvalue:.2g} |")
    lines += ["", "## (d) images flagged (mean of the tiles' OOD scores > threshold)", "",
              "| set | images | images flagged | tiles flagged |", "|---|---:|---:|---:|"]
    for label in tiles:
        by_image: dict[str, list[float]] = {}
        for r in tiles[label]:
            by_image.setdefault(r["image"], []).append(r["score"])
        flagged = sum(np.mean(v) > summary.threshold for v in by_image.values())
        tile_rate = np.mean([r["score"] > summary.threshold for r in tiles[label]])
        note = " (calibration set)" if label == f"{args.train} val" else ""
        lines.append(f"| {label}{note} | {len(by_image)} | {flagged} ({flagged / len(by_image):.0%}) | {tile_rate:.0%} |")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
