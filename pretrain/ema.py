"""fp32 sources for the EMA teacher update (issue 16 item 5).

Under DeepSpeed bf16/fp16 the student's module parameters are low-precision copies; the optimizer
holds the fp32 master weights, partitioned across data-parallel ranks (ZeRO-1/2: each parameter has
``_hp_mapping``, the fragment of it this rank owns; ZeRO-3: ``ds_id``). An EMA read from the module
parameters would average bf16-rounded weights: with momentum 0.996 the teacher then converges to
``bf16(student)``, up to 2^-9 relative error per weight, and every step's sub-bf16 change of the
student is lost. :func:`fp32_sources` returns the fp32 master values instead:

* ZeRO-1/2 (and DeepSpeed's bf16 optimizer): every rank copies the fragments it owns into one flat
  fp32 buffer of zeros and a single all-reduce (sum) assembles the full weights: one collective per
  step, of the model's size (DeepSpeed's own ``safe_get_full_fp32_param`` does one per parameter).
* ZeRO-3: ``deepspeed.utils.safe_get_full_fp32_param`` per parameter (collective; ZeRO-3 is the
  "supported, slower" stage).
* Anything else (fp32 parameters, DDP, one CPU process): the parameters themselves.

Collective under DeepSpeed: call it on every rank, every step (the EMA update is).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["fp32_sources"]


def fp32_sources(params: Sequence[nn.Parameter]) -> list[Tensor]:
    """fp32 values of ``params`` for the EMA: the optimizer's master weights where DeepSpeed keeps
    the module parameters in bf16/fp16, else the parameters (detached). Same order as ``params``."""
    params = list(params)
    low = [p for p in params if p.is_floating_point() and p.dtype != torch.float32]
    if not low:
        return [p.detach() for p in params]
    if any(hasattr(p, "ds_id") for p in params):
        from deepspeed.utils import safe_get_full_fp32_param  # deepspeed: heavy, only for ZeRO-partitioned parameters

        out = []
        for p in params:
            full = safe_get_full_fp32_param(p)
            out.append(full if full is not None else p.detach().float())
        return out
    mapped = [p for p in params if hasattr(p, "_hp_mapping")]
    if not mapped:  # low precision without master weights (e.g. a module cast by hand): nothing better
        return [p.detach().float() for p in params]

    device = mapped[0].device
    flat = torch.zeros(sum(p.numel() for p in mapped), dtype=torch.float32, device=device)
    views, offset = {}, 0
    for p in mapped:
        view = flat.narrow(0, offset, p.numel())
        mapping = p._hp_mapping
        if mapping is not None:  # this rank owns a fragment of p
            address = mapping.lp_fragment_address
            view.narrow(0, address.start, address.numel).copy_(mapping.get_hp_fragment().data.flatten())
        views[id(p)] = view.view_as(p)
        offset += p.numel()
    group = getattr(mapped[0], "_dp_group", None)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1:
        dist.all_reduce(flat, group=group)
    return [views[id(p)] if id(p) in views else p.detach().float() for p in params]
