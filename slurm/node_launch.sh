#!/usr/bin/env bash
# Per-node launcher: slurm/train.sh runs this through `srun`, one task per
# node. It turns the Slurm step environment into one `accelerate launch`
# command, which starts this node's training processes and joins the
# rendezvous on the head node.
#
# Reads (set by Slurm inside the step):  SLURM_NODEID (machine rank),
#   SLURM_NNODES, SLURM_JOB_ID, SLURM_JOB_NODELIST
# Reads (exported by train.sh):  CONFIG, OUTPUT_DIR, GPUS_PER_NODE,
#   PROCS_PER_NODE, ACCELERATE_CONFIG, EXTRA_ARGS, MAIN_PROCESS_IP,
#   MAIN_PROCESS_PORT
# FACETRAIN_DRY_RUN=1 prints the command (one shell-quoted line) instead of
# running it.
set -euo pipefail

: "${CONFIG:?CONFIG is not set (run this through slurm/train.sh)}"
: "${OUTPUT_DIR:?OUTPUT_DIR is not set (run this through slurm/train.sh)}"
: "${SLURM_JOB_ID:?not inside a Slurm job}"

# Evaluated here, inside the step: each node gets its own SLURM_NODEID, the
# batch script only ever sees node 0's.
MACHINE_RANK="${SLURM_NODEID:?SLURM_NODEID is not set (run this through srun)}"
NUM_MACHINES="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:?SLURM_NNODES is not set}}"

GPUS_PER_NODE="${GPUS_PER_NODE:-0}"
PROCS_PER_NODE="${PROCS_PER_NODE:-2}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
# Normally exported by train.sh; the same defaults are recomputed here so the
# script also works when started by other means.
MAIN_PROCESS_IP="${MAIN_PROCESS_IP:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n1)}"
MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"

if (( GPUS_PER_NODE > 0 )); then
    procs_per_node="$GPUS_PER_NODE"
else
    procs_per_node="$PROCS_PER_NODE"
fi
# accelerate's --num_processes is the total over all machines.
total_procs=$(( NUM_MACHINES * procs_per_node ))

cmd=(accelerate launch
    --num_machines "$NUM_MACHINES"
    --machine_rank "$MACHINE_RANK"
    --num_processes "$total_procs"
    --main_process_ip "$MAIN_PROCESS_IP"
    --main_process_port "$MAIN_PROCESS_PORT")
if (( NUM_MACHINES > 1 )); then
    # static rendezvous: ranks come from --machine_rank (= SLURM_NODEID), so
    # global ranks are deterministic; --same_network makes accelerate hand
    # torchrun --master_addr/--master_port of the head node (as accelerate's
    # own multi-node config does) instead of a c10d endpoint.
    cmd+=(--rdzv_backend static --same_network)
fi
if [[ -n "$ACCELERATE_CONFIG" ]]; then
    # The config decides the distributed type (DDP, FSDP, DeepSpeed...):
    # passing --multi_gpu as well would override it with plain DDP.
    cmd+=(--config_file "$ACCELERATE_CONFIG")
elif (( total_procs > 1 )); then
    # Multi-process data parallel; on CPU nodes (ACCELERATE_USE_CPU=1 below)
    # this runs DDP over gloo. (`--cpu --num_processes N` would silently run
    # a single process.)
    cmd+=(--multi_gpu)
fi
cmd+=(-m facetrain.train
    --config "$CONFIG"
    --train.output_dir "$OUTPUT_DIR"
    --train.resume auto)
if [[ -n "$EXTRA_ARGS" ]]; then
    # Whitespace-separated; no shell quoting inside EXTRA_ARGS.
    read -r -a extra <<<"$EXTRA_ARGS"
    cmd+=("${extra[@]}")
fi
if (( GPUS_PER_NODE == 0 )); then
    cmd=(env ACCELERATE_USE_CPU=1 "${cmd[@]}")
fi

if [[ "${FACETRAIN_DRY_RUN:-0}" == 1 ]]; then
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    printf '\n'
    exit 0
fi

echo "[node_launch.sh $(hostname)] machine rank $MACHINE_RANK/$NUM_MACHINES:" \
    "${cmd[*]}" >&2
exec "${cmd[@]}"
