"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020, arXiv:2006.07733).

The online network (backbone + projection + prediction) predicts the EMA target network's projection
of the other view; symmetric negative cosine similarity (lightly ``NegativeCosineSimilarity``), so the
loss lies in [-1, 1] (the paper's ``2 - 2 cos`` up to an affine map). No negatives, no collectives.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import Tensor, nn

from pretrain.methods.base import Batch, SSLMethod

__all__ = ["BYOL"]


class BYOL(SSLMethod):
    """BYOL.

    Args:
        encoder, spec: from ``pretrain.encoders.build_encoder``.
        hidden_dim, out_dim: projection/prediction MLP widths (4096 / 256 in the paper).
    """

    name = "byol"
    uses_teacher = True
    teacher_heads = ("projection",)
    schedule_defaults = MappingProxyType({"momentum": 0.99, "momentum_end": 1.0, "weight_decay": 1.5e-6, "weight_decay_end": 1.5e-6})

    def __init__(self, encoder: nn.Module, spec: Mapping[str, Any], *, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(encoder, spec, hidden_dim=hidden_dim, out_dim=out_dim)
        self.criterion = NegativeCosineSimilarity()

    def build_heads(self) -> dict[str, nn.Module]:
        return {
            "projection": BYOLProjectionHead(self.num_features, self.hidden_dim, self.out_dim),
            "prediction": BYOLPredictionHead(self.out_dim, self.hidden_dim, self.out_dim),
        }

    def compute(
        self, views: list[Tensor], batch: Batch, step: int, teacher_temp: float | None
    ) -> dict[str, Tensor]:
        return {"loss": self._cross_view_loss(views)}
