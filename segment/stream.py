"""Bounded-memory sliding-window inference for micrographs of any size, read from disk band by band (DESIGN.md 4).

The tiles run through the project's one tile loop, :func:`segment.tiling.tile_logit_rows`: the same
tiles, order and batches as ``Predictor.predict_logits``, summed into accumulators that hold only
the rows a tile still to come can touch; every row above the next tile's top edge is final, so it
is divided by its summed weights, turned into labels (and optional uint8 probabilities), handed
out, and its accumulator rows are reused. What this module adds is the input side: rows are read
from a :class:`segment.sources.RowSource`, scaled with one intensity window for the whole image and
normalised as they are needed, so neither the image nor its float map is ever whole in memory.
Peak memory is about ``(K + 1 + C) x (tile + step) x W`` floats
(:func:`segment.tiling.accumulator_bytes`) plus the uint8 label map. The result equals
``Predictor.predict_logits`` of the whole image.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pretrain.io import ImageContentError
from segment.infer import Predictor
from segment.progress import TileProgress
from segment.sources import ArraySource, RowSource, source_intensity_window
from segment.tiling import class_labels, tile_logit_rows
from segment.zoom import RowResampler, image_mode, resize_columns, zoomed_hw

__all__ = ["iter_logit_rows", "predict_stream", "probabilities_uint8"]


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
        yield from tile_logit_rows(predictor, native, progress, desc)
    else:
        zoomed = _ZoomedRows(native, zoomed_hw((h, w), predictor.zoom))
        back = RowResampler(zoomed.shape[0], h, "bilinear")
        for _, block in tile_logit_rows(predictor, zoomed, progress, desc):
            yield from back.push(resize_columns(block, w, "bilinear"))
    native.check_not_constant()


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
        labels_out[y0 : y0 + rows] = class_labels(logits).cpu().numpy()
        if on_logits is not None:
            on_logits(y0, logits)
        if probs_out is not None:
            probs_out[:, y0 : y0 + rows] = probabilities_uint8(logits).cpu().numpy()
    return labels_out
