"""Run settings and the Accelerate/DeepSpeed set-up of pretraining: value checks of the config
(:func:`validate_config`), the mixed precision (:func:`resolve_precision`, ``precision=auto``:
:func:`auto_precision`), the DeepSpeed JSON of a run (:func:`deepspeed_config`) and the ``Accelerator``
(:func:`build_accelerator`). Used by :func:`pretrain.train.train`.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import accelerate
import torch
from accelerate.utils import DeepSpeedPlugin

from pretrain.config import CONFIG_DIR, DeepSpeedStage, PretrainConfig, Precision
from pretrain.intensity import canonical_intensity

__all__ = ["auto_precision", "build_accelerator", "deepspeed_config", "resolve_precision", "validate_config"]

log = logging.getLogger(__name__)


def validate_config(cfg: PretrainConfig) -> None:
    """Value checks Hydra's types cannot express; raises ``ValueError`` naming the key."""
    positive = {
        "optim.batch_size": cfg.optim.batch_size, "optim.grad_accum": cfg.optim.grad_accum,
        "optim.epochs": cfg.optim.epochs, "optim.steps_per_epoch": cfg.optim.steps_per_epoch,
        "checkpoint.keep": cfg.checkpoint.keep, "checkpoint.poll_every": cfg.checkpoint.poll_every,
        "log.every": cfg.log.every, "data.views.global_size": cfg.data.views.global_size,
        "data.views.local_size": cfg.data.views.local_size, "knn.k": cfg.knn.k,
    }
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    non_negative = {"checkpoint.every": cfg.checkpoint.every, "knn.every": cfg.knn.every,
                    "export.every": cfg.export.every, "data.num_workers": cfg.data.num_workers,
                    "data.views.n_local": cfg.data.views.n_local, "optim.clip_grad": cfg.optim.clip_grad,
                    "optim.warmup_epochs": cfg.optim.warmup_epochs}
    bad += [f"{k}={v}" for k, v in non_negative.items() if v < 0]
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        bad.append(f"stop_at_step={cfg.stop_at_step}")
    if cfg.encoder.in_chans not in (1, 3):
        bad.append(f"encoder.in_chans={cfg.encoder.in_chans} (1 or 3)")
    if cfg.data.std <= 0:
        bad.append(f"data.std={cfg.data.std}")
    try:
        canonical_intensity(cfg.data.intensity)
    except ValueError as e:
        bad.append(f"data.intensity={cfg.data.intensity!r} ({e})")
    if bad:
        raise ValueError(f"invalid pretraining settings: {', '.join(bad)}")


def resolve_precision(precision: Precision) -> str:
    """accelerate's ``mixed_precision``; ``auto``: see :func:`auto_precision`."""
    if precision is Precision.auto:
        return auto_precision()[0]
    return precision.value


def auto_precision() -> tuple[str, str]:
    """What ``precision=auto`` picks, and why: bf16 on a GPU with native bf16 (compute capability 8+:
    A100, H100, RTX 30xx), fp16 on a GPU that only emulates bf16 (V100, T4: ``is_bf16_supported()``
    says True there, emulated bf16 is slow), fp32 ("no") without a GPU. Under fp16 accelerate scales
    the loss with a ``GradScaler`` (DeepSpeed with its own dynamic loss scaler)."""
    if not torch.cuda.is_available():
        return "no", "fp32 (no GPU)"
    name = torch.cuda.get_device_name()
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts emulation as support
        native = torch.cuda.get_device_capability()[0] >= 8
    if native:
        return "bf16", f"bf16 ({name} has native bf16)"
    return "fp16", f"fp16 with loss scaling ({name} only emulates bf16); precision=bf16 or precision=no overrides this"


