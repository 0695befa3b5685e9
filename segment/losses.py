"""Segmentation losses, built from segmentation-models-pytorch's implementations.

Losses are computed in fp32 whatever the autocast dtype: Dice sums over many pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from segment.config import Loss


class DiceCE(nn.Module):
    """Soft multi-class Dice (on softmax probabilities) + cross-entropy, equally weighted."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(mode="multiclass", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return F.cross_entropy(logits, target) + self.dice(logits, target)


class CE(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target)


class NasaBCEDice(nn.Module):
    """NASA's recipe: 0.7 * BCE + 0.3 * Dice on one-hot targets with per-class sigmoids."""

    def __init__(self, bce_weight: float = 0.7, dice_weight: float = 0.3) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.dice = DiceLoss(mode="multilabel", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
        bce = F.binary_cross_entropy_with_logits(logits, onehot)
        return self.bce_weight * bce + self.dice_weight * self.dice(logits, onehot)


def build_loss(kind: Loss | str) -> nn.Module:
    kind = Loss(kind)
    return {Loss.dice_ce: DiceCE, Loss.bce_dice: NasaBCEDice, Loss.ce: CE}[kind]()
