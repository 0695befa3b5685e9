"""What a ``segment.predict`` run is made of, and what it keeps of each image to resume.

:class:`PredictOptions` (what :func:`segment.batch.predict_image` does besides segmenting),
:class:`ImageResult` (one segmented and quantified image) and :class:`RunResult` (a folder run);
then the per-image record ``records/KEY.json``: written after all of an image's outputs, read back by
a rerun on the same ``--out`` when it matches the input file and :func:`run_fingerprint` (model and
settings), see the "Resuming" section of :mod:`segment.predict`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.outputs import atomic_write_text
from segment.infer import Predictor
from segment.onnx_backend import weights_digest
from segment.ood import OODSummary
from segment.progress import format_seconds
from segment.quantify import ClassSummary, Scale

__all__ = ["PredictOptions", "ImageResult", "RunResult", "RECORD_FORMAT", "run_fingerprint", "record_path",
           "input_id", "write_record", "read_record", "completed_images"]

logger = logging.getLogger("segment.predict")  # the CLI's logger: log lines and their filters unchanged by the split


@dataclass
class PredictOptions:
    """What :func:`segment.batch.predict_image` does besides segmenting.

    ``databar``: "off" or "auto" (:func:`segment.databar.detect_databar`); ``crop_bottom``: rows
    to drop at the bottom instead. ``pixel_size_nm`` overrides the files' metadata when
    ``pixel_size_override`` is True (None then forces pixel units). ``particle_classes``: class
    indices measured as particles (None: every class but ``background``). ``match_pixel_size``:
    resize each image whose pixel size is known to the model's grid (:func:`segment.batch.image_zoom`).
    """

    class_names: Sequence[str]
    colors: Sequence[Sequence[int]]
    background: int | None = 0
    particle_classes: Sequence[int] | None = None
    databar: str = "off"
    crop_bottom: int = 0
    pixel_size_nm: float | None = None
    pixel_size_override: bool = False
    watershed: bool = False
    watershed_h: float = 2.0
    save_probs: bool = False
    overlays: bool = True
    overlay_max_side: int = 2048
    mask_format: str = "auto"
    match_pixel_size: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.databar not in ("off", "auto"):
            raise ValueError(f"databar must be 'off' or 'auto', got {self.databar!r}")
        if self.crop_bottom < 0:
            raise ValueError(f"crop_bottom must be >= 0, got {self.crop_bottom}")
        if self.databar == "auto" and self.crop_bottom:
            raise ValueError("give either databar='auto' or crop_bottom, not both")
        if self.mask_format not in ("auto", "png", "tif"):
            raise ValueError(f"mask_format must be auto, png or tif, got {self.mask_format!r}")
        if len(self.colors) != len(self.class_names):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.colors)} colours")

    @property
    def particle_indices(self) -> list[int]:
        if self.particle_classes is not None:
            return sorted(set(int(c) for c in self.particle_classes))
        return [i for i in range(len(self.class_names)) if i != self.background]


@dataclass
class ImageResult:
    """One segmented and quantified image."""

    path: Path
    key: str
    height: int
    width: int
    databar_rows: int
    pixel_size_nm: float | None
    pixel_size_source: str
    zoom: float
    seconds: float
    summaries: list[ClassSummary]
    outputs: dict[str, Path] = field(default_factory=dict)
    tiles: dict[str, Any] | None = None  # segment.uncertainty.tile_table: the one-image interval's units
    model_tiles: int = 0  # tiles the model ran on (0 in records written before they were counted)
    inference_seconds: float = 0.0  # seconds of the band-wise tiling (model, blending, argmax)
    ood: dict[str, Any] | None = None  # out-of-distribution score, threshold and flag, when the model has them

    def log_line(self, index: int | None = None, total: int | None = None) -> str:
        """One line for the log: time, tiles/s, fractions per class (and the OOD score and flag when
        the image has them)."""
        where = f"[{index}/{total}] " if index is not None and total else ""
        speed = (f", {self.model_tiles} tiles in {format_seconds(self.inference_seconds)} "
                 f"({self.model_tiles / self.inference_seconds:.3g} tiles/s)"
                 if self.model_tiles and self.inference_seconds > 0 else "")
        fractions = ", ".join(f"{s.name} {100 * s.area_fraction:.2f} %" for s in self.summaries)
        ood = self.ood
        flag = ""
        if ood is not None and ood.get("score") is not None:
            flag = f"; OOD score {ood['score']:.3g} (threshold {ood['threshold']:.3g})" + (
                " FLAGGED: out of distribution?" if ood.get("flagged") else " ok")
        return (f"{where}{self.key}: {self.width}x{self.height + self.databar_rows} px, "
                f"{format_seconds(self.seconds)}{speed}; {fractions}{flag}")

    def row(self) -> dict[str, Any]:
        return dict(image=self.key, path=str(self.path), height=self.height + self.databar_rows,
                    width=self.width, databar_rows=self.databar_rows, analysed_height=self.height,
                    pixel_size_nm=self.pixel_size_nm if self.pixel_size_nm is not None else "",
                    pixel_size_source=self.pixel_size_source, zoom=round(self.zoom, 6),
                    seconds=round(self.seconds, 2), model_tiles=self.model_tiles or "",
                    **self._ood_columns(), mask=str(self.outputs.get("mask", "")))

    def _ood_columns(self) -> dict[str, Any]:
        o = self.ood
        if not o:
            return {}
        return dict(ood_score=o["score"], ood_threshold=o["threshold"], flagged=int(o["flagged"]),
                    ood_tiles_flagged=f"{o['tiles_flagged']}/{o['tiles']}", ood_knn=o["knn"], mean_entropy=o["entropy"])


@dataclass
class RunResult:
    """Everything a folder run produced; ``failures`` holds ``(input, error)`` pairs, ``skipped`` the
    keys of the images an earlier run had completed (read back from their records)."""

    out_dir: Path
    images: list[ImageResult]
    failures: list[tuple[str, str]]
    pooled: list[ClassSummary]
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


# ----------------------------------------------------------------------------- resume
RECORD_FORMAT = 1
"""Version of ``records/KEY.json``; a record of another version is redone, never misread."""


def record_path(out_dir: Path, key: str) -> Path:
    """``records/KEY.json`` of ``out_dir``."""
    return out_dir / "records" / f"{key}.json"


def input_id(path: Path) -> dict[str, int] | None:
    """Size and modification time of an input: a changed file is redone. None if it cannot be read
    (:func:`segment.batch.predict_image` then reports why)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def run_fingerprint(predictor: Predictor, options: PredictOptions, ood: OODSummary | None = None) -> str:
    """A hash of everything that decides an image's outputs: the model's weights and ``model.json``,
    the inference settings and ``options`` (not the device, batch size or progress bars). An ONNX
    backend's masks may differ from PyTorch's on a few pixels, so the backend counts too."""
    model = predictor.model
    what = dict(
        options={k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
        meta=predictor.meta, weights=getattr(model, "weights_sha256", "") or weights_digest(model),
        tile=predictor.tile_hw,
        overlap=predictor.overlap, gaussian=predictor.gaussian, tta=predictor.tta, mean=predictor.mean,
        std=predictor.std, intensity=predictor.intensity, zoom=predictor.zoom, amp=str(predictor.amp_dtype),
    )
    if (backend := getattr(model, "backend", "torch")) != "torch":  # torch runs keep their older fingerprints
        what["backend"] = backend
    if ood is not None:
        what["ood"] = dict(threshold=ood.threshold, k=ood.k, tile=ood.tile, scales=(ood.knn_scale, ood.entropy_scale),
                           bank=hashlib.sha256(np.ascontiguousarray(ood.bank).tobytes()).hexdigest())
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _summary_json(s: ClassSummary) -> dict[str, Any]:
    d = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    d.update(scale=s.scale.pixel_size_nm, ecd_interior=np.asarray(s.ecd_interior, np.float64).tolist(),
             area_interior=np.asarray(s.area_interior, np.float64).tolist())
    for k in ("pixels", "total_pixels", "count_interior", "count_border", "count_gundersen"):
        d[k] = int(d[k])
    d["particles"] = bool(d["particles"])
    for k in ("analysed_area", "number_density"):  # NaN is not JSON: null
        d[k] = float(d[k]) if math.isfinite(d[k]) else None
    return d


def _summary_from_json(d: Mapping[str, Any]) -> ClassSummary:
    d = dict(d)
    d.update(scale=Scale(d["scale"]), ecd_interior=np.asarray(d["ecd_interior"], np.float64),
             area_interior=np.asarray(d["area_interior"], np.float64))
    for k in ("analysed_area", "number_density"):
        d[k] = float("nan") if d[k] is None else float(d[k])
    return ClassSummary(**d)


def write_record(out_dir: Path, result: ImageResult, source: dict[str, int] | None, fingerprint: str) -> None:
    image = dict(height=int(result.height), width=int(result.width), databar_rows=int(result.databar_rows),
                 pixel_size_nm=None if result.pixel_size_nm is None else float(result.pixel_size_nm),
                 pixel_size_source=result.pixel_size_source,
                 zoom=float(result.zoom), seconds=float(result.seconds), model_tiles=int(result.model_tiles),
                 inference_seconds=float(result.inference_seconds))
    record = dict(format=RECORD_FORMAT, fingerprint=fingerprint, input=source, image=image,
                  outputs={k: Path(os.path.relpath(v, out_dir)).as_posix() for k, v in result.outputs.items()},
                  summaries=[_summary_json(s) for s in result.summaries])
    if result.tiles is not None:  # optional: records without it (written before issue 17) stay valid
        record["tiles"] = result.tiles
    if result.ood is not None:
        record["ood"] = result.ood
    atomic_write_text(record_path(out_dir, result.key), json.dumps(record, allow_nan=False))


def read_record(out_dir: Path, path: Path, key: str, fingerprint: str) -> tuple[ImageResult | None, str]:
    """The result an earlier run recorded for ``path``, or None and why it must be (re)done."""
    file = record_path(out_dir, key)
    if not file.is_file():
        return None, "new"
    try:
        record = json.loads(file.read_text())
        if record.get("format") != RECORD_FORMAT:
            return None, "record of another version"
        if record["fingerprint"] != fingerprint:
            return None, "model or settings changed"
        if record["input"] is None or record["input"] != input_id(path):
            return None, "input file changed"
        outputs = {k: out_dir / v for k, v in record["outputs"].items()}
        if not all(p.is_file() for p in outputs.values()):
            return None, "outputs missing"
        summaries = [_summary_from_json(s) for s in record["summaries"]]
        return ImageResult(path=path, key=key, summaries=summaries, outputs=outputs, tiles=record.get("tiles"),
                           ood=record.get("ood"), **record["image"]), "done"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.debug("%s: unreadable (%s)", file, exc)
        return None, "record unreadable"


def completed_images(paths: Sequence[Path], keys: Mapping[Path, str], out_dir: Path,
                     fingerprint: str) -> dict[Path, ImageResult]:
    """The images of ``paths`` whose outputs an earlier run on ``out_dir`` completed; logs the counts."""
    done: dict[Path, ImageResult] = {}
    redo: dict[str, int] = {}
    for path in paths:
        result, why = read_record(out_dir, path, keys[path], fingerprint)
        if result is not None:
            done[path] = result
        elif why != "new":
            redo[why] = redo.get(why, 0) + 1
    if done:
        logger.info("resuming in %s: %d of %d image(s) already complete, skipped (--overwrite redoes them)",
                    out_dir, len(done), len(paths))
    if redo:
        logger.info("redoing %d image(s) of an earlier run: %s", sum(redo.values()),
                    ", ".join(f"{n} {why}" for why, n in redo.items()))
    return done
