"""``figures/fractions.png`` of ``segment.predict``: per-image phase fractions and the folder's, with its interval.

One panel per class (each with its own y axis, so that a 2 % phase is as readable as a 50 % one).
Dots: the area fraction of each image (jittered sideways; smaller and fainter as the number of images
grows, so 1 to 1000 images stay readable). Line and band: the folder-level fraction (pixel-weighted
over the images) and its confidence interval (:mod:`segment.uncertainty`). A folder of one image
shows its tiles' fractions as small grey dots: the interval is then over those tiles. Images that
are flagged (``flagged`` keys) are marked with a red cross.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.outputs import atomic_path

__all__ = ["Band", "fractions_figure"]


@dataclass
class Band:
    """One pooled group (``ALL``, or ``ALL [nm]`` / ``ALL [px]``): its images and, per class, the
    folder fraction with its interval (NaN where there is none)."""

    label: str
    images: list[str]
    estimate: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    over: str = "images"
    tile_fractions: np.ndarray | None = None  # (tiles, classes), the one-image case
    method: str = ""


def _g3(v: float) -> str:
    """Three significant digits, trailing zeros kept (47.0, 2.50)."""
    return f"{v:#.3g}".rstrip(".") if np.isfinite(v) else "n/a"


def _rgb(color: Sequence[int]) -> tuple[float, float, float]:
    return tuple(min(1.0, max(0.0, c / 255.0)) for c in color[:3])  # type: ignore[return-value]


def fractions_figure(path: str | Path, class_names: Sequence[str], fractions: Mapping[str, Sequence[float]],
                     bands: Sequence[Band], *, colors: Sequence[Sequence[int]] | None = None,
                     flagged: Collection[str] = (), level: float = 0.95) -> Path:
    """Write the figure to ``path`` (PNG, atomically) and return it.

    ``fractions``: image key -> area fraction per class (0..1). ``bands``: the pooled groups.
    ``flagged``: keys of images to mark (for a quality flag; none yet by default).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib is slow to import: only when a figure is drawn
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    k = len(class_names)
    groups = len(bands)
    fig = Figure(figsize=(1.0 + k * (1.3 + 1.1 * groups), 4.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, k, squeeze=False)[0]
    jitter = np.random.default_rng(0)
    n_flagged = 0
    for c, (ax, name) in enumerate(zip(axes, class_names)):
        colour = _rgb(colors[c]) if colors is not None and c < len(colors) else f"C{c}"
        for g, band in enumerate(bands):
            keys = [key for key in band.images if key in fractions]
            n = len(keys)
            y = np.array([100.0 * fractions[key][c] for key in keys])
            if band.tile_fractions is not None and len(band.tile_fractions):
                t = 100.0 * np.asarray(band.tile_fractions)[:, c]
                ax.scatter(g + jitter.uniform(-0.3, 0.3, t.size), t, s=9, color="0.6", alpha=0.8,
                           linewidths=0, zorder=2)
            size = float(np.clip(70.0 / np.sqrt(max(n, 1)), 5.0, 40.0))
            alpha = 0.9 if n <= 20 else 0.6 if n <= 200 else 0.35
            x = g + (jitter.uniform(-0.28, 0.28, n) if n > 1 else np.zeros(n))
            ax.scatter(x, y, s=size, color=colour, alpha=alpha, edgecolors="0.15", linewidths=0.4, zorder=3)
            marked = [i for i, key in enumerate(keys) if key in flagged]
            if marked:
                n_flagged += len(marked) if c == 0 else 0
                ax.scatter(x[marked], y[marked], s=size * 2.2, marker="x", color="red", linewidths=1.4, zorder=4)
            est, lo, hi = (100.0 * float(v[c]) for v in (band.estimate, band.low, band.high))
            if np.isfinite(lo) and np.isfinite(hi):
                ax.fill_between([g - 0.4, g + 0.4], lo, hi, color="C0", alpha=0.22, linewidth=0, zorder=1)
                ax.plot([g - 0.4, g + 0.4], [lo, lo], color="C0", lw=0.9, zorder=5)  # above 1000 dots
                ax.plot([g - 0.4, g + 0.4], [hi, hi], color="C0", lw=0.9, zorder=5)
                text = f"{_g3(est)} %\n[{_g3(lo)}, {_g3(hi)}]"
            else:
                text = f"{_g3(est)} %\n(no interval)"
            ax.plot([g - 0.42, g + 0.42], [est, est], color="C0", lw=2.0, zorder=5)
            ax.annotate(text, (g, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7.5)
        ax.set_xlim(-0.6, groups - 0.4)
        ax.set_xticks(range(groups))
        ax.set_xticklabels([f"{b.label}\n{len(b.images)} image{'s' if len(b.images) != 1 else ''}"
                            for b in bands], fontsize=8)
        ax.set_title(name, fontsize=10, pad=30)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        if c == 0:
            ax.set_ylabel("area fraction (%)")
    overs = sorted({b.over for b in bands})
    method = next((b.method for b in bands if b.method), "")
    handles = [Line2D([], [], marker="o", ls="", color="0.5", markeredgecolor="0.15", label="one image"),
               Line2D([], [], color="C0", lw=2.0, label="folder fraction (pixel-weighted over images)"),
               Patch(color="C0", alpha=0.3, label=f"{100 * level:g} % interval over {'; '.join(overs)}")]
    if any(b.tile_fractions is not None for b in bands):
        handles.insert(1, Line2D([], [], marker="o", ls="", color="0.6", markersize=4, label="one tile"))
    if n_flagged:
        handles.append(Line2D([], [], marker="x", ls="", color="red", label=f"flagged image ({n_flagged})"))
    width = fig.get_size_inches()[0]
    ncol = int(np.clip(width // 2.9, 1, len(handles)))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7.5, frameon=False)
    if method:
        fig.suptitle(f"Phase area fractions\n{method}" if width < 6 else f"Phase area fractions ({method})",
                     fontsize=8 if width < 6 else 9)
    fig.tight_layout(rect=(0, 0.02 + 0.05 * math.ceil(len(handles) / ncol), 1, 0.9 if width < 6 else 0.95))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    return path