def deepspeed_config(cfg: PretrainConfig, *, mixed_precision: str = "no",
                     environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The DeepSpeed config for this run, or None without DeepSpeed.

    Source: ``distributed.deepspeed_config`` (a JSON path), else ``configs/deepspeed/<distributed.deepspeed>.json``,
    else the file an ``accelerate launch`` DeepSpeed config named (``ACCELERATE_DEEPSPEED_CONFIG_FILE``).
    The loop's own settings are written in as integers (``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps``) and floats (``gradient_clipping``: DeepSpeed clips, since nothing
    can run between its backward and step); ``train_batch_size`` is left to accelerate. Under bf16 or
    fp16, buffers are cast too (``data_types.buffer_dtype``), or BatchNorm meets bf16/fp16 weights with fp32
    running statistics. An optimizer or scheduler block is refused: AdamW is built from the method's
    param groups and the schedules are applied per step.
    """
    d = cfg.distributed
    launcher_ds = environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launcher_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if d.deepspeed_config:
        path = Path(d.deepspeed_config)
    elif d.deepspeed is not None:
        path = CONFIG_DIR / "deepspeed" / f"{DeepSpeedStage(d.deepspeed).value}.json"
    elif launcher_ds and launcher_file not in ("", "none"):
        path = Path(launcher_file)
    elif launcher_ds:
        raise ValueError(
            "accelerate was launched with inline DeepSpeed settings; this loop needs a DeepSpeed JSON: use "
            "configs/accelerate/deepspeed_zero{1,2,3}.yaml (deepspeed_config_file) or pass distributed.deepspeed=zero2"
        )
    else:
        return None
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ValueError(f"{path}: remove the {block!r} block; the loop builds AdamW from the method's param "
                             "groups and applies its lr/wd schedules itself")
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ValueError(f"{path}: needs a zero_optimization block with a stage")
    auto = sorted(k for k, v in zero.items() if v == "auto")
    if auto:
        raise ValueError(f"{path}: zero_optimization keys {auto} are 'auto', which accelerate cannot resolve for "
                         "a model without a transformers config: give integers")
    ds["train_micro_batch_size_per_gpu"] = int(cfg.optim.batch_size)
    ds["gradient_accumulation_steps"] = int(cfg.optim.grad_accum)
    ds["gradient_clipping"] = float(cfg.optim.clip_grad)
    ds.pop("train_batch_size", None)
    if mixed_precision in ("bf16", "fp16"):
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", mixed_precision)
    ds["_source"] = str(path)
    return ds


def build_accelerator(cfg: PretrainConfig):
    """``Accelerator`` on the GPU when there is one (CPU otherwise), with the DeepSpeed plugin if configured."""
    mixed_precision = resolve_precision(cfg.precision)
    ds = deepspeed_config(cfg, mixed_precision=mixed_precision)
    plugin = None
    if ds is not None:
        source = ds.pop("_source")
        _single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
        log.info("DeepSpeed ZeRO-%s from %s", ds["zero_optimization"]["stage"], source)
    # accelerate.Accelerator is looked up at call time: tests put a stand-in there
    accelerator = accelerate.Accelerator(
        # accelerate selects DeepSpeed only when not forced to the CPU; DeepSpeed then uses its CPU
        # accelerator (gloo) on a machine without GPUs
        cpu=not torch.cuda.is_available() and plugin is None,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        deepspeed_plugin=plugin,
    )
    if (plugin is not None and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() != accelerator.num_processes):
        # accelerate 1.15 without GPUs: DeepSpeed initialises every rank, but accelerate's state
        # says one process, so every rank would act as rank 0 (and write the same files)
        raise RuntimeError(
            f"DeepSpeed across {torch.distributed.get_world_size()} processes needs GPUs (accelerate reports "
            f"{accelerator.num_processes} process without them); on CPUs use DDP (distributed.deepspeed=null, "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...) or DeepSpeed in one process")
    if cfg.precision is Precision.auto and accelerator.is_main_process:
        why = auto_precision()[1]
        if mixed_precision == "fp16":
            scaler = getattr(accelerator, "scaler", None)
            why += "; loss scaler: " + ("DeepSpeed's" if plugin is not None
                                        else type(scaler).__name__ if scaler is not None else "none")
        log.info("precision=auto: %s", why)
    return accelerator


def _single_process_env() -> None:
    """Give a launcher-less process (``python pretrain/main.py``) the environment of a one-process
    launch, which accelerate requires before it initialises DeepSpeed (``LOCAL_RANK`` etc.)."""
    if "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log.info("single process without a launcher: DeepSpeed gets RANK=0, WORLD_SIZE=1, MASTER_PORT=%d", port)
