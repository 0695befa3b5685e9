"""pretrain.main / train / config / knn / checkpointing: single-process runs on tiny models and data (CPU)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pretrain.accelerate_setup import deepspeed_config
from pretrain.checkpointing import PREEMPT_FILE, STATE_FILE, Preemption, TrainState, list_checkpoints
from pretrain.config import CONFIG_DIR, PretrainConfig
from pretrain.knn import (
    KnnProbe,
    extract_features,
    knn_accuracy,
    load_holdout,
    refit_batchnorm,
    write_synthetic_holdout,
)
from pretrain.main import resolve_out_override  # importing pretrain.main registers the Hydra schemas
from pretrain.schedules import peak_lr
from pretrain.train import train

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A run of seconds: 12 synthetic 64 px images in 6 shards, 32/16 px crops, a 0.4 M parameter ResNet
# (timm `test_resnet`, the CNN branch of segment's cs_unet_test / unet_test), DINO with a tiny head.
TINY = [
    "encoder.name=test_resnet",
    "data.synthetic.n_per_kind=6", "data.synthetic.size=64", "data.synthetic.shard_size=2",
    "data.views.global_size=32", "data.views.local_size=16", "data.views.n_local=2", "data.num_workers=0",
    "method.options.out_dim=64", "method.options.hidden_dim=32", "method.options.bottleneck_dim=16",
    "optim.batch_size=4", "optim.epochs=2", "optim.steps_per_epoch=3", "optim.base_lr=0.01",
    "checkpoint.every=3", "checkpoint.poll_every=1",
    "knn.every=3", "knn.synthetic_per_class=2", "knn.crop_size=48", "knn.crops_per_image=2",
    "log.every=1", "log.progress=false",
]


def compose_cfg(*overrides: str) -> PretrainConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("pretrain", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ full run
def test_tiny_run_writes_metrics_checkpoints_and_a_loadable_export(tmp_path):
    from segment.models import create_model
    from segment.weights import load_model_encoders

    out = tmp_path / "run"
    result = train(compose_cfg(f"out={out}", *TINY))

    assert result["stopped"] == "completed" and result["step"] == result["total_steps"] == 6
    assert result["resumed_from"] is None and result["export"] == str(out / "export")
    assert 0.0 <= result["knn_top1_init"] <= 1.0 and 0.0 <= result["knn_top1"] <= 1.0

    rows = read_csv(out / "metrics.csv")
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5, 6]
    logged = ("loss", "teacher_entropy", "lr", "weight_decay", "momentum", "teacher_temp", "images_per_s", "grad_norm")
    for key in logged:
        assert all(float(r[key]) == float(r[key]) for r in train_rows), key  # present, not NaN
    assert float(train_rows[0]["lr"]) == 0.0 and float(train_rows[1]["lr"]) > 0  # warm-up from 0
    assert [int(r["step"]) for r in rows if r["knn_top1"]] == [0, 3, 6]  # random init first
    assert list((out / "tb").glob("events.out.tfevents.*"))

    assert [step for step, _ in list_checkpoints(out)] == [3, 6]
    state = json.loads((out / "checkpoints" / "step_0000006" / STATE_FILE).read_text())
    assert state["step"] == 6 and state["config"]["method"]["name"] == "dino"
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["batch_size"] == 4

    meta = json.loads((out / "export" / "encoder.json").read_text())
    assert meta["timm_name"] == "test_resnet" and meta["in_chans"] == 1 and meta["method"] == "dino"
    assert meta["mean"] == [0.5] and meta["std"] == [0.25] and meta["steps"] == 6
    assert meta["intensity"] == "percentile" and "synthetic corpus" in meta["data"]
    # the export carries its k-NN probe (launch.study shows it next to the fine-tuning results)
    assert meta["knn"]["top1_init"] == result["knn_top1_init"] and meta["knn"]["top1"] == result["knn_top1"]
    for name, branch in (("cs_unet_test", "cnn"), ("unet_test", "cnn")):
        model = create_model(name, num_classes=3, in_chans=1)
        report = load_model_encoders(model, {branch: str(out / "export")})[branch]
        assert report.ok and not report.missing and report.loaded, report.summary()

    rank = json.loads((out / "ranks" / "rank_0.json").read_text())
    assert rank["step"] == 6 and rank["samples"] == 6 * 4 and rank["shards_read"]


def test_swin_export_loads_into_the_cs_unet_swin_branch(tmp_path):
    """The exported teacher of a Swin with cs_unet_test's architecture fills its Swin branch."""
    from accelerate import Accelerator

    from pretrain.encoders import build_encoder
    from pretrain.probe_export import export_backbone
    from pretrain.methods import create_method
    from segment.models import create_model
    from segment.weights import load_model_encoders

    cfg = PretrainConfig()
    swin = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)
    encoder, spec = build_encoder("swin_tiny_patch4_window7_224", in_chans=1, img_size=64, **swin)
    method = create_method("dino", encoder, spec, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(1.0)  # the export must be the teacher's
    export_backbone(method, spec, tmp_path / "export", cfg=cfg, steps=0, data="test", accelerator=Accelerator(cpu=True))
    model = create_model("cs_unet_test", num_classes=3, in_chans=1, img_size=128)
    report = load_model_encoders(model, {"swin": str(tmp_path / "export")})["swin"]
    assert report.ok and not report.missing, report.summary()
    key = "patch_embed.proj.weight"
    assert torch.equal(model.encoders["swin"].state_dict()[key], method.teacher["backbone"].state_dict()[key])


def test_sigterm_checkpoints_exits_0_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    args = [PYTHON, "-m", "pretrain.main", f"out={out}", *TINY, "optim.epochs=40", "checkpoint.every=0", "knn.every=0"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.csv").is_file() and len(read_csv(out / "metrics.csv")) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    assert "pre-empted" in log
    (stopped_at, _), = list_checkpoints(out)
    assert 2 <= stopped_at < 120
    assert not (out / "export").exists()  # pre-emption is not the end of training

    result = train(compose_cfg(f"out={out}", *TINY, "optim.epochs=40", "checkpoint.every=0", "knn.every=0",
                               f"stop_at_step={stopped_at + 2}"))
    assert result["resumed_from"] == stopped_at and result["step"] == stopped_at + 2
    assert result["stopped"] == "stop_at_step"
    steps = [int(r["step"]) for r in read_csv(out / "metrics.csv")]
    assert steps == list(range(1, stopped_at + 3))  # no step logged twice, none lost
    assert json.loads((out / "ranks" / "rank_0.json").read_text())["start_step"] == stopped_at
    state = json.loads((out / "checkpoints" / f"step_{stopped_at + 2:07d}" / STATE_FILE).read_text())
    assert state["step"] == stopped_at + 2


# ------------------------------------------------------------------------------------ pre-emption
def test_preemption_flag_file_and_signal(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    watcher = Preemption(acc, tmp_path, poll_every=2)
    try:
        (tmp_path / PREEMPT_FILE).touch()
        watcher.clear_stale_flag()  # a flag left by the previous job is not a request
        assert not (tmp_path / PREEMPT_FILE).exists()
        assert not watcher.requested(2)
        (tmp_path / PREEMPT_FILE).touch()
        assert not watcher.requested(3)  # only polled every 2 steps
        assert watcher.requested(4)
        watcher.acknowledge()
        assert not (tmp_path / PREEMPT_FILE).exists() and not watcher.requested(6)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watcher.requested(8)
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGUSR1) is not watcher._handle


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_0000004", True), ("step_0000008", False), (".tmp-step_0000012", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
    state = TrainState()
    state.load_state_dict({"step": 7, "images": 28, "elapsed": 1.5, "resumes": 1, "unknown": 0})
    assert (state.step, state.images, state.resumes) == (7, 28, 1)


# ------------------------------------------------------------------------------------------ config
def test_defaults_compose_and_derived_values():
    cfg = compose_cfg()
    assert cfg.method.name.value == "dino" and cfg.encoder.name == "swin_lite" and cfg.data.shards is None
    assert cfg.distributed.deepspeed is None
    assert peak_lr(cfg, world_size=4) == pytest.approx(cfg.optim.base_lr * cfg.optim.batch_size * 4 / 256)
    cfg = compose_cfg("pretrain/method=simclr", "pretrain/encoder=resnet18", "optim.lr=0.1")
    assert cfg.method.name.value == "simclr" and "temperature" in cfg.method.options
    assert peak_lr(cfg, world_size=8) == 0.1
    cfg = compose_cfg("pretrain/experiment=swin_t_dino", "data.shards=/data/shards")
    assert cfg.encoder.name == "swin_t" and cfg.data.views.global_size == 224 and cfg.method.options["out_dim"] == 65536


@pytest.mark.parametrize("override, message", [
    ("bogus=1", "Key 'bogus' not in 'PretrainConfig'"),
    ("optim.bogus=1", "Key 'bogus' not in 'OptimConfig'"),
    ("method.name=dinox", "Invalid value 'dinox', expected one of [dino, mocov3, simclr, byol, supervised]"),
    ("distributed.deepspeed=zero4", "Invalid value 'zero4'"),
    ("precision=fp64", "Invalid value 'fp64'"),
    ("optim.batch_size=many", "Value 'many' of type 'str' could not be converted to Integer"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(override)
    text = f"{info.value} {info.value.__cause__}"
    assert message in text, text


def test_bad_values_and_options_stop_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match=r"optim.batch_size=0"):
        train(compose_cfg(f"out={tmp_path}", "optim.batch_size=0"))
    with pytest.raises(ValueError, match=r"unknown options \['bottleneck_dim'.*pretrain/method=simclr"):
        train(compose_cfg(f"out={tmp_path}", *TINY, "method.name=simclr", "knn.every=0"))


def test_cli_rejects_a_multi_process_run_without_out():
    with pytest.raises(SystemExit, match="out=DIR"):
        resolve_out_override(["optim.epochs=2"], {"WORLD_SIZE": "2", "RANK": "0"})
    assert resolve_out_override(["out=runs/x"], {"WORLD_SIZE": "2", "RANK": "0"}) == []
    slurm = {"WORLD_SIZE": "2", "RANK": "0", "SLURM_JOB_ID": "77"}
    assert resolve_out_override([], slurm) == ["out=runs/pretrain/slurm-77"]
    quiet = resolve_out_override(["out=runs/x"], {"WORLD_SIZE": "2", "RANK": "1"})
    assert "hydra.output_subdir=null" in quiet and "hydra/job_logging=stdout" in quiet
    assert resolve_out_override([], {}) == []


def test_deepspeed_config_gets_the_loop_settings_as_numbers(tmp_path):
    cfg = compose_cfg("distributed.deepspeed=zero2", "optim.batch_size=24", "optim.grad_accum=3", "optim.clip_grad=1.5")
    ds = deepspeed_config(cfg, mixed_precision="bf16", environ={})
    assert ds["train_micro_batch_size_per_gpu"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["data_types"]["buffer_dtype"] == "bf16"  # BatchNorm under DeepSpeed bf16
    assert "optimizer" not in ds and "train_batch_size" not in ds
    assert deepspeed_config(compose_cfg(), environ={}) is None
    launched = {"ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(CONFIG_DIR / "deepspeed" / "zero3.json")}
    assert deepspeed_config(compose_cfg(), environ=launched)["zero_optimization"]["stage"] == 3
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="remove the 'optimizer' block"):
        deepspeed_config(compose_cfg(f"distributed.deepspeed_config={bad}"), environ={})


def fake_gpu(monkeypatch, name: str, *, native_bf16: bool) -> None:
    """torch.cuda as on a GPU: with native bf16 (A100, H100) or only emulating it (V100, T4), where
    is_bf16_supported() says True and is_bf16_supported(including_emulation=False) says False."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if native_bf16 else (7, 0))


def test_auto_precision_is_fp16_with_a_scaler_where_bf16_is_only_emulated(monkeypatch, caplog):
    """precision=auto: bf16 on a GPU with native bf16, fp16 on one that only emulates it (accelerate adds
    the gradient scaler; DeepSpeed casts BatchNorm buffers to fp16 too), fp32 without a GPU; the choice
    is logged (issue 16 item 4)."""
    import accelerate

    from pretrain.config import Precision
    from pretrain.accelerate_setup import build_accelerator, resolve_precision

    fake_gpu(monkeypatch, "Tesla V100-SXM2-32GB", native_bf16=False)
    assert resolve_precision(Precision.auto) == "fp16"
    assert resolve_precision(Precision.bf16) == "bf16" and resolve_precision(Precision.no) == "no"
    ds = deepspeed_config(compose_cfg("distributed.deepspeed=zero2"), mixed_precision="fp16", environ={})
    assert ds["data_types"]["buffer_dtype"] == "fp16"  # BatchNorm under DeepSpeed fp16

    made = []

    class Recorder:  # stands in for accelerate.Accelerator, which would need the GPU
        is_main_process, num_processes, scaler = True, 1, torch.amp.GradScaler("cpu")

        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Recorder)
    with caplog.at_level("INFO", logger="pretrain.accelerate_setup"):
        build_accelerator(compose_cfg())
    assert made[-1]["mixed_precision"] == "fp16" and made[-1]["cpu"] is False
    assert "precision=auto: fp16" in caplog.text and "V100" in caplog.text and "GradScaler" in caplog.text

    fake_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", native_bf16=True)
    assert resolve_precision(Precision.auto) == "bf16"
    caplog.clear()
    with caplog.at_level("INFO", logger="pretrain.accelerate_setup"):
        build_accelerator(compose_cfg())
    assert made[-1]["mixed_precision"] == "bf16" and "precision=auto: bf16" in caplog.text and "A100" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(Precision.auto) == "no"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_files(stage):
    ds = json.loads((CONFIG_DIR / "deepspeed" / f"zero{stage}.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and "optimizer" not in ds and "scheduler" not in ds
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert isinstance(ds[key], int)
    for key, value in ds["zero_optimization"].items():
        if key.endswith(("bucket_size", "threshold", "parameters", "distance", "sub_group_size")):
            assert isinstance(value, int), key  # accelerate cannot resolve "auto" here for a timm model


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    files = {p.stem: p for p in (CONFIG_DIR / "accelerate").glob("*.yaml")}
    expected = {"cpu", "single_gpu", "multi_gpu", "multi_node", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"}
    assert expected <= set(files)
    for name, path in files.items():
        config = load_config_from_file(str(path))
        assert config.compute_environment.value == "LOCAL_MACHINE", name
        if name.startswith("deepspeed"):
            assert config.distributed_type == DistributedType.DEEPSPEED
            assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()
            assert config.mixed_precision is None  # accelerate refuses it beside a DeepSpeed JSON
        if name == "multi_node":
            assert config.num_machines > 1 and config.rdzv_backend == "c10d"
    assert load_config_from_file(str(files["cpu"])).use_cpu


# --------------------------------------------------------------------------------------------- k-NN
def _reference_knn(train_f, train_y, test_f, test_y, k, t, classes):
    """Loop version of DINO's weighted vote, for comparison."""
    train_f = torch.nn.functional.normalize(train_f, dim=1)
    test_f = torch.nn.functional.normalize(test_f, dim=1)
    correct = 0
    for f, y in zip(test_f, test_y):
        sims = train_f @ f
        top = sims.argsort(descending=True)[:k]
        votes = [sum(float(torch.exp(sims[i] / t)) for i in top if train_y[i] == c) for c in range(classes)]
        correct += int(max(range(classes), key=votes.__getitem__) == int(y))
    return correct / len(test_y)


def test_knn_accuracy_matches_a_reference_and_validates_input():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    y_train, y_test = torch.arange(60) % 3, torch.arange(30) % 3
    x_train = centres[y_train] + 0.9 * torch.randn(60, 16, generator=g)
    x_test = centres[y_test] + 0.9 * torch.randn(30, 16, generator=g)
    for k, t in ((1, 0.07), (5, 0.1), (20, 0.5), (100, 0.07)):
        ours = knn_accuracy(x_train, y_train, x_test, y_test, k=k, temperature=t, chunk_size=7)
        assert ours == pytest.approx(_reference_knn(x_train, y_train, x_test, y_test, min(k, 60), t, 3))
    assert knn_accuracy(centres, torch.arange(3), 5 * centres, torch.arange(3), k=1) == 1.0  # cosine: scale-free
    with pytest.raises(ValueError, match="one D"):
        knn_accuracy(x_train, y_train, x_test[:, :8], y_test)
    with pytest.raises(ValueError, match="one label per feature"):
        knn_accuracy(x_train, y_train[:5], x_test, y_test)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_accuracy(x_train, y_train, x_test, y_test, k=0)


def test_holdout_layouts(tmp_path):
    root = write_synthetic_holdout(tmp_path / "h", n_per_class=2, size=64)
    h = load_holdout(root, crop_size=48, img_size=32, crops_per_image=4)
    assert h.classes == ["coating", "superalloy"]
    assert h.train_images.shape == (16, 1, 32, 32) and h.test_images.shape == (16, 1, 32, 32)
    assert h.train_labels.tolist() == [0] * 8 + [1] * 8
    assert abs(float(h.train_images.mean())) < 2  # normalised with mean/std
    flat = tmp_path / "flat"  # class folders without a train/test split: images alternate
    for split in ("train", "test"):
        for f in (root / split).rglob("*.tif"):
            dst = flat / f.parent.name / f"{split}_{f.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    h = load_holdout(flat, crop_size=48, img_size=32, crops_per_image=1, in_chans=3)
    assert h.train_images.shape == (4, 3, 32, 32) and h.test_images.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="at least 2 classes"):
        load_holdout(flat / "coating")


def test_refit_batchnorm_is_temporary_and_only_for_the_probe(tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=0, in_chans=1).train()
    images = 3.0 + torch.randn(8, 1, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = extract_features(model, images)
    with refit_batchnorm(model, images, batch_size=4):
        bn = model.bn1
        assert bn.running_mean.abs().sum() > 0 and bn.momentum is None
        fitted = extract_features(model, images)
    assert not torch.allclose(plain, fitted)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics restored
    assert model.training and model.bn1.momentum == 0.1
    h = load_holdout(write_synthetic_holdout(tmp_path / "h", n_per_class=2, size=64), crop_size=48, img_size=32)
    assert 0.0 <= KnnProbe(h, k=3)(model)["knn_top1"] <= 1.0
