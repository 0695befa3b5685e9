"""The pretraining loop (:func:`train`) and what it is built from: config checks, Accelerate/DeepSpeed set-up,
corpus, method, views, loader, k-NN probe, metrics, checkpoints and the encoder export.

The entry point is :mod:`pretrain.main` (Hydra); this module holds no command-line code. Run-folder layout
and usage: see :mod:`pretrain.main`.

The loop follows dinov2's order: schedules -> forward -> backward (clip and step inside DeepSpeed,
explicit without it) -> EMA teacher update -> reduce logs across ranks -> NaN guard -> periodic k-NN /
export / checkpoint -> pre-emption check. The WebDataset loader splits shards between ranks itself and is
never passed to ``accelerator.prepare``; batches are moved to the device here and cast to the engine's
dtype by the method's network (the fp32 teacher sees fp32 inputs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pretrain.config import DeepSpeedStage, PretrainConfig, Precision
from pretrain.intensity import canonical_intensity

__all__ = [
    "CONFIG_DIR",
    "deepspeed_config",
    "peak_lr",
    "schedule_config",
    "train",
]

log = logging.getLogger("pretrain.train")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_SYNTHETIC_KINDS = ("superalloy", "coating")
_COMPLETE = "COMPLETE"


# ----------------------------------------------------------------------------------- settings
def _as_config(cfg: PretrainConfig | DictConfig | Mapping[str, Any]) -> PretrainConfig:
    """A typed :class:`PretrainConfig` from a Hydra/OmegaConf config or a plain mapping."""
    if isinstance(cfg, PretrainConfig):
        return cfg
    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg)
    elif OmegaConf.get_type(cfg) is not PretrainConfig:
        cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg)
    return OmegaConf.to_object(cfg)


def validate_config(cfg: PretrainConfig) -> None:
    """Value checks Hydra's types cannot express; raises ``ValueError`` naming the key."""
    positive = {
        "optim.batch_size": cfg.optim.batch_size, "optim.grad_accum": cfg.optim.grad_accum,
        "optim.epochs": cfg.optim.epochs, "optim.steps_per_epoch": cfg.optim.steps_per_epoch,
        "checkpoint.keep": cfg.checkpoint.keep, "checkpoint.poll_every": cfg.checkpoint.poll_every,
        "log.every": cfg.log.every, "data.views.global_size": cfg.data.views.global_size,
        "data.views.local_size": cfg.data.views.local_size, "knn.k": cfg.knn.k,
    }
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    non_negative = {"checkpoint.every": cfg.checkpoint.every, "knn.every": cfg.knn.every,
                    "export.every": cfg.export.every, "data.num_workers": cfg.data.num_workers,
                    "data.views.n_local": cfg.data.views.n_local, "optim.clip_grad": cfg.optim.clip_grad,
                    "optim.warmup_epochs": cfg.optim.warmup_epochs}
    bad += [f"{k}={v}" for k, v in non_negative.items() if v < 0]
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        bad.append(f"stop_at_step={cfg.stop_at_step}")
    if cfg.encoder.in_chans not in (1, 3):
        bad.append(f"encoder.in_chans={cfg.encoder.in_chans} (1 or 3)")
    if cfg.data.std <= 0:
        bad.append(f"data.std={cfg.data.std}")
    try:
        canonical_intensity(cfg.data.intensity)
    except ValueError as e:
        bad.append(f"data.intensity={cfg.data.intensity!r} ({e})")
    if bad:
        raise ValueError(f"invalid pretraining settings: {', '.join(bad)}")


def resolve_precision(precision: Precision) -> str:
    """accelerate's ``mixed_precision``; ``auto``: see :func:`auto_precision`."""
    if precision is Precision.auto:
        return auto_precision()[0]
    return precision.value


