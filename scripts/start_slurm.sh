#!/usr/bin/env bash
# Start a one-node Slurm "cluster" on this machine, for development and for
# the tests in tests/test_slurm.py (pytest -m slurm).
#
# Idempotent: installs slurm-wlm + munge only when missing, rewrites
# /etc/slurm/slurm.conf only when its content changes (and then restarts the
# daemons so every setting takes effect), starts only daemons that are not
# running, and finally waits until the node answers in `sinfo`.
# Must run as root (it installs packages and runs the daemons as root).
#
# Environment:
#   SLURM_READY_TIMEOUT  seconds to wait for the node to come up (default 90)
set -euo pipefail

READY_TIMEOUT="${SLURM_READY_TIMEOUT:-90}"
NODE_NAME=localhost
PARTITION=debug
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

log() { echo "[start_slurm] $*" >&2; }
die() { echo "[start_slurm] ERROR: $*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (installs packages, starts daemons)"

# --- 1. packages -----------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge with apt (takes a minute)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# --- 2. munge (Slurm authenticates every RPC with it) -----------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    # The Debian package normally creates the key; a stripped image may not.
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    log "starting munged"
    # Run as the munge user, as the package intends; munged refuses keys it
    # considers insecure, so fall back to --force as root only if that fails.
    runuser -u munge -- munged 2>/dev/null || munged --force
    for _ in $(seq 1 20); do munge_ok && break; sleep 0.5; done
    munge_ok || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- 3. slurm.conf ------------------------------------------------------------
CPUS="$(nproc)"
install -d -m 0755 "$CONF_DIR" "$CTLD_SPOOL" "$SLURMD_SPOOL" "$LOG_DIR"

new_conf="$(mktemp)"
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by scripts/start_slurm.sh: one-node development cluster.
# Edits are overwritten the next time the script runs.
ClusterName=facetrain
SlurmctldHost=$NODE_NAME(127.0.0.1)
# Single-user dev box: everything runs as root, no cgroups needed.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job must wait before it may start
# again (Slurm sets its BeginTime to now + cred_expire; default 120 s). Short
# here so preemption/requeue tests restart quickly. Keep the default on real
# clusters: it must cover prolog and environment set-up time.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# Run the scheduler often: a requeued job becomes eligible when its BeginTime
# passes, and only a periodic pass notices that (default every 60 s / 30 s).
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Keep finished jobs visible to scontrol for 30 min (no accounting database
# here, so this is the only way tests can read a finished job's state).
MinJobAge=1800
# Requeue is the default for batch jobs; train.sh asks for it explicitly too.
JobRequeue=1
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
Waittime=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF

conf_changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    install -m 0644 "$new_conf" "$CONF"
    conf_changed=1
    log "wrote $CONF (CPUs=$CPUS)"
fi

# --- 4. daemons ---------------------------------------------------------------
# A daemon counts as running when its pid file names a live process.
running() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # $1 = pid file; stop only the process it names
    local pid
    running "$1" || return 0
    pid="$(cat "$1")"
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.25; done
    die "process $pid (from $1) did not exit"
}

if (( conf_changed )); then
    # Restart rather than `scontrol reconfigure`: node definitions, ports and
    # AuthInfo only take effect on restart. Jobs survive (state is saved).
    if running "$CTLD_PID" || running "$SLURMD_PID"; then
        log "configuration changed: restarting slurm daemons"
    fi
    stop_daemon "$SLURMD_PID"
    stop_daemon "$CTLD_PID"
fi

if ! running "$CTLD_PID"; then
    log "starting slurmctld"
    slurmctld
fi
if ! running "$SLURMD_PID"; then
    log "starting slurmd"
    # -N: this node is called "$NODE_NAME" in slurm.conf whatever the
    # container's hostname is.
    slurmd -N "$NODE_NAME"
fi

# --- 5. wait for the node ---------------------------------------------------
deadline=$(( SECONDS + READY_TIMEOUT ))
resumed=0
state=""
while (( SECONDS < deadline )); do
    state="$(sinfo -h -N -n "$NODE_NAME" -o '%t' 2>/dev/null | head -n1 || true)"
    case "$state" in
        # idle, or already running jobs when the script runs a second time
        idle|mix|alloc|comp) break ;;
        drain*|drng*|down*)
            # A node left DOWN/DRAINED by an earlier crash stays that way;
            # this is our own dev node, so put it back into service once.
            if (( ! resumed )); then
                scontrol update NodeName="$NODE_NAME" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi ;;
    esac
    state=""
    sleep 1
done
[[ -n "$state" ]] || die "node $NODE_NAME not up after ${READY_TIMEOUT}s (last sinfo state: '$(sinfo -h -N -o '%t %E' 2>&1 | head -n1)'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"

echo "slurm ready: node $NODE_NAME ($CPUS CPUs) is $state in partition $PARTITION"
