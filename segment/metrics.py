"""Segmentation metrics from confusion matrices (pure numpy, no model, no I/O).

Everything is computed from a ``K x K`` confusion matrix ``cm`` whose rows are the ground truth and
whose columns are the prediction, so per-image matrices can be summed into set-level ones.

The headline figure of the NASA microstructure benchmark (DESIGN.md 2.1) is :func:`nasa_iou`: one
IoU pooled over all classes, background included, of one-hot truth and prediction. For argmax
predictions it equals ``A / (2 - A)`` for pixel accuracy ``A``, so it is dominated by the large
classes; report per-class IoU and mIoU beside it. The published set figure is the mean of the
per-image values (NASA evaluates with test batch 1): see :func:`aggregate`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "confusion_matrix",
    "iou_per_class",
    "dice_per_class",
    "mean_iou",
    "pixel_accuracy",
    "nasa_iou",
    "summarize",
    "aggregate",
]

logger = logging.getLogger(__name__)


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """Count (truth, prediction) pairs into an int64 ``K x K`` matrix (rows truth, columns prediction).

    Pixels whose target is negative, ``>= num_classes`` or equal to ``ignore_index`` are skipped.
    A prediction outside ``0..K-1`` on a counted pixel is an error.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    t = target.reshape(-1).astype(np.int64, copy=False)
    p = pred.reshape(-1).astype(np.int64, copy=False)
    valid = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        valid &= t != ignore_index
    if not valid.all():
        t, p = t[valid], p[valid]
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(
            f"predicted class outside 0..{num_classes - 1}: range [{p.min()}, {p.max()}]"
        )
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _check_cm(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square K x K, got shape {cm.shape}")
    return cm.astype(np.float64, copy=False)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den == 0`` (no warnings)."""
    out = np.full(np.shape(num), np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=np.asarray(den) > 0)
    return out


def _tp_fp_fn(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cm = _check_cm(cm)
    tp = np.diag(cm)
    return tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)``; NaN for a class absent from truth and prediction."""
    tp, fp, fn = _tp_fp_fn(cm)
    return _ratio(tp, tp + fp + fn)


def dice_per_class(cm: np.ndarray) -> np.ndarray:
    """Per-class Dice ``2 TP / (2 TP + FP + FN)``; NaN for a class absent from truth and prediction."""
    tp, fp, fn = _tp_fp_fn(cm)
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    finite = x[~np.isnan(x)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_iou(cm: np.ndarray) -> float:
    """Mean of :func:`iou_per_class` over the classes where it is defined (NaN if none is)."""
    return _nanmean(iou_per_class(cm))


def pixel_accuracy(cm: np.ndarray) -> float:
    """Fraction of counted pixels predicted correctly (NaN for an empty matrix)."""
    cm = _check_cm(cm)
    return float(_ratio(np.trace(cm), cm.sum()))


def nasa_iou(cm: np.ndarray) -> float:
    """NASA benchmark IoU: ``sum TP / (sum g + sum p - sum TP)`` pooled over all classes.

    ``g`` and ``p`` are the one-hot truth and prediction over every counted pixel and class,
    background included; with one predicted class per pixel this is ``A / (2 - A)``.
    """
    cm = _check_cm(cm)
    tp = np.trace(cm)
    return float(_ratio(tp, cm.sum(axis=1).sum() + cm.sum(axis=0).sum() - tp))


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class{i}" for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names


def summarize(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All metrics of one confusion matrix as plain Python values (JSON-ready, NaN kept as NaN).

    Keys: ``nasa_iou``, ``miou``, ``mdice``, ``pixel_accuracy``, ``n_pixels`` and per-class dicts
    ``iou``, ``dice``, ``support`` (truth pixel count), keyed by class name.
    """
    cm_arr = np.asarray(cm)
    names = _class_names(_check_cm(cm_arr).shape[0], class_names)
    iou = iou_per_class(cm_arr)
    dice = dice_per_class(cm_arr)
    return {
        "nasa_iou": nasa_iou(cm_arr),
        "miou": _nanmean(iou),
        "mdice": _nanmean(dice),
        "pixel_accuracy": pixel_accuracy(cm_arr),
        "n_pixels": int(cm_arr.sum()),
        "iou": {n: float(v) for n, v in zip(names, iou)},
        "dice": {n: float(v) for n, v in zip(names, dice)},
        "support": {n: int(v) for n, v in zip(names, cm_arr.sum(axis=1))},
    }


def aggregate(
    per_image_cms: Iterable[np.ndarray], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Set-level metrics from per-image confusion matrices.

    Returns ``n_images``; ``nasa_iou`` = ``nasa_iou_mean`` and ``nasa_iou_std`` (mean and
    population standard deviation over images of the per-image :func:`nasa_iou`, the published
    figure); ``per_image_nasa_iou``; ``miou_image_mean`` (mean over images of the per-image mIoU);
    ``pooled``: :func:`summarize` of the summed matrix (per-class IoU, mIoU, pixel accuracy over
    all pixels of the set, defined even for rare classes missing from some images), with shortcuts
    ``miou``, ``pixel_accuracy`` and ``iou_per_class`` (a list in class order) taken from it.
    """
    cms = [np.asarray(c, dtype=np.int64) for c in per_image_cms]
    if not cms:
        raise ValueError("aggregate needs at least one confusion matrix")
    shapes = {c.shape for c in cms}
    if len(shapes) != 1:
        raise ValueError(f"confusion matrices differ in shape: {sorted(shapes)}")
    per_image = np.array([nasa_iou(c) for c in cms], dtype=np.float64)
    per_image_miou = np.array([mean_iou(c) for c in cms], dtype=np.float64)
    total = np.sum(cms, axis=0)
    pooled = summarize(total, class_names)
    return {
        "n_images": len(cms),
        "nasa_iou": _nanmean(per_image),
        "nasa_iou_mean": _nanmean(per_image),
        "nasa_iou_std": float(np.nanstd(per_image)) if np.isfinite(per_image).any() else float("nan"),
        "per_image_nasa_iou": per_image.tolist(),
        "miou_image_mean": _nanmean(per_image_miou),
        "miou": pooled["miou"],
        "pixel_accuracy": pooled["pixel_accuracy"],
        "iou_per_class": iou_per_class(total).tolist(),
        "pooled": pooled,
    }
