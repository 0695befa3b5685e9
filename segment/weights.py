"""Encoder weights: load checkpoints (read by :mod:`segment.weight_formats`) into timm encoders.

:func:`load_encoder_weights` reads a checkpoint (:func:`segment.weight_formats.read_checkpoint`),
converts the state dict to the encoder's layout with timm's own machinery (the family's
``checkpoint_filter_fn``, ``adapt_input_conv``), drops classifier heads, and returns a
:class:`LoadReport`; anything else that does not fit raises :class:`WeightsMismatchError` unless
``allow_mismatch=True``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timm.models import adapt_input_conv, get_model_traits, model_entrypoint
from torch import Tensor, nn

from pretrain.export import feature_info
from segment.weight_formats import _examples, read_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "LoadReport",
    "WeightsMismatchError",
    "load_encoder_weights",
    "load_model_encoders",
]


#: Generic classifier prefixes, in addition to ``pretrained_cfg["classifier"]``.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.")
#: Buffers without weight content: silently skipped when absent or superfluous.
_BENIGN_SUFFIXES = ("num_batches_tracked",)


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