def auto_precision() -> tuple[str, str]:
    """What ``precision=auto`` picks, and why: bf16 on a GPU with native bf16 (compute capability 8+:
    A100, H100, RTX 30xx), fp16 on a GPU that only emulates bf16 (V100, T4: ``is_bf16_supported()``
    says True there, emulated bf16 is slow), fp32 ("no") without a GPU. Under fp16 accelerate scales
    the loss with a ``GradScaler`` (DeepSpeed with its own dynamic loss scaler)."""
    if not torch.cuda.is_available():
        return "no", "fp32 (no GPU)"
    name = torch.cuda.get_device_name()
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and counts emulation as support
        native = torch.cuda.get_device_capability()[0] >= 8
    if native:
        return "bf16", f"bf16 ({name} has native bf16)"
    return "fp16", f"fp16 with loss scaling ({name} only emulates bf16); precision=bf16 or precision=no overrides this"


def peak_lr(cfg: PretrainConfig, world_size: int) -> float:
    """``optim.lr`` when set, else ``optim.base_lr x global batch / 256`` (DINO's linear scaling)."""
    if cfg.optim.lr is not None:
        return float(cfg.optim.lr)
    return cfg.optim.base_lr * cfg.optim.batch_size * cfg.optim.grad_accum * world_size / 256.0


def schedule_config(cfg: PretrainConfig, method_defaults: Mapping[str, float], *, world_size: int):
    """:class:`ScheduleConfig` in steps: config values, else the method's defaults, else the schedule's."""
    from pretrain.schedules import ScheduleConfig

    o, spe = cfg.optim, cfg.optim.steps_per_epoch
    total = o.epochs * spe
    explicit = {
        "weight_decay": o.weight_decay, "weight_decay_end": o.weight_decay_end, "momentum": o.momentum,
        "momentum_end": o.momentum_end, "teacher_temp_start": o.teacher_temp_start, "teacher_temp": o.teacher_temp,
    }
    values: dict[str, Any] = {**dict(method_defaults), **{k: v for k, v in explicit.items() if v is not None}}
    return ScheduleConfig(
        lr=peak_lr(cfg, world_size), min_lr=o.min_lr,
        warmup_steps=min(total, round(o.warmup_epochs * spe)),
        teacher_temp_warmup_steps=round(o.teacher_temp_warmup_epochs * spe),
        freeze_last_layer_steps=round(o.freeze_last_layer_epochs * spe),
        **values,
    )


