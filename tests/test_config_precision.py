"""One precision enum (issue 15): pretrain.config.Precision serves pretraining's `precision` and fine-tuning's
`train.precision`; each key accepts what it accepted before (pretraining: auto | no | bf16 | fp16, fine-tuning:
no | bf16 | fp16)."""
from __future__ import annotations

import typing

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pretrain.config import Precision, PretrainConfig
from segment.config import FinetuneConfig, TrainConfig


def finetune(precision: str) -> FinetuneConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig),
                          {"out": "unused", "data": {"root": "unused"}, "train": {"precision": precision}})
    return OmegaConf.to_object(cfg)


def pretrain(precision: str) -> PretrainConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), {"precision": precision}))


def test_both_configs_use_the_one_enum():
    assert typing.get_type_hints(TrainConfig)["precision"] is Precision
    assert typing.get_type_hints(PretrainConfig)["precision"] is Precision
    assert TrainConfig().precision is Precision.no and PretrainConfig().precision is Precision.auto


@pytest.mark.parametrize("value", ["auto", "no", "bf16", "fp16"])
def test_pretraining_accepts_auto_and_the_mixed_precisions(value):
    assert pretrain(value).precision is Precision(value)


@pytest.mark.parametrize("value", ["no", "bf16", "fp16"])
def test_finetuning_accepts_the_mixed_precisions(value):
    assert finetune(value).train.precision is Precision(value)


def test_finetuning_refuses_auto_and_unknown_values():
    with pytest.raises(ValueError, match="train.precision must be one of no, bf16, fp16"):
        finetune("auto")
    with pytest.raises(ValidationError):
        finetune("fp32")
    with pytest.raises(ValidationError):
        pretrain("fp32")
