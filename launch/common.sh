# shellcheck shell=bash
# launch/common.sh: helpers shared by launch/slurm/*.sbatch and launch/local.sh (sourced, bash >= 4.3).
#
# The preemption protocol (DESIGN 2.5), implemented by mseg_run_preemptible:
#   1. `#SBATCH --signal=B:USR1@120` sends USR1 to the batch shell only, 120 s before the time limit
#      (or when an administrator/`scancel --signal=USR1 --batch` asks). A bash trap runs only while
#      the shell waits, so the training runs in the background (`cmd &`) and the shell `wait`s.
#   2. The USR1 trap writes the flag file ${run}/PREEMPT (pretraining polls it and agrees across
#      ranks, checkpoints on every rank and exits 0) and/or forwards a signal to the child
#      (fine-tuning checkpoints on SIGUSR1 itself).
#   3. When the child has exited, the job is requeued with `scontrol requeue $SLURM_JOB_ID` unless
#      $SLURM_RESTART_COUNT has reached $MAX_REQUEUES. Requeueing a *running* job makes SLURM kill it
#      at once, so the requeue waits for the checkpoint; a watchdog requeues anyway when the child is
#      still running $REQUEUE_GRACE s after the signal, so a hung checkpoint cannot lose the job to the
#      time limit (the resumed run then starts from the previous checkpoint).
#   4. The requeued job starts the same script with the same $SLURM_JOB_ID, hence the same run folder:
#      the script removes the stale flag and the training resumes from its latest checkpoint.
# SIGTERM (scancel, the hard time limit, preemption by a higher-priority job) writes the flag too, so
# a training that still has time checkpoints, but never requeues: SLURM requeues preempted jobs itself.

# ------------------------------------------------------------------------------------ messages
mseg_log() {
    printf '[%(%Y-%m-%d %H:%M:%S)T] %s\n' -1 "$*" >&2
}

mseg_die() {
    mseg_log "error: $*"
    exit 2
}

# ---------------------------------------------------------------------------------------- paths
# Print PATH made absolute (relative paths are taken from the current directory); no symlinks resolved,
# so the run folder keeps the name the user gave.
mseg_abspath() {
    local p=$1
    # a literal ~ that the calling shell did not expand (e.g. out=~/runs/x)
    # shellcheck disable=SC2088
    [[ $p == "~" || $p == "~/"* ]] && p=$HOME${p:1}
    [[ $p == /* ]] || p=$PWD/$p
    while [[ $p == */./* ]]; do p=${p//\/.\//\/}; done
    p=${p%/.}
    while [[ $p == */ && $p != / ]]; do p=${p%/}; done
    printf '%s\n' "$p"
}

# The run folder becomes the Hydra override `out=<dir>`: refuse characters Hydra's override grammar
# would need quoting for, rather than hand a different folder to the training.
mseg_check_run_dir() {
    local re='^[A-Za-z0-9_./+@%:~-]+$'
    [[ $1 =~ $re ]] || mseg_die "run folder '$1' has characters a Hydra override cannot take unquoted" \
        "(spaces, quotes, commas, =, brackets, \$): choose another name"
}

# Split "$@" into the Hydra overrides (all but out=) and the value of out= (last one wins).
# Sets the globals MSEG_OVERRIDES (array) and MSEG_OUT (string, empty when no out= was given).
# shellcheck disable=SC2034  # the globals are this function's result, read by the caller
mseg_split_out() {
    MSEG_OVERRIDES=()
    MSEG_OUT=
    local a
    for a in "$@"; do
        case $a in
            out=*) MSEG_OUT=${a#out=} ;;
            *) MSEG_OVERRIDES+=("$a") ;;
        esac
    done
}

