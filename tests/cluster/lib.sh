# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Shared settings and helpers of the local cluster scripts. Sourced, not run.

STEAD_K8S_VERSION=v1.34.4
STEAD_ETCD_VERSION=v3.6.16
# kubernetes-csi/external-snapshotter: the snapshot-controller and the
# VolumeSnapshot CRDs of one release (go/snapshotter/go.mod pins the same).
STEAD_SNAPSHOTTER_VERSION=v8.7.0

CLUSTER_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STEAD_CACHE=${STEAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/stead}
# Everything built lives here, keyed by the Kubernetes release.
STEAD_K8S_CACHE=${STEAD_K8S_CACHE:-$STEAD_CACHE/k8s-$STEAD_K8S_VERSION}
BIN=$STEAD_K8S_CACHE/bin
KUBECTL_BIN=$BIN/kubectl
# The VolumeSnapshot CRDs of STEAD_SNAPSHOTTER_VERSION, beside bin/.
CRD_DIR=$STEAD_K8S_CACHE/crds
SNAPSHOT_CRDS=(volumesnapshotclasses volumesnapshotcontents volumesnapshots)

STATE=${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}
LOGS=$STATE/logs
PIDS=$STATE/pids
PKI=$STATE/pki
KUBECONFIG_ADMIN=$STATE/kubeconfig

# Nodes. Each node is a set of namespaces on this machine, as a kind node is
# a container: its own network namespace (named after the node), its own
# mount namespace (a file in $MNTNS_DIR) in which the node's folders are
# bind-mounted at the standard paths, its own containerd, kubelet, kube-proxy
# and cgroup root. STEAD_NODES: how many (default 3); names stead-node-1..N.
STEAD_NODES=${STEAD_NODES:-3}
NODE_PREFIX=stead-node-
NODES_DIR=$STATE/nodes
MNTNS_DIR=/run/stead-cluster/mnt
ZONES=(zone-a zone-b zone-c)
# Size of each node's own disk (a sparse xfs image under $NODES_DIR, mounted
# at the node's /var/lib/stead): each node has its own free space, as real
# nodes do, so capacity differs between nodes.
NODE_DISK_SIZE=${STEAD_NODE_DISK_SIZE:-8G}
# Each node's btrfs disk (the dir-btrfs pool of the e2e overlay).
NODE_BTRFS_SIZE=${STEAD_NODE_BTRFS_SIZE:-1G}

# The standard paths inside a node, and the folders behind them.
KUBELET_DIR=/var/lib/kubelet
STEAD_DIR=/var/lib/stead
CONTAINERD_ROOT=/var/lib/containerd
CONTAINERD_STATE=/run/containerd
CONTAINERD_SOCK=$CONTAINERD_STATE/containerd.sock
# A node's containerd root is kept outside the cluster state, so that the
# images imported into it outlive a cluster-down.
CONTAINERD_ROOTS=/var/lib/stead-containerd
CNI_BIN_DIR=/usr/lib/cni

# Addresses. The control plane listens on the host's end of a bridge with no
# other ports than the nodes' veths (this kernel has no dummy links): pods
# reach the apiserver through the kubernetes Service, whose endpoint can be
# neither loopback nor link-local; nothing listens on the machine's real
# interface, and nothing from the bridge is forwarded past the machine.
HOST_LINK=stead0
HOST_IP=10.99.0.1
NODE_NET=10.99.0.0/24
POD_CIDR=10.88.0.0/16
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
APISERVER_PORT=6443
APISERVER_URL=https://$HOST_IP:$APISERVER_PORT
ETCD_CLIENT_PORT=2379
ETCD_PEER_PORT=2380
# The snapshot-controller's diagnostics (metrics, leader-election health).
SNAPSHOT_CONTROLLER_ADDR=127.0.0.1:10262
# Its leader-election Lease (upstream's fixed name) and that Lease's namespace.
SNAPSHOT_CONTROLLER_LEASE=snapshot-controller-leader
SNAPSHOT_CONTROLLER_LEASE_NS=kube-system

