"""Per-iteration schedules: learning rate, weight decay, EMA momentum, DINO teacher temperature.

Everything is a pure function of the global step (dinov2's ``build_schedulers`` /
``apply_optim_scheduler``; lightly's ``cosine_schedule``), because WebDataset streams have no length
and an "epoch" is a fixed number of iterations. ``apply_to_optimizer`` writes lr and weight decay
into the param groups through their multipliers, and freezes the groups marked ``is_last_layer``
(DINO's head output layer) with lr 0 for the first ``freeze_last_layer_steps``: under DeepSpeed
nothing may run between backward and step, so freezing must be an lr, not a gradient edit.

Loop order: ``apply_to_optimizer`` -> forward -> backward -> step -> ``update_teacher(momentum)``.

:func:`schedule_config` turns a :class:`pretrain.config.PretrainConfig` into a :class:`ScheduleConfig` in
steps. Fine-tuning (``segment.finetune.lr_lambdas``) takes its LR factor from :func:`warmup_cosine_factor`:
the same warm-up + cosine shape as a multiplier of the peak lr, in its own convention (warm-up
``(step + 1) / warmup``, the cosine reaches 0 at ``total``, and may follow a spent share of a wall-clock
budget instead of the steps).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightly.utils.scheduler import cosine_schedule

from pretrain.config import PretrainConfig

__all__ = [
    "ScheduleConfig",
    "Schedules",
    "apply_to_optimizer",
    "linear_warmup",
    "peak_lr",
    "schedule_config",
    "warmup_cosine",
    "warmup_cosine_factor",
]


def warmup_cosine(step: int, total: int, warmup: int, base: float, final: float, start: float = 0.0) -> float:
    """Linear warm-up from ``start`` to ``base`` over ``warmup`` steps, then cosine to ``final``.

    ``final`` is reached at step ``total - 1`` and held after it.
    """
    if total < 1 or not 0 <= warmup <= total:
        raise ValueError(f"need total >= 1 and 0 <= warmup <= total, got total={total}, warmup={warmup}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return float(start + (base - start) * step / warmup)
    if warmup == total:  # all warm-up: hold the peak afterwards
        return float(base)
    return cosine_schedule(min(step, total - 1) - warmup, total - warmup, base, final)


def linear_warmup(step: int, warmup: int, start: float, final: float) -> float:
    """Linear ramp from ``start`` to ``final`` over ``warmup`` steps, then constant (DINO teacher temperature)."""
    if step < 0 or warmup < 0:
        raise ValueError(f"step and warmup must be >= 0, got step={step}, warmup={warmup}")
    if step >= warmup:
        return float(final)
    return float(start + (final - start) * step / warmup)


def warmup_cosine_factor(step: int, warmup: int, total: int, *, cosine: bool = True,
                         fraction: float | None = None) -> float:
    """Multiplier of the peak lr at ``step`` (fine-tuning's ``LambdaLR``): ``(step + 1) / warmup`` during
    the first ``warmup`` steps, then a half cosine from 1 to 0 over ``total - warmup`` steps (held at 0
    after ``total``), or 1 without ``cosine``. ``fraction``: the spent share of another budget (wall time);
    the cosine follows whichever of the two is further along."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    if fraction is not None:
        t = max(t, fraction)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule hyperparameters. ``lr`` is the peak value, already scaled to the global batch.

    Defaults follow DINO (Caron et al., 2021): cosine lr with linear warm-up, weight decay cosine
    0.04 -> 0.4, EMA momentum cosine 0.996 -> 1, teacher temperature 0.04 -> 0.07 linear warm-up.
    """

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.996
    momentum_end: float = 1.0
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = 0
    freeze_last_layer_steps: int = 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ScheduleConfig:
        """Build from a dict / OmegaConf ``DictConfig``; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown schedule keys {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(values))


def peak_lr(cfg: PretrainConfig, world_size: int) -> float:
    """``optim.lr`` when set, else ``optim.base_lr x global batch / 256`` (DINO's linear scaling)."""
    if cfg.optim.lr is not None:
        return float(cfg.optim.lr)
    return cfg.optim.base_lr * cfg.optim.batch_size * cfg.optim.grad_accum * world_size / 256.0


def schedule_config(cfg: PretrainConfig, method_defaults: Mapping[str, float], *, world_size: int) -> ScheduleConfig:
    """:class:`ScheduleConfig` in steps: config values, else the method's defaults, else the schedule's."""
    o, spe = cfg.optim, cfg.optim.steps_per_epoch
    total = o.epochs * spe
    explicit = {
        "weight_decay": o.weight_decay, "weight_decay_end": o.weight_decay_end, "momentum": o.momentum,
        "momentum_end": o.momentum_end, "teacher_temp_start": o.teacher_temp_start, "teacher_temp": o.teacher_temp,
    }
    values: dict[str, Any] = {**dict(method_defaults), **{k: v for k, v in explicit.items() if v is not None}}
    return ScheduleConfig(
        lr=peak_lr(cfg, world_size), min_lr=o.min_lr,
        warmup_steps=min(total, round(o.warmup_epochs * spe)),
        teacher_temp_warmup_steps=round(o.teacher_temp_warmup_epochs * spe),
        freeze_last_layer_steps=round(o.freeze_last_layer_epochs * spe),
        **values,
    )


class Schedules:
    """Values of every schedule at a global step, over ``total_steps`` iterations."""

    def __init__(self, cfg: ScheduleConfig | Mapping[str, Any], total_steps: int) -> None:
        self.cfg = cfg if isinstance(cfg, ScheduleConfig) else ScheduleConfig.from_mapping(cfg)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= self.cfg.warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={self.cfg.warmup_steps} must lie in [0, total_steps={total_steps}]")
        if not (0.0 <= self.cfg.momentum <= 1.0 and 0.0 <= self.cfg.momentum_end <= 1.0):
            raise ValueError(f"EMA momentum must lie in [0, 1], got {self.cfg.momentum} -> {self.cfg.momentum_end}")
        self.total_steps = total_steps

    def lr(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, self.total_steps, c.warmup_steps, c.lr, c.min_lr)

    def weight_decay(self, step: int) -> float:
        c = self.cfg
        return warmup_cosine(step, self.total_steps, 0, c.weight_decay, c.weight_decay_end)

    def momentum(self, step: int) -> float:
        """EMA momentum of the teacher (cosine towards ``momentum_end``)."""
        c = self.cfg
        return warmup_cosine(step, self.total_steps, 0, c.momentum, c.momentum_end)

    def teacher_temp(self, step: int) -> float:
        c = self.cfg
        return linear_warmup(step, c.teacher_temp_warmup_steps, c.teacher_temp_start, c.teacher_temp)

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.cfg.freeze_last_layer_steps

    def __call__(self, step: int) -> dict[str, float]:
        """All values at ``step`` (for logging)."""
        return {
            "lr": self.lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }


def apply_to_optimizer(optimizer: torch.optim.Optimizer, step: int, schedules: Schedules) -> dict[str, float]:
    """Write the scheduled lr / weight decay into every param group; returns the base values.

    Each group gets ``lr * lr_mult`` and ``weight_decay * wd_mult`` (multipliers default to 1);
    groups with ``is_last_layer`` get lr 0 while ``schedules.last_layer_frozen(step)``.
    Works on torch optimizers and on accelerate/DeepSpeed wrappers (they expose ``param_groups``).
    """
    lr, wd = schedules.lr(step), schedules.weight_decay(step)
    frozen = schedules.last_layer_frozen(step)
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if frozen and group.get("is_last_layer", False) else lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)
    return {"lr": lr, "weight_decay": wd}
