"""Bounded-memory sliding-window inference for micrographs of any size (DESIGN.md 4).

:class:`~segment.infer.Predictor` accumulates ``K x H x W`` float32 logits for the whole image;
for a 10k x 10k micrograph that is 1.2 GB per three classes, plus the weights and the input. Here
the same tiles, in the same row-major order and batches, are summed into accumulators that hold
only the rows a tile still to come can touch: tile batches advance down the image, and every row
above the next tile's top edge is final, so it is divided by its summed weights, turned into
labels (and optional uint8 probabilities), handed out, and its accumulator rows are reused.
Peak memory is about ``(K + 1 + C) x (tile + step) x W`` floats (logit and weight
accumulators, the input window; :func:`accumulator_bytes`) plus the uint8 label map, so the
float state grows with the image width, not its area. The result equals ``Predictor.predict_logits`` (same tiles, same
order of summation, same batches).

Intensity: the predictor's ``intensity`` (the one it was trained with) maps raw pixels to [0, 1]
with :func:`pretrain.intensity.scale_intensity`. ``"dtype"`` is per pixel. For the per-image modes the
window (percentiles, mean/std or median/MAD) is computed *once per image* by
:func:`segment.sources.source_intensity_window` from a strided
read of the source (``[::s, ::s]`` with at most about 4M pixels, read band by band, so memory stays
bounded), and every band of rows is then mapped with that one fixed linear map: tiles never get
their own stretch. The subsample is the one ``scale_intensity`` takes for a whole image in memory,
so a streamed image is scaled exactly like ``Predictor.predict_image`` scales it.

Zoom: a predictor with ``zoom != 1`` (``data.zoom`` of training) works on the resized image. Source
rows are scaled, normalised, resized in width and resampled down the rows by a
:class:`segment.zoom.RowResampler` as they arrive; the tiles then run on that grid exactly as above,
and every block of final logit rows is resized back to the native grid the same way. Both
resamplers hold only the few rows they still need, so memory stays bounded, and the result equals
``Predictor.predict_logits`` (which resizes the whole image) to float rounding.

Inputs are read row by row through a :class:`segment.sources.RowSource`: an uncompressed TIFF is
memory-mapped, a striped or tiled compressed TIFF is decoded one chunk row at a time, anything else is
read whole in its native dtype (still ``1/(4K)`` of the float map). ``segment.sources.open_source``
picks one.

Example::

    predictor = Predictor.from_checkpoint("runs/ft/best")
    with open_source("huge.tif") as src:                 # segment.sources.open_source
        labels = predict_stream(predictor, src)            # uint8 H x W
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, MutableSequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pretrain.io import ImageContentError
from segment.infer import Origin, Predictor, accumulate_tiles, pad_to, tile_origins
from segment.progress import TileProgress
from segment.sources import ArraySource, RowSource, source_intensity_window
from segment.zoom import RowResampler, image_mode, resize_columns, zoomed_hw

__all__ = [
    "BandPlan",
    "plan_bands",
    "iter_logit_rows",
    "predict_stream",
    "probabilities_uint8",
    "accumulator_bytes",
]


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


# ----------------------------------------------------------------------------- streaming core
class _NativeRows:
    """Rows ``[a, b)`` of the source, scaled (one intensity map for the whole image) and normalised.

    Every row passes ``Predictor.scale``, which refuses NaN/Inf naming the file; whether the raw
    pixels ever differ is tracked on the way (usually settled by the first band), so that a
    constant image is refused by :meth:`check_not_constant` without a second pass.
    """

    def __init__(self, predictor: Predictor, source: RowSource) -> None:
        self.predictor, self.source = predictor, source
        self.shape, self.path = source.shape, getattr(source, "path", None)
        self.value_range = source_intensity_window(source, predictor.intensity)
        self.first: Any = None  # the first raw pixel value, while every pixel seen equals it
        self.varies = False

    def read(self, a: int, b: int) -> Tensor:
        raw = self.source.rows(a, b)
        if not self.varies and raw.size:
            self.first = raw.flat[0] if self.first is None else self.first
            self.varies = bool((raw != self.first).any())
        try:
            scaled = self.predictor.scale(raw, self.value_range, path=self.path)
        except ImageContentError as exc:
            raise ImageContentError(self.path, f"{exc.reason} (rows {a}..{b})") from None
        return self.predictor.normalize(scaled)

    def check_not_constant(self) -> None:
        """Raise an ``ImageContentError`` naming the file if every pixel read had one value."""
        if not self.varies:
            value = None if self.first is None else self.first.item()
            raise ImageContentError(self.path, f"constant image (every one of its "
                                               f"{self.shape[0] * self.shape[1]} pixels is {value!r}): "
                                               f"a blank or failed acquisition?")


class _ZoomedRows:
    """Rows ``[a, b)`` (requested top-down) of the normalised image resized by ``predictor.zoom``:
    native rows are read ``band`` at a time, resized in width, and resampled down the rows by a
    :class:`~segment.zoom.RowResampler`, so only the rows still needed are held."""

    def __init__(self, native: _NativeRows, hw: tuple[int, int], band: int = 256) -> None:
        self.native, self.shape, self.band = native, hw, band
        self.mode = image_mode(native.shape, hw)
        self.rows = RowResampler(native.shape[0], hw[0], self.mode)
        self.read_to = 0  # native rows read so far
        self.buf: Tensor | None = None  # zoomed rows [self.y0, self.y1)
        self.y0 = self.y1 = 0

    def read(self, a: int, b: int) -> Tensor:
        assert a >= self.y0, "rows are requested top-down"
        while self.y1 < b:
            end = min(self.read_to + self.band, self.native.shape[0])
            block = resize_columns(self.native.read(self.read_to, end), self.shape[1], self.mode)
            self.read_to = end
            for _, out in self.rows.push(block):
                self.buf = out if self.buf is None else torch.cat([self.buf, out], dim=-2)
                self.y1 += out.shape[-2]
        self.buf = self.buf[:, a - self.y0 :]
        self.y0 = a
        return self.buf[:, : b - a]


class _InputWindow:
    """Normalised, width-padded input rows ``[y0, y1)`` on the CPU; extended and trimmed as the
    tiles move down so each row is read and normalised once."""

    def __init__(self, rows: _NativeRows | _ZoomedRows, tile_hw: tuple[int, int]) -> None:
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


@torch.inference_mode()
def iter_logit_rows(predictor: Predictor, source: RowSource, *, progress: bool | TileProgress | None = None,
                    desc: str = "tiles") -> Iterator[tuple[int, Tensor]]:
    """Yield ``(y0, logits)`` for consecutive blocks of final rows, top to bottom.

    ``logits`` is float32 ``K x h x W`` on the predictor's device (the blended logits of rows
    ``y0 .. y0 + h``), equal to the same rows of ``predictor.predict_logits`` of the whole
    normalised image (identical at ``zoom == 1``; to float rounding otherwise, where the input is
    resized and the logits resized back band by band). Only ``plan.capacity`` rows of
    accumulators exist at any time. NaN/Inf pixels (first seen) or a constant image (after the
    last block) raise ``pretrain.io.ImageContentError`` naming the file, not the model.

    ``progress``: a :class:`~segment.progress.TileProgress` to count the tiles into (tiles/s, ETA),
    True/False to show one or not (None: ``predictor.progress``), labelled ``desc``.
    """
    h, w = source.shape
    if h < 1 or w < 1:
        raise ValueError(f"empty image {source.shape}")
    native = _NativeRows(predictor, source)
    if predictor.zoom == 1.0:
        yield from _tile_logit_rows(predictor, native, progress, desc)
    else:
        zoomed = _ZoomedRows(native, zoomed_hw((h, w), predictor.zoom))
        back = RowResampler(zoomed.shape[0], h, "bilinear")
        for _, block in _tile_logit_rows(predictor, zoomed, progress, desc):
            yield from back.push(resize_columns(block, w, "bilinear"))
    native.check_not_constant()


def _reporter(predictor: Predictor, progress: bool | TileProgress | None, desc: str) -> TileProgress:
    if isinstance(progress, TileProgress):
        return progress
    return TileProgress(desc, report=bool(predictor.progress if progress is None else progress))


def _tile_logit_rows(predictor: Predictor, rows: _NativeRows | _ZoomedRows, progress: bool | TileProgress | None,
                     desc: str) -> Iterator[tuple[int, Tensor]]:
    """The streaming core on the model's pixel grid (``rows.shape``)."""
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


