"""One shard sample -> a normalised micrograph: decoding (16 bits kept), the sample's image, name and
label, and the per-frame intensity mapping; the per-sample stages of :mod:`pretrain.data`'s pipelines.

* No built-in webdataset decoder keeps 16 bits: :func:`decode_image` reads PNG (``I;16``) with Pillow
  and TIFF with tifffile, in their native dtype. :func:`_decode_field` is the pipelines' only decoder
  handler (shards are data: nothing is unpickled).

Intensity: each frame is mapped to [0, 1] by its own window (:func:`normalize_intensity` =
:func:`pretrain.intensity.scale_intensity`, ``intensity`` one of ``pretrain.intensity.INTENSITY_MODES``: the
0.5/99.5 percentiles by default, or mean/std, median/MAD; the same mapping ``segment`` fine-tunes
with, recorded in the export's ``encoder.json``); the window comes from the whole frame even when
a tile of it is taken; a constant frame becomes zeros.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pretrain.intensity import check_finite, intensity_window, scale_intensity
from pretrain.io import decode_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "decode_image",
    "normalize_intensity",
]

IMAGE_EXTENSIONS = ("png", "tif", "tiff", "jpg", "jpeg")
"""Sample fields holding the image, first found wins (our shards write ``png`` or ``tif``)."""


# --- intensity -------------------------------------------------------------------------------


def normalize_intensity(image: np.ndarray, intensity: str = "percentile",
                        *, value_range: tuple[float, float] | None = None,
                        path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """``image`` as float32 in [0, 1] by the per-image mapping that segmentation uses too:
    :func:`pretrain.intensity.scale_intensity` in mode ``intensity`` (the window from
    :func:`pretrain.intensity.intensity_window` unless ``value_range`` is given; a constant image gives
    zeros; NaN/Inf pixels raise ``pretrain.io.ImageContentError`` naming ``path``)."""
    return scale_intensity(image, intensity, value_range=value_range, path=path)


# --- decoding --------------------------------------------------------------------------------


def _decode_field(key: str, data: bytes) -> Any:
    """webdataset decoder handler: image fields to arrays, ``json`` to a dict, anything else stays bytes.

    The only handler: webdataset's defaults (``post=``) would unpickle ``.pyd``/``.pickle`` and
    ``torch.load`` ``.pth`` members, so a crafted shard could run code; shards are data.
    """
    ext = key.lstrip(".").lower()
    if ext in IMAGE_EXTENSIONS:
        return decode_image(data, ext)
    if ext == "json":
        return json.loads(data)
    return data


def _sample_image(sample: dict[str, Any]) -> np.ndarray:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} from {sample.get('__url__')} has no image "
                   f"(fields: {sorted(k for k in sample if not k.startswith('__'))})")


def _sample_name(sample: dict[str, Any]) -> str:
    """What names a sample in errors: its source file (from the shard writer's json), else its key."""
    meta = sample.get("json")
    source = meta.get("source") if isinstance(meta, dict) else None
    return f"{source} (sample {sample.get('__key__')} in {sample.get('__url__')})" if source else \
        f"sample {sample.get('__key__')} in {sample.get('__url__')}"


def _sample_label(sample: dict[str, Any], required: bool) -> int:
    meta = sample.get("json") or {}
    label = meta.get("label_index")
    if label is None:
        if required:
            raise KeyError(f"sample {sample.get('__key__')!r} from {sample.get('__url__')} has no label")
        return -1
    return int(label)


# --- per-sample stages (module-level classes so DataLoader workers can pickle them) ---------


class _Prepare:
    """Decoded sample -> ``(key, label, image)``: robust normalisation (intensity range from the
    whole frame), optional random tile of at most ``max_side`` pixels, float tensor 1xHxW."""

    def __init__(self, with_labels: bool, intensity: str, max_side: int | None) -> None:
        self.with_labels, self.intensity, self.max_side = with_labels, intensity, max_side

    def __call__(self, sample: dict[str, Any]) -> tuple[str, int, Tensor]:
        image = _sample_image(sample)
        label = _sample_label(sample, self.with_labels)
        name = _sample_name(sample)
        check_finite(image, name)  # the whole frame sets the tile's intensity window
        value_range = intensity_window(image, self.intensity)
        if self.max_side is not None:
            image = _random_tile(image, self.max_side)
        tensor = torch.from_numpy(normalize_intensity(image, self.intensity, value_range=value_range,
                                                      path=name)).unsqueeze(0)
        return sample["__key__"], label, tensor


def _random_tile(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    top = int(torch.randint(h - max_side + 1, ())) if h > max_side else 0
    left = int(torch.randint(w - max_side + 1, ())) if w > max_side else 0
    return image[top:top + max_side, left:left + max_side]


class _EvalSample:
    """Decoded sample -> ``(image, label, key)`` for :func:`pretrain.data.iterate_samples`."""

    def __init__(self, transform: Callable[[Tensor], Any] | None, intensity: str) -> None:
        self.transform, self.intensity = transform, intensity

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int, str]:
        image = torch.from_numpy(normalize_intensity(_sample_image(sample), self.intensity)).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return image, _sample_label(sample, False), sample["__key__"]
