"""Typed Hydra schemas for fine-tuning.

The dataclasses are registered in Hydra's ConfigStore and extended by the YAML files in `configs/`, so
an unknown key or a value of the wrong type stops the run at start-up with Hydra's message naming it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from pretrain.config import Precision
from pretrain.intensity import canonical_intensity
from segment.zoom import check_zoom

DEFAULT_STEPS = 400  # train.steps when neither steps nor epochs is set (UNet lite: ~30 min on one CPU core)
STEPS_PER_EPOCH = 20  # batches per epoch when data.samples_per_epoch is null


class Loss(str, Enum):
    dice_ce = "dice_ce"  # soft Dice + cross-entropy (default)
    bce_dice = "bce_dice"  # NASA's 0.7 * BCE + 0.3 * Dice on one-hot targets
    ce = "ce"


class Schedule(str, Enum):
    cosine = "cosine"  # linear warm-up, then cosine to zero, per step
    plateau = "plateau"  # halve the LR when the monitored validation metric stalls
    constant = "constant"


class Monitor(str, Enum):
    miou = "miou"  # mean of per-class IoU: sensitive to the small classes (tertiary, crack)
    nasa_iou = "nasa_iou"  # NASA benchmark IoU (pooled over classes; saturates near 96 on Super)


@dataclass
class ModelConfig:
    name: str = "cs_unet_lite"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra create_model arguments
    encoder_weights: dict[str, str] = field(default_factory=dict)  # branch ("cnn"/"swin") -> file
    allow_mismatch: bool = False  # accept encoder checkpoints with missing/unexpected keys
    init_decoder: bool = False  # CS-UNet/Swin-UNet: mirror the Swin encoder into the decoder


@dataclass
class DataConfig:
    root: str = MISSING  # a NASA-layout set (train/ train_annot/ ...) or an images/ masks/ folder
    layout: str = "auto"
    class_map: Any = "super"  # preset name (super, ebc, ebc_oxide, binary) or a dict
    train_split: str = "train"
    val_split: str = "val"
    test_splits: list[str] = field(default_factory=lambda: ["test"])
    extra_tests: dict[str, str] = field(default_factory=dict)  # name -> ROOT[:SPLIT], e.g. OOD sets
    n_train: Optional[int] = None  # few-shot: use N training images (None = all)
    train_names: list[str] = field(default_factory=list)  # or name them explicitly
    crop_size: int = 256
    # random crops per epoch, a unit of logging and validation only (default: 20 batches, whatever the
    # number of training images, so one image and 10 000 get the same run from the same defaults)
    samples_per_epoch: Optional[int] = None
    augment: str = "default"  # none | light | default
    in_chans: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.25])
    # raw pixels -> [0, 1] before mean/std (pretrain.intensity.scale_intensity), recorded in model.json:
    # "percentile" = per-image 0.5/99.5 percentile window; "zscore" = mean +- 3 std; "robust" =
    # median +- 3 x 1.4826 MAD; "dtype" = divide by the dtype's maximum. Match the encoder's pretraining.
    intensity: str = "percentile"
    # resize factor between the micrographs and the model's pixels (segment.zoom): 0.5 = half the
    # pixels per side, so each crop/tile covers twice the field of view; predictions come back on
    # the micrograph's own grid. Stored in model.json; evaluate and predict apply it.
    zoom: float = 1.0
    # pixel size of the training micrographs in nm (optional). model.json then records the model grid's
    # pixel size (pixel_size_nm / zoom) and segment.predict resizes every image whose pixel size is known
    # to that grid, so one model serves several magnifications and microscopes.
    pixel_size_nm: Optional[float] = None
    synthetic: Optional[str] = None  # superalloy | coating: generate a NASA-layout set into the run
    synthetic_size: int = 256
    num_workers: int = 0

    def __post_init__(self) -> None:
        try:
            self.intensity = canonical_intensity(self.intensity)
        except ValueError as e:
            raise ValueError(f"data.intensity: {e}") from None

        try:
            self.zoom = check_zoom(self.zoom)
        except ValueError as e:
            raise ValueError(f"data.zoom: {e}") from None
        if self.pixel_size_nm is not None and not (math.isfinite(self.pixel_size_nm) and self.pixel_size_nm > 0):
            raise ValueError(f"data.pixel_size_nm must be a positive number of nm, got {self.pixel_size_nm}")


@dataclass
class OptimConfig:
    # lr 1e-3 with a quarter-epoch (5-step) warm-up, then cosine: chosen on validation sets at the budgets a
    # CPU gives in minutes (BENCHMARKS "Short budgets"); 5e-4 with a one-epoch warm-up was the default before.
    lr: float = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_mult: float = 1.0  # LR multiplier for pretrained encoder branches
    schedule: Schedule = Schedule.cosine
    warmup_epochs: float = 0.25
    plateau_patience: int = 5
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    # The budget: optimizer steps (null: `epochs` x steps per epoch when `epochs` is set, else DEFAULT_STEPS),
    # the same meaning for one image and for 10 000; an epoch (data.samples_per_epoch crops) is a unit of
    # validation and logging. `max_minutes` bounds it by wall time as well (the schedule follows whichever
    # of the two budgets is nearer its end).
    steps: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: int = 8
    loss: Loss = Loss.dice_ce
    precision: Precision = Precision.no  # bf16/fp16 apply on GPU only
    seed: int = 0
    patience: int = 15  # early stopping: epochs without improvement of `monitor`
    monitor: Monitor = Monitor.miou
    eval_every: int = 1
    freeze_encoders_epochs: int = 0  # train only the decoder for the first N epochs
    max_minutes: Optional[float] = None  # wall-clock budget of training: stops after the step that reaches it, validates
    tile_overlap: float = 0.5
    tta: bool = False

    def __post_init__(self) -> None:
        if self.precision == Precision.auto:  # pretraining's choice; fine-tuning takes no | bf16 | fp16
            raise ValueError("train.precision must be one of no, bf16, fp16, got auto")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1 (or null), got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps must be >= 1 (or null for epochs x steps per epoch), got {self.steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"train.max_minutes must be > 0 (or null), got {self.max_minutes}")


@dataclass
class FinetuneConfig:
    """A whole fine-tuning run (configs/finetune.yaml and its groups), checked by Hydra at start-up."""

    out: str = MISSING  # the run folder; rerunning with the same folder resumes
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = True
    evaluate: bool = True  # evaluate the best checkpoint on the test sets at the end
    overlays: int = 4  # validation/test overlay figures in the report


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="finetune_schema", node=FinetuneConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
