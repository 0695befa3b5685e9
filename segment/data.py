"""The segmentation training dataset: image/mask pairs served as normalised image tensors with long masks.

Files flow one way: :func:`segment.pairs.find_pairs` pairs images with masks in a folder layout,
:class:`segment.class_maps.ClassMap` turns a mask file's raw pixels (colour overlay or index values)
into uint8 class indices, and :class:`SegmentationDataset` serves normalised image tensors with long
masks, cropped and augmented by an albumentations pipeline from
:func:`segment.augment.train_transform`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from pretrain.intensity import canonical_intensity, check_not_constant, scale_intensity
from pretrain.io import read_micrograph, read_raw
from segment.class_maps import ClassMap, get_class_map
from segment.pairs import Pair
from segment.zoom import check_zoom, resize_image, resize_labels, zoomed_hw

__all__ = ["SegmentationDataset"]

logger = logging.getLogger(__name__)


class SegmentationDataset(Dataset[dict[str, Any]]):
    """Image/mask pairs as ``{"image": float C x H x W, "mask": long H x W, "index": int}``.

    Images are read as gray, scaled to [0, 1] with ``pretrain.intensity.scale_intensity`` in mode
    ``intensity`` (``"percentile"``: per-image 0.5/99.5 percentile stretch, as pretraining;
    ``"dtype"``: divided by the dtype's maximum; NaN/Inf pixels or a constant image are a
    ``pretrain.io.ImageContentError`` naming the file, when the pair is loaded), augmented jointly
    with their encoded masks by ``transform`` (an albumentations pipeline, or any callable taking
    ``image=``, ``mask=`` and returning a dict of both), repeated to ``in_chans`` channels and
    normalised with ``mean``/``std``. With ``cache`` every pair is loaded and checked once, up
    front (data sets are small; forked workers share the arrays). ``samples_per_epoch`` sets
    ``len()`` so that a few images give many random crops; item ``i`` uses pair
    ``i % len(pairs)``, which is the returned ``index``. With ``zoom != 1`` every pair is resized
    by ``zoom`` when loaded (:mod:`segment.zoom`: area/bilinear image, nearest-neighbour mask), so
    crops are taken on the model's grid; validation sets keep ``zoom=1`` (the Predictor zooms).
    """

    def __init__(self, pairs: Sequence[Pair], class_map: ClassMap | str | Mapping[str, Any], *,
                 in_chans: int = 1, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,),
                 transform: Callable[..., dict[str, Any]] | None = None, cache: bool = True,
                 samples_per_epoch: int | None = None, intensity: str = "percentile",
                 zoom: float = 1.0) -> None:
        try:
            self.intensity = canonical_intensity(intensity)
            self.zoom = check_zoom(zoom)
        except ValueError as e:
            raise ValueError(f"SegmentationDataset: {e}") from None
        self.pairs: list[Pair] = [(Path(i), Path(m)) for i, m in pairs]
        if not self.pairs:
            raise ValueError("SegmentationDataset: no image/mask pairs given")
        self.class_map = get_class_map(class_map)
        if in_chans not in (1, 3):
            raise ValueError(f"SegmentationDataset: in_chans must be 1 or 3, got {in_chans!r}")
        self.in_chans = in_chans
        self.mean = _channel_stats(mean, in_chans, "mean")
        self.std = _channel_stats(std, in_chans, "std")
        if (self.std <= 0).any():
            raise ValueError(f"SegmentationDataset: std must be positive, got {list(std)}")
        if samples_per_epoch is not None and (isinstance(samples_per_epoch, bool) or samples_per_epoch < 1):
            raise ValueError("SegmentationDataset: samples_per_epoch must be >= 1, "
                             f"got {samples_per_epoch!r}")
        self.samples_per_epoch = samples_per_epoch
        self.transform = transform
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._seeded_worker: tuple[int, int] | None = None
        if cache:
            for i in range(len(self.pairs)):
                self.load(i)
            megabytes = sum(a.nbytes + b.nbytes for a, b in self._cache.values()) / 2**20
            logger.info("loaded %d image/mask pairs (%.1f MiB)", len(self.pairs), megabytes)

    def __len__(self) -> int:
        return self.samples_per_epoch if self.samples_per_epoch is not None else len(self.pairs)

    def __getitem__(self, item: int) -> dict[str, Any]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} samples")
        index = item % len(self.pairs)
        image, label = self.load(index)
        if self.transform is not None:
            self._seed_transform()
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
            if image.ndim == 3:
                image = image[..., 0]
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        x = (x.unsqueeze(0).expand(self.in_chans, -1, -1) - self.mean) / self.std
        y = torch.from_numpy(np.asarray(label).astype(np.int64))
        return {"image": x, "mask": y, "index": index}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Full image (float32 HxW in [0, 1]) and class indices (uint8 HxW) of pair ``index``."""
        if index in self._cache:
            return self._cache[index]
        image_path, mask_path = self.pairs[index]
        raw = read_micrograph(image_path, gray=True).image
        image = scale_intensity(raw, self.intensity, path=image_path)  # NaN/Inf: error naming the file
        check_not_constant(raw, image_path)  # a blank frame teaches the model nothing
        del raw
        label = self.class_map.encode(read_raw(mask_path), mask_path)
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"image and mask sizes differ: {image_path} is {image.shape[0]}x"
                             f"{image.shape[1]} but {mask_path} is {label.shape[0]}x{label.shape[1]} (HxW)")
        if self.zoom != 1.0:
            hw = zoomed_hw(image.shape[:2], self.zoom)
            image = resize_image(torch.from_numpy(image)[None], hw)[0].numpy()
            label = resize_labels(label, hw)
        if self.cache:
            self._cache[index] = (image, label)
        return image, label

    @property
    def paths(self) -> list[Path]:
        """Image paths, in pair order."""
        return [image for image, _ in self.pairs]

    @property
    def mask_paths(self) -> list[Path]:
        """Mask paths, in pair order."""
        return [mask for _, mask in self.pairs]

    @property
    def images(self) -> list[np.ndarray]:
        """Full images (float32 HxW in [0, 1], no transform), in pair order."""
        return [self.load(i)[0] for i in range(len(self.pairs))]

    @property
    def labels(self) -> list[np.ndarray]:
        """Full class-index masks (uint8 HxW, no transform), in pair order."""
        return [self.load(i)[1] for i in range(len(self.pairs))]

    def class_counts(self) -> np.ndarray:
        """Pixels per class (int64, length K) over all full masks."""
        counts = np.zeros(self.class_map.num_classes, dtype=np.int64)
        for label in self.labels:
            counts += np.bincount(label.ravel(), minlength=counts.size)[:counts.size]
        return counts

    def _seed_transform(self) -> None:
        """Give each DataLoader worker its own augmentation stream (albumentations keeps a
        generator per Compose, which forked workers would otherwise all copy)."""
        info = get_worker_info()
        if info is None or not hasattr(self.transform, "set_random_seed"):
            return
        key = (os.getpid(), info.seed)
        if self._seeded_worker != key:
            self.transform.set_random_seed(info.seed % 2**32)  # type: ignore[union-attr]
            self._seeded_worker = key


def _channel_stats(values: Sequence[float], in_chans: int, what: str) -> torch.Tensor:
    stats = [float(v) for v in values]
    if len(stats) == 1:
        stats *= in_chans
    if len(stats) != in_chans:
        raise ValueError(f"SegmentationDataset: {what} has {len(stats)} values for {in_chans} channels")
    return torch.tensor(stats, dtype=torch.float32).view(-1, 1, 1)
