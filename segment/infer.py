"""The predictor: a model, its tile settings and its input mapping, for ``segment.evaluate``,
``segment.predict`` and fine-tuning's validation.

:class:`Predictor` holds what inference needs besides the pixels (tile, overlap, Gaussian weights,
test-time augmentation, intensity mapping, mean/std, zoom) and runs one batch of tiles
(:meth:`Predictor.predict_tiles`; TTA averages the logits of the dihedral transforms after undoing
each one). The tiles themselves are cut, weighted and blended by the one tile loop,
:mod:`segment.tiling`, for an image in memory (:meth:`Predictor.predict_logits`) as for one read band
by band (:mod:`segment.stream`).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pretrain.intensity import canonical_intensity, scale_intensity
from segment.checkpoint import inference_settings, load_model
from segment.tiling import TensorRows, class_labels, gaussian_importance, tile_logit_rows
from segment.zoom import check_zoom, resize_image, resize_logits, zoom_arg, zoomed_hw

__all__ = ["dihedral_transforms", "Predictor", "add_inference_args", "inference_kwargs"]

logger = logging.getLogger(__name__)


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


def _argmax_uint8(logits: Tensor) -> np.ndarray:
    return class_labels(logits).cpu().numpy()


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
        progress: report tiles done, tiles/s and ETA (:class:`segment.progress.TileProgress`).
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

        Tile, overlap, mean/std, intensity and zoom come from the checkpoint's metadata
        (:func:`segment.checkpoint.inference_settings`) unless given in ``settings``; the metadata is
        kept on ``predictor.meta``.
        """
        model, meta = load_model(path)
        given = {k: v for k, v in settings.items() if v is not None}  # None: the checkpoint's value
        settings = inference_settings(meta | given, path) | given
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

    @torch.inference_mode()
    def predict_logits(self, image: Tensor) -> Tensor:
        """Sliding-window logits of one normalised ``C x H x W`` image: float32 ``K x H x W`` on CPU.

        The tiles run through :func:`segment.tiling.tile_logit_rows`, the loop the band-wise
        predictor uses too. With ``zoom != 1`` the image is resized by ``zoom`` first and the logits
        resized back to ``H x W`` (:mod:`segment.zoom`).
        """
        if image.dim() != 3:
            raise ValueError(f"expected a C x H x W tensor, got shape {tuple(image.shape)}")
        if self.zoom == 1.0:
            return self._predict_logits(image)
        hw = tuple(image.shape[-2:])
        small = resize_image(image.to(dtype=torch.float32), zoomed_hw(hw, self.zoom))
        return resize_logits(self._predict_logits(small), hw)

    def _blocks(self, image: Tensor) -> Iterator[Tensor]:
        """Blocks of final logit rows (``K x h x W``, on the device) of an image on the model grid."""
        for _, block in tile_logit_rows(self, TensorRows(image.to(self.device, dtype=torch.float32))):
            yield block

    def _predict_logits(self, image: Tensor) -> Tensor:
        return torch.cat([block.cpu() for block in self._blocks(image)], dim=1)

    def predict_labels(self, image: Tensor) -> np.ndarray:
        """Argmax class indices (uint8 ``H x W``) of a normalised ``C x H x W`` image.

        At zoom 1 each block of final rows is reduced to labels on the device, so only one byte per
        pixel comes back to the host (not ``4 K`` bytes of logits)."""
        if image.dim() != 3 or self.zoom != 1.0:
            return _argmax_uint8(self.predict_logits(image))
        return torch.cat([class_labels(block).cpu() for block in self._blocks(image)]).numpy()

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


# ----------------------------------------------------------------------------- command line
def add_inference_args(group: argparse._ActionsContainer) -> None:
    """The inference options of ``segment.evaluate`` and ``segment.predict``, defined once; a value not
    given (None) is the checkpoint's (:func:`segment.checkpoint.inference_settings`)."""
    group.add_argument("--tile-size", type=int, default=None, help="tile edge (default: the checkpoint's)")
    group.add_argument("--overlap", type=float, default=None,
                       help="tile overlap fraction (default: the checkpoint's, 0.5 for older ones)")
    group.add_argument("--zoom", type=zoom_arg, default=None,
                       help="resize factor between every image and the model's grid (default: the checkpoint's "
                            "data.zoom; predict: per image from the pixel sizes when known)")
    group.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    group.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype on the device")


def add_display_args(group: argparse._ActionsContainer) -> None:
    """The output switches ``segment.evaluate`` and ``segment.predict`` share, defined once."""
    group.add_argument("--no-overlays", action="store_true", help="write no overlay figures")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")


def inference_kwargs(args: argparse.Namespace, *, cpu_only: bool = False) -> dict[str, Any]:
    """:meth:`Predictor.from_checkpoint` settings from :func:`add_inference_args`' options."""
    device = args.device or ("cuda" if torch.cuda.is_available() and not cpu_only else "cpu")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp or "")
    return dict(tile_size=args.tile_size, overlap=args.overlap, zoom=args.zoom, tta=args.tta,
                batch_size=args.batch_size, device=device, amp_dtype=amp)
