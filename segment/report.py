"""`report.md` for a fine-tuning run: training curves, validation scores, test tables and overlays."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.outputs import atomic_path, atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Two panels: training loss per epoch, validation IoU per epoch (NASA IoU, mIoU, per class)."""
    if not history:
        return None
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [r.get("train_loss") for r in history], "o-", ms=3)
    ax1.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax1.grid(alpha=0.3)
    val_keys = [k for k in history[-1] if k.startswith("val_")]
    for key in val_keys:
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            style = "-" if key in ("val_nasa_iou", "val_miou") else "--"
            ax2.plot(*zip(*pts), style, lw=2 if style == "-" else 1, label=key[4:])
    ax2.set(xlabel="epoch", ylabel="IoU", title="Validation (sliding window, full images)", ylim=(0, 1.01))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_report(out: Path, history: list[dict], result: dict[str, Any], cfg) -> Path:
    """Write `out/report.md` (figures relative to the run folder, so it renders anywhere)."""
    out = Path(out)
    curves = plot_curves(history, out / "figures" / "curves.png")
    lines = [
        f"# Fine-tuning report: `{cfg.model.name}` on `{cfg.data.root}`",
        "",
        f"- training images: {len(result.get('train_images', [])) or 'see config'}; crop {cfg.data.crop_size}, "
        f"batch {cfg.train.batch_size}, loss {cfg.train.loss.value}, seed {cfg.train.seed}",
        f"- encoder weights: {dict(cfg.model.encoder_weights) or 'random initialisation'}",
        f"- stopped: {result['stopped']} after {result['minutes']:.1f} min, {result['global_step']} steps",
        f"- best validation {cfg.train.monitor.value}: {result['best']:.4f} (epoch {result['best_epoch']}); "
        f"checkpoint `best/`",
        "",
    ]
    if curves:
        lines += ["## Training curves", "", f"![curves]({curves.relative_to(out)})", ""]
    summary = out / "eval" / "summary.md"
    if summary.is_file():
        lines += ["## Test sets (best checkpoint, sliding window over whole images)", "", summary.read_text().strip(), ""]
        panels = sorted((out / "eval" / "overlays").rglob("*.png"))[: max(0, int(getattr(cfg, "overlays", 4))) * 3]
        if panels:
            lines += ["## Overlays (image, truth, prediction, errors)", ""]
            lines += [f"![{p.stem}]({p.relative_to(out)})" for p in panels]
            lines.append("")
    lines += ["## Files", "", "`config.yaml` (resolved config), `history.csv`, `tb/` (TensorBoard), "
              "`best/` and `last/` (model checkpoints), `state/` (resumable training state), `eval/` (metrics CSVs).", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    log.info("report: %s", path)
    return path
