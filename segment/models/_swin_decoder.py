"""The Swin-UNet decoder of CS-UNet (`cs_unet.py`): decoder stages mirroring timm Swin encoder stages.

Each decoder stage concatenates the upsampled stream, the Swin skip and (CS-UNet) the CNN feature,
fuses them with a Linear, runs Swin blocks sized from the mirrored encoder stage and expands 2x;
`_mirror_block` copies an encoder block's tensors into its decoder twin (the paper's transfer).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import resize_rel_pos_bias_table, trunc_normal_
from timm.models import checkpoint_seq
from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage

from ._layers import PatchExpand

__all__ = ["CSUNetDecoder", "DecoderStage"]


class DecoderStage(nn.Module):
    """One decoder scale: concat(stream, Swin skip, CNN feature) -> Linear -> Swin blocks -> 2x expand.

    `swin` is a timm `SwinTransformerStage` without downsampling; `level` is the encoder stage it
    mirrors (its width, resolution, depth and heads); `out_dim` None means no expansion (last stage).
    """

    def __init__(self, level: int, dim: int, cnn_chs: int, swin: SwinTransformerStage, out_dim: int | None):
        super().__init__()
        self.level = level
        self.fuse = nn.Linear(2 * dim + cnn_chs, dim)
        self.swin = swin
        self.upsample = PatchExpand(dim, out_dim) if out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor, feat: torch.Tensor | None) -> torch.Tensor:
        parts = [x, skip] if feat is None else [x, skip, feat]
        x = self.fuse(torch.cat(parts, dim=-1))
        if self.swin.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.swin.blocks, x)
        else:
            x = self.swin.blocks(x)
        return self.upsample(x)


class CSUNetDecoder(nn.Module):
    """The Swin-UNet decoder with CNN features fused at every scale, sized from the built encoders.

    Widths, resolutions, depths, heads, MLP ratio, qkv bias and drop-path rates of each decoder
    stage are read from the mirrored timm encoder stage, so they can never disagree with it.

    Args:
        swin: the timm SwinTransformer encoder.
        cnn_channels: CNN feature channels per Swin stage (0 where there is no CNN).
        num_classes: output channels.
        window_size: decoder window size.
        proj_drop, attn_drop: dropout rates inside the decoder's Swin blocks.
    """

    def __init__(
        self,
        swin: SwinTransformer,
        cnn_channels: Sequence[int],
        num_classes: int,
        window_size: int,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ):
        super().__init__()
        dims = [int(info["num_chs"]) for info in swin.feature_info]
        n = len(dims)
        self.bottleneck = PatchExpand(dims[-1] + cnn_channels[-1], dims[-2])
        stages = []
        for level in reversed(range(n - 1)):
            enc = swin.layers[level]
            block = enc.blocks[0]
            stage = SwinTransformerStage(
                dim=dims[level],
                out_dim=dims[level],
                input_resolution=enc.output_resolution,
                depth=len(enc.blocks),
                downsample=False,
                num_heads=block.attn.num_heads,
                window_size=window_size,
                dynamic_mask=True,
                mlp_ratio=block.mlp_ratio,
                qkv_bias=block.attn.qkv.bias is not None,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=[getattr(b.drop_path1, "drop_prob", 0.0) for b in enc.blocks],
            )
            out_dim = dims[level - 1] if level > 0 else None
            stages.append(DecoderStage(level, dims[level], cnn_channels[level], stage, out_dim))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(dims[0])
        self.expand = PatchExpand(dims[0], dims[0], scale=swin.patch_embed.patch_size[0])
        self.head = nn.Conv2d(dims[0], num_classes, kernel_size=1, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        bottleneck: torch.Tensor,
        skips: Sequence[torch.Tensor],
        feats: Sequence[torch.Tensor | None],
    ) -> torch.Tensor:
        """NHWC bottleneck, skips and CNN features per level (None: no CNN) -> NCHW logits."""
        x = bottleneck if feats[-1] is None else torch.cat([bottleneck, feats[-1]], dim=-1)
        x = self.bottleneck(x)
        for stage in self.stages:
            x = stage(x, skips[stage.level], feats[stage.level])
        x = self.expand(self.norm(x))
        return self.head(x.permute(0, 3, 1, 2))


def _mirror_block(
    block: nn.Module, source: nn.Module | None, dst_prefix: str, src_prefix: str
) -> list[tuple[str, str]]:
    """Copy `source`'s tensors into `block` (a Swin block); one (status, log line) per tensor of `block`."""
    src = source.state_dict() if source is not None else {}
    out = []
    for key, target in block.state_dict().items():
        dst, old = f"{dst_prefix}.{key}", src.get(key)
        if old is None:
            out.append(("skipped", f"{dst}: skipped (no {src_prefix}.{key})"))
        elif old.shape == target.shape:
            target.copy_(old)
            out.append(("loaded", f"{dst} <- {src_prefix}.{key}: loaded {tuple(target.shape)}"))
        elif key.endswith("relative_position_bias_table"):
            target.copy_(resize_rel_pos_bias_table(
                old, new_window_size=block.attn.window_size, new_bias_shape=tuple(target.shape),
                old_window_size=source.attn.window_size,
            ))
            out.append(("resized", f"{dst} <- {src_prefix}.{key}: resized {tuple(old.shape)} -> {tuple(target.shape)}"))
        else:
            out.append(("skipped", f"{dst}: skipped (shape {tuple(target.shape)} != {tuple(old.shape)})"))
    return out
