"""Detect the data bar that SEM software burns into the bottom of a micrograph.

A data bar is a band of rows at the bottom painted in one flat colour (usually black or white)
carrying text, scale bar and logos; frame lines of another flat colour may separate it from the
image. Row by row, the fraction of pixels at the bar's background level jumps from almost none
(image texture) to most of the row (the bar), which is what :func:`find_databar` looks for:

1. the bar level is the most common value in the bottom rows (256-bin histogram);
2. a row belongs to the bar if at least ``min_frac`` of its pixels lie within ``tol`` of that
   level, or if the row itself is flat (a frame line);
3. the bar is the longest run of such rows ending at the last row, accepted only if it is at
   least ``min_rows`` tall, at most ``max_fraction`` of the image, and the ``context`` rows above
   it are texture (mean fraction at most ``max_context_frac``): the change must be abrupt.

:func:`find_databar` is pure (row profiles in, bar height out); :func:`detect_databar` computes the
profiles from an image or a streaming row source, reading only the bottom part of the image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pretrain.intensity import to_float
from segment.sources import ArraySource

__all__ = ["DataBar", "row_profile", "find_databar", "detect_databar"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataBar:
    """A detected bar: ``rows`` to crop at the bottom (0 when none) and its level in [0, 1]."""

    rows: int
    level: float
    reason: str = ""


def row_profile(rows: np.ndarray, level: float, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a float ``h x W`` array: the fraction of pixels within ``tol`` of ``level``, and
    whether the row is flat (its values span at most ``2 tol``)."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim == 3:
        rows = rows.mean(axis=-1)
    frac = (np.abs(rows - level) <= tol).mean(axis=1)
    flat = (rows.max(axis=1) - rows.min(axis=1)) <= 2 * tol
    return frac, flat


def find_databar(frac: np.ndarray, flat: np.ndarray, *, image_rows: int, min_frac: float = 0.5,
                 min_rows: int = 4, max_fraction: float = 0.4, context: int = 16,
                 max_context_frac: float = 0.1) -> tuple[int, str]:
    """Height of the bar at the end of the row profiles (ordered top to bottom), and why.

    ``frac``/``flat`` cover the bottom ``len(frac)`` rows of an image of ``image_rows`` rows.
    """
    frac, flat = np.asarray(frac, dtype=np.float64), np.asarray(flat, dtype=bool)
    if frac.shape != flat.shape or frac.ndim != 1:
        raise ValueError(f"profiles must be 1-D of one length, got {frac.shape} and {flat.shape}")
    member = (frac >= min_frac) | flat
    not_member = np.flatnonzero(~member)
    top = int(not_member[-1]) + 1 if not_member.size else 0
    run = len(member) - top
    if run < min_rows:
        return 0, f"no bar: {run} bottom row(s) at the bar level (< {min_rows})"
    if run > max_fraction * image_rows or top == 0:
        return 0, f"no bar: {run} rows at one level, more than {max_fraction:.0%} of the image"
    above = frac[max(0, top - context) : top]
    if above.mean() > max_context_frac:
        return 0, (f"no bar: the rows above the candidate ({run} rows) are {above.mean():.0%} at the "
                   "bar level, not an abrupt change")
    return run, f"bar of {run} rows"


def detect_databar(image, *, tol: float = 0.01, min_frac: float = 0.5, min_rows: int = 4,
                   max_fraction: float = 0.4, context: int = 16, max_context_frac: float = 0.1,
                   probe_rows: int = 64, band: int = 512) -> DataBar:
    """Find an SEM data bar at the bottom of ``image`` (an array or a ``segment.stream`` row source).

    Reads only the bottom ``max_fraction`` of the rows (plus ``context``), band by band.
    Thresholds as in :func:`find_databar`; ``tol`` is in units of the full intensity range.
    """
    source = ArraySource(image) if isinstance(image, np.ndarray) else image
    h, _ = source.shape
    probe = to_float(source.rows(max(0, h - max(1, min(probe_rows, h // 10))), h))
    if probe.ndim == 3:
        probe = probe.mean(axis=-1)
    hist, edges = np.histogram(probe, bins=256, range=(0.0, 1.0))
    level = float((edges[hist.argmax()] + edges[hist.argmax() + 1]) / 2)
    start = max(0, h - int(max_fraction * h) - context - 1)
    fracs, flats = [], []
    for y in range(start, h, band):
        f, fl = row_profile(to_float(source.rows(y, min(y + band, h))), level, tol)
        fracs.append(f)
        flats.append(fl)
    rows, reason = find_databar(np.concatenate(fracs), np.concatenate(flats), image_rows=h,
                                min_frac=min_frac, min_rows=min_rows, max_fraction=max_fraction,
                                context=context, max_context_frac=max_context_frac)
    name = getattr(source, "path", None) or "image"
    logger.debug("%s: %s (level %.3f)", name, reason, level)
    return DataBar(rows=rows, level=level, reason=reason)
