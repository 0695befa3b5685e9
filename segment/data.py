"""Segmentation data: class maps, image/mask pairing, joint augmentation and the training dataset.

Files flow one way: :func:`find_pairs` pairs images with masks in a folder layout,
:class:`ClassMap` turns a mask file's raw pixels (colour overlay or index values) into uint8 class
indices, and :class:`SegmentationDataset` serves normalised image tensors with long masks, cropped
and augmented by an albumentations pipeline from :func:`train_transform`.

Folder layouts (``find_pairs``):

* ``nasa``: ``ROOT/<split>/`` + ``ROOT/<split>_annot/``; the mask of ``X.<ext>`` is ``X_mask.<ext2>``
  (NASA Super) or ``X.<ext2>`` (NASA EBC), any supported suffix.
* ``plain``: ``ROOT/images/`` + ``ROOT/masks/``, either with split subfolders
  (``images/<split>/`` + ``masks/<split>/``, nested subfolders mirrored) or flat, where the images
  lie directly in ``images/`` and split ``"train"`` means all of them.
"""
from __future__ import annotations

import logging
import math
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from pretrain.intensity import canonical_intensity, check_not_constant, scale_intensity
from pretrain.io import IMAGE_SUFFIXES, list_images, read_micrograph, read_raw
from segment.zoom import check_zoom, resize_image, resize_labels, zoomed_hw

