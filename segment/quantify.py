"""Numbers materials scientists report from a label map: phase fractions, particles, size statistics.

Pure functions of a uint8 class-index map (plus the pixel size); no model, no files. Choices, as
stated in every run's README (DESIGN.md 4):

* Area fraction of class k: its pixels over all analysed pixels (a cropped data bar is not
  analysed), particles cut by the border included: it is a pixel statistic.
* Particles of a class: connected components with 8-connectivity, optionally split by a
  watershed on the Euclidean distance transform (markers: the h-maxima of the distance, so that
  a neck narrower than ``2 * (peak - h)`` separates two particles).
* Per particle: area, equivalent circle diameter ``ECD = sqrt(4 A / pi)``, perimeter
  (Crofton estimate, scikit-image ``perimeter_crofton``: within ~1 % on discs, non-zero for
  tiny particles), aspect ratio (major / minor axis of the ellipse
  with the same second moments; NaN for a one-pixel-thin particle), centroid (pixels), and
  whether it touches the image border.
* Size statistics (mean, std, median, number-weighted D10/D50/D90 of ECD, mean area) use only the
  particles that do not touch the border; those that do are counted separately (``count_border``).
* Number density counts with Gundersen's rule: particles touching the bottom or right border are
  left out, particles touching only the top or left border are counted, over the analysed area.
  It is per um^2 when the pixel size is known, else per 10^6 px^2 ("1/Mpx").
* Lengths are in nm when the pixel size is known (areas in nm^2), else in pixels, and every table
  says which.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "Scale",
    "parse_pixel_size",
    "area_fractions",
    "label_particles",
    "measure_particles",
    "size_stats",
    "ClassSummary",
    "quantify_labels",
    "pool_summaries",
    "PARTICLE_COLUMNS",
    "SUMMARY_COLUMNS",
]

logger = logging.getLogger(__name__)

_UNIT_NM = {"nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "microns": 1e3, "mm": 1e6}
_PIXEL_UNITS = ("px", "pix", "pixel", "pixels")
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([^\s0-9.]*)\s*$")
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity structuring element


# ----------------------------------------------------------------------------- units
def parse_pixel_size(text: str) -> float | None:
    """Pixel size in nm from text such as ``"2.5nm"``, ``"0.004 um"``, ``"4µm"``; ``"px"`` -> None.

    ``None`` means "no physical calibration: report in pixels" (``"px"``, ``"1px"``). A number
    without a unit is refused, since nm and um differ by a thousand.
    """
    s = str(text).strip()
    if s.lower() in _PIXEL_UNITS:
        return None
    m = _SIZE_RE.match(s)
    if not m:
        raise ValueError(f"pixel size {text!r}: expected a number and a unit, e.g. 2.5nm, 0.01um, or px")
    value, unit = float(m.group(1)), m.group(2)
    if unit.lower() in _PIXEL_UNITS:
        return None
    if not unit:
        raise ValueError(f"pixel size {text!r} has no unit: write e.g. {m.group(1)}nm or {m.group(1)}um")
    factor = _UNIT_NM.get(unit, _UNIT_NM.get(unit.lower()))
    if factor is None:
        raise ValueError(f"pixel size {text!r}: unknown unit {unit!r} (nm, um, µm, mm or px)")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"pixel size {text!r} must be positive")
    return value * factor


@dataclass(frozen=True)
class Scale:
    """Physical size of one pixel; ``pixel_size_nm=None`` keeps every length in pixels."""

    pixel_size_nm: float | None = None

    def __post_init__(self) -> None:
        p = self.pixel_size_nm
        if p is not None and not (math.isfinite(p) and p > 0):
            raise ValueError(f"pixel_size_nm must be a positive number or None, got {p}")

    @property
    def calibrated(self) -> bool:
        return self.pixel_size_nm is not None

    @property
    def unit(self) -> str:
        """Length unit of every reported length: ``"nm"`` or ``"px"``."""
        return "nm" if self.calibrated else "px"

    @property
    def density_unit(self) -> str:
        return "1/um^2" if self.calibrated else "1/Mpx"

    def length(self, px: np.ndarray | float) -> np.ndarray | float:
        return px * self.pixel_size_nm if self.calibrated else px

    def area(self, px2: np.ndarray | float) -> np.ndarray | float:
        return px2 * self.pixel_size_nm**2 if self.calibrated else px2

    def density(self, count: float, area_px: float) -> float:
        """``count`` per um^2 (calibrated) or per 10^6 px^2 of ``area_px`` pixels."""
        if area_px <= 0:
            return float("nan")
        if self.calibrated:
            return count / (area_px * (self.pixel_size_nm * 1e-3) ** 2)
        return count / area_px * 1e6


# ----------------------------------------------------------------------------- pixel statistics
def area_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of pixels of each class 0..K-1 (float64, sums to 1); exact counts over pixels."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("area_fractions: empty label map")
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"labels contain class {len(counts) - 1}, but there are {num_classes} classes")
    return counts / labels.size


# ----------------------------------------------------------------------------- particles
def label_particles(mask: np.ndarray, *, watershed: bool = False, h: float = 2.0) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of a boolean mask: int32 labels 1..n and n.

    With ``watershed`` touching particles are split by a watershed of the negated distance
    transform from markers at its h-maxima: two maxima become two particles when the distance
    drops by at least ``h`` pixels between them (each peak's dynamic is >= ``h``), so boundary
    wiggles and shallow necks do not over-split. Done per component, on its bounding box.
    """
    from skimage.measure import label  # scikit-image is slow to import (~0.5 s): only when particles are measured

    mask = np.asarray(mask, dtype=bool)
    if not watershed:
        lab = label(mask, connectivity=2)
        return lab.astype(np.int32, copy=False), int(lab.max())
    if h <= 0:
        raise ValueError(f"watershed h must be > 0, got {h}")
    from skimage.morphology import local_maxima, reconstruction  # scikit-image: only for --watershed
    from skimage.segmentation import watershed as _watershed

    components, _ = ndi.label(mask, structure=_EIGHT)
    distance = ndi.distance_transform_edt(mask)
    out = np.zeros(mask.shape, np.int32)
    count = 0
    # one component at a time, on its bounding box: the same result as on the whole image (zeros
    # separate components) but far faster than a reconstruction over a large image
    for i, box in enumerate(ndi.find_objects(components), start=1):
        if box is None:
            continue
        obj = components[box] == i
        d = np.where(obj, distance[box], 0.0)
        parts = 1
        if d.max() >= 1.0 + h:  # a split needs two peaks each h above a saddle of at least 1
            # markers: regional maxima of the h-maxima transform (reconstruction of d - h under d),
            # i.e. peaks whose dynamic is at least h; equal peaks over a shallow saddle make one
            hmax = reconstruction(d - h, d, method="dilation")
            markers, parts = ndi.label(local_maxima(hmax, connectivity=2) & obj, structure=_EIGHT)
        if parts <= 1:
            count += 1
            out[box][obj] = count
            continue
        split = _watershed(-d, markers, mask=obj, connectivity=2)
        out[box][obj] = split[obj] + count
        count += parts
    return out, count


