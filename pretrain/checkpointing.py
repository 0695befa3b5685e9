"""Resumable training state for pretraining: atomic multi-rank checkpoints and pre-emption.

Checkpoints are ``accelerator.save_state`` folders under ``<run>/checkpoints/step_XXXXXXX/``. Every
rank takes part (the call is collective; under DeepSpeed each rank writes its own ZeRO partition
files, without it rank 0 writes model/optimizer/registered objects and every rank its RNG state),
so the folder is made atomic at the level of the whole job::

    rank 0: remove a stale checkpoints/.tmp-step_XXXXXXX      -- barrier --
    all:    save_state(checkpoints/.tmp-step_XXXXXXX)          -- barrier --
    rank 0: write trainer_state.json into it, rename it to step_XXXXXXX, prune to the last K
                                                                -- barrier --

A folder named ``step_*`` with ``trainer_state.json`` is therefore complete; temp folders are
ignored and cleaned up. ``trainer_state.json`` records the size and SHA-256 of every file beside it:
:meth:`CheckpointManager.resume` loads the newest checkpoint whose files verify, falls back to the
one before with a warning naming the damaged file, and loads nothing with code execution
(:mod:`pretrain.safe_state`). The run folder must be on a file system every rank sees (as Hydra's run
folder is). Objects outside the engine (the EMA teacher, DINO's centre, :class:`TrainState`) are
saved only if registered with ``accelerator.register_for_checkpointing``.

Pre-emption (:class:`Preemption`): SIGTERM/SIGUSR1 set a flag, and rank 0 polls a flag file
(``<run>/PREEMPT``, written by a SLURM trap before ``scontrol requeue``). Every ``poll_every``
steps all ranks all-reduce the flag, so they stop at the same step, checkpoint together and exit 0.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from pretrain.outputs import apply_umask, atomic_write_text, replace_dir
from pretrain.safe_state import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    digest_files,
    no_code_execution,
    verify_files,
)

__all__ = [
    "CHECKPOINT_DIR",
    "PREEMPT_FILE",
    "STATE_FILE",
    "CheckpointManager",
    "Preemption",
    "TrainState",
    "check_checkpoint",
    "list_checkpoints",
    "read_state",
]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
PREEMPT_FILE = "PREEMPT"
_NAME = re.compile(r"^step_(\d{7,})$")
_TMP_PREFIX = ".tmp-"


@dataclass
class TrainState:
    """Loop counters saved with every checkpoint (registered for checkpointing).

    ``step``: optimizer steps done; ``images``: images consumed by all ranks; ``elapsed``: seconds
    of training before this process started; ``resumes``: restarts so far. The data stream is
    resampled with replacement, so its state is its seed: after a resume it continues with a fresh
    seed derived from ``(seed, step)`` (see :func:`pretrain.corpus.make_train_loader`), never
    replaying the exact sequence it had already drawn.
    """

    step: int = 0
    images: int = 0
    elapsed: float = 0.0
    resumes: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, type(getattr(self, key))(value))


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint folder's ``trainer_state.json``; :class:`CorruptCheckpointError` if unreadable."""
    file = Path(path) / STATE_FILE
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(file, f"unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(file, "not a JSON object")
    return meta


def check_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a checkpoint folder against the digests in its state file (checkpoints written before
    digests were recorded pass unverified); returns the state."""
    meta = read_state(path)
    if isinstance(meta.get("files"), dict):
        verify_files(path, meta["files"])
    else:
        logger.warning("checkpoint %s records no file digests (written by an older version): not verified", path)
    return meta


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir/checkpoints`` as ``(step, path)``, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


class CheckpointManager:
    """Collective save/resume of the accelerator state in ``run_dir/checkpoints``.

    Every method is called on every rank.
    """

    def __init__(self, accelerator: Accelerator, run_dir: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.accelerator, self.run_dir, self.keep = accelerator, Path(run_dir), keep
        self.root = self.run_dir / CHECKPOINT_DIR

    def resume(self) -> dict[str, Any] | None:
        """Load the newest checkpoint that verifies and return its ``trainer_state.json`` (None: none).

        A damaged checkpoint (a file missing, truncated or altered since it was saved, or unreadable)
        is skipped with a warning naming the file, and the one before it is tried; a file that would
        need code execution to load stops the run (:class:`pretrain.safe_state.UnsafeCheckpointError`).
        Collective: rank 0 verifies, every rank loads the same checkpoint.
        """
        candidates = [path for _, path in reversed(list_checkpoints(self.run_dir))]
        skipped: list[str] = []
        while candidates:
            choice = [None]
            if self.accelerator.is_main_process:
                for path in candidates:
                    try:
                        check_checkpoint(path)
                        choice = [str(path)]
                        break
                    except CorruptCheckpointError as e:
                        logger.warning("checkpoint %s is damaged and is skipped: %s", path, e)
                        skipped.append(str(e))
            if self.accelerator.num_processes > 1:
                choice = broadcast_object_list(choice)
            if choice[0] is None:
                break
            path = Path(choice[0])
            candidates = candidates[candidates.index(path) + 1:]
            try:
                meta = self.load(path)
            except CorruptCheckpointError as e:
                logger.warning("checkpoint %s could not be read and is skipped: %s", path, e)
                skipped.append(str(e))
                continue
            if skipped:
                logger.warning("resumed from the earlier intact checkpoint %s (skipped: %s)", path, "; ".join(skipped))
            return meta
        if skipped:
            raise CorruptCheckpointError(
                self.root, "no intact checkpoint to resume from (" + "; ".join(skipped) + "); pass "
                "checkpoint.resume=false to start over in this folder, or choose a new out=DIR")
        return None

    def load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Restore the accelerator state (engine, optimizer, RNG, registered objects) from ``path``
        and return its ``trainer_state.json``. Refuses a DeepSpeed checkpoint of another world size,
        and any file that would need code execution to unpickle."""
        path = Path(path)
        meta = read_state(path)
        saved_world = meta.get("world_size")
        if (saved_world not in (None, self.accelerator.num_processes)
                and meta.get("deepspeed") and self.accelerator.distributed_type.name == "DEEPSPEED"):
            raise RuntimeError(
                f"{path} was written by {saved_world} DeepSpeed ranks, this run has {self.accelerator.num_processes}: "
                "ZeRO partitions cannot be re-split on load. Resume with the same number of processes, or convert "
                "it with DeepSpeed's universal checkpoint tools (ds_to_universal.py) first."
            )
        try:
            with no_code_execution():
                self.accelerator.load_state(str(path))
        except (CorruptCheckpointError, UnsafeCheckpointError):
            raise
        except (RuntimeError, KeyError, ValueError) as e:
            raise RuntimeError(
                f"cannot resume from {path}: {str(e).splitlines()[0]} - the run folder holds a checkpoint of another "
                "model or method; choose a new out=DIR, or pass checkpoint.resume=false to start over in it"
            ) from e
        logger.info("resumed from %s (step %s)", path, meta.get("step"))
        return meta

    def save(self, step: int, meta: dict[str, Any]) -> Path:
        """Write ``checkpoints/step_<step>`` atomically (see the module notes); returns its path."""
        acc = self.accelerator
        final = self.root / checkpoint_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"{_TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        t0 = time.monotonic()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {**meta, "step": step, "world_size": acc.num_processes,
                     "deepspeed": acc.distributed_type.name == "DEEPSPEED",
                     "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     "files": digest_files(tmp, exclude=(STATE_FILE,))}
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2, default=str) + "\n")
            for path in (tmp, *tmp.rglob("*")):  # safetensors and torch.save write 0600 files
                if not path.is_symlink():
                    apply_umask(path)
            replace_dir(tmp, final)  # the same step saved again (e.g. a stop right after a periodic save) replaces it
            for _, old in list_checkpoints(self.run_dir)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint %s written in %.1f s", final, time.monotonic() - t0)
        acc.wait_for_everyone()
        return final