# node_name I, node_ip I, node_pod_cidr I, node_zone I (I from 1).
node_name() { echo "$NODE_PREFIX$1"; }
node_ip() { echo "10.99.0.$((10 + $1))"; }
# A /20 per node (4094 pods): 10.88.16.0/20, 10.88.32.0/20, ...
node_pod_cidr() { echo "10.88.$((16 * $1)).0/20"; }
node_zone() { echo "${ZONES[$((($1 - 1) % ${#ZONES[@]}))]}"; }
node_dir() { echo "$NODES_DIR/$(node_name "$1")"; }
node_mntns() { echo "$MNTNS_DIR/$(node_name "$1")"; }
# The node's containerd socket as seen from the host.
node_containerd_sock() { echo "$(node_dir "$1")/containerd-state/containerd.sock"; }
# The node indexes of the cluster that runs (or ran) here, else 1..STEAD_NODES.
node_indexes() {
  local n
  if [[ -r $STATE/nodes.count ]]; then n=$(<"$STATE/nodes.count"); else n=$STEAD_NODES; fi
  seq 1 "$n"
}
# node_mnt_pids I: the processes in node I's mount namespace (its
# components and containerd's shims), never the host's own.
node_mnt_pids() {
  local id p
  id=$(stat -L -c %d:%i "$(node_mntns "$1")" 2>/dev/null) || return 0
  [[ $id == "$(stat -L -c %d:%i /proc/self/ns/mnt)" ]] && return 0
  for p in /proc/[0-9]*; do
    [[ $(stat -L -c %d:%i "$p/ns/mnt" 2>/dev/null) == "$id" ]] && echo "${p#/proc/}"
  done
  return 0
}

BUSYBOX_IMAGE=localhost/busybox:stead
PAUSE_IMAGE=localhost/pause:stead

K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)
# The control plane's processes (the snapshot-controller among them, as a
# cluster's add-on controller), and those of each node (pid file and log
# named <node>.<component>).
CONTROL_PLANE=(etcd kube-apiserver kube-controller-manager kube-scheduler snapshot-controller)
NODE_COMPONENTS=(containerd kubelet kube-proxy)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] error: %s\n' "$*" >&2; exit 1; }

# The cluster's state, kubelet's and containerd's roots and Stead's pools all
# live on the machine's disk; kubelet evicts pods below 1 GiB free there
# (evictionHard in up.sh), and the suites write a few GiB. Stop with a clear
# message before that, naming the filesystem and what is free on it.
CLUSTER_MIN_FREE_GIB=${CLUSTER_MIN_FREE_GIB:-6}
check_free_space() {
  local dir avail_kib
  for dir in "$(dirname "$STATE")" /var/lib; do
    avail_kib=$(df --output=avail -k "$dir" | tail -n 1 | tr -d ' ')
    if ((avail_kib < CLUSTER_MIN_FREE_GIB * 1024 * 1024)); then
      die "only $((avail_kib / 1024)) MiB free on the filesystem of $dir; the cluster needs at least ${CLUSTER_MIN_FREE_GIB} GiB (kubelet evicts pods below 1 GiB). Free some space (df -h $dir) or set CLUSTER_MIN_FREE_GIB."
    fi
  done
  log "free space: $(df -h --output=avail "$(dirname "$STATE")" | tail -n 1 | tr -d ' ') on $(dirname "$STATE"), $(df -h --output=avail /var/lib | tail -n 1 | tr -d ' ') on /var/lib"
}

# sha256 of the given files' contents, names included (relative to
# tests/cluster, so that every checkout of the same sources finds the same
# key): the key of a cached build.
content_key() {
  local f
  for f in "$@"; do
    printf '%s ' "${f#"$CLUSTER_SRC"/}"
    sha256sum <"$f"
  done | sha256sum | cut -c1-16
}

kubectl_admin() {
  "$KUBECTL_BIN" --kubeconfig "$KUBECONFIG_ADMIN" "$@"
}

# ctr_k8s I ARGS...: ctr on node I's containerd, namespace k8s.io.
ctr_k8s() {
  local i=$1
  shift
  ctr --address "$(node_containerd_sock "$i")" --namespace k8s.io "$@"
}

