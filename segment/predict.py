"""Folders of large micrographs -> class masks, overlays and the numbers materials scientists report.

For every input image: bounded-memory sliding-window segmentation (:mod:`segment.stream`), an
optional SEM data-bar crop (:mod:`segment.databar`), then phase fractions and particle statistics
(:mod:`segment.quantify`). An unreadable or failing image is logged and listed; the run goes on
and exits with status 1 at the end. A model whose ``model.json`` records its grid's pixel size
(``data.pixel_size_nm`` at training) sees every image with a known pixel size resized to that grid
(:func:`image_zoom`; ``--no-match-pixel-size`` keeps the model's zoom); outputs stay in native pixels.

Outputs in ``--out DIR`` (``KEY`` is the image's path relative to the inputs' common folder,
without its suffix; the README written there states every choice and column):

* ``masks/KEY.png`` (``.tif``, deflate, with the pixel size, when the longest side > 4096):
  uint8 class indices of the analysed area (the data bar cropped off);
* ``overlays/KEY.png``: class colours over the contrast-stretched image, at most
  ``--overlay-max-side`` pixels on a side;
* ``probabilities/KEY.tif`` (``--probs``): ``K x H x W`` uint8 softmax probabilities x 255;
* ``particles/KEY.csv``: one row per particle;
* ``summary.csv``: one row per image and class, plus pooled ``ALL`` rows per class with 95 %
  bootstrap intervals (:mod:`segment.uncertainty`: over images, or over tiles for one image);
* ``images.csv``: per image size, data-bar rows, pixel size and its source, zoom, seconds, tiles;
* ``histograms/ecd_CLASS.png``: ECD histograms of the particle classes, all images pooled;
* ``figures/fractions.png``: per-image phase fractions and the folder's with its 95 % interval;
* ``failures.csv``: images that failed and why;
* ``records/KEY.json``: what the folder tables need of one image, written last (see below);
* ``ood/KEY.csv``, ``ood/KEY.png`` (with an OOD summary, :mod:`segment.ood`): per-tile OOD scores
  and their map; images.csv then has the image's score and flag, and flagged images are warned about;
* ``model.onnx`` (``--backend onnx`` without ``--onnx-file``): the checkpoint exported for
  onnxruntime (:mod:`segment.onnx_backend`), checked against it and reused by reruns.

Resuming: an image's record is removed before any of its outputs is touched and written (atomically,
like every output) after all of them, so a record means complete outputs. A rerun on the same
``--out`` skips the images whose record matches (same input file, model and settings, outputs
present), reads their numbers back from the records so that the folder tables still cover every
image, and redoes the rest; ``--overwrite`` redoes all. Temporary files a killed run left are
removed at the start. Records also hold the image's per-tile counts (``tiles``, the units of a
one-image folder's interval); a record without them (written before issue 17) is still valid, and a
one-image folder then takes them from the image's mask.

CLI::

    python -m segment.predict CHECKPOINT INPUTS... --out DIR [--databar auto | --crop-bottom N]
        [--pixel-size 2.5nm] [--particle-classes secondary,tertiary] [--watershed] [--tta]
        [--overlap 0.5] [--batch-size 8] [--device cuda | --backend onnx [--onnx-file F]] [--probs] [--overwrite]
        [--ci-resamples 2000] [--ci-seed 0] [--ci-method t|percentile|bca]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import copy
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.io import IMAGE_SUFFIXES, list_images, write_tiff
from pretrain.outputs import atomic_path, atomic_write_text, remove_stale_temps
from pretrain.cli_checks import writable_dir
from segment.databar import detect_databar
from segment.infer import Predictor
from segment.onnx_backend import BACKENDS, onnx_predictor, weights_digest
from segment.ood import EntropyTiles, OODSummary, native_tile, tile_features
from segment.progress import TileProgress, format_seconds
from segment.quantify import (
    PARTICLE_COLUMNS,
    SUMMARY_COLUMNS,
    ClassSummary,
    Scale,
    parse_pixel_size,
    pool_summaries,
    quantify_labels,
    size_stats,
)
from segment.sources import CroppedSource, RowSource, open_source, thumbnail
from segment.stream import predict_stream
from segment.uncertainty import CI_COLUMNS, Bootstrap, folder_intervals, tile_table
from segment.zoom import check_zoom, zoom_arg

__all__ = [
    "PredictOptions",
    "ImageResult",
    "RunResult",
    "expand_inputs",
    "output_keys",
    "predict_image",
    "predict_paths",
    "main",
]

logger = logging.getLogger(__name__)

PNG_MAX_SIDE = 4096
"""Masks with a longer side are written as deflate TIFF (PNG writers and viewers struggle)."""

IMAGE_COLUMNS = ("image", "path", "height", "width", "databar_rows", "analysed_height",
                 "pixel_size_nm", "pixel_size_source", "zoom", "seconds", "model_tiles",
                 "ood_score", "ood_threshold", "flagged", "ood_tiles_flagged", "ood_knn", "mean_entropy", "mask")


@dataclass
class PredictOptions:
    """What :func:`predict_image` does besides segmenting.

    ``databar``: "off" or "auto" (:func:`segment.databar.detect_databar`); ``crop_bottom``: rows
    to drop at the bottom instead. ``pixel_size_nm`` overrides the files' metadata when
    ``pixel_size_override`` is True (None then forces pixel units). ``particle_classes``: class
    indices measured as particles (None: every class but ``background``). ``match_pixel_size``:
    resize each image whose pixel size is known to the model's grid (:func:`image_zoom`).
    """

    class_names: Sequence[str]
    colors: Sequence[Sequence[int]]
    background: int | None = 0
    particle_classes: Sequence[int] | None = None
    databar: str = "off"
    crop_bottom: int = 0
    pixel_size_nm: float | None = None
    pixel_size_override: bool = False
    watershed: bool = False
    watershed_h: float = 2.0
    save_probs: bool = False
    overlays: bool = True
    overlay_max_side: int = 2048
    mask_format: str = "auto"
    match_pixel_size: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.databar not in ("off", "auto"):
            raise ValueError(f"databar must be 'off' or 'auto', got {self.databar!r}")
        if self.crop_bottom < 0:
            raise ValueError(f"crop_bottom must be >= 0, got {self.crop_bottom}")
        if self.databar == "auto" and self.crop_bottom:
            raise ValueError("give either databar='auto' or crop_bottom, not both")
        if self.mask_format not in ("auto", "png", "tif"):
            raise ValueError(f"mask_format must be auto, png or tif, got {self.mask_format!r}")
        if len(self.colors) != len(self.class_names):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.colors)} colours")

    @property
    def particle_indices(self) -> list[int]:
        if self.particle_classes is not None:
            return sorted(set(int(c) for c in self.particle_classes))
        return [i for i in range(len(self.class_names)) if i != self.background]


@dataclass
class ImageResult:
    """One segmented and quantified image."""

    path: Path
    key: str
    height: int
    width: int
    databar_rows: int
    pixel_size_nm: float | None
    pixel_size_source: str
    zoom: float
    seconds: float
    summaries: list[ClassSummary]
    outputs: dict[str, Path] = field(default_factory=dict)
    tiles: dict[str, Any] | None = None  # segment.uncertainty.tile_table: the one-image interval's units
    model_tiles: int = 0  # tiles the model ran on (0 in records written before they were counted)
    inference_seconds: float = 0.0  # seconds of the band-wise tiling (model, blending, argmax)
    ood: dict[str, Any] | None = None  # out-of-distribution score, threshold and flag, when the model has them

    def log_line(self, index: int | None = None, total: int | None = None) -> str:
        """One line for the log: time, tiles/s, fractions per class (and the OOD score and flag when
        the image has them)."""
        where = f"[{index}/{total}] " if index is not None and total else ""
        speed = (f", {self.model_tiles} tiles in {format_seconds(self.inference_seconds)} "
                 f"({self.model_tiles / self.inference_seconds:.3g} tiles/s)"
                 if self.model_tiles and self.inference_seconds > 0 else "")
        fractions = ", ".join(f"{s.name} {100 * s.area_fraction:.2f} %" for s in self.summaries)
        ood = self.ood
        flag = ""
        if ood is not None and ood.get("score") is not None:
            flag = f"; OOD score {ood['score']:.3g} (threshold {ood['threshold']:.3g})" + (
                " FLAGGED: out of distribution?" if ood.get("flagged") else " ok")
        return (f"{where}{self.key}: {self.width}x{self.height + self.databar_rows} px, "
                f"{format_seconds(self.seconds)}{speed}; {fractions}{flag}")

    def row(self) -> dict[str, Any]:
        return dict(image=self.key, path=str(self.path), height=self.height + self.databar_rows,
                    width=self.width, databar_rows=self.databar_rows, analysed_height=self.height,
                    pixel_size_nm=self.pixel_size_nm if self.pixel_size_nm is not None else "",
                    pixel_size_source=self.pixel_size_source, zoom=round(self.zoom, 6),
                    seconds=round(self.seconds, 2), model_tiles=self.model_tiles or "",
                    **self._ood_columns(), mask=str(self.outputs.get("mask", "")))

    def _ood_columns(self) -> dict[str, Any]:
        o = self.ood
        if not o:
            return {}
        return dict(ood_score=o["score"], ood_threshold=o["threshold"], flagged=int(o["flagged"]),
                    ood_tiles_flagged=f"{o['tiles_flagged']}/{o['tiles']}", ood_knn=o["knn"], mean_entropy=o["entropy"])


@dataclass
class RunResult:
    """Everything a folder run produced; ``failures`` holds ``(input, error)`` pairs, ``skipped`` the
    keys of the images an earlier run had completed (read back from their records)."""

    out_dir: Path
    images: list[ImageResult]
    failures: list[tuple[str, str]]
    pooled: list[ClassSummary]
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# ----------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files from files, folders (recursive) and glob patterns, in order, without duplicates.

    Returns ``(paths, failures)``: an input that names nothing becomes a failure. A file given by
    name is kept whatever its suffix (reading it reports the problem); folders and patterns
    contribute only files with a supported suffix (:data:`pretrain.io.IMAGE_SUFFIXES`).
    """
    found: list[Path] = []
    failures: list[tuple[str, str]] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files = list_images(p)
            if not files:
                failures.append((str(spec), f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder"))
        elif p.exists():
            files = [p]
        else:
            files = []
            for m in sorted(glob.glob(str(spec), recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    files += list_images(mp)
                elif mp.suffix.lower() in IMAGE_SUFFIXES and not mp.name.startswith("."):
                    files.append(mp)
            if not files:
                failures.append((str(spec), "no such file, folder or matching image"))
        found += files
    seen: set[Path] = set()
    unique = []
    for f in found:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, failures


def output_keys(paths: Sequence[Path]) -> dict[Path, str]:
    """A unique output name per input: the path relative to the inputs' common folder, without
    suffix (``sub/img``); names that would collide (``a.tif`` and ``a.png``) keep the suffix as
    ``a_tif``."""
    if not paths:
        return {}
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([r.parent for r in resolved]))
    stems = [r.relative_to(root).with_suffix("").as_posix() for r in resolved]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    keys = {}
    for p, r, s in zip(paths, resolved, stems):
        keys[p] = s if counts[s] == 1 else f"{s}_{r.suffix.lstrip('.').lower()}"
    return keys


# ----------------------------------------------------------------------------- writers
@contextmanager
def _atomic_memmap(path: Path, shape: tuple[int, ...], **kwargs: Any) -> Iterator[np.ndarray]:
    """A uint8 TIFF memory map under a temporary name, renamed to ``path`` only on success."""
    import tifffile

    with atomic_path(path) as tmp:
        mm = tifffile.memmap(tmp, shape=shape, dtype=np.uint8, photometric="minisblack", **kwargs)
        yield mm
        mm.flush()
        del mm


def _write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    return path


def _write_mask(base: Path, labels: np.ndarray, pixel_size_nm: float | None, fmt: str) -> Path:
    if fmt == "png" or (fmt == "auto" and max(labels.shape) <= PNG_MAX_SIDE):
        return _write_png(base.with_name(base.name + ".png"), labels)
    return write_tiff(base.with_name(base.name + ".tif"), labels, pixel_size_nm=pixel_size_nm)


def _fmt(v: Any) -> Any:
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return "" if not math.isfinite(v) else f"{float(v):.6g}"
    if isinstance(v, np.integer):
        return int(v)
    return v


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        values = [r.get(c, "") for c in columns] if isinstance(r, Mapping) else list(r)
        writer.writerow([_fmt(v) for v in values])
    atomic_write_text(path, buf.getvalue())
    return path


def _particle_csv(path: Path, table: Mapping[str, np.ndarray], unit: str) -> Path:
    names = {"area": f"area_{unit}2", "ecd": f"ecd_{unit}", "perimeter": f"perimeter_{unit}"}
    columns = [names.get(c, c) for c in PARTICLE_COLUMNS]
    cols = [table[c] for c in PARTICLE_COLUMNS]
    return _write_csv(path, columns, zip(*cols))


# ----------------------------------------------------------------------------- one image
def _crop(source: RowSource, options: PredictOptions) -> tuple[RowSource, int]:
    h = source.shape[0]
    rows = options.crop_bottom
    if options.databar == "auto":
        bar = detect_databar(source)
        rows = bar.rows
        logger.info("%s: data bar: %s", source.path, bar.reason)
    if rows >= h:
        raise ValueError(f"{source.path}: cropping {rows} bottom rows leaves nothing of {h} rows")
    return (CroppedSource(source, h - rows) if rows else source), rows


def image_zoom(predictor: Predictor, pixel_size_nm: float | None, match: bool = True) -> float:
    """The zoom for one image: its pixel size over the model grid's (``model_pixel_size_nm`` in
    model.json, i.e. ``data.pixel_size_nm / data.zoom`` of training) when both are known and
    ``match``, else the model's own ``zoom``. A 5 nm/px image for a 10 nm/px model gets 0.5."""
    model_px = predictor.meta.get("model_pixel_size_nm")
    if match and model_px and pixel_size_nm:
        return float(pixel_size_nm) / float(model_px)
    return predictor.zoom


def predict_image(predictor: Predictor, path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                  options: PredictOptions, key: str | None = None, ood: OODSummary | None = None) -> ImageResult:
    """Segment, crop, quantify and write the outputs of one image (see the module docstring);
    with ``ood`` (:mod:`segment.ood`), also its OOD score per tile and per image."""
    t0 = time.perf_counter()
    path, out_dir = Path(path), Path(out_dir)
    key = key or path.stem
    outputs: dict[str, Path] = {}
    with open_source(path, gray=predictor.in_chans == 1) as raw:
        source, bar_rows = _crop(raw, options)
        h, w = source.shape
        if options.pixel_size_override:
            pixel_size = options.pixel_size_nm
            ps_source = "option" if pixel_size is not None else "none (--pixel-size px)"
        else:
            pixel_size = source.pixel_size_nm
            ps_source = "metadata" if pixel_size is not None else "none"
        scale = Scale(pixel_size)
        names = list(options.class_names)
        zoom = image_zoom(predictor, pixel_size, options.match_pixel_size)
        if zoom != predictor.zoom:
            logger.info("%s: %.4g nm/px, model grid %.4g nm/px: zoom %.4g", path, pixel_size,
                        predictor.meta["model_pixel_size_nm"], zoom)
            predictor = copy.copy(predictor)  # same model; this image's zoom only
            predictor.zoom = check_zoom(zoom)

        with ExitStack() as stack:
            probs = None
            if options.save_probs:
                outputs["probabilities"] = out_dir / "probabilities" / f"{key}.tif"
                probs = stack.enter_context(_atomic_memmap(
                    outputs["probabilities"], (len(names), h, w),
                    metadata={"axes": "CYX", "classes": names, "values": "softmax probability x 255"}))
            tiles_done = TileProgress(key, report=options.progress)
            entropy = EntropyTiles((h, w), native_tile(ood.tile, predictor.zoom)) if ood is not None else None
            labels = predict_stream(predictor, source, probs_out=probs, progress=tiles_done, desc=key,
                                    on_logits=entropy)
        if int(labels.max(initial=0)) >= len(names):
            raise ValueError(f"the model predicts class {int(labels.max())} but only {len(names)} "
                             f"class names are known {names}")
        outputs["mask"] = _write_mask(out_dir / "masks" / key, labels, pixel_size, options.mask_format)
        thumb = stride = None
        if options.overlays or ood is not None:
            from segment.overlay import contrast_stretch

            thumb, stride = thumbnail(source, options.overlay_max_side)
            thumb = contrast_stretch(thumb)
        if options.overlays:
            from segment.overlay import overlay

            rgb = overlay(thumb, labels[::stride, ::stride], options.colors, background=options.background)
            outputs["overlay"] = _write_png(out_dir / "overlays" / f"{key}.png", rgb)
        ood_result = None
        if ood is not None:
            assert entropy is not None
            ood_result = _ood_outputs(predictor, source, ood, entropy, out_dir, key, outputs, (thumb, stride))

    summaries, table = quantify_labels(labels, names, options.particle_indices, scale=scale,
                                       watershed=options.watershed, h=options.watershed_h, image=key)
    tiles = tile_table(labels, table, names, options.particle_indices)
    del labels
    outputs["particles"] = _particle_csv(out_dir / "particles" / f"{key}.csv", table, scale.unit)
    return ImageResult(path=path, key=key, height=h, width=w, databar_rows=bar_rows, pixel_size_nm=pixel_size,
                       pixel_size_source=ps_source, zoom=predictor.zoom, seconds=time.perf_counter() - t0, summaries=summaries,
                       outputs=outputs, tiles=tiles, model_tiles=tiles_done.done,
                       inference_seconds=tiles_done.seconds, ood=ood_result)


OOD_TILE_COLUMNS = ("tile_y", "tile_x", "tile_h", "tile_w", "knn_distance", "mean_entropy", "ood_score", "flagged")


def _ood_outputs(predictor: Predictor, source: RowSource, ood: OODSummary, entropy: EntropyTiles, out_dir: Path,
                 key: str, outputs: dict[str, Path], preview: tuple[Any, Any]) -> dict[str, Any]:
    """Score one image's tiles (:mod:`segment.ood`), write ``ood/KEY.csv`` and the map ``ood/KEY.png``;
    returns the image's numbers (score = mean tile score, flagged above the threshold)."""
    from segment.ood_figure import score_map_figure

    model = getattr(predictor, "feature_model", None)  # the ONNX backend keeps its PyTorch twin here
    model = predictor.model if model is None else model
    origins, feats = tile_features(predictor, model, source, ood.tile)
    knn, ent = ood.knn(feats), entropy.means().ravel()
    scores = ood.combine(knn, ent)
    h, w = source.shape
    side = native_tile(ood.tile, predictor.zoom)  # the grid cell in image pixels
    rows = [dict(tile_y=y, tile_x=x, tile_h=min(side, h - y), tile_w=min(side, w - x), knn_distance=k,
                 mean_entropy=e, ood_score=c, flagged=bool(c > ood.threshold))
            for (y, x), k, e, c in zip(origins, knn, ent, scores, strict=True)]
    outputs["ood_tiles"] = _write_csv(out_dir / "ood" / f"{key}.csv", OOD_TILE_COLUMNS, rows)
    thumb, stride = preview
    try:
        outputs["ood_map"] = score_map_figure(out_dir / "ood" / f"{key}.png", thumb, stride, (h, w), origins,
                                              side, scores, ood.threshold, key)
    except Exception as exc:  # noqa: BLE001 - a figure must not cost the image its numbers
        logger.warning("%s: OOD map not written (%s)", key, exc)
    score = float(np.mean(scores))
    return dict(score=score, knn=float(np.mean(knn)), entropy=entropy.image_mean(), threshold=float(ood.threshold),
                flagged=bool(score > ood.threshold), tiles=len(rows), tiles_flagged=int(sum(r["flagged"] for r in rows)))


# ----------------------------------------------------------------------------- folder
def predict_paths(predictor: Predictor, paths: Sequence[Path], out_dir: str | os.PathLike[str],
                  options: PredictOptions, *, failures: Sequence[tuple[str, str]] = (),
                  settings: Mapping[str, Any] | None = None, overwrite: bool = False,
                  bootstrap: Bootstrap | None = None, ood: OODSummary | None = None) -> RunResult:
    """Run :func:`predict_image` over ``paths``, then write the folder tables, histograms and README.

    ``bootstrap``: how the confidence intervals of the pooled rows are computed
    (:mod:`segment.uncertainty`; default 95 % bootstrap t interval, B = 2000, seed 0).
    ``ood``: the checkpoint's OOD summary (:mod:`segment.ood`); each image then gets its score, and
    the images above the threshold are named in a warning.

    A failing image is logged with its path and reason and recorded; the others go on.
    ``failures`` are earlier ones (inputs that matched nothing) to list with them. Images that an
    earlier run on ``out_dir`` completed with the same model and options are not redone, unless
    ``overwrite`` (see the module docstring, "Resuming"); the tables cover them all the same.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if removed := remove_stale_temps(out_dir):
        logger.info("removed %d temporary file(s) an interrupted earlier run left in %s", removed, out_dir)
    failed = list(failures)
    keys = output_keys(paths)
    fingerprint = run_fingerprint(predictor, options, ood)
    done = {} if overwrite else _completed(paths, keys, out_dir, fingerprint)
    skipped = [keys[p] for p in paths if p in done]
    items: Iterable[Path] = [p for p in paths if p not in done]
    if options.progress and sys.stderr.isatty():  # in a log file, the per-image lines below say it
        from tqdm.auto import tqdm

        items = tqdm(items, desc="images", unit="img")
    todo = len(paths) - len(skipped)
    for i, path in enumerate(items, 1):
        try:
            done[path] = _predict_recorded(predictor, path, out_dir, options, keys[path], fingerprint, ood)
            logger.info("%s", done[path].log_line(i, todo))
        except KeyboardInterrupt:
            logger.warning("interrupted: %d of %d image(s) complete in %s; the same command resumes there",
                           len(done), len(paths), out_dir)
            raise
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            logger.error("failed: %s (%s)", message, type(exc).__name__)
            logger.debug("traceback for %s", path, exc_info=True)
            failed.append((str(path), f"{type(exc).__name__}: {exc}"))

    results = [done[p] for p in paths if p in done]  # input order, resumed or not
    summaries = [s for r in results for s in r.summaries]
    pooled = pool_summaries(summaries) if summaries else []
    bootstrap = bootstrap or Bootstrap()
    groups = _interval_groups(results, options)
    intervals = {(label, name): cols for label, (group, tiles) in groups.items()
                 for name, cols in _group_intervals(label, group, tiles, bootstrap).items()}
    _write_csv(out_dir / "summary.csv", (*SUMMARY_COLUMNS, *CI_COLUMNS),
               [*(s.row() for s in summaries), *({**s.row(), **intervals.get((s.image, s.name), {})} for s in pooled)])
    _write_csv(out_dir / "images.csv", IMAGE_COLUMNS, [r.row() for r in results])
    _write_csv(out_dir / "failures.csv", ("input", "error"), failed)
    for s in pooled:
        if s.particles:
            _histogram(out_dir / "histograms", s, tag=s.image.replace("ALL", "").strip(" []"))
    if pooled:
        _fractions_figure(out_dir / "figures" / "fractions.png", options, results, pooled, groups, intervals, bootstrap)
    atomic_write_text(out_dir / "README.md", _readme(options, results, failed, settings or {},
                                                           _resampling(predictor, options), len(skipped),
                                                           bootstrap=bootstrap))
    if flagged := [r.key for r in results if r.ood and r.ood["flagged"]]:
        logger.warning("%d of %d image(s) look out of distribution for this model (OOD score above %.3g; "
                       "images.csv, ood/KEY.png show where): %s. Check their masks before trusting their numbers.",
                       len(flagged), len(results), ood.threshold if ood else float("nan"), ", ".join(flagged))
    if failed:
        logger.error("%d of %d input(s) failed (listed in %s):\n%s", len(failed), len(paths) + len(failures),
                     out_dir / "failures.csv", "\n".join(f"  {p}: {e}" for p, e in failed))
    return RunResult(out_dir=out_dir, images=results, failures=failed, pooled=pooled, skipped=skipped)


# ----------------------------------------------------------------------------- resume
RECORD_FORMAT = 1
"""Version of ``records/KEY.json``; a record of another version is redone, never misread."""


def _record_path(out_dir: Path, key: str) -> Path:
    return out_dir / "records" / f"{key}.json"


def _input_id(path: Path) -> dict[str, int] | None:
    """Size and modification time of an input: a changed file is redone. None if it cannot be read
    (``predict_image`` then reports why)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def run_fingerprint(predictor: Predictor, options: PredictOptions, ood: OODSummary | None = None) -> str:
    """A hash of everything that decides an image's outputs: the model's weights and ``model.json``,
    the inference settings and ``options`` (not the device, batch size or progress bars). An ONNX
    backend's masks may differ from PyTorch's on a few pixels, so the backend counts too."""
    model = predictor.model
    what = dict(
        options={k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        meta=predictor.meta, weights=getattr(model, "weights_sha256", "") or weights_digest(model),
        tile=predictor.tile_hw,
        overlap=predictor.overlap, gaussian=predictor.gaussian, tta=predictor.tta, mean=predictor.mean,
        std=predictor.std, intensity=predictor.intensity, zoom=predictor.zoom, amp=str(predictor.amp_dtype),
    )
    if (backend := getattr(model, "backend", "torch")) != "torch":  # torch runs keep their older fingerprints
        what["backend"] = backend
    if ood is not None:
        what["ood"] = dict(threshold=ood.threshold, k=ood.k, tile=ood.tile, scales=(ood.knn_scale, ood.entropy_scale),
                           bank=hashlib.sha256(np.ascontiguousarray(ood.bank).tobytes()).hexdigest())
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _summary_json(s: ClassSummary) -> dict[str, Any]:
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    d.update(scale=s.scale.pixel_size_nm, ecd_interior=np.asarray(s.ecd_interior, np.float64).tolist(),
             area_interior=np.asarray(s.area_interior, np.float64).tolist())
    for k in ("pixels", "total_pixels", "count_interior", "count_border", "count_gundersen"):
        d[k] = int(d[k])
    d["particles"] = bool(d["particles"])
    for k in ("analysed_area", "number_density"):  # NaN is not JSON: null
        d[k] = float(d[k]) if math.isfinite(d[k]) else None
    return d


def _summary_from_json(d: Mapping[str, Any]) -> ClassSummary:
    d = dict(d)
    d.update(scale=Scale(d["scale"]), ecd_interior=np.asarray(d["ecd_interior"], np.float64),
             area_interior=np.asarray(d["area_interior"], np.float64))
    for k in ("analysed_area", "number_density"):
        d[k] = float("nan") if d[k] is None else float(d[k])
    return ClassSummary(**d)


def _write_record(out_dir: Path, result: ImageResult, source: dict[str, int] | None, fingerprint: str) -> None:
    image = dict(height=int(result.height), width=int(result.width), databar_rows=int(result.databar_rows),
                 pixel_size_nm=None if result.pixel_size_nm is None else float(result.pixel_size_nm),
                 pixel_size_source=result.pixel_size_source,
                 zoom=float(result.zoom), seconds=float(result.seconds), model_tiles=int(result.model_tiles),
                 inference_seconds=float(result.inference_seconds))
    record = dict(format=RECORD_FORMAT, fingerprint=fingerprint, input=source, image=image,
                  outputs={k: Path(os.path.relpath(v, out_dir)).as_posix() for k, v in result.outputs.items()},
                  summaries=[_summary_json(s) for s in result.summaries])
    if result.tiles is not None:  # optional: records without it (written before issue 17) stay valid
        record["tiles"] = result.tiles
    if result.ood is not None:
        record["ood"] = result.ood
    atomic_write_text(_record_path(out_dir, result.key), json.dumps(record, allow_nan=False))


def _read_record(out_dir: Path, path: Path, key: str, fingerprint: str) -> tuple[ImageResult | None, str]:
    """The result an earlier run recorded for ``path``, or None and why it must be (re)done."""
    record_path = _record_path(out_dir, key)
    if not record_path.is_file():
        return None, "new"
    try:
        record = json.loads(record_path.read_text())
        if record.get("format") != RECORD_FORMAT:
            return None, "record of another version"
        if record["fingerprint"] != fingerprint:
            return None, "model or settings changed"
        if record["input"] is None or record["input"] != _input_id(path):
            return None, "input file changed"
        outputs = {k: out_dir / v for k, v in record["outputs"].items()}
        if not all(p.is_file() for p in outputs.values()):
            return None, "outputs missing"
        summaries = [_summary_from_json(s) for s in record["summaries"]]
        return ImageResult(path=path, key=key, summaries=summaries, outputs=outputs, tiles=record.get("tiles"),
                           ood=record.get("ood"), **record["image"]), "done"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("%s: unreadable (%s)", record_path, exc)
        return None, "record unreadable"


def _completed(paths: Sequence[Path], keys: Mapping[Path, str], out_dir: Path,
               fingerprint: str) -> dict[Path, ImageResult]:
    """The images of ``paths`` whose outputs an earlier run on ``out_dir`` completed; logs the counts."""
    done: dict[Path, ImageResult] = {}
    redo: dict[str, int] = {}
    for path in paths:
        result, why = _read_record(out_dir, path, keys[path], fingerprint)
        if result is not None:
            done[path] = result
        elif why != "new":
            redo[why] = redo.get(why, 0) + 1
    if done:
        logger.info("resuming in %s: %d of %d image(s) already complete, skipped (--overwrite redoes them)",
                    out_dir, len(done), len(paths))
    if redo:
        logger.info("redoing %d image(s) of an earlier run: %s", sum(redo.values()),
                    ", ".join(f"{n} {why}" for why, n in redo.items()))
    return done


def _predict_recorded(predictor: Predictor, path: Path, out_dir: Path, options: PredictOptions, key: str,
                      fingerprint: str, ood: OODSummary | None = None) -> ImageResult:
    """:func:`predict_image` bracketed by its record: removed before any output is touched, written
    after all of them, so that a record always means complete outputs."""
    _record_path(out_dir, key).unlink(missing_ok=True)
    source = _input_id(path)
    result = predict_image(predictor, path, out_dir, options, key=key, ood=ood)
    _write_record(out_dir, result, source, fingerprint)
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _histogram(folder: Path, s: ClassSummary, tag: str = "") -> Path | None:
    """ECD histogram of the pooled border-free particles of one class, D10/D50/D90 marked."""
    ecd = s.ecd_interior
    if ecd.size == 0:
        logger.info("no border-free %s particles: no histogram", s.name)
        return None
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
    from pretrain.io import read_raw

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
    from segment.fractions_figure import Band, fractions_figure

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


# ----------------------------------------------------------------------------- CLI
def parse_particle_classes(text: str, class_names: Sequence[str]) -> list[int]:
    """``"secondary,tertiary"`` or ``"1,2"`` (or ``"none"``) -> class indices."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return []
    lower = {n.lower(): i for i, n in enumerate(class_names)}
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.lower() in lower:
            out.append(lower[part.lower()])
        elif part.isdigit() and int(part) < len(class_names):
            out.append(int(part))
        else:
            raise ValueError(f"--particle-classes: unknown class {part!r}; classes: "
                             f"{', '.join(f'{i}={n}' for i, n in enumerate(class_names))}")
    return sorted(set(out))


def _pixel_size_arg(text: str) -> str:
    try:
        parse_pixel_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segment.predict",
        description="Segment folders of (large) micrographs and quantify phases and particles.")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors + model.json) or run folder")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    g = p.add_argument_group("inference")
    g.add_argument("--overlap", type=float, default=0.5, help="tile overlap fraction (default 0.5)")
    g.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    g.add_argument("--tile-size", type=int, default=None, help="tile edge (default: the checkpoint's)")
    g.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    g.add_argument("--zoom", type=zoom_arg, default=None,
                   help="resize factor between every image and the model's grid (default: the checkpoint's "
                        "data.zoom, or per image from the pixel sizes); given, it is used for every image")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype on the device")
    g.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch (default) or onnx: the checkpoint exported to ONNX (segment.export) and run by "
                        "onnxruntime on the CPU, same tiles and band-wise memory; masks agree with torch's on "
                        ">= 99.9 %% of pixels (needs the [onnx] extra)")
    g.add_argument("--onnx-file", type=Path, default=None, metavar="PATH",
                   help="--backend onnx: the ONNX file to use if it exists (checked against the checkpoint) or to "
                        "export to (default: OUT/model.onnx, reused by reruns)")
    g.add_argument("--probs", action="store_true", help="also write uint8 probability maps")
    units = p.add_argument_group("cropping and units")
    c = units.add_mutually_exclusive_group()
    c.add_argument("--databar", choices=["off", "auto"], default="off",
                   help="'auto': detect and crop an SEM data bar at the bottom")
    c.add_argument("--crop-bottom", type=int, default=0, metavar="N", help="crop N rows at the bottom")
    units.add_argument("--no-match-pixel-size", action="store_true",
                       help="keep the model's zoom for every image (default: images with a known pixel size "
                            "are resized to the model grid's, when model.json records one)")
    units.add_argument("--pixel-size", type=_pixel_size_arg, default=None, metavar="SIZE",
                   help="pixel size for every image, e.g. 2.5nm, 0.01um, 4µm, or px to force pixel units "
                        "(default: from the file metadata, else pixels)")
    q = p.add_argument_group("quantification")
    q.add_argument("--particle-classes", default=None, metavar="NAMES",
                   help="comma-separated class names or indices measured as particles "
                        "(default: every class but the background; 'none' for phases only)")
    q.add_argument("--watershed", action="store_true", help="split touching particles (distance-transform watershed)")
    q.add_argument("--watershed-h", type=float, default=2.0, metavar="PX",
                   help="minimum depth (pixels) of a distance-transform saddle that splits particles (default 2)")
    q.add_argument("--ci-resamples", type=int, default=2000, metavar="B",
                   help="bootstrap resamples of the folder statistics' 95 %% intervals (default 2000)")
    q.add_argument("--ci-seed", type=int, default=0, help="seed of the bootstrap resamples (default 0)")
    q.add_argument("--ci-method", choices=["percentile", "bca", "t"], default="t",
                   help="interval from the bootstrap resamples: t (default: estimate +- t(n-1) x bootstrap SE, "
                        "95 %% coverage held down to 5 images, BENCHMARKS.md), percentile or bca (too narrow "
                        "for folders of few images)")
    d = p.add_argument_group("out-of-distribution score (segment.ood)")
    dx = d.add_mutually_exclusive_group()
    dx.add_argument("--ood", type=Path, default=None, metavar="FOLDER",
                    help="folder with the model's ood.json + ood.safetensors (default: the checkpoint folder's, "
                         "when it has them; python -m segment.ood fits one)")
    dx.add_argument("--no-ood", action="store_true", help="no OOD score even if the checkpoint has a summary")
    o = p.add_argument_group("outputs")
    o.add_argument("--mask-format", choices=["auto", "png", "tif"], default="auto",
                   help=f"mask file format (auto: PNG up to {PNG_MAX_SIDE} px on the longest side, else TIFF)")
    o.add_argument("--overlay-max-side", type=int, default=2048, help="longest side of overlay PNGs")
    o.add_argument("--no-overlays", action="store_true", help="write no overlay PNGs")
    o.add_argument("--no-progress", action="store_true", help="hide progress bars")
    o.add_argument("--overwrite", action="store_true",
                   help="redo every image (default: skip the images an earlier run on --out completed with "
                        "the same model and settings, so that an interrupted run resumes)")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _class_info(meta: Mapping[str, Any], num_classes: int | None) -> tuple[list[str], list[list[int]], int | None]:
    from segment.class_maps import get_class_map

    names = list(meta.get("class_names") or [])
    background: int | None = 0
    if meta.get("class_map"):
        try:
            cm = get_class_map(meta["class_map"])
            names = names or list(cm.names)
            background = cm.default if cm.default is not None else 0
        except (ValueError, TypeError) as exc:
            logger.warning("checkpoint class map unusable (%s); class 0 is the background", exc)
    if not names:
        n = num_classes or int(meta.get("model_kwargs", {}).get("num_classes", 0))
        names = [f"class{i}" for i in range(n)]
    colors = meta.get("colors")
    if not colors or len(colors) != len(names):
        from matplotlib import colormaps

        tab = colormaps["tab10"].colors
        colors = [[int(round(255 * v)) for v in tab[i % len(tab)]] for i in range(len(names))]
    return names, [[int(v) for v in c] for c in colors], background


def _load_ood(args: argparse.Namespace) -> OODSummary | None:
    """The OOD summary ``--ood`` names, else the checkpoint folder's if it has one, else None."""
    from segment.checkpoint import resolve_checkpoint
    from segment.ood import META_FILE, load

    if args.no_ood:
        return None
    folder = args.ood
    if folder is None:
        folder = resolve_checkpoint(args.checkpoint)
        if not (folder / META_FILE).is_file():
            logger.info("no OOD summary in %s: no OOD score (python -m segment.ood fits one)", folder)
            return None
    try:
        return load(folder)
    except ValueError as exc:
        raise SystemExit(f"--ood: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 1 if any input failed."""
    import torch

    args = _parser().parse_args(argv)
    writable_dir(args.out, "--out")  # before loading the model: one line, not a failure at the first image
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    onnx = args.backend == "onnx"
    if args.onnx_file is not None and not onnx:
        raise SystemExit("--onnx-file needs --backend onnx")
    device = args.device or ("cpu" if onnx or not torch.cuda.is_available() else "cuda")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp or "")
    settings: dict[str, Any] = dict(overlap=args.overlap, tta=args.tta, batch_size=args.batch_size,
                                    device=device, amp_dtype=amp, progress=False)
    if args.tile_size:
        settings["tile_size"] = args.tile_size
    if args.zoom is not None:
        settings["zoom"] = args.zoom
    onnx_file = args.onnx_file or args.out / "model.onnx"
    try:  # intensity scaling: the checkpoint's meta["intensity"] ("dtype" when absent), as trained
        if onnx:
            predictor = onnx_predictor(args.checkpoint, onnx_file, **settings)
        else:
            predictor = Predictor.from_checkpoint(args.checkpoint, **settings)
    except ImportError as exc:  # --backend onnx without onnxruntime: the message says how to install it
        raise SystemExit(str(exc)) from None
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        raise SystemExit(f"cannot load checkpoint {args.checkpoint}: {exc}") from None
    names, colors, background = _class_info(predictor.meta, None)
    try:
        particle = None if args.particle_classes is None else parse_particle_classes(args.particle_classes, names)
        options = PredictOptions(
            class_names=names, colors=colors, background=background, particle_classes=particle,
            databar=args.databar, crop_bottom=args.crop_bottom,
            pixel_size_nm=parse_pixel_size(args.pixel_size) if args.pixel_size else None,
            pixel_size_override=args.pixel_size is not None, watershed=args.watershed,
            watershed_h=args.watershed_h, save_probs=args.probs, overlays=not args.no_overlays,
            overlay_max_side=args.overlay_max_side, mask_format=args.mask_format,
            match_pixel_size=not (args.no_match_pixel_size or args.zoom is not None), progress=not args.no_progress)
        bootstrap = Bootstrap(resamples=args.ci_resamples, seed=args.ci_seed, method=args.ci_method)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    ood = _load_ood(args)
    paths, failures = expand_inputs(args.inputs)
    if not paths:
        for spec, why in failures:
            logger.error("%s: %s", spec, why)
        raise SystemExit("no images to process")
    logger.info("%d image(s); model %s, tile %s, overlap %.2f, tta %s, device %s, backend %s", len(paths),
                predictor.meta.get("model", "?"), predictor.tile_hw, predictor.overlap, predictor.tta, device,
                args.backend)
    readme_settings = {
        "checkpoint": args.checkpoint, "model": predictor.meta.get("model", "?"),
        "tile": "x".join(map(str, predictor.tile_hw)), "overlap": predictor.overlap,
        "gaussian blending": predictor.gaussian, "tta": predictor.tta, "batch size": predictor.batch_size,
        "intensity": predictor.intensity, "zoom": predictor.zoom,
        "model grid pixel size (nm)": predictor.meta.get("model_pixel_size_nm"),
        "device": device, "amp": args.amp or "off",
        "backend": f"onnxruntime (CPU), {onnx_file}" if onnx else "torch",
        "OOD score": (f"k-NN (k={ood.k}) + entropy per {ood.tile}px tile, threshold {ood.threshold:.4g} "
                      f"({ood.meta.get('quantile', 0.95):.0%} of {ood.meta.get('val_tiles', '?')} validation tiles)"
                      if ood else "none (the checkpoint has no ood.json)"),
    }
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        result = predict_paths(predictor, paths, args.out, options, failures=failures, settings=readme_settings,
                               overwrite=args.overwrite, bootstrap=bootstrap, ood=ood)
    logger.info("wrote %s: %d image(s), %d failure(s)", args.out, len(result.images), len(result.failures))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
