#!/usr/bin/env bash
# Device check (issue 16): prints one table (card, versions, precision, DINO Swin-T images/s + peak memory +
# data wait under DDP / ZeRO-2 / ZeRO-3, CS-UNet lite fine-tune step vs smp Unet, 4096² predict vs MONAI).
#   bench/gpu_check.sh [--dry-run] [--out DIR]
# --dry-run: CPU, tiny models, the same code paths (part of `make test`: tests/test_gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
exec "$PY" bench/gpu_check.py "$@"
