"""Helper for tests/test_pretrain_gpu_ready.py (not a test): one CPU process, DeepSpeed ZeRO-2 bf16
through accelerate, a tiny DINO; two optimizer steps, then one EMA update, compared with the
reference update from the ZeRO optimizer's own fp32 partitions. Prints one JSON line."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

T0 = time.monotonic()

import torch

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin  # noqa: E402
from torch._utils import _unflatten_dense_tensors  # noqa: E402

from pretrain.encoders import build_encoder  # noqa: E402
from pretrain.methods import create_method  # noqa: E402

torch.manual_seed(0)
ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
      "bf16": {"enabled": True}, "data_types": {"buffer_dtype": "bf16"}, "zero_allow_untested_optimizer": True,
      "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}}
print(f"imports {time.monotonic() - T0:.0f} s", file=sys.stderr)
acc = Accelerator(mixed_precision="bf16", deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds))
encoder, spec = build_encoder("test_resnet", in_chans=1)
method = create_method("dino", encoder, spec, out_dim=32, hidden_dim=16, bottleneck_dim=8)
optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.04), lr=0.05)
engine, optimizer = acc.prepare(method.student, optimizer)
method.attach(engine)
print(f"prepared {time.monotonic() - T0:.0f} s", file=sys.stderr)
method.train()
for step in range(2):
    views = [torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32), torch.rand(4, 1, 16, 16)]
    loss = method({"views": views}, step)["loss"]
    acc.backward(loss)
    optimizer.step()
    optimizer.zero_grad()

print(f"trained {time.monotonic() - T0:.0f} s", file=sys.stderr)
zero = engine.optimizer
masters: dict[int, torch.Tensor] = {}
groups = getattr(zero, "round_robin_bit16_groups", None) or zero.bit16_groups
for params, flat in zip(groups, zero.single_partition_of_fp32_groups):
    n = sum(p.numel() for p in params)
    for p, value in zip(params, _unflatten_dense_tensors(flat[:n], params)):
        masters[id(p)] = value.float()
student = dict(method.student.named_parameters())
names = [n for n, _ in method.teacher.named_parameters()]
before = {n: t.detach().clone() for n, t in method.teacher.named_parameters()}
m = 0.9
method.update_teacher(m)
after = dict(method.teacher.named_parameters())
err_master = max(float((after[n] - (m * before[n] + (1 - m) * masters.get(id(student[n]), student[n].detach().float()))).abs().max()) for n in names)
err_bf16 = max(float((after[n] - (m * before[n] + (1 - m) * student[n].detach().float())).abs().max()) for n in names)
print(json.dumps({"student_dtype": str(next(iter(student.values())).dtype), "err_master": err_master,
                  "err_bf16": err_bf16, "params": len(names)}))
