"""One home for the warm-up + cosine step schedule (issue 15): fine-tuning's LR factors come from
pretrain.schedules.warmup_cosine_factor and are, bit for bit, what segment.finetune computed itself before."""
from __future__ import annotations

import math

import pytest

import segment.finetune as ft
from pretrain.schedules import warmup_cosine, warmup_cosine_factor
from segment.config import DataConfig, FinetuneConfig, OptimConfig, Schedule, TrainConfig


def reference_factor(step: int, warmup: int, total: int, cosine: bool, fraction: float | None) -> float:
    """segment.finetune.lr_lambdas' own formula before the move (frozen copy)."""
    if step < warmup:
        return (step + 1) / warmup
    if cosine:
        t = (step - warmup) / max(1, total - warmup)
        if fraction is not None:
            t = max(t, fraction)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return 1.0


STEPS = [0, 1, 2, 5, 9, 10, 11, 17, 33, 50, 64, 98, 99, 100, 101, 150]


@pytest.mark.parametrize("warmup,total", [(0, 100), (10, 100), (7, 37), (100, 100), (3, 1)])
@pytest.mark.parametrize("cosine", [True, False])
@pytest.mark.parametrize("fraction", [None, 0.0, 0.3, 0.75, 1.2])
def test_factor_equals_the_former_finetune_formula(warmup, total, cosine, fraction):
    for step in STEPS:
        assert warmup_cosine_factor(step, warmup, total, cosine=cosine, fraction=fraction) == \
            reference_factor(step, warmup, total, cosine, fraction)


def finetune_cfg(schedule: Schedule, *, steps: int = 100, warmup_epochs: float = 1.0,
                 freeze_epochs: int = 0) -> FinetuneConfig:
    return FinetuneConfig(data=DataConfig(root="unused"), out="unused",
                          optim=OptimConfig(schedule=schedule, warmup_epochs=warmup_epochs),
                          train=TrainConfig(steps=steps, freeze_encoders_epochs=freeze_epochs))


@pytest.mark.parametrize("schedule", list(Schedule))
@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0, 2.5])
def test_lr_lambdas_give_the_same_numbers(schedule, warmup_epochs):
    spe = 10
    cfg = finetune_cfg(schedule, steps=100, warmup_epochs=warmup_epochs, freeze_epochs=1)
    warmup, total = int(warmup_epochs * spe), ft.total_steps(cfg, spe)
    groups = [dict(is_encoder=True), dict(is_encoder=False)]
    clock = [0.0]
    for fraction in (None, 0.6):
        encoder, decoder = ft.lr_lambdas(groups, cfg, spe, None if fraction is None else lambda: clock[0])
        clock[0] = fraction or 0.0
        for step in STEPS:
            want = reference_factor(step, warmup, total, schedule == Schedule.cosine, fraction)
            assert decoder(step) == want
            assert encoder(step) == (0.0 if step < spe else want)  # encoders frozen for the first epoch


def test_pretrain_warmup_cosine_unchanged():
    """The pretraining schedule (DINO's convention: final value from step total - 1) at a few steps."""
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.0) == 0.5
    assert warmup_cosine(10, 100, 10, 1.0, 0.0) == 1.0
    assert warmup_cosine(99, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(150, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    mid = 10 + (100 - 10 - 1) / 2
    assert warmup_cosine(int(mid), 100, 10, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 44 / 89)))