def deepspeed_config(cfg: PretrainConfig, *, mixed_precision: str = "no",
                     environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The DeepSpeed config for this run, or None without DeepSpeed.

    Source: ``distributed.deepspeed_config`` (a JSON path), else ``configs/deepspeed/<distributed.deepspeed>.json``,
    else the file an ``accelerate launch`` DeepSpeed config named (``ACCELERATE_DEEPSPEED_CONFIG_FILE``).
    The loop's own settings are written in as integers (``train_micro_batch_size_per_gpu``,
    ``gradient_accumulation_steps``) and floats (``gradient_clipping``: DeepSpeed clips, since nothing
    can run between its backward and step); ``train_batch_size`` is left to accelerate. Under bf16 or
    fp16, buffers are cast too (``data_types.buffer_dtype``), or BatchNorm meets bf16/fp16 weights with fp32
    running statistics. An optimizer or scheduler block is refused: AdamW is built from the method's
    param groups and the schedules are applied per step.
    """
    d = cfg.distributed
    launcher_ds = environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launcher_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if d.deepspeed_config:
        path = Path(d.deepspeed_config)
    elif d.deepspeed is not None:
        path = CONFIG_DIR / "deepspeed" / f"{DeepSpeedStage(d.deepspeed).value}.json"
    elif launcher_ds and launcher_file not in ("", "none"):
        path = Path(launcher_file)
    elif launcher_ds:
        raise ValueError(
            "accelerate was launched with inline DeepSpeed settings; this loop needs a DeepSpeed JSON: use "
            "configs/accelerate/deepspeed_zero{1,2,3}.yaml (deepspeed_config_file) or pass distributed.deepspeed=zero2"
        )
    else:
        return None
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config not found: {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ValueError(f"{path}: remove the {block!r} block; the loop builds AdamW from the method's param "
                             "groups and applies its lr/wd schedules itself")
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or "stage" not in zero:
        raise ValueError(f"{path}: needs a zero_optimization block with a stage")
    auto = sorted(k for k, v in zero.items() if v == "auto")
    if auto:
        raise ValueError(f"{path}: zero_optimization keys {auto} are 'auto', which accelerate cannot resolve for "
                         "a model without a transformers config: give integers")
    ds["train_micro_batch_size_per_gpu"] = int(cfg.optim.batch_size)
    ds["gradient_accumulation_steps"] = int(cfg.optim.grad_accum)
    ds["gradient_clipping"] = float(cfg.optim.clip_grad)
    ds.pop("train_batch_size", None)
    if mixed_precision in ("bf16", "fp16"):
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", mixed_precision)
    ds["_source"] = str(path)
    return ds


def build_accelerator(cfg: PretrainConfig):
    """``Accelerator`` on the GPU when there is one (CPU otherwise), with the DeepSpeed plugin if configured."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    mixed_precision = resolve_precision(cfg.precision)
    ds = deepspeed_config(cfg, mixed_precision=mixed_precision)
    plugin = None
    if ds is not None:
        source = ds.pop("_source")
        _single_process_env()
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
        log.info("DeepSpeed ZeRO-%s from %s", ds["zero_optimization"]["stage"], source)
    accelerator = Accelerator(
        # accelerate selects DeepSpeed only when not forced to the CPU; DeepSpeed then uses its CPU
        # accelerator (gloo) on a machine without GPUs
        cpu=not torch.cuda.is_available() and plugin is None,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        deepspeed_plugin=plugin,
    )
    if (plugin is not None and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() != accelerator.num_processes):
        # accelerate 1.15 without GPUs: DeepSpeed initialises every rank, but accelerate's state
        # says one process, so every rank would act as rank 0 (and write the same files)
        raise RuntimeError(
            f"DeepSpeed across {torch.distributed.get_world_size()} processes needs GPUs (accelerate reports "
            f"{accelerator.num_processes} process without them); on CPUs use DDP (distributed.deepspeed=null, "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu ...) or DeepSpeed in one process")
    if cfg.precision is Precision.auto and accelerator.is_main_process:
        why = auto_precision()[1]
        if mixed_precision == "fp16":
            scaler = getattr(accelerator, "scaler", None)
            why += "; loss scaler: " + ("DeepSpeed's" if plugin is not None
                                        else type(scaler).__name__ if scaler is not None else "none")
        log.info("precision=auto: %s", why)
    return accelerator


def _single_process_env() -> None:
    """Give a launcher-less process (``python pretrain/main.py``) the environment of a one-process
    launch, which accelerate requires before it initialises DeepSpeed (``LOCAL_RANK`` etc.)."""
    if "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log.info("single process without a launcher: DeepSpeed gets RANK=0, WORLD_SIZE=1, MASTER_PORT=%d", port)


# ---------------------------------------------------------------------------------------- data
def _complete(marker: Path, params: dict[str, Any]) -> bool:
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("params") == params
    except json.JSONDecodeError:
        return False


def prepare_corpus(cfg: PretrainConfig, out: Path, accelerator) -> Path:
    """Write the synthetic corpus into ``out/corpus`` and shard it (rank 0; the others wait).

    Skipped when ``corpus/COMPLETE`` records the same settings. Returns the shard folder.
    """
    from pretrain.shards import write_shards
    from pretrain.synthetic import write_unlabeled
    from pretrain.outputs import atomic_write_text

    s = cfg.data.synthetic
    root = out / "corpus"
    params = {"n_per_kind": s.n_per_kind, "size": s.size, "seed": s.seed, "shard_size": s.shard_size,
              "kinds": list(_SYNTHETIC_KINDS)}
    marker = root / _COMPLETE
    if accelerator.is_main_process and not _complete(marker, params):
        t0 = time.monotonic()
        log.info("writing the synthetic corpus (%d images per material, %d px) to %s", s.n_per_kind, s.size, root)
        images = root / "images"
        write_unlabeled(images, s.n_per_kind, (s.size, s.size), s.seed, _SYNTHETIC_KINDS)
        manifest = write_shards([images], root / "shards", maxcount=s.shard_size, workers=1, labels="folder:1",
                                progress=False)
        atomic_write_text(marker, json.dumps({"params": params, "samples": manifest.total_samples,
                                              "shards": len(manifest.shards)}) + "\n")
        log.info("corpus ready: %d samples in %d shards (%.1f s)", manifest.total_samples, len(manifest.shards),
                 time.monotonic() - t0)
    accelerator.wait_for_everyone()
    return root / "shards"


