"""Start-up checks shared by the command lines of pretrain and segment (pretrain never imports segment).

* :func:`check_overrides` / :func:`unknown_keys`: a Hydra override or a composed config key that the
  dataclass schema does not have is an error naming the nearest valid key. Hydra's ``+key=value``
  adds keys even to struct configs (it composes with ``force_add``), so a typo such as
  ``+train.epoch=3`` would otherwise be dropped silently; ``train.epoch=3`` gets Hydra's advice to
  add a ``+``. Fields typed ``dict`` or ``Any`` (``model.kwargs``, ``data.extra_tests``) stay open.
* :func:`writable_dir`: an output folder that cannot be created or written stops the command at
  start-up with one line naming it, not after the first epoch or image. :class:`CheckOut` runs it as a
  Hydra callback, before Hydra itself creates the run folder (``hydra.callbacks`` in the YAML).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["CheckOut", "check_config_keys", "check_overrides", "unknown_key_message", "unknown_keys", "writable_dir"]

_UNIONS = (typing.Union, types.UnionType)
_OPEN = object()  # a field whose keys are free (dict, Any, list): anything below it is accepted


# ------------------------------------------------------------------------------------ schema keys
def _field_types(schema: type) -> dict[str, Any]:
    """Field name -> type of a dataclass schema; ``dict``/``Any``/``list`` fields map to ``_OPEN``."""
    hints = typing.get_type_hints(schema)
    kinds: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        tp = hints.get(f.name, Any)
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in _UNIONS and len(args) == 1:  # Optional[X] -> X
            tp = args[0]
        origin = typing.get_origin(tp) or tp
        if dataclasses.is_dataclass(tp):
            kinds[f.name] = tp
        elif tp is Any or origin in (dict, list, tuple, *_UNIONS):
            kinds[f.name] = _OPEN
        else:
            kinds[f.name] = None  # a scalar value
    return kinds


def _all_keys(schema: type, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the schema, sections included (``train``, ``train.epochs``, ...)."""
    for name, tp in _field_types(schema).items():
        yield prefix + name
        if dataclasses.is_dataclass(tp):
            yield from _all_keys(tp, f"{prefix}{name}.")


def _suggest(key: str, schema: type) -> str:
    """`` (did you mean X?)`` with the closest valid keys: the same last part in another section
    (``train.lr`` -> ``optim.lr``, ``epochs`` -> ``train.epochs``), then whole dotted keys
    (``train.epoch`` -> ``train.epochs``), then close last parts."""
    ancestors = {key.rsplit(".", i)[0] for i in range(1, key.count(".") + 1)}
    keys = [k for k in _all_keys(schema) if k not in ancestors]
    leaf = key.rpartition(".")[2]
    close = [k for k in keys if k.rpartition(".")[2] == leaf]
    close += [k for k in difflib.get_close_matches(key, keys, n=3, cutoff=0.6) if k not in close]
    if not close:
        leaves = difflib.get_close_matches(leaf, {k.rpartition(".")[2] for k in keys}, n=3, cutoff=0.75)
        close = [k for k in keys if k.rpartition(".")[2] in leaves]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _bad_part(key: str, schema: type) -> str | None:
    """The first part of dotted KEY that the schema lacks, as ``a.b``; None when the key is valid."""
    tp: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if tp is _OPEN:
            return None
        if not dataclasses.is_dataclass(tp):  # a value has no sub-keys
            return ".".join(parts[: i + 1])
        kinds = _field_types(tp)
        if part not in kinds:
            return ".".join(parts[: i + 1])
        tp = kinds[part]
    return None


def unknown_key_message(key: str, schema: type, where: str = "") -> str:
    """One line naming the unknown KEY and the nearest valid ones."""
    return (f"unknown config key {key!r}{where}{_suggest(key, schema)}; "
            f"the valid keys are the fields of {schema.__module__}.{schema.__name__}")


def check_overrides(overrides: Iterable[str], schema: type) -> None:
    """Raise ``SystemExit`` for a command-line override whose key the schema lacks (with or without
    ``+``/``++``/``~``), before Hydra composes. Group choices (``model=unet``, ``pretrain/encoder=x``),
    ``hydra.*`` keys, packages (``@``) and flags (``--cfg job``) are Hydra's to check."""
    for token in overrides:
        if token.startswith("-") or "=" not in token and not token.startswith("~"):
            continue
        key = token.lstrip("+~").partition("=")[0].strip()
        if not key or "/" in key or "@" in key or key.split(".")[0] == "hydra":
            continue
        kinds = _field_types(schema)
        if "." not in key and dataclasses.is_dataclass(kinds.get(key)):
            continue  # `model=unet` selects a config group that fills the `model` section
        bad = _bad_part(key, schema)
        if bad is not None:
            raise SystemExit(unknown_key_message(key if bad == key else bad, schema, f" in override {token!r}"))


def unknown_keys(cfg: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that the schema lacks (keys under open fields are free)."""
    bad: list[str] = []
    kinds = _field_types(schema)
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if key not in kinds:
            bad.append(path)
        elif dataclasses.is_dataclass(kinds[key]):
            child = cfg._get_node(key)
            if isinstance(child, DictConfig):
                bad += unknown_keys(child, kinds[key], f"{path}.")
    return bad


def check_config_keys(cfg: DictConfig, schema: type) -> None:
    """Raise ``ValueError`` naming the first key of CFG that SCHEMA lacks and the nearest valid key."""
    bad = unknown_keys(cfg, schema)
    if bad:
        raise ValueError(unknown_key_message(bad[0], schema)
                         + (f" (also unknown: {', '.join(bad[1:])})" if bad[1:] else ""))


# ---------------------------------------------------------------------------------- output folders
def writable_dir(path: str | os.PathLike[str], what: str = "out") -> Path:
    """Create folder PATH (with parents) and a probe file in it, then remove the probe; return PATH.

    Raises ``SystemExit`` with one line naming WHAT and PATH when the folder cannot be made or written,
    so a command stops at start-up instead of after its first epoch or image.
    """
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} is a file, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        blocker = next((p for p in path.parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            reason = f"{blocker} is a file, not a folder"
        raise SystemExit(f"{what}={path}: cannot write the output folder ({reason}); "
                         f"pick a folder you can write to") from None
    return path


class CheckOut(Callback):
    """Hydra callback: :func:`writable_dir` on the config's ``out`` before Hydra makes the run folder.

    Hydra turns a callback's exceptions into warnings, so the check raises ``SystemExit``.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        writable_dir(str(config.out), "out")
