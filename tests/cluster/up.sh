#!/usr/bin/env bash
# Brings up the local cluster: a control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, and the CSI snapshot-controller
# with the VolumeSnapshot CRDs) as host processes, and
# STEAD_NODES nodes (default 3), each a network namespace and a mount
# namespace of its own with its own containerd, kubelet and kube-proxy (see
# README.md). State in $STEAD_CLUSTER_DIR (default /tmp/stead-cluster).
# Already up with that many nodes: says so and exits 0. Its last line is
# `export KUBECONFIG=...`.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/cluster/pki.sh
source "$CLUSTER_SRC/pki.sh"
# shellcheck source=tests/cluster/images.sh
source "$CLUSTER_SRC/images.sh"
take_cluster_lock

[[ $STEAD_NODES =~ ^[1-9][0-9]?$ ]] && ((STEAD_NODES <= 15)) ||
  die "STEAD_NODES=$STEAD_NODES: give a number of nodes from 1 to 15"

write_env() {
  local names=() ips=() i
  for i in $(node_indexes); do names+=("$(node_name "$i")") ips+=("$(node_ip "$i")"); done
  cat >"$STATE/env" <<ENV
export KUBECONFIG=$KUBECONFIG_ADMIN
export KUBECTL=$KUBECTL_BIN
export STEAD_NODE_NAMES="${names[*]}"
export STEAD_NODE_ADDRESSES="${ips[*]}"
export STEAD_NODE_NAME=${names[0]}
export STEAD_NODES_DIR=$NODES_DIR
export STEAD_MNTNS_DIR=$MNTNS_DIR
export STEAD_KUBELET_DIR=$KUBELET_DIR
export STEAD_BUSYBOX_IMAGE=$BUSYBOX_IMAGE
ENV
}

