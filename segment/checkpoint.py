"""Fine-tuned model checkpoints: `model.safetensors` + `model.json`, written atomically.

A checkpoint folder is self-describing: `model.json` holds what `create_model` needs to rebuild the
network (name and kwargs), the class map, and how inference must see an image (`inference_settings`:
tile, overlap, mean/std, intensity mapping, zoom), so `evaluate`, `predict` and `export` need nothing else
and read those settings from here only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from pretrain.outputs import atomic_dir
from segment.models import create_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"

INFERENCE_KEYS = ("tile_size", "overlap", "mean", "std", "intensity", "zoom")
"""The keys of model.json that say how inference sees an image (written by `segment.finetune`)."""
LEGACY_INFERENCE = {"overlap": 0.5, "intensity": "dtype", "zoom": 1.0}
"""What a model.json written before a key existed means: the values those checkpoints were trained and
evaluated with (overlap 0.5 was every CLI's default; no intensity key meant a division by the dtype's
maximum; no zoom meant native resolution)."""


def inference_settings(meta: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """``tile_size``, ``overlap``, ``mean``, ``std``, ``intensity`` and ``zoom`` of a checkpoint's metadata,
    with :data:`LEGACY_INFERENCE` for keys older files lack; ``KeyError`` naming ``path`` when one without a
    legacy meaning (tile size, mean, std) is missing."""
    missing = [k for k in INFERENCE_KEYS if k not in meta and k not in LEGACY_INFERENCE]
    if missing:
        raise KeyError(f"{path}: model.json has no {', '.join(map(repr, missing))}; it is not a checkpoint of "
                       f"segment.finetune (pass the value explicitly)")
    return {k: meta.get(k, LEGACY_INFERENCE.get(k)) for k in INFERENCE_KEYS}


def save_model(out_dir: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write `model` (its state dict) and `meta` to `out_dir` atomically; returns `out_dir`.

    `meta` must contain `model` (the registry name) and `model_kwargs`; see `load_model`.
    """
    out_dir = Path(out_dir)
    missing = {"model", "model_kwargs"} - meta.keys()
    if missing:
        raise ValueError(f"checkpoint metadata lacks {sorted(missing)}")
    with atomic_dir(out_dir) as tmp:  # folder and files readable as the umask says
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / MODEL_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return out_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder, its `model.safetensors`, or a run folder (-> `best`, then `last`)."""
    path = Path(path)
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    for candidate in (path, path / "best", path / "last"):
        if (candidate / MODEL_FILE).is_file() and (candidate / META_FILE).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(
        f"{path} is not a checkpoint: expected {MODEL_FILE} + {META_FILE} in it or in its best/ or last/"
    )


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint folder (or run folder) and load its weights."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{ckpt / META_FILE}: not valid JSON ({e})") from None
    model = create_model(meta["model"], **meta["model_kwargs"])
    state = load_file(str(ckpt / MODEL_FILE), device=map_location)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{ckpt / MODEL_FILE} does not match model {meta['model']!r}: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    model.eval()
    log.info("loaded %s from %s", meta["model"], ckpt)
    return model, meta
