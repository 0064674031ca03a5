#!/usr/bin/env bash
# Start a real single-node SLURM cluster (slurm-wlm 22.05 + munge [+ MariaDB + slurmdbd]) on this machine,
# for CI and for trying the SLURM profile locally. Idempotent: daemons already running are left alone.
#
# Needs root, Debian/Ubuntu (apt-get), no systemd, no cgroups. See ci/slurm/README.md.
#
# Settings (environment):
#   QFT_SLURM_DIR          state/spool/log/config dir            (default /tmp/qft-slurm)
#   QFT_SLURM_ACCOUNTING   none | slurmdbd                      (default: what the last start used, else none.
#                          none: no MariaDB, Snakemake polls with squeue (see README); slurmdbd: MariaDB +
#                          slurmdbd, so that sacct works too)
#   QFT_SLURM_MEM_FRACTION fraction of RAM given to the node      (default 0.85)
#   QFT_SLURM_DEF_MEM_PER_CPU  DefMemPerCPU in MB                 (default 1024)
#   QFT_SLURM_CLUSTER      ClusterName                            (default ci)
#   QFT_SLURM_PARTITION    name of the (default) partition        (default debug)
#
# The config is written to $QFT_SLURM_DIR/etc and linked from /etc/slurm/{slurm,slurmdbd}.conf so that
# sbatch/squeue/sacct (and Snakemake's SLURM plugin) find it without SLURM_CONF.
set -euo pipefail

T0=$EPOCHREALTIME
DIR=${QFT_SLURM_DIR:-/tmp/qft-slurm}
ACCOUNTING=${QFT_SLURM_ACCOUNTING:-}
if [[ -z $ACCOUNTING ]]; then   # unset: keep what an earlier start chose (the test fixture calls us again)
  ACCOUNTING=none
  grep -qs '^AccountingStorageType=accounting_storage/slurmdbd' "$DIR/etc/slurm.conf" && ACCOUNTING=slurmdbd
fi
MEM_FRACTION=${QFT_SLURM_MEM_FRACTION:-0.85}
DEF_MEM_PER_CPU=${QFT_SLURM_DEF_MEM_PER_CPU:-1024}
CLUSTER=${QFT_SLURM_CLUSTER:-ci}
PARTITION=${QFT_SLURM_PARTITION:-debug}
DB_PASS=qftslurm   # local-only MariaDB user on a throw-away CI machine

log() { printf '[qft-slurm %6.1fs] %s\n' "$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')" "$*"; }
die() { log "ERROR: $*"; exit 1; }

[[ $(uname -s) == Linux ]] || die "Linux only"
[[ $(id -u) == 0 ]] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"
case $ACCOUNTING in slurmdbd|none) ;; *) die "QFT_SLURM_ACCOUNTING must be slurmdbd or none" ;; esac

# one start.sh at a time (two test sessions starting together); daemons are started with 9>&- so that
# they do not inherit (and hold) the lock
exec 9>"${DIR%/}.lock"
timeout 900 flock 9 || die "another ci/slurm/start.sh holds ${DIR%/}.lock"

# ---------------------------------------------------------------- packages
PKGS=(slurm-wlm munge)
[[ $ACCOUNTING == slurmdbd ]] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # keep package scripts from starting daemons with the stock config (no systemd here anyway)
  policy_created=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_created=1
  fi
  apt_install() { timeout 600 apt-get install -y -q --no-install-recommends "${missing[@]}" >"/tmp/qft-slurm-apt.log" 2>&1; }
  if ! apt_install; then
    log "apt-get install failed; running apt-get update and retrying"
    timeout 300 apt-get update -q >>/tmp/qft-slurm-apt.log 2>&1 || true
    apt_install || { ((policy_created)) && rm -f /usr/sbin/policy-rc.d; tail -20 /tmp/qft-slurm-apt.log; die "apt-get install failed"; }
  fi
  ((policy_created)) && rm -f /usr/sbin/policy-rc.d
  log "installed"
else
  log "packages present: ${PKGS[*]}"
fi

# ---------------------------------------------------------------- config
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk -v f="$MEM_FRACTION" '/^MemTotal:/ {printf "%d", $2 / 1024 * f}' /proc/meminfo)
mkdir -p "$DIR"/{etc,state,spool,log,run}
chown -R slurm:slurm "$DIR"/{state,log,run}
chmod 755 "$DIR" "$DIR"/etc

if [[ $ACCOUNTING == slurmdbd ]]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi

