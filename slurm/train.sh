#!/usr/bin/env bash
# Train facetrain under Slurm, with preemption-safe checkpoint + requeue.
#
#   mkdir -p logs && sbatch slurm/train.sh
#   CONFIG=configs/my_exp.yaml GPUS_PER_NODE=8 sbatch --gpus-per-node=8 slurm/train.sh
#
# Submit from the repository root (the job cd's to $SLURM_SUBMIT_DIR, so
# relative paths below are relative to it). See docs/slurm.md.
#
# Nodes: change --nodes (or pass `sbatch --nodes=N`); one Slurm task runs per
# node and `accelerate launch` there starts one process per GPU (or
# PROCS_PER_NODE processes on CPU nodes). Nothing else needs editing.
#SBATCH --job-name=facetrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# (--signal only fires when the job has a time limit: --time or the
# partition's default. Add --gpus-per-node/--cpus-per-task/--partition as
# your cluster needs.)
set -euo pipefail

# ---- stop requests (installed first: USR1's default action would kill
# the shell if it arrived during set-up, e.g. with a time limit < 3 min) ----
# USR1 = "checkpoint, then requeue": sent 180 s before the time limit
#   (--signal=B:USR1@180, batch shell only) or by hand / by a preemption
#   hook with `scancel --batch --signal=USR1 <jobid>`.
# TERM = "the job is ending" (scancel, time limit reached, preemption):
#   checkpoint if there is still time, but never requeue. A requeue after a
#   plain `scancel` would resurrect a job the user just cancelled (scontrol
#   requeue accepts cancelled jobs); preemption with PreemptMode=REQUEUE
#   requeues the job by itself.
# We never kill the trainer: the STOP file makes every rank finish its
# current step, write a checkpoint and exit 0.
STOP_REQUESTED=0   # some signal asked the trainer to stop
REQUEUE=0          # USR1 seen: the job should come back
TERMINATING=0      # TERM seen: the job is ending, vetoes the requeue
STOP_FILE=""       # set once OUTPUT_DIR exists
DONE_FILE=""
KEEPER_PID=""

log() { echo "[train.sh $(date '+%F %T')] $*"; }

# The trainer deletes a stale STOP file when it starts, so a signal that
# lands while it is still starting up would be lost: keep re-creating the
# file until the training step has ended.
keep_stop_file() {
    touch "$STOP_FILE"
    (
        while kill -0 "$$" 2>/dev/null && [[ ! -e "$DONE_FILE" ]]; do
            [[ -e "$STOP_FILE" ]] || touch "$STOP_FILE"
            sleep 0.5
        done
    ) &
    KEEPER_PID=$!
}

# shellcheck disable=SC2317  # only invoked through trap
on_stop_signal() {
    if [[ "$1" == USR1 ]]; then REQUEUE=1; else TERMINATING=1; fi
    log "received $1: asking the trainer to checkpoint and stop"
    (( STOP_REQUESTED )) && return 0
    STOP_REQUESTED=1
    if [[ -n "$STOP_FILE" ]]; then keep_stop_file; fi
}
trap 'on_stop_signal USR1' USR1
trap 'on_stop_signal TERM' TERM

# ---- settings: every one can be overridden from the submitting environment
# (sbatch exports it to the job by default) ---------------------------------
# Experiment YAML passed to facetrain.train --config.
CONFIG="${CONFIG:-configs/default.yaml}"
# GPUs per node; 0 means CPU-only nodes. Defaults to what Slurm allocated.
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
# Processes per node on CPU nodes (ignored when GPUS_PER_NODE > 0).
PROCS_PER_NODE="${PROCS_PER_NODE:-2}"
# Run directory. Keyed by the job id only: Slurm keeps the id when it
# requeues a job, so a restarted job finds its own checkpoints.
OUTPUT_DIR="${OUTPUT_DIR:-runs/${SLURM_JOB_ID}}"
# Optional accelerate config file, e.g. accelerate_configs/<name>.yaml.
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"
# Extra trainer overrides, e.g. "--train.max_steps 1000 --train.lr 0.1".
EXTRA_ARGS="${EXTRA_ARGS:-}"
# Rendezvous port on the head node; derived from the job id so two jobs
# sharing a node do not collide.
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"

cd "$SLURM_SUBMIT_DIR"

# First node of the allocation hosts the rendezvous (machine rank 0).
MAIN_PROCESS_IP="${MAIN_PROCESS_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}"

export CONFIG GPUS_PER_NODE PROCS_PER_NODE OUTPUT_DIR ACCELERATE_CONFIG \
    EXTRA_ARGS MAIN_PROCESS_IP MAIN_PROCESS_PORT

mkdir -p "$OUTPUT_DIR"
DONE_FILE="$OUTPUT_DIR/done.json"
STOP_FILE="$OUTPUT_DIR/STOP"
if (( STOP_REQUESTED )); then keep_stop_file; fi  # a signal came during set-up

log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}" \
    "(${SLURM_JOB_NUM_NODES:-1} node(s)); head $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT;" \
    "output_dir $OUTPUT_DIR"

if [[ -e "$DONE_FILE" ]]; then
    log "$DONE_FILE exists: run already finished, nothing to do"
    exit 0
fi

# ---- launch -----------------------------------------------------------------
# One task per node; node_launch.sh reads its own $SLURM_NODEID there. The
# step gets all of the job's CPUs and GPUs on each node (srun's default).
# Backgrounded + `wait`, because bash runs traps only between commands, and
# `wait` is interruptible while a foreground srun is not.
srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash slurm/node_launch.sh &
SRUN_PID=$!

rc=0
while :; do
    wait "$SRUN_PID" && rc=0 || rc=$?
    # wait also returns (status > 128) when a trapped signal arrives; keep
    # waiting while the step is still alive.
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
log "training step exited with status $rc"

if [[ -n "$KEEPER_PID" ]]; then kill "$KEEPER_PID" 2>/dev/null || true; fi
if [[ -e "$DONE_FILE" ]]; then
    rm -f "$STOP_FILE"
    log "training finished ($DONE_FILE)"
    exit "$rc"
fi

if (( REQUEUE && ! TERMINATING )); then
    # Stopped early on our request: the trainer wrote a checkpoint, so put
    # the job back in the queue; it keeps its id (hence its OUTPUT_DIR) and
    # resumes with --train.resume auto. Slurm kills this script as part of
    # the requeue, so nothing after it is guaranteed to run.
    trap - USR1 TERM
    state="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' || true)"
    if [[ "$state" != JobState=RUNNING ]]; then
        # Cancelled / timed out meanwhile: requeueing would undo that.
        log "not requeueing: job is in $state; resubmit with OUTPUT_DIR=$OUTPUT_DIR to resume"
        exit 1
    fi
    log "stop requested and run not finished: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi

if (( STOP_REQUESTED )); then
    log "stopped on TERM: not requeueing; resubmit with OUTPUT_DIR=$OUTPUT_DIR to resume"
else
    # Status 0 without done.json and without a signal: somebody touched
    # $STOP_FILE by hand, i.e. a deliberate pause.
    log "run not finished and no stop signal: not requeueing"
fi
exit "$rc"
