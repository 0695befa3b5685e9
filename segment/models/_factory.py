"""`create_model`: the one way to build a segmentation model from a name and keyword arguments."""
from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from ._registry import model_entrypoint

__all__ = ["create_model"]

_logger = logging.getLogger(__name__)


def create_model(
    name: str,
    num_classes: int = 3,
    in_chans: int = 1,
    img_size: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the registered model `name`, like `timm.create_model`.

    Args:
        name: a name from `list_models()`, e.g. "cs_unet", "unet_lite".
        num_classes: output channels (logits per class).
        in_chans: input channels, 1 (gray) or 3.
        img_size: the training crop size; None keeps the preset's. Inputs of any size are accepted
            (padded and cropped back); for Swin models it fixes, as in timm, which stages use shifted
            windows (a stage whose feature map is no larger than the window has none).
        **overrides: any constructor argument of the model family, replacing the preset's value;
            arguments given as None are dropped (the preset's value stays).

    Returns:
        The model, with `model.config` holding `name` plus every resolved argument, so that
        `create_model(**model.config)` rebuilds it.
    """
    entrypoint = model_entrypoint(name)
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, img_size=img_size, **overrides)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = entrypoint(**kwargs)
    _logger.debug("created %s with %s", name, kwargs)
    return model
