"""CS-UNet: a CNN and a Swin Transformer encoder feeding one Swin-UNet-style decoder; and Swin-UNet.

Papers: K. Alrfou, T. Zhao, A. Kordijazi, "CS-UNet: A Generalizable and Flexible Segmentation
Algorithm" (arXiv 2308.13917); H. Cao et al., "Swin-Unet" (arXiv 2105.05537). Architecture from
the CS-UNet authors' released code (see DESIGN.md section 3), rebuilt on timm's Swin stages.

Shapes for a 512 x 512 input, embed 96, window 8, ResNet-50 (NHWC tokens):
    swin skips 128²x96, 64²x192, 32²x384; bottleneck (last stage + norm) 16²x768; CNN C1..C4
    D0: concat(bottleneck, C4) -> PatchExpand (Linear 2816->1536, 2x)          -> 32²x384
    D1: concat(D0, skip 2, C3) -> Linear 1792->384 -> Swin blocks -> 2x expand -> 64²x192
    D2: concat(D1, skip 1, C2) -> Linear  896->192 -> Swin blocks -> 2x expand -> 128²x96
    D3: concat(D2, skip 0, C1) -> Linear  448->96  -> Swin blocks              -> 128²x96
    head: LayerNorm -> 4x PatchExpand -> 1x1 conv (no bias)                      -> K x 512²
Swin-UNet is the same model without the CNN branch (each fusion concatenates stream and skip).
The decoder (`CSUNetDecoder`, `DecoderStage`) is in `_swin_decoder.py`.

Any input size: the input is padded (bottom/right) to `model.pad_multiple`, the least multiple
that makes every stage's feature map an exact multiple of its window wherever windows are shifted,
so timm's per-forward (`dynamic_mask`) shifted-window masks are exact, and the logits are cropped
back. timm pads feature maps to the window inside a block itself, but it rolls before padding, so
its shift mask would then mix rows from opposite borders; we never let that happen.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn
from timm.models import checkpoint_seq

from ._cnn import TimmCNNEncoder
from ._layers import check_input, check_model_args, lcm, pad_to_multiple, to_config
from ._registry import register_variant
from ._swin_encoder import SWIN_INTERMEDIATE, SWIN_LITE, SWIN_ORIGINAL, SWIN_TEST, SwinSpec, create_swin
from ._swin_decoder import CSUNetDecoder, _mirror_block

__all__ = ["CSUNet"]

_logger = logging.getLogger(__name__)


class CSUNet(nn.Module):
    """CS-UNet (with `cnn_name`) or Swin-UNet (`cnn_name=None`) on timm encoders.

    Args:
        num_classes: output channels.
        in_chans: input channels (both encoders get them).
        img_size: training crop size; fixes which Swin stages use shifted windows (timm disables
            the shift in a stage whose feature map is no larger than its window).
        decoder_window_size: decoder window size (None: the Swin's `window_size`).
        cnn_name: timm CNN for the CNN branch (features at strides patch*2^i); None for Swin-UNet.
        cnn_kwargs: extra `timm.create_model` arguments for the CNN.
        pad_mode: "constant" (zeros), "reflect" or "replicate", for inputs that need padding.
        **swin: the Swin encoder, `SwinSpec` fields (patch_size, embed_dim, depths, num_heads, window_size,
            mlp_ratio, qkv_bias, drop_path_rate, proj_drop_rate, attn_drop_rate, swin_name); the decoder
            mirrors depths and heads, and its stages reuse the drop-path rates of the stages they mirror.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_chans: int = 1,
        img_size: int = 512,
        decoder_window_size: int | None = None,
        cnn_name: str | None = "resnet50",
        cnn_kwargs: dict[str, Any] | None = None,
        pad_mode: str = "constant",
        **swin: Any,
    ):
        super().__init__()
        spec = SwinSpec.pop_from(swin)
        if swin:
            raise TypeError(f"CSUNet got unexpected keyword argument(s) {sorted(swin)}")
        check_model_args(num_classes, in_chans, img_size, pad_mode)
        if decoder_window_size is not None and (not isinstance(decoder_window_size, int) or decoder_window_size < 1):
            raise ValueError(f"decoder_window_size must be a positive int or None, got {decoder_window_size!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.pad_mode = pad_mode
        self.config: dict[str, Any] = {}  # filled by the registered entry point
        self._swin_spec = spec.timm_spec(in_chans, img_size)
        self.swin = create_swin(self._swin_spec)
        strides = [int(info["reduction"]) for info in self.swin.feature_info]
        self.cnn = None
        if cnn_name is not None:
            self.cnn = TimmCNNEncoder(cnn_name, in_chans, strides=strides, **(cnn_kwargs or {}))
        cnn_channels = self.cnn.channels if self.cnn is not None else [0] * len(strides)
        self.decoder = CSUNetDecoder(
            self.swin, cnn_channels, num_classes, decoder_window_size or spec.window_size,
            proj_drop=spec.proj_drop_rate, attn_drop=spec.attn_drop_rate,
        )
        self.pad_multiple = self._pad_multiple(strides)

    def _pad_multiple(self, strides: Sequence[int]) -> int:
        """Least input multiple: the largest stride, and stride x window for every shifted stage."""
        stages = [(i, stage.blocks) for i, stage in enumerate(self.swin.layers)]
        stages += [(s.level, s.swin.blocks) for s in self.decoder.stages]
        need = [strides[-1]]
        for level, blocks in stages:
            for block in blocks:
                if any(block.shift_size):
                    need += [strides[level] * w for w in block.window_size]
        return lcm(need)

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """Branch name -> full timm model (timm key names), where encoder weights are loaded."""
        out: dict[str, nn.Module] = {"swin": self.swin}
        if self.cnn is not None:
            out["cnn"] = self.cnn.model
        return out

    @property
    def encoder_specs(self) -> dict[str, dict[str, Any]]:
        """Branch -> `{"timm_name", "timm_kwargs"}` (plain JSON) rebuilding it with `timm.create_model`."""
        specs = {"swin": self._swin_spec}
        if self.cnn is not None:
            specs["cnn"] = self.cnn.spec
        return to_config(specs)

    def forward_swin(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Swin skips (NHWC tokens entering each stage's blocks, all but the last) and the bottleneck."""
        x = self.swin.patch_embed(x)
        skips = []
        for stage in self.swin.layers:
            x = stage.downsample(x)
            skips.append(x)
            if stage.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage.blocks, x)
            else:
                x = stage.blocks(x)
        return skips[:-1], self.swin.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x H x W (any H, W) -> B x num_classes x H x W logits."""
        check_input(x, self.in_chans, type(self).__name__)
        H, W = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        skips, bottleneck = self.forward_swin(x)
        if self.cnn is not None:
            feats = [f.permute(0, 2, 3, 1) for f in self.cnn(x)]
        else:
            feats = [None] * (len(skips) + 1)
        logits = self.decoder(bottleneck, skips, feats)
        return logits[..., :H, :W]

    @torch.no_grad()
    def init_decoder_from_encoder(self) -> list[str]:
        """Copy each encoder stage's Swin blocks into the decoder stage mirroring it (the paper's transfer).

        Tensors of equal shape are copied, relative-position tables are resized when the decoder
        window differs, anything else is skipped. Returns (and logs) one line per decoder tensor.
        Call it after loading the encoder weights.
        """
        lines: list[str] = []
        counts = {"loaded": 0, "resized": 0, "skipped": 0}
        for k, stage in enumerate(self.decoder.stages):
            enc_blocks = self.swin.layers[stage.level].blocks
            for j, block in enumerate(stage.swin.blocks):
                source = enc_blocks[j] if j < len(enc_blocks) else None
                src_prefix = f"swin.layers.{stage.level}.blocks.{j}"
                for status, line in _mirror_block(block, source, f"decoder.stages.{k}.swin.blocks.{j}", src_prefix):
                    counts[status] += 1
                    lines.append(line)
                    _logger.info("mirror init: %s", line)
        _logger.info("mirror init: %(loaded)d loaded, %(resized)d resized, %(skipped)d skipped", counts)
        return lines

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in the Swin encoder, the CNN and the decoder's Swin stages."""
        self.swin.set_grad_checkpointing(enable)
        if self.cnn is not None:
            self.cnn.model.set_grad_checkpointing(enable)
        for stage in self.decoder.stages:
            stage.swin.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative-position tables, excluded from weight decay as in timm's Swin."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


# The paper-faithful presets, under their first names and (issue 14) under explicit `cs_unet_paper*` names beside
# `cs_unet_hybrid*` (cs_unet_hybrid.py); Swin-UNet is the same model without the CNN branch.
_VARIANTS = {
    "cs_unet": (dict(SWIN_ORIGINAL, cnn_name="resnet50"),
                "CS-UNet, paper \"original\": Swin-T depths (2,2,6,2), window 8, 512 crops, ResNet-50."),
    "cs_unet_intermediate": (dict(SWIN_INTERMEDIATE, cnn_name="resnet50"),
                             "CS-UNet, paper \"intermediate\": Swin depths (2,2,2,2), window 8, 512 crops, ResNet-50."),
    "cs_unet_lite": (dict(SWIN_LITE, cnn_name="resnet18"), "CS-UNet for small GPUs/CPU: Swin embed 48 (head dim 24), "
                     "depths (2,2,2,2), 256 crops, ResNet-18."),
    "cs_unet_test": (dict(SWIN_TEST, cnn_name="test_resnet"), "Tiny CS-UNet for tests: Swin embed 24, window 4, "
                     "timm `test_resnet`."),
    "cs_unet_paper": (dict(SWIN_ORIGINAL, cnn_name="resnet50"), "Alias of `cs_unet`: the paper's \"original\" "
                      "CS-UNet (Swin-UNet decoder, 4x patch-expand output)."),
    "cs_unet_paper_intermediate": (dict(SWIN_INTERMEDIATE, cnn_name="resnet50"), "Alias of `cs_unet_intermediate`."),
    "cs_unet_paper_lite": (dict(SWIN_LITE, cnn_name="resnet18"), "Alias of `cs_unet_lite`."),
    "swin_unet": (dict(SWIN_ORIGINAL, cnn_name=None),
                  "Swin-UNet (CS-UNet's decoder, no CNN branch) with the cs_unet Swin encoder."),
    "swin_unet_lite": (dict(SWIN_LITE, cnn_name=None), "Swin-UNet with the cs_unet_lite Swin encoder."),
    "swin_unet_test": (dict(SWIN_TEST, cnn_name=None), "Tiny Swin-UNet for tests."),
}
for _name, (_defaults, _doc) in _VARIANTS.items():
    register_variant(_name, CSUNet, _defaults, _doc)
