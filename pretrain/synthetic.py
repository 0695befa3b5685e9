"""Synthetic SEM-like micrographs with exact labels: the project's embedded default data.

Two materials mirror the NASA benchmark: a Ni superalloy (gamma matrix, secondary and tertiary
gamma' precipitates) and an environmental barrier coating cross-section (background/substrate,
oxide layer, cracks). Labels are the rasterised geometry *before* the imaging model (blur, drift,
noise), so they are exact. :class:`Shift` changes the imaging and the scale, so out-of-distribution
behaviour can be shown without real data.

Contrast convention: as in NASA's etched secondary-electron Super images (e.g. Super1
``spot3_0d_3``: precipitates 125, matrix 139 on 8 bits), gamma' precipitates are *darker* than the
gamma matrix channels, whose edges glow brighter (SE edge effect); ``Shift(invert=True)`` makes
them brighter, as in back-scatter or differently etched images. In the coating, the top coat is
bright and porous, the thermally grown oxide band dark, the substrate mid-gray, cracks darkest.

Run ``python -m pretrain.synthetic --kind superalloy --out DIR`` to write a NASA-layout set.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse, line_aa

from pretrain.io import write_tiff

__all__ = [
    "Shift",
    "TEST_SHIFT",
    "superalloy",
    "coating",
    "GENERATORS",
    "CLASS_NAMES",
    "CLASS_COLOURS",
    "PIXEL_SIZE_NM",
    "overlay_mask",
    "write_nasa_set",
    "write_unlabeled",
    "main",
]

logger = logging.getLogger(__name__)

Size = int | tuple[int, int]
Generator = Callable[..., tuple[np.ndarray, np.ndarray]]


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


def _scratches(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """Faint straight polishing scratches (signed intensity offsets)."""
    h, w = shape
    out = np.zeros(shape)
    for _ in range(count):
        r0, r1 = rng.integers(0, h, 2)
        rr, cc, val = line_aa(int(r0), 0, int(r1), w - 1)
        out[rr, cc] += rng.choice([-1.0, 1.0]) * rng.uniform(0.01, 0.025) * val
    return out


# --- superalloy -------------------------------------------------------------------------------


def superalloy(size: Size = (256, 256), seed: int = 0,
               shift: Shift = Shift()) -> tuple[np.ndarray, np.ndarray]:
    """Ni-superalloy SEM image and its label (0 matrix, 1 secondary, 2 tertiary gamma').

    Secondary gamma': rounded cuboids (superellipses) on a slightly rotated grid with jitter,
    size/aspect variation and wavy boundaries, 42-53 % area fraction. Tertiary gamma': small round
    dots in the wider matrix channels, ~1.5-3.5 %. Returns (uint8 HxW image, uint8 HxW label).
    """
    h, w = _shape(size)
    rng = np.random.default_rng(seed)
    mag = shift.magnification
    period = rng.uniform(70, 90) * mag
    secondary, precipitate_id = _secondary(rng, (h, w), period, target=rng.uniform(0.42, 0.53))
    label = secondary.astype(np.uint8)
    # Distance from the secondary precipitates into the matrix: places tertiaries, shades the rims.
    gap = ndi.distance_transform_edt(~secondary)
    _tertiary(rng, label, gap, radius=(2.2 * mag, 4.2 * mag), target=rng.uniform(0.015, 0.035))

    clean = np.full((h, w), 0.56)
    clean += 0.02 * _smooth_noise(rng, (h, w), 40 * mag)  # etching mottling
    clean += 0.01 * _smooth_noise(rng, (h, w), 2 * mag)   # fine texture
    per_precipitate = rng.normal(0.0, 0.012, precipitate_id.max() + 1)
    inside = label == 1
    clean[inside] += -0.065 + per_precipitate[precipitate_id[inside]]
    clean[label == 2] -= 0.11
    clean[label == 0] += 0.07 * np.exp(-gap[label == 0] / (1.6 * mag))  # bright channel edges
    clean += _scratches(rng, (h, w), int(rng.integers(0, 3)))
    return _render(clean, rng, shift), label


def _secondary(rng: np.random.Generator, shape: tuple[int, int], period: float,
               target: float) -> tuple[np.ndarray, np.ndarray]:
    """Rasterised secondary gamma' (bool mask at exactly ``target`` area fraction) and the id of
    the nearest precipitate per pixel.

    Each precipitate contributes a superellipse "radius" field f (1 on its nominal outline); the
    union is min f plus a smooth perturbation, thresholded at the quantile giving ``target``.
    """
    h, w = shape
    theta = rng.uniform(-np.pi / 12, np.pi / 12)  # grain orientation of the <100> cube axes
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    reach = math.hypot(h, w) / 2 + period
    idx = np.arange(-math.ceil(reach / period), math.ceil(reach / period) + 1)
    jj, ii = np.meshgrid(idx, idx)
    lattice = np.stack([jj.ravel(), ii.ravel()], 1) + rng.normal(0, 0.08, (jj.size, 2))
    centres = lattice * period @ rot.T + np.array([w / 2, h / 2])  # (x, y)
    scale = np.clip(rng.lognormal(0, 0.14, len(centres)), 0.7, 1.35)
    aspect = np.clip(rng.lognormal(0, 0.12, len(centres)), 0.75, 1.33)
    half_a = 0.36 * period * scale * np.sqrt(aspect)
    half_b = 0.36 * period * scale / np.sqrt(aspect)
    angles = theta + rng.normal(0, np.deg2rad(4), len(centres))
    exponents = rng.uniform(2.6, 5.0, len(centres))

    field = np.full(shape, np.inf)
    ids = np.zeros(shape, np.int32)
    for k, (cx, cy) in enumerate(centres):
        r = 1.6 * max(half_a[k], half_b[k])
        x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 1)
        y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        dx, dy = xx - cx, yy - cy
        c, s = np.cos(angles[k]), np.sin(angles[k])
        u, v = np.abs(c * dx + s * dy) / half_a[k], np.abs(-s * dx + c * dy) / half_b[k]
        n = exponents[k]
        f = (u**n + v**n) ** (1.0 / n)
        window = field[y0:y1, x0:x1]
        closer = f < window
        window[closer] = f[closer]
        ids[y0:y1, x0:x1][closer] = k
    field = field + 0.09 * _smooth_noise(rng, shape, period / 6)
    threshold = min(np.quantile(field, target), 1.4)  # bounding boxes cover f < 1.6
    return field < threshold, ids


def _tertiary(rng: np.random.Generator, label: np.ndarray, gap: np.ndarray,
              radius: tuple[float, float], target: float) -> None:
    """Draw round tertiary dots (class 2) in matrix channels, in place, up to ``target`` area
    fraction; dots keep a clearance from the secondaries and from each other."""
    h, w = label.shape
    budget = target * h * w
    radii_max = radius[1]
    room = gap.ravel() - (radii_max + 2)
    candidates = np.flatnonzero(room > 0)
    if candidates.size == 0:
        return
    # Prefer the wider channels, where tertiaries cluster in real micrographs.
    weights = room[candidates] / room[candidates].sum()
    n_try = min(candidates.size, 4 * int(budget / (np.pi * radius[0] ** 2) + 1))
    order = rng.choice(candidates, size=n_try, replace=False, p=weights)
    placed: list[tuple[float, float, float]] = []
    drawn = 0.0
    for flat in order:
        if drawn >= budget:
            break
        y, x = divmod(int(flat), w)
        r = rng.uniform(*radius)
        r = min(r, gap[y, x] - 1.5)
        if r < radius[0] * 0.8:
            continue
        if placed:
            p = np.asarray(placed)
            if np.any(np.hypot(p[:, 0] - y, p[:, 1] - x) < p[:, 2] + r + 1.5):
                continue
        rr, cc = disk((y, x), r, shape=(h, w))
        label[rr, cc] = 2
        placed.append((y, x, r))
        drawn += rr.size


# --- coating ------------------------------------------------------------------------------------


def coating(size: Size = (256, 256), seed: int = 0,
            shift: Shift = Shift()) -> tuple[np.ndarray, np.ndarray]:
    """Barrier-coating cross-section and its label (0 background/substrate, 1 oxide, 2 crack).

    From the top: bright porous top coat, a wavy dark oxide band of varying thickness with a rough
    upper interface, mid-gray substrate. Cracks: thin jagged, mostly vertical lines through the
    oxide (0.1-1 % of pixels). Returns (uint8 HxW image, uint8 HxW label).
    """
    h, w = _shape(size)
    rng = np.random.default_rng(seed)
    mag = shift.magnification
    centre = rng.uniform(0.55, 0.72) * h
    wave = _profile(rng, w, rng.uniform(80, 160) * mag) * rng.uniform(0.01, 0.03) * h
    rough = _profile(rng, w, 3 * mag) * 1.2 * mag + _profile(rng, w, 12 * mag) * 2.0 * mag
    # The layer is framed like an operator would (thickness a share of the height, as in NASA's
    # EBC images); pores, roughness and crack widths keep their pixel scale.
    variation = np.clip(1 + 0.25 * _profile(rng, w, 50 * mag), 0.5, 1.6)
    thickness = rng.uniform(0.11, 0.16) * h * mag * variation
    top = centre - thickness / 2 + wave + rough
    bottom = centre + thickness / 2 + wave + 0.4 * _profile(rng, w, 30 * mag) * mag
    top = np.clip(top, 0.15 * h, 0.9 * h - 3)
    bottom = np.clip(np.maximum(bottom, top + 3), None, 0.97 * h)
    rows = np.arange(h)[:, None]
    oxide = (rows >= top[None, :]) & (rows < bottom[None, :])
    topcoat = rows < top[None, :]
    label = oxide.astype(np.uint8)
    cracks = _cracks(rng, oxide, top, bottom, mag, target=rng.uniform(0.002, 0.006))
    label[cracks] = 2

    clean = np.where(topcoat, 0.80, np.where(oxide, 0.30, 0.42))
    clean += 0.02 * _smooth_noise(rng, (h, w), 25 * mag) + 0.01 * _smooth_noise(rng, (h, w), 2 * mag)
    clean += 0.04 * topcoat * np.clip(_smooth_noise(rng, (h, w), 4 * mag) - 1.5, 0, None)  # grains
    n_pores = int(h * w / (900 * mag**2))
    clean[_pores(rng, (h, w), mag, n_pores) & topcoat] = 0.10
    clean[_pores(rng, (h, w), mag, n_pores // 6, elongated=0.2) & ~topcoat] = 0.16  # sparser below
    clean[cracks] = 0.10
    return _render(clean, rng, shift), label


def _profile(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """Smooth 1-D zero-mean, unit-std random profile with correlation length ~``scale``."""
    return _smooth_noise(rng, (3, n), scale)[1]


def _pores(rng: np.random.Generator, shape: tuple[int, int], mag: float, n: int,
           elongated: float = 0.4) -> np.ndarray:
    """Mask of ``n`` dark pores: flat, horizontally elongated voids (share ``elongated``) and
    small round ones."""
    h, w = shape
    mask = np.zeros(shape, bool)
    for _ in range(n):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        if rng.random() < elongated:
            rr, cc = ellipse(y, x, rng.uniform(1.0, 3.0) * mag, rng.uniform(4, 22) * mag,
                             shape=shape, rotation=rng.normal(0, 0.15))
        else:
            rr, cc = disk((y, x), rng.uniform(0.8, 2.5) * mag, shape=shape)
        mask[rr, cc] = True
    return mask


def _cracks(rng: np.random.Generator, oxide: np.ndarray, top: np.ndarray, bottom: np.ndarray,
            mag: float, target: float) -> np.ndarray:
    """Thin jagged, mostly vertical cracks running down from the oxide's top interface (some stop
    part-way, some branch), added until they cover ``target`` of the image; clipped to the oxide."""
    h, w = oxide.shape
    mask = np.zeros(oxide.shape, bool)
    budget = max(1, int(target * h * w))
    for _ in range(max(1, int(w / (8 * mag)))):  # bound on attempts
        if np.count_nonzero(mask & oxide) >= budget:
            break
        x0 = rng.uniform(0, w)
        col = int(min(w - 1, x0))
        y0, y1 = top[col] - 2, bottom[col] + 1
        y1 = y0 + (y1 - y0) * (1.0 if rng.random() < 0.6 else rng.uniform(0.5, 0.9))
        rows, xs = _crack_path(rng, mask, x0, y0, y1, drift=rng.normal(0, 0.25), mag=mag)
        if rows.size > 4 and rng.random() < 0.3:  # a branch leaving sideways from the middle
            mid = rows.size // 2
            _crack_path(rng, mask, xs[mid], rows[mid], y1,
                        drift=rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), mag=mag)
    return mask & oxide


def _crack_path(rng: np.random.Generator, mask: np.ndarray, x0: float, y0: float, y1: float,
                drift: float, mag: float) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise one crack from row y0 down to y1 (a random walk in x, 1-3 pixels wide) into
    ``mask``; returns its rows and x positions."""
    h, w = mask.shape
    rows = np.arange(max(0, int(y0)), min(h, int(math.ceil(y1))))
    if rows.size == 0:
        return rows, rows.astype(float)
    kinks = (rng.random(rows.size) < 0.06) * rng.normal(0, 3, rows.size)
    steps = drift + rng.normal(0, 0.7, rows.size) + kinks
    xs = x0 + np.cumsum(steps)
    width = max(1, int(round(rng.uniform(1.0, 2.2) * mag)))
    offsets = np.arange(width) - width // 2
    cols = np.rint(xs)[:, None].astype(int) + offsets[None, :]
    rr = np.broadcast_to(rows[:, None], cols.shape)
    keep = (cols >= 0) & (cols < w)
    mask[rr[keep], cols[keep]] = True
    # Jagged steps: join consecutive rows whose x jumps so the crack stays connected.
    for r, xa, xb in zip(rows[1:], xs[:-1], xs[1:]):
        lo, hi = sorted((int(round(xa)), int(round(xb))))
        lo, hi = max(0, lo), min(w - 1, hi)
        if hi - lo > 1:
            mask[r, lo : hi + 1] = True
    return rows, xs


