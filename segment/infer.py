"""Sliding-window inference shared by ``segment.evaluate`` and ``segment.predict``.

Convention (nnU-Net's, DESIGN.md 4): tiles of the training crop size, step ``tile * (1 - overlap)``
spread evenly so the last tile of each row and column sits flush with the border; only an image
smaller than a tile is padded (reflect) and cropped back. Tile *logits* are weighted by a Gaussian
importance map (sigma = tile / 8, minimum clipped to its smallest non-zero value), summed, and
divided once by the summed weights. Test-time augmentation averages the logits of the dihedral
transforms after undoing each one.

The pieces are small on purpose, so that a band-wise streaming predictor for huge images can reuse
them: :func:`compute_steps` / :func:`tile_origins` (pure geometry, row-major), :func:`gaussian_importance`
(cached weights), :meth:`Predictor.predict_tiles` (one batch of tiles -> logits) and
:func:`accumulate_tiles` (add one weighted batch into accumulators at given origins).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.intensity import canonical_intensity, scale_intensity
from segment.zoom import check_zoom, resize_image, resize_logits, zoomed_hw

__all__ = [
    "compute_steps",
    "tile_origins",
    "gaussian_importance",
    "accumulate_tiles",
    "dihedral_transforms",
    "pad_to",
    "Predictor",
]

logger = logging.getLogger(__name__)

Origin = tuple[int, int]


# ----------------------------------------------------------------------------- tile geometry
def compute_steps(image_size: int, tile: int, step_fraction: float) -> list[int]:
    """Tile start offsets along one axis (nnU-Net convention).

    ``step_fraction`` is the step as a fraction of the tile (``1 - overlap``; 0.5 by default in
    :class:`Predictor`). The number of tiles is the fewest whose step does not exceed
    ``tile * step_fraction``; the steps are spread evenly so the first tile starts at 0 and the
    last ends exactly at ``image_size``. An image no larger than a tile gets one tile at 0 (the
    caller pads it).
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0.0 < step_fraction <= 1.0:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if image_size <= tile:
        return [0]
    span = image_size - tile
    target_step = tile * step_fraction
    n = math.ceil(span / target_step - 1e-9) + 1
    actual = span / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def tile_origins(
    image_hw: tuple[int, int], tile_hw: tuple[int, int], step_fraction: float
) -> list[Origin]:
    """All ``(y, x)`` tile origins, row-major (every tile of a row band before the next band)."""
    ys = compute_steps(image_hw[0], tile_hw[0], step_fraction)
    xs = compute_steps(image_hw[1], tile_hw[1], step_fraction)
    return [(y, x) for y in ys for x in xs]


@lru_cache(maxsize=16)
def _gaussian_cached(tile_hw: tuple[int, int], sigma_scale: float) -> np.ndarray:
    axes = []
    for n in tile_hw:
        sigma = max(n * sigma_scale, 1e-6)
        r = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        axes.append(np.exp(-0.5 * (r / sigma) ** 2))
    g = np.outer(axes[0], axes[1])
    g /= g.max()
    g = g.astype(np.float32)
    nonzero = g[g > 0]
    g[g <= 0] = nonzero.min() if nonzero.size else 1.0
    g.setflags(write=False)
    return g


