# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Settings and helpers of the benchmarks that put Stead beside what users
# would install instead (issue 16): the anchors (tests/bench/anchors/), each
# a pinned upstream release built from the Go module proxy, deployed on the
# bundled cluster of tests/cluster. Sourced, not run.

# shellcheck source=tests/cluster/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../cluster/lib.sh"

# rancher/local-path-provisioner: v0.0.30 is the only release the Go module
# proxy serves (go/local-path-provisioner/go.mod pins the same).
BENCH_LPP_VERSION=v0.0.30
# github.com/kubernetes-csi/external-provisioner/v5: v5.3.0 is the newest v5
# the proxy serves, v5.4.0 is refused (go/external-provisioner/go.mod pins
# the same).
BENCH_EXTERNAL_PROVISIONER_VERSION=v5.3.0

BENCH_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH_REPO=$(cd "$BENCH_SRC/../.." && pwd)
# What the anchors' builds leave: one folder per tool and version.
BENCH_CACHE=${BENCH_CACHE:-$STEAD_CACHE/bench}
# The current deployment: current.env (written by anchors/deploy.sh) and the
# overlays it generates.
BENCH_STATE=${STEAD_BENCH_DIR:-/tmp/stead-bench}

# The four deployments anchors/deploy.sh knows.
BENCH_NAMES=(stead sidecar-defaults sidecar-tuned local-path)
# The names of the benchmark's StorageClasses (each deployment makes its
# own). Which of them the deployment has is in $BENCH_STATE/current.env,
# BENCH_CLASS_WFFC and BENCH_CLASS_IMMEDIATE (empty where the provisioner
# cannot bind at once).
BENCH_WFFC_CLASS=bench-wffc
BENCH_IMMEDIATE_CLASS=bench-immediate

# The anchors' builds: binary, image and image archive of each.
BENCH_LPP_DIR=$BENCH_CACHE/local-path-provisioner-$BENCH_LPP_VERSION
BENCH_LPP_IMAGE=localhost/local-path-provisioner:$BENCH_LPP_VERSION
BENCH_LPP_ARCHIVE=$BENCH_LPP_DIR/image.oci.tar
BENCH_CSI_PROVISIONER_DIR=$BENCH_CACHE/external-provisioner-$BENCH_EXTERNAL_PROVISIONER_VERSION
BENCH_CSI_PROVISIONER_IMAGE=localhost/csi-provisioner:$BENCH_EXTERNAL_PROVISIONER_VERSION
BENCH_CSI_PROVISIONER_ARCHIVE=$BENCH_CSI_PROVISIONER_DIR/image.oci.tar

# Stead's own image, as `make image` writes it (tests/e2e/e2e.mk).
BENCH_STEAD_ARCHIVE=${STEAD_IMAGE_ARCHIVE:-$BENCH_REPO/target/image/stead-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$BENCH_REPO/Cargo.toml" | head -1).oci.tar}

# Where each deployment runs: Stead's agents (with or without the sidecar)
# in stead-system, local-path-provisioner and its helper pods in
# local-path-storage. Each namespace holds that deployment's pods only.
BENCH_STEAD_NAMESPACE=stead-system
BENCH_LPP_NAMESPACE=local-path-storage

blog() { printf '[bench] %s\n' "$*" >&2; }
bdie() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# bench_key FILE...: sha256 of the files' contents and names (relative to the
# repository, so that every checkout finds the same key), then of the
# strings on stdin; the key of a cached build.
bench_key() {
  local f
  {
    for f in "$@"; do
      printf '%s ' "${f#"$BENCH_REPO"/}"
      sha256sum <"$f"
    done
    cat
  } | sha256sum | cut -c1-16
}

# buildah with a storage of its own under BENCH_CACHE (vfs: no overlay
# mounts), apart from the cluster's images and the machine's
# /var/lib/containers.
bench_buildah() {
  buildah --root "$BENCH_CACHE/buildah/root" --runroot "$BENCH_CACHE/buildah/run" \
    --storage-driver vfs "$@"
}

# bench_cluster: the environment of the running bundled cluster (KUBECONFIG,
# KUBECTL, STEAD_NODE_NAMES ...), or a clear error.
bench_cluster() {
  local env_file=$STATE/env
  [[ -r $env_file ]] || bdie "no local cluster ($env_file is missing): run make cluster-up"
  # shellcheck disable=SC1090
  source "$env_file"
  [[ -x ${KUBECTL:-} ]] || bdie "$env_file names no kubectl (KUBECTL=${KUBECTL:-})"
}

bk() { "$KUBECTL" "$@"; }

# bench_wait WHAT SECONDS CMD...: runs CMD until it succeeds; fails naming
# WHAT when the time runs out.
bench_wait() {
  local what=$1 limit=$2 deadline
  shift 2
  deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || bdie "$what: not so after ${limit} s"
    sleep 0.5 # a poll: the loop checks its condition and deadline
  done
}
