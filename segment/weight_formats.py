"""Encoder checkpoints in the formats scientists have: read into a flat state dict and its metadata.

Formats read by :func:`read_checkpoint` (the format is recorded in ``metadata["format"]``):

- ``export``: this project's pretrain export, ``encoder.safetensors`` + ``encoder.json`` (a folder,
  or the ``.safetensors`` path); the metadata is the json (written by :func:`pretrain.export.export_encoder`).
- ``state_dict``: timm-layout ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.safetensors``, a plain state dict
  or one wrapped in ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` / ``teacher``.
- ``microsoft_swin``: ``{"model": {...}}`` as released by microsoft/Swin-Transformer (downsampling
  at the end of each stage, ``relative_position_index`` / ``attn_mask`` buffers, ``head.weight``).
  The conversion itself is timm's ``swin_transformer.checkpoint_filter_fn``, applied on load.
- ``micronet``: NASA MicroNet ``*_pretrained_microscopynet_v1.*.pth.tar`` files, plain torchvision
  state dicts (``module.`` prefixes stripped), whose ResNet key names equal timm's.

Only ``torch.load(..., weights_only=True)`` and safetensors are used: a file that needs arbitrary
pickled objects is refused. Loading the state dict into a timm encoder is :mod:`segment.weights`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from pretrain.export import ENCODER_FILE, ENCODER_META
from pretrain.outputs import atomic_path

log = logging.getLogger(__name__)

__all__ = ["cache_dir", "read_checkpoint"]


#: Wrapper keys of training checkpoints, in order of preference (EMA weights first, as timm does).
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "teacher")
#: Prefixes stripped when every key carries them (DDP, torch.compile, SSL frameworks, Lightning).
_COMMON_PREFIXES = (
    "module.", "_orig_mod.", "teacher.backbone.", "student.backbone.", "backbone.", "encoder.", "model.",
)
#: When only some keys carry these, the checkpoint wraps more than the backbone: take that part.
_PART_PREFIXES = ("teacher.backbone.", "teacher.", "backbone.")
_EXAMPLES = 5


def cache_dir() -> Path:
    """Download cache: ``$MSEG_CACHE`` or ``~/.cache/micrograph-seg``."""
    return Path(os.environ.get("MSEG_CACHE") or Path.home() / ".cache" / "micrograph-seg").expanduser()


def read_checkpoint(source: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint into a flat state dict of tensors and its metadata.

    Args:
        source: a pretrain export folder, a weights file, or an http(s) URL (downloaded once into
            :func:`cache_dir`).

    Returns:
        ``(state_dict, metadata)``; metadata holds ``format`` and ``path`` plus, for an export,
        the contents of ``encoder.json``.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is corrupt, not a checkpoint, or needs unsafe unpickling.
    """
    path = _download(str(source)) if _is_url(source) else Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    meta: dict[str, Any] = {}
    if path.is_dir():
        weights = path / ENCODER_FILE
        if not weights.is_file():
            raise ValueError(
                f"{path} is a folder without {ENCODER_FILE}: pass the weights file itself, or a pretrain "
                f"export folder ({ENCODER_FILE} + {ENCODER_META})"
            )
        path = weights
    if path.suffix == ".safetensors":
        meta = _read_export_meta(path)
        raw: Any = _load_safetensors(path)
    else:
        raw = _torch_load(path)
    state_dict = _clean(_unwrap(raw, path), path)
    if meta:
        meta["format"] = "export"
    elif "layers.0.downsample.reduction.weight" in state_dict:
        meta["format"] = "microsoft_swin"
    elif "microscopynet" in path.name:
        meta["format"] = "micronet"
    else:
        meta["format"] = "state_dict"
    meta["path"] = str(path)
    log.debug("read %d tensors from %s (%s)", len(state_dict), path, meta["format"])
    return state_dict, meta


def _is_url(source: str | Path) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https")


def _download(url: str) -> Path:
    """Download ``url`` into the cache once (atomically) and return the local path."""
    name = Path(urlparse(url).path).name or "checkpoint.pth"
    dst = cache_dir() / name
    if dst.is_file():
        log.info("using cached %s for %s", dst, url)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dst)
    try:
        with atomic_path(dst) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=sys.stderr.isatty())
    except OSError as e:  # URLError, HTTPError, timeouts and DNS failures are all OSErrors
        raise OSError(
            f"could not download {url} ({e}). Without network access, download it manually and pass "
            f"the local path instead of the URL (or save it as {dst} to fill the cache)."
        ) from e
    return dst


def _read_export_meta(weights: Path) -> dict[str, Any]:
    """The export json beside ``weights`` (``encoder.json`` for ``encoder.safetensors``), or ``{}``."""
    candidate = weights.with_suffix(".json")
    if not candidate.is_file():
        return {}
    try:
        meta = json.loads(candidate.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"export metadata {candidate} is not valid JSON: {e}") from e
    return meta if isinstance(meta, dict) and "timm_name" in meta else {}


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, translating failures into errors that name the file."""
    try:
        # timm training checkpoints carry an argparse.Namespace of their arguments: plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise ValueError(
                f"refusing to load {path}: it contains pickled Python objects ({', '.join(unsafe)}), and "
                "only tensors and plain containers are read (torch.load weights_only=True) because "
                "unpickling can run arbitrary code. If you trust the file, re-save its weights with "
                "torch.save(state_dict) or safetensors and pass that file."
            ) from e
        raise ValueError(
            f"{path} could not be read as a PyTorch checkpoint with weights_only=True: it is corrupt, "
            f"not a checkpoint, or holds pickled objects that are refused for safety ({_first_line(e)})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, TypeError) as e:
        raise ValueError(
            f"{path} is not a readable checkpoint (corrupt, truncated or unsupported format; expected "
            f"a PyTorch .pth/.pt/.bin/.pth.tar or .safetensors file): {_first_line(e)}"
        ) from e


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only a better error message is at stake (legacy/corrupt files)
        return []


def _unwrap(obj: Any, path: Path, depth: int = 0) -> dict[str, Tensor]:
    """Find the state dict inside a training checkpoint."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    if depth < 3:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping) and obj[key]:
                log.debug("%s: using the %r entry", path, key)
                return _unwrap(obj[key], path, depth + 1)
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if tensors:
        return tensors
    raise ValueError(
        f"{path} holds no state dict (top-level keys: {_examples(list(map(str, obj)))}; looked for a "
        f"mapping of tensors or one under {', '.join(_WRAPPER_KEYS)})"
    )


def _clean(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Strip wrapper prefixes carried by every key; prefer the teacher of a student/teacher pair."""
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in _COMMON_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                log.debug("%s: stripped the key prefix %r", path, prefix)
                changed = True
    for prefix in _PART_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            log.info("%s: taking the %r tensors (the checkpoint holds more than a backbone)", path, prefix)
            return _clean({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, path)
    return state_dict


def _examples(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_EXAMPLES])
    return shown + (f", ... (+{len(keys) - _EXAMPLES})" if len(keys) > _EXAMPLES else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
