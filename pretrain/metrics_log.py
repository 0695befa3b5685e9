"""The pretraining loop's metrics: the loss parts of a logging window, summed on the device and read
once per window (:class:`LossWindow`), and ``metrics.csv`` / TensorBoard on rank 0 (:class:`MetricsLog`).
"""
from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pretrain.outputs import atomic_write_text

__all__ = ["LossWindow", "MetricsLog"]


class LossWindow:
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


class MetricsLog:
    """``metrics.csv`` (rewritten atomically) and TensorBoard, on rank 0 only."""

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.path, self.enabled = out / "metrics.csv", enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        if self.path.is_file():  # a resumed run redoes the steps after its checkpoint
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= start_step]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional (tensorboard package) and slow to import

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
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        fmt = lambda v: "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))  # noqa: E731
        lines = [",".join(keys)] + [",".join(fmt(r.get(k)) for k in keys) for r in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
