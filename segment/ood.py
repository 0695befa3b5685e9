"""Out-of-distribution score per image and per tile (issue 17 item 1).

Features: each 256^2 tile (the checkpoint's tile size) of an image, scaled and normalised as the
model was trained, goes through the model's CNN encoder (``model.cnn``: every stage, strides 2/4
to 32) and each stage's output is averaged over the tile: one vector per tile (for ResNet-18
64 + 64 + 128 + 256 + 512 = 1024 numbers). Models without ``model.cnn`` use the input of their
last convolution / linear layer (the classifier's per-pixel features) instead.

Two parts per tile, one score (fitted once per checkpoint, :func:`fit`):

* k-NN distance: the training images' tile features, standardised per dimension (mean/std of the
  training tiles), form a bank (at most ``max_bank`` tiles, a seeded subsample beyond); a tile's
  distance is the mean Euclidean distance to its ``k`` nearest training tiles / sqrt(dimensions).
* mean predictive entropy of the tile (softmax of the blended logits, natural log), from the
  predictor's own output (:class:`EntropyTiles`, fed band by band by
  :func:`segment.stream.predict_stream`), so it costs nothing extra and works with either backend.

The score is their average after dividing each by its median over the validation images' tiles:
``(knn / knn_val_median + entropy / entropy_val_median) / 2`` (about 1 in distribution). The two
miss different things (BENCHMARKS.md: on Super4 vs Super1 tiles each alone reaches AUROC ~0.92,
together more). Threshold: the ``quantile`` (0.95) of the validation tiles' scores; a tile is
flagged above it, an image when the mean of its tiles' scores is. Stored as ``ood.safetensors``
(bank, mean, std) + ``ood.json`` (settings, scales, threshold, counts); no pickle.

Tiles: a grid of non-overlapping tiles whose last row and column sit flush with the border
(``compute_steps(..., step_fraction=1)``); features are read band by band, so memory stays bounded.

``segment.finetune`` fits it into ``best/`` at the end of training (training and validation images);
the CLI does it for a checkpoint fine-tuned before this existed (the summary goes to ``--out``)::

    python -m segment.ood CHECKPOINT --train DIR [DIR...] --val DIR [DIR...] --out FOLDER [--k 5]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import Tensor, nn

from pretrain.io import list_images
from pretrain.outputs import atomic_path, atomic_write_text
from segment.infer import Predictor
from segment.sources import RowSource, open_source, source_intensity_window
from segment.stream import iter_logit_rows
from segment.tiling import Origin, compute_steps, pad_to
from segment.zoom import resize_image

__all__ = ["native_tile", "tile_grid", "feature_module", "tile_features", "OODSummary", "fit", "fit_checkpoint", "image_entropy",
           "EntropyTiles",
           "load", "main"]

logger = logging.getLogger(__name__)

SUMMARY_FILE, META_FILE = "ood.safetensors", "ood.json"
FORMAT = 1


# ----------------------------------------------------------------------------- geometry
def native_tile(tile: int, zoom: float) -> int:
    """The side, in the image's own pixels, of a region that the model sees as one ``tile`` after the
    predictor's ``zoom`` (a 256 px model tile at zoom 0.5 covers 512 image pixels): the OOD tile grid is
    laid on the image with this side, so features and entropy describe what the model saw."""
    return max(1, round(tile / zoom))


def tile_grid(hw: tuple[int, int], tile: int) -> tuple[list[int], list[int]]:
    """Row and column origins of non-overlapping ``tile`` tiles, the last flush with the border
    (one tile at 0 for an axis shorter than a tile)."""
    return compute_steps(hw[0], tile, 1.0), compute_steps(hw[1], tile, 1.0)


# ----------------------------------------------------------------------------- features
def feature_module(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose output (``model.cnn``) or input (the last conv/linear layer) gives the features."""
    cnn = getattr(model, "cnn", None)
    if isinstance(cnn, nn.Module):
        return cnn, "output"
    last = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not last:
        raise ValueError(f"{type(model).__name__} has neither a `cnn` encoder nor a conv/linear layer to read")
    return last[-1], "input"