def shard_urls(spec: Any) -> list[str]:
    """Shard paths from a folder (its manifest), a brace pattern, one path or a list."""
    import webdataset as wds

    from pretrain.data import list_shards

    if isinstance(spec, (list, tuple)):
        urls = [str(u) for u in spec]
    elif Path(str(spec)).expanduser().is_dir():
        urls = list_shards(Path(str(spec)).expanduser())
    else:
        urls = list(wds.shardlists.expand_urls(str(spec)))
    if not urls:
        raise ValueError(f"data.shards={spec!r} names no shards")
    return urls


@dataclass
class ShardIndex:
    """Which shard a sample key came from (keys start with the global file index; pretrain.shards)."""

    names: list[str] = field(default_factory=list)
    firsts: list[int] = field(default_factory=list)

    @classmethod
    def from_folder(cls, folder: Path | None) -> ShardIndex:
        from pretrain.shards import Manifest

        if folder is None or not (folder / "manifest.json").is_file():
            return cls()
        entries = sorted(Manifest.load(folder).shards, key=lambda e: e.first)
        return cls([e.name for e in entries], [e.first for e in entries])

    def shard_of(self, key: str) -> str | None:
        head = key.split("_", 1)[0]
        if not self.names or not head.isdigit():
            return None
        i = bisect_right(self.firsts, int(head)) - 1
        return self.names[i] if i >= 0 else None


@dataclass
class Corpus:
    """The training shards and what the run records about them."""

    urls: list[str]
    description: str
    labels: list[str] | None = None  # the manifest's label vocabulary, when labelled
    index: ShardIndex = field(default_factory=ShardIndex)


def resolve_corpus(cfg: PretrainConfig, out: Path, accelerator) -> Corpus:
    """``data.shards``, or the synthetic corpus written into the run (collective)."""
    from pretrain.shards import Manifest

    if cfg.data.shards is None:
        folder: Path | None = prepare_corpus(cfg, out, accelerator)
        s = cfg.data.synthetic
        description = (f"synthetic corpus: {s.n_per_kind} images per material ({', '.join(_SYNTHETIC_KINDS)}), "
                       f"{s.size} px, seed {s.seed}")
    else:
        spec = cfg.data.shards
        folder = None if isinstance(spec, (list, tuple)) else Path(str(spec)).expanduser()
        folder = folder if folder is not None and folder.is_dir() else None
        description = f"shards: {spec}"
    urls = shard_urls(folder if folder is not None else cfg.data.shards)
    labels = None
    if folder is not None and (folder / "manifest.json").is_file():
        labels = Manifest.load(folder).labels
    return Corpus(urls, f"{description} ({len(urls)} shards)", labels, ShardIndex.from_folder(folder))


def build_method(cfg: PretrainConfig, *, labels: Sequence[str] | None = None):
    """Encoder (built at the global crop size) + method; supervised takes its classes from ``labels``."""
    from pretrain.encoders import build_encoder
    from pretrain.methods import create_method

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
    from pretrain.views import MultiCrop, TwoViews

    v = cfg.data.views
    common = dict(channels=cfg.encoder.in_chans, mean=cfg.data.mean, std=cfg.data.std,
                  photometric=not cfg.data.device_augment)
    if method_name == "dino":
        return MultiCrop(v.global_size, v.local_size, v.n_local, tuple(v.global_scale), tuple(v.local_scale), **common)
    return TwoViews(v.global_size, tuple(v.two_view_scale), **common)


def build_device_augment(cfg: PretrainConfig, views):
    """The batched photometric half of ``views`` for the training device, or None (``data.device_augment``
    off: the workers apply everything)."""
    from pretrain.device_augment import PhotometricAugment

    return PhotometricAugment.for_views(views) if cfg.data.device_augment else None


