"""Fine-tuning model: the network of a config, its pretrained encoders (checked against the data's
intensity scaling) and the optimizer's parameter groups."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from pretrain.export import ENCODER_META
from pretrain.intensity import canonical_intensity
from segment.config import FinetuneConfig
from segment.models import create_model
from segment.weights import load_model_encoders

log = logging.getLogger(__name__)


def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict]:
    kwargs = dict(num_classes=num_classes, in_chans=cfg.data.in_chans, img_size=cfg.data.crop_size)
    kwargs.update(OmegaConf.to_container(cfg.model.kwargs) if OmegaConf.is_config(cfg.model.kwargs) else cfg.model.kwargs)
    model = create_model(cfg.model.name, **kwargs)
    if cfg.model.encoder_weights:
        for branch, source in dict(cfg.model.encoder_weights).items():
            check_encoder_intensity(branch, source, cfg.data.intensity)
        load_model_encoders(model, dict(cfg.model.encoder_weights), allow_mismatch=cfg.model.allow_mismatch)
    if cfg.model.init_decoder:
        if not hasattr(model, "init_decoder_from_encoder"):
            raise ValueError(f"model.init_decoder=true but {cfg.model.name} has no Swin decoder to initialise")
        model.init_decoder_from_encoder()
    return model, kwargs


def export_intensity(source: str | os.PathLike[str]) -> str | None:
    """The ``intensity`` recorded in the pretrain export json beside ``source`` (an export folder or
    its ``encoder.safetensors``), or None when there is none (other checkpoint formats, URLs)."""
    path = Path(source).expanduser()
    if path.is_dir():
        meta_path = path / ENCODER_META
    elif path.suffix == ".safetensors":
        meta_path = path.with_suffix(".json")
    else:
        return None
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_checkpoint reports a broken export when loading the weights
    value = meta.get("intensity") if isinstance(meta, dict) else None
    return str(value) if value is not None else None


def check_encoder_intensity(branch: str, source: str | os.PathLike[str], intensity: str) -> bool:
    """Warn when a pretrain export was trained on intensities scaled unlike ``data.intensity``;
    True when they agree or the export does not say."""
    recorded = export_intensity(source)
    if recorded is None:
        return True
    try:
        same = canonical_intensity(recorded) == canonical_intensity(intensity)
    except ValueError:
        same = False
    if not same:
        log.warning("encoder %r from %s was pretrained with intensity %r but data.intensity is %r: the "
                    "encoder sees differently scaled inputs (set data.intensity to match)",
                    branch, source, recorded, intensity)
    return same


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Decoder/encoder x decay/no-decay groups; norms, biases and position tables get no decay."""
    encoder_ids = {id(p) for enc in getattr(model, "encoders", {}).values() for p in enc.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "relative_position" in name or "pos_embed" in name
        groups.setdefault((id(p) in encoder_ids, no_wd), []).append(p)
    o = cfg.optim
    return [
        dict(params=ps, lr=o.lr * (o.encoder_lr_mult if enc else 1.0), weight_decay=0.0 if no_wd else o.weight_decay,
             is_encoder=enc)
        for (enc, no_wd), ps in sorted(groups.items())
    ]
