"""The interface every pretraining method implements, and the multi-view network it trains.

Pattern: dinov2's ``SSLMetaArch`` (student/teacher ``ModuleDict``s, ``update_teacher``, param groups)
without its in-module backward, so ``accelerator.backward`` and the DeepSpeed engine own backward,
clipping and step. Only ``method.student`` is trained::

    method = create_method("dino", encoder, spec).to(device)
    optimizer = torch.optim.AdamW(method.param_groups(weight_decay=0.04))
    student, optimizer = accelerator.prepare(method.student, optimizer)
    method.attach(student)                     # route the student forward through DDP/DeepSpeed
    accelerator.register_for_checkpointing(method.checkpointable())
    for step, batch in enumerate(loader):
        apply_to_optimizer(optimizer, step, schedules)
        out = method(batch, step, teacher_temp=schedules.teacher_temp(step))
        accelerator.backward(out["loss"]); optimizer.step(); optimizer.zero_grad()
        method.update_teacher(schedules.momentum(step))

The EMA teacher is a submodule of the method but not of the student: it stays a plain fp32 module
outside the engine, with ``requires_grad=False``. It runs in eval mode (no dropout / drop-path)
except for its BatchNorm layers, which follow the method's mode: while training they normalise with
batch statistics and track their own running statistics, as the teachers of DINO, BYOL and MoCo do
with ResNets (an EMA of weights alone would leave the teacher's running statistics at their init).

DeepSpeed bf16/fp16 casts the student's parameters but not its buffers; with BatchNorm backbones set
``"data_types": {"buffer_dtype": "bf16"}`` in the DeepSpeed config (checked with deepspeed 0.19.8,
ZeRO-2 on CPU), or BatchNorm fails on mixed dtypes.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from lightly.models.utils import get_weight_decay_parameters
from torch import Tensor, nn

from pretrain.ema import fp32_sources

__all__ = ["Batch", "CheckpointState", "MultiViewNet", "SSLMethod"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
"""A training batch: ``"views"`` (list of ``B x C x H x W`` tensors), optional ``"label"`` (``B``)."""


class MultiViewNet(nn.ModuleDict):
    """A backbone followed by a chain of heads, run over a list of views in one call.

    Consecutive views of equal shape go through as one batch (DINO's multi-crop wrapper), so
    2 global + N local crops cost two passes, and DDP/DeepSpeed see a single forward per step.
    Returns, per view, every stage's output keyed by its name ("backbone", then each head).
    Inputs are cast to the parameters' dtype: DeepSpeed bf16/fp16 casts weights, not inputs.
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__({"backbone": backbone, **(heads or {})})

    def forward(self, views: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        dtype = _param_dtype(self)
        outputs: list[dict[str, Tensor]] = []
        for group in _same_shape_runs(views):
            x = torch.cat([views[i] for i in group]) if len(group) > 1 else views[group[0]]
            x = x.to(dtype)
            stages: dict[str, Tensor] = {}
            for name, module in self.items():
                x = module(x)
                stages[name] = x
            batch_size = views[group[0]].shape[0]
            split = {name: out.split(batch_size) for name, out in stages.items()}
            outputs.extend({name: chunks[j] for name, chunks in split.items()} for j in range(len(group)))
        return outputs


class SSLMethod(nn.Module):
    """Base class of the pretraining methods (one small subclass per method).

    Subclasses set the class attributes, pass the hyperparameters ``build_heads`` reads to
    ``__init__`` (stored as attributes before the student and teacher are built) and implement
    ``compute``.

    Class attributes:
        name: registry key.
        uses_teacher: EMA teacher built from ``teacher_heads`` (the other heads are student-only).
        requires_labels: the batch must carry ``"label"``.
        min_views: fewest views a batch may have.
        schedule_defaults: recommended ``ScheduleConfig`` values (momentum, weight decay, ...).
    """

    name: ClassVar[str] = ""
    uses_teacher: ClassVar[bool] = False
    teacher_heads: ClassVar[tuple[str, ...]] = ()
    requires_labels: ClassVar[bool] = False
    min_views: ClassVar[int] = 2
    schedule_defaults: ClassVar[Mapping[str, float]] = MappingProxyType({})

    student: MultiViewNet
    teacher: MultiViewNet | None

    def __init__(self, encoder: nn.Module, spec: Mapping[str, Any], **head_params: Any) -> None:
        super().__init__()
        if not hasattr(encoder, "num_features"):
            raise ValueError("encoder must expose num_features (build it with pretrain.encoders.build_encoder)")
        self.spec = dict(spec)
        self.num_features = int(encoder.num_features)
        self._runner: list[nn.Module] = []  # a plain list: the wrapped student must not become a submodule
        for key, value in head_params.items():
            setattr(self, key, value)
        self._build(encoder)

    # ----------------------------------------------------------------------------- construction
    def build_heads(self) -> dict[str, nn.Module]:
        """Fresh heads, in application order. Called once for the student and once for the teacher."""
        raise NotImplementedError

    def _build(self, encoder: nn.Module) -> None:
        """Create ``student`` (encoder + heads) and, for EMA methods, ``teacher`` as an fp32 copy."""
        self.student = MultiViewNet(encoder, self.build_heads())
        self.teacher = None
        if self.uses_teacher:
            # Fresh modules + state copy rather than deepcopy: weight-normalised heads (DINO) can't be deep-copied.
            heads = {k: v for k, v in self.build_heads().items() if k in self.teacher_heads}
            teacher = MultiViewNet(copy.deepcopy(encoder), heads)
            missing, _ = teacher.load_state_dict(self.student.state_dict(), strict=False)
            if missing:
                raise RuntimeError(f"teacher keys absent from the student: {missing[:5]}")
            self.teacher = teacher.float().requires_grad_(False)
            self.train(self.training)  # teacher: eval mode except BatchNorm
        n_student = sum(p.numel() for p in self.student.parameters())
        logger.info(
            "%s: student %.2f M parameters (%s)%s", self.name, n_student / 1e6, ", ".join(self.student.keys()),
            f", EMA teacher ({', '.join(self.teacher.keys())})" if self.teacher is not None else "",
        )

    # --------------------------------------------------------------------------------- running
    def attach(self, wrapped_student: nn.Module) -> None:
        """Run the student through ``wrapped_student`` (the DDP module / DeepSpeed engine that
        ``accelerator.prepare(method.student, ...)`` returned) so gradient sync hooks run."""
        self._runner[:] = [wrapped_student]

    def run_student(self, views: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        return (self._runner[0] if self._runner else self.student)(views)

    @torch.no_grad()
    def run_teacher(self, views: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        if self.teacher is None:
            raise RuntimeError(f"{self.name} has no teacher")
        return self.teacher(views)

    def forward(self, batch: Batch, step: int = 0, *, teacher_temp: float | None = None) -> dict[str, Tensor]:
        """Loss (fp32 scalar) and detached parts for logging.

        Args:
            batch: ``{"views": [B x C x H x W, ...], "label": B (supervised only)}``.
            step: global step (for methods with step-dependent behaviour).
            teacher_temp: DINO's teacher temperature from the schedule; ignored by other methods.
        """
        views = batch.get("views") if isinstance(batch, Mapping) else None
        if not isinstance(views, (list, tuple)) or len(views) < self.min_views:
            raise ValueError(f"{self.name} needs batch['views'], a list of at least {self.min_views} tensors")
        if any(v.ndim != 4 or v.shape[0] != views[0].shape[0] for v in views):
            raise ValueError(f"views must be B x C x H x W with one batch size, got {[tuple(v.shape) for v in views]}")
        if self.requires_labels and batch.get("label") is None:
            raise ValueError(f"{self.name} needs batch['label'] (class indices, shape B)")
        return self.compute(list(views), batch, step, teacher_temp)

    def compute(
        self, views: list[Tensor], batch: Batch, step: int, teacher_temp: float | None
    ) -> dict[str, Tensor]:
        """The method's loss on validated views; cast outputs with ``.float()`` before the loss."""
        raise NotImplementedError

    def _cross_view_loss(self, views: list[Tensor]) -> Tensor:
        """BYOL's and MoCo v3's symmetrised loss: each view's student prediction against the other view's
        teacher projection, `criterion(p0, z1)` and `criterion(p1, z0)` averaged."""
        pair = self._two_views(views)
        p0, p1 = (o["prediction"].float() for o in self.run_student(pair))
        z0, z1 = (o["projection"].float() for o in self.run_teacher(pair))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def _two_views(self, views: list[Tensor]) -> list[Tensor]:
        """The first two views, for two-view methods; extra (local) views are ignored, with a warning once."""
        if len(views) > 2 and not getattr(self, "_warned_views", False):
            logger.warning("%s uses 2 views; ignoring %d extra view(s) (configure 0 local crops)", self.name, len(views) - 2)
            self._warned_views = True
        return views[:2]

    def train(self, mode: bool = True) -> SSLMethod:
        """Set the mode; the teacher stays in eval mode except its BatchNorm layers (module docstring)."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
            for module in self.teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(mode)
        return self

    # ------------------------------------------------------------------------------------- EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, from fp32 copies of the student's
        parameters (buffers are not averaged: BatchNorm statistics are the teacher's own). A no-op
        for methods without a teacher. Under ZeRO-3 call it on every rank (parameters are gathered).
        """
        if self.teacher is None:
            return
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")

        student = dict(self.student.named_parameters())
        names, teacher = zip(*self.teacher.named_parameters())
        params = [student[n] for n in names]
        # DeepSpeed bf16/fp16: the optimizer's fp32 master weights, not the rounded module copies (pretrain.ema)
        masters = any(p.dtype != torch.float32 and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")) for p in params)
        with contextlib.nullcontext() if masters else _gathered(params):
            sources = fp32_sources(params) if masters else [p.detach() for p in params]
            source = [v.to(device=t.device, dtype=t.dtype) for v, t in zip(sources, teacher)]
            torch._foreach_mul_(teacher, momentum)
            torch._foreach_add_(teacher, source, alpha=1.0 - momentum)

    # -------------------------------------------------------------------------- optimisation
    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen (lr 0) at the start of training; DINO's head output layer."""
        return []

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer param groups over the trainable student parameters.

        Norm layers, biases and the backbone's own ``no_weight_decay()`` parameters (Swin's
        relative-position tables) get ``wd_mult=0``; ``last_layer_parameters()`` go in groups with
        ``is_last_layer=True``. Empty groups are dropped. Apply schedules with
        ``pretrain.schedules.apply_to_optimizer``.
        """
        decay, no_decay = get_weight_decay_parameters([self.student])
        skip = {id(p) for p in _no_weight_decay_params(self.student["backbone"])}
        last = {id(p) for p in self.last_layer_parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for params, decays in ((decay, True), (no_decay, False)):
            for p in params:
                if p.requires_grad:
                    key = (decays and id(p) not in skip, id(p) in last)
                    groups.setdefault(key, []).append(p)
        out = []
        for (decays, is_last), params in sorted(groups.items(), key=lambda kv: (kv[0][1], not kv[0][0])):
            wd_mult = 1.0 if decays else 0.0
            out.append({
                "name": ("last_layer" if is_last else "params") + ("" if decays else "_no_decay"),
                "params": params,
                "weight_decay": weight_decay * wd_mult,
                "lr_mult": 1.0,
                "wd_mult": wd_mult,
                "is_last_layer": is_last,
            })
        return out

    # ---------------------------------------------------------------------- export/checkpoint
    def teacher_backbone(self) -> nn.Module:
        """The backbone to export: the EMA teacher's when there is one, else the student's."""
        return (self.teacher if self.teacher is not None else self.student)["backbone"]

    def _checkpoint_modules(self) -> dict[str, nn.Module]:
        """State outside the trained student: the teacher and stateful losses (DINO centre)."""
        modules: dict[str, nn.Module] = {}
        if self.teacher is not None:
            modules["teacher"] = self.teacher
        criterion = getattr(self, "criterion", None)
        if isinstance(criterion, nn.Module) and criterion.state_dict():
            modules["criterion"] = criterion
        return modules

    def state_for_checkpoint(self) -> dict[str, dict[str, Tensor]]:
        """Teacher and loss state (e.g. DINO centre) that the engine does not save."""
        return {name: module.state_dict() for name, module in self._checkpoint_modules().items()}

    def load_state_for_checkpoint(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        modules = self._checkpoint_modules()
        if set(state) != set(modules):
            raise ValueError(f"{self.name} checkpoint state has {sorted(state)}, expected {sorted(modules)}")
        for name, module in modules.items():
            module.load_state_dict(state[name])

    def checkpointable(self) -> CheckpointState:
        """An object for ``accelerator.register_for_checkpointing``."""
        return CheckpointState(self)


class CheckpointState:
    """``state_dict``/``load_state_dict`` view of an ``SSLMethod``'s extra state (for accelerate)."""

    def __init__(self, method: SSLMethod) -> None:
        self.method = method

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return self.method.state_for_checkpoint()

    def load_state_dict(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.method.load_state_for_checkpoint(state)


# ------------------------------------------------------------------------------------ helpers
def _same_shape_runs(views: Sequence[Tensor]) -> Iterator[list[int]]:
    """Indices of consecutive views with equal shape, run by run."""
    run: list[int] = []
    for i, v in enumerate(views):
        if run and v.shape != views[run[0]].shape:
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _no_weight_decay_params(backbone: nn.Module) -> list[nn.Parameter]:
    """Parameters the timm model itself excludes from weight decay (``no_weight_decay()`` names)."""
    names: Callable[[], Any] | None = getattr(backbone, "no_weight_decay", None)
    if names is None:
        return []
    wanted = set(names())
    return [p for n, p in backbone.named_parameters() if n in wanted or n.rsplit(".", 1)[-1] in wanted]


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """Gather ZeRO-3 partitioned parameters for reading (on every rank); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # only present when the student is a ZeRO-3 engine's module

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
