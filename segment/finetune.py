"""`python -m segment.finetune [hydra overrides]`: fine-tune a segmentation model with Accelerate.

One loop for CPU, one GPU and many GPUs (`accelerate launch -m segment.finetune out=RUN ...`; pass the
same `out` to every rank). The run folder holds the resolved config, `history.csv`, TensorBoard logs,
the resumable training state (`checkpoints/step_XXXXXXX/`, the last two, verified on load and read
without unpickling code: `pretrain.checkpointing`), the `best/` and `last/` model checkpoints, the test
evaluation (`eval/`) and `report.md`. Rerunning with the same `out` resumes where it stopped.

This module is the training loop, its LR schedule and the CLI; the run's data is `segment.finetune_data`,
the model and parameter groups `segment.finetune_model`, validation metrics and `history.csv`
`segment.finetune_log`, and the legacy resume, OOD summary and test evaluation of `best/`
`segment.finetune_state`.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pretrain.checkpointing import CheckpointManager, Preemption
from pretrain.cli_checks import check_config_keys, check_overrides
from pretrain.outputs import atomic_write_text
from pretrain.schedules import warmup_cosine_factor
from pretrain.throughput import adamw, channels_last, enable_sdpa, enable_tf32
from segment.augment import train_transform
from segment.checkpoint import save_model
from segment.config import DEFAULT_STEPS, STEPS_PER_EPOCH, FinetuneConfig, Schedule, register_configs
from segment.data import SegmentationDataset
from segment.finetune_data import load_data, prepare_synthetic, synthetic_to_generate
from segment.finetune_log import read_history, validate, write_history
from segment.finetune_model import build_model, param_groups
from segment.finetune_state import KEEP_CHECKPOINTS, evaluate_best, fit_ood, load_legacy_state
from segment.losses import build_loss

log = logging.getLogger(__name__)

LOG_EVERY = 10  # steps between host reads of the loss (one sync per window, not per step)


# ------------------------------------------------------------------------------------- schedule
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
    cosine = cfg.optim.schedule == Schedule.cosine

    def base(step: int) -> float:
        fraction = time_fraction() if time_fraction is not None and cosine and step >= warmup else None
        return warmup_cosine_factor(step, warmup, total, cosine=cosine, fraction=fraction)

    def make(is_encoder: bool):
        return lambda step: 0.0 if (is_encoder and step < freeze) else base(step)

    return [make(g["is_encoder"]) for g in groups]


# ------------------------------------------------------------------------------------ training
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

    criterion = build_loss(cfg.train.loss)
    meta = dict(
        model=cfg.model.name, model_kwargs=model_kwargs, class_names=list(cm.names),
        colors=[list(c) for c in cm.overlay_colors], class_map=cm.to_dict(),
        tile_size=cfg.data.crop_size, overlap=cfg.train.tile_overlap, in_chans=cfg.data.in_chans,
        mean=list(mean), std=list(std),
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
        from torch.utils.tensorboard import SummaryWriter  # heavy (tensorboard), main process only

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
        from segment.report import write_report  # heavy (matplotlib), main process only, at the end

        write_report(out, history, result, cfg)
    accelerator.wait_for_everyone()
    return result


register_configs()


def checked_config(cfg) -> FinetuneConfig:
    """The typed config of a composed one; SystemExit with one line for a key the schema lacks (Hydra's
    `+key=` adds any) or a `data.root` that a synthetic preset must not touch."""
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
    explicit_out = any(o.startswith("out=") for o in HydraConfig.get().overrides.task)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not explicit_out:
        raise SystemExit("multi-process fine-tuning needs one run folder for all ranks: pass out=RUN_DIR")
    result = train(checked_config(cfg))
    return float(result.get("best", float("nan")))


def main() -> None:
    """Console entry (`python -m segment.finetune`, `mseg-finetune`): a mistyped override key stops here,
    naming the nearest valid key, before Hydra composes (which would add a `+key` silently)."""
    check_overrides(sys.argv[1:], FinetuneConfig)
    run()


if __name__ == "__main__":
    main()
