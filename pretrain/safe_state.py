"""Training state read back without running code from the run folder, and checked for damage.

A run folder is data a user may have received from someone else (a colleague, a shared drive, a
download). Accelerate restores registered objects with ``torch.load(weights_only=False)`` and
DeepSpeed restores its partitions the same way: a crafted pickle there runs arbitrary code on resume.
:func:`no_code_execution` makes every ``torch.load`` inside it a ``weights_only=True`` load that
accepts tensors, plain containers and a short allow-list of inert classes that Accelerate and
DeepSpeed store (:data:`SAFE_GLOBALS`); anything else is refused with :class:`UnsafeCheckpointError`
naming the file, before any of its code can run.

Checkpoints also record the size and SHA-256 of every file they hold (:func:`digest_files`), written
last by the saving process, so a truncated or corrupted file is found before loading
(:func:`verify_files`) and the caller can fall back to an earlier checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["CorruptCheckpointError", "UnsafeCheckpointError", "digest_files", "no_code_execution",
           "safe_globals", "verify_files"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects that could run code; it was not loaded."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"refusing to load {self.path}: {reason}. Files in a run folder are read as data only "
            "(tensors and plain containers, torch.load weights_only=True), so a pickle that names other "
            "Python objects is never unpickled. If this run folder came from someone else, it may have been "
            "tampered with; start a new run (a new out=DIR) or resume=false / checkpoint.resume=false")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or altered since it was written."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


def safe_globals() -> list[Any]:
    """Classes beyond tensors and containers that Accelerate and DeepSpeed checkpoints hold.

    Each is inert data (an enum, a dataclass, a loss-scale record): unpickling one sets attributes and
    calls no code of the file's choosing. DeepSpeed is optional, so its classes are added when present.
    """
    allowed: list[Any] = []
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy RNG state, as accelerate's own load

        allowed += list(TORCH_SAFE_GLOBALS)
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    try:  # heavy and optional: only where DeepSpeed is installed
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # deepspeed: heavy, only when its classes are allow-listed
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:
        pass
    return allowed


@contextlib.contextmanager
def no_code_execution() -> Iterator[None]:
    """Within the block, every ``torch.load`` is ``weights_only=True`` with :func:`safe_globals`.

    Overrides callers that ask for ``weights_only=False`` (Accelerate's custom state, DeepSpeed's
    partitions). A refused or unreadable file raises an error that names it.
    """
    original = torch.load
    allowed = safe_globals()

    def guarded(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        name = f if isinstance(f, (str, os.PathLike)) else getattr(f, "name", repr(f))
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(name, _first_reason(e)) from None
        except (EOFError, RuntimeError, ValueError, OSError) as e:
            if isinstance(e, (UnsafeCheckpointError, CorruptCheckpointError)):
                raise
            raise CorruptCheckpointError(name, f"unreadable checkpoint file ({_first_line(e)})") from e

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original


def digest_files(folder: str | os.PathLike[str], *, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": n, "sha256": hex}}`` for every file under ``folder``."""
    folder = Path(folder)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in exclude:
            digests[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return digests


def verify_files(folder: str | os.PathLike[str], digests: dict[str, dict[str, Any]]) -> None:
    """Raise :class:`CorruptCheckpointError` naming the first file that is missing, of another size or
    of another SHA-256 than recorded by :func:`digest_files`."""
    folder = Path(folder)
    for rel, want in sorted(digests.items()):
        path = folder / rel
        if not path.is_file():
            raise CorruptCheckpointError(path, "missing from the checkpoint")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise CorruptCheckpointError(path, f"{size} bytes, {want.get('bytes')} when it was written (truncated or altered)")
        if _sha256(path) != want.get("sha256"):
            raise CorruptCheckpointError(path, "content differs from its SHA-256 recorded at save time (corrupted or altered)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _first_reason(e: BaseException) -> str:
    """The useful line of torch's weights-only refusal (which global it met)."""
    for line in str(e).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line or "WeightsUnpickler error" in line:
            return "it contains pickled Python objects (" + line.split("error:", 1)[-1].strip()[:240] + ")"
    return f"it cannot be read as plain tensors ({_first_line(e)})"
