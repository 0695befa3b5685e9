"""MoCo v3 (Chen, Xie & He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021, arXiv:2104.02057).

The query encoder (backbone + projection + prediction MLPs, BatchNorm in every layer) predicts the
momentum encoder's projection of the other view; symmetric InfoNCE with the keys of every rank as
negatives (lightly ``NTXentLoss(gather_distributed=True)``, no memory bank), as in lightly's
MoCo v3 benchmark.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from torch import Tensor, nn

from pretrain.methods.base import Batch, SSLMethod

__all__ = ["MoCoV3"]


class MoCoV3(SSLMethod):
    """MoCo v3.

    Args:
        encoder, spec: from ``pretrain.encoders.build_encoder``.
        hidden_dim, out_dim: MLP hidden and output widths (4096 / 256 in the paper).
        num_proj_layers: projection MLP depth (3 in the paper; its ResNet code uses 2).
        temperature: InfoNCE temperature (0.2 for ViT in the paper; 1.0 in its ResNet code).
    """

    name = "mocov3"
    uses_teacher = True
    teacher_heads = ("projection",)
    schedule_defaults = MappingProxyType({"momentum": 0.99, "momentum_end": 1.0, "weight_decay": 0.1, "weight_decay_end": 0.1})

    def __init__(self, encoder: nn.Module, spec: Mapping[str, Any], *, hidden_dim: int = 4096, out_dim: int = 256,
                 num_proj_layers: int = 3, temperature: float = 0.2) -> None:
        super().__init__(encoder, spec, hidden_dim=hidden_dim, out_dim=out_dim, num_proj_layers=num_proj_layers)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=0, gather_distributed=True)

    def build_heads(self) -> dict[str, nn.Module]:
        return {
            "projection": MoCoProjectionHead(
                self.num_features, self.hidden_dim, self.out_dim, num_layers=self.num_proj_layers, batch_norm=True
            ),
            "prediction": MoCoProjectionHead(self.out_dim, self.hidden_dim, self.out_dim, num_layers=2, batch_norm=True),
        }

    def compute(
        self, views: list[Tensor], batch: Batch, step: int, teacher_temp: float | None
    ) -> dict[str, Tensor]:
        return {"loss": self._cross_view_loss(views)}
