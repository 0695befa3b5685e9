"""DINO: self-distillation with no labels (Caron et al., "Emerging Properties in Self-Supervised
Vision Transformers", ICCV 2021, arXiv:2104.14294).

The student sees 2 global + N local crops, the EMA teacher only the globals; the student matches the
teacher's centred, sharpened distribution over ``out_dim`` prototypes (lightly ``DINOLoss``, whose
centre is a buffer saved with the checkpoint state). The teacher temperature comes from the
schedule (``teacher_temp=`` in ``forward``), not from lightly's epoch-based compatibility path.
The head's weight-normalised output layer is returned by ``last_layer_parameters`` so the loop can
freeze it with lr 0 (``freeze_last_layer_steps``), which is DeepSpeed-safe.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from torch import Tensor, nn

from pretrain.methods.base import Batch, SSLMethod

__all__ = ["DINO"]


class DINO(SSLMethod):
    """DINO with lightly's ``DINOProjectionHead`` and ``DINOLoss``.

    Args:
        encoder, spec: from ``pretrain.encoders.build_encoder``.
        out_dim: prototypes K (65536 in the paper; 4096 suits small data sets).
        hidden_dim, bottleneck_dim: head MLP widths.
        batch_norm_head: BatchNorm in the head MLP (the paper's ResNet option; off for Swin).
        norm_last_layer: keep the output layer's weight norm fixed at 1 (more stable).
        num_global_views: leading views the teacher sees; the rest are local crops.
        student_temp: student softmax temperature.
        center_momentum: EMA momentum of the teacher-output centre.
        teacher_temp: teacher temperature used when ``forward`` gets none.
    """

    name = "dino"
    uses_teacher = True
    teacher_heads = ("head",)
    schedule_defaults = MappingProxyType({
        "momentum": 0.996, "momentum_end": 1.0, "weight_decay": 0.04, "weight_decay_end": 0.4,
        "teacher_temp_start": 0.04, "teacher_temp": 0.07,
    })

    def __init__(self, encoder: nn.Module, spec: Mapping[str, Any], *, out_dim: int = 4096, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, batch_norm_head: bool = False, norm_last_layer: bool = True,
                 num_global_views: int = 2, student_temp: float = 0.1, center_momentum: float = 0.9,
                 teacher_temp: float = 0.04) -> None:
        if num_global_views < 2:
            raise ValueError(f"DINO needs at least 2 global views, got num_global_views={num_global_views}")
        super().__init__(encoder, spec, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                         batch_norm_head=batch_norm_head, norm_last_layer=norm_last_layer)
        self.num_global_views, self.teacher_temp = num_global_views, teacher_temp
        self.criterion = DINOLoss(
            output_dim=out_dim, teacher_temp=teacher_temp, warmup_teacher_temp=teacher_temp,
            student_temp=student_temp, center_momentum=center_momentum,
        )

    def build_heads(self) -> dict[str, nn.Module]:
        with warnings.catch_warnings():  # lightly's head uses the deprecated nn.utils.weight_norm
            warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
            head = DINOProjectionHead(
                input_dim=self.num_features, hidden_dim=self.hidden_dim, bottleneck_dim=self.bottleneck_dim,
                output_dim=self.out_dim, batch_norm=self.batch_norm_head, norm_last_layer=self.norm_last_layer,
            )
        return {"head": head}

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return list(self.student["head"].last_layer.parameters())

    def compute(
        self, views: list[Tensor], batch: Batch, step: int, teacher_temp: float | None
    ) -> dict[str, Tensor]:
        if len(views) < self.num_global_views:
            raise ValueError(f"DINO needs {self.num_global_views} global views first, got {len(views)} views")
        temp = self.teacher_temp if teacher_temp is None else float(teacher_temp)
        teacher_out = [o["head"].float() for o in self.run_teacher(views[: self.num_global_views])]
        with torch.no_grad():  # collapse monitor: entropy of the mean teacher distribution (at most log K)
            probs = torch.softmax((torch.stack(teacher_out) - self.criterion.center) / temp, dim=-1).mean((0, 1))
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        student_out = [o["head"].float() for o in self.run_student(views)]
        loss = self.criterion(teacher_out, student_out, teacher_temp=temp)  # also updates the centre
        return {"loss": loss, "teacher_temp": loss.new_tensor(temp), "teacher_entropy": entropy}