PARTICLE_COLUMNS = ("particle", "class", "area", "ecd", "perimeter", "aspect_ratio",
                    "centroid_y_px", "centroid_x_px", "touches_border")
"""Columns of :func:`measure_particles` (lengths in ``scale.unit``, area in its square)."""


def measure_particles(particles: np.ndarray, scale: Scale = Scale()) -> dict[str, np.ndarray]:
    """Per-particle measurements of an int label image (0 = none) with scikit-image ``regionprops_table``.

    Returns columns ``particle`` (label), ``area``, ``ecd``, ``perimeter`` (in ``scale``'s units),
    ``aspect_ratio`` (major / minor axis, NaN when the minor axis is 0), ``centroid_y_px``,
    ``centroid_x_px`` and ``touches_border``, ``touches_exclusion_edge`` (bottom or right border,
    Gundersen's exclusion lines).
    """
    from skimage.measure import regionprops_table  # scikit-image: only when particles are measured

    particles = np.asarray(particles)
    if particles.ndim != 2:
        raise ValueError(f"expected a 2-D label image, got shape {particles.shape}")
    h, w = particles.shape
    t = regionprops_table(particles, properties=(
        "label", "area", "perimeter_crofton", "centroid", "bbox", "axis_major_length", "axis_minor_length"))
    area_px = np.asarray(t["area"], dtype=np.float64)
    major, minor = np.asarray(t["axis_major_length"]), np.asarray(t["axis_minor_length"])
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(minor > 0, major / np.where(minor > 0, minor, 1.0), np.nan)
    top, left, bottom, right = (np.asarray(t[f"bbox-{i}"]) for i in range(4))
    exclusion = (bottom >= h) | (right >= w)
    return {
        "particle": np.asarray(t["label"], dtype=np.int64),
        "area": np.asarray(scale.area(area_px), dtype=np.float64),
        "ecd": np.asarray(scale.length(np.sqrt(4.0 * area_px / math.pi)), dtype=np.float64),
        "perimeter": np.asarray(scale.length(np.asarray(t["perimeter_crofton"], dtype=np.float64))),
        "aspect_ratio": aspect.astype(np.float64),
        "centroid_y_px": np.asarray(t["centroid-0"], dtype=np.float64),
        "centroid_x_px": np.asarray(t["centroid-1"], dtype=np.float64),
        "touches_border": (top <= 0) | (left <= 0) | exclusion,
        "touches_exclusion_edge": exclusion,
    }


