"""Figures for segmentation results: colour label maps, overlays, error maps and 4-panel PNGs.

Colours are RGB tuples of 0..255 integers, one per class index. The error map uses a fixed key
from the colour-blind-safe Okabe-Ito palette, read relative to a *background* class (the matrix
or substrate, class 0 by default), so that every other class counts as "foreground":

==================  ===========  =========================================================
key                 colour       meaning
==================  ===========  =========================================================
correct background  dark gray    truth = prediction = background (true negative)
correct foreground  light gray   truth = prediction, a foreground class (true positive)
missed              vermillion   truth foreground, predicted background (false negative)
spurious            sky blue     truth background, predicted foreground (false positive)
wrong class         yellow       truth and prediction different foreground classes
==================  ===========  =========================================================

With ``target=k`` the map is binary for class ``k`` alone (k = foreground, all else background),
and "wrong class" cannot occur. The key is written on every panel figure.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.outputs import atomic_path
from segment.class_maps import RGB

__all__ = [
    "ERROR_KEY",
    "colorize",
    "overlay",
    "error_map",
    "error_legend",
    "contrast_stretch",
    "save_panel",
]

logger = logging.getLogger(__name__)

ERROR_KEY: dict[str, RGB] = {
    "correct background": (45, 45, 45),
    "correct foreground": (190, 190, 190),
    "missed (false negative)": (213, 94, 0),
    "spurious (false positive)": (86, 180, 233),
    "wrong class": (240, 228, 66),
}
"""Error-map colours in legend order (see the module docstring)."""

_TN, _TP, _FN, _FP, _SWAP = ERROR_KEY.values()


def _palette(colors: Sequence[Sequence[int]]) -> np.ndarray:
    pal = np.asarray(colors)
    if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) == 0:
        raise ValueError(f"colors must be a sequence of (R, G, B) triples, got shape {pal.shape}")
    if pal.min() < 0 or pal.max() > 255:
        raise ValueError("colors must be 0..255 RGB integers")
    return pal.astype(np.uint8)


def colorize(labels: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """``H x W`` class indices -> ``H x W x 3`` uint8 RGB, class ``i`` painted ``colors[i]``."""
    pal = _palette(colors)
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(pal)):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but only {len(pal)} colours given")
    return pal[labels.astype(np.intp, copy=False)]


def _gray_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    elif img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an H x W or H x W x 3 image, got shape {img.shape}")
    return np.clip(img, 0.0, 1.0)


def contrast_stretch(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low``..``high`` percentiles of a float image to 0..1 (for display only)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [low, high]) if img.size else (0.0, 1.0)
    if hi <= lo:
        return np.clip(img, 0.0, 1.0)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def overlay(
    image_gray_float: np.ndarray,
    labels: np.ndarray,
    colors: Sequence[Sequence[int]],
    alpha: float = 0.45,
    background: int | None = 0,
) -> np.ndarray:
    """Blend class colours over a float image in [0, 1]; returns ``H x W x 3`` uint8 RGB.

    Pixels of class ``background`` show the image alone (None tints every class).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _gray_rgb(image_gray_float)
    labels = np.asarray(labels)
    if img.shape[:2] != labels.shape:
        raise ValueError(f"image {img.shape[:2]} and labels {labels.shape} differ in size")
    tint = colorize(labels, colors).astype(np.float32) / 255.0
    blend = (1.0 - alpha) * img + alpha * tint
    if background is not None:
        blend = np.where((labels == background)[..., None], img, blend)
    return np.round(blend * 255.0).astype(np.uint8)


def error_map(
    pred: np.ndarray, truth: np.ndarray, *, background: int | None = 0, target: int | None = None
) -> np.ndarray:
    """Colour each pixel by its kind of agreement (:data:`ERROR_KEY`); ``H x W x 3`` uint8 RGB.

    Default: foreground (every class but ``background``) versus background, plus "wrong class"
    for confusions between foreground classes; ``background=None`` makes every error "wrong
    class". ``target=k``: binary TP/FP/FN/TN for class ``k`` alone.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} differ in size")
    if target is not None:
        t_fg, p_fg = truth == target, pred == target
        correct = t_fg == p_fg
    else:
        if background is None:
            t_fg = p_fg = np.ones(truth.shape, bool)
        else:
            t_fg, p_fg = truth != background, pred != background
        correct = pred == truth
    out = np.empty((*truth.shape, 3), dtype=np.uint8)
    out[...] = _SWAP
    out[correct & ~t_fg] = _TN
    out[correct & t_fg] = _TP
    out[~correct & t_fg & ~p_fg] = _FN
    out[~correct & ~t_fg & p_fg] = _FP
    return out


def error_legend(binary: bool = False) -> list[tuple[str, RGB]]:
    """The error-map key as ``(label, colour)`` pairs; ``binary`` drops "wrong class"."""
    return [(k, c) for k, c in ERROR_KEY.items() if not (binary and k == "wrong class")]


def _decimate(arrays: Sequence[np.ndarray], max_side: int) -> list[np.ndarray]:
    """Nearest-neighbour subsampling so that the longest side is at most ``max_side`` (display only)."""
    h, w = arrays[0].shape[:2]
    s = max(1, int(np.ceil(max(h, w) / max_side)))
    return [a[::s, ::s] for a in arrays] if s > 1 else list(arrays)


def save_panel(
    path: str | os.PathLike[str],
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    title: str = "",
    *,
    background: int | None = 0,
    alpha: float = 0.45,
    max_side: int = 1024,
    dpi: int = 100,
) -> Path:
    """Write one PNG: image | truth overlay | prediction overlay | error map, with both keys.

    ``image`` is a float image in [0, 1] (contrast-stretched for display); the file is written to
    a temporary name and renamed, so a reader never sees a partial PNG. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib is slow to import: only when a legend figure is drawn
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    path = Path(path)
    if len(class_names) != len(colors):
        raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
    image, truth, pred = _decimate([np.asarray(image), np.asarray(truth), np.asarray(pred)], max_side)
    shown = contrast_stretch(image)
    panels = [
        ("image", _gray_rgb(shown)),
        ("ground truth", overlay(shown, truth, colors, alpha, background)),
        ("prediction", overlay(shown, pred, colors, alpha, background)),
        ("errors", error_map(pred, truth, background=background)),
    ]
    h, w = truth.shape
    side, top_in, bottom_in = 3.4, 0.65, 0.8  # panel width, title and legend bands (inches)
    fig_h = side * h / w + top_in + bottom_in
    fig = Figure(figsize=(4 * side + 0.3, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, gridspec_kw=dict(left=0.01, right=0.99, top=1 - top_in / fig_h,
                                               bottom=bottom_in / fig_h, wspace=0.03))
    for ax, (name, rgb) in zip(axes, panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)

    def patch(label: str, rgb: Sequence[int]) -> Patch:
        return Patch(facecolor=np.asarray(rgb) / 255.0, edgecolor="0.3", label=label)

    class_handles = [
        patch(n + (" (untinted)" if i == background else ""), c)
        for i, (n, c) in enumerate(zip(class_names, colors))
    ]
    fig.legend(handles=class_handles, title="classes", loc="lower left", bbox_to_anchor=(0.01, 0.0),
               ncol=min(len(class_handles), 3), fontsize=8, title_fontsize=8, frameon=False)
    fig.legend(handles=[patch(k, c) for k, c in error_legend()], title="errors ("
               + (f"background class: {class_names[background]})" if background is not None else "no background class)"),
               loc="lower right", bbox_to_anchor=(0.99, 0.0), ncol=3, fontsize=8, title_fontsize=8,
               frameon=False)

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path
