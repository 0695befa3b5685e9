"""U-Net and U-Net++ with segmentation-models-pytorch decoders on a full timm CNN.

The decoder and head are smp's own (`UnetDecoder` / `UnetPlusPlusDecoder`, `SegmentationHead`,
smp's initialisation); only the encoder differs from `smp.Unet("tu-...")`: a whole timm model
(`model.encoders["cnn"]`, timm key names) instead of timm's `features_only` wrapper, so the same
encoder state dict loads into CS-UNet and these models identically. smp's feature list is
[input, stride 2, 4, 8, 16, 32]; a CNN without a stride-2 feature (ConvNeXt) gets a 0-channel one,
as smp does for such encoders.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.base.initialization import initialize_decoder, initialize_head
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from segmentation_models_pytorch.decoders.unetplusplus.decoder import UnetPlusPlusDecoder

from ._cnn import TimmCNNEncoder
from ._layers import check_input, check_model_args, pad_to_multiple
from ._registry import register_variant

__all__ = ["TimmUnet", "build_decoder"]

_DECODERS = {"unet": UnetDecoder, "unetplusplus": UnetPlusPlusDecoder}
_STRIDES = (2, 4, 8, 16, 32)


def build_decoder(kind: str, in_chans: int, cnn_channels: Sequence[int], decoder_channels: Sequence[int],
                  num_classes: int, *, use_norm: bool | str | dict[str, Any] = "batchnorm",
                  attention_type: str | None = None, interpolation: str = "nearest") -> tuple[nn.Module, nn.Module]:
    """smp's U-Net (``kind="unet"``) or U-Net++ decoder over ``[input, *cnn_channels]`` features and its
    3x3 head, with smp's initialisation: the one decoder of ``TimmUnet`` and ``CSUNetHybrid``."""
    if len(decoder_channels) != len(_STRIDES):
        raise ValueError(f"decoder_channels needs {len(_STRIDES)} entries, got {list(decoder_channels)}")
    decoder = _DECODERS[kind](
        encoder_channels=[in_chans, *cnn_channels],
        decoder_channels=decoder_channels,
        n_blocks=len(_STRIDES),
        use_norm=use_norm,
        attention_type=attention_type,
        interpolation_mode=interpolation,
    )
    head = SegmentationHead(decoder_channels[-1], num_classes, kernel_size=3)
    initialize_decoder(decoder)
    initialize_head(head)
    return decoder, head


def unet_parts(cnn_name: str, in_chans: int, num_classes: int, *, cnn_kwargs: dict[str, Any] | None = None,
               decoder: str = "unet", decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
               use_norm: bool | str | dict[str, Any] = "batchnorm", attention_type: str | None = None,
               interpolation: str = "nearest") -> tuple[TimmCNNEncoder, nn.Module, nn.Module]:
    """``(cnn, decoder, head)`` of a U-Net on a timm CNN with features at strides (2,) 4 .. 32, built in
    this order (so two models built from the same seed get the same weights: the CS-UNet hybrid's UNet
    part is this one)."""
    cnn = TimmCNNEncoder(cnn_name, in_chans, strides=_STRIDES, optional_strides=(2,), **(cnn_kwargs or {}))
    dec, head = build_decoder(decoder, in_chans, cnn.channels, decoder_channels, num_classes,
                              use_norm=use_norm, attention_type=attention_type, interpolation=interpolation)
    return cnn, dec, head


class TimmUnet(nn.Module):
    """smp U-Net / U-Net++ decoder on a full timm CNN; any input size (padded to 32, cropped back).

    Args:
        num_classes: output channels.
        in_chans: input channels.
        img_size: recorded in the config only (a CNN needs no fixed size).
        cnn_name: timm CNN with features at strides 4, 8, 16, 32 (and optionally 2).
        cnn_kwargs: extra `timm.create_model` arguments for the CNN.
        decoder: "unet" or "unetplusplus".
        decoder_channels: five decoder widths, deepest first (smp's `decoder_channels`).
        decoder_use_norm, decoder_attention_type, decoder_interpolation: as in smp.
        pad_mode: "constant" (zeros), "reflect" or "replicate", for inputs that need padding.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_chans: int = 1,
        img_size: int = 256,
        cnn_name: str = "resnet50",
        cnn_kwargs: dict[str, Any] | None = None,
        decoder: str = "unet",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        decoder_use_norm: bool | str | dict[str, Any] = "batchnorm",
        decoder_attention_type: str | None = None,
        decoder_interpolation: str = "nearest",
        pad_mode: str = "constant",
    ):
        super().__init__()
        check_model_args(num_classes, in_chans, img_size, pad_mode)
        if decoder not in _DECODERS:
            raise ValueError(f"decoder must be one of {sorted(_DECODERS)}, got {decoder!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pad_mode = pad_mode
        self.decoder_channels = tuple(decoder_channels)
        self.decoder_use_norm = decoder_use_norm
        self.config: dict[str, Any] = {}  # filled by the registered entry point
        self.cnn, self.decoder, self.segmentation_head = unet_parts(
            cnn_name, in_chans, num_classes, cnn_kwargs=cnn_kwargs, decoder=decoder, decoder_channels=decoder_channels,
            use_norm=decoder_use_norm, attention_type=decoder_attention_type, interpolation=decoder_interpolation)
        self.pad_multiple = _STRIDES[-1]

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """`{"cnn": full timm model}`, where encoder weights are loaded."""
        return {"cnn": self.cnn.model}

    @property
    def encoder_specs(self) -> dict[str, dict[str, Any]]:
        """`{"cnn": {"timm_name", "timm_kwargs"}}` rebuilding the CNN with `timm.create_model`."""
        return {"cnn": self.cnn.spec}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x H x W (any H, W) -> B x num_classes x H x W logits."""
        check_input(x, self.in_chans, type(self).__name__)
        H, W = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        logits = self.segmentation_head(self.decoder([x, *self.cnn(x)]))
        return logits[..., :H, :W]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in the timm CNN (where timm supports it)."""
        self.cnn.model.set_grad_checkpointing(enable)


_TEST_DECODER = (32, 16, 16, 8, 8)
_VARIANTS = {
    "unet": (dict(cnn_name="resnet50", decoder="unet"), "U-Net (smp decoder 256..16) on timm ResNet-50."),
    "unet_lite": (dict(cnn_name="resnet18", decoder="unet"), "U-Net on timm ResNet-18."),
    "unet_test": (dict(cnn_name="test_resnet", decoder="unet", decoder_channels=_TEST_DECODER),
                  "Tiny U-Net for tests (timm `test_resnet`, narrow decoder)."),
    "unetplusplus": (dict(cnn_name="resnet50", decoder="unetplusplus"),
                     "U-Net++ (smp decoder 256..16) on timm ResNet-50."),
    "unetplusplus_lite": (dict(cnn_name="resnet18", decoder="unetplusplus"), "U-Net++ on timm ResNet-18."),
    "unetplusplus_test": (dict(cnn_name="test_resnet", decoder="unetplusplus", decoder_channels=_TEST_DECODER),
                          "Tiny U-Net++ for tests (timm `test_resnet`, narrow decoder)."),
}
for _name, (_defaults, _doc) in _VARIANTS.items():
    register_variant(_name, TimmUnet, _defaults, _doc)