# --- registry and writers ---------------------------------------------------------------------

GENERATORS: dict[str, Generator] = {"superalloy": superalloy, "coating": coating}
CLASS_NAMES: dict[str, list[str]] = {
    "superalloy": ["matrix", "secondary", "tertiary"],
    "coating": ["background", "oxide", "crack"],
}
CLASS_COLOURS: dict[str, list[tuple[int, int, int]]] = {
    # Super overlay colours as in NASA's masks (RGB): blue = secondary, red = tertiary.
    "superalloy": [(128, 128, 128), (0, 0, 255), (255, 0, 0)],
    "coating": [(0, 0, 0), (0, 200, 0), (255, 0, 0)],
}
PIXEL_SIZE_NM: dict[str, float] = {"superalloy": 5.0, "coating": 50.0}
"""Nominal pixel size at ``magnification=1`` written into the TIFF resolution tags."""

_SPLITS = ("train", "val", "test", "different_test")


def overlay_mask(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """NASA Super mask: RGBA overlay of the gray ``image`` with pure blue (0, 0, 255) for class 1
    and pure red (255, 0, 0) for class 2; gray pixels (equal channels) never equal either."""
    if image.shape != label.shape or image.dtype != np.uint8:
        raise ValueError(f"need uint8 image and label of one shape, got {image.dtype} "
                         f"{image.shape} and {label.shape}")
    rgba = np.repeat(image[..., None], 4, axis=-1)
    rgba[..., 3] = 255
    rgba[label == 1, :3] = (0, 0, 255)
    rgba[label == 2, :3] = (255, 0, 0)
    return rgba


def _image_seed(seed: int, split: int, index: int) -> int:
    """Independent, reproducible per-image seed."""
    return int(np.random.SeedSequence([seed, split, index]).generate_state(1)[0])


def write_nasa_set(root: str | Path, kind: str, *, n_train: int = 8, n_val: int = 2, n_test: int = 4,
                   n_shifted: int = 4, size: Size = (256, 256), seed: int = 0, shift: Shift = Shift(),
                   test_shift: Shift = TEST_SHIFT) -> Path:
    """Write a labeled set in the NASA layout and return ``root``.

    Folders: ``train/ val/ test/ different_test/`` each with an ``*_annot/`` twin; train/val/test
    use ``shift``, different_test uses ``test_shift``. Superalloy: ``X.tif`` + ``X_mask.tif``
    (RGBA colour overlay, as NASA's Super sets). Coating: image and index mask (0/1/2) share the
    file name, as NASA's EBC sets. Images are 8-bit TIFFs with the pixel size in their tags.
    """
    generator = _generator(kind)
    root = Path(root)
    counts = dict(zip(_SPLITS, (n_train, n_val, n_test, n_shifted)))
    for split_index, split in enumerate(_SPLITS):
        split_shift = test_shift if split == "different_test" else shift
        pixel_size = PIXEL_SIZE_NM[kind] / split_shift.magnification
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}_annot").mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            image, label = generator(size, _image_seed(seed, split_index, i), split_shift)
            name = f"{kind}_{split}_{i:03d}"
            write_tiff(root / split / f"{name}.tif", image, pixel_size_nm=pixel_size)
            if kind == "superalloy":
                write_tiff(root / f"{split}_annot" / f"{name}_mask.tif", overlay_mask(image, label))
            else:
                write_tiff(root / f"{split}_annot" / f"{name}.tif", label)
    logger.info("wrote %s set to %s (%s)", kind, root, counts)
    return root


