"""Throughput settings for training on GPUs (issue 16 items 5 and 8), shared by pretraining and, through
the same calls, fine-tuning (``segment/finetune.py``):

* :func:`enable_tf32`: TF32 matmuls and convolutions on Ampere and newer (compute capability >= 8),
  where fp32 work outside autocast (DINO's EMA teacher, losses) otherwise runs at fp32 speed.
* :func:`enable_sdpa`: PyTorch's ``scaled_dot_product_attention`` in timm attention modules that
  offer it but keep it off by default (timm marks Swin's as experimental); same maths, fused kernel.
* :func:`channels_last`: NHWC memory format for convolutional networks, or the convolutional parts of a
  hybrid (tensor cores want it; on CPU too it is faster).
* :func:`adamw`: ``torch.optim.AdamW`` with ``fused=True`` where the parameters are on CUDA.
* :func:`compile_module`: opt-in ``torch.compile`` of a module in place (state-dict keys unchanged).
* :func:`bound_cpu_threads`: the training process's intra-op threads capped to the cores its loader
  workers leave, on a GPU node where ``OMP_NUM_THREADS`` is unset.

Each returns what it did, so the caller can log it on rank 0.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["adamw", "bound_cpu_threads", "channels_last", "compile_module", "enable_sdpa", "enable_tf32",
           "is_convnet"]


def enable_tf32(device: torch.device | str | None = None) -> bool:
    """TF32 for fp32 matmuls and cuDNN convolutions when ``device`` is a CUDA GPU of compute
    capability 8 or more (A100, H100, RTX 30xx+). Returns whether it was enabled."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def enable_sdpa(module: nn.Module) -> int:
    """Switch every timm attention module of ``module`` that has a ``fused_attn`` flag to PyTorch's
    ``scaled_dot_product_attention``; returns how many were switched (0 for CNNs)."""
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        return 0
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn") and not m.fused_attn:
            m.fused_attn = True
            n += 1
    return n


def is_convnet(module: nn.Module) -> bool:
    """A network of convolutions without attention blocks (ResNet, ConvNeXt, EfficientNet ...)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    attention = any(hasattr(m, "fused_attn") or isinstance(m, nn.MultiheadAttention) for m in module.modules())
    return convs > 1 and not attention


def channels_last(module: nn.Module) -> bool:
    """Convert ``module`` to channels_last in place when it is a convolutional network, else its direct
    children that are (the CNN branch and decoder of a CNN + Swin hybrid); returns whether anything was
    converted (then feed NHWC inputs)."""
    if is_convnet(module):
        module.to(memory_format=torch.channels_last)
        return True
    parts = [child for child in module.children() if is_convnet(child)]
    for child in parts:
        child.to(memory_format=torch.channels_last)
    return bool(parts)


def adamw(param_groups: Iterable[dict[str, Any]] | Iterable[nn.Parameter], *, lr: float,
          betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.01, fused: bool = True
          ) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) when ``fused`` and every parameter is a
    floating-point CUDA tensor; torch's default (foreach) implementation otherwise."""
    groups = list(param_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    use_fused = fused and bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    kwargs = {"fused": True} if use_fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **kwargs)


def compile_module(module: nn.Module, *, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """``module.compile(...)`` in place: its forward runs compiled, its parameters and state-dict keys
    stay those of the module (checkpoints, EMA and export see no ``_orig_mod.`` prefix)."""
    module.compile(backend=backend, mode=mode)
    return module


def cpu_thread_budget(cores: int, local_processes: int, num_workers: int) -> int:
    """Intra-op threads for one training process: its share of the node's cores minus its loader
    workers (each a process of its own), at least 1."""
    return max(1, cores // max(1, local_processes) - max(0, num_workers))


def bound_cpu_threads(device: torch.device | str, num_workers: int,
                      environ: Mapping[str, str] = os.environ) -> int | None:
    """Cap ``torch.set_num_threads`` to :func:`cpu_thread_budget` when training on a GPU with loader
    workers and the user has not set ``OMP_NUM_THREADS``; returns the cap, or None when left alone.
    The node's processes are ``LOCAL_WORLD_SIZE`` (set by torchrun / accelerate launch), else 1.

    Why: by default the training process starts one OpenMP thread per core, which spin and take the
    cores the loader workers need. On an H200 node (16 cores, 15 workers, DINO Swin-T) that ran at
    138 images/s with the loader waited on 69 % of the time, against 369 images/s and 16 % with
    ``OMP_NUM_THREADS=1`` (session 10, BENCHMARKS.md). ``accelerate launch`` and torchrun set the
    variable to 1 themselves; this covers ``python pretrain/main.py`` without a launcher. On the CPU the
    model itself needs the threads.
    """
    if torch.device(device).type != "cuda" or num_workers <= 0 or environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cpu_thread_budget(cores, int(environ.get("LOCAL_WORLD_SIZE") or 1), num_workers)
    torch.set_num_threads(threads)
    return threads
