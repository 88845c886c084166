#!/usr/bin/env bash
# Deploys Stead from deploy/ onto the bundled local cluster: imports the image
# archive into the cluster's containerd, creates the agents' transfer trust
# material (Secret stead-transfer-tls, from `stead transfer-certs`) unless it
# is there, applies the kustomize base (and deploy/snapshot/ when the cluster
# has the VolumeSnapshot CRDs), and waits until the agent is Ready on every
# node.
#
#   tests/e2e/deploy.sh <oci-archive>     (make deploy builds the archive first)
#
# A rebuilt image keeps its tag, so the pod template also carries the image's
# digest: a new build rolls the agent, an unchanged one leaves it running.
set -euo pipefail
cd "$(dirname "$0")/../.."

die() { printf '[deploy] error: %s\n' "$*" >&2; exit 1; }
(($# == 1)) || die "usage: $0 <oci-archive>"
archive=$1
env_file=${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}/env
[[ -r $env_file ]] || die "no local cluster ($env_file is missing): run make cluster-up"
# shellcheck disable=SC1090
source "$env_file"

tests/cluster/load-image "$archive" >/dev/null
digest=$(tar -xOf "$archive" index.json | grep -o 'sha256:[0-9a-f]\{64\}' | head -1)
[[ -n $digest ]] || die "$archive has no image manifest"

# kustomize takes only relative paths to a base: the overlay lives in target/.
overlay=target/deploy-overlay
mkdir -p "$overlay"
# The bundled nodes have a small btrfs disk at /var/lib/stead/pools/dir-btrfs
# (tests/cluster/up.sh): a dir pool whose volumes are enforced, and its class.
cat >"$overlay/stead-btrfs.yaml" <<'YAML'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: stead-btrfs
provisioner: stead.csi.dev
parameters:
  pool: dir-btrfs
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
allowVolumeExpansion: true
YAML
cat >"$overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy
  - stead-btrfs.yaml
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata:
        name: stead-node
        namespace: stead-system
      spec:
        template:
          metadata:
            annotations:
              stead.csi.dev/image-digest: "$digest"
          spec:
            containers:
              # The bundled nodes' pools share this machine's disk, whose free
              # space no test controls: no reserve (deploy/ keeps 15%).
              - name: stead
                env:
                  - name: STEAD_POOLS
                    value: image:image:/var/lib/stead/pools/image:reserve=0,dir:dir:/var/lib/stead/pools/dir:reserve=0,dir-btrfs:dir:/var/lib/stead/pools/dir-btrfs:reserve=0
                volumeMounts:
                  - name: pool-dir-btrfs
                    mountPath: /var/lib/stead/pools/dir-btrfs
                    mountPropagation: HostToContainer
            volumes:
              - name: pool-dir-btrfs
                hostPath:
                  path: /var/lib/stead/pools/dir-btrfs
                  type: Directory
YAML
# The agents' transfer trust material (crossNodeRestore: pull), before the
# agents start so that they serve at once: made once and kept across
# deploys, as an operator would (a new CA at each deploy would only make
# the agents reload it).
"$KUBECTL" apply -f deploy/base/namespace.yaml >/dev/null
if ! "$KUBECTL" -n stead-system get secret stead-transfer-tls >/dev/null 2>&1; then
  stead_bin=${CARGO_TARGET_DIR:-target}/release/stead
  [[ -x $stead_bin ]] || cargo build --locked --release --bin stead
  certs=$(mktemp -d "${TMPDIR:-/tmp}/stead-transfer-certs.XXXXXX")
  "$stead_bin" transfer-certs --out "$certs" >/dev/null
  "$KUBECTL" -n stead-system create secret generic stead-transfer-tls --from-file="$certs" >/dev/null
  rm -rf "$certs"
fi
"$KUBECTL" apply -k "$overlay" >/dev/null
# The VolumeSnapshotClass only where its CRD is (the bundled cluster has it).
if "$KUBECTL" get crd volumesnapshotclasses.snapshot.storage.k8s.io >/dev/null 2>&1; then
  "$KUBECTL" apply -k deploy/snapshot >/dev/null
fi
if ! "$KUBECTL" -n stead-system rollout status daemonset/stead-node --timeout=180s; then
  "$KUBECTL" -n stead-system get pods -o wide >&2
  "$KUBECTL" -n stead-system describe pods -l app.kubernetes.io/name=stead | tail -n 30 >&2
  "$KUBECTL" -n stead-system logs -l app.kubernetes.io/name=stead --tail=30 >&2 || true
  die "the Stead agent did not become Ready"
fi
