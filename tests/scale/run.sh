#!/usr/bin/env bash
# `make bench-scale`: a simulated cluster on this machine, private to the
# benchmark. etcd, kube-apiserver, kube-controller-manager (the PV binder
# only) and kube-scheduler from tests/cluster's cached build, on ports and in
# a folder of their own ($SCALE_STATE); then tests/e2e's bench_scale program
# makes NODES kubelet-less Nodes, starts one real `stead node` agent per node
# (its own dir pool, CSI socket, metrics port), plays the kubelet's part
# (pods it is given are reported Running), creates the claims, measures and
# writes its section of docs/BENCHMARKS.md. Everything started here is
# stopped, and the state folder removed, on exit, failure or Ctrl-C; the logs
# of a failed run are kept in $SCALE_STATE.logs.
#
# NODES, WFFC, IMMEDIATE, NOISE: the size (default 100, 5000, 2000, 10000).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/scale/lib.sh
source "$here/lib.sh"
# pki.sh's helpers, writing into this bench's PKI.
# shellcheck disable=SC2034 # read by pki.sh
PKI=$SCALE_PKI
# shellcheck disable=SC2034 # read by pki.sh
APISERVER_URL=$SCALE_APISERVER_URL
# shellcheck source=tests/cluster/pki.sh
source "$here/../cluster/pki.sh"

export NODES=${NODES:-100} WFFC=${WFFC:-5000} IMMEDIATE=${IMMEDIATE:-2000} NOISE=${NOISE:-10000}
CARGO=${CARGO:-cargo}
target=${CARGO_TARGET_DIR:-$repo/target}