def probabilities_uint8(logits: Tensor) -> Tensor:
    """Softmax over classes (dim 0) as uint8 (``round(255 p)``)."""
    return torch.softmax(logits, dim=0).mul_(255.0).round_().to(torch.uint8)


def predict_stream(
    predictor: Predictor,
    source: RowSource | np.ndarray,
    *,
    labels_out: np.ndarray | None = None,
    probs_out: np.ndarray | MutableSequence[Any] | None = None,
    progress: bool | TileProgress | None = None,
    desc: str = "tiles",
    on_logits: Callable[[int, Tensor], None] | None = None,
) -> np.ndarray:
    """Argmax labels (uint8 ``H x W``) of a whole micrograph with bounded memory.

    ``source`` is a :class:`RowSource` or an ``H x W`` (``H x W x C``) array in its native dtype
    (scaled with the predictor's ``intensity``, one map for the whole image, and normalised by the
    predictor; see the module docstring). Labels go into
    ``labels_out`` (any ``H x W`` uint8 array, e.g. a ``np.memmap``; allocated if None), and, if
    ``probs_out`` (``K x H x W`` uint8) is given, the softmax probabilities times 255.
    ``on_logits(y0, logits)`` sees every block of final logit rows (e.g. ``segment.ood.EntropyTiles``).
    """
    if isinstance(source, np.ndarray):
        source = ArraySource(source)
    h, w = source.shape
    if labels_out is None:
        labels_out = np.empty((h, w), dtype=np.uint8)
    elif tuple(labels_out.shape) != (h, w):
        raise ValueError(f"labels_out has shape {labels_out.shape}, the image {(h, w)}")
    for y0, logits in iter_logit_rows(predictor, source, progress=progress, desc=desc):
        rows = logits.shape[1]
        if logits.shape[0] > 256:
            raise ValueError(f"{logits.shape[0]} classes do not fit uint8 labels")
        labels_out[y0 : y0 + rows] = logits.argmax(0).to(torch.uint8).cpu().numpy()
        if on_logits is not None:
            on_logits(y0, logits)
        if probs_out is not None:
            probs_out[:, y0 : y0 + rows] = probabilities_uint8(logits).cpu().numpy()
    return labels_out


def accumulator_bytes(image_hw: tuple[int, int], num_classes: int, in_chans: int, tile_hw: tuple[int, int],
                      step_fraction: float, batch_size: int) -> int:
    """Bytes of the float buffers :func:`iter_logit_rows` holds for an image of this size (logit
    and weight accumulators, the input window); the model's activations come on top."""
    plan = plan_bands(image_hw, tile_hw, step_fraction, batch_size)
    return 4 * plan.padded_hw[1] * plan.capacity * (num_classes + 1 + in_chans)

