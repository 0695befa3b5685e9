"""Fine-tuning curves: validation metrics per evaluated epoch and the run's `history.csv`."""
from __future__ import annotations

import csv
from pathlib import Path

from torch import nn

from pretrain.outputs import atomic_write_text
from segment.config import FinetuneConfig
from segment.infer import Predictor
from segment.metrics import aggregate, confusion_matrix


def validate(model: nn.Module, dataset, cfg: FinetuneConfig, device) -> dict[str, float]:
    """Sliding-window prediction on the full validation images; NASA IoU and per-class IoU."""
    k = len(dataset.class_map.names)
    predictor = Predictor(model, tile_size=cfg.data.crop_size, overlap=cfg.train.tile_overlap,
                          batch_size=cfg.train.batch_size, device=device, tta=False, zoom=cfg.data.zoom)
    cms = []
    for i in range(len(dataset)):
        item = dataset[i]
        pred = predictor.predict_labels(item["image"])
        cms.append(confusion_matrix(pred, item["mask"].numpy(), k))
    agg = aggregate(cms)
    out = {"nasa_iou": float(agg["nasa_iou"]), "miou": float(agg["miou"])}
    for name, v in zip(dataset.class_map.names, agg["iou_per_class"]):
        out[f"iou_{name}"] = float(v)
    return out


def write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else f"{r[k]}" for k in keys) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_history(path: Path) -> list[dict]:
    """The rows of `history.csv` with the types they were written with (int, float or None)."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _number(text: str | None) -> int | float | None:
    """`"3"` -> 3, `"3.0"` / `"0.25"` / `"nan"` -> float, `""` -> None: a resumed run rewrites what it read."""
    if text in ("", None):
        return None
    try:
        return int(text)
    except ValueError:
        return float(text)
