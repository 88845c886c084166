# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Shared settings and helpers of the local cluster scripts. Sourced, not run.

STEAD_K8S_VERSION=v1.34.4
STEAD_ETCD_VERSION=v3.6.16

CLUSTER_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STEAD_CACHE=${STEAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stead}
# Everything built lives here, keyed by the Kubernetes release.
STEAD_K8S_CACHE=${STEAD_K8S_CACHE:-$STEAD_CACHE/k8s-$STEAD_K8S_VERSION}
BIN=$STEAD_K8S_CACHE/bin
KUBECTL_BIN=$BIN/kubectl

STATE=${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}
LOGS=$STATE/logs
PIDS=$STATE/pids
PKI=$STATE/pki
KUBECONFIG_ADMIN=$STATE/kubeconfig

NODE_NAME=stead-node
KUBELET_DIR=/var/lib/kubelet
# The cluster's own containerd: its own root, state and socket, so that a
# containerd the machine may run already is left alone. Its root is outside
# the state folder so that imported images outlive a cluster-down.
CONTAINERD_ROOT=/var/lib/stead-containerd
CONTAINERD_STATE=/run/stead-containerd
CONTAINERD_SOCK=$CONTAINERD_STATE/containerd.sock
CNI_BIN_DIR=/usr/lib/cni

# Addresses. The node's address lives on a bridge of its own with no ports
# (this kernel has no dummy links): pods reach the apiserver through the
# kubernetes Service, whose endpoint can be neither loopback nor link-local,
# and nothing listens on the machine's real interface.
NODE_LINK=stead0
NODE_IP=10.99.0.1
POD_BRIDGE=stead-pods0
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
APISERVER_PORT=6443
APISERVER_URL=https://$NODE_IP:$APISERVER_PORT
ETCD_CLIENT_PORT=2379
ETCD_PEER_PORT=2380

BUSYBOX_IMAGE=localhost/busybox:stead
PAUSE_IMAGE=localhost/pause:stead

K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
# In start order; cluster-down stops them in reverse.
COMPONENTS=(etcd containerd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

# sha256 of the given files' contents, names included: the key of a cached build.
content_key() {
  sha256sum "$@" | sha256sum | cut -c1-16
}

kubectl_admin() {
  "$KUBECTL_BIN" --kubeconfig "$KUBECONFIG_ADMIN" "$@"
}

ctr_k8s() {
  ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"
}

# The pid of a component this cluster started, if it still runs: the pid file
# must name a live process whose executable is the component's own, so that a
# recycled pid never gets a signal from us.
component_pid() {
  local name=$1 pid exe
  [[ -r $PIDS/$name.pid ]] || return 1
  pid=$(<"$PIDS/$name.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)} # the binary was rebuilt while it ran
  [[ ${exe##*/} == "$name" ]] || return 1
  echo "$pid"
}

# Starts a component in its own session with its output in logs/<name>.log.
start_component() {
  local name=$1
  shift
  # fd 9 is the cluster lock: a long-lived component must not inherit it.
  setsid "$@" >"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$PIDS/$name.pid"
}

# Prints why a component failed: its state and the last 30 lines of its log.
component_failed() {
  local name=$1 why=$2
  printf '[cluster] error: %s %s; last 30 lines of %s:\n' "$name" "$why" "$LOGS/$name.log" >&2
  tail -n 30 "$LOGS/$name.log" >&2 2>/dev/null || true
  exit 1
}

# wait_healthy NAME SECONDS CMD...: runs CMD until it succeeds; fails with the
# component's log if the process dies or the time runs out.
wait_healthy() {
  local name=$1 limit=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    component_pid "$name" >/dev/null || component_failed "$name" "exited"
    ((SECONDS < deadline)) || component_failed "$name" "not healthy after ${limit} s"
    sleep 0.5
  done
}

# Plain HTTP(S) probe of a health endpoint.
probe() {
  curl -fsS --max-time 2 "$@"
}

probe_apiserver() {
  curl -fsS --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "$APISERVER_URL/$1"
}

# Kills and removes every container of the cluster's containerd (k8s.io
# namespace), then the network namespaces of their pods.
sweep_containers() {
  local ids=() id netns=()
  mapfile -t ids < <(ctr_k8s containers list --quiet 2>/dev/null)
  ((${#ids[@]})) || return 0
  for id in "${ids[@]}"; do
    mapfile -t -O "${#netns[@]}" netns < <(ctr_k8s containers info "$id" 2>/dev/null |
      grep -o '"/var/run/netns/cni-[0-9a-f-]*"' | tr -d '"')
    ctr_k8s tasks delete --force "$id" >/dev/null 2>&1 || true
  done
  ctr_k8s containers delete "${ids[@]}" >/dev/null 2>&1 || true
  local ns
  for ns in $(printf '%s\n' "${netns[@]}" | sort -u); do
    umount "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
}

# Unmounts every mount below a folder, deepest first.
unmount_below() {
  local dir=$1 mounts m
  for _ in 1 2 3 4 5; do
    mapfile -t mounts < <(findmnt -rn -o TARGET | grep "^$dir/" | sort -r)
    ((${#mounts[@]})) || return 0
    for m in "${mounts[@]}"; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  done
  findmnt -rn -o TARGET | grep "^$dir/" >/dev/null && log "warning: mounts left below $dir"
  return 0
}

# One cluster-up or cluster-down at a time on this machine: several people
# and test suites share the one cluster. up.sh runs down.sh under its lock.
take_cluster_lock() {
  [[ -n ${STEAD_CLUSTER_LOCKED:-} ]] && return 0
  exec 9>/run/lock/stead-cluster.lock
  if ! flock --nonblock 9; then
    log "another cluster-up or cluster-down is running; waiting for it (up to 5 min)"
    flock --timeout 300 9 || die "still locked after 5 min: /run/lock/stead-cluster.lock"
  fi
  export STEAD_CLUSTER_LOCKED=1
}
