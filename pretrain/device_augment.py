"""The photometric half of the view augmentations, on whole batches on the training device
(issue 16 item 1).

The CPU workers cut the crops (random resized crop, flips, rot90: :mod:`pretrain.views` with
``photometric=False``) and ship them in [0, 1]; :class:`PhotometricAugment` then applies, per sample
and with the probabilities and ranges of :class:`pretrain.views.Augment`: brightness/contrast jitter
(random order, as ``v2.ColorJitter``), gamma, Gaussian blur (per-sample sigma, one fixed kernel of
``2 ceil(3 sigma_max) + 1`` taps, reflect padding as torchvision), Gaussian noise, then the channel
repeat and ``(x - mean) / std``. Each op is a few batched tensor ops, so a GPU does in microseconds
what cost a CPU worker tens of milliseconds per image; on a CPU it runs in the main process.

Per-view-position blur probabilities follow the views: DINO 1.0 / 0.1 for the two global crops,
0.5 for local ones; two-view methods 1.0 / 0.1.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.views import Augment, blur_kernel_size

__all__ = ["PhotometricAugment"]


class PhotometricAugment:
    """``views -> views``: batched photometric augmentation + normalisation of ``B x 1 x H x W``
    float views in [0, 1] (one tensor per view position), on their device.

    Args:
        augment: strengths and probabilities (the same :class:`Augment` the CPU views would use).
        blur_p: blur probability per view position; positions beyond the list use its last entry.
        channels: output channels (1, or 3 by repetition); mean/std: optional normalisation.
    """

    def __init__(self, augment: Augment = Augment(), blur_p: Sequence[float] = (1.0, 0.1), *, channels: int = 1,
                 mean: float | None = None, std: float | None = None) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if not blur_p:
            raise ValueError("blur_p needs at least one probability")
        self.augment, self.blur_p = augment, tuple(float(p) for p in blur_p)
        self.channels, self.mean, self.std = channels, mean, std

    @classmethod
    def for_views(cls, views) -> PhotometricAugment:
        """The device half of ``views`` (a :class:`~pretrain.views.MultiCrop` / ``TwoViews`` built with
        ``photometric=False``): its augment, blur probabilities, channels and normalisation."""
        if getattr(views, "photometric", True):
            raise ValueError(f"{views!r} already applies the photometric augmentations (build it with photometric=False)")
        return cls(views.augment, views.blur_p, channels=views.channels, mean=views.mean, std=views.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(blur_p={self.blur_p}, channels={self.channels}, {self.augment})"

    @torch.no_grad()
    def __call__(self, views: Sequence[Tensor]) -> list[Tensor]:
        return [self.view(v, self.blur_p[min(i, len(self.blur_p) - 1)]) for i, v in enumerate(views)]

    def view(self, x: Tensor, blur_p: float) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1 or not x.is_floating_point():
            raise ValueError(f"expected B x 1 x H x W float views in [0, 1], got {tuple(x.shape)} {x.dtype}")
        a = self.augment
        x = x.float()
        if a.jitter_p > 0 and (a.brightness > 0 or a.contrast > 0):
            b = self._factor(x, a.brightness)
            c = self._factor(x, a.contrast)
            first = self._coin(x, 0.5)
            x = _apply(x, self._coin(x, a.jitter_p), lambda y, i: _jitter(y, _at(b, i), _at(c, i), first[i]))
        if a.gamma_p > 0 and tuple(a.gamma) != (1.0, 1.0):
            lo, hi = math.log(a.gamma[0]), math.log(a.gamma[1])
            gamma = (lo + (hi - lo) * self._uniform(x)).exp()
            x = _apply(x, self._coin(x, a.gamma_p), lambda y, i: y.clamp(0.0, 1.0).pow(gamma[i]))
        if blur_p > 0:
            lo, hi = a.blur_sigma
            sigma = lo + (hi - lo) * self._uniform(x)
            size = blur_kernel_size(min(x.shape[-2:]), hi)
            x = _apply(x, self._coin(x, blur_p), lambda y, i: _blur(y, sigma[i], size))
        if a.noise_p > 0 and a.noise_sigma[1] > 0:
            sigma = a.noise_sigma[0] + (a.noise_sigma[1] - a.noise_sigma[0]) * self._uniform(x)
            x = _apply(x, self._coin(x, a.noise_p),
                       lambda y, i: (y + sigma[i] * torch.randn_like(y)).clamp(0.0, 1.0))
        if self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.contiguous()

    # --- pieces -----------------------------------------------------------------------------
    @staticmethod
    def _uniform(x: Tensor) -> Tensor:
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device)

    def _coin(self, x: Tensor, p: float) -> Tensor:
        return self._uniform(x) < p

    def _factor(self, x: Tensor, strength: float) -> Tensor | None:
        """``v2.ColorJitter``'s factor: uniform in [max(0, 1 - s), 1 + s] per sample (None for s = 0)."""
        if strength <= 0:
            return None
        lo = max(0.0, 1 - strength)
        return lo + (1 + strength - lo) * self._uniform(x)