def _pool(value: Any) -> list[Tensor]:
    """Average every NCHW / NHWC tensor of a (nested) output over its spatial axes -> B x C each."""
    if isinstance(value, Tensor):
        return [value.float().flatten(2).mean(-1)] if value.dim() > 2 else [value.float()]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _pool(v)]
    return []


@contextmanager
def _captured(model: nn.Module) -> Iterator[list[Tensor]]:
    module, where = feature_module(model)
    store: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        store.extend(_pool(out if where == "output" else args[0]))

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@torch.inference_mode()
def _features(model: nn.Module, tiles: Tensor) -> np.ndarray:
    """B x D pooled features of a batch of normalised tiles (the encoder only when it is ``model.cnn``)."""
    module, where = feature_module(model)
    with _captured(model) as store:
        if where == "output":
            module(tiles)
        else:
            model(tiles)
    parts = [p for p in store if p.shape[1] > 0]  # smp-style 0-channel placeholders carry nothing
    return torch.cat(parts, dim=1).numpy().astype(np.float32)


def tile_features(predictor: Predictor, model: nn.Module, source: RowSource, tile: int | None = None,
                  batch_size: int = 8) -> tuple[list[Origin], np.ndarray]:
    """``(origins, features)`` of one image's tile grid: the image scaled with one intensity window
    (as the predictor), normalised, read one tile row at a time; each grid cell (``native_tile(tile,
    predictor.zoom)`` image pixels, origins in image pixels) resized by the predictor's zoom to the
    model's ``tile`` before the encoder sees it; ``model`` is the PyTorch network (also for the ONNX
    backend, whose predictor holds no PyTorch module)."""
    tile = int(tile or predictor.tile_hw[0])
    side = native_tile(tile, predictor.zoom)
    h, w = source.shape
    window = source_intensity_window(source, predictor.intensity)
    ys, xs = tile_grid((h, w), side)
    origins: list[Origin] = []
    feats: list[np.ndarray] = []
    model = model.eval()
    for y in ys:
        rows = predictor.normalize(predictor.scale(source.rows(y, min(y + side, h)), window,
                                                   path=getattr(source, "path", None)))
        rows = pad_to(rows, (side, side))  # an image smaller than a tile: reflect-padded, as the predictor does
        batch = [resize_image(rows[:, :side, x : x + side], (tile, tile)) for x in xs]
        for i in range(0, len(batch), batch_size):
            feats.append(_features(model, torch.stack(batch[i : i + batch_size]).to(predictor.device)))
        origins += [(y, x) for x in xs]
    return origins, np.concatenate(feats)


