"""The batch runner of ``segment.predict``: inputs -> output names -> one image at a time -> folder tables.

:func:`expand_inputs` and :func:`output_keys` turn files, folders and patterns into images and their
output names; :func:`predict_image` segments (bounded memory, :mod:`segment.stream`), crops the data
bar, quantifies (:mod:`segment.quantify`) and writes one image's outputs, with its per-tile OOD
scores when the model has an OOD summary (:mod:`segment.ood`); :func:`predict_paths` runs a folder,
resuming from the records of an earlier run (:mod:`segment.records`), and writes the folder tables
(:mod:`segment.run_outputs`). The outputs and choices are described in :mod:`segment.predict`.
"""
from __future__ import annotations

import copy
import glob
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pretrain.io import IMAGE_SUFFIXES, list_images
from pretrain.outputs import remove_stale_temps
from segment.databar import detect_databar
from segment.infer import Predictor
from segment.ood import EntropyTiles, OODSummary, native_tile, tile_features
from segment.ood_figure import score_map_figure
from segment.overlay import contrast_stretch, overlay
from segment.progress import TileProgress
from segment.quantify import Scale, quantify_labels
from segment.records import (
    ImageResult,
    PredictOptions,
    RunResult,
    completed_images,
    input_id,
    record_path,
    run_fingerprint,
    write_record,
)
from segment.run_outputs import atomic_memmap, particle_csv, write_folder_outputs, write_mask, write_png, write_table
from segment.sources import CroppedSource, RowSource, open_source, thumbnail
from segment.stream import predict_stream
from segment.uncertainty import Bootstrap, tile_table
from segment.zoom import check_zoom

__all__ = ["expand_inputs", "output_keys", "image_zoom", "predict_image", "OOD_TILE_COLUMNS", "predict_paths"]

logger = logging.getLogger("segment.predict")  # the CLI's logger: log lines and their filters unchanged by the split


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
    """Segment, crop, quantify and write the outputs of one image (see :mod:`segment.predict`);
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
                probs = stack.enter_context(atomic_memmap(
                    outputs["probabilities"], (len(names), h, w),
                    metadata={"axes": "CYX", "classes": names, "values": "softmax probability x 255"}))
            tiles_done = TileProgress(key, report=options.progress)
            entropy = EntropyTiles((h, w), native_tile(ood.tile, predictor.zoom)) if ood is not None else None
            labels = predict_stream(predictor, source, probs_out=probs, progress=tiles_done, desc=key,
                                    on_logits=entropy)
        if int(labels.max(initial=0)) >= len(names):
            raise ValueError(f"the model predicts class {int(labels.max())} but only {len(names)} "
                             f"class names are known {names}")
        outputs["mask"] = write_mask(out_dir / "masks" / key, labels, pixel_size, options.mask_format)
        thumb = stride = None
        if options.overlays or ood is not None:
            thumb, stride = thumbnail(source, options.overlay_max_side)
            thumb = contrast_stretch(thumb)
        if options.overlays:
            rgb = overlay(thumb, labels[::stride, ::stride], options.colors, background=options.background)
            outputs["overlay"] = write_png(out_dir / "overlays" / f"{key}.png", rgb)
        ood_result = None
        if ood is not None:
            assert entropy is not None
            ood_result = _ood_outputs(predictor, source, ood, entropy, out_dir, key, outputs, (thumb, stride))

    summaries, table = quantify_labels(labels, names, options.particle_indices, scale=scale,
                                       watershed=options.watershed, h=options.watershed_h, image=key)
    tiles = tile_table(labels, table, names, options.particle_indices)
    del labels
    outputs["particles"] = particle_csv(out_dir / "particles" / f"{key}.csv", table, scale.unit)
    return ImageResult(path=path, key=key, height=h, width=w, databar_rows=bar_rows, pixel_size_nm=pixel_size,
                       pixel_size_source=ps_source, zoom=predictor.zoom, seconds=time.perf_counter() - t0, summaries=summaries,
                       outputs=outputs, tiles=tiles, model_tiles=tiles_done.done,
                       inference_seconds=tiles_done.seconds, ood=ood_result)


OOD_TILE_COLUMNS = ("tile_y", "tile_x", "tile_h", "tile_w", "knn_distance", "mean_entropy", "ood_score", "flagged")


def _ood_outputs(predictor: Predictor, source: RowSource, ood: OODSummary, entropy: EntropyTiles, out_dir: Path,
                 key: str, outputs: dict[str, Path], preview: tuple[Any, Any]) -> dict[str, Any]:
    """Score one image's tiles (:mod:`segment.ood`), write ``ood/KEY.csv`` and the map ``ood/KEY.png``;
    returns the image's numbers (score = mean tile score, flagged above the threshold)."""
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
    outputs["ood_tiles"] = write_table(out_dir / "ood" / f"{key}.csv", OOD_TILE_COLUMNS, rows)
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
    ``overwrite`` (see :mod:`segment.predict`, "Resuming"); the tables cover them all the same.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if removed := remove_stale_temps(out_dir):
        logger.info("removed %d temporary file(s) an interrupted earlier run left in %s", removed, out_dir)
    failed = list(failures)
    keys = output_keys(paths)
    fingerprint = run_fingerprint(predictor, options, ood)
    done = {} if overwrite else completed_images(paths, keys, out_dir, fingerprint)
    skipped = [keys[p] for p in paths if p in done]
    items: Iterable[Path] = [p for p in paths if p not in done]
    if options.progress and sys.stderr.isatty():  # in a log file, the per-image lines below say it
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
    pooled = write_folder_outputs(out_dir, predictor, options, results, failed, settings, len(skipped), bootstrap)
    if flagged := [r.key for r in results if r.ood and r.ood["flagged"]]:
        logger.warning("%d of %d image(s) look out of distribution for this model (OOD score above %.3g; "
                       "images.csv, ood/KEY.png show where): %s. Check their masks before trusting their numbers.",
                       len(flagged), len(results), ood.threshold if ood else float("nan"), ", ".join(flagged))
    if failed:
        logger.error("%d of %d input(s) failed (listed in %s):\n%s", len(failed), len(paths) + len(failures),
                     out_dir / "failures.csv", "\n".join(f"  {p}: {e}" for p, e in failed))
    return RunResult(out_dir=out_dir, images=results, failures=failed, pooled=pooled, skipped=skipped)


def _predict_recorded(predictor: Predictor, path: Path, out_dir: Path, options: PredictOptions, key: str,
                      fingerprint: str, ood: OODSummary | None = None) -> ImageResult:
    """:func:`predict_image` bracketed by its record: removed before any output is touched, written
    after all of them, so that a record always means complete outputs."""
    record_path(out_dir, key).unlink(missing_ok=True)
    source = input_id(path)
    result = predict_image(predictor, path, out_dir, options, key=key, ood=ood)
    write_record(out_dir, result, source, fingerprint)
    return result
