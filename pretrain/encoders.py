"""Encoder backbones for pretraining: headless timm models plus the spec that rebuilds them.

``build_encoder`` returns a timm model with ``num_classes=0`` (forward gives pooled features of
width ``encoder.num_features``) and a JSON-friendly spec; ``timm.create_model(spec["timm_name"],
num_classes=0, **spec["timm_kwargs"])`` rebuilds the same architecture, which is what the export
(``encoder.json``) and the segmentation side rely on.

Swin is built at the largest training crop with ``strict_img_size=False``: timm 1.0 then accepts
smaller inputs (multi-crop local views) by padding to the window and building shifted-window masks
per forward. Window and shift are fixed at construction from ``img_size``: a stage whose feature
map is no larger than the window uses the whole map as its window and no shift (e.g. window 8 at
``img_size=224`` gives a 7x7 last stage). With patch 4 and window 8, ``img_size=256`` keeps window 8
in every stage, as CS-UNet has at 512; the presets use it.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

__all__ = ["ENCODER_PRESETS", "build_encoder", "list_encoders"]

logger = logging.getLogger(__name__)

_SWIN = "swin_tiny_patch4_window7_224"  # entry point only; every architecture argument is overridden

ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # Same Swin as segment's cs_unet_lite / swin_unet_lite encoder (patch 4, window 8).
    "swin_lite": {
        "timm_name": _SWIN,
        "timm_kwargs": dict(embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=8, img_size=256),
    },
    # Swin-T (Liu et al., ICCV 2021): the original uses window 7 at 224; window 8 matches CS-UNet,
    # and timm's checkpoint filter resizes the relative-position tables of window-7 weights.
    "swin_t": {
        "timm_name": _SWIN,
        "timm_kwargs": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8, img_size=256),
    },
    "resnet18": {"timm_name": "resnet18", "timm_kwargs": {}},
    "resnet50": {"timm_name": "resnet50", "timm_kwargs": {}},
    # Tiny variants for tests (~0.3-0.5 M parameters).
    "swin_test": {
        "timm_name": _SWIN,
        "timm_kwargs": dict(embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4, img_size=64),
    },
    "resnet_test": {
        "timm_name": "resnet18",
        "timm_kwargs": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16),
    },
}

# Families whose architecture depends on the input size: the kwargs that let them run other sizes.
_SIZE_AWARE: dict[str, dict[str, Any]] = {
    "swin_transformer": {"strict_img_size": False},
}
# Keys about where weights come from, not what the architecture is: passed on, never put in the spec.
_WEIGHT_SOURCE_KEYS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
_FORBIDDEN_KEYS = ("num_classes", "features_only", "out_indices")


def list_encoders() -> list[str]:
    """Names of the encoder presets."""
    return sorted(ENCODER_PRESETS)


def build_encoder(
    timm_name: str,
    *,
    in_chans: int = 1,
    img_size: int | None = None,
    **timm_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a headless timm encoder returning pooled features, and its rebuild spec.

    Args:
        timm_name: a preset from ``ENCODER_PRESETS`` or any timm model name.
        in_chans: input channels (1 for gray micrographs).
        img_size: largest training crop, for size-aware families (Swin); ignored by CNNs.
            None keeps the preset's (or timm's) default.
        **timm_kwargs: further ``timm.create_model`` arguments; they override a preset's.

    Returns:
        ``(encoder, spec)``: spec holds ``timm_name`` and ``timm_kwargs`` (everything
        ``timm.create_model(timm_name, num_classes=0, **timm_kwargs)`` needs, incl. ``in_chans`` and
        ``img_size``), plus ``preset``, ``num_features``, ``feature_channels`` and
        ``feature_strides``.
    """
    preset = ENCODER_PRESETS.get(timm_name)
    name = preset["timm_name"] if preset else timm_name
    kwargs: dict[str, Any] = {**(preset["timm_kwargs"] if preset else {}), **timm_kwargs}
    bad = [k for k in _FORBIDDEN_KEYS if k in kwargs]
    if bad:
        raise ValueError(f"build_encoder builds headless pooled encoders; do not pass {bad}")
    source = {k: kwargs.pop(k) for k in _WEIGHT_SOURCE_KEYS if k in kwargs}
    kwargs["in_chans"] = in_chans

    family = _family(name)
    if family in _SIZE_AWARE:
        for key, value in _SIZE_AWARE[family].items():
            kwargs.setdefault(key, value)
        if img_size is not None:
            kwargs["img_size"] = img_size
    else:
        if img_size is not None:
            logger.debug("%s: img_size=%s not needed by this family, ignored", name, img_size)
        kwargs.pop("img_size", None)

    try:
        encoder = timm.create_model(name, num_classes=0, **source, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown encoder {timm_name!r}: not a preset ({list_encoders()}) nor a timm model") from err
        raise

    info = list(getattr(encoder, "feature_info", []) or [])
    spec: dict[str, Any] = {
        "timm_name": name,
        "timm_kwargs": _jsonable(kwargs),
        "preset": timm_name if preset else None,
        "num_features": int(encoder.num_features),
        "feature_channels": [int(i["num_chs"]) for i in info],
        "feature_strides": [int(i["reduction"]) for i in info],
    }
    if family == "swin_transformer":
        windows = [list(stage.blocks[0].window_size) for stage in encoder.layers]
        logger.info("%s: Swin windows per stage %s at img_size %s", name, windows, kwargs.get("img_size", "default"))
    n_params = sum(p.numel() for p in encoder.parameters())
    logger.info("built encoder %s (%s): %d features, %.2f M parameters", timm_name, name, spec["num_features"], n_params / 1e6)
    return encoder, spec


def _family(name: str) -> str | None:
    """The timm module a model name belongs to (e.g. ``swin_transformer``), None if unknown."""
    for family in _SIZE_AWARE:
        if timm.models.is_model_in_modules(name, [family]):
            return family
    return None


def _jsonable(value: Any) -> Any:
    """Tuples to lists, recursively, so the spec survives a JSON round trip unchanged."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