def _whole_batch(x: Tensor) -> bool:
    """Compute every sample and select (accelerators: no host sync), or index the selected ones (CPU)."""
    return x.device.type != "cpu"


def _apply(x: Tensor, mask: Tensor, fn) -> Tensor:
    """``fn`` on the samples where ``mask`` holds, the others unchanged. ``fn(y, i)`` gets the selected
    samples and an index for per-sample parameters. On a GPU every sample is computed and selected with
    ``torch.where`` (no host sync); on a CPU only the selected ones are computed (less work)."""
    if _whole_batch(x):
        return torch.where(mask, fn(x, slice(None)), x)
    index = mask.view(-1).nonzero().view(-1)
    if index.numel() == 0:
        return x
    if index.numel() == x.shape[0]:
        return fn(x, slice(None))
    out = x.clone()
    out[index] = fn(x[index], index)
    return out


def _at(t: Tensor | None, i) -> Tensor | None:
    return None if t is None else t[i]


def _jitter(x: Tensor, b: Tensor | None, c: Tensor | None, brightness_first: Tensor) -> Tensor:
    """``v2.ColorJitter(brightness, contrast)`` with given factors, in the drawn order per sample;
    contrast blends with each image's mean."""

    def bright(y: Tensor) -> Tensor:
        return y if b is None else (y * b).clamp(0.0, 1.0)

    def contrast(y: Tensor) -> Tensor:
        if c is None:
            return y
        m = y.mean(dim=(1, 2, 3), keepdim=True)
        return (c * y + (1 - c) * m).clamp(0.0, 1.0)

    if b is None or c is None:
        return contrast(bright(x))
    if _whole_batch(x):
        return torch.where(brightness_first, contrast(bright(x)), bright(contrast(x)))
    out = torch.empty_like(x)  # CPU: each sample computes its own order only
    for first, index in ((True, brightness_first.view(-1).nonzero().view(-1)),
                         (False, (~brightness_first).view(-1).nonzero().view(-1))):
        if index.numel():
            y, bb, cc = x[index], b[index], c[index]
            y = (y * bb).clamp(0.0, 1.0) if first else y
            m = y.mean(dim=(1, 2, 3), keepdim=True)
            y = (cc * y + (1 - cc) * m).clamp(0.0, 1.0)
            y = y if first else (y * bb).clamp(0.0, 1.0)
            out[index] = y
    return out


def _blur(x: Tensor, sigma: Tensor, size: int) -> Tensor:
    """Gaussian blur, per-sample ``sigma`` (``B x 1 x 1 x 1``), ``size`` taps, reflect padding as
    torchvision: one separable grouped convolution per axis."""
    taps = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # B x size
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (size // 2,) * 4, mode="reflect")
    k = kernel.repeat_interleave(c, dim=0)
    y = F.conv2d(y, k.view(b * c, 1, size, 1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, 1, size), groups=b * c)
    return y.view(b, c, h, w)