# ----------------------------------------------------------------------------- summary
@dataclass
class OODSummary:
    """The training tiles' standardised features (k-NN bank), the scaling, and the threshold."""

    bank: np.ndarray  # N x D, standardised
    mean: np.ndarray  # D
    std: np.ndarray  # D
    k: int = 5
    threshold: float = float("nan")
    tile: int = 256
    knn_scale: float = 1.0
    entropy_scale: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def combine(self, knn: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        """The OOD score of tiles from their k-NN distances and mean entropies (module docstring)."""
        return (np.asarray(knn) / self.knn_scale + np.asarray(entropy) / self.entropy_scale) / 2

    def knn(self, features: np.ndarray) -> np.ndarray:
        """Mean distance of each feature row to its ``k`` nearest bank rows / sqrt(D)."""
        z = (np.asarray(features, np.float64) - self.mean) / self.std
        bank = self.bank.astype(np.float64)
        d2 = (z**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * z @ bank.T
        d = np.sqrt(np.maximum(d2, 0.0))
        k = min(self.k, bank.shape[0])
        nearest = np.partition(d, k - 1, axis=1)[:, :k]
        return nearest.mean(1) / math.sqrt(bank.shape[1])

    def save(self, folder: str | os.PathLike[str]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / SUMMARY_FILE) as tmp:
            save_file({"bank": self.bank.astype(np.float32), "mean": self.mean.astype(np.float32),
                       "std": self.std.astype(np.float32)}, str(tmp))
        atomic_write_text(folder / META_FILE, json.dumps(
            dict(format=FORMAT, k=self.k, threshold=self.threshold, tile=self.tile, knn_scale=self.knn_scale,
                 entropy_scale=self.entropy_scale, **self.meta), indent=2))
        return folder


def load(folder: str | os.PathLike[str]) -> OODSummary:
    """Read ``ood.safetensors`` + ``ood.json`` from ``folder``; errors name the file."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        arrays = load_file(str(folder / SUMMARY_FILE))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta_path.parent}: no readable OOD summary ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: OOD summary format {meta.get('format')!r}, expected {FORMAT}")
    keys = ("format", "k", "threshold", "tile", "knn_scale", "entropy_scale")
    try:
        return OODSummary(arrays["bank"], arrays["mean"], arrays["std"], k=int(meta["k"]),
                          threshold=float(meta["threshold"]), tile=int(meta["tile"]),
                          knn_scale=float(meta["knn_scale"]), entropy_scale=float(meta["entropy_scale"]),
                          meta={k: v for k, v in meta.items() if k not in keys})
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{meta_path}: incomplete OOD summary ({exc!r})") from None


def _image_features(predictor: Predictor, model: nn.Module, paths: Sequence[Path], tile: int) -> list[np.ndarray]:
    out = []
    for p in paths:
        with open_source(p, gray=predictor.in_chans == 1) as src:
            out.append(tile_features(predictor, model, src, tile)[1])
    return out


def image_entropy(predictor: Predictor, source: RowSource, tile: int) -> EntropyTiles:
    """Run the band-wise prediction of one image only for its per-tile entropy (on the grid of
    :func:`tile_features`: cells of ``native_tile(tile, predictor.zoom)`` image pixels)."""
    ent = EntropyTiles(source.shape, native_tile(tile, predictor.zoom))
    for y0, logits in iter_logit_rows(predictor, source, progress=False):
        ent(y0, logits)
    return ent


def fit(predictor: Predictor, model: nn.Module, train: Sequence[Path], val: Sequence[Path], *, k: int = 5,
        quantile: float = 0.95, max_bank: int = 4096, seed: int = 0, tile: int | None = None) -> OODSummary:
    """Fit the summary on the ``train`` images' tiles; the scales and the threshold come from the
    ``val`` images' tiles (segmented by ``predictor`` for their entropy); see the module docstring."""
    if not train or not val:
        raise ValueError(f"fitting the OOD summary needs training and validation images (got {len(train)}, {len(val)})")
    tile = int(tile or predictor.tile_hw[0])
    feats = np.concatenate(_image_features(predictor, model, train, tile)).astype(np.float64)
    if feats.shape[0] > max_bank:
        feats = feats[np.random.default_rng(seed).choice(feats.shape[0], max_bank, replace=False)]
    mean, std = feats.mean(0), feats.std(0)
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)  # constant dimensions: unscaled
    summary = OODSummary(((feats - mean) / std).astype(np.float32), mean, std, k=k, tile=tile)
    knn, ent = [], []
    for p in val:
        with open_source(p, gray=predictor.in_chans == 1) as src:
            knn.append(summary.knn(tile_features(predictor, model, src, tile)[1]))
            ent.append(image_entropy(predictor, src, tile).means().ravel())
    knn_v, ent_v = np.concatenate(knn), np.concatenate(ent)
    summary.knn_scale = float(max(np.median(knn_v), 1e-12))
    summary.entropy_scale = float(max(np.median(ent_v), 1e-12))
    scores = summary.combine(knn_v, ent_v)
    summary.threshold = float(np.quantile(scores, quantile))
    summary.meta = dict(quantile=quantile, train_images=len(train), val_images=len(val), bank_tiles=int(feats.shape[0]),
                        dims=int(feats.shape[1]), val_tiles=int(scores.size), feature=feature_module(model)[1],
                        knn_threshold=float(np.quantile(knn_v, quantile)),
                        entropy_threshold=float(np.quantile(ent_v, quantile)))
    logger.info("OOD summary: %d training tiles x %d features; threshold %.4g (%.0f %% of %d validation tiles)",
                feats.shape[0], feats.shape[1], summary.threshold, 100 * quantile, scores.size)
    return summary


def fit_checkpoint(checkpoint: str | os.PathLike[str], train: Sequence[Path], val: Sequence[Path], *,
                   device: str | torch.device = "cpu", out: str | os.PathLike[str] | None = None,
                   **kwargs: Any) -> OODSummary:
    """Fit the summary of a checkpoint folder's model and save it there (or in ``out``)."""
    predictor = Predictor.from_checkpoint(checkpoint, device=device)
    summary = fit(predictor, predictor.model, train, val, **kwargs)
    summary.save(out if out is not None else checkpoint)
    return summary


# ----------------------------------------------------------------------------- entropy
class EntropyTiles:
    """Mean predictive entropy per tile of :func:`tile_grid`, accumulated from blocks of logit rows
    (``(y0, K x h x W logits)``, as :func:`segment.stream.iter_logit_rows` yields them)."""

    def __init__(self, hw: tuple[int, int], tile: int) -> None:
        self.hw, self.tile = hw, tile
        self.ys, self.xs = tile_grid(hw, tile)
        self.sums = np.zeros((len(self.ys), len(self.xs)), np.float64)
        self.total = 0.0

    def __call__(self, y0: int, logits: Tensor) -> None:
        p = torch.softmax(logits.float(), dim=0)
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(0).cpu().numpy().astype(np.float64)  # h x W
        self.total += float(ent.sum())
        w = self.hw[1]
        col = np.concatenate([np.zeros((ent.shape[0], 1)), np.cumsum(ent, 1)], 1)
        per_tile = np.stack([col[:, min(x + self.tile, w)] - col[:, x] for x in self.xs], 1)  # h x nx
        cum = np.concatenate([np.zeros((1, len(self.xs))), np.cumsum(per_tile, 0)], 0)
        y1 = y0 + ent.shape[0]
        for i, y in enumerate(self.ys):
            a, b = max(y, y0), min(y + self.tile, y1)
            if a < b:
                self.sums[i] += cum[b - y0] - cum[a - y0]

    def means(self) -> np.ndarray:
        """``ny x nx`` mean entropy per tile."""
        th = np.array([min(y + self.tile, self.hw[0]) - y for y in self.ys], np.float64)
        tw = np.array([min(x + self.tile, self.hw[1]) - x for x in self.xs], np.float64)
        return self.sums / np.outer(th, tw)

    def image_mean(self) -> float:
        return self.total / (self.hw[0] * self.hw[1])


# ----------------------------------------------------------------------------- CLI
def _paths(specs: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        out += list_images(p) if p.is_dir() else [p]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segment.ood", description="Fit a checkpoint's OOD summary.")
    p.add_argument("checkpoint")
    p.add_argument("--train", nargs="+", required=True, help="training images (files or folders)")
    p.add_argument("--val", nargs="+", required=True, help="validation images (files or folders): the threshold")
    p.add_argument("--out", type=Path, required=True, help="folder for ood.safetensors + ood.json")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--quantile", type=float, default=0.95)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = fit_checkpoint(args.checkpoint, _paths(args.train), _paths(args.val), out=args.out, k=args.k,
                             quantile=args.quantile)
    print(f"wrote {args.out}: threshold {summary.threshold:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
