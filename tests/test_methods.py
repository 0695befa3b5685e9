"""Tests for pretrain.encoders, pretrain.methods and pretrain.schedules (tiny models, CPU)."""
from __future__ import annotations

import io
import json
import math

import pytest
import timm
import torch
from torch import nn

from pretrain.encoders import ENCODER_PRESETS, build_encoder
from pretrain.methods import METHODS, MultiViewNet, SSLMethod, create_method
from pretrain.schedules import ScheduleConfig, Schedules, apply_to_optimizer, linear_warmup, warmup_cosine

ARCHS = ["resnet_test", "swin_test"]
# Small heads so every method trains in well under a second on one CPU thread.
METHOD_CFG: dict[str, dict] = {
    "dino": dict(out_dim=64, hidden_dim=64, bottleneck_dim=32),
    "mocov3": dict(hidden_dim=64, out_dim=32),
    "simclr": dict(hidden_dim=64, out_dim=32),
    "byol": dict(hidden_dim=64, out_dim=32),
    "supervised": dict(num_classes=3),
}
CROP, LOCAL = 32, 16


def make_method(name: str, arch: str, **overrides) -> SSLMethod:
    torch.manual_seed(0)
    encoder, spec = build_encoder(arch, in_chans=1, img_size=CROP)
    return create_method(name, encoder, spec, **{**METHOD_CFG[name], **overrides})


def make_batch(name: str, seed: int = 1) -> dict:
    """4 smooth, distinct images; two global views (noise + a flip, so the views differ), plus 2
    local crops for DINO."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(4, 1, 4, 4, generator=g)
    images = nn.functional.interpolate(coarse, size=(CROP, CROP), mode="bilinear", align_corners=False)
    views = [images + 0.1 * torch.randn(images.shape, generator=g),
             images.flip(-1) + 0.1 * torch.randn(images.shape, generator=g)]
    if name == "dino":
        views += [v[..., :LOCAL, :LOCAL].clone() for v in views]
    return {"views": views, "label": torch.tensor([0, 1, 2, 0])}


def schedules(total: int, **overrides) -> Schedules:
    cfg = dict(lr=1e-3, min_lr=1e-4, warmup_steps=3, weight_decay=0.01, weight_decay_end=0.02,
               momentum=0.99, momentum_end=1.0, teacher_temp_start=0.04, teacher_temp=0.04,
               freeze_last_layer_steps=3)
    return Schedules({**cfg, **overrides}, total)


def train_steps(method: SSLMethod, batch: dict, sched: Schedules, steps: int) -> list[float]:
    """The training loop's fixed order: schedules -> forward -> backward -> step -> update_teacher."""
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.01))
    losses = []
    for step in range(steps):
        apply_to_optimizer(optimizer, step, sched)
        out = method(batch, step, teacher_temp=sched.teacher_temp(step))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.update_teacher(sched.momentum(step))
        losses.append(out["loss"].item())
    return losses


# ------------------------------------------------------------------------------------ encoders
@pytest.mark.parametrize("arch", ARCHS)
def test_encoder_pooled_features_and_spec_rebuilds(arch: str) -> None:
    encoder, spec = build_encoder(arch, in_chans=1, img_size=CROP)
    feats = encoder(torch.randn(2, 1, CROP, CROP))
    assert feats.shape == (2, encoder.num_features) == (2, spec["num_features"])
    spec = json.loads(json.dumps(spec))  # survives encoder.json
    assert spec["timm_kwargs"]["in_chans"] == 1 and "num_classes" not in spec["timm_kwargs"]
    rebuilt = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    rebuilt.load_state_dict(encoder.state_dict(), strict=True)
    assert len(spec["feature_channels"]) == len(spec["feature_strides"]) > 0
    if arch.startswith("swin"):
        assert spec["timm_kwargs"]["img_size"] == CROP and spec["timm_kwargs"]["strict_img_size"] is False


