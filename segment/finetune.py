"""`python -m segment.finetune [hydra overrides]`: fine-tune a segmentation model with Accelerate.

One loop for CPU, one GPU and many GPUs (`accelerate launch -m segment.finetune out=RUN ...`; pass the
same `out` to every rank). The run folder holds the resolved config, `history.csv`, TensorBoard logs,
the resumable training state (`checkpoints/step_XXXXXXX/`, the last two, verified on load and read
without unpickling code: `pretrain.checkpointing`), the `best/` and `last/` model checkpoints, the test
evaluation (`eval/`) and `report.md`. Rerunning with the same `out` resumes where it stopped.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hydra
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from segment.checkpoint import atomic_write_text, save_model
from pretrain.checkpointing import CheckpointManager, Preemption
from pretrain.safe_state import no_code_execution
from pretrain.throughput import adamw, channels_last, enable_sdpa, enable_tf32
from segment.config import DEFAULT_STEPS, STEPS_PER_EPOCH, FinetuneConfig, Schedule, register_configs

log = logging.getLogger(__name__)

LEGACY_STATE_DIR = "state"  # the training state of runs written before checkpoints/ (resumed, never written)
KEEP_CHECKPOINTS = 2  # the latest and one to fall back to when the latest is damaged
LOG_EVERY = 10  # steps between host reads of the loss (one sync per window, not per step)
SYNTHETIC_MARKER = ".synthetic.json"  # written last into a generated set: {kind, size, seed}


# ----------------------------------------------------------------------------------------- data
def parse_set_spec(spec: str, default_split: str = "test") -> tuple[Path, str]:
    """`ROOT[:SPLIT]` -> (root, split)."""
    root, sep, split = spec.rpartition(":")
    if not sep or "/" in split:
        return Path(spec), default_split
    return Path(root), split


def _synthetic_stamp(cfg: FinetuneConfig) -> dict:
    return {"kind": cfg.data.synthetic, "size": cfg.data.synthetic_size, "seed": 0}


def _holds_images(root: Path) -> bool:
    """Whether folder ROOT holds any image file (stops at the first)."""
    from pretrain.io import IMAGE_SUFFIXES

    for _, _, files in os.walk(root):
        if any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            return True
    return False


def synthetic_to_generate(cfg: FinetuneConfig) -> bool:
    """Whether a synthetic preset's set must be generated at `data.root` (False: a finished one is there).

    The generator writes only below the run folder (`out`), never into a user's folder: a `data.root`
    outside the run is only read, and only when it holds a finished set of the same settings
    (`SYNTHETIC_MARKER`); otherwise ValueError naming the preset to pick for your own images.
    """
    d = cfg.data
    root, out = Path(d.root).expanduser().resolve(), Path(cfg.out).expanduser().resolve()
    marker = root / SYNTHETIC_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _synthetic_stamp(cfg):
        return False
    if out in root.parents:
        return True
    preset = f"the synthetic data preset (data.synthetic={d.synthetic}) generates its images into the run"
    own = (f"for your own images use data=folder data.root={root} data.class_map=... (images/ + masks/, or the "
           f"NASA layout train/ train_annot/ ...) or a benchmark preset (data=super1, data=ebc1, ...)")
    if marker.is_file():
        raise ValueError(f"data.root={root} holds a synthetic set made with other settings "
                         f"({marker.read_text().strip()}); {preset} folder: drop the data.root override")
    if root.is_dir() and _holds_images(root):
        raise ValueError(f"data.root={root} holds images, but {preset} and never writes into your folder; {own}")
    raise ValueError(f"data.root={root} is outside the run folder {out}: {preset} only; "
                     f"drop the data.root override, or {own}")


def prepare_synthetic(cfg: FinetuneConfig, accelerator: Accelerator) -> None:
    """Generate the synthetic NASA-layout set into the run (main process; others wait); the marker file,
    written last, makes a rerun reuse it. A `data.root` outside the run is never written
    (`synthetic_to_generate`)."""
    from pretrain.synthetic import write_nasa_set

    root = Path(cfg.data.root)
    if synthetic_to_generate(cfg) and accelerator.is_main_process:
        size = (cfg.data.synthetic_size, cfg.data.synthetic_size)
        log.info("writing synthetic %s data set to %s", cfg.data.synthetic, root)
        write_nasa_set(root, cfg.data.synthetic, size=size, seed=0)
        atomic_write_text(root / SYNTHETIC_MARKER, json.dumps(_synthetic_stamp(cfg)))
    accelerator.wait_for_everyone()


@dataclass
class Data:
    class_map: Any
    train_pairs: list
    val_pairs: list
    test_sets: dict[str, list] = field(default_factory=dict)


def load_data(cfg: FinetuneConfig) -> Data:
    from segment.data import few_shot, find_pairs, get_class_map, select_by_name

    d = cfg.data
    class_map = get_class_map(d.class_map)
    root = Path(d.root)
    train = find_pairs(root, d.train_split, layout=d.layout)
    train = select_by_name(train, list(d.train_names)) if d.train_names else few_shot(train, d.n_train, cfg.train.seed)
    val = find_pairs(root, d.val_split, layout=d.layout)
    tests: dict[str, list] = {}
    specs = {split: (root, split) for split in d.test_splits}
    specs.update({name: parse_set_spec(spec) for name, spec in d.extra_tests.items()})
    for name, (troot, tsplit) in specs.items():
        unpaired: list[Path] = []  # images without a mask: evaluated as failures (eval/failures.csv)
        try:
            pairs = find_pairs(troot, tsplit, layout=d.layout, unpaired=unpaired)
        except FileNotFoundError as e:  # a split folder that is not there
            log.warning("test set %r skipped: %s", name, e)
            continue
        tests[name] = sorted([*pairs, *((image, None) for image in unpaired)], key=lambda p: str(p[0]))
    log.info("data: %d train (%s), %d val, tests %s", len(train), ", ".join(p[0].name for p in train[:4]),
             len(val), {k: len(v) for k, v in tests.items()})
    return Data(class_map, train, val, tests)


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[nn.Module, dict]:
    from segment.models import create_model

    kwargs = dict(num_classes=num_classes, in_chans=cfg.data.in_chans, img_size=cfg.data.crop_size)
    kwargs.update(OmegaConf.to_container(cfg.model.kwargs) if OmegaConf.is_config(cfg.model.kwargs) else cfg.model.kwargs)
    model = create_model(cfg.model.name, **kwargs)
    if cfg.model.encoder_weights:
        from segment.weights import load_model_encoders

        for branch, source in dict(cfg.model.encoder_weights).items():
            check_encoder_intensity(branch, source, cfg.data.intensity)
        load_model_encoders(model, dict(cfg.model.encoder_weights), allow_mismatch=cfg.model.allow_mismatch)
    if cfg.model.init_decoder:
        if not hasattr(model, "init_decoder_from_encoder"):
            raise ValueError(f"model.init_decoder=true but {cfg.model.name} has no Swin decoder to initialise")
        model.init_decoder_from_encoder()
    return model, kwargs


def export_intensity(source: str | os.PathLike[str]) -> str | None:
    """The ``intensity`` recorded in the pretrain export json beside ``source`` (an export folder or
    its ``encoder.safetensors``), or None when there is none (other checkpoint formats, URLs)."""
    from segment.weights import ENCODER_META

    path = Path(source).expanduser()
    if path.is_dir():
        meta_path = path / ENCODER_META
    elif path.suffix == ".safetensors":
        meta_path = path.with_suffix(".json")
    else:
        return None
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # read_checkpoint reports a broken export when loading the weights
    value = meta.get("intensity") if isinstance(meta, dict) else None
    return str(value) if value is not None else None


def check_encoder_intensity(branch: str, source: str | os.PathLike[str], intensity: str) -> bool:
    """Warn when a pretrain export was trained on intensities scaled unlike ``data.intensity``;
    True when they agree or the export does not say."""
    from pretrain.intensity import canonical_intensity

    recorded = export_intensity(source)
    if recorded is None:
        return True
    try:
        same = canonical_intensity(recorded) == canonical_intensity(intensity)
    except ValueError:
        same = False
    if not same:
        log.warning("encoder %r from %s was pretrained with intensity %r but data.intensity is %r: the "
                    "encoder sees differently scaled inputs (set data.intensity to match)",
                    branch, source, recorded, intensity)
    return same


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Decoder/encoder x decay/no-decay groups; norms, biases and position tables get no decay."""
    encoder_ids = {id(p) for enc in getattr(model, "encoders", {}).values() for p in enc.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "relative_position" in name or "pos_embed" in name
        groups.setdefault((id(p) in encoder_ids, no_wd), []).append(p)
    o = cfg.optim
    return [
        dict(params=ps, lr=o.lr * (o.encoder_lr_mult if enc else 1.0), weight_decay=0.0 if no_wd else o.weight_decay,
             is_encoder=enc)
        for (enc, no_wd), ps in sorted(groups.items())
    ]


def total_steps(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """The optimizer steps of the run: `train.steps` when set (the budget that does not depend on the
    number of training images), else `train.epochs` x steps per epoch when set, else `DEFAULT_STEPS`."""
    if cfg.train.steps is not None:
        return max(1, cfg.train.steps)
    if cfg.train.epochs is not None:
        return max(1, cfg.train.epochs * steps_per_epoch)
    return DEFAULT_STEPS


def samples_per_epoch(cfg: FinetuneConfig) -> int:
    """Crops per epoch: `data.samples_per_epoch`, else STEPS_PER_EPOCH batches (not a function of the images)."""
    return cfg.data.samples_per_epoch or STEPS_PER_EPOCH * cfg.train.batch_size


def lr_lambdas(groups: list[dict], cfg: FinetuneConfig, steps_per_epoch: int,
               time_fraction: Callable[[], float] | None = None):
    """Per-group LR factor of the global step: warm-up + cosine (or constant) over `total_steps`;
    encoders frozen first. With a wall-clock budget (`time_fraction`: the spent share of
    `train.max_minutes`), the cosine follows whichever budget is nearer its end, so a run stopped by
    the clock has annealed too."""
    total = total_steps(cfg, steps_per_epoch)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)
    freeze = cfg.train.freeze_encoders_epochs * steps_per_epoch

    def base(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == Schedule.cosine:
            t = (step - warmup) / max(1, total - warmup)
            if time_fraction is not None:
                t = max(t, time_fraction())
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    def make(is_encoder: bool):
        return lambda step: 0.0 if (is_encoder and step < freeze) else base(step)

    return [make(g["is_encoder"]) for g in groups]


# ------------------------------------------------------------------------------------ training
def validate(model: nn.Module, dataset, cfg: FinetuneConfig, device) -> dict[str, float]:
    """Sliding-window prediction on the full validation images; NASA IoU and per-class IoU."""
    from segment.infer import Predictor
    from segment.metrics import aggregate, confusion_matrix

    k = len(dataset.class_map.names)
    predictor = Predictor(model, tile_size=cfg.data.crop_size, overlap=cfg.train.tile_overlap,
                          batch_size=cfg.train.batch_size, device=device, tta=False, zoom=cfg.data.zoom)
    cms = []
    for i in range(len(dataset)):
        item = dataset[i]
        pred = predictor.predict_logits(item["image"]).argmax(0).numpy()
        cms.append(confusion_matrix(pred, item["mask"].numpy(), k))
    agg = aggregate(cms)
    out = {"nasa_iou": float(agg["nasa_iou"]), "miou": float(agg["miou"])}
    for name, v in zip(dataset.class_map.names, agg["iou_per_class"]):
        out[f"iou_{name}"] = float(v)
    return out


def write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else f"{r[k]}" for k in keys) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_history(path: Path) -> list[dict]:
    """The rows of `history.csv` with the types they were written with (int, float or None)."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _number(text: str | None) -> int | float | None:
    """`"3"` -> 3, `"3.0"` / `"0.25"` / `"nan"` -> float, `""` -> None: a resumed run rewrites what it read."""
    if text in ("", None):
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)


def speed_up(model: nn.Module, accelerator: Accelerator) -> bool:
    """TF32 on Ampere+, PyTorch SDPA in timm attention, NHWC weights for pure CNNs (not under DeepSpeed,
    whose parameter broadcasts refuse them); returns whether inputs should be NHWC too."""
    tf32 = enable_tf32(accelerator.device)
    sdpa = enable_sdpa(model)
    nhwc = accelerator.distributed_type != DistributedType.DEEPSPEED and channels_last(model)
    if accelerator.is_main_process:
        log.info("speed settings: tf32 %s, sdpa in %d attention modules, channels_last %s", tf32, sdpa, nhwc)
    return nhwc


def train(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune, validate, checkpoint, evaluate the best model on the test sets; returns the results."""
    from segment.data import SegmentationDataset, train_transform

    out = Path(cfg.out).resolve()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.precision.value if torch.cuda.is_available() else "no",
    )
    main_proc = accelerator.is_main_process
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file
        logging.getLogger(name).setLevel(logging.WARNING)
    if not main_proc:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(cfg.train.seed, device_specific=True)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.data.synthetic:
        prepare_synthetic(cfg, accelerator)

    data = load_data(cfg)
    cm = data.class_map
    k = len(cm.names)
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    n_samples = samples_per_epoch(cfg)
    train_ds = SegmentationDataset(
        data.train_pairs, cm, in_chans=cfg.data.in_chans, mean=mean, std=std,
        transform=train_transform(cfg.data.crop_size, strength=cfg.data.augment, seed=cfg.train.seed), samples_per_epoch=n_samples,
        intensity=cfg.data.intensity, zoom=cfg.data.zoom,
    )
    val_ds = SegmentationDataset(data.val_pairs, cm, in_chans=cfg.data.in_chans, mean=mean, std=std,
                                 intensity=cfg.data.intensity)
    loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)

    model, model_kwargs = build_model(cfg, k)
    nhwc = speed_up(model, accelerator)
    groups = param_groups(model, cfg)
    optimizer = adamw(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    clock = dict(start=time.time())  # reset to the resumed start below

    def time_fraction() -> float:
        return (time.time() - clock["start"]) / 60 / cfg.train.max_minutes

    warm = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(groups, cfg, steps_per_epoch, time_fraction if cfg.train.max_minutes else None))
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                          patience=cfg.optim.plateau_patience)
               if cfg.optim.schedule == Schedule.plateau else None)
    accelerator.register_for_checkpointing(warm)
    if plateau is not None:
        accelerator.register_for_checkpointing(plateau)

    from segment.losses import build_loss

    criterion = build_loss(cfg.train.loss)
    meta = dict(
        model=cfg.model.name, model_kwargs=model_kwargs, class_names=list(cm.names),
        colors=[list(c) for c in cm.overlay_colors], class_map=cm.to_dict(),
        tile_size=cfg.data.crop_size, in_chans=cfg.data.in_chans, mean=list(mean), std=list(std),
        intensity=cfg.data.intensity, zoom=cfg.data.zoom,
        model_pixel_size_nm=None if cfg.data.pixel_size_nm is None else cfg.data.pixel_size_nm / cfg.data.zoom,
        encoder_weights=dict(cfg.model.encoder_weights),
        train_images=[p[0].name for p in data.train_pairs],
    )

    # ---- resume
    state = dict(epoch=0, step_in_epoch=0, global_step=0, best=-1.0, best_epoch=-1, bad_epochs=0, elapsed=0.0)
    history = read_history(out / "history.csv")
    checkpoints = CheckpointManager(accelerator, out, keep=KEEP_CHECKPOINTS)
    if cfg.resume:
        saved = checkpoints.resume() or load_legacy_state(accelerator, out)
        if saved is not None:
            state.update({k: type(state[k])(saved[k]) for k in state if k in saved})
            history = [r for r in history if r.get("epoch") is not None and r["epoch"] < state["epoch"] + 1]
            log.info("resumed at epoch %d, step %d", state["epoch"], state["global_step"])

    def save_state() -> None:
        checkpoints.save(state["global_step"], dict(state))

    writer = None
    if main_proc:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    preempt = Preemption(accelerator, out, poll_every=1)  # SIGTERM/SIGUSR1 or RUN/PREEMPT, agreed by all ranks
    preempt.clear_stale_flag()
    t_start = clock["start"] = time.time() - state["elapsed"]
    unwrapped = accelerator.unwrap_model(model)
    budget = total_steps(cfg, steps_per_epoch)
    n_epochs = math.ceil(budget / steps_per_epoch)  # an epoch is a unit of logging and validation
    stop_reason = "steps" if cfg.train.steps is not None else "epochs"

    def out_of_time() -> bool:
        return bool(cfg.train.max_minutes) and (time.time() - t_start) / 60 >= cfg.train.max_minutes

    while state["epoch"] < n_epochs:
        epoch = state["epoch"]
        model.train()
        epoch_loader = accelerator.skip_first_batches(loader, state["step_in_epoch"]) if state["step_in_epoch"] else loader
        losses = []
        bar = tqdm(epoch_loader, desc=f"epoch {epoch + 1}/{n_epochs}", disable=not main_proc,
                   initial=state["step_in_epoch"], total=steps_per_epoch, leave=False)
        pending: list[torch.Tensor] = []  # losses still on the device, read every LOG_EVERY steps

        def flush() -> None:
            """Read the pending losses in one host sync: stop on a non-finite one, log the rest."""
            if not pending:
                return
            values = torch.stack(pending).float().cpu().tolist()
            first = state["global_step"] - len(values) + 1
            pending.clear()
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    raise FloatingPointError(f"non-finite loss {v} at step {first + i}")
            losses.extend(values)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if writer:
                for i, v in enumerate(values):
                    writer.add_scalar("train/loss", v, first + i)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state["global_step"])

        for batch in bar:
            image = batch["image"].contiguous(memory_format=torch.channels_last) if nhwc else batch["image"]
            logits = model(image)
            loss = criterion(logits, batch["mask"])
            accelerator.backward(loss)
            if cfg.optim.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            warm.step()
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            pending.append(loss.detach())
            if len(pending) >= LOG_EVERY:
                flush()
            if preempt.requested(state["global_step"]):
                flush()
                state["elapsed"] = time.time() - t_start
                save_state()
                preempt.acknowledge()
                preempt.close()
                log.warning("checkpointed at step %d after a signal; exiting", state["global_step"])
                return {"stopped": "signal", "global_step": state["global_step"]}
            if state["global_step"] >= budget or out_of_time():
                break
        flush()
        bar.close()
        timed_out = out_of_time() and state["global_step"] < budget
        last = epoch + 1 == n_epochs or state["global_step"] >= budget or timed_out

        # ---- end of epoch: validate, checkpoint, early stopping
        row: dict[str, Any] = dict(epoch=epoch + 1, step=state["global_step"], train_loss=float(np.mean(losses)) if losses else None,
                                   lr=optimizer.param_groups[0]["lr"], minutes=(time.time() - t_start) / 60)
        improved = False
        if (epoch + 1) % cfg.train.eval_every == 0 or last:
            metrics = [None]
            if main_proc:
                unwrapped.eval()
                metrics = [validate(unwrapped, val_ds, cfg, accelerator.device)]
                unwrapped.train()
            metrics = broadcast_object_list(metrics)[0]
            row.update({f"val_{k_}": v for k_, v in metrics.items()})
            score = metrics[cfg.train.monitor.value]
            if plateau is not None:
                plateau.step(score)
            if score > state["best"]:
                state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
                improved = True
                if main_proc:
                    save_model(out / "best", unwrapped, {**meta, "epoch": epoch + 1, "val": metrics})
            else:
                state["bad_epochs"] += 1
            if writer:
                for k_, v in metrics.items():
                    writer.add_scalar(f"val/{k_}", v, epoch + 1)
        history.append(row)
        state.update(epoch=epoch + 1, step_in_epoch=0, elapsed=time.time() - t_start)
        if main_proc:
            write_history(out / "history.csv", history)
            log.info("epoch %d: loss %.4f%s%s", epoch + 1, row["train_loss"] or float("nan"),
                     "".join(f" {k_} {v:.4f}" for k_, v in row.items() if k_.startswith("val_") and k_ in ("val_nasa_iou", "val_miou")),
                     " (best)" if improved else "")
        save_state()
        if state["bad_epochs"] >= cfg.train.patience:
            stop_reason = f"early stop: no {cfg.train.monitor.value} gain in {cfg.train.patience} epochs"
            break
        if timed_out:
            stop_reason = f"time budget of {cfg.train.max_minutes} min"
            break
        if last:
            break

    minutes = (time.time() - t_start) / 60
    log.info("training finished (%s) after %.1f min; best %s %.4f at epoch %d", stop_reason, minutes,
             cfg.train.monitor.value, state["best"], state["best_epoch"])
    preempt.close()
    if writer:
        writer.close()
    result: dict[str, Any] = dict(stopped=stop_reason, minutes=minutes, best=state["best"], best_epoch=state["best_epoch"],
                                  global_step=state["global_step"], out=str(out),
                                  train_images=meta["train_images"])
    if main_proc:
        save_model(out / "last", unwrapped, {**meta, "epoch": state["epoch"]})
        fit_ood(out / "best", data, accelerator.device)
        if cfg.evaluate and data.test_sets:
            result["test"] = evaluate_best(out, data, cfg, accelerator.device)
        from segment.report import write_report

        write_report(out, history, result, cfg)
    accelerator.wait_for_everyone()
    return result


