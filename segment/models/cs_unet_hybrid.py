"""CS-UNet hybrid: CS-UNet's two parallel encoders in front of a full-resolution U-Net decoder.

Paper: K. Alrfou, T. Zhao, A. Kordijazi, "CS-UNet: A Generalizable and Flexible Segmentation
Algorithm" (arXiv 2308.13917), for the two encoders; O. Ronneberger et al., "U-Net" (arXiv
1505.04597) and segmentation-models-pytorch's `UnetDecoder` for the decoder. The paper-faithful
model (Swin-UNet decoder ending at 1/4 resolution, 4x patch expand) stays in `cs_unet.py`
(`cs_unet_paper*`, alias `cs_unet*`); issue 14 explains why this variant exists: the paper's
output is block-constant at 4 px (tertiary gamma' capped at ~66 % IoU), the CNN's stride-2 stem
feature is never used, and its finest fusion squeezes Swin and CNN into 48 channels (lite).

Shapes for a 256 x 256 input, `cs_unet_hybrid_lite` (ResNet-18, Swin from stride 8), NCHW:

    CNN (timm resnet18, whole)   s2 64x128², s4 64x64², s8 128x32², s16 256x16², s32 512x8²
    Swin (timm, patch 8, whole)  s8 96x32², s16 192x16², s32 384x8² (last: swin.norm)
    fusion, s in 8..32           f_s = cnn_s + Linear_s(LayerNorm_s(swin_s))   (Linear zero-init)
    decoder (smp UnetDecoder, exactly unet_lite's: channels 256-128-64-32-16, BatchNorm, nearest)
      block 0: up(f32) ++ f16 -> 256x16²      block 1: ++ f8 -> 128x32²     block 2: ++ cnn s4 -> 64x64²
      block 3: up ++ cnn s2 (stem) -> 32x128²
      block 4: up(32x256²) + InputSkip(x) -> 16x256²    (InputSkip: conv3x3-BN-ReLU, 1x1 zero-init)
    head (smp SegmentationHead, 3x3 conv)                                        -> K x 256²

The Swin presets other than lite are CS-UNet's (patch 4, fusion at 4..32: `cs_unet`'s encoders).
The lite Swin starts at stride 8 (patch 8, widths 96-192-384, depths 2-2-2, heads 4-8-16, window
8): `cs_unet_lite`'s Swin without its stride-4 stage, for speed (see Cost). At stride 4 the CNN
(64 channels) is the only encoder; the Swin still reaches every scale the decoder sees below it.
The paper-style lite Swin is `patch_size=4, embed_dim=48, depths=[2,2,2,2], num_heads=[2,4,8,16]`
(what `pretrain`'s `swin_lite` encoder and `cs_unet_lite` use; their weights load only into it).

Starts as a U-Net. Every path from the Swin branch and from the input skip ends in a zero-
initialised projection, so at step 0 the model computes exactly what `unet_lite` (`TimmUnet`)
computes with the same CNN, decoder and head weights; the attribute names are the same
(`cnn`, `decoder`, `segmentation_head`), so a `TimmUnet` state dict loads into those parts as it
is. The projections get a gradient at step 0 (their input is non-zero), and the Swin encoder from
the first optimizer step on. Zero-initialising the *output* side matters: zeroing both the
projection and whatever consumes it would leave both without gradient forever.

Fusion is additive and keeps the CNN's width at every scale. Concatenation would widen the
decoder's inputs and so change the shapes of smp's decoder convolutions (no more drop-in U-Net
weights); it buys nothing here because the CNN is at least as wide as the Swin at the finest
fusion in every preset: ResNet-50 256 vs Swin-T 96 at stride 4, ResNet-18 128 vs Swin-lite 96 at
stride 8 (the paper squeezed 48+48+64 -> 48 and 96+96+256 -> 96 at stride 4). Where a CNN is narrower than the
Swin at some scale (only `test_resnet` at stride 32 among the presets), the projection narrows
the Swin there; that is logged.

Any input size: as `TimmUnet`, the input is padded (bottom/right) to `model.pad_multiple` = 32 for
the CNN and the decoder, so the U-Net part sees exactly what `unet_lite` sees. The Swin branch
alone is padded further, to `model.swin_pad_multiple` (every shifted-window stage an exact
multiple of its window, as in `cs_unet.py`; 128 for lite), and its features are cropped back to
the CNN's grid. Training tiles (multiples of 128) need neither.

Cost (CPU, one thread, 4 x 256², `bench/model_throughput.py --models unet_lite cs_unet_hybrid_lite
--size 256 --batch 4 --clock cpu --threads 1`, on a shared 2-core machine): a training step takes
1.26-1.31x `unet_lite`'s CPU time (median over rounds, three runs; fastest steps 1.31x), was
1.42-1.47x with the stride-4 Swin-lite. Component timings (forward + backward, min of 7):
Swin-lite from stride 4 0.61 s, from stride 8 0.36 s (its stride-4 stage was ~40 %, the stage with
the most tokens and the least arithmetic per byte); the last decoder block 0.24 s, 0.34 s with the
input skip (0.41 s when the block resized its already-resized input again). PyTorch's fused
attention (timm's `fused_attn`) gave nothing on CPU at window 8 and is left as timm sets it.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.base import modules as smp_modules
from segmentation_models_pytorch.base.initialization import initialize_decoder
from timm.models.swin_transformer import SwinTransformer

from ._layers import check_input, lcm, pad_to_multiple, to_config
from ._registry import register_variant
from ._swin_encoder import SWIN_INTERMEDIATE, SWIN_LITE, SWIN_ORIGINAL, SWIN_TEST, SwinSpec, create_swin
from .unet import _TEST_DECODER, TimmUnet

__all__ = ["CSUNetHybrid", "SwinProjection", "InputSkip"]

_logger = logging.getLogger(__name__)

_CNN_STRIDES = (2, 4, 8, 16, 32)  # smp's feature list after the input: stem, then the four stages


class SwinProjection(nn.Module):
    """Swin tokens (NHWC) -> LayerNorm -> Linear -> NCHW, the Linear zero-initialised.

    The LayerNorm puts the Swin stage outputs (an un-normalised residual stream) on one scale
    before they are added to a CNN feature; the zero Linear makes the addition a no-op at step 0.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)).permute(0, 3, 1, 2)


