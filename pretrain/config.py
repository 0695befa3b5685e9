"""Typed Hydra schemas for pretraining (`accelerate launch pretrain/main.py [overrides]`).

The dataclasses are registered in Hydra's ConfigStore (``pretrain_schema``) and extended by
``configs/pretrain.yaml`` and its groups under ``configs/pretrain/`` (``pretrain/method``,
``pretrain/encoder``, ``pretrain/data``, ``pretrain/experiment``). An unknown key, a wrong type or a
bad enum value stops the run at start-up with Hydra's message naming the key.

Derived values are computed in code, never stored here: the peak learning rate is
``optim.base_lr * global_batch / 256`` (DINO's scaling rule; ``optim.lr`` sets it directly), warm-up
and freezing lengths in epochs become steps, and schedule values left ``null`` take the method's
recommended defaults (``SSLMethod.schedule_defaults``), then :class:`pretrain.schedules.ScheduleConfig`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

__all__ = [
    "CONFIG_DIR",
    "CheckpointConfig",
    "DataConfig",
    "DeepSpeedStage",
    "DistributedConfig",
    "EncoderConfig",
    "ExportConfig",
    "KnnConfig",
    "LogConfig",
    "MethodConfig",
    "MethodName",
    "OptimConfig",
    "PerfConfig",
    "Precision",
    "PretrainConfig",
    "SyntheticCorpusConfig",
    "ViewsConfig",
    "register_configs",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repository's Hydra configs (and DeepSpeed JSONs)


class MethodName(str, Enum):
    """Pretraining methods (``pretrain.methods.METHODS``)."""

    dino = "dino"
    mocov3 = "mocov3"
    simclr = "simclr"
    byol = "byol"
    supervised = "supervised"


class Precision(str, Enum):
    """Mixed precision, as accelerate's ``mixed_precision`` (pretraining's ``precision``, fine-tuning's
    ``train.precision``). ``auto`` is pretraining's only: fine-tuning refuses it (``segment.config``)."""

    auto = "auto"  # bf16 on a GPU with native bf16, fp16 (loss-scaled) on one that emulates it (V100, T4), else fp32
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class DeepSpeedStage(str, Enum):
    """``configs/deepspeed/<stage>.json``."""

    zero1 = "zero1"
    zero2 = "zero2"
    zero3 = "zero3"  # supported, slower: the EMA update gathers the student's parameters every step


@dataclass
class MethodConfig:
    name: MethodName = MethodName.dino
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the method's class


@dataclass
class EncoderConfig:
    name: str = "swin_lite"  # a pretrain.encoders preset or any timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    in_chans: int = 1  # 1 = gray micrographs; 3 repeats the gray channel


@dataclass
class ViewsConfig:
    """Crops fed to the network. DINO: 2 global + ``n_local`` local crops (multi-crop); the other
    methods: two views at ``global_size`` covering ``two_view_scale`` of the image."""

    global_size: int = 64
    local_size: int = 32
    n_local: int = 4
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    two_view_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class SyntheticCorpusConfig:
    """The embedded default corpus, written into ``${out}/corpus`` when ``data.shards`` is null."""

    n_per_kind: int = 200  # images per material (superalloy, coating)
    size: int = 256
    seed: int = 0
    shard_size: int = 25  # samples per shard: keep shards >= ranks x workers


@dataclass
class DataConfig:
    shards: Optional[Any] = None  # a shard folder, a brace pattern or a list of shard paths; null = synthetic
    synthetic: SyntheticCorpusConfig = field(default_factory=SyntheticCorpusConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    # raw pixels -> [0, 1] per image (pretrain.intensity.INTENSITY_MODES: percentile | zscore | robust | dtype),
    # recorded in the export's encoder.json; fine-tune with the same data.intensity
    intensity: str = "percentile"
    mean: float = 0.5  # input normalisation after the intensity scaling to [0, 1]
    std: float = 0.25
    num_workers: int = 1  # DataLoader workers per rank
    shuffle_buffer: int = 500  # encoded samples per worker
    max_side: Optional[int] = None  # randomly tile larger frames to this side before the views
    # workers cut the crops; jitter, gamma, blur, noise and normalisation run batched on the training
    # device (pretrain.device_augment); false: all of it per image in the workers
    device_augment: bool = True


@dataclass
class OptimConfig:
    batch_size: int = 32  # per device and micro-step
    grad_accum: int = 1
    epochs: int = 8
    steps_per_epoch: int = 15  # optimizer steps per epoch (a WebDataset stream has no length)
    base_lr: float = 5e-4  # per 256 images of global batch
    lr: Optional[float] = None  # absolute peak lr (skips the batch scaling)
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: Optional[float] = None  # null: the method's default
    weight_decay_end: Optional[float] = None
    momentum: Optional[float] = None  # teacher EMA momentum, start -> end (cosine)
    momentum_end: Optional[float] = None
    teacher_temp_start: Optional[float] = None  # DINO teacher temperature, linear warm-up
    teacher_temp: Optional[float] = None
    teacher_temp_warmup_epochs: float = 0.0
    freeze_last_layer_epochs: float = 0.0  # DINO: head output layer at lr 0
    clip_grad: float = 3.0  # max global gradient norm; 0 disables
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class CheckpointConfig:
    every: int = 50  # steps between checkpoints (0: only on pre-emption and at the end)
    keep: int = 2  # complete checkpoints kept
    resume: bool = True  # continue from the latest complete checkpoint in the run folder
    poll_every: int = 5  # steps between pre-emption checks (signal flag or ${out}/PREEMPT file)


@dataclass
class KnnConfig:
    every: int = 20  # steps between k-NN probes (0 disables; also at step 0 and at the end)
    k: int = 20
    temperature: float = 0.07
    holdout: Optional[str] = None  # folder of class folders (optional train/ + test/ split); null = synthetic
    crop_size: int = 128  # crops of this many native pixels ...
    img_size: Optional[int] = None  # ... resized to this (null: views.global_size)
    crops_per_image: int = 4
    max_images_per_class: int = 40  # per split
    synthetic_per_class: int = 12  # synthetic holdout: images per class and split
    batch_size: int = 64


@dataclass
class ExportConfig:
    every: int = 0  # also export every N steps (0: at the end only)


@dataclass
class LogConfig:
    every: int = 5  # steps between metrics.csv / TensorBoard rows
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class PerfConfig:
    """Throughput settings (pretrain.throughput); each is a no-op where it does not apply."""

    tf32: bool = True  # TF32 matmuls/convolutions on Ampere+ GPUs (fp32 teacher, losses)
    sdpa: bool = True  # scaled_dot_product_attention in timm attention (Swin)
    channels_last: bool = True  # NHWC for CNN encoders
    fused_adamw: bool = True  # AdamW(fused=True) on CUDA
    compile: bool = False  # torch.compile the student backbone (opt-in; first steps compile)
    compile_backend: str = "inductor"


@dataclass
class DistributedConfig:
    deepspeed: Optional[DeepSpeedStage] = None  # null: DDP (or what `accelerate launch` was configured with)
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON instead of configs/deepspeed/<stage>.json


@dataclass
class PretrainConfig:
    """A whole pretraining run (configs/pretrain.yaml and its groups), checked by Hydra at start-up."""

    method: MethodConfig = field(default_factory=MethodConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    precision: Precision = Precision.auto
    seed: int = 0
    out: str = "runs/pretrain/default"  # the run folder; every rank must get the same one
    stop_at_step: Optional[int] = None  # checkpoint and stop after this step (schedules keep the full length)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
