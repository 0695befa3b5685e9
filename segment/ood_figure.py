"""Per-tile OOD score map of one image (``segment.predict``: ``ood/KEY.png``): where to distrust it.

The image (contrast-stretched preview) in gray, each tile of the score grid tinted by its score on
one colour scale whose middle is the threshold, tiles above the threshold outlined in red and
labelled with their score.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.outputs import atomic_path

__all__ = ["score_map_figure"]

logger = logging.getLogger(__name__)


def score_map_figure(path: Path, preview: np.ndarray, stride: int, image_hw: tuple[int, int],
                     origins: Sequence[tuple[int, int]], tile: int, scores: Sequence[float], threshold: float,
                     title: str) -> Path:
    """Write the map (PNG, atomically). ``preview`` is the image subsampled by ``stride`` (float in
    [0, 1]); ``origins`` / ``scores`` the tiles in image pixels; ``image_hw`` the analysed size."""
    from matplotlib import colormaps  # matplotlib is slow to import: only when a figure is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    scores = np.asarray(scores, np.float64)
    h, w = image_hw
    hi = max(float(scores.max()), threshold * 1.5)
    lo = min(float(scores.min()), threshold * 0.5)
    norm = TwoSlopeNorm(vmin=lo, vcenter=threshold, vmax=hi)
    cmap = colormaps["coolwarm"]
    aspect = h / max(w, 1)
    fig = Figure(figsize=(6.5, 6.5 * aspect + 0.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(preview, cmap="gray", extent=(0, w, h, 0), interpolation="nearest")
    for (y, x), s in zip(origins, scores, strict=True):
        th, tw = min(tile, h - y), min(tile, w - x)
        ax.add_patch(Rectangle((x, y), tw, th, facecolor=cmap(norm(s)), alpha=0.45, edgecolor="none"))
        if s > threshold:
            ax.add_patch(Rectangle((x + 2, y + 2), tw - 4, th - 4, fill=False, edgecolor="red", linewidth=1.5))
        if len(scores) <= 400:
            ax.text(x + tw / 2, y + th / 2, f"{s:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if s <= threshold else "darkred")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02, label=f"OOD score (threshold {threshold:.3g})")
    flagged = int((scores > threshold).sum())
    ax.set_title(f"{title}: {flagged} of {len(scores)} tiles above the threshold (red)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    return path
