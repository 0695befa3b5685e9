"""The pretraining loop (:func:`train`) and the parts it builds per run: method, views, device
augmentation, throughput settings. The rest lives by job: settings checks and the Accelerate/DeepSpeed
set-up in :mod:`pretrain.accelerate_setup`, the corpus and loader in :mod:`pretrain.corpus`, the
schedules in :mod:`pretrain.schedules`, the k-NN probe and the export in :mod:`pretrain.probe_export`,
metrics in :mod:`pretrain.metrics_log`.

The entry point is :mod:`pretrain.main` (Hydra); this module holds no command-line code. Run-folder layout
and usage: see :mod:`pretrain.main`.

The loop follows dinov2's order: schedules -> forward -> backward (clip and step inside DeepSpeed,
explicit without it) -> EMA teacher update -> reduce logs across ranks -> NaN guard -> periodic k-NN /
export / checkpoint -> pre-emption check. The WebDataset loader splits shards between ranks itself and is
never passed to ``accelerator.prepare``; batches are moved to the device here and cast to the engine's
dtype by the method's network (the fp32 teacher sees fp32 inputs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from pretrain.accelerate_setup import build_accelerator, validate_config
from pretrain.checkpointing import CheckpointManager, Preemption, TrainState
from pretrain.config import PretrainConfig
from pretrain.corpus import make_train_loader, resolve_corpus
from pretrain.device_augment import PhotometricAugment
from pretrain.encoders import build_encoder
from pretrain.methods import create_method
from pretrain.metrics_log import LossWindow, MetricsLog
from pretrain.outputs import atomic_write_text
from pretrain.probe_export import build_probe, export_backbone, probe_backbone
from pretrain.schedules import Schedules, apply_to_optimizer, schedule_config
from pretrain.throughput import (adamw, bound_cpu_threads, channels_last, compile_module, enable_sdpa,
                                 enable_tf32)
from pretrain.views import MultiCrop, TwoViews

__all__ = ["build_device_augment", "build_method", "build_views", "to_device", "train"]

log = logging.getLogger("pretrain.train")


# ------------------------------------------------------------------------------ the loop's parts
def _as_config(cfg: PretrainConfig | DictConfig | Mapping[str, Any]) -> PretrainConfig:
    """A typed :class:`PretrainConfig` from a Hydra/OmegaConf config or a plain mapping."""
    if isinstance(cfg, PretrainConfig):
        return cfg
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg)
    elif OmegaConf.get_type(cfg) is not PretrainConfig:
        cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg)
    return OmegaConf.to_object(cfg)


def build_method(cfg: PretrainConfig, *, labels: Sequence[str] | None = None):
    """Encoder (built at the global crop size) + method; supervised takes its classes from ``labels``."""
    encoder, spec = build_encoder(cfg.encoder.name, in_chans=cfg.encoder.in_chans,
                                  img_size=cfg.data.views.global_size, **dict(cfg.encoder.kwargs))
    name, options = cfg.method.name.value, dict(cfg.method.options)
    if name == "supervised" and "num_classes" not in options:
        if not labels:
            raise ValueError("supervised pretraining needs labelled shards (python -m pretrain.shards --labels ...) "
                             "or method.options.num_classes")
        options["num_classes"] = len(labels)
    try:
        return create_method(name, encoder, spec, **options), spec
    except ValueError as e:
        raise ValueError(f"{e} (select a method with its options as pretrain/method={name}; method.options holds "
                         "the selected method's keyword options)") from None


def build_views(cfg: PretrainConfig, method_name: str):
    """DINO: multi-crop (2 global + n_local local); the other methods: two views. With
    ``data.device_augment`` the views stop after the crops (:func:`build_device_augment` does the rest)."""
    v = cfg.data.views
    common = dict(channels=cfg.encoder.in_chans, mean=cfg.data.mean, std=cfg.data.std,
                  photometric=not cfg.data.device_augment)
    if method_name == "dino":
        return MultiCrop(v.global_size, v.local_size, v.n_local, tuple(v.global_scale), tuple(v.local_scale), **common)
    return TwoViews(v.global_size, tuple(v.two_view_scale), **common)


def build_device_augment(cfg: PretrainConfig, views):
    """The batched photometric half of ``views`` for the training device, or None (``data.device_augment``
    off: the workers apply everything)."""
    return PhotometricAugment.for_views(views) if cfg.data.device_augment else None


def _batches(loader) -> Iterator[Any]:
    while True:
        yield from loader


def to_device(views: Sequence[torch.Tensor], device: torch.device, augment=None, *,
              channels_last: bool = False) -> list[torch.Tensor]:
    """Views to the device (asynchronously from pinned memory), the batched photometric augmentation
    there (``augment``, see :func:`build_device_augment`), channels_last for CNN students."""
    out = [v.to(device, non_blocking=True) for v in views]
    if augment is not None:
        out = augment(out)
    if channels_last:
        out = [v.contiguous(memory_format=torch.channels_last) for v in out]
    return out


def _apply_perf(cfg: PretrainConfig, method, accelerator, *, deepspeed: bool = False) -> bool:
    """TF32, SDPA attention, channels_last and torch.compile as ``perf`` says; logged on rank 0.
    Returns whether the networks went channels_last (then the inputs should too). Not under
    DeepSpeed: its engine broadcasts parameters as byte views, which channels_last weights refuse
    (``RuntimeError: self.stride(-1) must be 1``), and ZeRO flattens them anyway."""
    p, done = cfg.perf, []
    if p.tf32 and enable_tf32(accelerator.device):
        done.append("TF32 matmuls/convolutions")
    threads = bound_cpu_threads(accelerator.device, cfg.data.num_workers)
    if threads is not None:
        done.append(f"{threads} intra-op CPU threads (OMP_NUM_THREADS unset; the rest go to "
                    f"{cfg.data.num_workers} loader workers)")
    if p.sdpa:
        n = sum(enable_sdpa(net) for net in (method.student, method.teacher) if net is not None)
        if n:
            done.append(f"scaled_dot_product_attention in {n} attention modules")
    converted = False
    if p.channels_last and not deepspeed:
        converted = any([channels_last(net["backbone"]) for net in (method.student, method.teacher) if net is not None])
        if converted:
            done.append("channels_last")
    if p.compile:
        compile_module(method.student["backbone"], backend=p.compile_backend)
        done.append(f"torch.compile ({p.compile_backend}) of the student backbone")
    log.info("throughput settings: %s", ", ".join(done) if done else "none apply on %s" % accelerator.device)
    return converted


def _checksum(module: nn.Module) -> str:
    """SHA-256 of the parameters (not buffers: BatchNorm statistics are per rank between DDP syncs)."""
    digest = hashlib.sha256()
    for key, value in sorted(module.named_parameters()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ train
def train(cfg: PretrainConfig | DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Pretrain, checkpoint, probe and export as configured; returns the run's metrics.

    Keys: ``step`` (optimizer steps done), ``total_steps``, ``stopped`` ("completed", "stop_at_step" or
    "preempted"), ``resumed_from`` (step or None), ``loss``, ``knn_top1_init`` / ``knn_top1`` (k-NN
    top-1 of the random-init encoder and the last probe), ``images_per_s``, ``minutes``, ``out``,
    ``export`` (the folder, when exported).
    """
    cfg = _as_config(cfg)
    validate_config(cfg)
    out = Path(cfg.out).expanduser().resolve()
    accelerator = build_accelerator(cfg)
    main_proc, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    for name in ("accelerate.checkpointing", "accelerate.accelerator", "accelerate.utils.other"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not main_proc:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("pretrain").setLevel(logging.WARNING)
    use_ds = accelerator.distributed_type.name == "DEEPSPEED"
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    log.info("run folder %s; %d process(es) on %s, %s, precision %s", out, world, accelerator.device,
             accelerator.distributed_type.name, accelerator.mixed_precision)

    corpus = resolve_corpus(cfg, out, accelerator)
    set_seed(cfg.seed)  # the same initialisation on every rank: DDP/DeepSpeed do not broadcast the teacher
    method, spec = build_method(cfg, labels=corpus.labels)
    method_name = cfg.method.name.value
    set_seed(cfg.seed, device_specific=True)  # augmentations differ between ranks
    method.to(accelerator.device)
    channels_last = _apply_perf(cfg, method, accelerator, deepspeed=use_ds)
    schedules = Schedules(schedule_config(cfg, method.schedule_defaults, world_size=world),
                          cfg.optim.epochs * cfg.optim.steps_per_epoch)
    optimizer = adamw(method.param_groups(weight_decay=schedules.weight_decay(0)), lr=schedules.lr(0),
                      betas=cfg.optim.betas, fused=cfg.perf.fused_adamw)
    log.info("optimizer: AdamW%s", " (fused)" if optimizer.defaults.get("fused") else "")
    engine, optimizer = accelerator.prepare(method.student, optimizer)
    method.attach(engine)
    state = TrainState()
    accelerator.register_for_checkpointing(method.checkpointable())
    accelerator.register_for_checkpointing(state)
    global_batch = cfg.optim.batch_size * cfg.optim.grad_accum * world
    log.info("%s on %s: global batch %d (%d x %d accumulation x %d ranks), peak lr %.3g, %d steps",
             method_name, cfg.encoder.name, global_batch, cfg.optim.batch_size, cfg.optim.grad_accum, world,
             schedules.cfg.lr, schedules.total_steps)

    # ---- resume
    checkpoints = CheckpointManager(accelerator, out, keep=cfg.checkpoint.keep)
    preemption = Preemption(accelerator, out, poll_every=cfg.checkpoint.poll_every)
    preemption.clear_stale_flag()
    resumed_from = None
    if cfg.checkpoint.resume and checkpoints.resume() is not None:
        resumed_from = state.step
        state.resumes += 1
    start, total = state.step, schedules.total_steps
    end = min(total, cfg.stop_at_step) if cfg.stop_at_step else total
    run_meta = {"config": OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), "data": corpus.description}

    metrics = bar = None
    try:
        views = build_views(cfg, method_name)
        augment = build_device_augment(cfg, views)
        loader = make_train_loader(cfg, corpus.urls, views, start_step=start, with_labels=method.requires_labels,
                                   rank=rank, world_size=world)
        probe = build_probe(cfg, out, accelerator)
        metrics = MetricsLog(out, enabled=main_proc, tensorboard=cfg.log.tensorboard, start_step=start)

        def run_probe(step: int) -> float | None:
            result = None
            backbone = probe_backbone(method, spec, accelerator)  # collective
            if probe is not None:
                t0 = time.monotonic()
                result = probe(backbone, accelerator.device)["knn_top1"]
                log.info("step %d: k-NN top-1 %.3f on %s (%.1f s)", step, result, "/".join(probe.classes),
                         time.monotonic() - t0)
                metrics.log(step, {"knn_top1": result}, prefix="knn")
            accelerator.wait_for_everyone()
            return result

        knn_init = run_probe(0) if cfg.knn.every and start == 0 else None
        if knn_init is None and metrics.rows:
            knn_init = next((float(r["knn_top1"]) for r in metrics.rows if r.get("knn_top1") not in (None, "")), None)

        # ---- loop
        # No host-device sync per step (issue 16 item 8): loss parts and the gradient norm add up on the
        # device and are reduced across ranks and read once per window (log.every steps, and before a
        # checkpoint, probe or export); the NaN guard checks each window's mean loss, so a non-finite
        # step stops the run before anything is saved after it. data_wait: share of the window's wall
        # time spent waiting for the loader (a GPU run starved by its CPU workers shows it near 1).
        device, accum, clip = accelerator.device, cfg.optim.grad_accum, cfg.optim.clip_grad
        batches = _batches(loader)
        urls = corpus.urls
        planned = list(urls)  # every rank resamples all shards and keeps its positions of the draws
        shards_seen: set[str] = set()
        samples_seen = skipped = 0
        t_start = time.monotonic() - state.elapsed
        window = LossWindow()
        images_per_s = data_wait = float("nan")
        last: dict[str, float] = {}
        knn_last = knn_init
        stopped = "completed" if end == total else "stop_at_step"
        saved_at = -1
        method.train()
        bar = _progress(total, start, enabled=main_proc and cfg.log.progress)
        step = start
        while step < end:
            t0 = time.perf_counter()
            sched = apply_to_optimizer(optimizer, step, schedules)
            momentum, teacher_temp = schedules.momentum(step), schedules.teacher_temp(step)
            parts: dict[str, torch.Tensor] = {}
            grad_norm = None
            for _ in range(accum):
                t_wait = time.perf_counter()
                batch = next(batches)
                window.wait += time.perf_counter() - t_wait
                for key in batch.keys:
                    shard = corpus.index.shard_of(key)
                    if shard is not None:
                        shards_seen.add(shard)
                samples_seen += len(batch.keys)
                skipped += batch.skipped
                inputs = {"views": to_device(batch.views, device, augment, channels_last=channels_last),
                          "label": batch.labels.to(device, non_blocking=True)}
                with accelerator.accumulate(engine):
                    outputs = method(inputs, step, teacher_temp=teacher_temp)
                    accelerator.backward(outputs["loss"])
                    if accelerator.sync_gradients and (clip > 0 or use_ds):
                        grad_norm = accelerator.clip_grad_norm_(engine.parameters(), clip if clip > 0 else math.inf)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in outputs.items():
                    parts[key] = parts.get(key, 0.0) + value.detach().float() / accum
            method.update_teacher(momentum)
            step += 1
            state.step = step
            state.images += global_batch
            window.add(parts, grad_norm, device)
            window.time += time.perf_counter() - t0
            window.images += global_batch
            if bar is not None:
                bar.update(1)

            checkpoint_now = bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
            probe_now = bool(cfg.knn.every and step % cfg.knn.every == 0 and step != total)
            export_now = bool(cfg.export.every and step % cfg.export.every == 0 and step != total)
            if step % cfg.log.every == 0 or step == end or checkpoint_now or probe_now or export_now:
                last = window.read(accelerator if world > 1 else None)  # the one sync of the window
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(
                        f"non-finite loss {last['loss']} in the steps up to {step}: lower optim.base_lr, raise "
                        f"optim.warmup_epochs or check the data; the last good checkpoint is in {out / 'checkpoints'}")
                images_per_s = window.images / max(window.time, 1e-9)
                data_wait = window.wait / max(window.time, 1e-9)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{images_per_s:.1f}",
                                    wait=f"{data_wait:.2f}", refresh=False)
                metrics.log(step, {"epoch": step / cfg.optim.steps_per_epoch, **last, **sched, "momentum": momentum,
                                   "teacher_temp": teacher_temp, "images_per_s": images_per_s,
                                   "data_wait": data_wait, "minutes": (time.monotonic() - t_start) / 60,
                                   "skipped": skipped, **_memory(device)})
                window = LossWindow()
            if probe_now:
                knn_last = run_probe(step)
            if export_now:
                export_backbone(method, spec, out / "export", cfg=cfg, steps=step, data=corpus.description,
                                accelerator=accelerator)
            state.elapsed = time.monotonic() - t_start
            if checkpoint_now:
                checkpoints.save(step, run_meta)
                saved_at = step
            if step < end and preemption.requested(step):
                stopped = "preempted"
                break
        if bar is not None:
            bar.close()
            bar = None

        # ---- end: checkpoint, probe, export, per-rank record
        if window.steps:  # steps since the last read (a pre-empted window): checked before they are saved
            last = window.read(accelerator if world > 1 else None)
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"non-finite loss {last['loss']} in the steps up to {step}; the last good "
                                         f"checkpoint is in {out / 'checkpoints'}")
        state.elapsed = time.monotonic() - t_start
        if saved_at != step and step > start:
            checkpoints.save(step, run_meta)
        if stopped == "preempted":
            preemption.acknowledge()
            log.warning("pre-empted: checkpointed at step %d; rerun with out=%s to resume", step, out)
        exported = None
        if stopped != "preempted":
            if step == total and cfg.knn.every:
                knn_last = run_probe(step)
            knn = {"top1_init": knn_init, "top1": knn_last, "k": cfg.knn.k,
                   "holdout": str(cfg.knn.holdout or out / "knn_holdout")} if cfg.knn.every else None
            export_backbone(method, spec, out / "export", cfg=cfg, steps=step, data=corpus.description,
                            accelerator=accelerator, knn=knn)
            exported = str(out / "export")
        record = {
            "rank": rank, "world_size": world, "shards_assigned": planned, "shards_read": sorted(shards_seen),
            "samples": samples_seen, "start_step": start, "step": step,
            "student_checksum": None if _zero3(engine) else _checksum(method.student),
        }
        atomic_write_text(out / "ranks" / f"rank_{rank}.json", json.dumps(record, indent=1) + "\n")
    finally:  # also on errors: restore signal handlers, flush TensorBoard, close the bar
        preemption.close()
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
    accelerator.wait_for_everyone()
    minutes = (time.monotonic() - t_start) / 60
    result = {
        "step": step, "total_steps": total, "stopped": stopped, "resumed_from": resumed_from,
        "loss": last.get("loss"), "knn_top1_init": knn_init, "knn_top1": knn_last, "images_per_s": images_per_s,
        "minutes": minutes, "out": str(out), "export": exported, "data_wait": data_wait,
    }
    if main_proc:
        log.info("pretraining %s at step %d/%d after %.1f min; k-NN top-1 %s -> %s; export %s", stopped, step, total,
                 minutes, _fmt(knn_init), _fmt(knn_last), exported)
    accelerator.end_training()
    return result


def _memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated by this process so far (GiB); nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"max_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _zero3(engine: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in engine.parameters())


def _progress(total: int, start: int, *, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
