"""A full timm CNN used as a multi-scale feature extractor (CS-UNet's CNN branch, the UNets' encoder).

The timm model is kept whole (`timm.create_model(name, num_classes=0, ...)`, timm key names) so that
one encoder state dict loads identically into every model family; features come from timm's
`forward_intermediates`, with indices, channels and strides read from the model's `feature_info`.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import timm
import torch
import torch.nn as nn

from ._layers import to_config

__all__ = ["TimmCNNEncoder"]

_logger = logging.getLogger(__name__)


class TimmCNNEncoder(nn.Module):
    """Features of a timm CNN at the requested output strides.

    Args:
        timm_name: a timm model name with `feature_info` and `forward_intermediates`
            (resnet*, convnext*, efficientnet*, regnet*, ...).
        in_chans: input channels.
        strides: the output strides to return, in increasing order.
        optional_strides: strides that may be missing from the model (e.g. stride 2 for ConvNeXt);
            a missing one is returned as a 0-channel tensor, as smp does for such encoders.
        **timm_kwargs: passed to `timm.create_model` (e.g. `drop_path_rate`).

    `forward(x)` returns one NCHW tensor per stride; `channels` and `strides` describe them.
    Parameters the feature path never uses (a classifier head's norm, EfficientNet's `conv_head`)
    are frozen, so every trainable parameter gets a gradient (DDP needs no `find_unused_parameters`).
    """

    def __init__(
        self,
        timm_name: str,
        in_chans: int,
        strides: Sequence[int] = (4, 8, 16, 32),
        optional_strides: Sequence[int] = (),
        **timm_kwargs: Any,
    ):
        super().__init__()
        if list(strides) != sorted(strides):
            raise ValueError(f"strides must increase, got {list(strides)}")
        self.timm_name = timm_name
        self.timm_kwargs = dict(num_classes=0, in_chans=in_chans, **timm_kwargs)
        self.model = timm.create_model(timm_name, pretrained=False, **self.timm_kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"timm model '{timm_name}' has no forward_intermediates(); pick another CNN")

        by_stride: dict[int, tuple[int, int]] = {}  # stride -> (feature index, channels); last one wins
        for index, info in enumerate(self.model.feature_info):
            by_stride[int(info["reduction"])] = (index, int(info["num_chs"]))
        missing = [s for s in strides if s not in by_stride and s not in optional_strides]
        if missing:
            raise ValueError(
                f"timm model '{timm_name}' has no features at stride(s) {missing}; its feature_info "
                f"strides are {sorted(by_stride)} (is output_stride set?)"
            )
        self.strides = list(strides)
        self.channels = [by_stride[s][1] if s in by_stride else 0 for s in strides]
        self._indices = [by_stride[s][0] for s in strides if s in by_stride]
        self._freeze_unused()

    @property
    def spec(self) -> dict[str, Any]:
        """`{"timm_name", "timm_kwargs"}`: enough to rebuild `self.model` with `timm.create_model`."""
        return {"timm_name": self.timm_name, "timm_kwargs": to_config(self.timm_kwargs)}

    def _freeze_unused(self) -> None:
        """Freeze parameters outside the feature path, found by pruning a meta-device twin."""
        try:
            with torch.device("meta"):
                twin = timm.create_model(self.timm_name, pretrained=False, **self.timm_kwargs)
            twin.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
        except Exception as err:  # a model without pruning support: leave everything trainable
            _logger.warning("could not find unused parameters of %s (%s)", self.timm_name, err)
            return
        used = {name for name, _ in twin.named_parameters()}
        frozen = []
        for name, p in self.model.named_parameters():
            if name not in used:
                p.requires_grad_(False)
                frozen.append(name)
        if frozen:
            _logger.debug("%s: froze %d parameters outside the feature path: %s", self.timm_name, len(frozen), frozen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = iter(self.model.forward_intermediates(
            x, indices=self._indices, stop_early=True, intermediates_only=True
        ))
        B, _, H, W = x.shape
        return [
            next(feats) if c else x.new_zeros(B, 0, H // s, W // s)
            for s, c in zip(self.strides, self.channels)
        ]
