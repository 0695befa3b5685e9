"""Issue 16 ("Ready for real GPUs"): the defects a GPU cluster would hit first, tested on the CPU.

Items: 1 data starvation (device-side photometric views, blur kernel, pinned batches, data_wait),
2 every rank runs the same student forwards (k-NN probe of teacherless methods), 5 TF32 and the EMA
from DeepSpeed's fp32 master weights, 8 throughput basics (no per-step host syncs, SDPA, channels_last,
fused AdamW). Item 6 is in test_pretrain_data.py, 3/4/7 in test_launch/test_pretrain_main/test_pretrain_dist.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pretrain.device_augment import PhotometricAugment
from pretrain.views import Augment, MultiCrop, TwoViews

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "encoder.name=test_resnet",
    "data.synthetic.n_per_kind=6", "data.synthetic.size=64", "data.synthetic.shard_size=2",
    "data.views.global_size=32", "data.views.local_size=16", "data.views.n_local=2", "data.num_workers=0",
    "method.options.out_dim=64", "method.options.hidden_dim=32", "method.options.bottleneck_dim=16",
    "optim.batch_size=4", "optim.epochs=2", "optim.steps_per_epoch=3", "optim.base_lr=0.01",
    "checkpoint.every=0", "knn.every=0", "log.progress=false", "log.tensorboard=false",
]


# --------------------------------------------------------------------------------------- item 1
def _blur_sizes(views) -> list[int]:
    sizes = []
    for compose in getattr(views, "global_views", getattr(views, "transforms", [])):
        for t in compose.transforms:
            inner = t.transforms if isinstance(t, v2.RandomApply) else [t]
            sizes += [b.kernel_size[0] for b in inner if isinstance(b, v2.GaussianBlur)]
    return sizes


def test_blur_kernel_covers_three_sigma_not_a_tenth_of_the_crop():
    """sigma <= 2 px needs 2 ceil(3 x 2) + 1 = 13 taps; 10 % of a 224 px crop gave 23."""
    assert _blur_sizes(MultiCrop(224, 96, 2)) == [13, 13]
    assert _blur_sizes(TwoViews(224)) == [13, 13]
    assert _blur_sizes(TwoViews(8, augment=Augment(blur_sigma=(0.1, 2.0)))) == [7, 7]  # capped by the crop


@pytest.mark.parametrize("whole_batch", [False, True], ids=["cpu_indexing", "gpu_where"])
@pytest.mark.parametrize("u", [0.25, 0.75])
def test_device_augment_equals_torchvision_per_sample(monkeypatch, u, whole_batch):
    """With the random draws fixed at ``u``, the batched ops equal torchvision's functional ops image by
    image: brightness/contrast in the drawn order (u < 0.5: brightness first), gamma, reflect-padded
    Gaussian blur, channel repeat, normalisation; both the CPU (indexing) and the GPU (torch.where) way."""
    import pretrain.device_augment as da

    a = Augment(brightness=0.4, contrast=0.4, jitter_p=1.0, gamma=(0.7, 1.4), gamma_p=1.0, blur_sigma=(0.5, 1.5),
                noise_p=0.0)
    aug = PhotometricAugment(a, blur_p=(1.0,), channels=3, mean=0.5, std=0.25)
    monkeypatch.setattr(PhotometricAugment, "_uniform", staticmethod(lambda x: torch.full((x.shape[0], 1, 1, 1), u)))
    monkeypatch.setattr(da, "_whole_batch", lambda x: whole_batch)
    x = torch.rand(3, 1, 20, 24)
    out, = aug([x])
    b = c = 0.6 + 0.8 * u
    gamma = float(torch.tensor(0.7).log().add((torch.tensor(1.4).log() - torch.tensor(0.7).log()) * u).exp())
    sigma = 0.5 + 1.0 * u
    for i in range(3):
        if u < 0.5:
            y = TF.adjust_contrast(TF.adjust_brightness(x[i], b), c)
        else:
            y = TF.adjust_brightness(TF.adjust_contrast(x[i], c), b)
        y = TF.adjust_gamma(y.clamp(0, 1), gamma)
        y = TF.gaussian_blur(y, [11, 11], [sigma, sigma])  # 2 ceil(3 x 1.5) + 1 taps
        y = TF.normalize(y.expand(3, -1, -1), [0.5] * 3, [0.25] * 3)
        torch.testing.assert_close(out[i], y, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("whole_batch", [False, True], ids=["cpu_indexing", "gpu_where"])
def test_device_augment_applies_ops_only_to_the_drawn_samples(monkeypatch, whole_batch):
    import pretrain.device_augment as da

    monkeypatch.setattr(da, "_whole_batch", lambda x: whole_batch)
    torch.manual_seed(0)
    x = torch.rand(64, 1, 16, 16)
    y, = PhotometricAugment(Augment(jitter_p=0, gamma_p=0.5, gamma=(2.0, 2.0), noise_p=0), blur_p=(0.0,))([x])
    squared = torch.isclose(y, x ** 2).flatten(1).all(1)
    kept = torch.equal(y[~squared], x[~squared])
    assert kept and 16 < int(squared.sum()) < 48  # p 0.5 of 64


def test_device_augment_probabilities_and_ranges():
    torch.manual_seed(0)
    x = torch.rand(400, 1, 16, 16)
    off = PhotometricAugment(Augment(jitter_p=0, gamma_p=0, noise_p=0), blur_p=(0.0,))
    assert torch.equal(off([x])[0], x)
    only_blur = PhotometricAugment(Augment(jitter_p=0, gamma_p=0, noise_p=0, blur_sigma=(1.0, 2.0)), blur_p=(1.0, 0.1))
    g1, g2 = only_blur([x, x])
    changed = lambda y: ((y - x).abs().amax(dim=(1, 2, 3)) > 1e-6).float().mean()  # noqa: E731
    assert changed(g1) == 1.0 and 0.04 < changed(g2) < 0.18  # blur p 1.0 / 0.1 by view position
    full = PhotometricAugment(Augment(), blur_p=(0.5,))
    y, = full([x])
    assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0


def test_views_without_photometric_part_are_crops_in_unit_range():
    views = MultiCrop(32, 16, 2, photometric=False, mean=0.5, std=0.25)
    crops = views(torch.rand(1, 48, 48))
    assert [tuple(c.shape) for c in crops] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2
    assert all(0.0 <= float(c.min()) and float(c.max()) <= 1.0 for c in crops)  # not normalised yet
    aug = PhotometricAugment.for_views(views)
    assert aug.blur_p == (1.0, 0.1, 0.5) and aug.mean == 0.5
    with pytest.raises(ValueError, match="photometric=False"):
        PhotometricAugment.for_views(MultiCrop(32, 16, 2))


def test_recollated_batches_are_stacked_into_pinned_memory(monkeypatch):
    from pretrain.data import _Collate

    requested = []
    empty = torch.empty

    def fake_empty(*args, pin_memory=False, **kwargs):  # CPU-only torch cannot pin: record the request
        requested.append(pin_memory)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", fake_empty)
    samples = [("a", 0, 0, torch.zeros(1, 4, 4)), ("b", 1, 2, torch.ones(1, 4, 4))]
    keys, labels, skipped, view = _Collate(pin=True)(samples)
    assert requested == [True] and keys == ["a", "b"] and labels.tolist() == [0, 1] and skipped.tolist() == [0, 2]
    assert torch.equal(view, torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)]))


# ----------------------------------------------------------------------------------- items 1, 8
def _count_host_syncs(monkeypatch, tmp_path, log_every: int) -> tuple[int, list[dict[str, str]], dict]:
    """Calls of Tensor.item/tolist/__float__/__bool__ during a 6-step run (the loop's host syncs)."""
    import csv

    from accelerate.state import AcceleratorState
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pretrain.main  # noqa: F401
    from pretrain.config import CONFIG_DIR
    from pretrain.train import train

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("pretrain", overrides=[f"out={tmp_path / f'run{log_every}'}", *TINY,
                                                                 f"log.every={log_every}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    count = [0]
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__bool__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, **kwargs):
                count[0] += 1
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counted)
        result = train(cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    with (Path(cfg.out) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return count[0], rows, result


def test_host_syncs_follow_logged_windows_not_steps_and_data_wait_is_logged(monkeypatch, tmp_path):
    every_step, rows1, _ = _count_host_syncs(monkeypatch, tmp_path, 1)
    per_run, rows6, result = _count_host_syncs(monkeypatch, tmp_path, 6)
    # 6 steps: read every step (6 windows) vs once (1 window); each window read is one tolist (+ DINO's
    # centre update etc. are on the device); per-step syncs would make the two runs equal
    assert every_step - per_run >= 5, (every_step, per_run)
    assert [int(r["step"]) for r in rows6] == [6] and len(rows1) == 6
    for row in rows1 + rows6:
        assert 0.0 <= float(row["data_wait"]) <= 1.0 and float(row["images_per_s"]) > 0
    assert 0.0 <= result["data_wait"] <= 1.0


# ----------------------------------------------------------------------------------------- item 8
def test_swin_uses_sdpa_with_the_same_outputs():
    from pretrain.encoders import build_encoder
    from pretrain.throughput import enable_sdpa, is_convnet

    torch.manual_seed(0)
    encoder, _ = build_encoder("swin_test", in_chans=1, img_size=32)
    encoder.eval()
    x = torch.rand(2, 1, 32, 32)
    before = encoder(x)
    assert enable_sdpa(encoder) > 0 and not is_convnet(encoder)
    torch.testing.assert_close(encoder(x), before, atol=1e-5, rtol=1e-4)


def test_cnns_go_channels_last_and_adamw_is_fused_only_on_cuda():
    from pretrain.encoders import build_encoder
    from pretrain.throughput import adamw, channels_last

    encoder, _ = build_encoder("test_resnet", in_chans=1)
    assert channels_last(encoder)
    conv = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    optimizer = adamw([{"params": list(encoder.parameters())}], lr=1e-3)
    assert not optimizer.defaults.get("fused")  # CPU tensors: torch's foreach AdamW
    assert not channels_last(build_encoder("swin_test", in_chans=1, img_size=32)[0])


def test_a_hybrid_converts_its_convolutional_parts_only_and_computes_the_same():
    from pretrain.throughput import channels_last
    from segment.models import create_model

    torch.manual_seed(0)
    model = create_model("cs_unet_hybrid_test", num_classes=3, in_chans=1, img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    swin_strides = [p.stride() for p in model.swin.parameters()]
    with torch.no_grad():
        before = model(x)
        assert channels_last(model)
        after = model(x.contiguous(memory_format=torch.channels_last))
    conv4d = lambda m: next(p for p in m.parameters() if p.ndim == 4 and p.shape[-1] > 1)  # noqa: E731
    assert conv4d(model.cnn).is_contiguous(memory_format=torch.channels_last)
    assert conv4d(model.decoder).is_contiguous(memory_format=torch.channels_last)
    assert [p.stride() for p in model.swin.parameters()] == swin_strides  # the Swin is left as it was
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_opt_in_compile_keeps_state_dict_keys():
    from pretrain.encoders import build_encoder
    from pretrain.throughput import compile_module

    encoder, _ = build_encoder("test_resnet", in_chans=1)
    keys = list(encoder.state_dict())
    compile_module(encoder, backend="eager")
    assert list(encoder.state_dict()) == keys
    assert encoder(torch.rand(2, 1, 32, 32)).shape == (2, encoder.num_features)


# ----------------------------------------------------------------------------------------- item 5
def test_tf32_only_on_ampere_and_newer(monkeypatch):
    from pretrain.throughput import enable_tf32

    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
        assert not enable_tf32("cuda") and torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert not enable_tf32("cpu")
        assert enable_tf32("cuda") and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_cpu_threads_capped_on_a_gpu_node_only_when_omp_is_unset(monkeypatch):
    from pretrain.throughput import bound_cpu_threads, cpu_thread_budget

    assert cpu_thread_budget(16, 1, 15) == 1 and cpu_thread_budget(16, 1, 8) == 8
    assert cpu_thread_budget(64, 8, 4) == 4 and cpu_thread_budget(4, 1, 8) == 1 and cpu_thread_budget(8, 2, 0) == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    saved = torch.get_num_threads()
    try:
        assert bound_cpu_threads("cpu", 8, environ={}) is None  # the model needs the threads on the CPU
        assert bound_cpu_threads("cuda", 0, environ={}) is None  # no workers to leave room for
        assert bound_cpu_threads("cuda", 8, environ={"OMP_NUM_THREADS": "4"}) is None  # the user's choice
        assert bound_cpu_threads("cuda", 8, environ={"LOCAL_WORLD_SIZE": "2"}) == 1
        assert bound_cpu_threads("cuda", 3, environ={}) == 13 and torch.get_num_threads() == 13
    finally:
        torch.set_num_threads(saved)


@pytest.mark.slow
def test_ema_under_deepspeed_bf16_reads_the_fp32_master_weights():
    """ZeRO-2 bf16 in one CPU process: the student's module parameters are bf16; the teacher update
    must equal m * teacher + (1 - m) * (the ZeRO optimizer's fp32 partition), not the bf16 copy."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_pretrain_ema_deepspeed.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["student_dtype"] == "torch.bfloat16"
    assert result["err_master"] < 1e-6, result
    assert result["err_bf16"] > 1e-5, result  # the bf16 copies really differ from the masters


# ----------------------------------------------------------------------------------------- item 2
@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "supervised"])
def test_every_rank_runs_the_same_student_forwards_with_the_knn_probe(tmp_path, method):
    """2 CPU processes (gloo): the k-NN probe (rank 0) must not call the trained student's backbone,
    whose forward under ZeRO-3 gathers partitioned parameters collectively (a hang on a GPU cluster)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    args = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port), "--multi_gpu",
            "--num_processes", "2", str(REPO / "tests" / "_pretrain_probe_forwards.py"), f"out={out}",
            *[o for o in TINY if not o.startswith("method.options.")], f"pretrain/method={method}", "optim.epochs=1", "knn.every=2",
            "knn.synthetic_per_class=2", "knn.crop_size=48", "knn.crops_per_image=2", "log.every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = [json.loads((out / f"forwards_rank{r}.json").read_text()) for r in (0, 1)]
    assert calls[0] and calls[0] == calls[1], (len(calls[0]), len(calls[1]))
    knn = [line for line in (out / "metrics.csv").read_text().splitlines()[1:] if line.split(",")[1]]
    assert len(knn) >= 2, (out / "metrics.csv").read_text()  # probed at step 0, 2 and at the end
