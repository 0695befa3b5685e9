"""SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, arXiv:2002.05709).

One network, two views, NT-Xent over the projections with the negatives of every rank (lightly
``NTXentLoss(gather_distributed=True)``); no teacher, so the student backbone is exported.
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from pretrain.methods.base import Batch, SSLMethod

__all__ = ["SimCLR"]


class SimCLR(SSLMethod):
    """SimCLR.

    Args:
        encoder, spec: from ``pretrain.encoders.build_encoder``.
        hidden_dim, out_dim, num_layers: projection MLP (2048 / 128 / 2 in the paper).
        temperature: NT-Xent temperature (the paper: 0.1 at batch 4096, 0.5 for small batches).
    """

    name = "simclr"
    schedule_defaults = MappingProxyType({"weight_decay": 1e-6, "weight_decay_end": 1e-6})

    def __init__(self, encoder: nn.Module, spec: Mapping[str, Any], *, hidden_dim: int = 2048, out_dim: int = 128,
                 num_layers: int = 2, temperature: float = 0.2) -> None:
        super().__init__(encoder, spec, hidden_dim=hidden_dim, out_dim=out_dim, num_layers=num_layers)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=0, gather_distributed=True)

    def build_heads(self) -> dict[str, nn.Module]:
        return {"projection": SimCLRProjectionHead(self.num_features, self.hidden_dim, self.out_dim, self.num_layers)}

    def compute(
        self, views: list[Tensor], batch: Batch, step: int, teacher_temp: float | None
    ) -> dict[str, Tensor]:
        z0, z1 = (o["projection"].float() for o in self.run_student(self._two_views(views)))
        return {"loss": self.criterion(z0, z1)}