class InputSkip(nn.Sequential):
    """The last decoder stage's skip from the input: conv3x3-norm-ReLU, then a zero-initialised 1x1.

    Full-resolution edges for the stride-2 -> 1 stage, which smp's U-Net runs without a skip.
    """

    def __init__(self, in_chans: int, hidden: int, out_chans: int, use_norm: bool | str | dict[str, Any]):
        conv = smp_modules.Conv2dReLU(in_chans, hidden, kernel_size=3, padding=1, use_norm=use_norm)
        proj = nn.Conv2d(hidden, out_chans, kernel_size=1)
        super().__init__(conv, proj)
        initialize_decoder(conv)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)


class CSUNetHybrid(TimmUnet):
    """A timm CNN and a timm Swin fused at the Swin's strides (4 or 8 to 32) into smp's U-Net decoder, out at stride 1.

    A `TimmUnet` (built first, by the same code: same attribute names, same weights from the same seed)
    with a Swin branch added into its CNN features.

    Args:
        num_classes, in_chans, img_size, cnn_name, cnn_kwargs, decoder_channels, decoder_use_norm,
            decoder_attention_type, decoder_interpolation, pad_mode: as `TimmUnet` (the decoder is U-Net's);
            `img_size` also fixes which Swin stages use shifted windows.
        input_skip: give the last decoder stage a skip from the input (zero-initialised).
        **swin: the Swin encoder, `SwinSpec` fields (patch_size, embed_dim, depths, num_heads, window_size,
            mlp_ratio, qkv_bias, drop_path_rate, proj_drop_rate, attn_drop_rate, swin_name).
    """

    def __init__(self, num_classes: int = 3, in_chans: int = 1, img_size: int = 256, cnn_name: str = "resnet18",
                 input_skip: bool = True, **kwargs: Any):
        spec = SwinSpec.pop_from(kwargs)
        if kwargs.setdefault("decoder", "unet") != "unet":
            raise ValueError(f"CSUNetHybrid's decoder is U-Net's ('unet'), got {kwargs['decoder']!r}")
        super().__init__(num_classes, in_chans, img_size, cnn_name, **kwargs)
        self.pad_multiple = _CNN_STRIDES[-1]

        # The Swin branch and its zero-initialised entries into the CNN features.
        self._swin_spec = spec.timm_spec(in_chans, img_size)
        self.swin: SwinTransformer = create_swin(self._swin_spec)
        swin_dims = [int(info["num_chs"]) for info in self.swin.feature_info]
        swin_strides = [int(info["reduction"]) for info in self.swin.feature_info]
        by_stride = dict(zip(self.cnn.strides, self.cnn.channels))
        missing = [s for s in swin_strides if not by_stride.get(s)]
        if missing:
            raise ValueError(
                f"CNN '{cnn_name}' has no features at the Swin strides {missing} "
                f"(CNN strides {self.cnn.strides}, Swin strides {swin_strides}); change patch_size or the CNN"
            )
        self.fusion_levels = [self.cnn.strides.index(s) for s in swin_strides]  # index into the CNN's features
        self.fusions = nn.ModuleList(SwinProjection(d, by_stride[s]) for d, s in zip(swin_dims, swin_strides))
        narrowed = [(s, d, by_stride[s]) for d, s in zip(swin_dims, swin_strides) if by_stride[s] < d]
        if narrowed:
            _logger.info("CS-UNet hybrid: the CNN is narrower than the Swin at (stride, swin, cnn) %s; "
                         "the Swin is projected down there", narrowed)
        self.swin_pad_multiple = _swin_pad_multiple(self.swin, swin_strides)

        self.input_skip = (
            InputSkip(in_chans, self.decoder_channels[-1], self.decoder_channels[-2], self.decoder_use_norm)
            if input_skip else None
        )

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """Branch name -> full timm model (timm key names), where encoder weights are loaded."""
        return {"swin": self.swin, "cnn": self.cnn.model}

    @property
    def encoder_specs(self) -> dict[str, dict[str, Any]]:
        """Branch -> `{"timm_name", "timm_kwargs"}` (plain JSON) rebuilding it with `timm.create_model`."""
        return to_config({"swin": self._swin_spec, "cnn": self.cnn.spec})

    def forward_swin(self, x: torch.Tensor) -> list[torch.Tensor]:
        """NHWC Swin stage outputs (the last through `swin.norm`) for an input padded to `pad_multiple`.

        Pads further to `swin_pad_multiple`; the caller crops the features back to the CNN's grid.
        """
        x = _pad_traceable(x, self.swin_pad_multiple, self.pad_mode)
        x = self.swin.patch_embed(x)
        feats = []
        for stage in self.swin.layers:  # a stage runs its own gradient checkpointing
            x = stage(x)
            feats.append(x)
        feats[-1] = self.swin.norm(feats[-1])
        return feats

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """smp's feature list [input, CNN stride 2, fused 4, 8, 16, 32] for a padded input."""
        feats = [x, *self.cnn(x)]
        for level, fusion, swin in zip(self.fusion_levels, self.fusions, self.forward_swin(x)):
            cnn = feats[level + 1]
            swin = swin[:, : cnn.shape[-2], : cnn.shape[-1]]
            feats[level + 1] = cnn + fusion(swin)
        return feats

    def forward_decoder(self, features: list[torch.Tensor]) -> torch.Tensor:
        """smp's `UnetDecoder.forward`, with the input skip added before the last block."""
        dec = self.decoder
        shapes = [f.shape[2:] for f in features][::-1]
        deepest_first = features[1:][::-1]
        skips = deepest_first[1:]
        y = dec.center(deepest_first[0])
        for i, block in enumerate(dec.blocks):
            height, width = shapes[i + 1]
            skip = skips[i] if i < len(skips) else None
            if skip is None and self.input_skip is not None and i == len(dec.blocks) - 1:
                # upsample here so that the skip can be added, then run the rest of the block
                y = F.interpolate(y, size=(height, width), mode=block.interpolation_mode)
                y = _unet_block_after_resize(block, y + self.input_skip(features[0]))
            else:
                y = block(y, height, width, skip_connection=skip)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x in_chans x H x W (any H, W) -> B x num_classes x H x W logits."""
        check_input(x, self.in_chans, type(self).__name__)
        H, W = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple, self.pad_mode)
        logits = self.segmentation_head(self.forward_decoder(self.forward_features(x)))
        return logits[..., :H, :W]

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in the Swin encoder and the timm CNN."""
        self.swin.set_grad_checkpointing(enable)
        self.cnn.model.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Relative-position tables, excluded from weight decay as in timm's Swin."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def _unet_block_after_resize(block: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """smp's `UnetDecoderBlock.forward` without a skip, after its resize (already done by the caller).

    Calling the block itself would resize `y` to its own size again: the identity, but a full
    copy of the largest decoder tensor, forward and backward (~0.07 s of a lite step on CPU).
    The equality-at-init tests (with and without decoder attention) hold this to smp's block.
    """
    return block.attention2(block.conv2(block.conv1(y)))


def _swin_pad_multiple(swin: SwinTransformer, strides: Sequence[int]) -> int:
    """Least input multiple: the largest stride, and stride x window for every shifted stage."""
    need = [strides[-1]]
    for stride, stage in zip(strides, swin.layers):
        for block in stage.blocks:
            if any(block.shift_size):
                need += [stride * w for w in block.window_size]
    return lcm(need)


def _pad_traceable(x: torch.Tensor, multiple: int, mode: str) -> torch.Tensor:
    """`pad_to_multiple`, with the amounts kept symbolic when traced (ONNX export at any size)."""
    if not torch.jit.is_tracing():
        return pad_to_multiple(x, multiple, mode)
    h, w = x.shape[-2], x.shape[-1]
    pad_h, pad_w = (multiple - h % multiple) % multiple, (multiple - w % multiple) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


# Swin presets as cs_unet's, except lite (from stride 8, see the module docstring); decoders as
# unet / unet_lite / unet_test.
_SWIN_LITE_S8 = dict(SWIN_LITE, patch_size=8, embed_dim=96, depths=(2, 2, 2), num_heads=(4, 8, 16))


for _name, _defaults, _doc in [
    ("cs_unet_hybrid", dict(SWIN_ORIGINAL, cnn_name="resnet50"),
     "CS-UNet hybrid, paper-size encoders (Swin-T 2-2-6-2, window 8, 512; ResNet-50), U-Net decoder."),
    ("cs_unet_hybrid_intermediate", dict(SWIN_INTERMEDIATE, cnn_name="resnet50"),
     "CS-UNet hybrid with the paper's \"intermediate\" Swin (depths 2-2-2-2) and ResNet-50."),
    ("cs_unet_hybrid_lite", dict(_SWIN_LITE_S8, cnn_name="resnet18"),
     "CS-UNet hybrid for CPU / small GPUs: Swin from stride 8 (96-192-384, 256) + ResNet-18, unet_lite's decoder."),
    ("cs_unet_hybrid_test", dict(SWIN_TEST, cnn_name="test_resnet", decoder_channels=_TEST_DECODER),
     "Tiny CS-UNet hybrid for tests: cs_unet_test's encoders, unet_test's decoder."),
]:
    register_variant(_name, CSUNetHybrid, _defaults, _doc)
