#!/bin/bash
# Pretraining on one machine: all of its GPUs, or N CPU processes (gloo), through `accelerate launch`.
#
#   launch/local.sh [options] [--] [hydra overrides for pretrain/main.py]
#   launch/local.sh method=dino encoder=swin_t                 # every visible GPU
#   launch/local.sh --gpus 2 --config deepspeed_zero2 out=runs/pretrain/zero2
#   launch/local.sh --cpu 2 out=runs/pretrain/cpu_test ...     # 2 CPU processes (tests, laptops)
#
# Options:
#   --cpu N        N processes on the CPU: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
#                  --num_processes N (DESIGN 2.3: `--cpu --num_processes N` would start one process)
#   --gpus N       N GPUs (default: all visible, from CUDA_VISIBLE_DEVICES or nvidia-smi)
#   --config NAME  configs/accelerate/NAME.yaml or a path (default: cpu with --cpu, else single_gpu
#                  or multi_gpu)
#   --name NAME    run folder $MSEG_RUNS/pretrain/NAME (an out= override wins)
#   --dry-run      print the command instead of running it
#   -h, --help     this text
#
# Conventions shared with launch/slurm/pretrain.sbatch: the run folder is the Hydra override out=
# (absolute, the same for every rank); rerunning with the same folder resumes from its latest
# checkpoint; a stale <run>/PREEMPT flag is removed before the start; `touch <run>/PREEMPT` or
# SIGTERM/SIGINT (Ctrl-C) makes the training checkpoint and stop. Without out= or --name the folder
# is $MSEG_RUNS/pretrain/local-<date>-<time> ($MSEG_RUNS defaults to runs/ in the repository).
# Environment: launch/env.sh (MSEG_VENV, MSEG_DATA, ...); MASTER_PORT fixes the port (default: a free one).
set -euo pipefail

MSEG_REPO=${MSEG_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$MSEG_REPO"
export MSEG_REPO
# shellcheck source=launch/env.sh
source launch/env.sh
# shellcheck source=launch/common.sh
source launch/common.sh

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$MSEG_REPO/launch/local.sh"
}

cpu=
gpus=
config=
name=
dry_run=0
while (($#)); do
    case $1 in
        --cpu) cpu=${2:?--cpu needs a number of processes}; shift 2 ;;
        --cpu=*) cpu=${1#*=}; shift ;;
        --gpus) gpus=${2:?--gpus needs a number}; shift 2 ;;
        --gpus=*) gpus=${1#*=}; shift ;;
        --config) config=${2:?--config needs a name or file}; shift 2 ;;
        --config=*) config=${1#*=}; shift ;;
        --name) name=${2:?--name needs a run name}; shift 2 ;;
        --name=*) name=${1#*=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) mseg_die "unknown option $1 (see launch/local.sh --help)" ;;
        *) break ;;
    esac
done
[[ -z $cpu || -z $gpus ]] || mseg_die "--cpu and --gpus exclude each other"

env_prefix=()
if [[ -n $cpu ]]; then
    [[ $cpu =~ ^[1-9][0-9]*$ ]] || mseg_die "--cpu needs a positive number, not '$cpu'"
    nprocs=$cpu
    config=${config:-cpu}
    # Read by every process: Accelerator then runs on the CPU (MULTI_CPU with gloo when N > 1).
    env_prefix=(ACCELERATE_USE_CPU=true)
else
    if [[ -z $gpus ]]; then
        if [[ -n ${CUDA_VISIBLE_DEVICES+x} ]]; then
            IFS=, read -ra _ids <<<"$CUDA_VISIBLE_DEVICES"
            gpus=${#_ids[@]}
        elif command -v nvidia-smi >/dev/null 2>&1; then
            gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        else
            gpus=0
        fi
        ((gpus > 0)) || mseg_die "no GPU found: use --cpu N for N CPU processes"
    fi
    [[ $gpus =~ ^[1-9][0-9]*$ ]] || mseg_die "--gpus needs a positive number, not '$gpus'"
    nprocs=$gpus
    if ((nprocs > 1)); then config=${config:-multi_gpu}; else config=${config:-single_gpu}; fi
fi
accel_config=$(mseg_accel_config "$config")

mseg_split_out "$@"
overrides=("${MSEG_OVERRIDES[@]}")
if [[ -n $MSEG_OUT ]]; then
    run_dir=$MSEG_OUT
elif [[ -n $name ]]; then
    run_dir=${MSEG_RUNS:-runs}/pretrain/$name
else
    run_dir=${MSEG_RUNS:-runs}/pretrain/local-$(date +%Y%m%d-%H%M%S)
fi
run_dir=$(mseg_abspath "$run_dir")
mseg_check_run_dir "$run_dir"

launch_args=(--config_file "$accel_config" --num_processes "$nprocs" --num_machines 1
    --main_process_port "${MASTER_PORT:-0}")
# Several processes on one machine: --multi_gpu (with ACCELERATE_USE_CPU=true on the CPU), unless the
# config launches DeepSpeed, which starts its processes itself.
if ((nprocs > 1)) && ! mseg_is_deepspeed "$accel_config"; then
    launch_args+=(--multi_gpu)
fi
cmd=(accelerate launch "${launch_args[@]}" pretrain/main.py "out=$run_dir" "${overrides[@]}")

if ((dry_run)); then
    printf '%q ' env "${env_prefix[@]}" "${cmd[@]}"
    printf '\n'
    exit 0
fi

mkdir -p "$run_dir"
if [[ -e $run_dir/PREEMPT ]]; then
    mseg_log "removing the stale flag $run_dir/PREEMPT"
    rm -f "$run_dir/PREEMPT"
fi
printf '%(%Y-%m-%d %H:%M:%S)T local: %s process(es), %s\n' -1 "$nprocs" "${accel_config#"$MSEG_REPO"/}" \
    >>"$run_dir/launch.log"
mseg_log "run folder $run_dir (rerun with out=$run_dir to resume)"
mseg_log "${env_prefix[*]} ${cmd[*]}"
exec env "${env_prefix[@]}" "${cmd[@]}"
