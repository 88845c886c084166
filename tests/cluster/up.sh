#!/usr/bin/env bash
# Brings up the single-node cluster: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, containerd, kubelet and kube-proxy as
# local processes, state in $STEAD_CLUSTER_DIR (default /tmp/stead-cluster).
# Already up: says so and exits 0. Its last line is `export KUBECONFIG=...`.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"
# shellcheck source=tests/cluster/pki.sh
source "$CLUSTER_SRC/pki.sh"
# shellcheck source=tests/cluster/images.sh
source "$CLUSTER_SRC/images.sh"
take_cluster_lock

write_env() {
  cat >"$STATE/env" <<ENV
export KUBECONFIG=$KUBECONFIG_ADMIN
export KUBECTL=$KUBECTL_BIN
export STEAD_NODE_NAME=$NODE_NAME
export STEAD_KUBELET_DIR=$KUBELET_DIR
export STEAD_BUSYBOX_IMAGE=$BUSYBOX_IMAGE
export STEAD_CONTAINERD_SOCK=$CONTAINERD_SOCK
ENV
}

print_result() {
  log "kubectl: $KUBECTL_BIN"
  log "environment: source $STATE/env"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do component_pid "$c" >/dev/null || return 1; done
  probe_apiserver readyz >/dev/null 2>&1
}

if all_running; then
  log "cluster already up ($STATE)"
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
rm -rf "$STATE"
mkdir -p "$LOGS" "$PIDS" "$STATE/cni/net.d" "$STATE/cni/ipam" "$STATE/config"
touch "$STATE/.stead-cluster"

# --- host -------------------------------------------------------------------
# mountPropagation: Bidirectional (CSI plugins) needs a shared root mount.
mount --make-rshared /
# Bridged pod traffic must pass iptables (kube-proxy's service rules), and
# service traffic between pods is routed.
[[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter 2>/dev/null ||
  die "br_netfilter is missing: load it (modprobe br_netfilter) or use a kernel that has it"
cat /proc/sys/net/ipv4/ip_forward >"$STATE/ip_forward.before"
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
# The node's address, on a port-less bridge of its own. The service range is
# routed to it, so service traffic never leaves the machine, even before
# kube-proxy has written its rules.
ip link add "$NODE_LINK" type bridge
ip addr add "$NODE_IP/32" dev "$NODE_LINK"
ip link set "$NODE_LINK" up
ip route add "$SERVICE_CIDR" dev "$NODE_LINK"
# Pods talk to the node and to each other, never past the machine.
iptables -w -I FORWARD -s "$POD_CIDR" ! -d "$POD_CIDR" -m comment --comment stead-cluster \
  -j REJECT --reject-with icmp-net-prohibited

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

# CAP_SYS_RESOURCE is bit 24 of the effective capability set.
restrict_oom=false
(((0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24) & 1)) || restrict_oom=true
cat >"$STATE/config/containerd.toml" <<TOML
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
    conf_dir = "$STATE/cni/net.d"
TOML
# One bridge for all pods; host-local hands out addresses. No masquerade:
# pods have nowhere to go but the node and each other.
cat >"$STATE/cni/net.d/10-stead.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "stead",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$POD_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
JSON
mkdir -p "$CONTAINERD_STATE"
start_component containerd containerd --config "$STATE/config/containerd.toml" --log-level warn

wait_healthy etcd 30 probe "http://127.0.0.1:$ETCD_CLIENT_PORT/health"

start_component kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
  --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port "$APISERVER_PORT" \
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

wait_healthy containerd 30 ctr --address "$CONTAINERD_SOCK" version
# A fresh cluster has no pods: containers an earlier run left are stale.
sweep_containers
import_images
wait_healthy kube-apiserver 60 probe_apiserver readyz
log "control plane up ($((SECONDS - started)) s)"

# --- controllers, scheduler, node -----------------------------------------------
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

cat >"$STATE/config/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
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
# This kernel mounts cgroup v1; Kubernetes 1.34 still runs there when told to.
failCgroupV1: false
failSwapOn: false
# A benchmark runs 100+ pods on this one node.
maxPods: 300
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
# Images come only from the local store (there is no registry to pull them
# back from), so the kubelet must never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A test node on a shared disk: evict only when it is really full.
evictionHard:
  memory.available: 100Mi
  nodefs.available: 2%
  nodefs.inodesFree: 2%
  imagefs.available: 2%
serializeImagePulls: false
rotateCertificates: false
YAML

start_component kubelet "$BIN/kubelet" \
  --config "$STATE/config/kubelet.yaml" \
  --kubeconfig "$STATE/kubelet.kubeconfig" \
  --root-dir "$KUBELET_DIR" \
  --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
  --v=1

cat >"$STATE/config/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: $STATE/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
detectLocalMode: ClusterCIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# NodePorts on the node's address only, not on the machine's real interface.
nodePortAddresses: [primary]
conntrack:
  # Leave the machine's conntrack sysctls as they are.
  maxPerCore: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
YAML
start_component kube-proxy "$BIN/kube-proxy" --config "$STATE/config/kube-proxy.yaml" --v=1

wait_healthy kube-controller-manager 30 probe -k https://127.0.0.1:10257/healthz
wait_healthy kube-scheduler 30 probe -k https://127.0.0.1:10259/healthz
wait_healthy kubelet 60 probe http://127.0.0.1:10248/healthz
wait_healthy kube-proxy 30 probe http://127.0.0.1:10256/healthz
wait_healthy kubelet 60 kubectl_admin wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
log "node $NODE_NAME Ready ($((SECONDS - started)) s)"
# Pods can be created once their namespace's service account exists.
wait_healthy kube-controller-manager 30 kubectl_admin get serviceaccount default
write_env
log "cluster up in $((SECONDS - started)) s; logs in $LOGS"
print_result