# component_pid NAME: the pid of a component this cluster started, if it still
# runs; NAME is a control-plane component or <node>.<component>. The pid file
# must name a live process whose executable is the component's own, so that a
# recycled pid never gets a signal from us.
component_pid() {
  local name=$1 pid exe
  [[ -r $PIDS/$name.pid ]] || return 1
  pid=$(<"$PIDS/$name.pid")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
  exe=${exe% (deleted)} # the binary was rebuilt while it ran
  [[ ${exe##*/} == "${name##*.}" ]] || return 1
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

# The snapshot-controller's leader-election health (its diagnostics server).
probe_snapshot_controller() {
  probe "http://$SNAPSHOT_CONTROLLER_ADDR/healthz/leader-election"
}

# The identity the snapshot-controller takes in its Lease: the host name, with
# every character but letters, digits and '-' made a '-' (and an X after a
# trailing '-'), as its leader-election library does.
snapshot_controller_identity() {
  uname -n | sed 's/[^a-zA-Z0-9-]/-/g; s/-$/-X/'
}

# Whether the snapshot-controller of this host holds its Lease.
snapshot_controller_leads() {
  local holder
  holder=$(kubectl_admin -n "$SNAPSHOT_CONTROLLER_LEASE_NS" get lease "$SNAPSHOT_CONTROLLER_LEASE" \
    -o 'jsonpath={.spec.holderIdentity}' 2>/dev/null) || return 1
  [[ $holder == "$(snapshot_controller_identity)" ]]
}

# Kills and removes every container of node I's containerd (k8s.io namespace).
sweep_containers() {
  local i=$1 ids=() id
  mapfile -t ids < <(ctr_k8s "$i" containers list --quiet 2>/dev/null)
  ((${#ids[@]})) || return 0
  for id in "${ids[@]}"; do
    ctr_k8s "$i" tasks delete --force "$id" >/dev/null 2>&1 || true
  done
  ctr_k8s "$i" containers delete "${ids[@]}" >/dev/null 2>&1 || true
}

# import_archive I ARCHIVE [NAME]: imports an OCI archive (as written by
# `buildah push IMAGE oci-archive:FILE:IMAGE`) into node I's containerd,
# namespace k8s.io; NAME gives the image (another) name. Prints the names the
# image has there.
import_archive() {
  local i=$1 archive=$2 name=${3:-} out imported
  out=$(ctr_k8s "$i" images import "$archive") ||
    die "ctr could not import $archive into $(node_name "$i"): $out"
  # ctr prints "unpacking NAME (sha256:...)...done" per image it named.
  mapfile -t imported < <(sed -n 's/^unpacking \(.*\) (sha256:.*/\1/p' <<<"$out")
  if [[ -n $name ]]; then
    ((${#imported[@]})) || die "$archive holds no named image to tag as $name; push it with a name: oci-archive:FILE:NAME"
    [[ ${imported[0]} == "$name" ]] || ctr_k8s "$i" images tag --force "${imported[0]}" "$name" >/dev/null
    imported+=("$name")
  fi
  ((${#imported[@]})) || die "$archive holds no named image: push it as oci-archive:FILE:NAME, or pass a name"
  printf '%s\n' "${imported[@]}" | sort -u
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

# k8s_version_ldflags MODULE_DIR: the -X flags that stamp STEAD_K8S_VERSION
# into a Kubernetes binary as the upstream build does (hack/lib/version.sh),
# so that every --version and the apiserver's /version report it. buildDate
# is the release's commit time, from the module's .info in MODULE_DIR's
# module cache, so that the same inputs give the same binaries.
k8s_version_ldflags() {
  local mod=$1 v=${STEAD_K8S_VERSION#v} date pkg flags=()
  date=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$STEAD_K8S_VERSION" |
    sed -n 's/.*"Info": "\(.*\)".*/\1/p' | xargs -r sed -n 's/.*"Time":"\([^"]*\)".*/\1/p')
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=(-X "$pkg.gitVersion=$STEAD_K8S_VERSION"
      -X "$pkg.gitMajor=${v%%.*}" -X "$pkg.gitMinor=$(cut -d. -f2 <<<"$v")"
      -X "$pkg.gitTreeState=clean" -X "$pkg.buildDate=${date:-1970-01-01T00:00:00Z}")
  done
  echo "${flags[*]}"
}
