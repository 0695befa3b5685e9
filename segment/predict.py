"""Folders of large micrographs -> class masks, overlays and the numbers materials scientists report.

For every input image: bounded-memory sliding-window segmentation (:mod:`segment.stream`), an
optional SEM data-bar crop (:mod:`segment.databar`), then phase fractions and particle statistics
(:mod:`segment.quantify`). An unreadable or failing image is logged and listed; the run goes on
and exits with status 1 at the end. A model whose ``model.json`` records its grid's pixel size
(``data.pixel_size_nm`` at training) sees every image with a known pixel size resized to that grid
(:func:`segment.batch.image_zoom`; ``--no-match-pixel-size`` keeps the model's zoom); outputs stay in
native pixels.

This module is the command line; the work is done by :mod:`segment.batch` (inputs, one image, the
folder run), :mod:`segment.records` (options, results, the records a rerun resumes from) and
:mod:`segment.run_outputs` (the files below).

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
        [--overlap F] [--batch-size 8] [--device cuda | --backend onnx [--onnx-file F]] [--probs] [--overwrite]
        [--ci-resamples 2000] [--ci-seed 0] [--ci-method t|percentile|bca]
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from pretrain.cli_checks import writable_dir
from segment.batch import expand_inputs, predict_paths
from segment.checkpoint import resolve_checkpoint
from segment.class_maps import get_class_map
from segment.infer import Predictor, add_display_args, add_inference_args, inference_kwargs
from segment.onnx_backend import BACKENDS, onnx_predictor
from segment.ood import META_FILE as OOD_META_FILE
from segment.ood import OODSummary
from segment.ood import load as load_ood
from segment.quantify import parse_pixel_size
from segment.records import PredictOptions
from segment.run_outputs import PNG_MAX_SIDE
from segment.uncertainty import Bootstrap

__all__ = ["parse_particle_classes", "main"]

logger = logging.getLogger(__name__)


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
    add_inference_args(g)
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
    add_display_args(o)
    o.add_argument("--overwrite", action="store_true",
                   help="redo every image (default: skip the images an earlier run on --out completed with "
                        "the same model and settings, so that an interrupted run resumes)")
    o.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _class_info(meta: Mapping[str, Any], num_classes: int | None) -> tuple[list[str], list[list[int]], int | None]:
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
        from matplotlib import colormaps  # slow to import: only for a checkpoint without colours

        tab = colormaps["tab10"].colors
        colors = [[int(round(255 * v)) for v in tab[i % len(tab)]] for i in range(len(names))]
    return names, [[int(v) for v in c] for c in colors], background


def _load_ood(args: argparse.Namespace) -> OODSummary | None:
    """The OOD summary ``--ood`` names, else the checkpoint folder's if it has one, else None."""
    if args.no_ood:
        return None
    folder = args.ood
    if folder is None:
        folder = resolve_checkpoint(args.checkpoint)
        if not (folder / OOD_META_FILE).is_file():
            logger.info("no OOD summary in %s: no OOD score (python -m segment.ood fits one)", folder)
            return None
    try:
        return load_ood(folder)
    except ValueError as exc:
        raise SystemExit(f"--ood: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 1 if any input failed."""
    args = _parser().parse_args(argv)
    writable_dir(args.out, "--out")  # before loading the model: one line, not a failure at the first image
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    onnx = args.backend == "onnx"
    if args.onnx_file is not None and not onnx:
        raise SystemExit("--onnx-file needs --backend onnx")
    settings = inference_kwargs(args, cpu_only=onnx) | dict(progress=False)  # None: the checkpoint's value
    device = settings["device"]
    onnx_file = args.onnx_file or args.out / "model.onnx"
    try:  # tile, overlap, intensity, zoom: the checkpoint's (segment.checkpoint.inference_settings) unless given
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
    with logging_redirect_tqdm():
        result = predict_paths(predictor, paths, args.out, options, failures=failures, settings=readme_settings,
                               overwrite=args.overwrite, bootstrap=bootstrap, ood=ood)
    logger.info("wrote %s: %d image(s), %d failure(s)", args.out, len(result.images), len(result.failures))
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