@pytest.mark.parametrize("window", [7, 8])
def test_swin_built_at_224_runs_multicrop_sizes(window: int) -> None:
    encoder, spec = build_encoder("swin_test", img_size=224, window_size=window)
    encoder.eval()
    with torch.no_grad():
        for size in (96, 224):
            assert encoder(torch.randn(1, 1, size, size)).shape == (1, spec["num_features"])


def test_encoder_errors() -> None:
    with pytest.raises(ValueError, match="headless"):
        build_encoder("resnet_test", num_classes=10)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("no_such_model_xyz")
    assert {"swin_lite", "swin_t", "resnet18", "resnet50", "swin_test", "resnet_test"} <= set(ENCODER_PRESETS)


def test_multiview_net_groups_same_shape_views() -> None:
    torch.manual_seed(0)
    net = MultiViewNet(nn.Sequential(nn.Flatten(1), nn.Linear(16, 5)), {"head": nn.Linear(5, 3)})
    calls = []
    net["head"].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    views = [torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 4, 4)]  # 16 px each
    outs = net(views)
    assert calls == [4, 2, 2] and len(outs) == 4
    for view, out in zip(views, outs):
        torch.testing.assert_close(out["head"], net["head"](net["backbone"](view)))


# ------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(METHODS))
def test_forward_backward_every_trainable_parameter(name: str, arch: str) -> None:
    method = make_method(name, arch)
    out = method(make_batch(name), step=0)
    loss = out["loss"]
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    loss.backward()
    missing = [n for n, p in method.student.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing
    if method.teacher is not None:
        assert all(p.grad is None for p in method.teacher.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(METHODS))
def test_loss_decreases_on_fixed_batch(name: str, arch: str) -> None:
    # On one fixed batch DINO's target moves while its centre warms up from zero (the loss first
    # plunges into a dominant prototype, then climbs back as centring removes it). center_momentum=0
    # sets the centre to the batch mean after step 0, so losses are comparable from step 1 on, and a
    # sharper teacher (0.02) keeps the centred targets of 4 near-identical random-init features informative.
    dino = name == "dino"
    method = make_method(name, arch, **({"center_momentum": 0.0} if dino else {}))
    sched = schedules(25, **({"teacher_temp_start": 0.02, "teacher_temp": 0.02} if dino else {}))
    losses = train_steps(method, make_batch(name), sched, steps=25)
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[1:4]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, [round(x, 3) for x in losses]


@pytest.mark.parametrize("name", [n for n, c in METHODS.items() if c.uses_teacher])
def test_teacher_fp32_outside_student_and_ema(name: str) -> None:
    method = make_method(name, "resnet_test")
    teacher, student = method.teacher, method.student
    assert teacher is not None and method.teacher_backbone() is teacher["backbone"]
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in teacher.parameters())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.parameters())
    method.train()
    assert not teacher["backbone"].training  # drop-path off ...
    assert all(m.training for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))  # ... batch stats on
    # A DeepSpeed-style bf16 student: inputs are cast, the loss stays fp32, the teacher stays fp32.
    student.to(torch.bfloat16)
    out = method(make_batch(name), step=0)
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5)
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    method.update_teacher(1.0)
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())
    method.update_teacher(0.0)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, s[n].float())


def test_dino_teacher_sees_only_global_views() -> None:
    method = make_method("dino", "resnet_test")
    seen: dict[str, list] = {"student": [], "teacher": []}
    for key in seen:
        getattr(method, key)["backbone"].register_forward_hook(lambda m, i, o, k=key: seen[k].append(tuple(i[0].shape)))
    out = method(make_batch("dino"), step=0, teacher_temp=0.03)
    assert seen["teacher"] == [(8, 1, CROP, CROP)]
    assert seen["student"] == [(8, 1, CROP, CROP), (8, 1, LOCAL, LOCAL)]
    assert out["teacher_temp"].item() == pytest.approx(0.03)