def _seed_for(*parts: int) -> int:
    digest = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_train_loader(cfg: PretrainConfig, urls: Sequence[str], views, *, start_step: int, with_labels: bool,
                      rank: int, world_size: int):
    """The rank's infinite stream, cut into epochs of ``steps_per_epoch x grad_accum`` micro-batches.

    Seeded from ``(seed, start_step)``: a resumed run draws a fresh sequence rather than replaying one.
    """
    from pretrain.data import make_loader

    return make_loader(
        list(urls), batch_size=cfg.optim.batch_size, steps_per_epoch=cfg.optim.steps_per_epoch * cfg.optim.grad_accum,
        views=views, num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
        seed=_seed_for(cfg.seed, start_step), with_labels=with_labels, rank=rank, world_size=world_size,
        max_side=cfg.data.max_side, intensity=cfg.data.intensity, pin=torch.cuda.is_available(),
        **({"worker_init_fn": _ignore_preemption_signals} if cfg.data.num_workers > 0 else {}),
    )


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1: SLURM signals every process of the job, and a
    worker killed by it would crash the main process before it can write its checkpoint. Workers
    still exit with the main process."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _batches(loader) -> Iterator[Any]:
    while True:
        yield from loader


# ------------------------------------------------------------------------------------ k-NN probe
def build_probe(cfg: PretrainConfig, out: Path, accelerator):
    """The k-NN probe on rank 0 (None elsewhere, and when ``knn.every`` is 0)."""
    from pretrain.knn import KnnProbe, load_holdout, write_synthetic_holdout
    from pretrain.outputs import atomic_write_text

    k = cfg.knn
    if k.every == 0:
        return None
    if k.holdout is None:
        root = out / "knn_holdout"
        size = cfg.data.synthetic.size
        params = {"n_per_class": k.synthetic_per_class, "size": size}
        if accelerator.is_main_process and not _complete(root / _COMPLETE, params):
            write_synthetic_holdout(root, n_per_class=k.synthetic_per_class, size=size)
            atomic_write_text(root / _COMPLETE, json.dumps({"params": params}) + "\n")
    else:
        root = Path(k.holdout).expanduser().resolve()
    if not accelerator.is_main_process:
        return None
    holdout = load_holdout(root, crop_size=k.crop_size, img_size=k.img_size or cfg.data.views.global_size,
                           crops_per_image=k.crops_per_image, max_images_per_class=k.max_images_per_class,
                           in_chans=cfg.encoder.in_chans, mean=cfg.data.mean, std=cfg.data.std,
                           intensity=cfg.data.intensity)
    log.info(holdout.summary())
    return KnnProbe(holdout, k=k.k, temperature=k.temperature, batch_size=k.batch_size)


