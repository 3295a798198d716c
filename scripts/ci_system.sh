#!/usr/bin/env bash
# CI's system stage: a real one-node SLURM cluster on this machine (Debian's slurmctld, slurmd, munge), then the
# system tests (`pytest -m system`: two node processes over loopback, real sbatch / requeue, ...).
#
#   sudo scripts/ci_system.sh            # as root; idempotent: a second call reuses the running daemons
#   SLURM_ONLY=1 scripts/ci_system.sh    # set the cluster up and stop (no tests)
#
# The cluster: SlurmctldHost and the one node on 127.0.0.1, CPUs as this machine has, proctrack/linuxproc and
# task/none (no cgroups in a container), no accounting database (jobs are followed with scontrol; finished jobs stay
# visible for MinJobAge), JobRequeue=1. A daemon that does not come up fails the stage with its log.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
HOST="$(hostname -s)"
CPUS="$(nproc)"

say() { echo "ci_system: $*" >&2; }
die() {
    say "$1"
    for f in "$LOGS"/slurmctld.log "$LOGS"/slurmd.log /var/log/munge/munged.log; do
        [ -f "$f" ] && { echo "---- $f (last 40 lines)" >&2; tail -n 40 "$f" >&2; }
    done
    exit 1
}

if [ "$(id -u)" != 0 ]; then say "needs root (installs and starts the SLURM daemons)"; exit 1; fi

# 1. the packages (skipped when present)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install of slurmctld slurmd slurm-client munge failed"
fi

# 2. munge: a key (the package makes one; made here if it did not), then the daemon
mkdir -p /etc/munge /var/log/munge /var/lib/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /var/log/munge /var/lib/munge /run/munge
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force || die "munged did not start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munged is not answering (munge -n | unmunge)"
fi

# 3. slurm.conf (rewritten only when it differs: the daemons are restarted then)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGS"
WANT="$(cat <<EOF
# written by aligntool's scripts/ci_system.sh: a one-node cluster on this machine
ClusterName=aligntool-ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=20
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGS}/slurmctld.log
SlurmdLogFile=${LOGS}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# one line per finished or requeued job, with its exit code (there is no accounting database for sacct)
JobCompType=jobcomp/filetxt
JobCompLoc=${LOGS}/jobcomp.log
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MinJobAge=3600
ReturnToService=2
KillWait=30
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
EOF
)"
restart=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$WANT" ]; then
    printf '%s\n' "$WANT" > "$CONF"
    restart=1
fi

# a pid file left by daemons a previous session's end killed may name a reused pid: the process must be a slurm one
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && grep -q '^slurm' "/proc/$(cat "$1")/comm" 2>/dev/null; }
stop() {  # by the daemon's own pid file
    if running "$1"; then kill "$(cat "$1")"; for _ in $(seq 50); do running "$1" || break; sleep 0.1; done; fi
}
if [ "$restart" = 1 ]; then stop /run/slurmd.pid; stop /run/slurmctld.pid; fi

# 4. the daemons
if ! running /run/slurmctld.pid; then
    /usr/sbin/slurmctld -i || die "slurmctld did not start"
fi
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld is not answering (scontrol ping)"
if ! running /run/slurmd.pid; then
    /usr/sbin/slurmd || die "slurmd did not start"
fi
state=""
for _ in $(seq 150); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)"
    case "$state" in idle*|mixed*|allocated*) break ;; esac
    case "$state" in down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;; esac
    sleep 0.2
done
case "$state" in idle*|mixed*|allocated*) ;; *) die "node $HOST is '$state', not idle, in sinfo" ;; esac
say "SLURM up: $(sinfo -h -o '%P %D %T %c' | head -n 1) (node $HOST, $CPUS CPUs)"

[ "${SLURM_ONLY:-0}" = 1 ] && exit 0

# 5. the system tests
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m pytest -m system -n 0 -q "$@"
