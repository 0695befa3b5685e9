"""ONNX Runtime CPU backend for sliding-window inference (``segment.predict --backend onnx``).

The checkpoint is exported with the product's own exporter (:func:`segment.export.export_onnx`,
any batch and any H x W, checked against PyTorch) and run by onnxruntime's CPU execution provider
behind :class:`OnnxModule`, a module with PyTorch's calling convention. A :class:`Predictor`
holding it tiles, blends and streams exactly as with the PyTorch model (:mod:`segment.stream`:
the same tiles, batches, Gaussian weights and band-wise accumulators, so memory stays bounded);
only the network's forward pass runs elsewhere.

Tolerance: an exported file is used only if its logits differ from PyTorch's by at most ``atol``
(default 1e-4) on the exporter's check inputs; masks then agree on >= 99.9 % of the pixels
(measured on NASA Super1's test images, ``bench/onnx_backend.py``): argmax flips only where two
classes' logits are within float rounding of each other.

onnxruntime (and onnx, for the export) are optional: ``pip install 'micrograph-seg[onnx]'``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segment.export import check_inputs, check_onnx, export_onnx
from segment.infer import Predictor

__all__ = ["OnnxModule", "require_onnxruntime", "onnx_predictor", "weights_digest", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
INSTALL_HINT = "pip install 'micrograph-seg[onnx]' (or: pip install onnxruntime onnx)"


def require_onnxruntime() -> Any:
    """Import onnxruntime (optional dependency, hence imported here and not at module top) or raise
    an ``ImportError`` saying how to install it."""
    try:
        import onnxruntime  # optional dependency (the [onnx] extra)
    except ImportError as exc:
        raise ImportError(f"the ONNX backend needs onnxruntime, which is not installed: {INSTALL_HINT}") from exc
    return onnxruntime


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


class OnnxModule(nn.Module):
    """An onnxruntime CPU session called like the PyTorch model: ``B x C x H x W`` float32 tensor in,
    ``B x K x H x W`` float32 logits out (on the CPU).

    ``weights_sha256`` names the PyTorch weights the file was exported from (for run fingerprints);
    ``threads`` sets onnxruntime's intra-op threads (default: PyTorch's ``get_num_threads()``, so
    both backends use the same cores).
    """

    backend = "onnx"

    def __init__(self, path: str | os.PathLike[str], *, weights_sha256: str = "", threads: int | None = None) -> None:
        super().__init__()
        ort = require_onnxruntime()
        self.path = Path(path)
        self.weights_sha256 = weights_sha256
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: not a usable ONNX model ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"the ONNX backend runs on the CPU; got a tensor on {x.device}")
        a = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: a})[0])

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}"


def _check_file(path: Path, model: nn.Module, tile_hw: tuple[int, int], in_chans: int,
                mean: Sequence[float], std: Sequence[float], atol: float) -> float:
    """Max |ONNX - PyTorch| of ``path`` on the exporter's check inputs (fixed-size files: tile-size
    inputs only); ``ValueError`` naming the file if it fails or differs by more than ``atol``."""
    import onnx  # optional dependency (the [onnx] extra): imported only when the backend is used

    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        dynamic = props.get("input_hw", "dynamic") == "dynamic"
        multiple = int(getattr(model, "pad_multiple", 1))
        checked = check_onnx(path, model, check_inputs(tile_hw, in_chans, mean, std, multiple=multiple,
                                                       dynamic_hw=dynamic))
    except Exception as exc:  # noqa: BLE001 - onnx and onnxruntime raise many types
        raise ValueError(f"{path}: cannot run it for this checkpoint ({exc})") from exc
    worst = max(d for _, d in checked)
    if worst > atol:
        raise ValueError(f"{path}: its logits differ from the checkpoint's by {worst:.3e} > {atol:g}: "
                         "exported from another checkpoint? (re-export with python -m segment.export)")
    return worst


def onnx_predictor(checkpoint: str | os.PathLike[str], onnx_path: str | os.PathLike[str], *,
                   reuse: bool = True, atol: float = 1e-4, threads: int | None = None,
                   **settings: Any) -> Predictor:
    """A :class:`Predictor` for ``checkpoint`` whose forward pass runs in onnxruntime (CPU).

    ``onnx_path``: the ONNX file. If it exists and ``reuse``, it is checked against the
    checkpoint's PyTorch model (logits within ``atol`` on the exporter's check inputs) and used;
    otherwise the checkpoint is exported there first (atomically, :func:`segment.export.export_onnx`).
    ``settings`` as :meth:`Predictor.from_checkpoint`; the device must be the CPU.
    """
    require_onnxruntime()
    device = torch.device(settings.get("device", "cpu"))
    if device.type != "cpu":
        raise ValueError(f"the ONNX backend runs on the CPU (CPUExecutionProvider); got device {device}")
    if settings.get("amp_dtype") is not None:
        raise ValueError("the ONNX backend runs in float32; drop --amp")
    predictor = Predictor.from_checkpoint(checkpoint, **settings)
    model, path = predictor.model, Path(onnx_path)
    args = (predictor.tile_hw, predictor.in_chans, predictor.mean, predictor.std)
    if reuse and path.is_file():
        worst = _check_file(path, model, *args, atol=atol)
        logger.info("ONNX model %s matches the checkpoint (max |diff| %.2e)", path, worst)
    else:
        info = {k: predictor.meta[k] for k in ("model", "class_names", "intensity", "zoom", "overlap") if k in predictor.meta}
        report = export_onnx(model, path, tile_hw=args[0], in_chans=args[1], mean=args[2], std=args[3],
                             metadata=info, atol=atol)
        logger.info("exported %s", report)
    predictor.model = OnnxModule(path, weights_sha256=weights_digest(model), threads=threads)
    predictor.feature_model = model  # the PyTorch network, for segment.ood's encoder features
    return predictor