@contextlib.contextmanager
def _readable(module: nn.Module) -> Iterator[nn.Module]:
    """The module with full parameters: ZeRO-3 partitions gathered (collective: every rank enters)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield module
    else:
        yield module


# ------------------------------------------------------------------------------------- the loop's parts
class _Window:
    """Loss parts and gradient norms of the steps since the last read, summed on the device."""

    def __init__(self) -> None:
        self.names: list[str] | None = None
        self.sums: torch.Tensor | None = None
        self.steps, self.time, self.wait, self.images = 0, 0.0, 0.0, 0

    def add(self, parts: Mapping[str, torch.Tensor], grad_norm: Any, device: torch.device) -> None:
        names = sorted(parts)
        values = [torch.as_tensor(parts[n], device=device, dtype=torch.float32).reshape(()) for n in names]
        if grad_norm is not None:
            names.append("grad_norm")
            values.append(torch.as_tensor(grad_norm, device=device, dtype=torch.float32).reshape(()).detach())
        vector = torch.stack(values)
        if self.names is None or self.names != names:
            if self.names is not None:  # the set of parts changed (grad_norm absent on some step): start over
                self.steps = 0
            self.names, self.sums = names, vector
        else:
            self.sums = self.sums + vector
        self.steps += 1

    def read(self, accelerator=None) -> dict[str, float]:
        """Window means, averaged over ranks when ``accelerator`` is given (collective); one sync."""
        values = self.sums / self.steps
        if accelerator is not None:
            values = accelerator.reduce(values, reduction="mean")
        self.steps = 0
        return dict(zip(self.names, values.tolist()))


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
    from pretrain.throughput import channels_last, compile_module, enable_sdpa, enable_tf32

    p, done = cfg.perf, []
    if p.tf32 and enable_tf32(accelerator.device):
        done.append("TF32 matmuls/convolutions")
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


def _plain_backbone(method, spec: Mapping[str, Any], accelerator) -> nn.Module | None:
    """A fresh fp32 timm module holding the backbone to export/probe, on the main process (None
    elsewhere). Collective: ZeRO-3 partitions are gathered on every rank, read on the main process."""
    import timm

    backbone = method.teacher_backbone()
    state: dict[str, torch.Tensor] = {}
    with _readable(backbone):
        if accelerator.is_main_process:
            for key, value in backbone.state_dict().items():
                value = value.detach().cpu()
                state[key] = value.float().clone() if value.is_floating_point() else value.clone()
    if not accelerator.is_main_process:
        return None
    fresh = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    fresh.load_state_dict(state)
    return fresh


def probe_backbone(method, spec: Mapping[str, Any], accelerator) -> nn.Module | None:
    """What the k-NN probe runs on the main process (collective; None on the other ranks).

    The EMA teacher (DINO, BYOL, MoCo) is a plain module outside DDP/DeepSpeed: probed as it is.
    Teacherless methods (SimCLR, supervised) would probe the trained student's backbone, whose
    forward under ZeRO-3 gathers partitioned parameters with collectives that the other ranks never
    join (a hang), and whose DDP/compile wrappers see extra calls on one rank: the probe then runs on
    a plain fp32 copy instead, so every rank runs the same student forwards (issue 16 item 2)."""
    if method.teacher is not None:
        return method.teacher_backbone()
    plain = _plain_backbone(method, spec, accelerator)
    return plain.to(accelerator.device) if plain is not None else None


# ----------------------------------------------------------------------------------------- export
def export_backbone(method, spec: Mapping[str, Any], out_dir: Path, *, cfg: PretrainConfig, steps: int,
                    data: str, accelerator, knn: Mapping[str, Any] | None = None) -> None:
    """Export the teacher backbone (the student's for methods without a teacher) with
    :func:`pretrain.export.export_encoder`, as fp32 in a fresh timm model built from ``spec``.

    Collective. Under ZeRO-3 the teacher is a plain module outside the engine, so nothing is
    gathered; a teacherless student is gathered on every rank first. Under bf16 the student's
    tensors are cast to float.
    """
    from pretrain.export import export_encoder

    fresh = _plain_backbone(method, spec, accelerator)
    if accelerator.is_main_process:
        export_encoder(fresh, out_dir, timm_name=spec["timm_name"], timm_kwargs=spec["timm_kwargs"],
                       in_chans=cfg.encoder.in_chans, mean=cfg.data.mean, std=cfg.data.std, intensity=canonical_intensity(cfg.data.intensity),
                       method=cfg.method.name.value, data=data, steps=steps, knn=knn)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------- metrics
class MetricsLog:
    """``metrics.csv`` (rewritten atomically) and TensorBoard, on rank 0 only."""

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.path, self.enabled = out / "metrics.csv", enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if self.path.is_file():  # a resumed run redoes the steps after its checkpoint
            import csv

            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= start_step]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=start_step if start_step else None)

    def log(self, step: int, values: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        if self.rows and int(float(self.rows[-1]["step"])) == step:
            self.rows[-1].update(values)
        else:
            self.rows.append({"step": step, **values})
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self._write()

    def _write(self) -> None:
        from pretrain.outputs import atomic_write_text

        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
        lines = [",".join(keys)] + [",".join(fmt(r.get(k)) for k in keys) for r in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    from accelerate.utils import set_seed

    from pretrain.checkpointing import CheckpointManager, Preemption, TrainState
    from pretrain.schedules import Schedules, apply_to_optimizer
    from pretrain.throughput import adamw
    from pretrain.outputs import atomic_write_text

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
        window = _Window()
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
                window = _Window()
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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
