"""bench/gpu_check.sh --dry-run: the device check's code paths on the CPU with tiny models (issue 16)."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_prints_the_table_and_every_run_succeeds(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    for needle in ("| card | CPU dry run", "| precision=auto | fp32 (no GPU)", ", ddp, ", ", zero2, ",
                   "| fine-tune step, 2 x 64² | cs_unet_test ", " vs smp Unet", "Predictor", "MONAI sliding_window_inference"):
        assert needle in table, table
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["name"] for r in result["pretrain"]] == ["ddp", "zero2"]
    for run in result["pretrain"]:
        assert "error" not in run, run
        assert run["steps"] == 4 and math.isfinite(run["loss"]) and run["images_per_s"] > 0
        assert 0.0 <= run["data_wait"] <= 1.0
    assert "DeepSpeed ZeRO-2" in (tmp_path / "pretrain_zero2.log").read_text()
    assert "k-NN top-1" in (tmp_path / "pretrain_ddp.log").read_text()  # the probe path runs too
    assert all(v > 0 for v in result["finetune_s"].values()) and all(v > 0 for v in result["predict_px_s"].values())
