"""Imaging model of the synthetic micrographs: domain-shift knobs and SEM rendering of a clean map.

:class:`Shift` holds the imaging and scale knobs (the defaults are the training domain);
``_render`` turns a clean intensity map into an 8-bit SEM image (PSF blur, drift/vignetting,
Poisson-like and scan-line noise, detector contrast/brightness and gamma). The material
geometries that feed it are in :mod:`pretrain.synthetic_materials`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["Shift", "TEST_SHIFT", "Size"]

Size = int | tuple[int, int]


@dataclass(frozen=True)
class Shift:
    """Domain-shift knobs; the defaults are the training domain (no shift).

    contrast: scales deviations from the image mean (lower -> flatter image).
    brightness: added to intensities in [0, 1] units.
    invert: flips the material contrast (precipitates bright instead of dark).
    magnification: scales every feature size in pixels (and divides the pixel size).
    noise: multiplies the detector noise level.  blur: multiplies the PSF sigma.
    drift: multiplies the slow brightness drift / vignetting amplitude.
    gamma: detector gamma applied last (``I ** gamma``).
    """

    contrast: float = 1.0
    brightness: float = 0.0
    invert: bool = False
    magnification: float = 1.0
    noise: float = 1.0
    blur: float = 1.0
    drift: float = 1.0
    gamma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("contrast", "noise", "blur", "drift"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Shift.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("magnification", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Shift.{name} must be > 0, got {getattr(self, name)}")


TEST_SHIFT = Shift(contrast=0.6, noise=2.0, blur=1.5, magnification=1.3)
"""Default imaging shift of the ``different_test`` split: flatter, noisier, blurrier, zoomed."""

# Imaging model at Shift() (intensities in [0, 1]; calibrated on NASA Super1/EBC1 images).
_PSF_SIGMA_PX = 1.0
_READ_NOISE = 0.012          # signal-independent Gaussian noise
_SHOT_NOISE_VAR = 3.6e-4     # variance per unit intensity (Poisson-like)
_LINE_NOISE = 0.004          # per scan-line offset
_DRIFT = 0.04                # amplitude of gradient + vignetting


# --- shared helpers -----------------------------------------------------------------------------


def _shape(size: Size) -> tuple[int, int]:
    """(H, W) from an int or a pair; both at least 16 pixels."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) < 16 or int(w) < 16:
        raise ValueError(f"size must be at least 16x16 pixels, got {size}")
    return int(h), int(w)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length ~``scale`` pixels.

    Made on a coarse grid and upsampled, so the cost does not grow with ``scale``.
    """
    factor = max(1.0, scale / 2.0)
    coarse_shape = tuple(math.ceil(n / factor) + 2 for n in shape)
    coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap")
    field = ndi.zoom(coarse, factor, order=1, grid_mode=False)[: shape[0], : shape[1]]
    if field.shape != shape:  # zoom rounding; pad by reflection (rare, at most a pixel)
        field = np.pad(field, [(0, s - f) for s, f in zip(shape, field.shape)], mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def _render(clean: np.ndarray, rng: np.random.Generator, shift: Shift) -> np.ndarray:
    """SEM imaging of a clean intensity map: PSF blur, drift/vignetting, Poisson-like + scan-line
    noise, then the detector's contrast/brightness and gamma; returns uint8."""
    h, w = clean.shape
    image = 1.0 - clean if shift.invert else clean.copy()
    sigma = _PSF_SIGMA_PX * shift.blur * shift.magnification**0.5
    if sigma > 0:
        image = ndi.gaussian_filter(image, sigma, mode="reflect")
    if shift.drift > 0:
        y, x = np.mgrid[-1 : 1 : complex(0, h), -1 : 1 : complex(0, w)]
        angle = rng.uniform(0, 2 * np.pi)
        gradient = np.cos(angle) * x + np.sin(angle) * y
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        vignette = -((x - cx) ** 2 + (y - cy) ** 2) / 2
        charging = _smooth_noise(rng, (h, w), max(h, w) / 3)
        field = rng.uniform(0.5, 1.0) * gradient + 0.8 * vignette + 0.3 * charging
        image += _DRIFT * shift.drift * field
    if shift.noise > 0:
        variance = _READ_NOISE**2 + _SHOT_NOISE_VAR * np.clip(image, 0, 1)
        image += shift.noise * np.sqrt(variance) * rng.standard_normal((h, w))
        image += shift.noise * _LINE_NOISE * rng.standard_normal((h, 1))
    mean = image.mean()
    image = mean + shift.contrast * (image - mean) + shift.brightness
    image = np.clip(image, 0.0, 1.0) ** shift.gamma
    return np.rint(image * 255).astype(np.uint8)