def gaussian_importance(tile_hw: tuple[int, int] | int, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian importance map for one tile: float32, peak 1 at the centre, no zeros.

    ``sigma = size * sigma_scale`` per axis; the map is symmetric under flips (and rot90 for square
    tiles), so test-time augmentation does not change a tile's weight. Values that underflow to 0
    are set to the smallest non-zero value so borders never get weight 0. Cached and read-only.
    """
    hw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else (int(tile_hw[0]), int(tile_hw[1]))
    if min(hw) < 1:
        raise ValueError(f"tile size must be positive, got {hw}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    return _gaussian_cached(hw, float(sigma_scale))


def accumulate_tiles(
    logits_acc: Tensor,
    weight_acc: Tensor,
    tile_logits: Tensor,
    origins: Sequence[Origin],
    weight: Tensor,
    offset: Origin = (0, 0),
) -> None:
    """Add weighted tile logits into accumulators, in place.

    ``logits_acc`` is ``K x H x W`` and ``weight_acc`` ``1 x H x W``; ``tile_logits`` is
    ``B x K x th x tw`` placed at ``origins`` (image coordinates) minus ``offset`` (the
    accumulators' own origin: (0, 0) for a whole image, the band's first row for a stream).
    ``weight`` is ``th x tw``.
    """
    th, tw = tile_logits.shape[-2:]
    w = weight.to(device=logits_acc.device, dtype=logits_acc.dtype)
    tile_logits = tile_logits.to(device=logits_acc.device, dtype=logits_acc.dtype)
    for (y, x), t in zip(origins, tile_logits, strict=True):
        y0, x0 = y - offset[0], x - offset[1]
        logits_acc[:, y0 : y0 + th, x0 : x0 + tw].addcmul_(t, w)
        weight_acc[:, y0 : y0 + th, x0 : x0 + tw].add_(w)


# ----------------------------------------------------------------------------- test-time augmentation
Transform = tuple[int, bool]  # (number of rot90 turns in the H-W plane, flip W first)


def dihedral_transforms(square: bool = True) -> list[Transform]:
    """The TTA set: all 8 dihedral transforms for square tiles, else the 4 flips (no rot90).

    Each transform is ``(k, flip)``: flip along W (if ``flip``), then rotate by ``k * 90`` degrees.
    ``(2, True)`` is the vertical flip, ``(2, False)`` both flips.
    """
    ks = range(4) if square else (0, 2)
    return [(k, f) for k in ks for f in (False, True)]


def _apply(x: Tensor, t: Transform) -> Tensor:
    k, flip = t
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _undo(x: Tensor, t: Transform) -> Tensor:
    k, flip = t
    if k:
        x = torch.rot90(x, -k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


# ----------------------------------------------------------------------------- padding
def pad_to(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """Pad ``C x H x W`` at the bottom/right to at least ``hw`` by reflection, repeated as needed.

    An axis of one pixel cannot reflect and is replicated instead.
    """
    while True:
        h, w = x.shape[-2:]
        ph, pw = max(hw[0] - h, 0), max(hw[1] - w, 0)
        if not (ph or pw):
            return x
        if (ph and h == 1) or (pw and w == 1):
            return F.pad(x[None], (0, pw, 0, ph), mode="replicate")[0]
        x = F.pad(x[None], (0, min(pw, w - 1), 0, min(ph, h - 1)), mode="reflect")[0]


def _argmax_uint8(logits: Tensor) -> np.ndarray:
    if logits.shape[0] > 256:
        raise ValueError(f"{logits.shape[0]} classes do not fit uint8 labels")
    return logits.argmax(0).to(torch.uint8).numpy()


# ----------------------------------------------------------------------------- predictor
class Predictor:
    """Sliding-window segmentation of whole micrographs with any model that maps
    ``B x C x h x w`` to ``B x K x h x w`` logits.

    Args:
        model: the network; put in eval mode and moved to ``device``.
        tile_size: tile edge (the training crop size), or ``(h, w)``.
        overlap: fraction of a tile shared with its neighbour (step = tile * (1 - overlap)).
        gaussian: weight tile logits by :func:`gaussian_importance` (else uniformly).
        tta: average the 8 dihedral transforms (4 flips for non-square tiles).
        batch_size: tiles per forward pass.
        device: where the model runs.
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``) or None for full precision.
        mean, std: per-channel normalisation used by :meth:`predict_image`; ``len(mean)`` is the
            model's input channel count.
        intensity: how :meth:`scale` maps raw pixels to [0, 1] before ``mean``/``std``
            (:func:`pretrain.intensity.scale_intensity`): ``"percentile"`` (per-image robust stretch) or
            ``"dtype"`` (divide by the dtype's maximum; the default, for checkpoints whose
            model.json predates the ``intensity`` key). Must be what the model was trained with.
        zoom: resize factor between the image and the model's pixels (``data.zoom`` of training;
            :mod:`segment.zoom`): the image is resized by ``zoom``, tiled, and the logits resized
            back, so results are always on the image's own grid.
        progress: show a tqdm bar over tile batches.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tile_size: int | tuple[int, int],
        overlap: float = 0.5,
        gaussian: bool = True,
        tta: bool = False,
        batch_size: int = 4,
        device: str | torch.device = "cpu",
        amp_dtype: torch.dtype | None = None,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.25,),
        intensity: str = "dtype",
        zoom: float = 1.0,
        progress: bool = False,
    ) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        th, tw = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
        if th < 1 or tw < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_hw = (int(th), int(tw))
        self.overlap = float(overlap)
        self.gaussian = gaussian
        self.tta = tta
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.intensity = canonical_intensity(intensity)
        self.zoom = check_zoom(zoom)
        self.progress = progress
        self.model = model.to(self.device).eval()
        self.meta: dict[str, Any] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, **settings: Any) -> Predictor:
        """Build from a fine-tuned checkpoint folder (``segment.checkpoint.load_model``).

        ``tile_size``, ``mean`` and ``std`` come from the checkpoint's metadata unless given in
        ``settings``, ``intensity`` and ``zoom`` too (``"dtype"`` and 1 when the metadata has none:
        checkpoints from before those keys were trained that way); the metadata is kept on
        ``predictor.meta``.
        """
        from segment.checkpoint import load_model

        model, meta = load_model(path)
        settings.setdefault("intensity", meta.get("intensity", "dtype"))
        settings.setdefault("zoom", meta.get("zoom", 1.0))
        for key in ("tile_size", "mean", "std"):
            if key not in settings:
                if key not in meta:
                    raise KeyError(f"checkpoint {path} has no '{key}' in its metadata; pass {key}=")
                settings[key] = meta[key]
        predictor = cls(model, **settings)
        predictor.meta = dict(meta)
        return predictor

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    @property
    def step_fraction(self) -> float:
        return 1.0 - self.overlap

    def importance(self) -> Tensor:
        """The per-tile weight map (``th x tw`` float32) on the model's device."""
        if self.gaussian:
            return torch.from_numpy(np.array(gaussian_importance(self.tile_hw))).to(self.device)
        return torch.ones(self.tile_hw, dtype=torch.float32, device=self.device)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _forward(self, x: Tensor) -> Tensor:
        with self._autocast():
            out = self.model(x)
        if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] \
                or out.shape[-2:] != x.shape[-2:]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model must return B x K x H x W logits for input {tuple(x.shape)}, got {got}")
        return out.float()

    @torch.inference_mode()
    def predict_tiles(self, tiles: Tensor) -> Tensor:
        """Logits (``B x K x th x tw`` float32, on ``device``) of a batch of tiles, TTA included."""
        self.model.eval()
        tiles = tiles.to(self.device, dtype=torch.float32)
        if not self.tta:
            return self._forward(tiles)
        transforms = dihedral_transforms(square=tiles.shape[-2] == tiles.shape[-1])
        total = torch.zeros((), device=self.device)
        for t in transforms:  # out of place: a model may return (a view of) its input
            total = total + _undo(self._forward(_apply(tiles, t)), t)
        return total / len(transforms)

    def _batches(self, image: Tensor, origins: Sequence[Origin]) -> Iterator[tuple[list[Origin], Tensor]]:
        th, tw = self.tile_hw
        for i in range(0, len(origins), self.batch_size):
            chunk = list(origins[i : i + self.batch_size])
            yield chunk, torch.stack([image[:, y : y + th, x : x + tw] for y, x in chunk])

    @torch.inference_mode()
    def predict_logits(self, image: Tensor) -> Tensor:
        """Sliding-window logits of one normalised ``C x H x W`` image: float32 ``K x H x W`` on CPU.

        With ``zoom != 1`` the image is resized by ``zoom`` first and the logits resized back to
        ``H x W`` (:mod:`segment.zoom`).
        """
        if image.dim() != 3:
            raise ValueError(f"expected a C x H x W tensor, got shape {tuple(image.shape)}")
        if self.zoom == 1.0:
            return self._predict_logits(image)
        hw = tuple(image.shape[-2:])
        small = resize_image(image.to(dtype=torch.float32), zoomed_hw(hw, self.zoom))
        return resize_logits(self._predict_logits(small), hw)

    def _predict_logits(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        x = pad_to(image.to(self.device, dtype=torch.float32), self.tile_hw)
        origins = tile_origins(tuple(x.shape[-2:]), self.tile_hw, self.step_fraction)
        try:
            logits, weights = self._accumulate(x, origins, acc_device=self.device)
        except torch.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            logger.warning("out of device memory for the accumulators; retrying with them on the CPU")
            torch.cuda.empty_cache()
            logits, weights = self._accumulate(x, origins, acc_device=torch.device("cpu"))
        logits = logits.div_(weights)[:, :h, :w]
        if not torch.isfinite(logits).all():
            raise RuntimeError("non-finite logits (NaN/inf) from the model")
        return logits.cpu()

    def _accumulate(
        self, x: Tensor, origins: Sequence[Origin], acc_device: torch.device
    ) -> tuple[Tensor, Tensor]:
        weight = self.importance()
        logits_acc: Tensor | None = None
        weight_acc = torch.zeros((1, *x.shape[-2:]), dtype=torch.float32, device=acc_device)
        batches: Iterable[tuple[list[Origin], Tensor]] = self._batches(x, origins)
        if self.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=math.ceil(len(origins) / self.batch_size), desc="tiles",
                           leave=False)
        for chunk, tiles in batches:
            out = self.predict_tiles(tiles)
            if logits_acc is None:
                logits_acc = torch.zeros((out.shape[1], *x.shape[-2:]), dtype=torch.float32,
                                         device=acc_device)
            accumulate_tiles(logits_acc, weight_acc, out, chunk, weight)
        assert logits_acc is not None
        return logits_acc, weight_acc

    def predict_labels(self, image: Tensor) -> np.ndarray:
        """Argmax class indices (uint8 ``H x W``) of a normalised ``C x H x W`` image."""
        return _argmax_uint8(self.predict_logits(image))

    def scale(self, image: np.ndarray, value_range: tuple[float, float] | None = None,
              path: str | Path | None = None) -> np.ndarray:
        """Raw pixels (native dtype) -> float32 in [0, 1] with this predictor's ``intensity``
        (:func:`pretrain.intensity.scale_intensity`; ``value_range`` fixes the percentile range, e.g. one
        computed for a whole streamed image). NaN/Inf pixels raise an ``ImageContentError``
        naming ``path``."""
        return scale_intensity(image, self.intensity, value_range=value_range, path=path)

    def normalize(self, image: np.ndarray) -> Tensor:
        """``H x W`` or ``H x W x C`` float image in [0, 1] -> normalised ``C x H x W`` tensor.

        Gray input is repeated for a 3-channel model; colour input is averaged for a 1-channel one.
        """
        a = np.asarray(image, dtype=np.float32)
        if a.ndim == 2:
            a = a[None]
        elif a.ndim == 3:
            a = np.moveaxis(a, -1, 0)
        else:
            raise ValueError(f"expected an H x W or H x W x C image, got shape {a.shape}")
        c = self.in_chans
        if a.shape[0] != c:
            if a.shape[0] == 1:
                a = np.repeat(a, c, axis=0)
            elif c == 1:
                a = a.mean(axis=0, keepdims=True)
            else:
                raise ValueError(f"image has {a.shape[0]} channels, model expects {c}")
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return torch.from_numpy(np.ascontiguousarray((a - mean) / std))

    def predict_image(
        self, image: np.ndarray, return_probs: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment a raw image (``H x W`` or ``H x W x C``, native dtype, or float in [0, 1]).

        The image is scaled with :meth:`scale` (the training ``intensity``), then normalised with
        :meth:`normalize`. Returns uint8 ``H x W`` labels and, if ``return_probs``, float32
        ``K x H x W`` softmax probabilities (else None).
        """
        logits = self.predict_logits(self.normalize(self.scale(image)))
        labels = _argmax_uint8(logits)
        probs = torch.softmax(logits, dim=0).numpy() if return_probs else None
        return labels, probs