# ---------------------------------------------------------------------------------- accelerate
# Print the accelerate config file for NAME: an existing file, or configs/accelerate/NAME[.yaml].
mseg_accel_config() {
    local name=$1 f
    for f in "$name" "configs/accelerate/$name" "configs/accelerate/$name.yaml"; do
        if [[ -f $f ]]; then
            mseg_abspath "$f"
            return 0
        fi
    done
    local have=()
    for f in configs/accelerate/*.yaml; do
        [[ -f $f ]] && have+=("$(basename "$f" .yaml)")
    done
    mseg_die "accelerate config '$name' not found (choose one of: ${have[*]:-none in configs/accelerate})"
}

# True when the accelerate config file launches DeepSpeed (then the multi-node launcher must be
# `standard`: accelerate's default, pdsh, would ssh into the nodes itself).
mseg_is_deepspeed() {
    grep -Eq '^[[:space:]]*distributed_type:[[:space:]]*["'\'']?DEEPSPEED' "$1"
}

# GPUs per node: $GPUS_PER_NODE, else SLURM's view (SLURM_GPUS_ON_NODE, or --gpus-per-node which may
# read "a100:4"), else nvidia-smi, else 1. Nodes are assumed alike.
mseg_gpus_per_node() {
    local g
    for g in "${GPUS_PER_NODE:-}" "${SLURM_GPUS_ON_NODE:-}" "${SLURM_GPUS_PER_NODE:-}"; do
        g=${g%%(*}
        g=${g##*:}
        if [[ $g =~ ^[1-9][0-9]*$ ]]; then
            printf '%s\n' "$g"
            return 0
        fi
    done
    if command -v nvidia-smi >/dev/null 2>&1; then
        g=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        if [[ $g =~ ^[1-9][0-9]*$ ]]; then
            printf '%s\n' "$g"
            return 0
        fi
    fi
    printf '1\n'
}

# Rendezvous port: $MASTER_PORT, else one derived from the job id in 20000-29999 (below the Linux
# ephemeral range 32768+, so no outgoing connection holds it; the same port after a requeue).
mseg_port() {
    if [[ -n ${MASTER_PORT:-} ]]; then
        printf '%s\n' "$MASTER_PORT"
    else
        printf '%s\n' $((20000 + ${1:-0} % 10000))
    fi
}

# -------------------------------------------------------------------------------- preemption
# Configuration (set before mseg_run_preemptible):
#   MSEG_FLAG            flag file written on USR1/TERM ("" = none)
#   MSEG_FORWARD_SIGNAL  signal sent to the child on USR1 ("" = none)
#   MAX_REQUEUES         requeue at most this many times (default 10)
#   REQUEUE_GRACE        seconds after USR1 before the watchdog requeues a still-running child (90)
MSEG_FLAG=${MSEG_FLAG:-}
MSEG_FORWARD_SIGNAL=${MSEG_FORWARD_SIGNAL:-}
MSEG_CHILD=
MSEG_WATCHDOG=
MSEG_PREEMPTED=0
MSEG_TERMINATED=0

mseg_write_flag() {
    [[ -n $MSEG_FLAG ]] || return 0
    printf 'signal %s at %(%Y-%m-%d %H:%M:%S)T, job %s, restart %s\n' "$1" -1 "${SLURM_JOB_ID:-}" \
        "${SLURM_RESTART_COUNT:-0}" >"$MSEG_FLAG" 2>/dev/null ||
        mseg_log "warning: could not write the flag file $MSEG_FLAG"
}

# Requeue this job unless the restart budget is spent. Returns 0 when a requeue was issued.
mseg_requeue() {
    local count=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-10}
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        mseg_log "not requeued: not a SLURM job"
        return 1
    fi
    if ((count >= max)); then
        mseg_log "not requeued: restart count $count reached MAX_REQUEUES=$max;" \
            "resubmit the same command to continue from the last checkpoint"
        return 1
    fi
    mseg_log "requeueing job $SLURM_JOB_ID (restart $((count + 1)) of at most $max)"
    if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
    fi
    mseg_log "warning: scontrol requeue $SLURM_JOB_ID failed; resubmit the same command to resume"
    return 1
}

mseg_on_usr1() {
    if ((MSEG_PREEMPTED)); then
        return 0
    fi
    MSEG_PREEMPTED=1
    mseg_log "SIGUSR1: the job ends soon; asking the training to checkpoint and stop"
    mseg_write_flag USR1
    if [[ -n $MSEG_FORWARD_SIGNAL && -n $MSEG_CHILD ]]; then
        kill -s "$MSEG_FORWARD_SIGNAL" "$MSEG_CHILD" 2>/dev/null || true
    fi
    mseg_start_watchdog
}

mseg_on_term() {
    MSEG_TERMINATED=1
    mseg_log "SIGTERM: the job is being cancelled or killed; flag written, no requeue from here"
    mseg_write_flag TERM
}

# Background timer: requeue when the child still runs REQUEUE_GRACE s after USR1. Exits 0 when it
# requeued, 1 otherwise; TERM stops it (and its sleep) silently.
mseg_start_watchdog() {
    local grace=${REQUEUE_GRACE:-90} child=$MSEG_CHILD
    [[ -n $child ]] || return 0
    (
        trap '' USR1
        trap 'kill "$sleeper" 2>/dev/null; exit 1' TERM
        sleep "$grace" &
        sleeper=$!
        wait "$sleeper"
        if kill -0 "$child" 2>/dev/null; then
            mseg_log "the training still runs ${grace}s after the signal: requeueing now" \
                "(it resumes from its previous checkpoint)"
            mseg_requeue && exit 0
        fi
        exit 1
    ) &
    MSEG_WATCHDOG=$!
}

# Run "$@" in the background and wait for it with the USR1/TERM traps active; requeue after a USR1.
# Returns the command's exit status (0 after a clean checkpoint-and-stop).
mseg_run_preemptible() {
    trap mseg_on_usr1 USR1
    trap mseg_on_term TERM
    "$@" &
    MSEG_CHILD=$!
    local rc
    while :; do
        rc=0
        wait "$MSEG_CHILD" || rc=$?
        # A trapped signal ends `wait` early with a status > 128 while the child still runs.
        if ((rc > 128)) && kill -0 "$MSEG_CHILD" 2>/dev/null; then
            continue
        fi
        break
    done
    # From here a late USR1 must not kill the shell before it requeues (USR1's default action).
    trap '' USR1
    trap - TERM
    local requeued=0
    if [[ -n $MSEG_WATCHDOG ]]; then
        if kill -0 "$MSEG_WATCHDOG" 2>/dev/null; then
            kill "$MSEG_WATCHDOG" 2>/dev/null || true
        fi
        wait "$MSEG_WATCHDOG" 2>/dev/null && requeued=1
    fi
    if ((MSEG_PREEMPTED && !MSEG_TERMINATED && !requeued)); then
        if ((rc == 0)); then
            mseg_log "the training stopped cleanly after the signal"
        else
            mseg_log "warning: the training exited with status $rc after the signal"
        fi
        mseg_requeue || true
    fi
    return "$rc"
}
