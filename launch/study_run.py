"""One cell's run folder (``OUT/<cell name>``): its fine-tuning config (:func:`compose_cell`), the claim
that lets several study processes share one study folder (:func:`claim`, :func:`release`), and whether
it has finished (:func:`is_done`); the status and failure files the study writes.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from launch.study_grid import CONFIGS, Cell
from pretrain.cli_checks import check_config_keys
from segment.config import FinetuneConfig, register_configs

STATUS_FILE = "study.json"
CLAIM_FILE = "claim.json"
FAILURES = "failures.csv"


def is_done(run: Path) -> bool:
    return (run / "eval" / "summary.csv").is_file()


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def claim(run: Path) -> bool:
    """Take the cell for this process, so that several study processes can share one folder.

    ``CELL/claim.json`` (host, pid) is created exclusively; False when another process holds it. A claim
    left by a dead process on this host is taken over; claims from other hosts are honoured (delete the
    file to free a cell whose job died elsewhere).
    """
    run.mkdir(parents=True, exist_ok=True)
    path = run / CLAIM_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder == me:
                return True
            if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release(run: Path) -> None:
    (run / CLAIM_FILE).unlink(missing_ok=True)


def compose_cell(cell: Cell, out: Path):
    """The typed FinetuneConfig of a cell (raises on an unknown key or a bad value)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("finetune", overrides=[*cell.overrides, f"out={out / cell.name}"])
    check_config_keys(cfg, FinetuneConfig)  # Hydra's `+key=` adds even a misspelt key
    return OmegaConf.to_object(cfg)
