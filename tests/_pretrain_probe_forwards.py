"""Helper for tests/test_pretrain_gpu_ready.py (not a test): runs pretrain.train.train with Hydra
overrides from argv and records, per rank, the input shape of every forward call of the *student's*
backbone (the module DDP/DeepSpeed train), into <out>/forwards_rank<R>.json."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pretrain.main  # noqa: F401  (registers the schemas)
from pretrain import train as T
from pretrain.config import CONFIG_DIR

calls: list[list[int]] = []
_build = T.build_method


def build_method(cfg, *, labels=None):
    method, spec = _build(cfg, labels=labels)
    method.student["backbone"].register_forward_hook(lambda m, args, out: calls.append(list(args[0].shape)))
    return method, spec


T.build_method = build_method
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = OmegaConf.to_object(compose("pretrain", overrides=sys.argv[1:]))
T.train(cfg)
Path(cfg.out, f"forwards_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls))
