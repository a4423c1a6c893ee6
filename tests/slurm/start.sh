#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the tests in tests/slurm/: installs slurm-wlm and munge
# from the system's package manager when they are missing, writes a minimal slurm.conf (this host's
# name, its CPU count and memory), starts munged, slurmctld and slurmd, and waits until the node is idle.
# Needs root (as in CI containers). Stop it with tests/slurm/stop.sh.
set -euo pipefail

STATE=${SLURM_TEST_STATE:-/tmp/cm-slurm}
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$STATE"/{ctld,spool,log} /etc/munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged 2>/dev/null || munged --force

CONF_DIR=/etc/slurm
if [ -s "$CONF_DIR/slurm.conf" ] && ! grep -q "^ClusterName=cmtest$" "$CONF_DIR/slurm.conf"; then
    echo "$CONF_DIR/slurm.conf belongs to another cluster; not replacing it (run the tests there instead)" >&2
    exit 1
fi
mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=cmtest
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
SchedulerParameters=bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)
    if [ "$state" = "idle" ]; then
        echo "SLURM is up: node $HOST ($CPUS CPUs) is idle"
        exit 0
    fi
    if [ "$state" = "down" ] || [ "$state" = "drain" ] || [ "$state" = "down*" ]; then
        scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    fi
    sleep 1
done
echo "SLURM did not come up: sinfo says '${state:-nothing}'; see $STATE/log/" >&2
exit 1
