"""Fine-tuning checkpoints beyond the resumable state (`pretrain.checkpointing`): resuming a run folder
written before `checkpoints/`, and what follows the best model (`best/`): its OOD summary and its
evaluation on the test sets."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from accelerate import Accelerator

from pretrain.safe_state import no_code_execution
from segment.config import FinetuneConfig
from segment.evaluate import evaluate_sets
from segment.finetune_data import Data
from segment.infer import Predictor
from segment.ood import fit_checkpoint

log = logging.getLogger(__name__)

LEGACY_STATE_DIR = "state"  # the training state of runs written before checkpoints/ (resumed, never written)
KEEP_CHECKPOINTS = 2  # the latest and one to fall back to when the latest is damaged


def load_legacy_state(accelerator: Accelerator, out: Path) -> dict | None:
    """Resume a run folder written before `checkpoints/` (`state/` + `trainer.json`), without unpickling code."""
    legacy = out / LEGACY_STATE_DIR
    if not (legacy / "trainer.json").is_file():
        return None
    with no_code_execution():
        accelerator.load_state(str(legacy))
    return json.loads((legacy / "trainer.json").read_text())


def fit_ood(best: Path, data: Data, device) -> None:
    """The OOD summary of `best/` (segment.ood: training tiles' features, threshold on the validation
    images), used by segment.predict; a failure costs the run only the OOD score (logged)."""
    try:
        fit_checkpoint(best, [i for i, _ in data.train_pairs], [i for i, _ in data.val_pairs], device=device)
    except Exception as exc:  # noqa: BLE001 - the score is optional; the trained model is not
        log.warning("no OOD summary for %s (%s: %s)", best, type(exc).__name__, exc)


def evaluate_best(out: Path, data: Data, cfg: FinetuneConfig, device) -> dict:
    """Evaluate `best/` on every test set with the evaluation used by `segment.evaluate`."""
    predictor = Predictor.from_checkpoint(out / "best", tta=cfg.train.tta, batch_size=cfg.train.batch_size,
                                          device=device)
    return evaluate_sets(predictor, data.test_sets, data.class_map, out / "eval", overlays=True,
                         max_overlays=cfg.overlays)
