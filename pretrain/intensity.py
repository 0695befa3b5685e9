"""Intensity: how a micrograph's raw pixels become [0, 1] before the model's mean/std.

One mapping for pretraining, fine-tuning, evaluation and both predictors (``DataConfig.intensity``,
recorded in model.json / encoder.json): a per-image window from percentiles, mean/std (z-score) or
median/MAD, or the dtype's range. Streamed images get their window from a subsample
(:func:`intensity_sample_stride`). Pixels that cannot be used (NaN/Inf, one value everywhere) raise
:class:`~pretrain.io.ImageContentError` naming the file.
"""
from __future__ import annotations

import math
import os

import numpy as np

from pretrain.io import ImageContentError

__all__ = [
    "INTENSITY_MODES",
    "INTENSITY_PERCENTILES",
    "INTENSITY_SAMPLE_PIXELS",
    "INTENSITY_SPREADS",
    "canonical_intensity",
    "check_finite",
    "check_not_constant",
    "intensity_range",
    "intensity_sample_stride",
    "intensity_window",
    "parse_intensity",
    "scale_intensity",
    "to_float",
]

INTENSITY_MODES = ("percentile", "zscore", "robust", "dtype")
"""How :func:`scale_intensity` maps raw pixels to [0, 1] (``DataConfig.intensity``, model.json,
encoder.json): a per-image window from percentiles, mean/std or median/MAD, or the dtype's range."""
INTENSITY_SPREADS = 3.0
"""``"zscore"``/``"robust"``: the window is centre +- this many spreads (std, or 1.4826 MAD), so
the default model normalisation ``(x - 0.5) / 0.25`` gives ``2/3`` of a z-score, clipped at 3 spreads."""
INTENSITY_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Percentiles mapped to 0 and 1 by the ``"percentile"`` mode (pretrain records them in encoder.json
as ``"percentile_0.5_99.5"``)."""
INTENSITY_SAMPLE_PIXELS = 1 << 22
"""Images with more pixels get their percentiles from an ``[::s, ::s]`` subsample of at most about
this many pixels (:func:`intensity_sample_stride`)."""


def to_float(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 in [0, 1]: integers divided by their dtype's maximum, floats clipped."""
    image = np.asarray(image)
    if image.dtype == bool:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        scaled = image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
        return np.maximum(scaled, 0.0, out=scaled)  # negative values of signed types -> 0
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image.astype(np.float32), 0.0, 1.0)
    raise TypeError(f"to_float: unsupported dtype {image.dtype}")


def canonical_intensity(spec: str) -> str:
    """An intensity setting in canonical form: ``"dtype"``, ``"zscore"``, ``"robust"``,
    ``"percentile"`` (the default percentiles; pretrain's ``"percentile_0.5_99.5"`` is the same) or
    ``"percentile_LO_HI"``.

    Raises ValueError naming the accepted values.
    """
    text = str(spec).strip().lower()
    mode, percentiles = parse_intensity(text)
    if mode != "percentile":
        return mode
    return "percentile" if percentiles == INTENSITY_PERCENTILES else text


def parse_intensity(spec: str, percentiles: tuple[float, float] = INTENSITY_PERCENTILES,
                     ) -> tuple[str, tuple[float, float]]:
    """An intensity setting -> ``(mode, percentiles)``, mode one of :data:`INTENSITY_MODES`;
    ``"percentile_LO_HI"`` (pretrain's encoder.json form) overrides ``percentiles``."""
    text = str(spec).strip().lower()
    if text in INTENSITY_MODES:
        return text, (float(percentiles[0]), float(percentiles[1]))
    if text.startswith("percentile_"):
        parts = text[len("percentile_"):].split("_")
        try:
            lo, hi = (float(v) for v in parts)
        except ValueError:
            lo, hi = -1.0, -1.0
        if 0.0 <= lo < hi <= 100.0:
            return "percentile", (lo, hi)
    raise ValueError(f"intensity must be 'percentile' (per-image {INTENSITY_PERCENTILES[0]:g}/"
                     f"{INTENSITY_PERCENTILES[1]:g} percentile stretch), 'percentile_LO_HI', 'zscore' "
                     f"(per-image mean +- {INTENSITY_SPREADS:g} std), 'robust' (median +- "
                     f"{INTENSITY_SPREADS:g} x 1.4826 MAD) or 'dtype' (divide by the dtype's maximum), "
                     f"got {spec!r}")


def intensity_sample_stride(height: int, width: int, max_pixels: int = INTENSITY_SAMPLE_PIXELS) -> int:
    """Row and column stride ``s`` so that ``image[::s, ::s]`` has at most about ``max_pixels``."""
    return max(1, math.ceil(math.sqrt(height * width / max_pixels)))


