"""95 % bootstrap confidence intervals for the folder-level numbers of ``segment.predict``.

Pure functions of the per-image statistics (:class:`segment.quantify.ClassSummary`) and, for a
folder of one image, of per-tile counts (:func:`tile_table`); no model, no files.

The independent unit is the image. The folder-level statistics are pooled over images, exactly as
:func:`segment.quantify.pool_summaries` computes them:

* area fraction of a class: its pixels summed over the images / the analysed pixels summed over
  the images, i.e. the pixel-weighted mean of the per-image fractions (a large image counts more);
* number density: the Gundersen counts summed over the images / the summed analysed area;
* ECD mean, median, D10, D90: over the pooled border-free particles of all images.

One bootstrap resample draws ``n`` of the ``n`` images with replacement (an image drawn twice
counts twice) and recomputes every statistic from the drawn images' pixels and particles. All
statistics and classes of a group share the same ``B`` resamples (default 2000) from a seeded
:class:`numpy.random.Generator`; the interval is the 2.5th and 97.5th percentile of the ``B``
values (``method="percentile"``), ``method="bca"`` (bias-corrected and accelerated, jackknife
acceleration) or, the default, ``method="t"`` (estimate +- t(n-1) x the bootstrap standard error
corrected by sqrt(n/(n-1))), the one whose coverage held at 5 images in the simulation of
``bench/ci_coverage.py``. A statistic undefined in more than (1 - level)/2 of
the resamples (no border-free particle among the drawn images) gets no interval.

A group of ONE image has no between-image replicate: the interval is then over a grid of tiles of
that image (:func:`tile_grid`, about :data:`TILE_PX` px, at least 4 x 4), particles assigned to the
tile holding their centroid, with the same pooled statistics over the drawn tiles. It describes the
variability within that field of view only, not between fields or specimens, and says so
(``ci_over`` = ``tiles ...``).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from segment.quantify import ClassSummary

__all__ = [
    "CI_STATS",
    "CI_COLUMNS",
    "METHODS",
    "TILE_PX",
    "Bootstrap",
    "Units",
    "image_units",
    "tile_grid",
    "tile_table",
    "tile_units",
    "resample_counts",
    "statistics",
    "interval",
    "class_intervals",
    "folder_intervals",
]

CI_STATS = ("area_fraction", "number_density", "ecd_mean", "ecd_median", "ecd_d10", "ecd_d90")
"""Statistics with an interval (the last five only for particle classes)."""
CI_COLUMNS = ("ci_level", "ci_over", "ci_units",
              *(f"{s}_ci_{end}" for s in CI_STATS for end in ("low", "high")))
"""Columns :func:`folder_intervals` fills (appended to summary.csv's, on the pooled ``ALL`` rows)."""
METHODS = ("percentile", "bca", "t")
TILE_PX = 256
"""Nominal tile side for the one-image case; images under 4 tiles a side get 4 smaller ones."""
_MIN_TILES, _MAX_TILES, _MIN_TILE_SIDE = 4, 32, 8
_PARTICLE_STATS = CI_STATS[1:]
_QUANTILES = {"ecd_median": 0.5, "ecd_d10": 0.1, "ecd_d90": 0.9}
_MAX_CELLS = 4_000_000  # resamples x particles per chunk of the pooled-quantile computation
_ROW_LOOP_ABOVE = 2_000  # particles above which pooled quantiles go one resample at a time (faster)


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed: ``resamples`` (B), ``seed``, ``level`` and ``method``."""

    resamples: int = 2000
    seed: int = 0
    level: float = 0.95
    method: str = "t"  # coverage 90-97.5 % at 5 images where "percentile" gave 79-90 % (BENCHMARKS.md)

    def __post_init__(self) -> None:
        if int(self.resamples) < 100:
            raise ValueError(f"bootstrap resamples must be >= 100, got {self.resamples}")
        if not 0.5 <= self.level < 1:
            raise ValueError(f"confidence level must be in [0.5, 1), got {self.level}")
        if self.method not in METHODS:
            raise ValueError(f"interval method must be one of {METHODS}, got {self.method!r}")

    def describe(self) -> str:
        name = {"percentile": "percentile bootstrap", "bca": "BCa bootstrap",
                "t": "t interval with the bootstrap standard error"}[self.method]
        return f"{100 * self.level:g} % {name}, B = {self.resamples} resamples, seed {self.seed}"


@dataclass
class Units:
    """One class in one group of resampling units (images or tiles): per-unit sums.

    ``pixels``, ``total_pixels``, ``area`` (analysed area, unit^2) and ``count`` (Gundersen count)
    have one entry per unit; ``ecd`` holds every border-free particle's ECD and ``ecd_unit`` the
    unit it belongs to.
    """

    pixels: np.ndarray
    total_pixels: np.ndarray
    area: np.ndarray
    count: np.ndarray
    ecd: np.ndarray
    ecd_unit: np.ndarray
    particles: bool

    def __post_init__(self) -> None:
        for name in ("pixels", "total_pixels", "area", "count", "ecd"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        self.ecd_unit = np.asarray(self.ecd_unit, dtype=np.int64)
        n = self.n
        if any(len(getattr(self, k)) != n for k in ("total_pixels", "area", "count")):
            raise ValueError("pixels, total_pixels, area and count need one entry per unit")
        if self.ecd.shape != self.ecd_unit.shape:
            raise ValueError(f"{self.ecd.size} ECDs but {self.ecd_unit.size} unit indices")
        if self.ecd_unit.size and not (0 <= self.ecd_unit.min() and self.ecd_unit.max() < n):
            raise ValueError(f"particle unit indices outside 0..{n - 1}")

    @property
    def n(self) -> int:
        return len(self.pixels)


# ----------------------------------------------------------------------------- units
def image_units(per_image: Sequence[ClassSummary]) -> Units:
    """The images of a group as resampling units for one class (one summary per image)."""
    if not per_image:
        raise ValueError("image_units: no images")
    return Units(
        pixels=[s.pixels for s in per_image], total_pixels=[s.total_pixels for s in per_image],
        area=[s.analysed_area for s in per_image], count=[s.count_gundersen for s in per_image],
        ecd=np.concatenate([np.asarray(s.ecd_interior, np.float64) for s in per_image]),
        ecd_unit=np.concatenate([np.full(len(s.ecd_interior), i) for i, s in enumerate(per_image)]).astype(np.int64),
        particles=per_image[0].particles)


def tile_grid(height: int, width: int, tile_px: int = TILE_PX) -> tuple[np.ndarray, np.ndarray]:
    """Tile edges ``(y_edges, x_edges)``: ``round(side / tile_px)`` tiles a side, at least 4 and at
    most 32 (at least 8 px each), of near-equal size (``np.linspace``)."""
    def edges(side: int) -> np.ndarray:
        n = int(np.clip(round(side / tile_px), _MIN_TILES, _MAX_TILES))
        n = max(1, min(n, side // _MIN_TILE_SIDE))
        return np.linspace(0, side, n + 1).round().astype(np.int64)

    return edges(int(height)), edges(int(width))


def tile_table(labels: np.ndarray, table: Mapping[str, np.ndarray], class_names: Sequence[str],
               particle_classes: Sequence[int], tile_px: int = TILE_PX) -> dict[str, Any]:
    """Per-tile counts of one label map, JSON-ready (``segment.predict`` keeps them in the record).

    ``table`` is the particle table of :func:`segment.quantify.quantify_labels` for ``labels``.
    Returns ``y_edges``, ``x_edges``, ``total_pixels`` (per tile, row-major) and per class
    ``pixels`` per tile; per particle class also ``count_gundersen`` per tile and ``ecd_tile``, the
    tile of each border-free particle's centroid in the order of ``ClassSummary.ecd_interior``.
    Tiles are counted one at a time: no image-sized temporary.
    """
    labels = np.asarray(labels)
    h, w = labels.shape
    ye, xe = tile_grid(h, w, tile_px)
    k = len(class_names)
    counts = np.zeros((len(ye) - 1, len(xe) - 1, k), np.int64)
    for i in range(len(ye) - 1):
        band = labels[ye[i]:ye[i + 1]]
        for j in range(len(xe) - 1):
            counts[i, j] = np.bincount(band[:, xe[j]:xe[j + 1]].ravel(), minlength=k)[:k]
    counts = counts.reshape(-1, k)
    out: dict[str, Any] = dict(tile_px=int(tile_px), y_edges=ye.tolist(), x_edges=xe.tolist(),
                               total_pixels=counts.sum(1).tolist(), classes={})
    ty = np.clip(np.searchsorted(ye, np.asarray(table["centroid_y_px"], np.float64), side="right") - 1, 0, len(ye) - 2)
    tx = np.clip(np.searchsorted(xe, np.asarray(table["centroid_x_px"], np.float64), side="right") - 1, 0, len(xe) - 2)
    tile = ty * (len(xe) - 1) + tx
    particle_set = {int(c) for c in particle_classes}
    for c, name in enumerate(class_names):
        entry: dict[str, Any] = dict(pixels=counts[:, c].tolist())
        if c in particle_set:
            mine = np.asarray(table["class"]) == str(name)
            counted = mine & ~np.asarray(table["touches_exclusion_edge"], bool)
            interior = mine & ~np.asarray(table["touches_border"], bool)
            entry["count_gundersen"] = np.bincount(tile[counted], minlength=counts.shape[0]).tolist()
            entry["ecd_tile"] = tile[interior].tolist()
        out["classes"][str(name)] = entry
    return out


def tile_units(tiles: Mapping[str, Any], summary: ClassSummary) -> Units:
    """The tiles of one image (:func:`tile_table`) as resampling units for the class of ``summary``
    (which supplies the border-free ECDs, in physical units, and the pixel size)."""
    entry = tiles["classes"][summary.name]
    total = np.asarray(tiles["total_pixels"], np.float64)
    n = len(total)
    ecd = np.asarray(summary.ecd_interior, np.float64)
    ecd_tile = np.asarray(entry.get("ecd_tile", []), np.int64)
    if summary.particles and ecd_tile.size != ecd.size:
        raise ValueError(f"{summary.image} {summary.name}: {ecd.size} border-free particles but "
                         f"{ecd_tile.size} tile assignments")
    return Units(pixels=entry["pixels"], total_pixels=total,
                 area=np.asarray(summary.scale.area(total), np.float64),
                 count=entry.get("count_gundersen", np.zeros(n)),
                 ecd=ecd if summary.particles else np.zeros(0),
                 ecd_unit=ecd_tile if summary.particles else np.zeros(0, np.int64),
                 particles=summary.particles)


# ----------------------------------------------------------------------------- statistics
def resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, n)`` int64: how often each of ``n`` units is drawn in each resample of ``n``
    draws with replacement."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = idx + n * np.arange(resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n)


def _ratio(num: np.ndarray, den: np.ndarray, scale: float = 1.0) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0) * scale, np.nan)


def _pooled_percentiles(w: np.ndarray, values: np.ndarray, unit: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Percentiles (``np.percentile``'s linear rule) of the pooled sample in which particle ``p``
    appears ``w[r, unit[p]]`` times, for each row ``r`` of ``w``: ``(rows, len(qs))``, NaN when empty."""
    order = np.argsort(values, kind="stable")
    v, u = values[order], unit[order]
    rows, p = w.shape[0], v.size
    out = np.full((rows, len(qs)), np.nan)
    if p == 0:
        return out
    qs = np.asarray(qs, np.float64)
    if p > _ROW_LOOP_ABOVE:  # many particles: one cumulative sum and a binary search per resample
        for r in range(rows):
            cum = np.cumsum(w[r, u])
            total = int(cum[-1])
            if total == 0:
                continue
            pos = qs * (total - 1)
            lo = np.floor(pos)
            hi = np.minimum(lo + 1, total - 1)
            k = np.minimum(np.searchsorted(cum, np.r_[lo, hi], side="right"), p - 1)
            a_lo, a_hi, t = v[k[:len(qs)]], v[k[len(qs):]], pos - lo
            out[r] = np.where(t >= 0.5, a_hi - (a_hi - a_lo) * (1 - t), a_lo + (a_hi - a_lo) * t)
        return out
    step = max(1, _MAX_CELLS // p)  # few particles: whole chunks of resamples at once
    for a in range(0, rows, step):
        cum = np.cumsum(w[a:a + step][:, u], axis=1)  # (rows, P): pooled sample size up to particle p
        total = cum[:, -1]
        ok = total > 0
        for j, q in enumerate(qs):
            pos = q * (total - 1)
            lo = np.floor(pos)
            hi = np.minimum(lo + 1, total - 1)
            k_lo = np.minimum((cum <= lo[:, None]).sum(1), p - 1)  # the particle at pooled index lo
            k_hi = np.minimum((cum <= hi[:, None]).sum(1), p - 1)
            a_lo, a_hi, t = v[k_lo], v[k_hi], pos - lo
            val = np.where(t >= 0.5, a_hi - (a_hi - a_lo) * (1 - t), a_lo + (a_hi - a_lo) * t)
            out[a:a + step, j] = np.where(ok, val, np.nan)
    return out


def statistics(units: Units, w: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of :data:`CI_STATS` (those that apply) for each row of unit weights ``w``
    (``(rows, n)``: a row of ones is the estimate, bootstrap counts the resamples)."""
    w = np.atleast_2d(np.asarray(w))
    wf = w.astype(np.float64)
    out = {"area_fraction": _ratio(wf @ units.pixels, wf @ units.total_pixels)}
    if units.particles:
        # per 10^6 area units: nm^2 -> um^2 when calibrated, px^2 -> Mpx otherwise (as pool_summaries)
        out["number_density"] = _ratio(wf @ units.count, wf @ units.area, 1e6)
        n_per_unit = np.bincount(units.ecd_unit, minlength=units.n).astype(np.float64)
        sum_per_unit = np.bincount(units.ecd_unit, weights=units.ecd, minlength=units.n)
        out["ecd_mean"] = _ratio(wf @ sum_per_unit, wf @ n_per_unit)
        q = _pooled_percentiles(w, units.ecd, units.ecd_unit, list(_QUANTILES.values()))
        for j, name in enumerate(_QUANTILES):
            out[name] = q[:, j]
    return out


def interval(boot: np.ndarray, estimate: float, level: float = 0.95, method: str = "percentile",
             n: int | None = None, jackknife: np.ndarray | None = None) -> tuple[float, float]:
    """The ``level`` interval from bootstrap values ``boot`` of a statistic whose estimate is
    ``estimate``; ``n`` units (for ``"t"``), leave-one-unit-out values ``jackknife`` (for ``"bca"``).
    ``(nan, nan)`` when the estimate is undefined or more than (1 - level)/2 of ``boot`` is."""
    boot = np.asarray(boot, np.float64)
    nan = (float("nan"), float("nan"))
    finite = np.isfinite(boot)
    alpha = (1.0 - level) / 2
    if not math.isfinite(estimate) or boot.size == 0 or (~finite).mean() > alpha:
        return nan
    b = boot[finite]
    if method == "percentile":
        lo, hi = np.quantile(b, [alpha, 1 - alpha])
    elif method == "t":
        from scipy.stats import t as student  # scipy.stats is slow to import: only for intervals

        if n is None or n < 2:
            return nan
        se = b.std(ddof=1) * math.sqrt(n / (n - 1))
        half = float(student.ppf(1 - alpha, n - 1)) * se
        lo, hi = estimate - half, estimate + half
    elif method == "bca":
        from scipy.stats import norm  # scipy.stats: only for intervals

        below = (b < estimate).mean() + 0.5 * (b == estimate).mean()
        z0 = float(norm.ppf(np.clip(below, 0.5 / b.size, 1 - 0.5 / b.size)))
        acc = 0.0
        if jackknife is not None:
            jk = np.asarray(jackknife, np.float64)
            jk = jk[np.isfinite(jk)]
            d = jk.mean() - jk if jk.size else jk
            den = 6.0 * float((d**2).sum()) ** 1.5
            acc = float((d**3).sum()) / den if den > 0 else 0.0
        z = norm.ppf([alpha, 1 - alpha])
        adjusted = norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
        lo, hi = np.quantile(b, np.clip(adjusted, 0, 1))
    else:
        raise ValueError(f"interval method must be one of {METHODS}, got {method!r}")
    return float(lo), float(hi)


def class_intervals(units: Units, counts: np.ndarray, boot: Bootstrap) -> dict[str, tuple[float, float, float]]:
    """``{statistic: (estimate, low, high)}`` for one class from the resample ``counts``
    (:func:`resample_counts`, shared by all classes of a group)."""
    n = units.n
    est = statistics(units, np.ones((1, n), np.int64))
    reps = statistics(units, counts)
    jack = statistics(units, 1 - np.eye(n, dtype=np.int64)) if boot.method == "bca" and n > 1 else {}
    out = {}
    for name, value in est.items():
        e = float(value[0])
        out[name] = (e, *interval(reps[name], e, boot.level, boot.method, n, jack.get(name)))
    return out


def _rng(boot: Bootstrap, key: str) -> np.random.Generator:
    """The group's generator: ``default_rng([seed, crc32(key)])``, so that each group's resamples
    depend on the seed and its own name only."""
    return np.random.default_rng([int(boot.seed), zlib.crc32(key.encode())])


def folder_intervals(images: Sequence[Sequence[ClassSummary]], boot: Bootstrap = Bootstrap(),
                     tiles: Mapping[str, Any] | None = None, key: str = "ALL") -> dict[str, dict[str, Any]]:
    """Intervals of the pooled statistics of one group of images, per class name: the
    :data:`CI_COLUMNS` (``""`` where a statistic does not apply or has no interval).

    ``images`` holds each image's summaries (all classes). Two or more images: bootstrap over
    images. One image: over its tiles when ``tiles`` (:func:`tile_table`) is given, else no
    interval. ``key`` (the group's name, e.g. ``"ALL"``) seeds the group's resamples.
    """
    images = [list(s) for s in images]
    if not images:
        return {}
    names = list(dict.fromkeys(s.name for per in images for s in per))
    if len(images) >= 2:
        over, per_class = "images", {name: image_units([s for per in images for s in per if s.name == name])
                                     for name in names}
    elif tiles is not None:
        ny, nx = len(tiles["y_edges"]) - 1, len(tiles["x_edges"]) - 1
        side = f"{int(np.median(np.diff(tiles['y_edges'])))}x{int(np.median(np.diff(tiles['x_edges'])))} px"
        over = f"tiles ({ny}x{nx} of ~{side}, one image)"
        per_class = {s.name: tile_units(tiles, s) for s in images[0]}
    else:
        return {name: dict(ci_level=boot.level, ci_over="none (one image, no tile counts)", ci_units=1)
                for name in names}
    n = next(iter(per_class.values())).n
    if n < 2:
        return {name: dict(ci_level=boot.level, ci_over=f"none ({over}: fewer than 2 units)", ci_units=n)
                for name in names}
    counts = resample_counts(n, int(boot.resamples), _rng(boot, key))
    out: dict[str, dict[str, Any]] = {}
    for name, units in per_class.items():
        row: dict[str, Any] = dict(ci_level=boot.level, ci_over=over, ci_units=n)
        for stat, (_, lo, hi) in class_intervals(units, counts, boot).items():
            row[f"{stat}_ci_low"], row[f"{stat}_ci_high"] = lo, hi
        out[name] = row
    return out
