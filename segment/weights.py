"""Encoder weights: read checkpoints in the formats scientists have, load them into timm encoders.

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
pickled objects is refused. :func:`load_encoder_weights` converts the state dict to the encoder's
layout with timm's own machinery (the family's ``checkpoint_filter_fn``, ``adapt_input_conv``),
drops classifier heads, and returns a :class:`LoadReport`; anything else that does not fit raises
:class:`WeightsMismatchError` unless ``allow_mismatch=True``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import adapt_input_conv, get_model_traits, model_entrypoint
from torch import Tensor, nn

from pretrain.export import ENCODER_FILE, ENCODER_META, feature_info
from pretrain.outputs import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "ENCODER_FILE",
    "ENCODER_META",
    "LoadReport",
    "WeightsMismatchError",
    "cache_dir",
    "load_encoder_weights",
    "load_model_encoders",
    "read_checkpoint",
]


#: Wrapper keys of training checkpoints, in order of preference (EMA weights first, as timm does).
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "teacher")
#: Prefixes stripped when every key carries them (DDP, torch.compile, SSL frameworks, Lightning).
_COMMON_PREFIXES = (
    "module.", "_orig_mod.", "teacher.backbone.", "student.backbone.", "backbone.", "encoder.", "model.",
)
#: When only some keys carry these, the checkpoint wraps more than the backbone: take that part.
_PART_PREFIXES = ("teacher.backbone.", "teacher.", "backbone.")
#: Generic classifier prefixes, in addition to ``pretrained_cfg["classifier"]``.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.")
#: Buffers without weight content: silently skipped when absent or superfluous.
_BENIGN_SUFFIXES = ("num_batches_tracked",)
_EXAMPLES = 5


class WeightsMismatchError(ValueError):
    """A checkpoint does not fit an encoder beyond its classifier head."""


@dataclass
class LoadReport:
    """What happened to each tensor when a checkpoint was loaded into an encoder.

    Attributes:
        loaded: encoder keys that received a checkpoint tensor.
        resized: the subset of ``loaded`` whose tensor was resized or converted to fit (relative
            position tables for another window, patch embeddings, stems adapted to ``in_chans``).
        missing: encoder keys the checkpoint does not provide (left as initialised).
        unexpected: checkpoint keys the encoder does not have.
        skipped_head: classifier keys not transferred (checkpoint head dropped, or the encoder's
            own head left as initialised).
        shape_mismatch: keys present on both sides with shapes that could not be reconciled
            (``"key: checkpoint (..) vs encoder (..)"``).
        source: the checkpoint, for messages.
        name: the encoder's name, for messages.
    """

    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    source: str = ""
    name: str = "encoder"

    @property
    def ok(self) -> bool:
        """True when everything beyond the classifier head fitted."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        """One line per non-empty list: its count and first few names."""
        lines = [f"{self.name} <- {self.source}: {len(self.loaded)} tensors loaded"]
        for label in ("resized", "missing", "unexpected", "shape_mismatch", "skipped_head"):
            keys = getattr(self, label)
            if keys:
                lines.append(f"  {label}: {len(keys)} ({_examples(keys)})")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_encoder_weights(
    encoder: nn.Module,
    source: str | Path,
    *,
    timm_name: str | None = None,
    allow_mismatch: bool = False,
    name: str = "encoder",
) -> LoadReport:
    """Load a checkpoint into a timm encoder (built with ``num_classes=0``) in place.

    Steps: read (:func:`read_checkpoint`); the timm family's ``checkpoint_filter_fn`` (Microsoft
    Swin layout, relative-position tables resized to the encoder's windows, ...); the stem adapted
    to the encoder's input channels (``timm.models.adapt_input_conv``: 3->1 sums over RGB, 1->3
    repeats and scales); classifier keys dropped; ``load_state_dict(strict=False)``.

    Args:
        encoder: the timm model to fill.
        source: anything :func:`read_checkpoint` accepts.
        timm_name: the encoder's timm model name, when ``encoder.pretrained_cfg`` does not say it.
        allow_mismatch: load what fits instead of raising when keys are missing, unexpected or of
            another shape.
        name: the encoder's name in logs and errors (e.g. the CS-UNet branch).

    Raises:
        WeightsMismatchError: the checkpoint does not fit and ``allow_mismatch`` is False; the
            encoder is then left unchanged.
    """
    state_dict, meta = read_checkpoint(source)
    src = meta["path"]
    cfg = dict(getattr(encoder, "pretrained_cfg", None) or {})
    arch = timm_name or cfg.get("architecture")
    _check_metadata(encoder, meta, arch, name)

    raw = state_dict  # kept alive so that tensor ids stay unique while comparing
    raw_ids = {id(v) for v in raw.values()}
    state_dict = _apply_filter_fn(encoder, dict(raw), arch, src)
    model_state = encoder.state_dict()
    volatile = {k for k, _ in encoder.named_buffers()} - model_state.keys()
    state_dict = {k: v for k, v in state_dict.items() if k not in volatile}  # recomputed buffers
    _adapt_stem(encoder, state_dict, model_state, cfg, meta, name)

    heads = _head_prefixes(cfg)
    report = LoadReport(source=src, name=name)
    to_load: dict[str, Tensor] = {}
    mismatched: set[str] = set()
    for key, value in state_dict.items():
        target = model_state.get(key)
        if target is not None and target.shape == value.shape:
            to_load[key] = value
        elif key.startswith(heads):
            report.skipped_head.append(key)
        elif target is not None:
            mismatched.add(key)
            report.shape_mismatch.append(
                f"{key}: checkpoint {tuple(value.shape)} vs encoder {tuple(target.shape)}"
            )
        elif not key.endswith(_BENIGN_SUFFIXES):
            report.unexpected.append(key)
    for key in model_state:
        if key in to_load or key in mismatched or key.endswith(_BENIGN_SUFFIXES):
            continue
        (report.skipped_head if key.startswith(heads) else report.missing).append(key)
    report.loaded = [k for k in model_state if k in to_load]  # in the encoder's order
    report.resized = [  # new tensors (not merely renamed ones) whose shape changed
        k for k in report.loaded
        if id(to_load[k]) not in raw_ids and (k not in raw or raw[k].shape != to_load[k].shape)
    ]

    if not report.ok and not allow_mismatch:
        raise WeightsMismatchError(_mismatch_message(report, arch))
    result = encoder.load_state_dict(to_load, strict=False)
    if result.unexpected_keys:  # cannot happen with the filtering above; keep the report honest
        report.unexpected.extend(k for k in result.unexpected_keys if k not in report.unexpected)
    log.info("%s", report.summary())
    if not report.ok:
        log.warning(
            "%s: checkpoint %s fitted only partly (allow_mismatch=True); unfitted tensors keep their "
            "initial values", name, src,
        )
    return report


def load_model_encoders(
    model: nn.Module,
    sources: Mapping[str, str | Path | None],
    allow_mismatch: bool = False,
) -> dict[str, LoadReport]:
    """Load ``sources[branch]`` into ``model.encoders[branch]`` for each branch (``None`` skips one).

    ``model.encoder_specs[branch]["timm_name"]`` names the encoder's timm model when present.
    """
    encoders = getattr(model, "encoders", None)
    if encoders is None:
        raise TypeError(f"{type(model).__name__} has no `encoders` to load weights into")
    unknown = [b for b in sources if b not in encoders]
    if unknown:
        raise ValueError(
            f"unknown encoder branch(es) {unknown} for {type(model).__name__}; "
            f"available: {sorted(encoders.keys())}"
        )
    specs = getattr(model, "encoder_specs", None) or {}
    reports = {}
    for branch, source in sources.items():
        if source is None:
            continue
        reports[branch] = load_encoder_weights(
            encoders[branch],
            source,
            timm_name=(specs.get(branch) or {}).get("timm_name"),
            allow_mismatch=allow_mismatch,
            name=branch,
        )
    return reports


def _apply_filter_fn(
    encoder: nn.Module, state_dict: dict[str, Tensor], arch: str | None, src: str
) -> dict[str, Tensor]:
    """Run the timm family's ``checkpoint_filter_fn`` (found from the encoder's module)."""
    fn = _find_filter_fn(encoder, arch)
    if fn is None:
        return state_dict
    try:
        try:
            return fn(state_dict, encoder)
        except TypeError:  # a few older filters take the state dict only
            return fn(state_dict)
    except Exception as e:  # noqa: BLE001 - a filter tripping on foreign keys must not hide the report
        log.warning(
            "%s.%s failed on %s (%s: %s); loading the keys unconverted",
            fn.__module__, fn.__name__, src, type(e).__name__, e,
        )
        return state_dict


def _find_filter_fn(encoder: nn.Module, arch: str | None) -> Callable[..., dict[str, Tensor]] | None:
    modules = [type(encoder).__module__]
    if arch:
        with contextlib.suppress(Exception):
            modules.insert(0, model_entrypoint(arch.split(".", 1)[0]).__module__)
    for module_name in modules:
        fn = getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)
        if callable(fn):
            return fn
    return None


def _adapt_stem(
    encoder: nn.Module,
    state_dict: dict[str, Tensor],
    model_state: Mapping[str, Tensor],
    cfg: Mapping[str, Any],
    meta: Mapping[str, Any],
    name: str,
) -> None:
    """Adapt first-conv weights to the encoder's input channels (in place), as timm's loader does."""
    first = get_model_traits(encoder).get("first_conv", cfg.get("first_conv"))
    for conv_name in [first] if isinstance(first, str) else list(first or ()):
        key = f"{conv_name}.weight"
        weight, target = state_dict.get(key), model_state.get(key)
        if weight is None or target is None or weight.shape == target.shape:
            continue
        if weight.ndim != 4 or weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:]:
            continue  # not a channel difference: reported as a shape mismatch
        module = encoder.get_submodule(conv_name)
        in_chans = int(getattr(encoder, "in_chans", None) or getattr(module, "in_channels", target.shape[1]))
        per_chan = max(target.shape[1] // in_chans, 1)  # >1 for space-to-depth stems
        base = int(meta.get("in_chans") or max(weight.shape[1] // per_chan, 1))
        try:
            adapted = adapt_input_conv(in_chans, weight, base_chans=base)
        except (NotImplementedError, ValueError, AssertionError) as e:
            log.warning("%s: cannot adapt %s from %d to %d channels: %s", name, key, base, in_chans, e)
            continue
        if adapted.shape == target.shape:
            state_dict[key] = adapted
            log.info("%s: adapted %s from %d to %d input channel(s)", name, key, base, in_chans)


def _head_prefixes(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    classifier = cfg.get("classifier") or ()
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    return tuple(dict.fromkeys([*(f"{n}." for n in names), *_HEAD_PREFIXES]))


def _check_metadata(encoder: nn.Module, meta: Mapping[str, Any], arch: str | None, name: str) -> None:
    """Warn where an export's metadata disagrees with the encoder's architecture."""
    if meta.get("format") != "export":
        return
    where = f"{name}: checkpoint {meta['path']}"
    exported = meta.get("timm_name")
    if exported and arch and exported.split(".", 1)[0] != arch.split(".", 1)[0]:
        log.warning("%s was exported from timm model %r, but the encoder is %r", where, exported, arch)
    channels, strides = feature_info(encoder)
    for label, ours in (("feature_channels", channels), ("feature_strides", strides)):
        theirs = meta.get(label)
        if theirs and ours and list(theirs) != list(ours):
            log.warning("%s has %s %s, the encoder %s (another width or depth?)", where, label, theirs, ours)
    in_chans = getattr(encoder, "in_chans", None)
    if meta.get("in_chans") and in_chans and int(meta["in_chans"]) != int(in_chans):
        log.info("%s was trained on %s-channel input, the encoder takes %s", where, meta["in_chans"],
                 in_chans)


def _mismatch_message(report: LoadReport, arch: str | None) -> str:
    parts = [
        f"checkpoint {report.source} does not fit encoder {report.name!r}"
        + (f" ({arch})" if arch else "")
        + f": {len(report.loaded)} tensors fit"
    ]
    for label in ("missing", "unexpected", "shape_mismatch"):
        keys = getattr(report, label)
        if keys:
            parts.append(f"{len(keys)} {label.replace('_', ' ')} (e.g. {_examples(keys)})")
    return (
        "; ".join(parts)
        + ". Check that the checkpoint was made for this architecture; to load the tensors that fit "
        "and keep the rest initialised, pass allow_mismatch=True."
    )


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _examples(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_EXAMPLES])
    return shown + (f", ... (+{len(keys) - _EXAMPLES})" if len(keys) > _EXAMPLES else "")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
