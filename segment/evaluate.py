"""Evaluate a segmentation model on labelled sets: metrics tables and overlay figures.

Every image is segmented whole with the sliding-window :class:`~segment.infer.Predictor` (NASA
scored EBC on 512x512 quadrants; this project scores whole images and says so in the tables).
Per set, the reported figure is the NASA benchmark IoU averaged over images (DESIGN.md 2.1), with
per-class IoU, mIoU and pixel accuracy pooled over the set's pixels beside it.

Outputs in ``out_dir``: ``metrics.csv`` (one row per image), ``summary.csv`` and ``summary.md``
(one row per set), ``overlays/<set>/<image>.png`` (image | truth | prediction | errors) and
``failures.csv`` (set, image, file, problem, message).
Every pair that cannot be scored is treated the same way, whatever the problem (:data:`PROBLEMS`:
a missing mask, sizes that differ, mask colours/values outside the class map, an unreadable file,
NaN/Inf or constant pixels): it is logged, listed in ``failures.csv`` and in ``summary.md``, and
the other images are still scored. The CLI then exits with status 1 unless ``--allow-failures``.

CLI::

    python -m segment.evaluate CHECKPOINT --set NAME=ROOT[:SPLIT] [--set ...] --out DIR \\
        [--tta] [--overlap F] [--class-map super] [--device cpu] [--allow-failures]
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pretrain.cli_checks import writable_dir
from pretrain.intensity import check_not_constant
from pretrain.io import ImageContentError, ImageReadError, read_micrograph, read_raw
from pretrain.outputs import atomic_write_text, markdown_table, write_csv
from segment.class_maps import ClassMap, MaskError, get_class_map
from segment.infer import Predictor, add_display_args, add_inference_args, inference_kwargs
from segment.metrics import aggregate, confusion_matrix, summarize
from segment.overlay import save_panel
from segment.pairs import find_pairs

__all__ = ["PROBLEMS", "PairFailure", "evaluate_image", "evaluate_sets", "read_truth", "format_summary_md",
           "parse_set_arg", "main"]

logger = logging.getLogger(__name__)

Pair = tuple[str | Path, str | Path | None]  # mask None: the image has no mask

PROBLEMS = {
    "missing_mask": "the image has no mask file",
    "unreadable_image": "the image file cannot be read",
    "bad_image": "the image has NaN/Inf pixels or one value everywhere",
    "unreadable_mask": "the mask file cannot be read",
    "bad_mask": "the mask has colours/values outside the class map, or the wrong kind",
    "size_mismatch": "image and mask sizes differ",
    "error": "anything else (e.g. the model failed on the image)",
}
"""The ``problem`` codes of ``failures.csv``."""


class PairFailure(ValueError):
    """An image/mask pair that cannot be scored: ``problem`` (a :data:`PROBLEMS` key), the ``file``
    at fault, and a message naming it."""

    def __init__(self, problem: str, file: str | Path, message: str) -> None:
        super().__init__(message)
        self.problem, self.file = problem, Path(file)


def _background(class_map: ClassMap) -> int:
    """The class left untinted in overlays and read as background in error maps."""
    return class_map.default if class_map.default is not None else 0


def evaluate_image(
    predictor: Predictor, image_path: str | Path, mask_path: str | Path | None, class_map: ClassMap
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read, segment and score one image.

    Returns ``(cm, image, truth, pred)``: the confusion matrix, the image scaled to [0, 1] as in
    training (``predictor.scale``, its ``intensity``), and the uint8 truth and predicted label maps.
    Raises :class:`PairFailure` for a missing, unreadable or invalid file and for mismatched sizes
    (checked before the model runs).
    """
    image = _read_image(predictor, Path(image_path))
    if mask_path is None:
        raise PairFailure("missing_mask", image_path, f"{image_path}: no mask found for this image")
    truth = read_truth(Path(mask_path), class_map)
    if truth.shape != image.shape[:2]:
        (mh, mw), (ih, iw) = truth.shape, image.shape[:2]
        raise PairFailure("size_mismatch", mask_path, f"{mask_path}: mask is {mh}x{mw} but its image "
                                                      f"{image_path} is {ih}x{iw} (HxW)")
    pred = predictor.predict_labels(predictor.normalize(image))
    return confusion_matrix(pred, truth, len(class_map.names)), image, truth, pred


