#!/usr/bin/env bash
# Stops the one-node SLURM cluster that tests/slurm/start.sh started: cancels what is left in its queue,
# then stops slurmd, slurmctld and munged by the pid files they wrote.
set -uo pipefail

STATE=${SLURM_TEST_STATE:-/tmp/cm-slurm}
command -v scancel >/dev/null && scancel --quiet --user="$(id -un)" 2>/dev/null
for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
    if [ -s "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
done
echo "SLURM stopped"
