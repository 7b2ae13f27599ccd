#!/usr/bin/env bash
# Evaluate a finished training run on a held-out image folder.
#
#   RUN_DIR=runs/1234 DATA=/data/faces_heldout sbatch slurm/eval.sh
#
# Submit from the repository root. Writes $OUTPUT/metrics.json. Single node.
#SBATCH --job-name=facetrain-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# ---- settings (override from the submitting environment) ------------------
# Run directory of a finished training job (contains bundle/). Required.
RUN_DIR="${RUN_DIR:-}"
# Held-out folder: DATA/<identity>/<image>. Required.
DATA="${DATA:-}"
# Where metrics.json goes.
OUTPUT="${OUTPUT:-${RUN_DIR%/}/eval}"
# GPUs on the node (0 = CPU); defaults to what Slurm allocated.
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}"
# Processes on CPU nodes (ignored when GPUS_PER_NODE > 0).
PROCS_PER_NODE="${PROCS_PER_NODE:-1}"
# Extra facetrain.eval arguments, whitespace-separated.
EXTRA_ARGS="${EXTRA_ARGS:-}"
# Rendezvous port when several processes run; per job, so jobs sharing a
# node do not collide.
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-$(( 20000 + ${SLURM_JOB_ID:-9500} % 20000 ))}"

die() { echo "[eval.sh] ERROR: $*" >&2; exit 2; }

cd "${SLURM_SUBMIT_DIR:-.}"

[[ -n "$RUN_DIR" ]] || die "RUN_DIR is not set. Usage: RUN_DIR=runs/<jobid> DATA=<folder> sbatch slurm/eval.sh"
[[ -d "$RUN_DIR" ]] || die "RUN_DIR=$RUN_DIR is not a directory (relative paths are relative to $PWD)"
[[ -d "$RUN_DIR/bundle" ]] || die "$RUN_DIR/bundle not found: is the run finished? (done.json: $([[ -e $RUN_DIR/done.json ]] && echo present || echo absent))"
[[ -n "$DATA" ]] || die "DATA is not set: a held-out folder of <identity>/<image> files"
[[ -d "$DATA" ]] || die "DATA=$DATA is not a directory"

if (( GPUS_PER_NODE > 0 )); then procs="$GPUS_PER_NODE"; else procs="$PROCS_PER_NODE"; fi

args=(-m facetrain.eval --model "$RUN_DIR/bundle" --data "$DATA" --output "$OUTPUT")
if [[ -n "$EXTRA_ARGS" ]]; then
    read -r -a extra <<<"$EXTRA_ARGS"
    args+=("${extra[@]}")
fi

if (( procs > 1 )); then
    # Same launch style as training (see slurm/node_launch.sh): --multi_gpu
    # is multi-process DDP, over gloo on CPU.
    cmd=(accelerate launch --num_machines 1 --num_processes "$procs"
        --main_process_port "$MAIN_PROCESS_PORT" --multi_gpu "${args[@]}")
else
    cmd=(python "${args[@]}")
fi
if (( GPUS_PER_NODE == 0 )); then
    cmd=(env ACCELERATE_USE_CPU=1 "${cmd[@]}")
fi

mkdir -p "$OUTPUT"
echo "[eval.sh $(date '+%F %T')] job ${SLURM_JOB_ID:-local}: ${cmd[*]}"
# Runs in the batch step itself: one node, and it holds the job's GPUs.
"${cmd[@]}"
echo "[eval.sh $(date '+%F %T')] wrote $OUTPUT/metrics.json"
