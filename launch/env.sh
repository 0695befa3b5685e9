# shellcheck shell=bash
# launch/env.sh: the software environment of a cluster node, sourced by launch/slurm/*.sbatch and
# launch/local.sh (and usable by hand: `source launch/env.sh`).
#
# Edit the "site" block below for your cluster, or (better: no local changes to a tracked file) put
# the same lines in launch/env.local.sh, which is sourced last when it exists ($MSEG_ENV_LOCAL names
# another file). Every variable here keeps a value that is already set, so `sbatch --export=ALL,X=...`
# and your shell profile win over these defaults.
#
# Variables read:
#   MSEG_REPO       repository root (default: the folder above this file)
#   MSEG_VENV       virtual environment to activate (default: $MSEG_REPO/.venv); set it to an empty
#                   string to keep the current python (conda, modules, containers, tests)
#   MSEG_ENV_LOCAL  site file sourced at the end (default: $MSEG_REPO/launch/env.local.sh)
#   MSEG_DATA       folder holding nasa/ (read by configs/data/*.yaml; default ../shared/data)
#
# Safe under `set -euo pipefail`; it does not change those options of the shell that sources it.

if [[ -z ${MSEG_REPO:-} ]]; then
    MSEG_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fi
export MSEG_REPO

# ---------------------------------------------------------------------------------------- site
# Examples only: module names differ on every cluster (`module avail`, `module spider cuda`).
# module purge
# module load gcc/12 cuda/12.4 nccl/2.21
# module load python/3.11
# Conda instead of the venv:   source ~/miniforge3/bin/activate mseg && export MSEG_VENV=
# Data and caches on fast shared storage (model weights downloaded by timm / huggingface):
# export MSEG_DATA=/scratch/$USER/micrograph-data
# export HF_HOME=/scratch/$USER/cache/huggingface TORCH_HOME=/scratch/$USER/cache/torch
# DeepSpeed compiles its ops once per node; keep the build cache off a shared home directory:
# export TORCH_EXTENSIONS_DIR=/tmp/$USER/torch_extensions

# ----------------------------------------------------------------------------------------- venv
: "${MSEG_VENV=$MSEG_REPO/.venv}"
if [[ -n $MSEG_VENV ]]; then
    if [[ -x $MSEG_VENV/bin/python ]]; then
        # The activate script is not written for `set -u`; what it does is these two lines.
        export VIRTUAL_ENV=$MSEG_VENV
        export PATH=$MSEG_VENV/bin:$PATH
    else
        echo "launch/env.sh: warning: no python in MSEG_VENV=$MSEG_VENV (create it with \`make venv\`," \
            "or set MSEG_VENV= to use the python on PATH)" >&2
    fi
fi

# ------------------------------------------------------------------------------------- threads
# CPU-only jobs: the training process computes on the CPU and gets all of the task's CPUs.
# GPU jobs: left unset, so `accelerate launch` / torchrun give each rank one intra-op thread and the
# cores go to the loader workers, which decode and crop in processes of their own. A GPU rank with
# all of a node's threads starved its 15 workers on an H200 node: 138 images/s against 369 with
# OMP_NUM_THREADS=1 (BENCHMARKS.md, "On a GPU: the device check").
if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_PER_TASK:-} && ! ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9] ]]; then
    export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
fi

# ---------------------------------------------------------------------------------------- NCCL
# NCCL_DEBUG=INFO prints the transport chosen (IB, sockets) per rank: the first thing to look at when
# a multi-node run hangs at start-up.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank that dies makes the others raise instead of hanging in a collective until the time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Examples for clusters where NCCL picks the wrong network:
# export NCCL_SOCKET_IFNAME=ib0          # or ^lo,docker  (interface used for bootstrap/sockets)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
# export NCCL_IB_DISABLE=1               # Ethernet-only clusters

# ---------------------------------------------------------------------------------------- misc
export PYTHONUNBUFFERED=1  # log lines reach the SLURM log files as they are written
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}  # a Python traceback on a hard crash
export HYDRA_FULL_ERROR=${HYDRA_FULL_ERROR:-1}  # full traceback instead of Hydra's summary
export MPLBACKEND=${MPLBACKEND:-Agg}  # report figures on nodes without a display

# ---------------------------------------------------------------------------------- site file
: "${MSEG_ENV_LOCAL:=$MSEG_REPO/launch/env.local.sh}"
if [[ -f $MSEG_ENV_LOCAL ]]; then
    # shellcheck source=/dev/null
    source "$MSEG_ENV_LOCAL"
fi