class Preemption:
    """SIGTERM/SIGUSR1 and the ``<run>/PREEMPT`` flag file, agreed on by all ranks.

    ``requested(step)`` is collective on steps that are multiples of ``poll_every`` (every rank
    must call it at every step; it returns False in between without communicating).
    """

    def __init__(self, accelerator: Accelerator, run_dir: str | os.PathLike[str], *, poll_every: int = 5) -> None:
        if poll_every < 1:
            raise ValueError(f"checkpoint.poll_every must be >= 1, got {poll_every}")
        self.accelerator, self.poll_every = accelerator, poll_every
        self.flag_file = Path(run_dir) / PREEMPT_FILE
        self.signalled: int | None = None
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): the flag file still works
                logger.debug("cannot install a handler for %s outside the main thread", sig)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = signum
        logger.warning("received %s: checkpointing and stopping at the next agreed step",
                       signal.Signals(signum).name)

    def clear_stale_flag(self) -> None:
        """Remove a flag file left by the previous job (rank 0; call before training starts)."""
        if self.accelerator.is_main_process and self.flag_file.exists():
            logger.warning("removing the pre-emption flag %s left by a previous run", self.flag_file)
            self.flag_file.unlink(missing_ok=True)

    def local(self) -> bool:
        """This rank's view: a signal arrived or (rank 0) the flag file exists."""
        return self.signalled is not None or (self.accelerator.is_main_process and self.flag_file.exists())

    def requested(self, step: int) -> bool:
        if step % self.poll_every:
            return False
        flag = torch.tensor([1.0 if self.local() else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def acknowledge(self) -> None:
        """After the pre-emption checkpoint: remove the flag file so a requeued job trains on."""
        if self.accelerator.is_main_process:
            self.flag_file.unlink(missing_ok=True)

    def close(self) -> None:
        """Restore the previous signal handlers."""
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()
