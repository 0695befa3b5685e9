"""Synthetic SEM-like micrographs with exact labels: the project's embedded default data.

Writes the generated micrographs (:mod:`pretrain.synthetic_materials`, imaging model in
:mod:`pretrain.synthetic_imaging`) to disk: labeled sets in NASA's layout and unlabeled pretraining
corpora.

Run ``python -m pretrain.synthetic --kind superalloy --out DIR`` to write a NASA-layout set.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from pretrain.io import write_tiff
from pretrain.synthetic_imaging import TEST_SHIFT, Shift, Size
from pretrain.synthetic_materials import GENERATORS, PIXEL_SIZE_NM, Generator

__all__ = [
    "overlay_mask",
    "write_nasa_set",
    "write_unlabeled",
    "main",
]

logger = logging.getLogger(__name__)

_SPLITS = ("train", "val", "test", "different_test")


def overlay_mask(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """NASA Super mask: RGBA overlay of the gray ``image`` with pure blue (0, 0, 255) for class 1
    and pure red (255, 0, 0) for class 2; gray pixels (equal channels) never equal either."""
    if image.shape != label.shape or image.dtype != np.uint8:
        raise ValueError(f"need uint8 image and label of one shape, got {image.dtype} "
                         f"{image.shape} and {label.shape}")
    rgba = np.repeat(image[..., None], 4, axis=-1)
    rgba[..., 3] = 255
    rgba[label == 1, :3] = (0, 0, 255)
    rgba[label == 2, :3] = (255, 0, 0)
    return rgba


def _image_seed(seed: int, split: int, index: int) -> int:
    """Independent, reproducible per-image seed."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1)[0])


def write_nasa_set(root: str | Path, kind: str, *, n_train: int = 8, n_val: int = 2, n_test: int = 4,
                   n_shifted: int = 4, size: Size = (256, 256), seed: int = 0, shift: Shift = Shift(),
                   test_shift: Shift = TEST_SHIFT) -> Path:
    """Write a labeled set in the NASA layout and return ``root``.

    Folders: ``train/ val/ test/ different_test/`` each with an ``*_annot/`` twin; train/val/test
    use ``shift``, different_test uses ``test_shift``. Superalloy: ``X.tif`` + ``X_mask.tif``
    (RGBA colour overlay, as NASA's Super sets). Coating: image and index mask (0/1/2) share the
    file name, as NASA's EBC sets. Images are 8-bit TIFFs with the pixel size in their tags.
    """
    generator = _generator(kind)
    root = Path(root)
    counts = dict(zip(_SPLITS, (n_train, n_val, n_test, n_shifted)))
    for split_index, split in enumerate(_SPLITS):
        split_shift = test_shift if split == "different_test" else shift
        pixel_size = PIXEL_SIZE_NM[kind] / split_shift.magnification
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}_annot").mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            image, label = generator(size, _image_seed(seed, split_index, i), split_shift)
            name = f"{kind}_{split}_{i:03d}"
            write_tiff(root / split / f"{name}.tif", image, pixel_size_nm=pixel_size)
            if kind == "superalloy":
                write_tiff(root / f"{split}_annot" / f"{name}_mask.tif", overlay_mask(image, label))
            else:
                write_tiff(root / f"{split}_annot" / f"{name}.tif", label)
    logger.info("wrote %s set to %s (%s)", kind, root, counts)
    return root


def write_unlabeled(root: str | Path, n: int, size: Size = (256, 256), seed: int = 0,
                    kinds: Sequence[str] = ("superalloy", "coating"), *, vary: bool = True) -> Path:
    """Write ``n`` unlabeled images per kind to ``root/<kind>/`` (folder = material class) for
    pretraining corpora and k-NN probes. With ``vary`` each image gets a random mild imaging shift
    (contrast, brightness, noise, blur, drift, gamma, magnification) so the corpus is diverse."""
    root = Path(root)
    for kind in kinds:
        generator = _generator(kind)
        for i in range(n):
            image_seed = _image_seed(seed, 100 + list(GENERATORS).index(kind), i)
            shift = _random_shift(np.random.default_rng(image_seed + 1)) if vary else Shift()
            image, _ = generator(size, image_seed, shift)
            write_tiff(root / kind / f"{kind}_{i:05d}.tif", image,
                       pixel_size_nm=PIXEL_SIZE_NM[kind] / shift.magnification)
    logger.info("wrote %d unlabeled images per kind %s to %s", n, list(kinds), root)
    return root


def _random_shift(rng: np.random.Generator) -> Shift:
    """A mild random imaging shift for corpus diversity."""
    return Shift(contrast=rng.uniform(0.7, 1.3), brightness=rng.uniform(-0.08, 0.08),
                 magnification=rng.uniform(0.8, 1.25), noise=rng.uniform(0.5, 1.8),
                 blur=rng.uniform(0.6, 1.5), drift=rng.uniform(0.0, 1.5), gamma=rng.uniform(0.8, 1.25))


def _generator(kind: str) -> Generator:
    if kind not in GENERATORS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(GENERATORS)}")
    return GENERATORS[kind]


# --- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m pretrain.synthetic``: write a NASA-layout labeled set or an unlabeled corpus."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=[*GENERATORS, "all"], default="superalloy",
                        help="material; 'all' only with --unlabeled")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=4)
    parser.add_argument("--n-shifted", type=int, default=4, help="images in different_test/")
    parser.add_argument("--size", type=int, nargs="+", default=[256], metavar="PX",
                        help="image size: one value (square) or H W")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled", type=int, metavar="N",
                        help="write N unlabeled images per kind to OUT/<kind>/ instead of a labeled set")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one value or two (H W)")
    size = (args.size[0], args.size[-1])
    if args.unlabeled is not None:
        kinds = tuple(GENERATORS) if args.kind == "all" else (args.kind,)
        out = write_unlabeled(args.out, args.unlabeled, size, args.seed, kinds)
        print(f"wrote {args.unlabeled} unlabeled image(s) per kind {', '.join(kinds)} to {out}")
        return out
    if args.kind == "all":
        parser.error("--kind all needs --unlabeled")
    out = write_nasa_set(args.out, args.kind, n_train=args.n_train, n_val=args.n_val,
                         n_test=args.n_test, n_shifted=args.n_shifted, size=size, seed=args.seed)
    print(f"wrote {args.kind} set (NASA layout) to {out}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
