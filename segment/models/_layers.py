"""Small layers and helpers shared by the model families: patch expanding and input padding."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchExpand", "pad_to_multiple", "check_input", "check_model_args", "to_config", "PAD_MODES"]

PAD_MODES = ("constant", "reflect", "replicate")


class PatchExpand(nn.Module):
    """Swin-UNet's patch expanding: Linear to scale² x out_dim, depth-to-space by `scale`, LayerNorm.

    NHWC in, NHWC out: (B, H, W, in_dim) -> (B, scale*H, scale*W, out_dim). With scale 2 and
    out_dim = in_dim // 2 this is Swin-UNet's `PatchExpand`; with scale 4 and out_dim = in_dim its
    `FinalPatchExpand_X4`. The Linear has no bias (the LayerNorm follows).
    """

    def __init__(self, in_dim: int, out_dim: int, scale: int = 2, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if scale < 1 or in_dim < 1 or out_dim < 1:
            raise ValueError(f"PatchExpand needs positive sizes, got in_dim={in_dim}, out_dim={out_dim}, scale={scale}")
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        s, C = self.scale, self.out_dim
        x = self.expand(x).reshape(B, H, W, s, s, C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, C)
        return self.norm(x)


def check_input(x: torch.Tensor, in_chans: int, model_name: str) -> None:
    """Raise a clear `ValueError` unless `x` is B x in_chans x H x W."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"{model_name} expects input of shape (B, {in_chans}, H, W), got {tuple(x.shape)}"
        )


def check_model_args(num_classes: int, in_chans: int, img_size: int, pad_mode: str) -> None:
    """Clear errors for the arguments every model family takes."""
    for name, value in dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")


def _reflect(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad bottom/right by any amount: repeated reflections when the pad exceeds the size."""
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        step_h, step_w = min(pad_h, h - 1), min(pad_w, w - 1)
        if (pad_h and step_h == 0) or (pad_w and step_w == 0):  # 1-pixel side: nothing to reflect
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "constant") -> torch.Tensor:
    """Pad the bottom and right of an NCHW tensor so H and W are multiples of `multiple`.

    `mode`: "constant" (zeros: the dataset mean once inputs are normalised), "reflect" (any pad
    amount, by repeated reflection) or "replicate". Returns `x` itself when no padding is needed.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return x
    if mode == "reflect":
        return _reflect(x, pad_h, pad_w)
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def lcm(values: Iterable[int]) -> int:
    """Least common multiple of positive ints (1 for none)."""
    return math.lcm(1, *values)


def to_config(value: Any) -> Any:
    """Tuples to lists, recursively, so a model config is plain JSON."""
    if isinstance(value, (list, tuple)):
        return [to_config(v) for v in value]
    if isinstance(value, dict):
        return {k: to_config(v) for k, v in value.items()}
    return value
