"""The hand-off from pretraining to segmentation: an encoder export folder.

``encoder.safetensors`` (timm key names) + ``encoder.json`` (how to rebuild the timm model, its input
normalisation and intensity scaling, the method, corpus, steps and k-NN probe of its pretraining).
:mod:`segment.weights` reads it through these public names; nothing here imports :mod:`segment`, so
data flow one way.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

from pretrain.outputs import atomic_path

__all__ = ["ENCODER_FILE", "ENCODER_META", "export_encoder", "feature_info"]

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
ENCODER_META = "encoder.json"


def export_encoder(
    encoder: nn.Module,
    out_dir: str | Path,
    *,
    timm_name: str,
    timm_kwargs: Mapping[str, Any],
    in_chans: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    intensity: str = "minmax",
    method: str = "",
    data: str = "",
    steps: int = 0,
    knn: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``encoder.safetensors`` (timm key names) + ``encoder.json`` into ``out_dir``, atomically.

    ``knn`` (optional) records the pretraining's k-NN probe, e.g. ``{"top1_init": 0.80, "top1": 0.85}``,
    so downstream tables can show the encoder's quality next to what it does after fine-tuning.

    ``segment`` rebuilds the encoder from the json alone: ``timm.create_model(timm_name,
    num_classes=0, in_chans=in_chans, **timm_kwargs)`` (``num_classes`` and ``in_chans`` are
    therefore not kept in ``timm_kwargs``). Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    mean_l, std_l = _per_channel(mean, in_chans, "mean"), _per_channel(std, in_chans, "std")
    model_in_chans = getattr(encoder, "in_chans", None)
    if model_in_chans is not None and int(model_in_chans) != int(in_chans):
        raise ValueError(f"export_encoder: in_chans={in_chans}, but the encoder takes {model_in_chans}")
    timm_kwargs = dict(timm_kwargs)
    timm_kwargs.pop("num_classes", None)  # always 0 for an encoder
    if int(timm_kwargs.pop("in_chans", in_chans)) != int(in_chans):
        raise ValueError(f"export_encoder: timm_kwargs['in_chans'] disagrees with in_chans={in_chans}")
    channels, strides = feature_info(encoder)
    meta = {
        "timm_name": timm_name,
        "timm_kwargs": timm_kwargs,
        "in_chans": int(in_chans),
        "mean": mean_l,
        "std": std_l,
        "intensity": intensity,
        "feature_channels": channels,
        "feature_strides": strides,
        "method": method,
        "data": data,
        "steps": int(steps),
        "knn": dict(knn or {}),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": _project_version(),
    }
    tensors: dict[str, Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in encoder.state_dict().items():
        value = value.detach().cpu().contiguous()
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[key] = value.clone() if ident in seen else value  # safetensors refuses shared memory
        seen.add(ident)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ENCODER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "timm_name": timm_name})
    with atomic_path(out_dir / ENCODER_META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log.info("exported %s (%d tensors, %s) to %s", timm_name, len(tensors), method or "no method", out_dir)
    return out_dir


def _per_channel(value: float | Sequence[float], in_chans: int, label: str) -> list[float]:
    values = [float(value)] * in_chans if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != in_chans:
        raise ValueError(f"export_encoder: {label} has {len(values)} values for in_chans={in_chans}")
    return values


def feature_info(encoder: nn.Module) -> tuple[list[int] | None, list[int] | None]:
    """Feature channels and strides from ``encoder.feature_info`` (list of dicts or FeatureInfo)."""
    info = getattr(encoder, "feature_info", None)
    if info is None:
        return None, None
    if hasattr(info, "channels") and hasattr(info, "reduction"):
        return list(info.channels()), list(info.reduction())
    try:
        return [int(f["num_chs"]) for f in info], [int(f["reduction"]) for f in info]
    except (TypeError, KeyError):
        return None, None


def _project_version() -> str:
    try:
        return importlib.metadata.version("micrograph-seg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