def _read_image(predictor: Predictor, path: Path) -> np.ndarray:
    """The image scaled to [0, 1]; NaN/Inf or constant pixels are a ``bad_image`` failure."""
    try:
        raw = read_micrograph(path, gray=True).image
        image = predictor.scale(raw, path=path)
        check_not_constant(raw, path)
    except ImageContentError as exc:
        raise PairFailure("bad_image", path, str(exc)) from exc
    except ImageReadError as exc:
        raise PairFailure("unreadable_image", path, str(exc)) from exc
    return image


def read_truth(path: Path, class_map: ClassMap) -> np.ndarray:
    """The mask's class indices; a missing, unreadable or off-map mask is a :class:`PairFailure`."""
    if not path.exists():
        raise PairFailure("missing_mask", path, f"{path}: mask file not found")
    try:
        raw = read_raw(path)
    except ImageReadError as exc:
        raise PairFailure("unreadable_mask", path, str(exc)) from exc
    try:
        return np.asarray(class_map.encode(raw, path))
    except MaskError as exc:
        raise PairFailure("bad_mask", path, str(exc)) from exc


def _failure(image_path: Path, exc: Exception) -> dict[str, str]:
    """A ``failures.csv`` row (less the set) for a pair that raised ``exc``."""
    if isinstance(exc, PairFailure):
        return {"image": str(image_path), "file": str(exc.file), "problem": exc.problem, "error": str(exc)}
    message = f"{type(exc).__name__}: {exc}"
    if str(image_path) not in message:
        message = f"{image_path}: {message}"
    return {"image": str(image_path), "file": str(image_path), "problem": "error", "error": message}


