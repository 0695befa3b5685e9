#!/bin/bash
# A fine-tuning sweep on SLURM: models x encoder weights x data sets x seeds, one array task (one GPU)
# per cell, each a resumable `python -m segment.finetune` run in its own folder.
#
#   launch/slurm/sweep.sh --name NAME [options] [-- hydra overrides for every cell]
#
#   launch/slurm/sweep.sh --name encoders --models cs_unet,unet --data super1,super3 --seeds 0,1,2 \
#       --weights imagenet= \
#       --weights ssl='+model.encoder_weights.swin=/abs/runs/pretrain/dino/export optim.encoder_lr_mult=0.1' \
#       -- train.epochs=100
#
# Options:
#   --name NAME          sweep folder $MSEG_RUNS/sweeps/NAME (required; $MSEG_RUNS defaults to runs/)
#   --models A,B         model presets, configs/model/*.yaml (default cs_unet)
#   --data A,B           data sets, configs/data/*.yaml (default super1)
#   --seeds 0,1,2        training seeds, train.seed (default 0)
#   --weights LABEL=OVR  encoder weights, repeatable: LABEL names the folder and the table row, OVR is
#                        zero or more Hydra overrides separated by spaces (default: preset=, the
#                        model preset's own weights)
#   --max-parallel K     run at most K tasks at a time (sbatch --array=...%K)
#   --sbatch ARG         extra sbatch option, repeatable (--sbatch --partition=gpu --sbatch --time=8:00:00)
#   --force              overwrite a grid.tsv that differs (array indices of queued tasks change!)
#   --dry-run            write the grid and print the sbatch command without submitting
#   -h, --help           this text
#
# Writes <sweep>/grid.tsv (header + one line per cell: index, cell, model, weights, data, seed,
# overrides) and submits `sbatch --array=0-<N-1> launch/slurm/finetune.sbatch <sweep>/grid.tsv`; task i
# fine-tunes line i into <sweep>/<model>__<weights>__<data>__s<seed>. The folder of a cell depends only
# on its values, so rerunning the same command resumes unfinished cells and skips finished ones.
# Logs: <sweep>/logs/<jobid>_<task>.out. Results: python launch/collect.py <sweep>.
set -euo pipefail

MSEG_REPO=${MSEG_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$MSEG_REPO"  # the jobs' SLURM_SUBMIT_DIR: finetune.sbatch finds the repository there
export MSEG_REPO
# shellcheck source=launch/common.sh
source launch/common.sh

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$MSEG_REPO/launch/slurm/sweep.sh"
}

name=
models=cs_unet
datas=super1
seeds=0
weights=()
max_parallel=
sbatch_extra=()
force=0
dry_run=0
while (($#)); do
    case $1 in
        --name) name=${2:?--name needs a value}; shift 2 ;;
        --models) models=${2:?--models needs a value}; shift 2 ;;
        --data) datas=${2:?--data needs a value}; shift 2 ;;
        --seeds) seeds=${2:?--seeds needs a value}; shift 2 ;;
        --weights) weights+=("${2?--weights needs LABEL=OVERRIDES}"); shift 2 ;;
        --max-parallel) max_parallel=${2:?--max-parallel needs a number}; shift 2 ;;
        --sbatch) sbatch_extra+=("${2:?--sbatch needs an option}"); shift 2 ;;
        --force) force=1; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) mseg_die "unknown argument '$1' (overrides for every cell go after --; see --help)" ;;
    esac
done
extra=("$@")
((${#weights[@]})) || weights=("preset=")

label_re='^[A-Za-z0-9][A-Za-z0-9._-]*$'
[[ $name =~ $label_re ]] || mseg_die "--name is required: letters, digits, . _ - (got '$name')"
[[ -z $max_parallel || $max_parallel =~ ^[1-9][0-9]*$ ]] || mseg_die "--max-parallel needs a positive number"
IFS=, read -ra model_list <<<"$models"
IFS=, read -ra data_list <<<"$datas"
IFS=, read -ra seed_list <<<"$seeds"
for v in "${model_list[@]}" "${data_list[@]}"; do
    [[ $v =~ $label_re ]] || mseg_die "model and data names are config names: '$v' is not"
done
for v in "${seed_list[@]}"; do
    [[ $v =~ ^[0-9]+$ ]] || mseg_die "seeds are non-negative integers: '$v' is not"
done
for v in "${extra[@]}"; do
    [[ $v == *=* || $v == ~* ]] || mseg_die "'$v' is not a Hydra override (options go before --)"
    [[ $v != *[[:space:]]* ]] || mseg_die "override '$v' contains white space"
    [[ $v != out=* ]] || mseg_die "out= is set per cell (<sweep>/<cell>); do not pass it"
done
declare -A seen=()
for w in "${weights[@]}"; do
    label=${w%%=*}
    [[ $label =~ $label_re ]] || mseg_die "--weights needs LABEL=OVERRIDES with a folder-safe LABEL, not '$w'"
    [[ -z ${seen[$label]:-} ]] || mseg_die "--weights label '$label' given twice"
    seen[$label]=1
    [[ $w != *$'\t'* ]] || mseg_die "--weights '$w' contains a tab"
done

sweep=$(mseg_abspath "${MSEG_RUNS:-runs}/sweeps/$name")
mseg_check_run_dir "$sweep"
grid=$sweep/grid.tsv

# ---- the grid, in a fixed order: data, model, weights, seed (seeds of one setting run side by side)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf 'index\tcell\tmodel\tweights\tdata\tseed\toverrides\n' >"$tmp"
n=0
for data in "${data_list[@]}"; do
    for model in "${model_list[@]}"; do
        for w in "${weights[@]}"; do
            label=${w%%=*}
            wov=
            [[ $w == *=* ]] && wov=${w#*=}
            read -ra wov_list <<<"$wov"
            for seed in "${seed_list[@]}"; do
                cell=${model}__${label}__${data}__s${seed}
                ovr=("model=$model" "data=$data" "train.seed=$seed" "${wov_list[@]}" "${extra[@]}")
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$n" "$cell" "$model" "$label" "$data" "$seed" "${ovr[*]}" >>"$tmp"
                n=$((n + 1))
            done
        done
    done
done

mkdir -p "$sweep/logs"
if [[ -f $grid ]] && ! cmp -s "$tmp" "$grid"; then
    if ((force)); then
        mseg_log "replacing the different grid $grid (--force)"
    else
        mseg_die "$grid exists with other cells: a new --name, or --force (queued tasks would run other lines)"
    fi
fi
cp "$tmp" "$grid"

column -t -s $'\t' "$grid" 2>/dev/null || cat "$grid"
mseg_log "$n cells in $grid"

array="0-$((n - 1))${max_parallel:+%$max_parallel}"
cmd=(sbatch "--array=$array" "--job-name=sweep-$name" "--output=$sweep/logs/%A_%a.out"
    "${sbatch_extra[@]}" launch/slurm/finetune.sbatch "$grid")
printf '%q ' "${cmd[@]}"
printf '\n'
if ((dry_run)); then
    mseg_log "dry run: not submitted"
    exit 0
fi
"${cmd[@]}"
mseg_log "results when done: python launch/collect.py $sweep"
