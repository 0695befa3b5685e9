"""The files of a ``segment.predict`` output folder, and how each is written.

Per image: the mask (PNG, or deflate TIFF above :data:`PNG_MAX_SIDE`), overlay PNG, probability map
(a TIFF memory map) and particle table; per folder (:func:`write_folder_outputs`): ``summary.csv``
with the pooled rows' confidence intervals, ``images.csv``, ``failures.csv``, the ECD histograms,
``figures/fractions.png`` and the README stating every choice and column. Every file is written
through :mod:`pretrain.outputs` (complete or not at all); CSV cells as :func:`write_table` formats them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from pretrain.io import read_raw, write_tiff
from pretrain.outputs import atomic_path, atomic_write_text, write_csv
from segment.fractions_figure import Band, fractions_figure
from segment.infer import Predictor
from segment.quantify import (
    PARTICLE_COLUMNS,
    SUMMARY_COLUMNS,
    ClassSummary,
    Scale,
    pool_summaries,
    quantify_labels,
    size_stats,
)
from segment.records import ImageResult, PredictOptions
from segment.uncertainty import CI_COLUMNS, Bootstrap, folder_intervals, tile_table

__all__ = ["PNG_MAX_SIDE", "IMAGE_COLUMNS", "atomic_memmap", "write_png", "write_mask", "write_table",
           "particle_csv", "write_folder_outputs"]

logger = logging.getLogger("segment.predict")  # the CLI's logger: log lines and their filters unchanged by the split


PNG_MAX_SIDE = 4096
"""Masks with a longer side are written as deflate TIFF (PNG writers and viewers struggle)."""


IMAGE_COLUMNS = ("image", "path", "height", "width", "databar_rows", "analysed_height",
                 "pixel_size_nm", "pixel_size_source", "zoom", "seconds", "model_tiles",
                 "ood_score", "ood_threshold", "flagged", "ood_tiles_flagged", "ood_knn", "mean_entropy", "mask")


# ----------------------------------------------------------------------------- per image
@contextmanager
def atomic_memmap(path: Path, shape: tuple[int, ...], **kwargs: Any) -> Iterator[np.ndarray]:
    """A uint8 TIFF memory map under a temporary name, renamed to ``path`` only on success."""
    with atomic_path(path) as tmp:
        mm = tifffile.memmap(tmp, shape=shape, dtype=np.uint8, photometric="minisblack", **kwargs)
        yield mm
        mm.flush()
        del mm


def write_png(path: Path, array: np.ndarray) -> Path:
    """``array`` as a PNG, written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    return path


def write_mask(base: Path, labels: np.ndarray, pixel_size_nm: float | None, fmt: str) -> Path:
    """``base``.png, or .tif (deflate, with the pixel size) above :data:`PNG_MAX_SIDE` or for ``fmt`` "tif"."""
    if fmt == "png" or (fmt == "auto" and max(labels.shape) <= PNG_MAX_SIDE):
        return write_png(base.with_name(base.name + ".png"), labels)
    return write_tiff(base.with_name(base.name + ".tif"), labels, pixel_size_nm=pixel_size_nm)