def _set_result(cms: list[np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    if cms:
        return aggregate(cms, names)
    nan = float("nan")
    empty = summarize(np.zeros((len(names), len(names)), np.int64), names)
    return {"n_images": 0, "nasa_iou": nan, "nasa_iou_mean": nan, "nasa_iou_std": nan,
            "per_image_nasa_iou": [], "miou_image_mean": nan, "miou": nan, "pixel_accuracy": nan,
            "iou_per_class": [nan] * len(names), "pooled": empty}


def evaluate_sets(
    predictor: Predictor,
    sets: Mapping[str, Sequence[Pair]],
    class_map: ClassMap | str | Mapping[str, Any],
    out_dir: str | Path,
    *,
    overlays: bool = True,
    max_overlays: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Segment and score every ``(image, mask)`` pair of every set; write tables and figures.

    ``class_map`` is a ``segment.class_maps.ClassMap``, a preset name or a dict. A pair's mask may be
    None (no mask found). Returns, per set name, :func:`segment.metrics.aggregate` of its images
    plus ``images`` (the per-image rows of ``metrics.csv``) and ``failed`` (``{"image", "file",
    "problem", "error"}`` for each pair that could not be scored, also in ``failures.csv``). It
    does not raise for a bad pair (``segment.finetune.evaluate_best`` relies on that after training).
    """
    cmap = get_class_map(class_map)
    names = list(cmap.names)
    colors = cmap.overlay_colors
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=sum(len(p) for p in sets.values()), desc="evaluate", unit="image",
               disable=not progress)
    try:
        for set_name, pairs in sets.items():
            bar.set_description(f"evaluate {set_name}")
            cms: list[np.ndarray] = []
            set_rows: list[dict[str, Any]] = []
            failed: list[dict[str, str]] = []
            for image_path, mask_path in pairs:
                image_path = Path(image_path)
                t0 = time.perf_counter()
                try:
                    cm, image, truth, pred = evaluate_image(predictor, image_path, mask_path, cmap)
                except Exception as exc:  # noqa: BLE001 - one bad file must not stop the run
                    failed.append(_failure(image_path, exc))
                    logger.error("failed [%s] %s: %s", set_name, failed[-1]["problem"], failed[-1]["error"])
                    logger.debug("traceback for %s", image_path, exc_info=True)
                    bar.update(1)
                    continue
                row = _image_row(set_name, image_path.name, summarize(cm, names), time.perf_counter() - t0)
                cms.append(cm)
                set_rows.append(row)
                if overlays and len(cms) <= max_overlays:
                    title = (f"{set_name} / {image_path.name}: NASA IoU {_pct(row['nasa_iou'])} %, "
                             f"mIoU {_pct(row['miou'])} %")
                    try:
                        save_panel(out / "overlays" / _safe(set_name) / f"{image_path.stem}.png",
                                   image, truth, pred, names, colors, title,
                                   background=_background(cmap))
                    except Exception as exc:  # noqa: BLE001 - a figure is not worth the run
                        logger.warning("no overlay for %s: %s", image_path, exc)
                bar.update(1)
            results[set_name] = {**_set_result(cms, names), "images": set_rows, "failed": failed}
            rows.extend(set_rows)
    finally:
        bar.close()

    settings = _settings(predictor)
    write_csv(out / "metrics.csv", _image_columns(names), _cells(rows, _image_columns(names)))
    write_csv(out / "summary.csv", _summary_columns(names),
              _cells([_summary_row(n, r, names) for n, r in results.items()], _summary_columns(names)))
    md = format_summary_md(results, names, settings)
    atomic_write_text(out / "summary.md", md)
    failures = [{"set": s, **f} for s, r in results.items() for f in r["failed"]]
    write_csv(out / "failures.csv", FAILURE_COLUMNS, _cells([{**f, "message": f["error"]} for f in failures],
                                                            FAILURE_COLUMNS))
    if failures:
        n_pairs = sum(len(p) for p in sets.values())
        logger.error("%d of %d image(s) could not be scored (listed in %s):\n  %s", len(failures), n_pairs,
                     out / "failures.csv", "\n  ".join(f"[{f['set']}] {f['problem']}: {f['error']}"
                                                      for f in failures))
    logger.info("evaluation written to %s", out)
    return results


# ----------------------------------------------------------------------------- tables
FAILURE_COLUMNS = ("set", "image", "file", "problem", "message")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+#" else "_" for c in name) or "set"


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _num(x: Any) -> Any:
    """CSV cell: floats with 6 decimals, NaN as an empty cell."""
    if isinstance(x, float):
        return "" if not math.isfinite(x) else f"{x:.6f}"
    return x


def _cells(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[list[Any]]:
    """The rows' cells in column order, formatted by :func:`_num` (a missing key: an empty cell)."""
    return [[_num(row.get(k)) for k in columns] for row in rows]


def _image_columns(names: Sequence[str]) -> list[str]:
    return (["set", "image", "nasa_iou", "miou", "mdice", "pixel_accuracy"]
            + [f"iou_{n}" for n in names] + [f"dice_{n}" for n in names] + ["seconds"])


def _image_row(set_name: str, image: str, s: dict[str, Any], seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"set": set_name, "image": image}
    row.update({k: s[k] for k in ("nasa_iou", "miou", "mdice", "pixel_accuracy")})
    row.update({f"iou_{n}": v for n, v in s["iou"].items()})
    row.update({f"dice_{n}": v for n, v in s["dice"].items()})
    row["seconds"] = round(seconds, 3)
    return row


def _summary_columns(names: Sequence[str]) -> list[str]:
    return (["set", "n_images", "n_failed", "nasa_iou_mean", "nasa_iou_std"]
            + [f"iou_{n}" for n in names] + ["miou", "mdice", "pixel_accuracy", "miou_image_mean"])


def _summary_row(set_name: str, r: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    pooled = r["pooled"]
    row: dict[str, Any] = {"set": set_name, "n_images": r["n_images"], "n_failed": len(r["failed"]),
                           "nasa_iou_mean": r["nasa_iou_mean"], "nasa_iou_std": r["nasa_iou_std"]}
    row.update({f"iou_{n}": pooled["iou"][n] for n in names})
    row.update({"miou": pooled["miou"], "mdice": pooled["mdice"],
                "pixel_accuracy": pooled["pixel_accuracy"], "miou_image_mean": r["miou_image_mean"]})
    return row


def _settings(predictor: Predictor) -> str:
    th, tw = predictor.tile_hw
    tile = f"{th}" if th == tw else f"{th}x{tw}"
    return (f"tile {tile}, overlap {predictor.overlap:g}, "
            f"{'Gaussian' if predictor.gaussian else 'uniform'} weights, "
            f"TTA {'8 flips/rotations' if predictor.tta else 'off'}, intensity {predictor.intensity}"
            + (f", zoom {predictor.zoom:g}" if predictor.zoom != 1.0 else ""))


def format_summary_md(results: Mapping[str, dict[str, Any]], names: Sequence[str], settings: str = "") -> str:
    """The per-set summary as a Markdown table (IoU in %), with its definitions and failed images."""
    head = ["set", "images", "NASA IoU (mean ± std)", *[f"IoU {n}" for n in names], "mIoU", "pixel acc."]
    table = []
    for set_name, r in results.items():
        p = r["pooled"]
        table.append([set_name, str(r["n_images"]) + (f" ({len(r['failed'])} failed)" if r["failed"] else ""),
                      f"{_pct(r['nasa_iou_mean'])} ± {_pct(r['nasa_iou_std'])}",
                      *[_pct(p["iou"][n]) for n in names], _pct(p["miou"]), _pct(p["pixel_accuracy"])])
    lines = [
        markdown_table(head, table, ["l"] + ["r"] * (len(head) - 1)),
        "",
        "NASA IoU: the benchmark's IoU pooled over all classes (background included) per image, "
        "mean ± population std over images. Per-class IoU, mIoU and pixel accuracy: pooled over "
        "all pixels of the set. Whole images, sliding window"
        + (f" ({settings})." if settings else "."),
    ]
    failed = [(s, f) for s, r in results.items() for f in r["failed"]]
    if failed:
        lines += ["", "Failed images (not scored; also in failures.csv):", ""]
        lines += [f"- [{s}] {f.get('problem', 'error')}: {f['error']}" for s, f in failed]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI
def parse_set_arg(spec: str, default_split: str = "test") -> tuple[str, Path, str]:
    """``NAME=ROOT[:SPLIT]`` (or ``ROOT[:SPLIT]``, named after the folder) -> (name, root, split)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = "", spec
    root, colon, split = rest.rpartition(":")
    if not colon or not split or "/" in split or "\\" in split or len(root) < 2:
        root, split = rest, default_split
    if not root:
        raise argparse.ArgumentTypeError(f"--set {spec!r}: expected NAME=ROOT[:SPLIT]")
    root_path = Path(root)
    if not name:
        name = root_path.name + ("" if split == default_split else f"-{split}")
    return name, root_path, split


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m segment.evaluate",
        description="Score a fine-tuned model on labelled sets (NASA IoU, per-class IoU, mIoU) and "
                    "write metrics.csv, summary.csv, summary.md and overlay figures.")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors + model.json) or run folder")
    p.add_argument("--set", dest="sets", action="append", required=True, metavar="NAME=ROOT[:SPLIT]",
                   help="a labelled set; SPLIT defaults to 'test' (repeatable)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_inference_args(p.add_argument_group("inference"))
    p.add_argument("--class-map", default=None,
                   help="class map preset (super, ebc, ...); default: the checkpoint's")
    p.add_argument("--layout", choices=["auto", "nasa", "plain"], default="auto",
                   help="folder layout of the sets (see segment.pairs.find_pairs)")
    p.add_argument("--max-overlays", type=int, default=8, help="overlay figures per set")
    add_display_args(p)
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 even if some images could not be scored (they are still listed in "
                        "failures.csv and summary.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``mseg-evaluate``); exit status 1 if a set has no scored image or,
    unless ``--allow-failures``, if any image could not be scored (see ``failures.csv``)."""
    args = _parser().parse_args(argv)
    writable_dir(args.out, "--out")  # before loading the model: one line, not a failure at the first image
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = [parse_set_arg(s) for s in args.sets]
    predictor = Predictor.from_checkpoint(args.checkpoint, **inference_kwargs(args))
    meta = predictor.meta  # inference settings as recorded (segment.checkpoint.inference_settings)
    spec = args.class_map if args.class_map is not None else meta.get("class_map")
    if spec is None:
        raise SystemExit("the checkpoint names no class map: pass --class-map")
    class_map = get_class_map(spec)
    trained = meta.get("class_names")
    if trained is not None and len(trained) != len(class_map.names):
        raise SystemExit(f"the checkpoint predicts {len(trained)} classes {list(trained)}, "
                         f"the class map has {len(class_map.names)} {list(class_map.names)}")
    sets: dict[str, list] = {}
    for name, root, split in specs:
        if name in sets:
            raise SystemExit(f"--set name {name!r} given twice")
        unpaired: list[Path] = []  # images without a mask: scored as failures, not a stop
        try:
            pairs = find_pairs(root, split, layout=args.layout, unpaired=unpaired)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise SystemExit(f"--set {name}: {exc}") from None
        sets[name] = sorted([*pairs, *((image, None) for image in unpaired)], key=lambda p: str(p[0]))
        logger.info("set %s: %d image(s) from %s/%s", name, len(sets[name]), root, split)
    results = evaluate_sets(predictor, sets, class_map, args.out, overlays=not args.no_overlays,
                            max_overlays=args.max_overlays, progress=not args.no_progress)
    print(format_summary_md(results, class_map.names, _settings(predictor)), end="")
    n_failed = sum(len(r["failed"]) for r in results.values())
    if n_failed and args.allow_failures:
        logger.warning("%d image(s) failed; exit status 0 as --allow-failures was given", n_failed)
    empty = any(r["n_images"] == 0 for r in results.values())
    return 1 if empty or (n_failed and not args.allow_failures) else 0


if __name__ == "__main__":
    raise SystemExit(main())
