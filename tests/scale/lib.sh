# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Settings of the scale benchmark's private control plane. Sourced after
# tests/cluster/lib.sh, whose cached Kubernetes binaries ($BIN) it runs.
#
# Nothing here may meet the bundled cluster of tests/cluster while it runs:
# other ports (it uses 2379/2380, 6443 on 10.99.0.1, 10257, 10259, 10262),
# another state folder (it uses /tmp/stead-cluster), no network namespaces,
# no mounts, no lock of its own.

SCALE_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCALE_STATE=${STEAD_SCALE_DIR:-/var/lib/stead-scale}
SCALE_PKI=$SCALE_STATE/pki
SCALE_LOGS=$SCALE_STATE/logs
SCALE_PIDS=$SCALE_STATE/pids
SCALE_KUBECONFIG=$SCALE_STATE/admin.kubeconfig

SCALE_ETCD_CLIENT_PORT=32379
SCALE_ETCD_PEER_PORT=32380
SCALE_APISERVER_PORT=36443
SCALE_APISERVER_URL=https://127.0.0.1:$SCALE_APISERVER_PORT
SCALE_KCM_PORT=30257
SCALE_SCHEDULER_PORT=30259
# Agent I (from 1) serves /metrics on 127.0.0.1:$((SCALE_AGENT_PORT_BASE + I)).
SCALE_AGENT_PORT_BASE=31000

SCALE_CONTROL_PLANE=(etcd kube-apiserver kube-controller-manager kube-scheduler)

slog() { printf '[bench-scale] %s\n' "$*" >&2; }
sdie() { printf '[bench-scale] error: %s\n' "$*" >&2; exit 1; }

# scale_pid NAME: the pid in pids/NAME.pid if that process still runs the
# program the file is named after (for agents, stead.<i>, the part before the
# first '.'); a recycled pid is never signalled.
scale_pid() {
  local name=$1 pid exe want
  [[ -r $SCALE_PIDS/$name.pid ]] || return 1
  pid=$(<"$SCALE_PIDS/$name.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)}
  want=${name%%.*}
  [[ ${exe##*/} == "$want" ]] || return 1
  echo "$pid"
}

# Starts a control-plane component in its own session, output in logs/.
scale_start() {
  local name=$1
  shift
  setsid "$@" >"$SCALE_LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$SCALE_PIDS/$name.pid"
}

# scale_wait NAME SECONDS CMD...: runs CMD until it succeeds (a health probe);
# fails with the component's log if it dies or the time runs out.
scale_wait() {
  local name=$1 limit=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if ! scale_pid "$name" >/dev/null; then
      tail -n 30 "$SCALE_LOGS/$name.log" >&2 || true
      sdie "$name exited (log above)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$SCALE_LOGS/$name.log" >&2 || true
      sdie "$name not healthy after $limit s (log above)"
    fi
    sleep 0.5 # a poll: the loop checks its condition and deadline
  done
}