def load_legacy_state(accelerator: Accelerator, out: Path) -> dict | None:
    """Resume a run folder written before `checkpoints/` (`state/` + `trainer.json`), without unpickling code."""
    legacy = out / LEGACY_STATE_DIR
    if not (legacy / "trainer.json").is_file():
        return None
    with no_code_execution():
        accelerator.load_state(str(legacy))
    return json.loads((legacy / "trainer.json").read_text())


def fit_ood(best: Path, data: Data, device) -> None:
    """The OOD summary of `best/` (segment.ood: training tiles' features, threshold on the validation
    images), used by segment.predict; a failure costs the run only the OOD score (logged)."""
    from segment.ood import fit_checkpoint

    try:
        fit_checkpoint(best, [i for i, _ in data.train_pairs], [i for i, _ in data.val_pairs], device=device)
    except Exception as exc:  # noqa: BLE001 - the score is optional; the trained model is not
        log.warning("no OOD summary for %s (%s: %s)", best, type(exc).__name__, exc)


def evaluate_best(out: Path, data: Data, cfg: FinetuneConfig, device) -> dict:
    """Evaluate `best/` on every test set with the evaluation used by `segment.evaluate`."""
    from segment.checkpoint import load_model
    from segment.evaluate import evaluate_sets
    from segment.infer import Predictor

    model, meta = load_model(out / "best")
    predictor = Predictor(model, tile_size=meta["tile_size"], overlap=cfg.train.tile_overlap, tta=cfg.train.tta,
                          batch_size=cfg.train.batch_size, device=device, mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                          intensity=meta.get("intensity", "dtype"), zoom=meta.get("zoom", 1.0))
    return evaluate_sets(predictor, data.test_sets, data.class_map, out / "eval", overlays=True,
                         max_overlays=cfg.overlays)