def write_unlabeled(root: str | Path, n: int, size: Size = (256, 256), seed: int = 0,
                    kinds: Sequence[str] = ("superalloy", "coating"), *, vary: bool = True) -> Path:
    """Write ``n`` unlabeled images per kind to ``root/<kind>/`` (folder = material class) for
    pretraining corpora and k-NN probes. With ``vary`` each image gets a random mild imaging shift
    (contrast, brightness, noise, blur, drift, gamma, magnification) so the corpus is diverse."""
    root = Path(root)
    for kind in kinds:
        generator = _generator(kind)
        for i in range(n):
            image_seed = _image_seed(seed, 100 + list(GENERATORS).index(kind), i)
            shift = _random_shift(np.random.default_rng(image_seed + 1)) if vary else Shift()
            image, _ = generator(size, image_seed, shift)
            write_tiff(root / kind / f"{kind}_{i:05d}.tif", image,
                       pixel_size_nm=PIXEL_SIZE_NM[kind] / shift.magnification)
    logger.info("wrote %d unlabeled images per kind %s to %s", n, list(kinds), root)
    return root


def _random_shift(rng: np.random.Generator) -> Shift:
    """A mild random imaging shift for corpus diversity."""
    return Shift(contrast=rng.uniform(0.7, 1.3), brightness=rng.uniform(-0.08, 0.08),
                 magnification=rng.uniform(0.8, 1.25), noise=rng.uniform(0.5, 1.8),
                 blur=rng.uniform(0.6, 1.5), drift=rng.uniform(0.0, 1.5), gamma=rng.uniform(0.8, 1.25))


