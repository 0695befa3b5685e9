"""Joint image/mask augmentation: albumentations pipelines for training (:func:`train_transform`)
and evaluation (:func:`eval_transform`)."""
from __future__ import annotations

import math
from enum import Enum
from typing import Any

import albumentations as A
import cv2
import numpy as np

__all__ = [
    "MicrographCLAHE",
    "Strength",
    "eval_transform",
    "train_transform",
]


class Strength(str, Enum):
    """Augmentation strengths of :func:`train_transform`."""

    NONE = "none"  # random crop (padded if the image is smaller)
    LIGHT = "light"  # + flips and 90-degree rotations: lossless, no resampling or intensity change
    DEFAULT = "default"  # + random zoom and micrograph intensity changes (NASA's recipe, milder)


class MicrographCLAHE(A.CLAHE):
    """CLAHE that keeps the levels of float images with a narrow or 16-bit intensity range.

    albumentations 2.0.8 runs CLAHE on float32 by rounding ``image * 255`` to uint8, which reduces
    e.g. a 16-bit image spanning 1000..3000 to ~10 gray levels. This variant first stretches the
    image to its own min..max, so the 8-bit view has 256 levels; the output (float32 in [0, 1]) is
    CLAHE's, as for a full-range 8-bit image, for which it equals ``A.CLAHE`` exactly.
    """

    def apply(self, img: np.ndarray, clip_limit: float, **params: Any) -> np.ndarray:
        if img.dtype == np.uint8:
            return super().apply(img, clip_limit, **params)
        lo, hi = float(img.min()), float(img.max())
        if hi - lo < 1e-6:
            return img
        view = np.rint((img - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        return super().apply(view, clip_limit, **params).astype(np.float32) / np.float32(255.0)


def train_transform(crop_size: int, *, scale: tuple[float, float] = (0.75, 1.33),
                    strength: Strength | str = Strength.DEFAULT, seed: int | None = None) -> A.Compose:
    """Joint image/mask augmentation yielding ``crop_size`` squares.

    Input: a float32 image in [0, 1] (HxW or HxWx1) and a uint8 HxW mask. ``scale`` is the range of
    zoom factors of the ``default`` strength (>1 magnifies): a square of side ``crop_size / s`` is
    cropped and resized to ``crop_size``. Images smaller than the crop are reflect-padded (image and
    mask alike, so labels stay valid). Masks are only ever resampled with nearest neighbour, the
    pixel-centre aligned kind (``cv2.INTER_NEAREST_EXACT``): OpenCV's plain ``INTER_NEAREST`` is
    offset from the image's linear/area resampling and shifts labels by up to a pixel.
    ``seed`` fixes the transform's generator (:class:`segment.data.SegmentationDataset` reseeds it per
    DataLoader worker).
    """
    if isinstance(crop_size, bool) or not isinstance(crop_size, (int, np.integer)) or crop_size < 1:
        raise ValueError(f"train_transform: crop_size must be a positive integer, got {crop_size!r}")
    try:
        strength = Strength(strength.value if isinstance(strength, Strength) else str(strength).lower())
    except ValueError:
        raise ValueError(f"train_transform: strength {strength!r} is not one of "
                         f"{[s.value for s in Strength]}") from None
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"train_transform: scale must be (min, max) with 0 < min <= max, got {scale}")
    size = int(crop_size)
    reflect = cv2.BORDER_REFLECT_101
    ops: list[Any]
    if strength is Strength.DEFAULT:
        largest = max(size, math.ceil(size / lo))
        smallest = max(1, min(largest, round(size / hi)))
        ops = [
            A.PadIfNeeded(min_height=largest, min_width=largest, border_mode=reflect, p=1.0),
            A.RandomSizedCrop(min_max_height=(smallest, largest), size=(size, size),
                              interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST_EXACT,
                              area_for_downscale="image", p=1.0),
        ]
    else:
        ops = [A.PadIfNeeded(min_height=size, min_width=size, border_mode=reflect, p=1.0),
               A.RandomCrop(height=size, width=size, p=1.0)]
    if strength is not Strength.NONE:
        ops.append(A.D4(p=1.0))
    if strength is Strength.DEFAULT:
        ops += [
            A.GaussNoise(std_range=(0.01, 0.04), p=0.25),
            A.OneOf([
                MicrographCLAHE(clip_limit=(1.0, 3.0), tile_grid_size=(8, 8), p=1.0),
                A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=1.0),
                A.RandomGamma(gamma_limit=(80, 125), p=1.0),
            ], p=0.6),
            A.OneOf([
                A.Sharpen(alpha=(0.1, 0.3), lightness=(1.0, 1.0), p=1.0),
                A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.3, 1.0), p=1.0),
            ], p=0.3),
        ]
    return A.Compose(ops, mask_interpolation=cv2.INTER_NEAREST_EXACT, seed=seed)


def eval_transform() -> A.Compose:
    """Identity: evaluation sees whole images (tiling happens in ``segment.infer``)."""
    return A.Compose([], mask_interpolation=cv2.INTER_NEAREST_EXACT)
