"""Export a fine-tuned checkpoint to ONNX (and TorchScript) and check it against PyTorch.

The project's models accept any input size by padding to ``model.pad_multiple`` inside
``forward`` and cropping back; a tracer records that padding as a constant. The export therefore
wraps the model in :class:`PaddedForExport`, which computes the padding from the traced input
shape, so the exported graph takes any batch size and any height and width (the padding mode is
the model's). Each export is then run with onnxruntime (or the TorchScript interpreter) on a test
image of the tile size (a synthetic micrograph, normalised as the checkpoint says) and on inputs
of other sizes and batches, and compared with PyTorch; the maximum absolute difference is reported.
If a model does not trace to a size-independent graph, the ONNX file is re-exported with a fixed
tile size (dynamic batch only) and says so in its metadata (``input_hw``).

ONNX: the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``, opset 17): it needs no
``onnxscript`` and its dynamic axes hold for these models. Input ``image`` ``B x C x H x W``
float32 (normalised with the metadata's ``mean``/``std``), output ``logits`` ``B x K x H x W``.
Metadata: ``model``, ``class_names``, ``mean``, ``std``, ``tile_size``, ``input_hw``.

CLI::

    python -m segment.export CHECKPOINT --onnx model.onnx [--torchscript model.pt] [--atol 1e-4]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pretrain.intensity import to_float
from pretrain.outputs import atomic_path
from segment.checkpoint import inference_settings, load_model

__all__ = [
    "PaddedForExport",
    "ExportReport",
    "check_inputs",
    "export_onnx",
    "check_onnx",
    "export_torchscript",
    "main",
]

logger = logging.getLogger(__name__)

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}


class PaddedForExport(nn.Module):
    """``model`` with its pad-to-multiple done from the (traced) input shape: any H and W export.

    The padding amount is computed with tensor arithmetic on ``x.shape``, which a tracer keeps
    symbolic, and the output is cropped back the same way. ``multiple`` defaults to
    ``model.pad_multiple`` (1: no padding) and ``mode`` to ``model.pad_mode``.
    """

    def __init__(self, model: nn.Module, multiple: int | None = None, mode: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.multiple = int(multiple if multiple is not None else getattr(model, "pad_multiple", 1))
        mode = mode if mode is not None else getattr(model, "pad_mode", "constant")
        if mode not in _PAD_MODES:
            raise ValueError(f"pad mode must be one of {sorted(_PAD_MODES)}, got {mode!r}")
        self.mode = _PAD_MODES[mode]

    def forward(self, x: Tensor) -> Tensor:
        if self.multiple <= 1:
            return self.model(x)
        h, w = x.shape[-2], x.shape[-1]
        m = self.multiple
        pad_h, pad_w = (m - h % m) % m, (m - w % m) % m
        y = self.model(F.pad(x, (0, pad_w, 0, pad_h), mode=self.mode))
        return y[..., :h, :w]


@dataclass
class ExportReport:
    """What was exported and how closely it matches PyTorch."""

    path: Path
    kind: str  # "onnx" or "torchscript"
    dynamic_hw: bool
    max_abs_diff: float
    checked: list[tuple[tuple[int, ...], float]] = field(default_factory=list)

    def __str__(self) -> str:
        hw = "dynamic batch, any H x W" if self.dynamic_hw else "dynamic batch, fixed H x W"
        shapes = ", ".join(f"{'x'.join(map(str, s))}: {d:.2e}" for s, d in self.checked)
        return f"{self.kind} {self.path} ({hw}); max |diff| vs PyTorch {self.max_abs_diff:.3e} ({shapes})"


# ----------------------------------------------------------------------------- inputs
def check_inputs(tile_hw: tuple[int, int], in_chans: int, mean: Sequence[float], std: Sequence[float],
                *, multiple: int = 1, dynamic_hw: bool = True, seed: int = 0) -> list[Tensor]:
    """Check inputs: a normalised synthetic micrograph tile (batch 1), a batch of 3 noise tiles and,
    with ``dynamic_hw``, an input one multiple larger than the tile and one of odd size."""
    from pretrain.synthetic_materials import superalloy  # scipy + scikit-image (~0.5 s): only for the check inputs

    th, tw = tile_hw
    image = to_float(superalloy((th, tw), seed=seed)[0])
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    x = torch.from_numpy((np.repeat(image[None], in_chans, 0) - m) / s)[None]
    gen = torch.Generator().manual_seed(seed)
    out = [x.contiguous(), torch.randn(3, in_chans, th, tw, generator=gen)]
    if dynamic_hw:
        step = max(multiple, 8)
        out.append(torch.randn(1, in_chans, th + step, tw + 2 * step, generator=gen))
        out.append(torch.randn(2, in_chans, th + step // 2 + 3, max(tw - step // 2 + 1, 8), generator=gen))
    return out


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's expected warnings (shape arithmetic, the legacy exporter's notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@torch.no_grad()
def _reference(model: nn.Module, inputs: Sequence[Tensor]) -> list[np.ndarray]:
    return [model(x).float().numpy() for x in inputs]


def _compare(outputs: Sequence[np.ndarray], refs: Sequence[np.ndarray],
             inputs: Sequence[Tensor]) -> list[tuple[tuple[int, ...], float]]:
    result = []
    for x, out, ref in zip(inputs, outputs, refs, strict=True):
        if out.shape != ref.shape:
            raise ValueError(f"input {tuple(x.shape)}: exported output {out.shape} != PyTorch {ref.shape}")
        result.append((tuple(x.shape), float(np.abs(out - ref).max())))
    return result


# ----------------------------------------------------------------------------- ONNX
def check_onnx(path: str | os.PathLike[str], model: nn.Module,
               inputs: Sequence[Tensor]) -> list[tuple[tuple[int, ...], float]]:
    """Run the ONNX file with onnxruntime (CPU) and return ``(input shape, max |onnx - torch|)``
    per input; raises if onnxruntime fails on an input."""
    import onnxruntime as ort  # optional dependency (the [onnx] extra)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x.numpy()})[0] for x in inputs]
    return _compare(outs, _reference(model.eval(), inputs), inputs)


def _export_onnx_once(wrapped: nn.Module, example: Tensor, path: Path, opset: int, dynamic_hw: bool) -> None:
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    with _quiet_tracing():
        torch.onnx.export(wrapped, (example,), str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes},
                          opset_version=opset)


def _set_metadata(path: Path, props: Mapping[str, Any]) -> None:
    import onnx  # optional dependency (the [onnx] extra)

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, tile_hw: tuple[int, int], in_chans: int,
                mean: Sequence[float], std: Sequence[float], metadata: Mapping[str, Any] | None = None,
                opset: int = 17, atol: float = 1e-4) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` (atomically) and check it against PyTorch.

    Tries any batch and any H x W first (:class:`PaddedForExport`); if onnxruntime then fails or
    differs by more than ``atol`` on an input of another size, re-exports with the tile size
    fixed. Raises ``RuntimeError`` if even that differs by more than ``atol``.
    """
    path = Path(path)
    model = model.eval()
    wrapped = PaddedForExport(model).eval()
    example = torch.zeros(2, in_chans, *tile_hw)  # batch 2: no batch-1 specialisation in the trace
    with atomic_path(path) as tmp:
        report: ExportReport | None = None
        for dynamic_hw in (True, False):
            inputs = check_inputs(tile_hw, in_chans, mean, std, multiple=wrapped.multiple, dynamic_hw=dynamic_hw)
            try:
                _export_onnx_once(wrapped, example, tmp, opset, dynamic_hw)
                checked = check_onnx(tmp, model, inputs)
            except Exception as exc:  # noqa: BLE001 - exporter and runtime raise many types
                if not dynamic_hw:
                    raise RuntimeError(f"ONNX export of a fixed {tile_hw} input failed: {exc}") from exc
                logger.warning("dynamic H x W export failed (%s); exporting a fixed %s input", exc, tile_hw)
                continue
            worst = max(d for _, d in checked)
            if worst <= atol or not dynamic_hw:
                report = ExportReport(path, "onnx", dynamic_hw, worst, checked)
                break
            logger.warning("dynamic H x W export differs by %.2e > %.1e; exporting a fixed %s input",
                           worst, atol, tile_hw)
        assert report is not None
        if report.max_abs_diff > atol:
            raise RuntimeError(f"ONNX output differs from PyTorch by {report.max_abs_diff:.3e} > atol {atol}")
        props = dict(metadata or {})
        props.update(mean=list(mean), std=list(std), tile_size=list(tile_hw), in_chans=in_chans,
                     input_hw="dynamic" if report.dynamic_hw else "x".join(map(str, tile_hw)),
                     max_abs_diff_vs_torch=f"{report.max_abs_diff:.3e}")
        _set_metadata(tmp, props)
    logger.info("%s", report)
    return report


