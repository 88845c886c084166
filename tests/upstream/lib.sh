# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Settings of the upstream e2e tier. Sourced after tests/cluster/lib.sh and
# tests/cluster/images.sh: the release is the cluster's (STEAD_K8S_VERSION),
# and everything built lands beside the cluster's build in STEAD_K8S_CACHE.

UPSTREAM_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UPSTREAM_MOD=$UPSTREAM_SRC/go
UPSTREAM_BIN=$STEAD_K8S_CACHE/upstream/bin
E2E_TEST=$UPSTREAM_BIN/e2e.test
GINKGO=$UPSTREAM_BIN/ginkgo
AGNHOST=$UPSTREAM_BIN/agnhost

# The images the External.Storage specs start, under the names e2e.test of
# STEAD_K8S_VERSION gives them (`e2e.test --list-images`; build.sh checks
# that it still does), built here FROM scratch into the cluster's image
# folder. The pause image of that list is named by no spec: pod sandboxes
# use the cluster's (containerd's sandbox_image).
declare -A E2E_IMAGES=(
  # The default test image of every suite (e2epod.GetDefaultTestImage).
  [busybox]=registry.k8s.io/e2e-test-images/busybox:1.37.0-1
  # The host-exec pods (nsenter onto the node) and several suites' pods.
  [agnhost]=registry.k8s.io/e2e-test-images/agnhost:2.56
  # volumes: "should allow exec of files on the volume" (its shell only).
  [nginx]=registry.k8s.io/e2e-test-images/nginx:1.14-4
  # multiVolume: the pods that access one volume concurrently (a shell and
  # coreutils).
  [jessie-dnsutils]=registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7
)
e2e_image_archive() { echo "$IMAGES_DIR/e2e-$1.oci.tar"; }

# Messages of this tier's scripts.
log() { printf '[upstream] %s\n' "$*" >&2; }
die() { printf '[upstream] error: %s\n' "$*" >&2; exit 1; }