__all__ = [
    "CLASS_MAPS",
    "ClassMap",
    "UNKNOWN_COLOUR_MAX_SHARE",
    "MaskError",
    "MaskKind",
    "MicrographCLAHE",
    "Pair",
    "SegmentationDataset",
    "Strength",
    "eval_transform",
    "few_shot",
    "find_pairs",
    "get_class_map",
    "select_by_name",
    "train_transform",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Pair = tuple[Path, Path]
RGB = tuple[int, int, int]

_MAX_CLASSES = 255  # uint8 labels; 255 is kept free as the "unmatched" sentinel while encoding
_TOP = 5  # unknown values/colours listed in a MaskError
UNKNOWN_COLOUR_MAX_SHARE = 0.001
"""Colour masks with a ``default`` class: the largest share of pixels (0.1 %) whose colour is neither a
class colour nor gray (R = G = B, the image under an overlay) that is read as the default class
with a warning (stray antialiasing, a few lossy pixels); a larger share is a :class:`MaskError`
naming the file (a lossy export's near-blue, an annotation in another colour)."""
# Okabe-Ito colour-blind-safe palette for classes without a colour of their own.
_PALETTE: tuple[RGB, ...] = (
    (0, 0, 0), (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167),
    (86, 180, 233), (213, 94, 0), (240, 228, 66), (128, 128, 128), (255, 255, 255),
)


# --- class maps ----------------------------------------------------------------------------------


class MaskKind(str, Enum):
    """How a mask file stores classes: RGB(A) colours or integer values."""

    COLOR = "color"
    INDEX = "index"


class MaskError(ValueError):
    """A mask's pixels do not fit its class map; the message names the file and the problem."""

    def __init__(self, path: PathLike | None, reason: str) -> None:
        self.path = Path(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path if self.path is not None else '<mask array>'}: {reason}")


@dataclass(frozen=True)
class ClassMap:
    """How the raw pixels of mask files map to class indices 0..K-1.

    ``kind="color"``: ``colors[k]`` is class k's RGB colour in 8-bit units (16-bit masks are
    compared at 257x, so 255 reads as 65535); a class with colour None takes no colour of its own.
    ``kind="index"``: ``values[k]`` lists the raw values of class k (``[1, 2]`` merges two labels).
    ``default`` is the class of every pixel that matches no class (e.g. NASA Super's matrix, where
    the overlay keeps the gray image underneath); without it such pixels are a :class:`MaskError`.
    For colour masks ``default`` covers gray pixels (R = G = B); other colours that are no class
    colour are logged with their pixel counts, and are a :class:`MaskError` above
    :data:`UNKNOWN_COLOUR_MAX_SHARE` of the mask.
    ``palette`` optionally sets the display colour per class (see :attr:`overlay_colors`).
    Alpha channels of colour masks are ignored.
    """

    names: list[str]
    kind: MaskKind | str
    colors: list[RGB | None] | None = None
    default: int | None = None
    values: list[list[int]] | None = None
    palette: list[RGB] | None = None

    def __post_init__(self) -> None:
        names = [str(n) for n in _as_list(self.names, "names")]
        if not names:
            raise ValueError("class map: 'names' is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"class map: duplicate class names in {names}")
        if len(names) > _MAX_CLASSES:
            raise ValueError(f"class map: {len(names)} classes, at most {_MAX_CLASSES} fit uint8 labels")
        try:
            kind = MaskKind(self.kind.value if isinstance(self.kind, MaskKind) else str(self.kind).lower())
        except ValueError:
            raise ValueError(f"class map: kind {self.kind!r} is not one of "
                             f"{[k.value for k in MaskKind]}") from None
        k = len(names)
        default = self.default
        if default is not None:
            if not _is_int(default) or not 0 <= default < k:
                raise ValueError(f"class map: default {default!r} is not a class index 0..{k - 1}")
            default = int(default)
        colors: list[RGB | None] | None = None
        values: list[list[int]] | None = None
        if kind is MaskKind.COLOR:
            if self.values is not None:
                raise ValueError("class map: 'values' belong to kind 'index', not 'color'")
            raw_colors = _as_list(self.colors, "colors") if self.colors is not None else []
            if len(raw_colors) != k:
                raise ValueError(f"class map: {len(raw_colors)} colours for {k} classes {names}")
            colors = [None if c is None else _rgb(c, f"colour of class {names[i]!r}")
                      for i, c in enumerate(raw_colors)]
            used = [c for c in colors if c is not None]
            if len(set(used)) != len(used):
                raise ValueError(f"class map: the same colour is given to two classes: {colors}")
            colorless = [names[i] for i, c in enumerate(colors) if c is None and i != default]
            if colorless:
                raise ValueError(f"class map: classes {colorless} have no colour and are not the default")
        else:
            if self.colors is not None:
                raise ValueError("class map: 'colors' belong to kind 'color', not 'index'")
            raw_values = _as_list(self.values, "values") if self.values is not None else []
            if len(raw_values) != k:
                raise ValueError(f"class map: {len(raw_values)} value lists for {k} classes {names}")
            values = [_int_list(v, f"values of class {names[i]!r}") for i, v in enumerate(raw_values)]
            seen: dict[int, str] = {}
            for name, vals in zip(names, values):
                if not vals and names.index(name) != default:
                    raise ValueError(f"class map: class {name!r} has no values and is not the default")
                for v in vals:
                    if v in seen:
                        raise ValueError(f"class map: value {v} is given to {seen[v]!r} and {name!r}")
                    seen[v] = name
        palette = None
        if self.palette is not None:
            palette = [_rgb(c, "palette colour") for c in _as_list(self.palette, "palette")]
            if len(palette) != k:
                raise ValueError(f"class map: {len(palette)} palette colours for {k} classes")
        for attr, value in (("names", names), ("kind", kind), ("colors", colors),
                            ("default", default), ("values", values), ("palette", palette)):
            object.__setattr__(self, attr, value)

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.names)

    @property
    def overlay_colors(self) -> list[RGB]:
        """One display RGB per class: the palette, else the class colour, else a distinct colour."""
        if self.palette is not None:
            return list(self.palette)
        own = list(self.colors) if self.colors is not None else [None] * self.num_classes
        spare = iter([c for c in _PALETTE if c not in own] * (self.num_classes // len(_PALETTE) + 1))
        return [c if c is not None else next(spare) for c in own]

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-friendly form; ``get_class_map(cm.to_dict()) == cm``."""
        out: dict[str, Any] = {"names": list(self.names), "kind": MaskKind(self.kind).value}
        if self.colors is not None:
            out["colors"] = [None if c is None else list(c) for c in self.colors]
        if self.values is not None:
            out["values"] = [list(v) for v in self.values]
        if self.default is not None:
            out["default"] = self.default
        if self.palette is not None:
            out["palette"] = [list(c) for c in self.palette]
        return out

    def encode(self, raw: np.ndarray, path: PathLike | None = None) -> np.ndarray:
        """Class indices (uint8 HxW) of a mask's raw pixels (as ``pretrain.io.read_raw`` gives them).

        ``path`` only names the file in errors. Raises :class:`MaskError` for pixels outside the
        map (listing the most frequent unknown values/colours with their pixel counts) and for
        arrays of the wrong shape or type.
        """
        raw = np.asarray(raw)
        if raw.dtype == bool:
            raw = raw.astype(np.uint8)
        if not np.issubdtype(raw.dtype, np.integer):
            raise MaskError(path, f"mask pixels must be integers, got {raw.dtype} "
                                  f"(class map {self._describe()})")
        if self.kind is MaskKind.COLOR:
            return self._encode_color(raw, path)
        return self._encode_index(raw, path)

    # -- encoding internals

    def _describe(self) -> str:
        if self.kind is MaskKind.COLOR:
            assert self.colors is not None
            parts = [f"{n}={'other' if c is None else c}" for n, c in zip(self.names, self.colors)]
        else:
            assert self.values is not None
            parts = [f"{n}={v if len(v) != 1 else v[0]}" for n, v in zip(self.names, self.values)]
        return "{" + ", ".join(parts) + "}"

    def _encode_color(self, raw: np.ndarray, path: PathLike | None) -> np.ndarray:
        assert self.colors is not None
        if raw.ndim != 3 or raw.shape[-1] not in (3, 4):
            raise MaskError(path, f"a colour class map needs an RGB or RGBA mask, got shape "
                                  f"{raw.shape} (an index mask? use kind 'index')")
        if raw.dtype not in (np.uint8, np.uint16):
            raise MaskError(path, f"colour masks must be 8- or 16-bit, got {raw.dtype}")
        scale = np.iinfo(raw.dtype).max // 255  # 1 for uint8, 257 for uint16 (255 -> 65535)
        keys = _rgb_keys(raw)
        fill = self.default if self.default is not None else 0
        out = np.full(raw.shape[:2], fill, dtype=np.uint8)
        matched = np.zeros(raw.shape[:2], dtype=bool)
        for k, color in enumerate(self.colors):
            if color is None:
                continue
            hit = keys == _rgb_key(tuple(c * scale for c in color))
            out[hit] = k
            matched |= hit
        if self.default is not None:  # gray is the image under an overlay: the default class
            matched |= (raw[..., 0] == raw[..., 1]) & (raw[..., 1] == raw[..., 2])
        if not matched.all():
            unknown, counts = np.unique(keys[~matched], return_counts=True)
            listed = [(_rgb_from_key(int(key)), int(n)) for key, n in _top(unknown, counts)]
            unit = " (16-bit: 65535 = 255)" if scale > 1 else ""
            n_bad = int((~matched).sum())
            if self.default is None:
                raise MaskError(path, self._unknown_message(n_bad, out.size, len(unknown), listed, "colour", unit))
            self._stray_colours(path, n_bad, out.size, len(unknown), listed, unit)
        return out

    def _encode_index(self, raw: np.ndarray, path: PathLike | None) -> np.ndarray:
        assert self.values is not None
        if raw.ndim == 3:
            if raw.shape[-1] == 1:
                raw = raw[..., 0]
            elif raw.shape[-1] in (3, 4) and (np.array_equal(raw[..., 0], raw[..., 1])
                                               and np.array_equal(raw[..., 0], raw[..., 2])):
                raw = raw[..., 0]  # index values saved as gray RGB(A)
            else:
                raise MaskError(path, f"an index class map needs a single-channel mask, got shape "
                                      f"{raw.shape} with differing colour channels "
                                      f"(a colour overlay? use kind 'color')")
        if raw.ndim != 2:
            raise MaskError(path, f"expected an HxW mask, got shape {raw.shape}")
        sentinel = _MAX_CLASSES
        if raw.dtype in (np.uint8, np.uint16):
            lut = np.full(np.iinfo(raw.dtype).max + 1, sentinel, dtype=np.uint8)
            for k, vals in enumerate(self.values):
                lut[[v for v in vals if 0 <= v < lut.size]] = k
            out = lut[raw]
        else:
            uniq, inverse = np.unique(raw, return_inverse=True)
            lookup = {v: k for k, vals in enumerate(self.values) for v in vals}
            classes = np.array([lookup.get(int(v), sentinel) for v in uniq], dtype=np.uint8)
            out = classes[inverse.reshape(raw.shape)]
        bad = out == sentinel
        if bad.any():
            if self.default is not None:
                out[bad] = self.default
            else:
                unknown, counts = np.unique(raw[bad], return_counts=True)
                listed = [(int(v), int(n)) for v, n in _top(unknown, counts)]
                raise MaskError(path, self._unknown_message(
                    int(bad.sum()), out.size, len(unknown), listed, "value", ""))
        return out

    def _stray_colours(self, path: PathLike | None, n_bad: int, total: int, n_unknown: int,
                       listed: list[tuple[Any, int]], unit: str) -> None:
        """Report non-gray colours outside the map that were read as the default class: a
        warning up to :data:`UNKNOWN_COLOUR_MAX_SHARE` of the pixels, else a MaskError."""
        assert self.default is not None
        shown = ", ".join(f"{v} x {n} px" for v, n in listed)
        more = f", and {n_unknown - len(listed)} more colours" if n_unknown > len(listed) else ""
        what = (f"{n_bad} of {total} pixels ({n_bad / total:.3%}) have colours that are neither a class "
                f"colour {self._describe()} nor gray (R = G = B): {shown}{more}{unit}")
        default = self.names[self.default]
        if n_bad > UNKNOWN_COLOUR_MAX_SHARE * total:
            raise MaskError(path, f"{what}. More than {UNKNOWN_COLOUR_MAX_SHARE:.1%} of the mask: a lossy "
                                  f"export or an annotation in another colour? Fix the mask or give the "
                                  f"colour to a class; only gray pixels are read as {default!r}")
        logger.warning("%s: %s; read as %r (under %.1f%% of the mask)", path if path is not None else
                       "<mask array>", what, default, 100 * UNKNOWN_COLOUR_MAX_SHARE)

    def _unknown_message(self, n_bad: int, total: int, n_unknown: int,
                         listed: list[tuple[Any, int]], what: str, unit: str) -> str:
        shown = ", ".join(f"{v} x {n} px" for v, n in listed)
        more = f", and {n_unknown - len(listed)} more {what}s" if n_unknown > len(listed) else ""
        return (f"{n_bad} of {total} pixels have {what}s outside the class map {self._describe()}: "
                f"{shown}{more}{unit}. Add them to a class, or set 'default' to the class of all "
                f"other pixels")


def _as_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"class map: {what} must be a list, got {value!r}")
    return list(value)


def _rgb(value: Any, what: str) -> RGB:
    """An RGB triple from (r, g, b) or '#rrggbb', validated to 0..255."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) != 6:
            raise ValueError(f"class map: {what} {value!r} is not '#rrggbb'")
        try:
            return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
        except ValueError:
            raise ValueError(f"class map: {what} {value!r} is not '#rrggbb'") from None
    items = _as_list(value, what)
    if len(items) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in items):
        raise ValueError(f"class map: {what} {value!r} must be three integers 0..255 (RGB, 8-bit units)")
    return int(items[0]), int(items[1]), int(items[2])


def _int_list(value: Any, what: str) -> list[int]:
    items = [value] if _is_int(value) else _as_list(value, what)
    if not all(_is_int(v) for v in items):
        raise ValueError(f"class map: {what} {value!r} must be integers")
    return [int(v) for v in items]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _rgb_keys(raw: np.ndarray) -> np.ndarray:
    """One int64 per pixel packing its (r, g, b) in 16-bit fields."""
    r, g, b = (raw[..., i].astype(np.int64) for i in range(3))
    return (r << 32) | (g << 16) | b


def _rgb_key(rgb: tuple[int, ...]) -> int:
    return (rgb[0] << 32) | (rgb[1] << 16) | rgb[2]


def _rgb_from_key(key: int) -> RGB:
    return (key >> 32) & 0xFFFF, (key >> 16) & 0xFFFF, key & 0xFFFF


def _top(values: np.ndarray, counts: np.ndarray) -> list[tuple[Any, int]]:
    order = np.argsort(-counts, kind="stable")[:_TOP]
    return [(values[i], int(counts[i])) for i in order]


CLASS_MAPS: Mapping[str, ClassMap] = types.MappingProxyType({
    # NASA Super: overlay on the gray image, in RGB (NASA's BGR table reads the other way round).
    "super": ClassMap(["matrix", "secondary", "tertiary"], MaskKind.COLOR,
                      colors=[None, (0, 0, 255), (255, 0, 0)], default=0),
    "ebc": ClassMap(["background", "oxide", "crack"], MaskKind.INDEX, values=[[0], [1], [2]]),
    "ebc_oxide": ClassMap(["background", "oxide"], MaskKind.INDEX, values=[[0], [1, 2]]),
    "binary": ClassMap(["background", "foreground"], MaskKind.INDEX, values=[[0], [1, 255]]),
})
"""Preset class maps by name."""

_CLASS_MAP_KEYS = ("names", "kind", "colors", "default", "values", "palette")


def get_class_map(spec: str | Mapping[str, Any] | ClassMap) -> ClassMap:
    """A preset by name (see :data:`CLASS_MAPS`), or a user's map from a dict (e.g. Hydra config).

    Dict keys are :class:`ClassMap`'s fields; ``kind`` may be left out when ``colors`` or
    ``values`` says it. Example: ``{"names": ["bg", "pore"], "values": [[0], [1, 2]]}``.
    """
    if isinstance(spec, ClassMap):
        return spec
    if isinstance(spec, str):
        try:
            return CLASS_MAPS[spec.strip().lower()]
        except KeyError:
            raise ValueError(f"unknown class map {spec!r}; presets: {', '.join(CLASS_MAPS)} "
                             f"(or give a dict with {', '.join(_CLASS_MAP_KEYS)})") from None
    if isinstance(spec, Mapping):
        fields = {str(key): value for key, value in spec.items()}
        unknown = sorted(set(fields) - set(_CLASS_MAP_KEYS))
        if unknown:
            raise ValueError(f"class map: unknown keys {unknown}; allowed: {', '.join(_CLASS_MAP_KEYS)}")
        if "names" not in fields:
            raise ValueError("class map: 'names' is required")
        if fields.get("kind") is None:
            if fields.get("colors") is not None:
                fields["kind"] = MaskKind.COLOR
            elif fields.get("values") is not None:
                fields["kind"] = MaskKind.INDEX
            else:
                raise ValueError("class map: give 'kind' ('color' or 'index') with 'colors' or 'values'")
        return ClassMap(**fields)
    raise TypeError(f"class map must be a preset name, a dict or a ClassMap, got {type(spec).__name__}")


# --- pairing -------------------------------------------------------------------------------------


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


# --- augmentation --------------------------------------------------------------------------------


class Strength(str, Enum):
    """Augmentation strengths of :func:`train_transform`."""

    NONE = "none"  # random crop (padded if the image is smaller)
    LIGHT = "light"  # + flips and 90-degree rotations: lossless, no resampling or intensity change
    DEFAULT = "default"  # + random zoom and micrograph intensity changes (NASA's recipe, milder)


class MicrographCLAHE(A.CLAHE):
    """CLAHE that keeps the levels of float images with a narrow or 16-bit intensity range.

    albumentations 2.0.8 runs CLAHE on float32 by rounding ``image * 255`` to uint8, which reduces
    e.g. a 16-bit image spanning 1000..3000 to ~10 gray levels. This variant first stretches the
    image to its own min..max, so the 8-bit view has 256 levels; the output (float32 in [0, 1]) is
    CLAHE's, as for a full-range 8-bit image, for which it equals ``A.CLAHE`` exactly.
    """

    def apply(self, img: np.ndarray, clip_limit: float, **params: Any) -> np.ndarray:
        if img.dtype == np.uint8:
            return super().apply(img, clip_limit, **params)
        lo, hi = float(img.min()), float(img.max())
        if hi - lo < 1e-6:
            return img
        view = np.rint((img - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return super().apply(view, clip_limit, **params).astype(np.float32) / np.float32(255.0)


def train_transform(crop_size: int, *, scale: tuple[float, float] = (0.75, 1.33),
                    strength: Strength | str = Strength.DEFAULT, seed: int | None = None) -> A.Compose:
    """Joint image/mask augmentation yielding ``crop_size`` squares.

    Input: a float32 image in [0, 1] (HxW or HxWx1) and a uint8 HxW mask. ``scale`` is the range of
    zoom factors of the ``default`` strength (>1 magnifies): a square of side ``crop_size / s`` is
    cropped and resized to ``crop_size``. Images smaller than the crop are reflect-padded (image and
    mask alike, so labels stay valid). Masks are only ever resampled with nearest neighbour, the
    pixel-centre aligned kind (``cv2.INTER_NEAREST_EXACT``): OpenCV's plain ``INTER_NEAREST`` is
    offset from the image's linear/area resampling and shifts labels by up to a pixel.
    ``seed`` fixes the transform's generator (:class:`SegmentationDataset` reseeds it per
    DataLoader worker).
    """
    if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
        raise ValueError(f"train_transform: crop_size must be a positive integer, got {crop_size!r}")
    try:
        strength = Strength(strength.value if isinstance(strength, Strength) else str(strength).lower())
    except ValueError:
        raise ValueError(f"train_transform: strength {strength!r} is not one of "
                         f"{[s.value for s in Strength]}") from None
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"train_transform: scale must be (min, max) with 0 < min <= max, got {scale}")
    size = int(crop_size)
    reflect = cv2.BORDER_REFLECT_101
    ops: list[Any]
    if strength is Strength.DEFAULT:
        largest = max(size, math.ceil(size / lo))
        smallest = max(1, min(largest, round(size / hi)))
        ops = [
            A.PadIfNeeded(min_height=largest, min_width=largest, border_mode=reflect, p=1.0),
            A.RandomSizedCrop(min_max_height=(smallest, largest), size=(size, size),
                              interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST_EXACT,
                              area_for_downscale="image", p=1.0),
        ]
    else:
        ops = [A.PadIfNeeded(min_height=size, min_width=size, border_mode=reflect, p=1.0),
               A.RandomCrop(height=size, width=size, p=1.0)]
    if strength is not Strength.NONE:
        ops.append(A.D4(p=1.0))
    if strength is Strength.DEFAULT:
        ops += [
            A.GaussNoise(std_range=(0.01, 0.04), p=0.25),
            A.OneOf([
                MicrographCLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=1.0),
                A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=1.0),
                A.RandomGamma(gamma_limit=(80, 125), p=1.0),
            ], p=0.6),
            A.OneOf([
                A.Sharpen(alpha=(0.1, 0.3), lightness=(1.0, 1.0), p=1.0),
                A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.0), p=1.0),
            ], p=0.3),
        ]
    return A.Compose(ops, mask_interpolation=cv2.INTER_NEAREST_EXACT, seed=seed)