def size_stats(ecd: np.ndarray) -> dict[str, float]:
    """Mean, std, median and number-weighted D10/D50/D90 of diameters (NaN when empty)."""
    ecd = np.asarray(ecd, dtype=np.float64)
    if ecd.size == 0:
        nan = float("nan")
        return dict(ecd_mean=nan, ecd_std=nan, ecd_median=nan, ecd_d10=nan, ecd_d50=nan, ecd_d90=nan)
    d10, d50, d90 = np.percentile(ecd, [10, 50, 90])
    return dict(ecd_mean=float(ecd.mean()), ecd_std=float(ecd.std(ddof=1)) if ecd.size > 1 else 0.0,
                ecd_median=float(np.median(ecd)), ecd_d10=float(d10), ecd_d50=float(d50), ecd_d90=float(d90))


# ----------------------------------------------------------------------------- per image
SUMMARY_COLUMNS = (
    "image", "class", "kind", "unit", "area_fraction", "count_interior", "count_border", "count_total",
    "number_density", "density_unit", "ecd_mean", "ecd_std", "ecd_median", "ecd_d10", "ecd_d50",
    "ecd_d90", "area_mean", "analysed_area", "area_unit",
)
"""Columns of :meth:`ClassSummary.row` (``kind`` is "particles" or "phase")."""


@dataclass
class ClassSummary:
    """Statistics of one class in one image (or pooled over images of one unit)."""

    image: str
    name: str
    particles: bool
    unit: str
    density_unit: str
    pixels: int
    total_pixels: int
    analysed_area: float  # in unit^2
    count_interior: int = 0
    count_border: int = 0
    count_gundersen: int = 0
    scale: Scale = field(default_factory=Scale)
    ecd_interior: np.ndarray = field(default_factory=lambda: np.zeros(0))
    area_interior: np.ndarray = field(default_factory=lambda: np.zeros(0))
    number_density: float = float("nan")

    @property
    def area_fraction(self) -> float:
        return self.pixels / self.total_pixels if self.total_pixels else float("nan")

    def row(self) -> dict[str, Any]:
        """One summary-CSV row (keys :data:`SUMMARY_COLUMNS`)."""
        r: dict[str, Any] = dict(image=self.image, **{"class": self.name},
                                 kind="particles" if self.particles else "phase", unit=self.unit,
                                 area_fraction=self.area_fraction, analysed_area=self.analysed_area,
                                 area_unit=f"{self.unit}^2")
        if self.particles:
            r.update(count_interior=self.count_interior, count_border=self.count_border,
                     count_total=self.count_interior + self.count_border,
                     number_density=self.number_density, density_unit=self.density_unit,
                     area_mean=float(self.area_interior.mean()) if self.area_interior.size else float("nan"),
                     **size_stats(self.ecd_interior))
        return {k: r.get(k, "") for k in SUMMARY_COLUMNS}


