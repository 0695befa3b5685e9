"""The one tile loop of the project: sliding-window geometry, weights and the band-wise accumulation.

Convention (nnU-Net's, DESIGN.md 4): tiles of the training crop size, step ``tile * (1 - overlap)``
spread evenly so the last tile of each row and column sits flush with the border; only an image
smaller than a tile is padded (reflect) and cropped back. Tile *logits* are weighted by a Gaussian
importance map (sigma = tile / 8, minimum clipped to its smallest non-zero value), summed, and
divided once by the summed weights.

:func:`tile_logit_rows` runs the tiles of any row reader (:class:`Rows`: ``shape`` and
``read(a, b)`` of normalised rows) in row-major order and batches, and hands out every block of rows
as soon as no later tile touches it, so only ``(tile + step)`` rows of accumulators exist at a time.
Both predictors use it: :meth:`segment.infer.Predictor.predict_logits` on an image in memory
(:class:`TensorRows`) and :func:`segment.stream.iter_logit_rows` on a file read band by band.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from segment.progress import TileProgress

if TYPE_CHECKING:  # annotations only: infer imports this module
    from segment.infer import Predictor

__all__ = [
    "Origin",
    "compute_steps",
    "tile_origins",
    "gaussian_importance",
    "accumulate_tiles",
    "pad_to",
    "BandPlan",
    "plan_bands",
    "Rows",
    "TensorRows",
    "tile_logit_rows",
    "accumulator_bytes",
    "class_labels",
]

Origin = tuple[int, int]


# ----------------------------------------------------------------------------- tile geometry
def compute_steps(image_size: int, tile: int, step_fraction: float) -> list[int]:
    """Tile start offsets along one axis (nnU-Net convention).

    ``step_fraction`` is the step as a fraction of the tile (``1 - overlap``; 0.5 by default in
    :class:`Predictor`). The number of tiles is the fewest whose step does not exceed
    ``tile * step_fraction``; the steps are spread evenly so the first tile starts at 0 and the
    last ends exactly at ``image_size``. An image no larger than a tile gets one tile at 0 (the
    caller pads it).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0.0 < step_fraction <= 1.0:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if image_size <= tile:
        return [0]
    span = image_size - tile
    target_step = tile * step_fraction
    n = math.ceil(span / target_step - 1e-9) + 1
    actual = span / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def tile_origins(
    image_hw: tuple[int, int], tile_hw: tuple[int, int], step_fraction: float
) -> list[Origin]:
    """All ``(y, x)`` tile origins, row-major (every tile of a row band before the next band)."""
    ys = compute_steps(image_hw[0], tile_hw[0], step_fraction)
    xs = compute_steps(image_hw[1], tile_hw[1], step_fraction)
    return [(y, x) for y in ys for x in xs]


@lru_cache(maxsize=16)
def _gaussian_cached(tile_hw: tuple[int, int], sigma_scale: float) -> np.ndarray:
    axes = []
    for n in tile_hw:
        sigma = max(n * sigma_scale, 1e-6)
        r = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (r / sigma) ** 2))
    g = np.outer(axes[0], axes[1])
    g /= g.max()
    g = g.astype(np.float32)
    nonzero = g[g > 0]
    g[g <= 0] = nonzero.min() if nonzero.size else 1.0
    g.setflags(write=False)
    return g