def test_no_teacher_methods_export_student_backbone() -> None:
    method = make_method("simclr", "swin_test")
    assert method.teacher is None and method.teacher_backbone() is method.student["backbone"]
    method.update_teacher(0.5)  # no-op
    assert method.state_for_checkpoint() == {}


def test_export_is_timm_state_dict() -> None:
    method = make_method("dino", "swin_test")
    spec = method.spec
    rebuilt = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    rebuilt.load_state_dict(method.teacher_backbone().state_dict(), strict=True)


def test_attach_routes_student_through_wrapper() -> None:
    method = make_method("byol", "resnet_test")

    class Counting(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, views):
            self.calls += 1
            return self.module(views)

    wrapper = Counting(method.student)
    method.attach(wrapper)
    method(make_batch("byol"), step=0)
    assert wrapper.calls == 1
    assert all(m is not wrapper for m in method.modules())  # the wrapper is not registered


@pytest.mark.parametrize("arch", ARCHS)
def test_param_groups_no_decay_on_norms_biases(arch: str) -> None:
    method = make_method("dino", arch)
    groups = method.param_groups(weight_decay=0.05)
    owner = {id(p): g for g in groups for p in g["params"]}
    trainable = [p for p in method.student.parameters() if p.requires_grad]
    assert len(owner) == sum(len(g["params"]) for g in groups) == len(trainable)
    for mod_name, module in method.student.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            g = owner[id(p)]
            is_norm = isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
            if is_norm or p_name == "bias" or p_name == "relative_position_bias_table":
                assert g["weight_decay"] == 0.0 and g["wd_mult"] == 0.0, f"{mod_name}.{p_name}"
            elif p.ndim > 1:
                assert g["weight_decay"] == 0.05 and g["wd_mult"] == 1.0, f"{mod_name}.{p_name}"
    last = {id(p) for p in method.student["head"].last_layer.parameters() if p.requires_grad}
    assert last and all(owner[i]["is_last_layer"] for i in last)
    assert sum(g["is_last_layer"] for g in groups) >= 1


def test_dino_last_layer_frozen_during_window() -> None:
    method = make_method("dino", "resnet_test")
    sched = schedules(10, freeze_last_layer_steps=3)
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.01))
    last = method.student["head"].last_layer
    start = {n: p.detach().clone() for n, p in last.named_parameters()}
    batch = make_batch("dino")
    for step in range(5):
        apply_to_optimizer(optimizer, step, sched)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        if 0 < step < 3:
            assert all(lr == 0.0 for n, lr in lrs.items() if n.startswith("last_layer"))
            assert all(lr > 0.0 for n, lr in lrs.items() if not n.startswith("last_layer"))
        optimizer.zero_grad()
        method(batch, step)["loss"].backward()
        optimizer.step()
        method.update_teacher(sched.momentum(step))
        if step == 2:
            assert all(torch.equal(p, start[n]) for n, p in last.named_parameters())
    assert not torch.equal(last.weight_v, start["weight_v"])


def test_state_round_trip_restores_teacher_and_centre() -> None:
    method = make_method("dino", "swin_test")
    train_steps(method, make_batch("dino"), schedules(5), steps=2)
    buffer = io.BytesIO()
    torch.save(method.checkpointable().state_dict(), buffer)
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in method.state_for_checkpoint().items()}
    assert set(saved) == {"teacher", "criterion"} and "center" in saved["criterion"]
    train_steps(method, make_batch("dino", seed=2), schedules(5), steps=2)
    assert not torch.equal(method.criterion.center, saved["criterion"]["center"])
    buffer.seek(0)
    method.checkpointable().load_state_dict(torch.load(buffer, weights_only=True))
    for key, state in method.state_for_checkpoint().items():
        for n, t in state.items():
            assert torch.equal(t, saved[key][n]), f"{key}.{n}"
    with pytest.raises(ValueError, match="checkpoint state"):
        method.load_state_for_checkpoint({"teacher": saved["teacher"]})