def quantify_labels(
    labels: np.ndarray,
    class_names: Sequence[str],
    particle_classes: Iterable[int],
    *,
    scale: Scale = Scale(),
    watershed: bool = False,
    h: float = 2.0,
    image: str = "",
) -> tuple[list[ClassSummary], dict[str, np.ndarray]]:
    """Quantify one label map: a :class:`ClassSummary` per class and the particle table.

    ``particle_classes`` are the class indices whose connected components are particles; every
    other class is a phase (area fraction only). The particle table has the columns of
    :func:`measure_particles` plus ``class`` (name), all classes stacked.
    """
    labels = np.asarray(labels)
    k = len(class_names)
    fractions_px = np.bincount(labels.ravel(), minlength=k)
    if len(fractions_px) > k:
        raise ValueError(f"labels contain class {len(fractions_px) - 1}, but there are {k} classes")
    particle_set = set(int(c) for c in particle_classes)
    if bad := sorted(c for c in particle_set if not 0 <= c < k):
        raise ValueError(f"particle classes {bad} are not class indices 0..{k - 1}")
    total = labels.size
    summaries: list[ClassSummary] = []
    tables: list[dict[str, np.ndarray]] = []
    for c, name in enumerate(class_names):
        s = ClassSummary(image=image, name=str(name), particles=c in particle_set, unit=scale.unit,
                         density_unit=scale.density_unit, pixels=int(fractions_px[c]), total_pixels=total,
                         analysed_area=float(scale.area(float(total))), scale=scale)
        if s.particles:
            lab, n = label_particles(labels == c, watershed=watershed, h=h)
            t = measure_particles(lab, scale)
            del lab
            interior = ~t["touches_border"]
            s.count_interior = int(interior.sum())
            s.count_border = int(n - s.count_interior)
            s.count_gundersen = int((~t["touches_exclusion_edge"]).sum())
            s.number_density = scale.density(s.count_gundersen, float(total))
            s.ecd_interior = t["ecd"][interior]
            s.area_interior = t["area"][interior]
            t["class"] = np.full(n, str(name), dtype=object)
            tables.append(t)
        summaries.append(s)
    table = _stack(tables)
    return summaries, table


def _stack(tables: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    cols = (*PARTICLE_COLUMNS, "touches_exclusion_edge")
    if not tables:
        return {c: np.zeros(0) for c in cols}
    return {c: np.concatenate([t[c] for t in tables]) for c in cols}


def pool_summaries(summaries: Sequence[ClassSummary], image: str = "ALL") -> list[ClassSummary]:
    """Pool per-image summaries of the same unit into one per class (in first-seen class order).

    Pixels, counts and particle diameters add up; the area fraction is then pixel-weighted over
    all images and the number density is the Gundersen count over the total analysed area.
    Summaries in different units (some images calibrated, some not) are pooled separately, with
    ``image`` suffixed by the unit (``"ALL [nm]"``); so are calibrated images of different pixel
    sizes, which share the unit nm.
    """
    units = sorted({s.unit for s in summaries})
    out: list[ClassSummary] = []
    for unit in units:
        group = [s for s in summaries if s.unit == unit]
        label = image if len(units) == 1 else f"{image} [{unit}]"
        names = list(dict.fromkeys(s.name for s in group))
        for name in names:
            parts = [s for s in group if s.name == name]
            first = parts[0]
            pooled = ClassSummary(
                image=label, name=name, particles=first.particles, unit=unit, density_unit=first.density_unit,
                pixels=sum(p.pixels for p in parts), total_pixels=sum(p.total_pixels for p in parts),
                analysed_area=float(sum(p.analysed_area for p in parts)),
                count_interior=sum(p.count_interior for p in parts),
                count_border=sum(p.count_border for p in parts),
                count_gundersen=sum(p.count_gundersen for p in parts), scale=first.scale,
                ecd_interior=np.concatenate([p.ecd_interior for p in parts]),
                area_interior=np.concatenate([p.area_interior for p in parts]),
            )
            if pooled.particles:  # over the summed analysed area: nm^2 -> um^2, px^2 -> Mpx
                area = pooled.analysed_area / 1e6
                pooled.number_density = pooled.count_gundersen / area if area > 0 else float("nan")
            out.append(pooled)
    return out
