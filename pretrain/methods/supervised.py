"""Supervised pretraining on material labels (as NASA's MicroNet encoders were trained: Stuckner et
al., "Microstructure segmentation with deep learning encoders pre-trained on a large microscopy
dataset", npj Comput. Mater. 2022).

A linear classifier over the pooled features, cross-entropy over every view of the batch; the
baseline the self-supervised methods are compared against. No teacher: the student backbone is
exported.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.methods.base import Batch, SSLMethod

__all__ = ["Supervised"]


class Supervised(SSLMethod):
    """Supervised classification of material classes.

    Args:
        encoder, spec: from ``pretrain.encoders.build_encoder``.
        num_classes: number of material classes (required).
        label_smoothing: cross-entropy label smoothing.
    """

    name = "supervised"
    requires_labels = True
    min_views = 1
    schedule_defaults = MappingProxyType({"weight_decay": 0.05, "weight_decay_end": 0.05})

    def __init__(
        self, encoder: nn.Module, spec: Mapping[str, Any], *, num_classes: int | None = None, label_smoothing: float = 0.0
    ) -> None:
        if num_classes is None or num_classes < 2:
            raise ValueError(f"supervised pretraining needs num_classes >= 2, got {num_classes}")
        super().__init__(encoder, spec, num_classes=int(num_classes))
        self.label_smoothing = label_smoothing

    def build_heads(self) -> dict[str, nn.Module]:
        return {"classifier": nn.Linear(self.num_features, self.num_classes)}

    def compute(
        self, views: list[Tensor], batch: Batch, step: int, teacher_temp: float | None
    ) -> dict[str, Tensor]:
        label = torch.as_tensor(batch["label"]).long()
        logits = torch.cat([o["classifier"].float() for o in self.run_student(views)])
        target = label.to(logits.device).repeat(len(views))
        loss = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy}