# ----------------------------------------------------------------------------- TorchScript
def export_torchscript(model: nn.Module, path: str | os.PathLike[str], *, tile_hw: tuple[int, int],
                       in_chans: int, mean: Sequence[float], std: Sequence[float],
                       metadata: Mapping[str, Any] | None = None, atol: float = 1e-4) -> ExportReport:
    """Trace ``model`` (through :class:`PaddedForExport`) to TorchScript at ``path`` and check the
    saved file against eager PyTorch on inputs of the tile size and of other sizes.

    Metadata is stored as ``extra_files={"meta.json": ...}``. Raises ``RuntimeError`` when
    tracing fails or the traced model differs by more than ``atol`` (tracing is not always
    simple; ONNX is the supported format then).
    """
    path = Path(path)
    model = model.eval()
    wrapped = PaddedForExport(model).eval()
    example = torch.zeros(2, in_chans, *tile_hw)
    inputs = check_inputs(tile_hw, in_chans, mean, std, multiple=wrapped.multiple, dynamic_hw=True)
    meta = dict(metadata or {}, mean=list(mean), std=list(std), tile_size=list(tile_hw), in_chans=in_chans)
    with atomic_path(path) as tmp:
        try:
            with _quiet_tracing(), torch.no_grad():
                traced = torch.jit.trace(wrapped, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={"meta.json": json.dumps(meta)})
                loaded = torch.jit.load(str(tmp))
                outs = [loaded(x).float().numpy() for x in inputs]
        except Exception as exc:  # noqa: BLE001 - the tracer raises many types
            raise RuntimeError(f"TorchScript tracing failed: {exc}") from exc
        checked = _compare(outs, _reference(model, inputs), inputs)
        worst = max(d for _, d in checked)
        if worst > atol:
            raise RuntimeError(f"TorchScript output differs from PyTorch by {worst:.3e} > atol {atol}")
    report = ExportReport(path, "torchscript", True, worst, checked)
    logger.info("%s", report)
    return report


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segment.export",
                                description="Export a checkpoint to ONNX / TorchScript and check it.")
    p.add_argument("checkpoint", help="checkpoint folder (model.safetensors + model.json) or run folder")
    p.add_argument("--onnx", type=Path, default=None, help="write ONNX here")
    p.add_argument("--torchscript", type=Path, default=None, help="write TorchScript here")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--tile-size", type=int, default=None, help="check/fixed size (default: the checkpoint's)")
    p.add_argument("--atol", type=float, default=1e-4, help="max allowed |exported - PyTorch| (default 1e-4)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; exit status 1 if an export fails or differs beyond ``--atol``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.onnx is None and args.torchscript is None:
        raise SystemExit("nothing to do: give --onnx and/or --torchscript")

    try:
        model, meta = load_model(args.checkpoint)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise SystemExit(f"cannot load checkpoint {args.checkpoint}: {exc}") from None
    try:
        settings = inference_settings(meta | ({"tile_size": args.tile_size} if args.tile_size else {}), args.checkpoint)
    except KeyError as exc:
        raise SystemExit(str(exc).strip("'\"")) from None
    tile = settings["tile_size"]
    tile_hw = (int(tile), int(tile)) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    mean, std = list(settings["mean"]), list(settings["std"])
    in_chans = int(meta.get("in_chans", len(mean)))
    info = {k: meta[k] for k in ("model", "model_kwargs", "class_names", "colors", "intensity", "zoom", "overlap")
            if k in meta}  # intensity and zoom: the pre/post-processing a runtime must repeat
    kw = dict(tile_hw=tile_hw, in_chans=in_chans, mean=mean, std=std, metadata=info, atol=args.atol)
    status = 0
    for kind, target, fn in (("ONNX", args.onnx, export_onnx), ("TorchScript", args.torchscript, export_torchscript)):
        if target is None:
            continue
        try:
            report = fn(model, target, **(kw | ({"opset": args.opset} if fn is export_onnx else {})))
        except RuntimeError as exc:
            logger.error("%s export failed: %s", kind, exc)
            status = 1
            continue
        print(f"{kind}: {report.path}  max |diff| vs PyTorch = {report.max_abs_diff:.3e}  "
              f"({'any' if report.dynamic_hw else 'fixed ' + 'x'.join(map(str, tile_hw))} H x W, dynamic batch)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
