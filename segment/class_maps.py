"""Class maps: how a mask file's raw pixels (colour overlay or index values) become uint8 class indices.

:class:`ClassMap` turns a mask file's raw pixels into class indices 0..K-1 (:meth:`ClassMap.encode`);
:func:`get_class_map` gives a preset by name (:data:`CLASS_MAPS`) or a user's map from a dict; a mask
that does not fit its map is a :class:`MaskError` naming the file.
"""
from __future__ import annotations

import logging
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.io import PathLike

__all__ = [
    "CLASS_MAPS",
    "ClassMap",
    "UNKNOWN_COLOUR_MAX_SHARE",
    "MaskError",
    "MaskKind",
    "get_class_map",
]

logger = logging.getLogger(__name__)

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
