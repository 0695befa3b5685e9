"""Micrograph view augmentations for self-supervised pretraining (torchvision.transforms.v2).

Every transform works on float tensors ``C x H x W`` in [0, 1] (C = 1, gray), so 16-bit data keeps
its precision until the model sees it. Deliberately absent: hue/saturation jitter and solarisation
at 128 (they assume 8-bit RGB photographs), ImageNet statistics, blur that quantises to uint8.

* :func:`micrograph_view` - one augmentation pipeline: random resized crop, dihedral flips/rot90,
  brightness/contrast, gamma, Gaussian blur, Gaussian noise, optional 3-channel repeat and
  normalisation.
* :class:`TwoViews` (SimCLR, MoCo v3, BYOL), :class:`MultiCrop` (DINO): ``image -> list[Tensor]``.
* :class:`EvalView` (k-NN, linear probe): deterministic resize + centre crop.

The callables accept a float tensor from :mod:`pretrain.samples`, but also integer arrays/tensors and
PIL images (robust percentile normalisation, :func:`pretrain.samples.normalize_intensity`), so the same
views serve a plain map-style ``Dataset`` (e.g. torchvision ``ImageFolder``) for comparisons.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pretrain.samples import normalize_intensity

__all__ = [
    "Augment",
    "EvalView",
    "MultiCrop",
    "RandomGamma",
    "RandomNoise",
    "RandomRot90",
    "RepeatChannels",
    "TwoViews",
    "as_image_tensor",
    "blur_kernel_size",
    "micrograph_view",
    "stack_views",
]

logger = logging.getLogger(__name__)


def as_image_tensor(image: Tensor | np.ndarray | Image.Image) -> Tensor:
    """``image`` as a float32 ``C x H x W`` tensor in [0, 1].

    Float tensors/arrays pass through (``H x W`` gets a channel axis; HxWxC arrays are moved to
    channels first). Integer data (8/16-bit) and PIL images are scaled with the robust percentile
    normalisation of :func:`pretrain.samples.normalize_intensity`; colour PIL images become gray.
    """
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
            image = image.convert("L")
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3):
            image = np.moveaxis(image, -1, 0)
        if not np.issubdtype(image.dtype, np.floating):
            image = normalize_intensity(image)
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    elif isinstance(image, Tensor):
        tensor = image
        if not tensor.is_floating_point():
            tensor = torch.from_numpy(normalize_intensity(tensor.cpu().numpy()))
        tensor = tensor.float()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise ValueError(f"expected an H x W or C x H x W image, got shape {tuple(tensor.shape)}")
    return tensor


class RandomRot90(v2.Transform):
    """Rotate by k x 90 degrees, k uniform in {0, 1, 2, 3} (with a horizontal flip: all of D4)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return torch.rot90(inpt, params["k"], dims=(-2, -1)) if params["k"] else inpt


class RandomGamma(v2.Transform):
    """Gamma correction ``x ** g`` with ``g`` log-uniform in ``gamma`` (inputs in [0, 1])."""

    def __init__(self, gamma: tuple[float, float] = (0.7, 1.4)) -> None:
        super().__init__()
        if not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma range must be positive and ordered, got {gamma}")
        self.gamma = gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = math.log(self.gamma[0]), math.log(self.gamma[1])
        return {"gamma": math.exp(lo + (hi - lo) * float(torch.rand(())))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.adjust_gamma, inpt.clamp(0.0, 1.0), gamma=params["gamma"])


class RandomNoise(v2.Transform):
    """Additive Gaussian noise with sigma uniform in ``sigma``, clipped to [0, 1] (float input)."""

    def __init__(self, sigma: tuple[float, float] = (0.0, 0.05)) -> None:
        super().__init__()
        if not 0 <= sigma[0] <= sigma[1]:
            raise ValueError(f"sigma range must be non-negative and ordered, got {sigma}")
        self.sigma = sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.sigma
        return {"sigma": lo + (hi - lo) * float(torch.rand(()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.gaussian_noise, inpt, sigma=params["sigma"], clip=True)


class RepeatChannels(v2.Transform):
    """Repeat a 1-channel image to ``channels`` (e.g. 3 for RGB-pretrained encoders)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.shape[-3] == self.channels:
            return inpt
        if inpt.shape[-3] != 1:
            raise ValueError(f"cannot repeat {inpt.shape[-3]} channels to {self.channels}")
        return inpt.repeat_interleave(self.channels, dim=-3)


@dataclass(frozen=True)
class Augment:
    """Strengths of the augmentations shared by every view (probabilities are per view).

    ``brightness``/``contrast`` as in ``v2.ColorJitter`` (multiplicative factor ranges around 1),
    ``gamma`` a log-uniform range, ``noise_sigma`` in units of the [0, 1] intensity range,
    ``blur_sigma`` in pixels of the output crop. ``flip``/``rot90`` toggle the dihedral group.
    """

    flip: bool = True
    rot90: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8
    gamma: tuple[float, float] = (0.7, 1.4)
    gamma_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_sigma: tuple[float, float] = (0.0, 0.04)
    noise_p: float = 0.5
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def blur_kernel_size(size: int, sigma_max: float) -> int:
    """Odd Gaussian kernel covering +-3 sigma of the largest blur (``2 ceil(3 sigma_max) + 1``: 13 taps
    for sigma 2), at least 3 and at most the crop side. SimCLR's 10 % of the crop (23 taps at 224 px)
    spent most of its taps on weights below 1e-6 of the centre's."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    largest = size if size % 2 else size - 1
    return max(3, min(k, largest))


def _finish(channels: int, mean: float | None, std: float | None) -> list[v2.Transform]:
    """Channel repeat and optional ``(x - mean) / std`` normalisation, shared by all views."""
    tail: list[v2.Transform] = []
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if channels != 1:
        tail.append(RepeatChannels(channels))
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None and std is not None:
        tail.append(v2.Normalize(mean=[mean] * channels, std=[std] * channels))
    return tail


def micrograph_view(
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    *,
    augment: Augment = Augment(),
    blur_p: float = 0.5,
    channels: int = 1,
    mean: float | None = None,
    std: float | None = None,
    photometric: bool = True,
) -> v2.Compose:
    """One random view: crop of ``scale`` x area resized to ``size``, flips/rot90, intensity jitter,
    gamma, blur, noise; then channel repeat and optional normalisation. Float in, float out.
    ``photometric=False`` stops after the geometric part (1 channel in [0, 1]): the rest then runs
    batched on the device (:class:`pretrain.device_augment.PhotometricAugment`)."""
    a = augment
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, ratio=a.ratio, antialias=True),
    ]
    if a.flip:
        steps.append(v2.RandomHorizontalFlip())
    if a.rot90:
        steps.append(RandomRot90())
    if not photometric:
        return v2.Compose(steps)
    if a.jitter_p > 0 and (a.brightness > 0 or a.contrast > 0):
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=a.brightness, contrast=a.contrast)],
                                    p=a.jitter_p))
    if a.gamma_p > 0 and a.gamma != (1.0, 1.0):
        steps.append(v2.RandomApply([RandomGamma(a.gamma)], p=a.gamma_p))
    if blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size, a.blur_sigma[1]), sigma=a.blur_sigma)],
                                    p=blur_p))
    if a.noise_p > 0 and a.noise_sigma[1] > 0:
        steps.append(v2.RandomApply([RandomNoise(a.noise_sigma)], p=a.noise_p))
    steps += _finish(channels, mean, std)
    return v2.Compose(steps)


