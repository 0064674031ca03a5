#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by ci/slurm/start.sh. Harmless when nothing runs.
#   --purge   also delete $QFT_SLURM_DIR (state, logs, config) and the /etc/slurm links to it
# Only processes recorded in our pid files (and MariaDB via its init script) are stopped.
set -uo pipefail

DIR=${QFT_SLURM_DIR:-/tmp/qft-slurm}
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1
log() { echo "[qft-slurm stop] $*"; }
[[ $(id -u) == 0 ]] || { log "must run as root"; exit 1; }

# stop_pid PIDFILE NAME: TERM, wait up to 15 s, then KILL -- only if the pid really is NAME
stop_pid() {
  local pidfile=$1 name=$2 pid
  [[ -s $pidfile ]] || { log "$name: not running (no pid file)"; return 0; }
  pid=$(cat "$pidfile" 2>/dev/null)
  if [[ -z $pid || ! -r /proc/$pid/comm || $(cat "/proc/$pid/comm" 2>/dev/null) != "$name" ]]; then
    log "$name: not running (stale pid file)"; rm -f "$pidfile"; return 0
  fi
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 75); do
    [[ -d /proc/$pid ]] || { log "$name ($pid) stopped"; rm -f "$pidfile"; return 0; }
    sleep 0.2
  done
  log "$name ($pid) did not stop after 15 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null
  rm -f "$pidfile"
}

# cancel what is still queued/running so slurmd leaves no job processes behind
if [[ -f /etc/slurm/slurm.conf ]] && command -v squeue >/dev/null; then
  jobs=$(timeout 10 squeue -h -o %i -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    # shellcheck disable=SC2086
    timeout 10 scancel --quiet $jobs 2>/dev/null || true
    log "cancelled job(s) $jobs"
    sleep 2   # let slurmd signal and reap them (KillWait=5 s covers the rest)
  fi
fi
stop_pid "$DIR/run/slurmd.pid" slurmd
stop_pid "$DIR/run/slurmctld.pid" slurmctld
stop_pid "$DIR/run/slurmdbd.pid" slurmdbd
if [[ -x /etc/init.d/mariadb ]] && timeout 5 mariadb -e 'SELECT 1' >/dev/null 2>&1; then
  if timeout 60 /etc/init.d/mariadb stop </dev/null >/dev/null 2>&1; then log "mariadb stopped"; else log "mariadb stop failed"; fi
else
  log "mariadb: not running"
fi
stop_pid /run/munge/munged.pid munged

if ((PURGE)); then
  for f in slurm.conf slurmdbd.conf; do
    if [[ -L /etc/slurm/$f && $(readlink /etc/slurm/$f) == "$DIR/etc/$f" ]]; then
      rm -f "/etc/slurm/$f"
      [[ -e /etc/slurm/$f.qft-backup ]] && mv "/etc/slurm/$f.qft-backup" "/etc/slurm/$f"
    fi
  done
  rm -rf "$DIR"
  log "purged $DIR"
fi
exit 0
