"""What the pretraining loop hands out of the trained backbone: the k-NN probe (:func:`build_probe`,
run on :func:`probe_backbone`) and the encoder export (:func:`export_backbone`), both collective under
DDP/DeepSpeed (ZeRO-3 partitions are gathered on every rank, read on the main process).
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from pretrain.config import PretrainConfig
from pretrain.corpus import COMPLETE, marker_matches
from pretrain.export import export_encoder
from pretrain.intensity import canonical_intensity
from pretrain.knn import KnnProbe, load_holdout, write_synthetic_holdout
from pretrain.outputs import atomic_write_text

__all__ = ["build_probe", "export_backbone", "probe_backbone"]

log = logging.getLogger(__name__)


def build_probe(cfg: PretrainConfig, out: Path, accelerator):
    """The k-NN probe on rank 0 (None elsewhere, and when ``knn.every`` is 0)."""
    k = cfg.knn
    if k.every == 0:
        return None
    if k.holdout is None:
        root = out / "knn_holdout"
        size = cfg.data.synthetic.size
        params = {"n_per_class": k.synthetic_per_class, "size": size}
        if accelerator.is_main_process and not marker_matches(root / COMPLETE, params):
            write_synthetic_holdout(root, n_per_class=k.synthetic_per_class, size=size)
            atomic_write_text(root / COMPLETE, json.dumps({"params": params}) + "\n")
    else:
        root = Path(k.holdout).expanduser().resolve()
    if not accelerator.is_main_process:
        return None
    holdout = load_holdout(root, crop_size=k.crop_size, img_size=k.img_size or cfg.data.views.global_size,
                           crops_per_image=k.crops_per_image, max_images_per_class=k.max_images_per_class,
                           in_chans=cfg.encoder.in_chans, mean=cfg.data.mean, std=cfg.data.std,
                           intensity=cfg.data.intensity)
    log.info(holdout.summary())
    return KnnProbe(holdout, k=k.k, temperature=k.temperature, batch_size=k.batch_size)


@contextlib.contextmanager
def _readable(module: nn.Module) -> Iterator[nn.Module]:
    """The module with full parameters: ZeRO-3 partitions gathered (collective: every rank enters)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # optional and heavy: only under ZeRO-3, where it is installed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield module
    else:
        yield module


def _plain_backbone(method, spec: Mapping[str, Any], accelerator) -> nn.Module | None:
    """A fresh fp32 timm module holding the backbone to export/probe, on the main process (None
    elsewhere). Collective: ZeRO-3 partitions are gathered on every rank, read on the main process."""
    backbone = method.teacher_backbone()
    state: dict[str, torch.Tensor] = {}
    with _readable(backbone):
        if accelerator.is_main_process:
            for key, value in backbone.state_dict().items():
                value = value.detach().cpu()
                state[key] = value.float().clone() if value.is_floating_point() else value.clone()
    if not accelerator.is_main_process:
        return None
    fresh = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    fresh.load_state_dict(state)
    return fresh


def probe_backbone(method, spec: Mapping[str, Any], accelerator) -> nn.Module | None:
    """What the k-NN probe runs on the main process (collective; None on the other ranks).

    The EMA teacher (DINO, BYOL, MoCo) is a plain module outside DDP/DeepSpeed: probed as it is.
    Teacherless methods (SimCLR, supervised) would probe the trained student's backbone, whose
    forward under ZeRO-3 gathers partitioned parameters with collectives that the other ranks never
    join (a hang), and whose DDP/compile wrappers see extra calls on one rank: the probe then runs on
    a plain fp32 copy instead, so every rank runs the same student forwards (issue 16 item 2)."""
    if method.teacher is not None:
        return method.teacher_backbone()
    plain = _plain_backbone(method, spec, accelerator)
    return plain.to(accelerator.device) if plain is not None else None


def export_backbone(method, spec: Mapping[str, Any], out_dir: Path, *, cfg: PretrainConfig, steps: int,
                    data: str, accelerator, knn: Mapping[str, Any] | None = None) -> None:
    """Export the teacher backbone (the student's for methods without a teacher) with
    :func:`pretrain.export.export_encoder`, as fp32 in a fresh timm model built from ``spec``.

    Collective. Under ZeRO-3 the teacher is a plain module outside the engine, so nothing is
    gathered; a teacherless student is gathered on every rank first. Under bf16 the student's
    tensors are cast to float.
    """
    fresh = _plain_backbone(method, spec, accelerator)
    if accelerator.is_main_process:
        export_encoder(fresh, out_dir, timm_name=spec["timm_name"], timm_kwargs=spec["timm_kwargs"],
                       in_chans=cfg.encoder.in_chans, mean=cfg.data.mean, std=cfg.data.std, intensity=canonical_intensity(cfg.data.intensity),
                       method=cfg.method.name.value, data=data, steps=steps, knn=knn)
    accelerator.wait_for_everyone()