class TwoViews:
    """Two random views of one image (SimCLR, MoCo v3, BYOL): ``image -> [view1, view2]``.

    ``blur_p`` gives the blur probability of each view; the BYOL-style default (1.0, 0.1) makes
    the pair asymmetric. Each view is ``channels x size x size`` float32.
    """

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        *,
        augment: Augment = Augment(),
        blur_p: tuple[float, float] = (1.0, 0.1),
        channels: int = 1,
        mean: float | None = None,
        std: float | None = None,
        photometric: bool = True,
    ) -> None:
        self.size = size
        self.augment, self.blur_p, self.channels, self.mean, self.std = augment, tuple(blur_p), channels, mean, std
        self.photometric = photometric
        self.transforms = [
            micrograph_view(size, scale, augment=augment, blur_p=p, channels=channels, mean=mean, std=std,
                            photometric=photometric)
            for p in blur_p
        ]
        if len(self.transforms) != 2:
            raise ValueError(f"blur_p needs one probability per view (2), got {blur_p}")

    def __call__(self, image: Tensor | np.ndarray | Image.Image) -> list[Tensor]:
        x = as_image_tensor(image)
        return [t(x) for t in self.transforms]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, views={self.transforms})"


class MultiCrop:
    """DINO multi-crop: 2 global views then ``n_local`` local views, ``image -> list[Tensor]``.

    Global crops cover ``global_scale`` of the image at ``global_size`` (blur p = 1.0 and 0.1),
    local crops ``local_scale`` at ``local_size`` (blur p = 0.5). Crops of different sizes cannot
    be stacked together: a batch holds one tensor per crop position.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 6,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        *,
        augment: Augment = Augment(),
        channels: int = 1,
        mean: float | None = None,
        std: float | None = None,
        photometric: bool = True,
    ) -> None:
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.augment, self.blur_p, self.channels, self.mean, self.std = augment, (1.0, 0.1, 0.5), channels, mean, std
        self.photometric = photometric
        common: dict[str, Any] = dict(augment=augment, channels=channels, mean=mean, std=std, photometric=photometric)
        self.global_views = [micrograph_view(global_size, global_scale, blur_p=p, **common) for p in (1.0, 0.1)]
        self.local_view = micrograph_view(local_size, local_scale, blur_p=0.5, **common)

    @property
    def n_views(self) -> int:
        """Crops per image: 2 global + ``n_local`` local."""
        return 2 + self.n_local

    def __call__(self, image: Tensor | np.ndarray | Image.Image) -> list[Tensor]:
        x = as_image_tensor(image)
        return [t(x) for t in self.global_views] + [self.local_view(x) for _ in range(self.n_local)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local={self.n_local})")


class EvalView:
    """Deterministic view for k-NN / probes: shorter side resized to ``size`` (``resize=False``
    keeps the pixel scale), centre crop ``size x size`` (zero-padded when smaller)."""

    def __init__(
        self,
        size: int = 224,
        *,
        resize: bool = True,
        channels: int = 1,
        mean: float | None = None,
        std: float | None = None,
    ) -> None:
        self.size = size
        steps: list[v2.Transform] = [v2.Resize(size, antialias=True)] if resize else []
        steps.append(v2.CenterCrop(size))
        self.transform = v2.Compose(steps + _finish(channels, mean, std))

    def __call__(self, image: Tensor | np.ndarray | Image.Image) -> Tensor:
        return self.transform(as_image_tensor(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform})"


def stack_views(samples: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Collate per-image view lists into one ``B x C x H x W`` tensor per view position
    (for a plain ``DataLoader(collate_fn=...)``)."""
    return [torch.stack(column) for column in zip(*samples, strict=True)]