register_configs()


def checked_config(cfg) -> FinetuneConfig:
    """The typed config of a composed one; SystemExit with one line for a key the schema lacks (Hydra's
    `+key=` adds any) or a `data.root` that a synthetic preset must not touch."""
    from pretrain.cli_checks import check_config_keys

    try:
        check_config_keys(cfg, FinetuneConfig)
        typed = OmegaConf.to_object(cfg)
        if typed.data.synthetic:
            synthetic_to_generate(typed)
    except ValueError as e:
        raise SystemExit(f"segment.finetune: {e}") from None
    return typed


@hydra.main(config_path="../configs", config_name="finetune", version_base="1.3")
def run(cfg) -> float:
    """Hydra entry (after `hydra.callbacks.check_out` made sure `out` is writable): `train`."""
    from hydra.core.hydra_config import HydraConfig

    explicit_out = any(o.startswith("out=") for o in HydraConfig.get().overrides.task)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not explicit_out:
        raise SystemExit("multi-process fine-tuning needs one run folder for all ranks: pass out=RUN_DIR")
    result = train(checked_config(cfg))
    return float(result.get("best", float("nan")))


def main() -> None:
    """Console entry (`python -m segment.finetune`, `mseg-finetune`): a mistyped override key stops here,
    naming the nearest valid key, before Hydra composes (which would add a `+key` silently)."""
    import sys

    from pretrain.cli_checks import check_overrides

    check_overrides(sys.argv[1:], FinetuneConfig)
    run()


if __name__ == "__main__":
    main()