def gaussian_importance(tile_hw: tuple[int, int] | int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian importance map for one tile: float32, peak 1 at the centre, no zeros.

    ``sigma = size * sigma_scale`` per axis; the map is symmetric under flips (and rot90 for square
    tiles), so test-time augmentation does not change a tile's weight. Values that underflow to 0
    are set to the smallest non-zero value so borders never get weight 0. Cached and read-only.
    """
    hw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else (int(tile_hw[0]), int(tile_hw[1]))
    if min(hw) < 1:
        raise ValueError(f"tile size must be positive, got {hw}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian_cached(hw, float(sigma_scale))


def accumulate_tiles(
    logits_acc: Tensor,
    weight_acc: Tensor,
    tile_logits: Tensor,
    origins: Sequence[Origin],
    weight: Tensor,
    offset: Origin = (0, 0),
) -> None:
    """Add weighted tile logits into accumulators, in place.

    ``logits_acc`` is ``K x H x W`` and ``weight_acc`` ``1 x H x W``; ``tile_logits`` is
    ``B x K x th x tw`` placed at ``origins`` (image coordinates) minus ``offset`` (the
    accumulators' own origin: (0, 0) for a whole image, the band's first row for a stream).
    ``weight`` is ``th x tw``.
    """
    th, tw = tile_logits.shape[-2:]
    w = weight.to(device=logits_acc.device, dtype=logits_acc.dtype)
    tile_logits = tile_logits.to(device=logits_acc.device, dtype=logits_acc.dtype)
    for (y, x), t in zip(origins, tile_logits, strict=True):
        y0, x0 = y - offset[0], x - offset[1]
        logits_acc[:, y0 : y0 + th, x0 : x0 + tw].addcmul_(t, w)
        weight_acc[:, y0 : y0 + th, x0 : x0 + tw].add_(w)


def class_labels(logits: Tensor) -> Tensor:
    """Argmax over the class axis of ``K x ...`` logits as uint8, on the logits' device; ties go to
    the lowest class, as ``argmax``.

    ``max(0).indices`` rather than ``argmax(0)``: on the CPU, PyTorch's argmax over a leading axis
    is several times slower for the same labels (``bench/label_reduction.py``: 1.89 s vs 0.35 s for
    3 x 4096 x 4096 on one thread).
    """
    if logits.shape[0] > 256:
        raise ValueError(f"{logits.shape[0]} classes do not fit uint8 labels")
    return logits.max(0).indices.to(torch.uint8)


# ----------------------------------------------------------------------------- padding
def pad_to(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Pad ``C x H x W`` at the bottom/right to at least ``hw`` by reflection, repeated as needed.

    An axis of one pixel cannot reflect and is replicated instead.
    """
    while True:
        h, w = x.shape[-2:]
        ph, pw = max(hw[0] - h, 0), max(hw[1] - w, 0)
        if not (ph or pw):
            return x
        if (ph and h == 1) or (pw and w == 1):
            return F.pad(x[None], (0, pw, 0, ph), mode="replicate")[0]
        x = F.pad(x[None], (0, min(pw, w - 1), 0, min(ph, h - 1)), mode="reflect")[0]


# ----------------------------------------------------------------------------- band geometry
@dataclass(frozen=True)
class BandPlan:
    """How a padded ``H x W`` image is streamed: tile batches (row-major, as ``Predictor``), the
    accumulator height (``capacity`` rows) and, after each batch, the first row not yet final."""

    padded_hw: tuple[int, int]
    batches: tuple[tuple[Origin, ...], ...]
    capacity: int
    final_after: tuple[int, ...]


def plan_bands(image_hw: tuple[int, int], tile_hw: tuple[int, int], step_fraction: float,
               batch_size: int) -> BandPlan:
    """Pure geometry of :func:`iter_logit_rows`.

    Tiles come in the order and batches of ``Predictor.predict_logits``. A batch's tiles span
    rows ``[y_first, y_last + tile_h)``; every row above the next batch's first tile is touched by
    no later tile (row-major order), so it is final. The accumulators start at that row, so they
    need ``max(y_last + tile_h - y_first)`` rows: the tile height plus, where a batch crosses into
    the next tile row, one step.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ph, pw = max(image_hw[0], tile_hw[0]), max(image_hw[1], tile_hw[1])
    origins = tile_origins((ph, pw), tile_hw, step_fraction)
    batches = tuple(tuple(origins[i : i + batch_size]) for i in range(0, len(origins), batch_size))
    capacity = max(b[-1][0] + tile_hw[0] - b[0][0] for b in batches)
    final_after = tuple(batches[j + 1][0][0] if j + 1 < len(batches) else ph for j in range(len(batches)))
    return BandPlan((ph, pw), batches, capacity, final_after)


# ----------------------------------------------------------------------------- the loop
class Rows(Protocol):
    """Normalised ``C x n x W`` rows ``[a, b)`` of an image (requested top-down) and its ``H x W``."""

    shape: tuple[int, int]

    def read(self, a: int, b: int) -> Tensor: ...


class TensorRows:
    """:class:`Rows` of a normalised ``C x H x W`` image already in memory."""

    def __init__(self, image: Tensor) -> None:
        self.image = image
        self.shape = (int(image.shape[-2]), int(image.shape[-1]))

    def read(self, a: int, b: int) -> Tensor:
        return self.image[:, a:b]


class _InputWindow:
    """Normalised, width-padded input rows ``[y0, y1)`` on the CPU; extended and trimmed as the
    tiles move down so each row is read and normalised once."""

    def __init__(self, rows: Rows, tile_hw: tuple[int, int]) -> None:
        self.rows = rows
        self.h, self.w = rows.shape
        self.tile_hw = tile_hw
        self.y0 = self.y1 = 0
        self.buf: Tensor | None = None
        if self.h < self.tile_hw[0]:  # shorter than a tile: pad the whole image once, as Predictor
            self.buf = pad_to(self.rows.read(0, self.h), self.tile_hw)
            self.y1 = self.buf.shape[-2]

    def _read(self, a: int, b: int) -> Tensor:
        return pad_to(self.rows.read(a, b), (0, self.tile_hw[1]))

    def get(self, a: int, b: int) -> Tensor:
        if not (self.y0 <= a and b <= self.y1):
            assert self.buf is None or a >= self.y0, "rows are requested top-down"
            keep = self.buf[:, a - self.y0 :] if self.buf is not None and a < self.y1 else None
            start = self.y1 if keep is not None else a
            new = self._read(start, b)
            self.buf = new if keep is None or keep.shape[-2] == 0 else torch.cat([keep, new], dim=-2)
            self.y0, self.y1 = a, b
        return self.buf[:, a - self.y0 : b - self.y0]


def _reporter(predictor: Predictor, progress: bool | TileProgress | None, desc: str) -> TileProgress:
    if isinstance(progress, TileProgress):
        return progress
    return TileProgress(desc, report=bool(predictor.progress if progress is None else progress))


def tile_logit_rows(predictor: Predictor, rows: Rows, progress: bool | TileProgress | None = None,
                    desc: str = "tiles") -> Iterator[tuple[int, Tensor]]:
    """The tile loop: ``(y0, logits)`` blocks of final rows of ``rows`` (normalised, on the model's
    pixel grid), top to bottom, each float32 ``K x h x W`` on the predictor's device.

    Tiles are cut from an input window that holds only the rows the current batch needs; their
    weighted logits are summed into accumulators of ``plan.capacity`` rows; rows that no later tile
    touches are divided by their summed weights and handed out, and the accumulators move up.
    """
    h, w = rows.shape
    th, tw = predictor.tile_hw
    plan = plan_bands((h, w), (th, tw), predictor.step_fraction, predictor.batch_size)
    cap, pw = plan.capacity, plan.padded_hw[1]
    device = predictor.device
    weight = predictor.importance()
    window = _InputWindow(rows, predictor.tile_hw)
    logits_acc: Tensor | None = None
    weight_acc = torch.zeros((1, cap, pw), dtype=torch.float32, device=device)
    lo = 0
    reporter = _reporter(predictor, progress, desc)
    reporter.start(sum(len(b) for b in plan.batches),
                   f"{h}x{w} px on the model grid, tile {th}x{tw}, overlap {predictor.overlap:g}, "
                   f"batch {predictor.batch_size}")
    try:
        for batch, final in zip(plan.batches, plan.final_after):
            y_first, y_last = batch[0][0], batch[-1][0]
            band = window.get(y_first, y_last + th)
            tiles = torch.stack([band[:, y - y_first : y - y_first + th, x : x + tw] for y, x in batch])
            out = predictor.predict_tiles(tiles)
            reporter.update(len(batch))
            if logits_acc is None:
                logits_acc = torch.zeros((out.shape[1], cap, pw), dtype=torch.float32, device=device)
            accumulate_tiles(logits_acc, weight_acc, out, batch, weight, offset=(lo, 0))
            d = final - lo
            if d <= 0:
                continue
            n = min(d, h - lo)
            if n > 0:
                block = logits_acc[:, :n, :w] / weight_acc[:, :n, :w]
                if not torch.isfinite(block).all():
                    raise RuntimeError(f"non-finite logits (NaN/inf) from the model in rows {lo}..{lo + n}")
                yield lo, block
            _shift_up(logits_acc, d)
            _shift_up(weight_acc, d)
            lo = final
    finally:
        reporter.close()


def _shift_up(acc: Tensor, d: int) -> None:
    """Move rows ``d:`` of a ``C x R x W`` accumulator to the top and zero the rest, in place.

    Copied channel by channel in chunks of at most ``d`` rows, top down, so that no chunk's
    source and destination overlap and no second buffer is needed.
    """
    rows = acc.shape[1]
    keep = max(rows - d, 0)
    for channel in acc:
        for i in range(0, keep, d):
            n = min(d, keep - i)
            channel[i : i + n].copy_(channel[i + d : i + d + n])
    acc[:, keep:].zero_()


def accumulator_bytes(image_hw: tuple[int, int], num_classes: int, in_chans: int, tile_hw: tuple[int, int],
                      step_fraction: float, batch_size: int) -> int:
    """Bytes of the float buffers :func:`tile_logit_rows` holds for an image of this size (logit
    and weight accumulators, the input window); the model's activations come on top."""
    plan = plan_bands(image_hw, tile_hw, step_fraction, batch_size)
    return 4 * plan.padded_hw[1] * plan.capacity * (num_classes + 1 + in_chans)
