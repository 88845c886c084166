#!/usr/bin/env bash
# Builds the cluster's binaries into the cache (see lib.sh), once per version:
# the Kubernetes components in one `go build` (they share most packages), etcd,
# the CSI snapshot-controller (with the VolumeSnapshot CRDs of its release),
# and the pause program of the sandbox image. A second run finds them and
# builds nothing.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

mkdir -p "$BIN"

need_go() {
  command -v go >/dev/null || die "go is missing: install Go 1.26 or newer (https://go.dev/dl) and put it on PATH"
}

build_kubernetes() {
  local mod=$CLUSTER_SRC/go/k8s key stamp
  # providerless: the upstream tag that leaves out legacy cloud-provider code.
  local goflags=(-trimpath -tags providerless)
  # The cache key: go.mod, go.sum and everything else that shapes the binaries.
  key=$({ cat "$mod/go.mod" "$mod/go.sum"
    echo "CGO_ENABLED=0 ${goflags[*]} -s -w version-ldflags ${K8S_BINARIES[*]}"; } |
    sha256sum | cut -c1-16)
  stamp=$BIN/.kubernetes-$key
  if [[ -e $stamp ]]; then
    log "Kubernetes $STEAD_K8S_VERSION: cached in $BIN"
    return
  fi
  need_go
  local ldflags
  read -ra ldflags < <(k8s_version_ldflags "$mod")
  ldflags=(-s -w "${ldflags[@]}")
  local pkg
  local targets=()
  for pkg in "${K8S_BINARIES[@]}"; do targets+=("k8s.io/kubernetes/cmd/$pkg"); done
  log "building Kubernetes $STEAD_K8S_VERSION (${K8S_BINARIES[*]}) into $BIN; a cold build takes a while"
  local start=$SECONDS
  (cd "$mod" && CGO_ENABLED=0 go build "${goflags[@]}" -ldflags "${ldflags[*]}" -o "$BIN/" "${targets[@]}")
  rm -f "$BIN"/.kubernetes-*
  touch "$stamp"
  log "built Kubernetes $STEAD_K8S_VERSION in $((SECONDS - start)) s"
}

build_etcd() {
  local mod=$CLUSTER_SRC/go/etcd key stamp
  key=$(content_key "$mod/go.mod" "$mod/go.sum" "$mod/main.go")
  stamp=$BIN/.etcd-$key
  if [[ -e $stamp ]]; then
    log "etcd $STEAD_ETCD_VERSION: cached in $BIN"
    return
  fi
  need_go
  log "building etcd $STEAD_ETCD_VERSION into $BIN"
  local start=$SECONDS
  (cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .)
  rm -f "$BIN"/.etcd-*
  touch "$stamp"
  log "built etcd $STEAD_ETCD_VERSION in $((SECONDS - start)) s"
}

build_snapshotter() {
  local mod=$CLUSTER_SRC/go/snapshotter key stamp
  local main=github.com/kubernetes-csi/external-snapshotter/v8
  local client=github.com/kubernetes-csi/external-snapshotter/client/v8
  key=$({ cat "$mod/go.mod" "$mod/go.sum"
    echo "CGO_ENABLED=0 -trimpath -s -w main.version=$STEAD_SNAPSHOTTER_VERSION ${SNAPSHOT_CRDS[*]}"; } |
    sha256sum | cut -c1-16)
  stamp=$BIN/.snapshot-controller-$key
  if [[ -e $stamp ]]; then
    log "snapshot-controller $STEAD_SNAPSHOTTER_VERSION and its CRDs: cached in $STEAD_K8S_CACHE"
    return
  fi
  need_go
  local v m
  for m in "$main" "$client"; do
    v=$(cd "$mod" && go list -m -f '{{.Version}}' "$m")
    [[ $v == "$STEAD_SNAPSHOTTER_VERSION" ]] ||
      die "$mod/go.mod pins $m $v, lib.sh says $STEAD_SNAPSHOTTER_VERSION: make them agree"
  done
  log "building snapshot-controller $STEAD_SNAPSHOTTER_VERSION into $BIN"
  local start=$SECONDS
  # The version as upstream's Makefile stamps it (snapshot-controller --version).
  (cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$STEAD_SNAPSHOTTER_VERSION" \
    -o "$BIN/snapshot-controller" "$main/cmd/snapshot-controller")
  # The CRDs of the same release, from the client module's folder in the
  # module cache.
  local dir crd
  dir=$(cd "$mod" && go mod download -json "$client@$STEAD_SNAPSHOTTER_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -d $dir/config/crd ]] || die "no config/crd in $client@$STEAD_SNAPSHOTTER_VERSION (module folder: '$dir')"
  rm -rf "$CRD_DIR"
  mkdir -p "$CRD_DIR"
  for crd in "${SNAPSHOT_CRDS[@]}"; do
    install -m 644 "$dir/config/crd/snapshot.storage.k8s.io_$crd.yaml" "$CRD_DIR/"
  done
  rm -f "$BIN"/.snapshot-controller-*
  touch "$stamp"
  log "built snapshot-controller $STEAD_SNAPSHOTTER_VERSION in $((SECONDS - start)) s"
}

build_pause() {
  local src=$CLUSTER_SRC/pause/pause.c key stamp
  key=$(content_key "$src")
  stamp=$BIN/.pause-$key
  [[ -e $stamp ]] && return
  command -v cc >/dev/null || die "cc is missing: apt-get install -y gcc libc6-dev"
  cc -static -Os -Wall -Werror -o "$BIN/pause" "$src"
  rm -f "$BIN"/.pause-*
  touch "$stamp"
}

total=$SECONDS
build_kubernetes
build_etcd
build_snapshotter
build_pause
log "binaries ready in $BIN ($((SECONDS - total)) s)"