print_result() {
  log "kubectl: $KUBECTL_BIN"
  log "environment: source $STATE/env"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

all_running() {
  local c i
  [[ -r $STATE/nodes.count && $(<"$STATE/nodes.count") == "$STEAD_NODES" ]] || return 1
  for c in "${CONTROL_PLANE[@]}"; do component_pid "$c" >/dev/null || return 1; done
  for i in $(node_indexes); do
    for c in "${NODE_COMPONENTS[@]}"; do component_pid "$(node_name "$i").$c" >/dev/null || return 1; done
  done
  probe_apiserver readyz >/dev/null 2>&1
}

if all_running; then
  log "cluster already up with $STEAD_NODES node(s) ($STATE)"
  write_env
  print_result
  exit 0
fi

# Wiped only if it is one of ours (or empty): STEAD_CLUSTER_DIR may be mistyped.
if [[ -d $STATE && ! -e $STATE/.stead-cluster ]] && [[ -n $(ls -A "$STATE") ]]; then
  die "refusing to empty $STATE: not a folder cluster-up made (no .stead-cluster in it)"
fi

"$CLUSTER_SRC/prereqs.sh"
"$CLUSTER_SRC/build.sh"
build_images

# Whatever a previous run left (stopped half-way, or its processes killed
# with the machine's session) goes first: each up starts from empty state.
"$CLUSTER_SRC/down.sh" --quiet
started=$SECONDS
rm -rf --one-file-system "$STATE"
check_free_space
mkdir -p "$LOGS" "$PIDS" "$STATE/config" "$NODES_DIR"
touch "$STATE/.stead-cluster"
echo "$STEAD_NODES" >"$STATE/nodes.count"

# --- host -------------------------------------------------------------------
# mountPropagation: Bidirectional (CSI plugins) needs shared mounts; each
# node's namespace makes its own, and the host's stays as a real node's is.
mount --make-rshared /
# Bridged pod traffic must pass iptables (kube-proxy's service rules), in
# every node's network namespace (the setting is per namespace).
[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter 2>/dev/null ||
  die "br_netfilter is missing: load it (modprobe br_netfilter) or use a kernel that has it"
cat /proc/sys/net/ipv4/ip_forward >"$STATE/ip_forward.before"
sysctl -qw net.ipv4.ip_forward=1
# The control plane's address, on the bridge the nodes' veths join. The
# service range is routed to it, so service traffic from the host never
# leaves the machine.
ip link add "$HOST_LINK" type bridge
ip addr add "$HOST_IP/24" dev "$HOST_LINK"
ip link set "$HOST_LINK" up
ip route add "$SERVICE_CIDR" dev "$HOST_LINK"
# Nodes and pods talk to the control plane and to each other, never past the
# machine, and nothing from outside reaches them.
iptables -w -I FORWARD -i "$HOST_LINK" ! -o "$HOST_LINK" -m comment --comment stead-cluster \
  -j REJECT --reject-with icmp-net-prohibited
iptables -w -I FORWARD ! -i "$HOST_LINK" -o "$HOST_LINK" -m comment --comment stead-cluster \
  -j REJECT --reject-with icmp-net-prohibited
# The folder that holds the nodes' mount namespaces must be a private mount:
# a namespace cannot be pinned on a shared one.
mkdir -p "$MNTNS_DIR"
if ! mountpoint -q "$MNTNS_DIR"; then
  mount --bind "$MNTNS_DIR" "$MNTNS_DIR"
fi
mount --make-private "$MNTNS_DIR"
# The standard paths a node's folders are bind-mounted on, in its namespace.
mkdir -p "$KUBELET_DIR" "$STEAD_DIR" "$CONTAINERD_ROOT" "$CONTAINERD_STATE" /var/log "$CONTAINERD_ROOTS"

# --- etcd and the apiserver ---------------------------------------------------
make_pki


start_component etcd "$BIN/etcd" --name stead --data-dir "$STATE/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "stead=http://127.0.0.1:$ETCD_PEER_PORT" \
  --unsafe-no-fsync --log-level warn
# A throw-away test cluster: etcd skips fsync (--unsafe-no-fsync), which on a
# shared disk is most of the apiserver's write latency.

wait_healthy etcd 30 probe "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

start_component kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --bind-address "$HOST_IP" --advertise-address "$HOST_IP" --secure-port "$APISERVER_PORT" \
  --tls-cert-file "$PKI/kube-apiserver.crt" --tls-private-key-file "$PKI/kube-apiserver.key" \
  --client-ca-file "$PKI/ca.crt" \
  --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority "$PKI/ca.crt" \
  --kubelet-preferred-address-types InternalIP \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$PKI/sa.pub" \
  --service-account-signing-key-file "$PKI/sa.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --authorization-mode Node,RBAC \
  --enable-admission-plugins NodeRestriction \
  --allow-privileged=true \
  --profiling=false --v=1


# --- nodes --------------------------------------------------------------------
# CAP_SYS_RESOURCE is bit 24 of the effective capability set.
restrict_oom=false
(((0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24) & 1)) || restrict_oom=true

# start_in_node I COMPONENT CMD...: a node component in node I's namespaces.
start_in_node() {
  local i=$1 c=$2
  shift 2
  start_component "$(node_name "$i").$c" nsenter --net="/run/netns/$(node_name "$i")" \
    --mount="$(node_mntns "$i")" -- "$@"
}

# setup_node I: node I's disk, network, mount namespace and configuration,
# then its containerd with the cluster's images.
setup_node() {
  local i=$1 name dir ip cidr netns mnt j
  name=$(node_name "$i")
  dir=$(node_dir "$i")
  ip=$(node_ip "$i")
  cidr=$(node_pod_cidr "$i")
  mnt=$(node_mntns "$i")
  mkdir -p "$dir"/{kubelet,stead,containerd-state,log,config,cni/net.d,cni/ipam} "$CONTAINERD_ROOTS/$name"

  # Its disk: a sparse xfs image (reflink on), mounted on the host so that
  # the node's files can be inspected from it; the node sees it at
  # /var/lib/stead.
  truncate -s "$NODE_DISK_SIZE" "$dir/disk.img"
  mkfs.xfs -q -m reflink=1 "$dir/disk.img"
  mount -o loop "$dir/disk.img" "$dir/stead"
  # A second, small btrfs disk for a dir pool whose volumes are enforced
  # (a subvolume with a qgroup limit each); the node sees it at
  # /var/lib/stead/pools/dir-btrfs.
  mkdir -p "$dir/btrfs" "$dir/stead/pools/dir-btrfs"
  truncate -s "$NODE_BTRFS_SIZE" "$dir/btrfs.img"
  mkfs.btrfs -q -f "$dir/btrfs.img" >/dev/null
  mount -o loop "$dir/btrfs.img" "$dir/btrfs"

  # Its network: a veth from the host bridge, its address, its pod subnet,
  # routes to the other nodes' pod subnets; forwarding and bridge netfilter
  # for its pods.
  ip netns add "$name"
  netns=(ip netns exec "$name")
  ip link add "stead-n$i" type veth peer name eth0 netns "$name"
  ip link set "stead-n$i" master "$HOST_LINK" up
  "${netns[@]}" ip link set lo up
  "${netns[@]}" ip addr add "$ip/24" dev eth0
  "${netns[@]}" ip link set eth0 up
  "${netns[@]}" ip route add default via "$HOST_IP"
  for j in $(seq 1 "$STEAD_NODES"); do
    ((j == i)) || "${netns[@]}" ip route add "$(node_pod_cidr "$j")" via "$(node_ip "$j")"
  done
  "${netns[@]}" sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  ip route add "$cidr" via "$ip"

  # Its mount namespace, pinned on a file: private from the host (its mounts
  # stay its own), then shared inside like a real node's root, with its
  # folders at the standard paths, each a peer group of its own.
  touch "$mnt"
  unshare --mount="$mnt" --propagation private sh -ec "
    mount --make-rshared /
    bind() { mount --bind \"\$1\" \"\$2\"; mount --make-private \"\$2\"; mount --make-shared \"\$2\"; }
    bind '$dir/kubelet' '$KUBELET_DIR'
    bind '$dir/stead' '$STEAD_DIR'
    bind '$dir/btrfs' '$STEAD_DIR/pools/dir-btrfs'
    bind '$dir/containerd-state' '$CONTAINERD_STATE'
    bind '$CONTAINERD_ROOTS/$name' '$CONTAINERD_ROOT'
    bind '$dir/log' /var/log
  "

  # Its cgroup root, in every hierarchy (the kubelet wants it to exist); a
  # cpuset starts empty and must be given the machine's CPUs and memory nodes.
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -L ${h%/} ]] && continue
    mkdir -p "$h$name"
    if [[ -e ${h}cpuset.cpus ]]; then
      cat "${h}cpuset.cpus" >"$h$name/cpuset.cpus"
      cat "${h}cpuset.mems" >"$h$name/cpuset.mems"
    fi
  done

  cat >"$dir/config/containerd.toml" <<TOML
version = 2
root = "$CONTAINERD_ROOT"
state = "$CONTAINERD_STATE"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # Only when this machine grants no CAP_SYS_RESOURCE: oom_score_adj cannot go
  # below containerd's own, so containers are clamped there.
  restrict_oom_score_adj = $restrict_oom
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$CONTAINERD_STATE/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN_DIR"
    conf_dir = "$dir/cni/net.d"
TOML
  # The node's pods on its own bridge, addresses from its subnet. No
  # masquerade: pods reach other nodes' pods by the routes above.
  cat >"$dir/cni/net.d/10-stead.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "stead",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
JSON
  start_in_node "$i" containerd containerd --config "$dir/config/containerd.toml" --log-level warn
  wait_healthy "$name.containerd" 30 ctr --address "$(node_containerd_sock "$i")" version
  # The node's PID 1. On a real node (or a kind one) /proc/1 is its init, in
  # the node's mount namespace, and tools that enter the node do so through
  # it: the upstream e2e suite's host-exec pods mount the node's / and run
  # nsenter --mount=/rootfs/proc/1/ns/mnt. Here every node shares the
  # machine's PID namespace, whose PID 1 is in another mount namespace (and
  # not even readable on this machine), so the node's /proc/1 is made its
  # containerd's: a process of the node's mount namespace that lives as long
  # as the node.
  nsenter --mount="$mnt" -- mount --bind "/proc/$(component_pid "$name.containerd")" /proc/1
  # Containers its root kept from an earlier run are stale.
  sweep_containers "$i"
  import_images "$i"
}

# start_node I: node I's kubelet and kube-proxy.
start_node() {
  local i=$1 name dir ip
  name=$(node_name "$i")
  dir=$(node_dir "$i")
  ip=$(node_ip "$i")
  make_node_pki "$i"
  cat >"$dir/config/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
# On the node's address, so that the host can probe it.
healthzBindAddress: $ip
readOnlyPort: 0
tlsCertFile: $PKI/$name-serving.crt
tlsPrivateKeyFile: $PKI/$name-serving.key
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: $PKI/ca.crt
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
cgroupDriver: cgroupfs
# Each node's pods in a cgroup tree of its own.
cgroupRoot: /$name
cgroupsPerQOS: true
# This kernel mounts cgroup v1; Kubernetes 1.34 still runs there when told to.
failCgroupV1: false
failSwapOn: false
# A benchmark runs 100+ pods on one node.
maxPods: 300
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# Images come only from the local store (there is no registry to pull them
# back from), so the kubelet must never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Test nodes share the machine's disk: evict only when it is really full.
# Absolute amounts, not percentages: 2% of a 250 GB disk is 5 GB, and a CI
# machine whose disk held old checkouts evicted the smoke test's pods at 4.9
# GB free. The free-space check above stops cluster-up before that.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1Gi
  nodefs.inodesFree: 2%
  imagefs.available: 1Gi
serializeImagePulls: false
rotateCertificates: false
YAML
  start_in_node "$i" kubelet "$BIN/kubelet" \
    --config "$dir/config/kubelet.yaml" \
    --kubeconfig "$dir/kubelet.kubeconfig" \
    --root-dir "$KUBELET_DIR" \
    --hostname-override "$name" --node-ip "$ip" \
    --node-labels "topology.kubernetes.io/zone=$(node_zone "$i")" \
    --v=1

  cat >"$dir/config/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $STATE/kube-proxy.kubeconfig
hostnameOverride: $name
mode: iptables
clusterCIDR: $POD_CIDR
detectLocalMode: ClusterCIDR
healthzBindAddress: $ip:10256
metricsBindAddress: 127.0.0.1:10249
# NodePorts on the node's address only.
nodePortAddresses: [primary]
conntrack:
  # Leave the conntrack sysctls as they are.
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML
  start_in_node "$i" kube-proxy "$BIN/kube-proxy" --config "$dir/config/kube-proxy.yaml" --v=1
}

# The nodes are set up side by side while the apiserver starts.
pids=()
for i in $(node_indexes); do
  setup_node "$i" >"$LOGS/$(node_name "$i").setup.log" 2>&1 &
  pids+=($!)
done
for i in $(node_indexes); do
  wait "${pids[$((i - 1))]}" || {
    cat "$LOGS/$(node_name "$i").setup.log" >&2
    die "setting up node $(node_name "$i") failed (log above)"
  }
done
wait_healthy kube-apiserver 60 probe_apiserver readyz
log "control plane and $STEAD_NODES node(s) set up ($((SECONDS - started)) s)"

# --- controllers and scheduler -------------------------------------------------
start_component kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false \
  --controllers '*' --use-service-account-credentials \
  --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
  --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
  --service-cluster-ip-range "$SERVICE_CIDR" \
  --kube-api-qps 200 --kube-api-burst 400 \
  --profiling=false --v=1

start_component kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$STATE/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
  --bind-address 127.0.0.1 --leader-elect=false --profiling=false --v=1

# The VolumeSnapshot API: its CRDs (of the snapshot-controller's release),
# the controller's rights, then the controller, with leader election as it
# runs in a real cluster. Volume group snapshots are off: their CRDs are not
# installed (Stead has no group snapshots), and with the gate on the
# controller would look for them for 30 s and log an error per try.
kubectl_admin apply --server-side --field-manager stead-cluster \
  -f "$CLUSTER_SRC/snapshot-controller-rbac.yaml" >/dev/null
snapshot_crds=()
for c in "${SNAPSHOT_CRDS[@]}"; do snapshot_crds+=(-f "$CRD_DIR/snapshot.storage.k8s.io_$c.yaml"); done
kubectl_admin apply --server-side --field-manager stead-cluster "${snapshot_crds[@]}" >/dev/null
for c in "${SNAPSHOT_CRDS[@]}"; do
  kubectl_admin wait --for=condition=Established "crd/$c.snapshot.storage.k8s.io" --timeout=30s >/dev/null ||
    die "CRD $c.snapshot.storage.k8s.io not Established in 30 s"
done
start_component snapshot-controller "$BIN/snapshot-controller" \
  --kubeconfig "$STATE/snapshot-controller.kubeconfig" \
  --leader-election --leader-election-namespace "$SNAPSHOT_CONTROLLER_LEASE_NS" \
  --http-endpoint "$SNAPSHOT_CONTROLLER_ADDR" \
  --feature-gates CSIVolumeGroupSnapshot=false \
  --kube-api-qps 50 --kube-api-burst 100 \
  --v=1

for i in $(node_indexes); do start_node "$i"; done

wait_healthy kube-controller-manager 30 probe -k https://127.0.0.1:10257/healthz
wait_healthy kube-scheduler 30 probe -k https://127.0.0.1:10259/healthz
wait_healthy snapshot-controller 30 probe_snapshot_controller
wait_healthy snapshot-controller 30 snapshot_controller_leads
for i in $(node_indexes); do
  name=$(node_name "$i")
  wait_healthy "$name.kubelet" 60 probe "http://$(node_ip "$i"):10248/healthz"
  wait_healthy "$name.kube-proxy" 30 probe "http://$(node_ip "$i"):10256/healthz"
done
for i in $(node_indexes); do
  wait_healthy "$(node_name "$i").kubelet" 60 kubectl_admin wait --for=condition=Ready "node/$(node_name "$i")" --timeout=5s
done
log "$STEAD_NODES node(s) Ready ($((SECONDS - started)) s)"
# Pods can be created once their namespace's service account exists.
wait_healthy kube-controller-manager 30 kubectl_admin get serviceaccount default
write_env
log "cluster up in $((SECONDS - started)) s; logs in $LOGS"
print_result