def test_registry_and_input_errors() -> None:
    with pytest.raises(ValueError, match="unknown pretraining method"):
        create_method("swav", *build_encoder("resnet_test"))
    with pytest.raises(ValueError, match="unknown options"):
        create_method("dino", *build_encoder("resnet_test"), out_dims=8)
    with pytest.raises(ValueError, match="num_classes"):
        create_method("supervised", *build_encoder("resnet_test"))
    method = make_method("supervised", "resnet_test")
    with pytest.raises(ValueError, match="label"):
        method({"views": make_batch("supervised")["views"]})
    with pytest.raises(ValueError, match="at least 2"):
        make_method("simclr", "resnet_test")({"views": make_batch("simclr")["views"][:1]})


# ----------------------------------------------------------------------------------- schedules
def test_warmup_cosine_endpoints_and_monotonicity() -> None:
    total, warmup, base, final = 50, 10, 1e-3, 1e-5
    values = [warmup_cosine(s, total, warmup, base, final) for s in range(total + 5)]
    assert values[0] == 0.0 and values[warmup] == pytest.approx(base)
    assert values[total - 1] == pytest.approx(final) and values[-1] == pytest.approx(final)
    assert all(a < b for a, b in zip(values[:warmup], values[1 : warmup + 1]))
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1 :]))
    assert warmup_cosine(0, total, 0, base, final) == pytest.approx(base)
    for bad in [dict(total=0, warmup=0), dict(total=5, warmup=6)]:
        with pytest.raises(ValueError):
            warmup_cosine(0, base=1.0, final=0.0, **bad)


def test_schedules_values() -> None:
    sched = Schedules(ScheduleConfig(lr=0.1, min_lr=0.0, warmup_steps=5, weight_decay=0.04, weight_decay_end=0.4,
                                     momentum=0.996, momentum_end=1.0, teacher_temp_start=0.04, teacher_temp=0.07,
                                     teacher_temp_warmup_steps=10, freeze_last_layer_steps=4), total_steps=100)
    mom = [sched.momentum(s) for s in range(100)]
    wd = [sched.weight_decay(s) for s in range(100)]
    temp = [sched.teacher_temp(s) for s in range(100)]
    assert mom[0] == pytest.approx(0.996) and mom[-1] == pytest.approx(1.0)
    assert wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.4)
    assert all(a <= b for a, b in zip(mom, mom[1:])) and all(a <= b for a, b in zip(wd, wd[1:]))
    assert temp[0] == pytest.approx(0.04) and temp[10] == temp[-1] == pytest.approx(0.07)
    assert all(a <= b for a, b in zip(temp, temp[1:]))
    assert sched.last_layer_frozen(3) and not sched.last_layer_frozen(4)
    assert sched.lr(5) == pytest.approx(0.1) and set(sched(7)) == {"lr", "weight_decay", "momentum", "teacher_temp"}
    assert linear_warmup(3, 0, 1.0, 2.0) == 2.0
    with pytest.raises(ValueError, match="unknown schedule keys"):
        Schedules({"lr": 0.1, "lr_typo": 1}, 10)
    with pytest.raises(ValueError):
        Schedules({"warmup_steps": 20}, 10)


def test_apply_to_optimizer_multipliers() -> None:
    p1, p2, p3 = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([
        {"params": [p1], "lr_mult": 0.5, "wd_mult": 1.0},
        {"params": [p2], "wd_mult": 0.0},
        {"params": [p3], "is_last_layer": True},
    ])
    sched = schedules(20, warmup_steps=0, freeze_last_layer_steps=2)
    values = apply_to_optimizer(optimizer, 1, sched)
    lr, wd = values["lr"], values["weight_decay"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * lr, lr, 0.0])
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([wd, 0.0, wd])
    apply_to_optimizer(optimizer, 2, sched)
    assert optimizer.param_groups[2]["lr"] == pytest.approx(sched.lr(2)) and sched.lr(2) > 0
