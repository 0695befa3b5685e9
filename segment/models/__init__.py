"""Segmentation models: a registry of presets and one factory, as in timm.

    from segment.models import create_model, list_models
    model = create_model("cs_unet_lite", num_classes=3, in_chans=1)
    logits = model(x)                 # B x in_chans x H x W, any H, W -> B x num_classes x H x W

Families: `cs_unet*` / `cs_unet_paper*` and `swin_unet*` (`cs_unet.py`, the paper's CS-UNet and
Swin-UNet), `cs_unet_hybrid*` (`cs_unet_hybrid.py`: CS-UNet's encoders, a full-resolution U-Net
decoder), `unet*` and `unetplusplus*` (`unet.py`).
Every model exposes `encoders` (branch -> full timm model), `encoder_specs` and `config`.
"""
from . import cs_unet, cs_unet_hybrid, unet  # noqa: F401  (importing the families registers their presets)
from ._cnn import TimmCNNEncoder
from ._factory import create_model
from ._layers import PatchExpand, pad_to_multiple
from ._registry import is_model, list_models, model_entrypoint, register_model
from .cs_unet import CSUNet
from .cs_unet_hybrid import CSUNetHybrid
from .unet import TimmUnet

__all__ = [
    "create_model", "list_models", "register_model", "is_model", "model_entrypoint",
    "CSUNet", "CSUNetHybrid", "TimmUnet", "TimmCNNEncoder", "PatchExpand", "pad_to_multiple",
]