def _fmt(v: Any) -> Any:
    """A CSV cell: bools as 0/1, floats with 6 significant digits (NaN/Inf empty), numpy ints as ints."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else f"{float(v):.6g}"
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_table(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]]) -> Path:
    """A CSV table of this folder (:func:`pretrain.outputs.write_csv`), every cell formatted by :func:`_fmt`;
    rows are mappings (read by column name, missing keys empty) or sequences in column order."""
    return write_csv(path, columns, ([_fmt(r.get(c, "")) for c in columns] if isinstance(r, Mapping)
                                     else [_fmt(v) for v in r] for r in rows))


def particle_csv(path: Path, table: Mapping[str, np.ndarray], unit: str) -> Path:
    """``particles/KEY.csv``: one row per particle, lengths and areas in ``unit``."""
    names = {"area": f"area_{unit}2", "ecd": f"ecd_{unit}", "perimeter": f"perimeter_{unit}"}
    columns = [names.get(c, c) for c in PARTICLE_COLUMNS]
    cols = [table[c] for c in PARTICLE_COLUMNS]
    return write_table(path, columns, zip(*cols))


# ----------------------------------------------------------------------------- folder
def write_folder_outputs(out_dir: Path, predictor: Predictor, options: PredictOptions, results: Sequence[ImageResult],
                         failed: Sequence[tuple[str, str]], settings: Mapping[str, Any] | None, skipped: int,
                         bootstrap: Bootstrap | None) -> list[ClassSummary]:
    """The folder's tables (``summary.csv`` with the pooled rows and their intervals, ``images.csv``,
    ``failures.csv``), histograms, fractions figure and README, for ``results`` in input order
    (``skipped`` of them resumed from records); returns the pooled rows."""
    summaries = [s for r in results for s in r.summaries]
    pooled = pool_summaries(summaries) if summaries else []
    bootstrap = bootstrap or Bootstrap()
    groups = _interval_groups(results, options)
    intervals = {(label, name): cols for label, (group, tiles) in groups.items()
                 for name, cols in _group_intervals(label, group, tiles, bootstrap).items()}
    write_table(out_dir / "summary.csv", (*SUMMARY_COLUMNS, *CI_COLUMNS),
                [*(s.row() for s in summaries), *({**s.row(), **intervals.get((s.image, s.name), {})} for s in pooled)])
    write_table(out_dir / "images.csv", IMAGE_COLUMNS, [r.row() for r in results])
    write_table(out_dir / "failures.csv", ("input", "error"), failed)
    for s in pooled:
        if s.particles:
            _histogram(out_dir / "histograms", s, tag=s.image.replace("ALL", "").strip(" []"))
    if pooled:
        _fractions_figure(out_dir / "figures" / "fractions.png", options, results, pooled, groups, intervals, bootstrap)
    atomic_write_text(out_dir / "README.md", _readme(options, results, failed, settings or {},
                                                     _resampling(predictor, options), skipped, bootstrap=bootstrap))
    return pooled


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _histogram(folder: Path, s: ClassSummary, tag: str = "") -> Path | None:
    """ECD histogram of the pooled border-free particles of one class, D10/D50/D90 marked."""
    ecd = s.ecd_interior
    if ecd.size == 0:
        logger.info("no border-free %s particles: no histogram", s.name)
        return None
    # matplotlib is slow to import: only when a histogram is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = size_stats(ecd)
    fig = Figure(figsize=(6.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(ecd, bins=min(60, max(5, int(np.sqrt(ecd.size)))), color="0.55", edgecolor="0.3")
    for q, style in (("d10", ":"), ("d50", "--"), ("d90", ":")):
        ax.axvline(stats[f"ecd_{q}"], color="C3", linestyle=style, label=f"{q.upper()} {stats[f'ecd_{q}']:.4g}")
    ax.set_xlabel(f"equivalent circle diameter ({s.unit})")
    ax.set_ylabel("particles")
    ax.set_title(f"{s.name}: {ecd.size} particles ({s.count_border} touching the border excluded)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"ecd_{_safe(s.name)}{'_' + tag if tag else ''}.png"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    return path


def _interval_groups(results: Sequence[ImageResult], options: PredictOptions
                     ) -> dict[str, tuple[list[ImageResult], dict[str, Any] | None]]:
    """The images of each pooled group (labels as :func:`pool_summaries`: ``ALL``, or ``ALL [unit]``)
    and, for a group of one image, its tile counts (from the run or the record; a record written
    before they existed gets them from the image's mask)."""
    units = sorted({r.summaries[0].unit for r in results if r.summaries})
    groups: dict[str, tuple[list[ImageResult], dict[str, Any] | None]] = {}
    for unit in units:
        group = [r for r in results if r.summaries and r.summaries[0].unit == unit]
        tiles = None
        if len(group) == 1:
            tiles = group[0].tiles if group[0].tiles is not None else _tiles_from_mask(group[0], options)
        groups["ALL" if len(units) == 1 else f"ALL [{unit}]"] = (group, tiles)
    return groups


def _group_intervals(label: str, group: Sequence[ImageResult], tiles: dict[str, Any] | None,
                     bootstrap: Bootstrap) -> dict[str, dict[str, Any]]:
    """:func:`segment.uncertainty.folder_intervals` of one group; on an error, no interval (logged) but
    the folder tables all the same."""
    try:
        return folder_intervals([r.summaries for r in group], bootstrap, tiles, label)
    except Exception as exc:  # noqa: BLE001 - the tables matter more than their intervals
        logger.warning("%s: no confidence intervals (%s: %s)", label, type(exc).__name__, exc)
        return {}


def _tiles_from_mask(result: ImageResult, options: PredictOptions) -> dict[str, Any] | None:
    """Tile counts of a resumed image whose record predates them: its mask quantified again with the
    same options (the same particles, so the same tiles as a fresh run). None if the mask is unreadable."""
    try:
        labels = np.asarray(read_raw(result.outputs["mask"]))
        _, table = quantify_labels(labels, list(options.class_names), options.particle_indices,
                                   scale=Scale(result.pixel_size_nm), watershed=options.watershed,
                                   h=options.watershed_h, image=result.key)
        return tile_table(labels, table, list(options.class_names), options.particle_indices)
    except Exception as exc:  # noqa: BLE001 - the interval is optional; the tables are not
        logger.warning("%s: no tile counts for the one-image interval (%s)", result.key, exc)
        return None


def _fractions_figure(path: Path, options: PredictOptions, results: Sequence[ImageResult],
                      pooled: Sequence[ClassSummary], groups: Mapping[str, tuple[list[ImageResult], Any]],
                      intervals: Mapping[tuple[str, str], Mapping[str, Any]], bootstrap: Bootstrap) -> Path | None:
    """figures/fractions.png (:mod:`segment.fractions_figure`): per-image fractions (dots), the folder
    fraction and its interval per pooled group."""
    names = [str(n) for n in options.class_names]
    fractions = {r.key: [s.area_fraction for s in r.summaries] for r in results}
    nan = float("nan")
    bands = []
    for label, (group, tiles) in groups.items():
        est = {s.name: s.area_fraction for s in pooled if s.image == label}
        ci = [intervals.get((label, n), {}) for n in names]
        tile_fractions = None
        if len(group) == 1 and tiles is not None:
            total = np.asarray(tiles["total_pixels"], np.float64)[:, None]
            tile_fractions = np.stack([tiles["classes"][n]["pixels"] for n in names], 1) / total
        bands.append(Band(label=label, images=[r.key for r in group], estimate=[est.get(n, nan) for n in names],
                          low=[c.get("area_fraction_ci_low", nan) for c in ci],
                          high=[c.get("area_fraction_ci_high", nan) for c in ci],
                          over=str(ci[0].get("ci_over", "images")) if ci else "images",
                          tile_fractions=tile_fractions, method=bootstrap.describe()))
    flagged = {r.key for r in results if r.ood and r.ood["flagged"]}  # OOD flag (segment.ood)
    try:
        return fractions_figure(path, names, fractions, bands, colors=options.colors, flagged=flagged,
                                level=bootstrap.level)
    except Exception as exc:  # noqa: BLE001 - a figure must not cost the run its tables
        logger.warning("figure %s not written: %s", path, exc)
        return None


def _resampling(predictor: Predictor, options: PredictOptions) -> str:
    grid = predictor.meta.get("model_pixel_size_nm")
    if grid and options.match_pixel_size:
        return (f"images with a known pixel size resized to the model grid's {grid:g} nm/px, the others by "
                f"the model's zoom {predictor.zoom:g}; masks and statistics in native pixels "
                "(images.csv: zoom per image)")
    return f"every image resized by the model's zoom {predictor.zoom:g}; masks and statistics in native pixels"


def _interval_readme(bootstrap: Bootstrap) -> list[str]:
    """The README's statement of how the confidence intervals are computed (segment.uncertainty)."""
    return [
        "## Confidence intervals (ALL rows of summary.csv)",
        f"- Method: {bootstrap.describe()} (numpy default_rng([seed, crc32(group name)])), one set of",
        "  resamples shared by every class and statistic of a pooled group.",
        "- Over images (ci_over = images), the independent unit: each resample draws as many images as the",
        "  group has, with replacement, and recomputes the pooled statistic from the drawn images: area fraction",
        "  = summed class pixels / summed analysed pixels (the pixel-weighted mean of the per-image fractions,",
        "  as in the ALL rows), number_density = summed Gundersen counts / summed analysed area, ecd_mean,",
        "  ecd_median, ecd_d10, ecd_d90 over the drawn images' pooled border-free particles.",
        "- A group of ONE image has no replicate image: its interval is over tiles of that image (ci_over =",
        "  tiles ..., about 256 px, at least 4 x 4; particles belong to the tile holding their centroid). It",
        "  describes the variability within this field of view only, not between fields or specimens: image",
        "  more fields for an interval that covers those.",
        "- No interval (empty cells) for fewer than 2 units, or when the statistic is undefined (no border-free",
        f"  particle drawn) in more than {100 * (1 - bootstrap.level) / 2:g} % of the resamples.",
        "- ECDs of small particles take few values (whole pixel counts): an interval of their median, D10 or D90",
        "  can have zero width, because most resamples hit the same value.",
        "- The intervals cover sampling variability only (which images were taken), not segmentation errors.",
        "- Coverage measured by simulation (BENCHMARKS.md, issue 17): the t interval (default) held 90-97.5 % at 5",
        "  and 20 images; the percentile bootstrap only 79-90 % at 5 images (too narrow).",
        "",
    ]


def _readme(options: PredictOptions, results: Sequence[ImageResult], failed: Sequence[tuple[str, str]],
            settings: Mapping[str, Any], resampling: str, skipped: int = 0,
            bootstrap: Bootstrap | None = None) -> str:
    names = list(options.class_names)
    particles = [names[i] for i in options.particle_indices]
    phases = [n for i, n in enumerate(names) if i not in options.particle_indices]
    crop = ("automatic data-bar detection (segment.databar)" if options.databar == "auto"
            else f"{options.crop_bottom} bottom rows cropped" if options.crop_bottom else "none")
    units = ("given with --pixel-size" if options.pixel_size_override and options.pixel_size_nm
             else "pixels forced with --pixel-size px" if options.pixel_size_override
             else "from each file's metadata (TIFF resolution / SEM vendor tags); pixels when absent")
    split = (f"split by a distance-transform watershed (h = {options.watershed_h:g} px)" if options.watershed
             else "not split (8-connected components)")
    resumed = f" ({skipped} of them by an earlier run on this folder)" if skipped else ""
    lines = [
        "# segment.predict output",
        "",
        f"{len(results)} image(s) segmented{resumed}, {len(failed)} failed (failures.csv).",
        "",
        "## Settings",
        *[f"- {k}: {v}" for k, v in settings.items() if v is not None],
        f"- classes: {', '.join(f'{i} {n}' for i, n in enumerate(names))}",
        f"- particle classes: {', '.join(particles) or 'none'}; phase classes (area fraction only): "
        f"{', '.join(phases) or 'none'}",
        f"- data bar: {crop}; masks, statistics and areas cover the analysed rows only",
        f"- pixel size: {units}",
        f"- resampling: {resampling}",
        f"- touching particles: {split}",
        "",
        "## Choices",
        "- Area fraction: pixels of the class / analysed pixels, border particles included.",
        "- Particles touching the image border (or the data-bar crop line) are cut: they are EXCLUDED from",
        "  every size statistic (ecd_*, area_mean) and counted separately in count_border.",
        "- number_density uses Gundersen's counting rule: particles touching the bottom or right border are",
        "  not counted, particles touching only the top or left border are, over the analysed area; per um^2",
        "  when the pixel size is known (density_unit 1/um^2), else per 10^6 px^2 (1/Mpx).",
        "- ECD = sqrt(4 area / pi); D10/D50/D90 are number-weighted percentiles of the ECD (D50 = median).",
        "- Perimeter: Crofton estimate (scikit-image perimeter_crofton). Aspect ratio: major / minor axis of the",
        "  ellipse with the same second moments (empty for one-pixel-thin particles).",
        "- Lengths are in nm and areas in nm^2 when the pixel size is known, else in px and px^2; the `unit`",
        "  column (summary.csv) and the column names (particles/*.csv) say which. Centroids are in pixels.",
        "",
        *_interval_readme(bootstrap or Bootstrap()),
        "## Files",
        "- masks/KEY.png|.tif: uint8 class indices (lossless); overlays/KEY.png: preview (downsampled);",
        "  probabilities/KEY.tif (--probs): K x H x W uint8, softmax x 255, classes in order.",
        "- particles/KEY.csv: particle, class, area, ecd, perimeter, aspect_ratio, centroid_y_px, centroid_x_px,",
        "  touches_border (1 = cut by the border, excluded from size statistics).",
        "- summary.csv: one row per image and class; rows with image ALL pool all images (ALL [nm] / ALL [px]",
        "  when only some images have a pixel size). kind = particles or phase. The ALL rows also carry the",
        "  confidence intervals (columns ci_level, ci_over, ci_units, <statistic>_ci_low / _ci_high).",
        "- figures/fractions.png: per class, each image's area fraction (dots) and the folder fraction (line)",
        "  with its confidence interval (band); for one image, its tiles' fractions (grey dots).",
        "- images.csv: size, data-bar rows, pixel size and its source, zoom, seconds and model_tiles (tiles the",
        "  model ran on) per image; the log has one line per image (time, tiles/s, fractions, OOD score).",
        "- With an OOD summary (segment.ood): images.csv ood_score (mean of the tiles' scores; about 1 in",
        "  distribution), ood_threshold, flagged (1 = score above the threshold: the image looks unlike the",
        "  training images, check its mask), ood_tiles_flagged, ood_knn (k-NN feature distance), mean_entropy",
        "  (mean predictive entropy, nats); ood/KEY.csv the same per tile; ood/KEY.png the per-tile map.",
        "- histograms/ecd_CLASS.png: pooled ECD histogram of the border-free particles of each particle class.",
        "- records/KEY.json: per image, what the tables above need; written after all of the image's outputs.",
        "  A rerun on this folder skips the images whose record matches (same input file, model and settings)",
        "  and redoes the others; --overwrite redoes all.",
        "",
    ]
    return "\n".join(lines)
