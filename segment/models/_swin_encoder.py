"""The Swin encoder CS-UNet and the hybrid share: its arguments (`SwinSpec`), presets and construction.

The model constructors take the Swin's arguments as flat keyword arguments (`embed_dim=48, ...`), so a
model's `config` (and `model.json`) lists them beside the others; `SwinSpec.pop_from` gathers them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import timm
import torch.nn as nn

__all__ = ["SwinSpec", "create_swin", "SWIN_ORIGINAL", "SWIN_INTERMEDIATE", "SWIN_LITE", "SWIN_TEST"]


@dataclass(frozen=True)
class SwinSpec:
    """timm `SwinTransformer` architecture arguments; the decoder of CS-UNet mirrors depths and heads.

    `swin_name` is the timm entry point (its own architecture arguments are all overridden; the name
    matters for loading timm/Microsoft weights). `drop_path_rate`, `proj_drop_rate`, `attn_drop_rate`:
    regularisation.
    """

    swin_name: str = "swin_tiny_patch4_window7_224"
    patch_size: int = 4
    embed_dim: int = 96
    window_size: int = 8
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0

    def __post_init__(self) -> None:
        """Clear errors for arguments timm would reject late or obscurely."""
        for name in ("patch_size", "embed_dim", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        depths, heads = list(self.depths), list(self.num_heads)
        if len(depths) < 2 or len(depths) != len(heads) or min(depths) < 1:
            raise ValueError(
                f"depths and num_heads need one positive entry per stage (>= 2 stages), got {depths}, {heads}"
            )
        for i, h in enumerate(heads):
            if h < 1 or (self.embed_dim * 2**i) % h:
                raise ValueError(f"stage {i}: width {self.embed_dim * 2**i} is not divisible by num_heads {h}")

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> "SwinSpec":
        """The spec from the Swin's keys of `kwargs`, which are removed from it (defaults for the others)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})

    def timm_spec(self, in_chans: int, img_size: int) -> dict[str, Any]:
        """`{"timm_name", "timm_kwargs"}` building this encoder (classifier-free) with `timm.create_model`."""
        kwargs = asdict(self)
        name = kwargs.pop("swin_name")
        kwargs.update(depths=tuple(self.depths), num_heads=tuple(self.num_heads))
        return {"timm_name": name, "timm_kwargs": dict(num_classes=0, in_chans=in_chans, img_size=img_size,
                                                       **kwargs, strict_img_size=False)}


def create_swin(spec: dict[str, Any]) -> nn.Module:
    """The timm Swin of a `SwinSpec.timm_spec`, randomly initialised."""
    return timm.create_model(spec["timm_name"], pretrained=False, **spec["timm_kwargs"])


# Swin presets. Paper: Swin-T "original" / "intermediate" depths, window 8, 512 crops, drop-path 0.2.
# Lite and test keep head dim 24 (embed / heads[0]); the test window is 4 so tiny inputs still shift.
SWIN_ORIGINAL = dict(
    embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=8, img_size=512, drop_path_rate=0.2
)
SWIN_INTERMEDIATE = dict(SWIN_ORIGINAL, depths=(2, 2, 2, 2))
SWIN_LITE = dict(
    embed_dim=48, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=8, img_size=256, drop_path_rate=0.1
)
SWIN_TEST = dict(
    embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4, img_size=128, drop_path_rate=0.1
)
