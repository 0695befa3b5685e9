"""Resampling between a micrograph's pixels and the pixels a model works on (``data.zoom``).

A model trained with ``zoom = z`` sees every image resized by ``z`` (0.5: half the pixels per side,
so a 256-px tile covers 512 native pixels: more context per tile, e.g. the whole coating
cross-section; 2: small particles get more pixels). Inference resizes the image by ``z``, runs the
tiles, and resizes the logits back to the native grid, so labels, overlays and particle statistics
are always in the micrograph's own pixels.

Conventions (the same in training, :class:`~segment.infer.Predictor` and the band-wise
:mod:`segment.stream` path):
- images shrink by area averaging (``F.interpolate(mode="area")``, PyTorch's adaptive average
  pooling: output row ``i`` averages input rows ``floor(i*H/h) .. ceil((i+1)*H/h)``) and grow
  bilinearly (``align_corners=False``);
- logits go back to the native grid bilinearly (``align_corners=False``);
- masks resize by pixel-centre nearest neighbour (``nearest-exact``).

:class:`RowResampler` applies one of these along the rows of an image that arrives band by band,
holding only the input rows an output row still needs, so the streaming path stays bounded in
memory and equals the whole-image resize (to float rounding).
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["check_zoom", "zoom_arg", "zoomed_hw", "image_mode", "resize_image", "resize_columns", "resize_logits",
           "resize_labels", "RowResampler"]


def check_zoom(zoom: float) -> float:
    """``zoom`` as a float; a clear error unless it is a positive finite number."""
    try:
        z = float(zoom)
    except (TypeError, ValueError):
        raise ValueError(f"zoom must be a positive number, got {zoom!r}") from None
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"zoom must be a positive number, got {zoom!r}")
    return z


def zoom_arg(text: str) -> float:
    """``argparse`` type of ``--zoom`` options: the value, or a usage error saying what is wrong."""
    try:
        return check_zoom(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def zoomed_hw(hw: tuple[int, int], zoom: float) -> tuple[int, int]:
    """Size of an ``H x W`` image resized by ``zoom`` (rounded, at least 1 x 1)."""
    z = check_zoom(zoom)
    return max(1, round(hw[0] * z)), max(1, round(hw[1] * z))


def image_mode(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> str:
    """How an image is resized: ``"area"`` when it shrinks, ``"bilinear"`` when it grows."""
    return "area" if out_hw[0] * out_hw[1] < in_hw[0] * in_hw[1] else "bilinear"


def _interpolate(x: Tensor, hw: tuple[int, int], mode: str) -> Tensor:
    if mode == "area":
        return F.interpolate(x[None], size=hw, mode="area")[0]
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False)[0]


def resize_image(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """``C x H x W`` float image -> ``C x h x w``: area average to shrink, bilinear to grow."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return _interpolate(x, hw, image_mode(tuple(x.shape[-2:]), hw))


def resize_columns(x: Tensor, width: int, mode: str) -> Tensor:
    """Resize only the width of a ``C x n x W`` block of rows (rows stay as they are)."""
    if x.shape[-1] == width:
        return x
    return _interpolate(x, (x.shape[-2], width), mode)


def resize_logits(logits: Tensor, hw: tuple[int, int]) -> Tensor:
    """``K x h x w`` logits -> ``K x H x W`` on another grid, bilinearly (``align_corners=False``)."""
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits
    return _interpolate(logits, hw, "bilinear")


def resize_labels(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``H x W`` integer labels -> ``h x w`` by pixel-centre nearest neighbour (no new classes)."""
    if tuple(labels.shape[:2]) == tuple(hw):
        return labels
    t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    return F.interpolate(t, size=hw, mode="nearest-exact")[0, 0].numpy().astype(labels.dtype)


def _row_weights(in_size: int, out_size: int, mode: str) -> list[tuple[int, np.ndarray]]:
    """For each output row: ``(first input row, weights over the following input rows)``.

    ``area``: PyTorch's adaptive average pooling windows. ``bilinear``: PyTorch's
    ``align_corners=False`` source index ``max(0, (i + 0.5) * in/out - 0.5)`` and its two neighbours.
    """
    out: list[tuple[int, np.ndarray]] = []
    if mode == "area":
        for i in range(out_size):
            a, b = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
            out.append((a, np.full(b - a, 1.0 / (b - a), dtype=np.float32)))
        return out
    scale = np.float32(in_size) / np.float32(out_size)  # float32, as PyTorch computes it
    for i in range(out_size):
        s = max(float(scale * np.float32(i + 0.5) - np.float32(0.5)), 0.0)
        i0 = min(int(s), in_size - 1)
        lam = s - i0 if i0 < in_size - 1 else 0.0
        out.append((i0, np.array([1.0 - lam, lam] if lam else [1.0], dtype=np.float32)))
    return out


class RowResampler:
    """Resample the rows of an image that arrives top-down in blocks (``C x n x W`` tensors).

    :meth:`push` takes the next block of input rows and yields ``(first output row, C x m x W)``
    for every output row whose input rows have all arrived. Each output row is the same weighted
    sum of input rows as ``F.interpolate`` takes along that axis (area to shrink, bilinear to
    grow, or bilinear in every case with ``mode="bilinear"``); only the rows still needed are kept.
    """

    def __init__(self, in_rows: int, out_rows: int, mode: str | None = None) -> None:
        if in_rows < 1 or out_rows < 1:
            raise ValueError(f"row counts must be positive, got {in_rows} -> {out_rows}")
        self.in_rows, self.out_rows = in_rows, out_rows
        mode = mode or ("area" if out_rows < in_rows else "bilinear")
        if mode not in ("area", "bilinear"):
            raise ValueError(f"mode must be 'area' or 'bilinear', got {mode!r}")
        self.identity = in_rows == out_rows
        self.weights = _row_weights(in_rows, out_rows, mode)
        self.buf: Tensor | None = None  # input rows [self.buf_y0, self.received)
        self.buf_y0 = 0
        self.received = 0
        self.next_out = 0

    def push(self, block: Tensor) -> Iterator[tuple[int, Tensor]]:
        n = block.shape[-2]
        if self.received + n > self.in_rows:
            raise ValueError(f"{self.received + n} rows pushed, the image has {self.in_rows}")
        if self.identity:
            self.received += n
            yield self.received - n, block
            return
        self.buf = block if self.buf is None else torch.cat([self.buf, block], dim=-2)
        self.received += n
        first, rows = self.next_out, []
        while self.next_out < self.out_rows:
            a, w = self.weights[self.next_out]
            if a + len(w) > self.received:
                break
            src = self.buf[..., a - self.buf_y0 : a - self.buf_y0 + len(w), :]
            rows.append(torch.einsum("r,...rw->...w", torch.from_numpy(w).to(src), src))
            self.next_out += 1
        if self.next_out < self.out_rows:  # drop the rows no later output needs
            keep_from = min(self.weights[self.next_out][0], self.received)
            if keep_from > self.buf_y0:
                self.buf = self.buf[..., keep_from - self.buf_y0 :, :]
                self.buf_y0 = keep_from
        else:
            self.buf = None
        if rows:
            yield first, torch.stack(rows, dim=-2)