def eval_transform() -> A.Compose:
    """Identity: evaluation sees whole images (tiling happens in ``segment.infer``)."""
    return A.Compose([], mask_interpolation=cv2.INTER_NEAREST_EXACT)


# --- dataset -------------------------------------------------------------------------------------


class SegmentationDataset(Dataset[dict[str, Any]]):
    """Image/mask pairs as ``{"image": float C x H x W, "mask": long H x W, "index": int}``.

    Images are read as gray, scaled to [0, 1] with ``pretrain.intensity.scale_intensity`` in mode
    ``intensity`` (``"percentile"``: per-image 0.5/99.5 percentile stretch, as pretraining;
    ``"dtype"``: divided by the dtype's maximum; NaN/Inf pixels or a constant image are a
    ``pretrain.io.ImageContentError`` naming the file, when the pair is loaded), augmented jointly
    with their encoded masks by ``transform`` (an albumentations pipeline, or any callable taking
    ``image=``, ``mask=`` and returning a dict of both), repeated to ``in_chans`` channels and
    normalised with ``mean``/``std``. With ``cache`` every pair is loaded and checked once, up
    front (data sets are small; forked workers share the arrays). ``samples_per_epoch`` sets
    ``len()`` so that a few images give many random crops; item ``i`` uses pair
    ``i % len(pairs)``, which is the returned ``index``. With ``zoom != 1`` every pair is resized
    by ``zoom`` when loaded (:mod:`segment.zoom`: area/bilinear image, nearest-neighbour mask), so
    crops are taken on the model's grid; validation sets keep ``zoom=1`` (the Predictor zooms).
    """

    def __init__(self, pairs: Sequence[Pair], class_map: ClassMap | str | Mapping[str, Any], *,
                 in_chans: int = 1, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,),
                 transform: Callable[..., dict[str, Any]] | None = None, cache: bool = True,
                 samples_per_epoch: int | None = None, intensity: str = "percentile",
                 zoom: float = 1.0) -> None:
        try:
            self.intensity = canonical_intensity(intensity)
            self.zoom = check_zoom(zoom)
        except ValueError as e:
            raise ValueError(f"SegmentationDataset: {e}") from None
        self.pairs: list[Pair] = [(Path(i), Path(m)) for i, m in pairs]
        if not self.pairs:
            raise ValueError("SegmentationDataset: no image/mask pairs given")
        self.class_map = get_class_map(class_map)
        if in_chans not in (1, 3):
            raise ValueError(f"SegmentationDataset: in_chans must be 1 or 3, got {in_chans!r}")
        self.in_chans = in_chans
        self.mean = _channel_stats(mean, in_chans, "mean")
        self.std = _channel_stats(std, in_chans, "std")
        if (self.std <= 0).any():
            raise ValueError(f"SegmentationDataset: std must be positive, got {list(std)}")
        if samples_per_epoch is not None and (isinstance(samples_per_epoch, bool) or samples_per_epoch < 1):
            raise ValueError("SegmentationDataset: samples_per_epoch must be >= 1, "
                             f"got {samples_per_epoch!r}")
        self.samples_per_epoch = samples_per_epoch
        self.transform = transform
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._seeded_worker: tuple[int, int] | None = None
        if cache:
            for i in range(len(self.pairs)):
                self.load(i)
            megabytes = sum(a.nbytes + b.nbytes for a, b in self._cache.values()) / 2**20
            logger.info("loaded %d image/mask pairs (%.1f MiB)", len(self.pairs), megabytes)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.pairs)

    def __getitem__(self, item: int) -> dict[str, Any]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} samples")
        index = item % len(self.pairs)
        image, label = self.load(index)
        if self.transform is not None:
            self._seed_transform()
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
            if image.ndim == 3:
                image = image[..., 0]
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        x = (x.unsqueeze(0).expand(self.in_chans, -1, -1) - self.mean) / self.std
        y = torch.from_numpy(np.asarray(label).astype(np.int64))
        return {"image": x, "mask": y, "index": index}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Full image (float32 HxW in [0, 1]) and class indices (uint8 HxW) of pair ``index``."""
        if index in self._cache:
            return self._cache[index]
        image_path, mask_path = self.pairs[index]
        raw = read_micrograph(image_path, gray=True).image
        image = scale_intensity(raw, self.intensity, path=image_path)  # NaN/Inf: error naming the file
        check_not_constant(raw, image_path)  # a blank frame teaches the model nothing
        del raw
        label = self.class_map.encode(read_raw(mask_path), mask_path)
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image and mask sizes differ: {image_path} is {image.shape[0]}x"
                             f"{image.shape[1]} but {mask_path} is {label.shape[0]}x{label.shape[1]} (HxW)")
        if self.zoom != 1.0:
            hw = zoomed_hw(image.shape[:2], self.zoom)
            image = resize_image(torch.from_numpy(image)[None], hw)[0].numpy()
            label = resize_labels(label, hw)
        if self.cache:
            self._cache[index] = (image, label)
        return image, label

    @property
    def paths(self) -> list[Path]:
        """Image paths, in pair order."""
        return [image for image, _ in self.pairs]

    @property
    def mask_paths(self) -> list[Path]:
        """Mask paths, in pair order."""
        return [mask for _, mask in self.pairs]

    @property
    def images(self) -> list[np.ndarray]:
        """Full images (float32 HxW in [0, 1], no transform), in pair order."""
        return [self.load(i)[0] for i in range(len(self.pairs))]

    @property
    def labels(self) -> list[np.ndarray]:
        """Full class-index masks (uint8 HxW, no transform), in pair order."""
        return [self.load(i)[1] for i in range(len(self.pairs))]

    def class_counts(self) -> np.ndarray:
        """Pixels per class (int64, length K) over all full masks."""
        counts = np.zeros(self.class_map.num_classes, dtype=np.int64)
        for label in self.labels:
            counts += np.bincount(label.ravel(), minlength=counts.size)[:counts.size]
        return counts

    def _seed_transform(self) -> None:
        """Give each DataLoader worker its own augmentation stream (albumentations keeps a
        generator per Compose, which forked workers would otherwise all copy)."""
        info = get_worker_info()
        if info is None or not hasattr(self.transform, "set_random_seed"):
            return
        key = (os.getpid(), info.seed)
        if self._seeded_worker != key:
            self.transform.set_random_seed(info.seed % 2**32)  # type: ignore[union-attr]
            self._seeded_worker = key


def _channel_stats(values: Sequence[float], in_chans: int, what: str) -> torch.Tensor:
    stats = [float(v) for v in values]
    if len(stats) == 1:
        stats *= in_chans
    if len(stats) != in_chans:
        raise ValueError(f"SegmentationDataset: {what} has {len(stats)} values for {in_chans} channels")
    return torch.tensor(stats, dtype=torch.float32).view(-1, 1, 1)
