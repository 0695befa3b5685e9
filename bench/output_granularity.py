"""Output granularity oracle: how much of each class lives in detail finer than an output stride.

    nice -n 10 python bench/output_granularity.py                       # Super1, Super3, EBC1; blocks 1 2 4 8
    nice -n 10 python bench/output_granularity.py --sets Super1 --blocks 1 2 4 8 16

Method: every test mask of each NASA-layout set (`DATA/nasa/<SET>/test` + `test_annot`, paired by
`segment.pairs.find_pairs`) is read with the product's readers (`ClassMap.encode(read_raw(mask))`, class
map "super" for Super*, "ebc" for EBC*, as configs/data/*.yaml use). For each block size b, the truth
label map is replaced by its block majority (:func:`block_majority`): the image is cut into b x b
blocks aligned at the top-left corner, each block takes the class with the most pixels in it, ties
going to the lowest class index. Partial blocks at the right and bottom edges (when H or W is not a
multiple of b) are blocks of their own: their majority counts only the pixels inside the image (no
padding, no edge replication). The NASA sets are 512x512 and 1024x1024, so no partial block occurs for
b <= 16. The block-constant map is then scored against the truth exactly as `segment.evaluate` scores a
prediction: `segment.metrics.confusion_matrix` per image, `segment.metrics.aggregate` over the images
(NASA IoU = mean over images of the per-image pooled IoU; per-class IoU and mIoU of the summed confusion
matrix). Block size 1 is the identity and scores exactly 100 %.

A decoder whose last feature map is at 1/b resolution and is expanded b times is, to a first
approximation, block-constant at b px: the table is an upper bound on what such a head can reach even
with perfect features. Prints a markdown table and writes it to `--out`
(default `bench/results/output_granularity.md`). Pure numpy; the whole run takes a few seconds.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETS = ("Super1", "Super3", "EBC1")


def block_majority(label: np.ndarray, block: int, num_classes: int | None = None) -> np.ndarray:
    """Replace every ``block x block`` block of a 2-D label map by its majority class.

    Blocks are aligned at the top-left corner. Ties go to the lowest class index. Partial blocks at the
    right and bottom edges are blocks of their own: only their pixels inside the map are counted (the
    map is padded with a sentinel class that is never counted, then cropped back). ``num_classes``
    defaults to ``label.max() + 1``; labels must lie in ``0..num_classes-1``. Returns an array of the
    input's shape and dtype. Vectorised: one reshape to (H/b, b, W/b, b) and one count per class.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"label map must hold integers, got {label.dtype}")
    if int(block) != block or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    block = int(block)
    if label.size == 0 or block == 1:
        return label.copy()
    k = int(label.max()) + 1 if num_classes is None else int(num_classes)
    if label.min() < 0 or label.max() >= k:
        raise ValueError(f"labels outside 0..{k - 1}: range [{label.min()}, {label.max()}]")
    h, w = label.shape
    hb, wb = -(-h // block), -(-w // block)
    padded = np.full((hb * block, wb * block), k, dtype=np.int64)  # k = sentinel, never counted
    padded[:h, :w] = label
    blocks = padded.reshape(hb, block, wb, block)
    counts = np.stack([(blocks == c).sum(axis=(1, 3)) for c in range(k)], axis=-1)  # (hb, wb, k)
    majority = counts.argmax(axis=-1)  # argmax returns the first maximum: ties -> lowest index
    full = np.repeat(np.repeat(majority, block, axis=0), block, axis=1)
    return full[:h, :w].astype(label.dtype, copy=False)


def class_map_name(set_name: str) -> str:
    """The product's class map of a NASA set (configs/data/*.yaml): "super" or "ebc"."""
    low = set_name.lower()
    if low.startswith("super"):
        return "super"
    if low.startswith("ebc"):
        return "ebc"
    raise ValueError(f"no class map known for set {set_name!r} (Super* or EBC*)")


def load_masks(root: Path, class_map) -> list[np.ndarray]:
    """Class-index maps of every test mask of a NASA-layout set, read as the product reads them."""
    from pretrain.io import read_raw
    from segment.pairs import find_pairs

    return [class_map.encode(read_raw(m), m) for _, m in find_pairs(root, "test")]


def score(masks: list[np.ndarray], block: int, class_names: list[str]) -> dict:
    """``segment.metrics.aggregate`` of the block-majority maps against the truth."""
    from segment.metrics import aggregate, confusion_matrix

    k = len(class_names)
    cms = [confusion_matrix(block_majority(m, block, k), m, k) for m in masks]
    return aggregate(cms, class_names)


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| set | images | block (px) | NASA IoU | per-class IoU | mIoU |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        per_class = ", ".join(f"{n} {_pct(v)}" for n, v in zip(r["class_names"], r["iou_per_class"]))
        lines.append(f"| {r['set']} | {r['n_images']} | {r['block']} | {_pct(r['nasa_iou_mean'])} | "
                     f"{per_class} | {_pct(r['miou'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="NASA set names (Super*, EBC*)")
    ap.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 4, 8], help="block sizes in px")
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("MSEG_DATA", REPO.parent / "shared" / "data")) / "nasa",
                    help="folder holding the NASA sets (default $MSEG_DATA/nasa or ../shared/data/nasa)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "output_granularity.md")
    args = ap.parse_args(argv)

    from pretrain.outputs import atomic_write_text
    from segment.class_maps import get_class_map

    t0 = time.time()
    rows = []
    for set_name in args.sets:
        class_map = get_class_map(class_map_name(set_name))
        masks = load_masks(args.data / set_name, class_map)
        for block in args.blocks:
            r = score(masks, block, list(class_map.names))
            if block == 1 and r["nasa_iou_mean"] != 1.0:
                raise AssertionError(f"{set_name}: block 1 must score exactly 100 %, got {r['nasa_iou_mean']}")
            rows.append({"set": set_name, "block": block, "class_names": list(class_map.names), **r})
    text = table(rows)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    footer = (f"\nBlock-majority oracle (ties -> lowest class index, partial edge blocks counted on their own "
              f"pixels); {time.time() - t0:.1f} s, load average {load}.")
    print(text + footer, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text + "\n" + footer + "\n")
    return rows


if __name__ == "__main__":
    main()
