"""Pairing images with masks in a folder layout, and choosing the training pairs.

Folder layouts (:func:`find_pairs`):

* ``nasa``: ``ROOT/<split>/`` + ``ROOT/<split>_annot/``; the mask of ``X.<ext>`` is ``X_mask.<ext2>``
  (NASA Super) or ``X.<ext2>`` (NASA EBC), any supported suffix.
* ``plain``: ``ROOT/images/`` + ``ROOT/masks/``, either with split subfolders
  (``images/<split>/`` + ``masks/<split>/``, nested subfolders mirrored) or flat, where the images
  lie directly in ``images/`` and split ``"train"`` means all of them.

:func:`few_shot` and :func:`select_by_name` pick the training pairs.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pretrain.io import IMAGE_SUFFIXES, PathLike, list_images

__all__ = [
    "Pair",
    "few_shot",
    "find_pairs",
    "select_by_name",
]

logger = logging.getLogger(__name__)

Pair = tuple[Path, Path]

_TOP = 5  # images without a mask / masks without an image listed in a message

_LAYOUTS = ("auto", "nasa", "plain")
_MASK_SUFFIXES = ("_mask", "")  # mask stems tried for image stem X: X_mask, then X


def find_pairs(root: PathLike, split: str, layout: str = "auto", *,
               unpaired: list[Path] | None = None) -> list[Pair]:
    """Sorted (image, mask) pairs of one split; see the module docstring for the layouts.

    ``layout="auto"`` picks ``plain`` when ``ROOT/images`` and ``ROOT/masks`` exist, else ``nasa``.
    The mask of image stem ``X`` is ``X_mask.*`` or ``X.*`` (any supported suffix, same relative
    subfolder). Raises FileNotFoundError for missing folders or images without a mask, unless
    ``unpaired`` is a list: then images without a mask are appended to it (and logged), so that
    evaluation can score the others and report these. Masks without an image are logged as a warning.
    """
    root = Path(root)
    if layout not in _LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {_LAYOUTS}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder not found{_parent_listing(root)}")
    if layout == "auto":
        layout = "plain" if (root / "images").is_dir() and (root / "masks").is_dir() else "nasa"
    if layout == "nasa":
        image_dir, mask_dir, recursive = root / split, root / f"{split}_annot", True
        for folder in (image_dir, mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder}: folder not found (NASA layout: {split}/ and {split}_annot/; "
                    f"or images/ and masks/ for the plain layout); {root} holds: {_listing(root)}")
    else:
        image_dir, mask_dir, recursive = _plain_dirs(root, split)
    images = list_images(image_dir, recursive=recursive)
    if not images:
        raise FileNotFoundError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); "
                                f"it holds: {_listing(image_dir)}")
    by_key: dict[tuple[str, str], list[Path]] = {}
    for mask in list_images(mask_dir, recursive=recursive):
        by_key.setdefault((mask.parent.relative_to(mask_dir).as_posix(), mask.stem), []).append(mask)
    pairs: list[Pair] = []
    missing: list[Path] = []
    used: set[Path] = set()
    for image in images:
        rel = image.parent.relative_to(image_dir).as_posix()
        found = [by_key[(rel, image.stem + s)] for s in _MASK_SUFFIXES if (rel, image.stem + s) in by_key]
        if not found:
            missing.append(image)
            continue
        if len(found[0]) > 1:
            raise FileNotFoundError(f"{image}: several masks match, keep one: "
                                    f"{', '.join(str(m) for m in found[0])}")
        pairs.append((image, found[0][0]))
        used.add(found[0][0])
    if missing:
        suffixes = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        listed = "; ".join(
            f"{m} (looked for {mask_dir / m.parent.relative_to(image_dir) / m.stem}"
            f"{{_mask,}}.{{{suffixes}}})" for m in missing[:_TOP])
        more = f"; and {len(missing) - _TOP} more" if len(missing) > _TOP else ""
        message = f"{len(missing)} of {len(images)} images in {image_dir} have no mask: {listed}{more}"
        if unpaired is None:
            raise FileNotFoundError(message)
        logger.error("%s", message)
        unpaired.extend(missing)
    orphans = [m for masks in by_key.values() for m in masks if m not in used]
    if orphans:
        logger.warning("%d masks in %s have no image (ignored): %s%s", len(orphans), mask_dir,
                       ", ".join(m.name for m in sorted(orphans)[:_TOP]),
                       " ..." if len(orphans) > _TOP else "")
    logger.info("%s split %r: %d image/mask pairs", root, split, len(pairs))
    return pairs


def _plain_dirs(root: Path, split: str) -> tuple[Path, Path, bool]:
    """(image folder, mask folder, recursive) of the plain layout."""
    images, masks = root / "images", root / "masks"
    for folder in (images, masks):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found (plain layout: images/ and masks/); "
                                    f"{root} holds: {_listing(root)}")
    if (images / split).is_dir():
        if not (masks / split).is_dir():
            raise FileNotFoundError(f"{masks / split}: folder not found for split {split!r}; "
                                    f"{masks} holds: {_listing(masks)}")
        return images / split, masks / split, True
    if split == "train" and list_images(images, recursive=False):
        return images, masks, False  # flat layout: everything is training data
    subfolders = sorted(p.name for p in images.iterdir() if p.is_dir())
    raise FileNotFoundError(
        f"{images / split}: split folder not found; {images} has split folders {subfolders}"
        + (" (a flat images/ folder only provides split 'train')" if not subfolders else ""))


def _listing(folder: Path, limit: int = 12) -> str:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return f"(cannot list: {exc})"
    if not entries:
        return "(empty)"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    return ", ".join(names) + (f", ... ({len(entries)} entries)" if len(entries) > limit else "")


def _parent_listing(path: Path) -> str:
    parent = path.parent
    return f"; {parent} holds: {_listing(parent)}" if parent.is_dir() else ""


def few_shot(pairs: Sequence[Pair], n: int | None, seed: int = 0) -> list[Pair]:
    """``n`` pairs chosen at random but reproducibly (``n=None``: all), sorted by image path.

    Selections are nested: for one seed, the n-pair choice contains the (n-1)-pair choice, and the
    result does not depend on the input order.
    """
    ordered = sorted(pairs, key=lambda p: (str(p[0]), str(p[1])))
    if n is None:
        return ordered
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"few_shot: n must be a positive integer or None, got {n!r}")
    if n > len(ordered):
        raise ValueError(f"few_shot: asked for {n} pairs but only {len(ordered)} are available")
    order = np.random.default_rng(seed).permutation(len(ordered))[:n]
    return [ordered[i] for i in sorted(order)]


def select_by_name(pairs: Sequence[Pair], names: Iterable[str]) -> list[Pair]:
    """The pairs whose image file name (``a.tif``) or stem (``a``) is in ``names``, in that order."""
    by_name: dict[str, list[Pair]] = {}
    for pair in pairs:
        by_name.setdefault(pair[0].name, []).append(pair)
        if pair[0].stem != pair[0].name:
            by_name.setdefault(pair[0].stem, []).append(pair)
    chosen: list[Pair] = []
    for name in dict.fromkeys(str(n) for n in names):
        matches = by_name.get(name, [])
        if not matches:
            available = sorted(p[0].name for p in pairs)
            raise ValueError(f"select_by_name: no image named {name!r}; available: "
                             f"{', '.join(available[:20])}{' ...' if len(available) > 20 else ''}")
        if len(matches) > 1:
            raise ValueError(f"select_by_name: {name!r} is ambiguous: "
                             f"{', '.join(str(p[0]) for p in matches)}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    if not chosen:
        raise ValueError("select_by_name: no names given")
    return chosen
