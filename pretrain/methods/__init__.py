"""Pretraining methods behind one interface (:class:`~pretrain.methods.base.SSLMethod`).

``METHODS`` maps a config name to its class (lightly's benchmark dispatch table);
``create_method(name, encoder, spec, **cfg)`` builds one::

    encoder, spec = build_encoder("swin_lite", in_chans=1, img_size=224)
    method = create_method("dino", encoder, spec, out_dim=4096)
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from pretrain.methods.base import Batch, CheckpointState, MultiViewNet, SSLMethod
from pretrain.methods.byol import BYOL
from pretrain.methods.dino import DINO
from pretrain.methods.mocov3 import MoCoV3
from pretrain.methods.simclr import SimCLR
from pretrain.methods.supervised import Supervised

__all__ = [
    "BYOL", "DINO", "METHODS", "Batch", "CheckpointState", "MoCoV3", "MultiViewNet", "SSLMethod", "SimCLR",
    "Supervised", "create_method", "list_methods",
]

METHODS: dict[str, type[SSLMethod]] = {
    "dino": DINO,
    "mocov3": MoCoV3,
    "simclr": SimCLR,
    "byol": BYOL,
    "supervised": Supervised,
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def create_method(name: str, encoder: nn.Module, spec: Mapping[str, Any], **cfg: Any) -> SSLMethod:
    """Build the method ``name`` around ``encoder``; ``cfg`` are its keyword hyperparameters."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pretraining method {name!r}; choose one of {list_methods()}") from None
    params = inspect.signature(cls.__init__).parameters
    valid = sorted(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"unknown options {unknown} for method {name!r}; valid options: {valid}")
    return cls(encoder, spec, **cfg)
