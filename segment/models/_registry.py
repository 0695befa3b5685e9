"""Model registry: variant functions filed under their name, looked up by the factory.

As in timm, each registered function builds one preset ("variants are data"); importing
`segment.models` imports every family module and so fills the registry.
"""
from __future__ import annotations

import difflib
import fnmatch
import logging
from typing import Any, Callable, Iterable

import torch.nn as nn

from ._layers import to_config

__all__ = ["register_model", "register_variant", "list_models", "is_model", "model_entrypoint"]

_logger = logging.getLogger(__name__)

ModelFn = Callable[..., nn.Module]
_model_entrypoints: dict[str, ModelFn] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Decorator filing `fn` under `fn.__name__`; a second function with the same name is an error."""
    name = fn.__name__
    if name in _model_entrypoints:
        raise ValueError(f"model '{name}' is already registered (by {_model_entrypoints[name].__module__})")
    _model_entrypoints[name] = fn
    return fn


def register_variant(name: str, cls: Callable[..., nn.Module], defaults: dict[str, Any], doc: str) -> ModelFn:
    """Register `name`: `cls(**{**defaults, **kwargs})`, its `config` the name and every argument it got."""
    def build(**kwargs: Any) -> nn.Module:
        args = {**defaults, **kwargs}
        model = cls(**args)
        model.config = to_config({"name": name, **args})
        _logger.debug("built %s: %.2f M parameters, pad multiple %d", name,
                      sum(p.numel() for p in model.parameters()) / 1e6, model.pad_multiple)
        return model

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    build.__module__ = getattr(cls, "__module__", build.__module__)
    return register_model(build)


def list_models(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = ()) -> list[str]:
    """Sorted names of the registered models matching any of the shell-style `filter` patterns.

    Example: `list_models("*_test")`, `list_models("cs_unet*", exclude_filters="*_test")`.
    """
    filters = [filter] if isinstance(filter, str) else list(filter)
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = set(_model_entrypoints)
    if any(filters):
        names = {n for n in names if any(fnmatch.fnmatchcase(n, f) for f in filters if f)}
    for pattern in excludes:
        names -= set(fnmatch.filter(names, pattern))
    return sorted(names)


def is_model(name: str) -> bool:
    """True if `name` is a registered model."""
    return name in _model_entrypoints


def model_entrypoint(name: str) -> ModelFn:
    """The function registered as `name`; a `ValueError` naming the available models otherwise."""
    try:
        return _model_entrypoints[name]
    except KeyError:
        close = difflib.get_close_matches(name, _model_entrypoints, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown model '{name}'.{hint} Available models: {', '.join(list_models())}"
        ) from None
