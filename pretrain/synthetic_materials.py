"""Synthetic SEM-like micrograph generators with exact labels: a Ni superalloy and a barrier coating.

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

The imaging model (blur, drift, noise, :class:`~pretrain.synthetic_imaging.Shift`) is in
:mod:`pretrain.synthetic_imaging`; writing data sets to disk is in :mod:`pretrain.synthetic`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse, line_aa

from pretrain.synthetic_imaging import Shift, Size, _render, _shape, _smooth_noise

__all__ = ["superalloy", "coating", "GENERATORS", "CLASS_NAMES", "CLASS_COLOURS", "PIXEL_SIZE_NM"]

Generator = Callable[..., tuple[np.ndarray, np.ndarray]]


# --- shared helpers -----------------------------------------------------------------------------


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


# --- registry -----------------------------------------------------------------------------------

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