def _generator(kind: str) -> Generator:
    if kind not in GENERATORS:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(GENERATORS)}")
    return GENERATORS[kind]


# --- command line -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m pretrain.synthetic``: write a NASA-layout labeled set or an unlabeled corpus."""
    parser = argparse.ArgumentParser(prog="python -m pretrain.synthetic",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=[*GENERATORS, "all"], default="superalloy",
                        help="material; 'all' only with --unlabeled")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n-train", type=int, default=8)
    parser.add_argument("--n-val", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=4)
    parser.add_argument("--n-shifted", type=int, default=4, help="images in different_test/")
    parser.add_argument("--size", type=int, nargs="+", default=[256], metavar="PX",
                        help="image size: one value (square) or H W")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlabeled", type=int, metavar="N",
                        help="write N unlabeled images per kind to OUT/<kind>/ instead of a labeled set")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one value or two (H W)")
    size = (args.size[0], args.size[-1])
    if args.unlabeled is not None:
        kinds = tuple(GENERATORS) if args.kind == "all" else (args.kind,)
        out = write_unlabeled(args.out, args.unlabeled, size, args.seed, kinds)
        print(f"wrote {args.unlabeled} unlabeled image(s) per kind {', '.join(kinds)} to {out}")
        return out
    if args.kind == "all":
        parser.error("--kind all needs --unlabeled")
    out = write_nasa_set(args.out, args.kind, n_train=args.n_train, n_val=args.n_val,
                         n_test=args.n_test, n_shifted=args.n_shifted, size=size, seed=args.seed)
    print(f"wrote {args.kind} set (NASA layout) to {out}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
