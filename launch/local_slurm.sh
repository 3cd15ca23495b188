#!/usr/bin/env bash
# A one-node SLURM on localhost for tests/test_slurm_local.py (Debian/Ubuntu, as root).
#
#     sudo bash launch/local_slurm.sh          # install (apt) if missing, configure, start; idempotent
#     sinfo                                    # the node is "idle"
#
# Installs slurmctld, slurmd, munge and the client tools from the distribution's packages, writes
# /etc/slurm/slurm.conf and gres.conf for this host (4 fake GPUs: SLURM only counts them, TaskPlugin
# task/none binds nothing), starts munged, slurmctld and slurmd, and waits until the node is idle.
# State and logs live in $SLURM_DIR (default /tmp/slurm). Exit 0 when a job can be submitted;
# otherwise a non-zero exit and a message saying which step failed. .ci/run calls it.
set -euo pipefail

SLURM_DIR=${SLURM_DIR:-/tmp/slurm}
CONF_DIR=/etc/slurm

fail() { echo "local_slurm.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || fail "slurmctld/slurmd/munge are not installed and there is no apt-get"
    echo "local_slurm.sh: installing slurmctld slurmd munge slurm-client (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd munge slurm-client >/dev/null \
        || fail "apt-get install slurmctld slurmd munge slurm-client failed"
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mib=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
mkdir -p "$SLURM_DIR"/state "$SLURM_DIR"/spool "$SLURM_DIR"/log "$CONF_DIR"
for i in 0 1 2 3; do [ -e "$SLURM_DIR/gpu$i" ] || touch "$SLURM_DIR/gpu$i"; done

cat > "$CONF_DIR/slurm.conf" <<EOF
# written by dpft launch/local_slurm.sh: a one-node test cluster
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
GresTypes=gpu
KillWait=30
JobRequeue=1
NodeName=$host CPUs=$cpus RealMemory=$mem_mib Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
echo "NodeName=$host Name=gpu File=$SLURM_DIR/gpu[0-3]" > "$CONF_DIR/gres.conf"

# munge: a key (the package usually makes one) and the daemon
if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey >/dev/null; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c munged || fail "munged did not start"
fi

# (re)start the SLURM daemons so that they read the configuration written above
pkill -x slurmd 2>/dev/null || true
pkill -x slurmctld 2>/dev/null || true
for _ in $(seq 50); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.2; done
slurmctld || fail "slurmctld did not start (see $SLURM_DIR/log/slurmctld.log)"
slurmd || fail "slurmd did not start (see $SLURM_DIR/log/slurmd.log)"

for _ in $(seq 60); do
    state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
    case "$state" in
        idle|mix|alloc) echo "local_slurm.sh: node $host is $state ($cpus CPUs, 4 fake GPUs)"; exit 0 ;;
        drain*|down*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 1
done
fail "the node did not become idle within 60 s (sinfo: ${state:-no answer}; logs in $SLURM_DIR/log)"
