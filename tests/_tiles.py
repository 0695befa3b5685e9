"""Tile geometry shared by the sliding-window tests."""
import numpy as np
import torch

from segment.tiling import compute_steps


def interior_mask(h: int, w: int, tile: int, step_fraction: float, radius: int) -> torch.Tensor:
    """Pixels at least `radius` from every tile edge that is not an image edge (H x W bool)."""

    def interior(size: int) -> np.ndarray:
        ok = np.ones(size, bool)
        for o in compute_steps(size, tile, step_fraction):
            if o > 0:
                ok[o : o + radius] = False
            if o + tile < size:
                ok[o + tile - radius : o + tile] = False
        return ok

    return torch.from_numpy(interior(h)[:, None] & interior(w)[None, :])