new_conf=$(cat <<EOF
# written by qftbench ci/slurm/start.sh -- single-node CI cluster
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
JobAcctGatherType=jobacct_gather/linux
$ACCT_LINES
AccountingStoreFlags=job_comment
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
conf_changed=0
if [[ ! -f $DIR/etc/slurm.conf ]] || [[ "$(cat "$DIR/etc/slurm.conf")" != "$new_conf" ]]; then
  printf '%s\n' "$new_conf" >"$DIR/etc/slurm.conf"; conf_changed=1
fi
chmod 644 "$DIR/etc/slurm.conf"

if [[ $ACCOUNTING == slurmdbd ]]; then
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
EOF
  chown slurm:slurm "$DIR/etc/slurmdbd.conf"; chmod 600 "$DIR/etc/slurmdbd.conf"
fi

# link /etc/slurm/*.conf to ours (a foreign file is kept as *.qft-backup)
mkdir -p /etc/slurm
for f in slurm.conf slurmdbd.conf; do
  [[ -f $DIR/etc/$f ]] || continue
  target=/etc/slurm/$f
  if [[ -L $target ]]; then
    [[ $(readlink "$target") == "$DIR/etc/$f" ]] || ln -sfn "$DIR/etc/$f" "$target"
  else
    [[ -e $target ]] && mv "$target" "$target.qft-backup"
    ln -s "$DIR/etc/$f" "$target"
  fi
done
export SLURM_CONF=/etc/slurm/slurm.conf
log "config: host=$HOST cpus=$CPUS RealMemory=${MEM_MB}MB DefMemPerCPU=${DEF_MEM_PER_CPU} accounting=$ACCOUNTING dir=$DIR"

# process is alive and is the named program
pid_alive() { # pidfile name
  [[ -s $1 ]] || return 1
  local pid; pid=$(cat "$1" 2>/dev/null) || return 1
  [[ -n $pid && -r /proc/$pid/comm && $(cat "/proc/$pid/comm") == "$2" ]]
}
wait_for() { # seconds description command...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- munge
if timeout 5 munge -n </dev/null 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  if [[ ! -s /etc/munge/munge.key ]]; then
    install -d -o munge -g munge -m 700 /etc/munge
    if command -v mungekey >/dev/null; then timeout 30 mungekey --create --keyfile=/etc/munge/munge.key --force
    else timeout 30 dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  timeout 20 runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1 9>&-
  wait_for 20 munged bash -c 'munge -n </dev/null | unmunge'
  log "munged started"
fi

# ---------------------------------------------------------------- MariaDB + slurmdbd
if [[ $ACCOUNTING == slurmdbd ]]; then
  if timeout 10 mariadb -e 'SELECT 1' >/dev/null 2>&1; then
    log "mariadb already running"
  else
    timeout 90 /etc/init.d/mariadb start </dev/null >"$DIR/log/mariadb-start.log" 2>&1 9>&- \
      || { cat "$DIR/log/mariadb-start.log"; die "mariadb did not start"; }
    wait_for 60 mariadb timeout 5 mariadb -e 'SELECT 1'
    log "mariadb started"
  fi
  timeout 30 mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  if pid_alive "$DIR/run/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running"
  else
    timeout 30 /usr/sbin/slurmdbd </dev/null >>"$DIR/log/slurmdbd.out" 2>&1 9>&-
    wait_for 60 slurmdbd timeout 5 sacctmgr -n list cluster
    log "slurmdbd started"
  fi
  if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "cluster '$CLUSTER' added to the accounting database"
  fi
fi

# ---------------------------------------------------------------- slurmctld + slurmd
stop_daemon() { # pidfile name -- TERM, then up to 20 s, then KILL
  local pid; pid=$(cat "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do [[ -d /proc/$pid ]] || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
if ((conf_changed)); then
  # some settings (AccountingStorageType, node sizes) need a restart, not `scontrol reconfigure`;
  # jobs survive it (state is saved in $DIR/state)
  for d in slurmd slurmctld; do
    if pid_alive "$DIR/run/$d.pid" $d; then stop_daemon "$DIR/run/$d.pid"; log "$d stopped (config changed)"; fi
  done
fi
if pid_alive "$DIR/run/slurmctld.pid" slurmctld; then
  log "slurmctld already running"
else
  timeout 30 /usr/sbin/slurmctld </dev/null >>"$DIR/log/slurmctld.out" 2>&1 9>&-
  wait_for 30 slurmctld timeout 5 scontrol ping
  log "slurmctld started"
fi
if pid_alive "$DIR/run/slurmd.pid" slurmd; then
  log "slurmd already running"
else
  timeout 30 /usr/sbin/slurmd </dev/null >>"$DIR/log/slurmd.out" 2>&1 9>&-
  log "slurmd started"
fi

# ---------------------------------------------------------------- wait until usable
node_up() {
  local st; st=$(timeout 5 sinfo -h -N -n "$HOST" -o %T 2>/dev/null) || return 1
  case $st in idle*|mixed*|allocated*|completing*) return 0 ;; esac
  # a node left down/drained by an earlier run: resume it
  case $st in down*|drain*) timeout 5 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;; esac
  return 1
}
wait_for 60 "node $HOST to become idle" node_up
out=$(timeout 60 srun -N1 -n1 -t 1 --mem=100 hostname 2>&1) || die "srun hostname failed: $out"
log "srun hostname -> $out"
timeout 5 sinfo
log "SLURM ready (export SLURM_CONF=/etc/slurm/slurm.conf is implied by the /etc/slurm links)"