# stop_all: every process this run started (by its pid file), agents first,
# then the control plane in reverse; then the state folder.
stop_all() {
  local f name pid i
  if pid=$(scale_pid bench_scale); then kill -TERM "$pid" 2>/dev/null || true; fi
  for f in "$SCALE_PIDS"/stead.*.pid; do
    [[ -e $f ]] || continue
    name=$(basename "$f" .pid)
    if pid=$(scale_pid "$name"); then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for ((i = ${#SCALE_CONTROL_PLANE[@]} - 1; i >= 0; i--)); do
    name=${SCALE_CONTROL_PLANE[$i]}
    if pid=$(scale_pid "$name"); then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  # Each exits within seconds of SIGTERM; what is left after 10 s is killed.
  local deadline=$((SECONDS + 10)) left
  while :; do
    left=()
    for f in "$SCALE_PIDS"/*.pid; do
      [[ -e $f ]] || continue
      if pid=$(scale_pid "$(basename "$f" .pid)"); then left+=("$pid"); fi
    done
    ((${#left[@]})) || break
    if ((SECONDS >= deadline)); then
      kill -KILL "${left[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.2 # a poll: the loop checks its condition and deadline
  done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [[ -d $SCALE_STATE ]]; then
    if ((rc != 0)) && [[ -d $SCALE_LOGS ]]; then
      rm -rf "$SCALE_STATE.logs"
      cp -r "$SCALE_LOGS" "$SCALE_STATE.logs"
      slog "failed (exit $rc); logs kept in $SCALE_STATE.logs"
    fi
    rm -rf --one-file-system "$SCALE_STATE"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A run killed before its cleanup left processes: stop them first.
stop_all
rm -rf --one-file-system "$SCALE_STATE"

for port in "$SCALE_ETCD_CLIENT_PORT" "$SCALE_ETCD_PEER_PORT" "$SCALE_APISERVER_PORT" \
  "$SCALE_KCM_PORT" "$SCALE_SCHEDULER_PORT" $(seq $((SCALE_AGENT_PORT_BASE + 1)) $((SCALE_AGENT_PORT_BASE + NODES))); do
  ! ss -Hltn "sport = :$port" | grep -q . || sdie "port $port is in use; the bench needs it"
done
avail=$(df --output=avail -B1G / | tail -1)
# etcd, the pools and the logs of a full run take about 2 GiB; 10 stay free.
((avail >= 13)) || sdie "only ${avail} GiB free on /: the bench needs about 2 GiB and leaves 10 free"

# --- binaries -----------------------------------------------------------------
# Kubernetes and etcd: tests/cluster's cached build (nothing is built when cached).
"$here/../cluster/build.sh"
# SCALE_NO_BUILD=1: use release binaries already built, from $SCALE_BINARIES
# (default: the target folder), when another build holds cargo's lock.
built=${SCALE_BINARIES:-$target/release}
if [[ ${SCALE_NO_BUILD:-} == 1 ]]; then
  [[ -x $built/stead && -x $built/bench_scale ]] ||
    sdie "SCALE_NO_BUILD=1 but $built/{stead,bench_scale} are not built"
else
  slog "building the agent and the bench program (release)"
  [[ $built == "$target/release" ]] || sdie "SCALE_BINARIES is for SCALE_NO_BUILD=1"
  (cd "$repo" && "$CARGO" build --locked --release --bin stead &&
    "$CARGO" build --locked --release -p stead-e2e --bin bench_scale)
fi

mkdir -p "$SCALE_PKI" "$SCALE_LOGS" "$SCALE_PIDS" "$SCALE_STATE/nodes" "$SCALE_STATE/bin"
chmod 700 "$SCALE_PKI"
# Copies of what was just built: a target folder shared with other
# checkouts may get another build of the agent while the bench runs.
cp "$built/stead" "$built/bench_scale" "$SCALE_STATE/bin/"

# --- certificates ---------------------------------------------------------------
new_key "$SCALE_PKI/ca.key"
openssl req -x509 -new -key "$SCALE_PKI/ca.key" -subj "/CN=stead-scale-ca" -days 30 \
  -out "$SCALE_PKI/ca.crt" 2>/dev/null
issue kube-apiserver "/CN=kube-apiserver" serverAuth "DNS:localhost,IP:127.0.0.1"
issue admin "/O=system:masters/CN=stead-scale-admin" clientAuth
issue kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
issue kube-scheduler "/CN=system:kube-scheduler" clientAuth
issue agent "/O=stead-scale-agents/CN=stead-scale-agent" clientAuth
new_key "$SCALE_PKI/sa.key"
openssl pkey -in "$SCALE_PKI/sa.key" -pubout -out "$SCALE_PKI/sa.pub" 2>/dev/null
for c in kube-controller-manager kube-scheduler agent; do
  write_kubeconfig "$SCALE_STATE/$c.kubeconfig" "$c"
done
write_kubeconfig "$SCALE_KUBECONFIG" admin

# --- control plane ----------------------------------------------------------------
# A throw-away cluster: etcd skips fsync, as in tests/cluster.
scale_start etcd "$BIN/etcd" --name stead-scale --data-dir "$SCALE_STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$SCALE_ETCD_CLIENT_PORT" \
  --advertise-client-urls "http://127.0.0.1:$SCALE_ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$SCALE_ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$SCALE_ETCD_PEER_PORT" \
  --initial-cluster "stead-scale=http://127.0.0.1:$SCALE_ETCD_PEER_PORT" \
  --quota-backend-bytes $((8 * 1024 * 1024 * 1024)) \
  --unsafe-no-fsync --log-level warn
scale_wait etcd 30 curl -fsS --max-time 2 "http://127.0.0.1:$SCALE_ETCD_CLIENT_PORT/health"

# No Service network and no nodes to reach: the kubernetes Service's endpoint
# (which may not be loopback) is not maintained.
scale_start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$SCALE_ETCD_CLIENT_PORT" \
  --bind-address 127.0.0.1 --secure-port "$SCALE_APISERVER_PORT" \
  --endpoint-reconciler-type none \
  --tls-cert-file "$SCALE_PKI/kube-apiserver.crt" --tls-private-key-file "$SCALE_PKI/kube-apiserver.key" \
  --client-ca-file "$SCALE_PKI/ca.crt" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$SCALE_PKI/sa.pub" \
  --service-account-signing-key-file "$SCALE_PKI/sa.key" \
  --service-cluster-ip-range 10.97.0.0/16 \
  --authorization-mode Node,RBAC \
  --profiling=false --v=1
scale_wait kube-apiserver 90 curl -fsS --max-time 2 --cacert "$SCALE_PKI/ca.crt" \
  --cert "$SCALE_PKI/admin.crt" --key "$SCALE_PKI/admin.key" "$SCALE_APISERVER_URL/readyz"

kubectl_scale() { "$KUBECTL_BIN" --kubeconfig "$SCALE_KUBECONFIG" "$@"; }
kubectl_scale apply -f "$here/rbac.yaml" >/dev/null
kubectl_scale apply -f "$repo/deploy/base/csidriver.yaml" >/dev/null

# The PV binder is the one controller claims need; the node lifecycle
# controller is left out on purpose: nothing renews the kubelet-less nodes'
# Leases, and it would taint them unreachable after its grace period.
scale_start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$SCALE_STATE/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig "$SCALE_STATE/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig "$SCALE_STATE/kube-controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$SCALE_KCM_PORT" --leader-elect=false \
  --controllers persistentvolume-binder \
  --kube-api-qps 200 --kube-api-burst 400 \
  --profiling=false --v=1
sed "s|KUBECONFIG|$SCALE_STATE/kube-scheduler.kubeconfig|" "$here/scheduler.yaml" >"$SCALE_STATE/scheduler.yaml"
scale_start kube-scheduler "$BIN/kube-scheduler" --config "$SCALE_STATE/scheduler.yaml" \
  --authentication-kubeconfig "$SCALE_STATE/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig "$SCALE_STATE/kube-scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$SCALE_SCHEDULER_PORT" --profiling=false --v=1
scale_wait kube-controller-manager 60 curl -fsSk --max-time 2 "https://127.0.0.1:$SCALE_KCM_PORT/healthz"
scale_wait kube-scheduler 60 curl -fsSk --max-time 2 "https://127.0.0.1:$SCALE_SCHEDULER_PORT/healthz"
slog "control plane up on $SCALE_APISERVER_URL (state in $SCALE_STATE)"

# --- the benchmark -----------------------------------------------------------------
export SCALE_STATE SCALE_AGENT_PORT_BASE
KUBECONFIG=$SCALE_KUBECONFIG \
  STEAD_BIN=$SCALE_STATE/bin/stead \
  SCALE_AGENT_KUBECONFIG=$SCALE_STATE/agent.kubeconfig \
  SCALE_APISERVER_PID=$(scale_pid kube-apiserver) \
  SCALE_ETCD_PID=$(scale_pid etcd) \
  SCALE_KCM_PID=$(scale_pid kube-controller-manager) \
  SCALE_SCHEDULER_PID=$(scale_pid kube-scheduler) \
  SCALE_K8S_VERSION=$STEAD_K8S_VERSION \
  "$SCALE_STATE/bin/bench_scale" &
# In the background, with its pid file: bash runs a trap only once the
# foreground command ends, and a TERM sent to this script alone must stop
# the bench too (stop_all stops it first).
echo $! >"$SCALE_PIDS/bench_scale.pid"
wait $!
