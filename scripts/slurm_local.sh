#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, to try slurm/prune_large.sh (and to
# test it) without a cluster: one slurmctld and two slurmd daemons, nodes n1 and n2, both
# on 127.0.0.1, each with one CPU and no GPU.
#
#   sudo scripts/slurm_local.sh start    # install if missing, configure, start, wait idle
#   scripts/slurm_local.sh status        # daemons and sinfo; exit 1 when not running
#   sudo scripts/slurm_local.sh stop     # stop the daemons this script started
#   export SLURM_CONF=/tmp/capscale-slurm/slurm.conf   # for sbatch / squeue / scontrol
#
# Environment:
#   CAPSCALE_SLURM_DIR   state folder: config, munge key, logs, spool (/tmp/capscale-slurm)
#   CAPSCALE_SLURM_PORT  slurmctld port; the nodes use the next two (default 17000)
#
# Needs root (slurmd starts jobs as their user; munged and /etc/hosts are system-wide).
# Installs Debian/Ubuntu's slurm-wlm and munge with apt-get where they are missing.
# Both "nodes" share this machine's cores and memory: size jobs for one core each.
# `start` and `stop` are idempotent; `start` on a running cluster only waits for it.
set -euo pipefail

STATE=${CAPSCALE_SLURM_DIR:-/tmp/capscale-slurm}
PORT=${CAPSCALE_SLURM_PORT:-17000}
CONF=$STATE/slurm.conf
NODES=(n1 n2)
export SLURM_CONF=$CONF

die() { echo "slurm_local.sh: $*" >&2; exit 1; }
log() { echo "slurm_local.sh: $*"; }

# A daemon is ours and alive when its pid file names a live process of that program.
alive() {  # alive <pid file> <program name>
  local pid
  [[ -f "$1" ]] || return 1
  pid=$(<"$1")
  [[ -n "$pid" && -r /proc/$pid/comm && "$(</proc/"$pid"/comm)" == "$2"* ]]
}

install_missing() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  for prog in slurmctld slurmd sbatch; do
    command -v "$prog" >/dev/null || { missing+=(slurm-wlm); break; }
  done
  ((${#missing[@]} == 0)) && return 0
  [[ $EUID -eq 0 ]] || die "${missing[*]} not installed and not root: install them" \
    "(apt-get install slurm-wlm munge) or run this as root"
  command -v apt-get >/dev/null || die "${missing[*]} not installed and no apt-get here:" \
    "install Slurm and munge with your package manager"
  log "installing ${missing[*]} with apt-get (about 30 s)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || die "apt-get update failed (no package mirror reachable?)"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  # Slurm authenticates every message through the local munged (default socket). One
  # already answering there (the system's) serves as well: all daemons share this host.
  munge_ok && return 0
  if [[ ! -s $STATE/munge.key ]]; then
    dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$STATE/munge.key"  # munged refuses a key others can read
  mkdir -p /run/munge
  if id munge >/dev/null 2>&1; then chown munge:munge /run/munge; fi
  # --force: munged refuses to run as root otherwise.
  /usr/sbin/munged --force --key-file="$STATE/munge.key" --pid-file="$STATE/munged.pid" \
    --log-file="$STATE/log/munged.log" --seed-file="$STATE/munged.seed" \
    || die "munged did not start; see $STATE/log/munged.log"
  for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  die "munge does not answer; see $STATE/log/munged.log"
}

write_conf() {
  local host mem_mb
  host=$(hostname -s)
  # Half the machine's memory per node, less a margin: slurmd drains a node that
  # claims more than the machine has.
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.45)}' /proc/meminfo)
  # Two slurmd on one host need their own pid / log / spool (%n = node name) and ports.
  cat > "$CONF.tmp" <<EOF
# Written by capscale scripts/slurm_local.sh: two nodes on this machine.
ClusterName=capscale-local
SlurmctldHost=$host
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdSpoolDir=$STATE/spool/%n
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
# Fast turnaround for small jobs: SIGKILL 5 s after SIGTERM, finished jobs stay
# visible to scontrol for 10 min.
KillWait=5
MinJobAge=600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 1)) CPUs=1 RealMemory=$mem_mb State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((PORT + 2)) CPUs=1 RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.tmp" "$CONF"
  # Client commands read /etc/slurm/slurm.conf unless SLURM_CONF is set: point it here
  # when the machine has no Slurm config of its own.
  if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -sfn "$CONF" /etc/slurm/slurm.conf
  fi
}

hosts_line() {
  # Job scripts take the head node's name from `scontrol show hostnames` and connect to
  # it (rendezvous), so the node names must resolve.
  local n
  for n in "${NODES[@]}"; do
    getent hosts "$n" >/dev/null && continue
    echo "127.0.0.1 ${NODES[*]}  # capscale scripts/slurm_local.sh" >> /etc/hosts
    return
  done
}

idle_nodes() { sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | sort -u | wc -l; }

wait_idle() {
  local i
  for i in $(seq 120); do
    (($(idle_nodes) == ${#NODES[@]})) && { log "up: $(sinfo -h -o '%P %a %D %t %N')"; return; }
    # A node left down / drained by an earlier run comes back on request.
    if ((i % 20 == 0)); then scontrol update NodeName=n1,n2 State=RESUME 2>/dev/null || true; fi
    sleep 0.5
  done
  sinfo >&2 || true
  die "nodes not idle after 60 s; see $STATE/log/"
}

start() {
  [[ $EUID -eq 0 ]] || die "start needs root (slurmd, munged, /etc/hosts)"
  install_missing
  mkdir -p "$STATE"/{state,log} "$STATE"/spool/{n1,n2}
  chmod 755 "$STATE"
  hosts_line
  start_munge
  if ! alive "$STATE/slurmctld.pid" slurmctld; then
    write_conf
    # -c: start from an empty queue, not jobs left over from an earlier session.
    /usr/sbin/slurmctld -c -f "$CONF" || die "slurmctld did not start; see $STATE/log"
  fi
  local n
  for n in "${NODES[@]}"; do
    if ! alive "$STATE/slurmd-$n.pid" slurmd; then
      /usr/sbin/slurmd -f "$CONF" -N "$n" || die "slurmd $n did not start; see $STATE/log"
    fi
  done
  wait_idle
  echo "export SLURM_CONF=$CONF"
}

stop() {
  local f pids=() pid
  for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [[ -f "$f" ]] || continue
    pid=$(<"$f")
    if [[ -n "$pid" ]] && kill "$pid" 2>/dev/null; then pids+=("$pid"); fi
  done
  for _ in $(seq 100); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    ((left == 0)) && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"
  log "stopped (${#pids[@]} daemon(s))"
}

status() {
  local ok=0 n
  alive "$STATE/slurmctld.pid" slurmctld && echo "slurmctld: running" \
    || { echo "slurmctld: stopped"; ok=1; }
  for n in "${NODES[@]}"; do
    alive "$STATE/slurmd-$n.pid" slurmd && echo "slurmd $n: running" \
      || { echo "slurmd $n: stopped"; ok=1; }
  done
  if ((ok == 0)); then sinfo; echo "export SLURM_CONF=$CONF"; fi
  return $ok
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
