"""`accelerate launch pretrain/main.py [hydra overrides]`: self-supervised pretraining of a micrograph encoder.

Also runs as ``python pretrain/main.py`` or ``python -m pretrain.main``. Without overrides it pretrains a
small Swin (``swin_lite``) with DINO on the embedded synthetic corpus in a few CPU minutes::

    python -m pretrain.main                                              # CPU demo, runs/pretrain/<time>/
    python -m pretrain.main pretrain/method=simclr pretrain/encoder=resnet18 out=runs/pt/simclr
    python -m pretrain.main data.shards=/data/shards knn.holdout=/data/holdout out=runs/pt/real
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml pretrain/main.py out=runs/pt/ddp
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 pretrain/main.py out=runs/pt/cpu2
    python pretrain/main.py distributed.deepspeed=zero2 out=runs/pt/z2_one   # one process, no launcher
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml pretrain/main.py out=runs/pt/z2
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml pretrain/main.py \
        distributed.deepspeed=zero2 pretrain/experiment=swin_t_dino out=runs/pt/swin_t

Run folder (``out``, Hydra's run dir, shared by every rank)::

    config.yaml            the resolved configuration (also .hydra/ and main.log from rank 0)
    corpus/                the synthetic corpus and its shards (when data.shards is null)
    knn_holdout/           the synthetic k-NN holdout (when knn.holdout is null)
    metrics.csv, tb/       loss and its parts, lr, wd, momentum, teacher temperature, images/s, k-NN
    checkpoints/step_XXXXXXX/   accelerate states, written atomically, the last checkpoint.keep kept
    export/                encoder.safetensors + encoder.json: the deliverable for segment
    ranks/rank_N.json      per rank: shards assigned and read, steps, checksum of the student
    PREEMPT                created by a SLURM trap: checkpoint at the next agreed step and exit 0

Rerunning with the same ``out`` resumes from the newest complete checkpoint. With more than one
process every rank must use the same folder: pass ``out=DIR`` (under SLURM, ``out`` defaults to
``runs/pretrain/slurm-$SLURM_JOB_ID``, stable across requeues); otherwise the run stops with a message.
Ranks other than 0 write no Hydra outputs (no ``.hydra/``, log to the console at WARNING).

This module is the thin Hydra entry point; the loop and its parts are :mod:`pretrain.train`.
"""
from __future__ import annotations

if not __package__:  # run as a script (`python pretrain/main.py`, `accelerate launch pretrain/main.py`)
    import sys
    from pathlib import Path

    _here = Path(__file__).resolve().parent
    # The script's folder must not shadow modules (pretrain/io.py would hide `io`); import the package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import os
import sys
from collections.abc import Mapping, Sequence

import hydra
from omegaconf import DictConfig

from pretrain.cli_checks import check_config_keys, check_overrides
from pretrain.config import PretrainConfig, register_configs
from pretrain.train import train

__all__ = ["cli", "main", "resolve_out_override"]


# ----------------------------------------------------------------------------------- entry point
def resolve_out_override(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Command-line overrides to add before Hydra runs, so that every rank shares one run folder.

    With ``WORLD_SIZE > 1`` and no ``out=`` given, ``out`` is derived from ``SLURM_JOB_ID`` (stable
    across requeues) or the run stops with ``SystemExit`` and a message. Ranks other than 0 get no
    Hydra output folder and console-only logging.
    """
    extra: list[str] = []
    has_out = any(a.split("=", 1)[0].lstrip("+") == "out" for a in argv if "=" in a)
    if int(environ.get("WORLD_SIZE", "1")) > 1 and not has_out:
        job = environ.get("SLURM_JOB_ID")
        if not job:
            raise SystemExit(
                "pretrain: this is a multi-process run (WORLD_SIZE="
                f"{environ.get('WORLD_SIZE')}) without out=DIR; every rank would make its own timestamped "
                "folder. Pass the same out=DIR to all ranks, e.g. "
                "`accelerate launch pretrain/main.py out=runs/pretrain/my_run`."
            )
        extra.append(f"out=runs/pretrain/slurm-{job}")
    if int(environ.get("RANK", "0")) != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return extra


register_configs()


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry: ``train(cfg)``; returns the final k-NN top-1 (NaN when not probed) for sweeps.

    Hydra's ``hydra.callbacks.check_out`` has checked that ``out`` is writable; a key the schema lacks
    (Hydra's ``+key=`` adds any) stops here with one line naming the nearest valid key.
    """
    try:
        check_config_keys(cfg, PretrainConfig)
    except ValueError as e:
        raise SystemExit(f"pretrain: {e}") from None
    result = train(cfg)
    return float(result["knn_top1"]) if result.get("knn_top1") is not None else float("nan")


def cli() -> None:
    """Console entry: check the override keys (nearest valid key on a typo, before Hydra composes),
    add the multi-process overrides, then run Hydra."""
    check_overrides(sys.argv[1:], PretrainConfig)
    sys.argv += resolve_out_override(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