def intensity_range(image: np.ndarray, percentiles: tuple[float, float] = INTENSITY_PERCENTILES,
                    ) -> tuple[float, float]:
    """Values of ``image`` at ``percentiles``: ``(lo, hi)`` for :func:`scale_intensity`.

    Integer images up to 16 bits use nearest-rank percentiles from a histogram (O(pixels), no
    sort), other dtypes ``np.nanpercentile``. Images (``H x W`` or ``H x W x C``) larger than
    :data:`INTENSITY_SAMPLE_PIXELS` are subsampled ``[::s, ::s]`` first
    (:func:`intensity_sample_stride`). When the percentiles coincide the range widens to the
    sample's min/max; a constant image gives ``lo == hi``.
    """
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError("empty image")
    if image.ndim >= 2:
        stride = intensity_sample_stride(image.shape[0], image.shape[1])
        if stride > 1:
            image = image[::stride, ::stride]
    flat = image.reshape(-1)
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    q = np.asarray(percentiles, dtype=np.float64) / 100.0
    if flat.dtype in (np.uint8, np.uint16):
        cdf = np.cumsum(np.bincount(flat, minlength=256))
        ranks = np.clip(np.ceil(q * flat.size).astype(np.int64), 1, flat.size)
        lo, hi = (float(v) for v in np.searchsorted(cdf, ranks))
    else:
        lo, hi = (float(v) for v in np.nanpercentile(flat.astype(np.float64), 100.0 * q))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("image has no finite values")
    if hi <= lo:
        finite = flat if flat.dtype.kind in "biu" else flat[np.isfinite(flat)]
        lo, hi = float(finite.min()), float(finite.max())
    return lo, hi


def intensity_window(image: np.ndarray, intensity: str = "percentile",
                     percentiles: tuple[float, float] = INTENSITY_PERCENTILES) -> tuple[float, float] | None:
    """The per-image window ``(lo, hi)`` that :func:`scale_intensity` maps to ``(0, 1)``; None for
    ``"dtype"`` (a fixed map). Computed on the subsample :func:`intensity_range` takes, so a
    streamed image gets the same window from the same pixels (``segment.stream``).

    ``"percentile"``: :func:`intensity_range`. ``"zscore"``: mean +- :data:`INTENSITY_SPREADS` std.
    ``"robust"``: median +- :data:`INTENSITY_SPREADS` x 1.4826 MAD (the std when half the pixels
    share one value, so MAD is 0). A constant image gives ``lo == hi``.
    """
    mode, percentiles = parse_intensity(intensity, percentiles)
    if mode == "dtype":
        return None
    if mode == "percentile":
        return intensity_range(image, percentiles)
    image = np.asarray(image)
    if image.size == 0:
        raise ValueError("empty image")
    if image.ndim >= 2:
        stride = intensity_sample_stride(image.shape[0], image.shape[1])
        image = image[::stride, ::stride]
    flat = image.reshape(-1).astype(np.float64)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise ValueError("image has no finite values")
    if mode == "zscore":
        centre, spread = float(flat.mean()), float(flat.std())
    else:
        centre = float(np.median(flat))
        spread = 1.4826 * float(np.median(np.abs(flat - centre)))
        if spread <= 0:
            spread = float(flat.std())
    return centre - INTENSITY_SPREADS * spread, centre + INTENSITY_SPREADS * spread


def check_finite(image: np.ndarray, path: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`ImageContentError` naming ``path`` if a float ``image`` holds NaN or +-Inf.

    Integer images pass at no cost. NaN would otherwise flow through the intensity mapping into
    the model (and read as "the model produced NaN"); Inf would silently clip to 0 or 1.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "fc" or bool(np.isfinite(image).all()):
        return
    n_bad = int((~np.isfinite(image)).sum())
    n_nan = int(np.isnan(image).sum())
    n_inf = n_bad - n_nan
    parts = ", ".join(f"{n} {what}" for n, what in ((n_nan, "NaN"), (n_inf, "Inf")) if n)
    raise ImageContentError(path, f"{n_bad} of {image.size} pixels are not finite numbers ({parts}; "
                                  f"{image.dtype} image): replace them before use (e.g. with the "
                                  f"image's minimum) or crop them away")


def check_not_constant(image: np.ndarray, path: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`ImageContentError` naming ``path`` if every pixel of ``image`` has one value.

    A blank frame (failed acquisition, all-black export) has nothing to segment or learn from, and
    the intensity mapping turns it into zeros that a model would label confidently anyway.
    """
    image = np.asarray(image)
    if image.size and not bool((image != image.flat[0]).any()):
        raise ImageContentError(path, f"constant image (every one of its {image.size} pixels is "
                                      f"{image.flat[0].item()!r}): a blank or failed acquisition?")


def scale_intensity(image: np.ndarray, mode: str = "percentile",
                    percentiles: tuple[float, float] = INTENSITY_PERCENTILES, *,
                    value_range: tuple[float, float] | None = None,
                    path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Raw pixels -> float32 in [0, 1]; the one intensity mapping of pretraining and segmentation.

    Per-image modes (``"percentile"``, ``"zscore"``, ``"robust"``): ``(x - lo) / (hi - lo)`` clipped
    to [0, 1] with the window ``lo, hi`` = :func:`intensity_window` (a constant image gives zeros),
    the same for 8-bit, 16-bit and float data and insensitive to brightness/contrast offsets
    between microscopes. ``value_range=(lo, hi)`` skips the window computation (e.g. a window
    computed once for a whole image streamed in tiles). ``"percentile_LO_HI"`` (as pretrain's
    encoder.json writes it) sets the percentiles.
    ``mode="dtype"``: :func:`to_float` (integers divided by their dtype's maximum, floats clipped).
    Every path to a model passes here, so this is where NaN/Inf pixels are refused
    (:func:`check_finite`, an :class:`ImageContentError` naming ``path``).
    """
    kind, percentiles = parse_intensity(mode, percentiles)
    image = np.asarray(image)
    check_finite(image, path)
    if kind == "dtype":
        return to_float(image)
    lo, hi = value_range if value_range is not None else intensity_window(image, kind, percentiles)
    if not hi > lo:  # constant image (or a degenerate given range)
        return np.zeros(image.shape, np.float32)
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)
