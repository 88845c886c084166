#!/usr/bin/env bash
# Runs Stead's e2e suites on a 3-node kind cluster, for machines with Docker:
# creates the cluster (one control plane, two workers, zones zone-a/b/c, the
# control plane untainted so that all three take pods, as the suites need
# three schedulable nodes), builds the image with the Dockerfile, loads it and
# a busybox into the nodes, applies deploy/, runs the suites, deletes the
# cluster (STEAD_KIND_KEEP=1 keeps it).
#
#   tests/e2e/kind.sh              needs docker, kind, kubectl, cargo
#
# The cluster has its own kubeconfig in target/kind/; the current kube
# context is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."

name=${STEAD_KIND_CLUSTER:-stead}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
export KUBECONFIG=$PWD/target/kind/kubeconfig
# The pools live on the host's disk, not in the node container's overlay,
# a folder per node.
pools=${STEAD_KIND_POOLS:-$PWD/target/kind/pools}
mkdir -p "$pools"/{a,b,c} "$(dirname "$KUBECONFIG")"
for cmd in docker kind kubectl cargo; do
  command -v "$cmd" >/dev/null || { echo "kind.sh needs $cmd on PATH" >&2; exit 1; }
done

kind create cluster --name "$name" --kubeconfig "$KUBECONFIG" --config - <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
    labels: {topology.kubernetes.io/zone: zone-a}
    extraMounts: [{hostPath: $pools/a, containerPath: /var/lib/stead/pools}]
  - role: worker
    labels: {topology.kubernetes.io/zone: zone-b}
    extraMounts: [{hostPath: $pools/b, containerPath: /var/lib/stead/pools}]
  - role: worker
    labels: {topology.kubernetes.io/zone: zone-c}
    extraMounts: [{hostPath: $pools/c, containerPath: /var/lib/stead/pools}]
YAML
[[ ${STEAD_KIND_KEEP:-} == 1 ]] || trap 'kind delete cluster --name "$name"' EXIT
# A kind node's /dev is a copy made at its start: loop devices the kernel adds
# later never show there (kind issue 1248). Make the first 64 in advance.
for node in $(kind get nodes --name "$name"); do
  docker exec "$node" sh -c \
    'for i in $(seq 0 63); do [ -e /dev/loop$i ] || mknod -m 0660 /dev/loop$i b 7 $i; done'
done
kubectl taint nodes --all node-role.kubernetes.io/control-plane:NoSchedule- >/dev/null 2>&1 || true

docker build -t "localhost/stead:$version" .
# The busybox the examples and the suites run, under the name the bundled
# cluster gives it.
docker pull busybox:1.36
docker tag busybox:1.36 localhost/busybox:stead
kind load docker-image --name "$name" "localhost/stead:$version" localhost/busybox:stead

# The agents' transfer trust material (crossNodeRestore), before they start.
kubectl apply -f deploy/base/namespace.yaml
certs=$(mktemp -d)
cargo run --locked --quiet --bin stead -- transfer-certs --out "$certs"
kubectl -n stead-system create secret generic stead-transfer-tls --from-file="$certs"
rm -rf "$certs"
kubectl apply -k deploy/
kubectl -n stead-system rollout status daemonset/stead-node --timeout=180s
cargo test --locked -p stead-e2e --test statefulset --test volumes --test nodes -- --test-threads=1 --nocapture
