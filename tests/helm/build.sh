#!/usr/bin/env bash
# Builds the pinned Helm CLI (lib.sh STEAD_HELM_VERSION) from the Go module
# proxy into the cache (lib.sh HELM_BIN), once per set of inputs: go/go.mod,
# go/go.sum, the Go release and the flags. A second run builds nothing.
# Prints nothing on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/helm/lib.sh
source "$here/lib.sh"

command -v go >/dev/null || die "go is missing: install Go 1.26 or newer (https://go.dev/dl) and put it on PATH"

module=helm.sh/helm/v3
v=$(cd "$HELM_MOD" && go list -m -f '{{.Version}}' "$module")
[[ $v == "$STEAD_HELM_VERSION" ]] ||
  die "$HELM_MOD/go.mod requires $module $v, tests/helm/lib.sh says $STEAD_HELM_VERSION: make them agree"

# As upstream's Makefile stamps a release: the version, and the Kubernetes
# release that `helm template` and `helm lint` assume (.Capabilities.KubeVersion,
# the deprecation rules) from the client-go the binary is built with
# (client-go v0.34 is Kubernetes 1.34).
client_go=$(cd "$HELM_MOD" && go list -m -f '{{.Version}}' k8s.io/client-go)
k8s_minor=$(cut -d. -f2 <<<"$client_go")
ldflags="-s -w -X $module/internal/version.version=$STEAD_HELM_VERSION -X $module/internal/version.gitTreeState=clean"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X $module/$pkg.k8sVersionMajor=1 -X $module/$pkg.k8sVersionMinor=$k8s_minor"
done
goflags=(-trimpath)

key=$({ cat "$HELM_MOD/go.mod" "$HELM_MOD/go.sum"; go env GOVERSION
  echo "CGO_ENABLED=0 ${goflags[*]} $ldflags"; } | sha256sum | cut -c1-16)
stamp=$HELM_CACHE/bin/.helm-$key
if [[ -e $stamp && -x $HELM_BIN ]]; then
  log "helm $STEAD_HELM_VERSION: cached in $HELM_BIN"
  exit 0
fi

log "building helm $STEAD_HELM_VERSION into $HELM_BIN; a cold build takes a few minutes"
start=$SECONDS
mkdir -p "$HELM_CACHE/bin"
# Into a scratch file, then renamed: an interrupted build leaves no binary
# that a later run would trust.
(cd "$HELM_MOD" && CGO_ENABLED=0 GOTOOLCHAIN=local go build "${goflags[@]}" -ldflags "$ldflags" \
  -o "$HELM_BIN.new" "$module/cmd/helm")
mv "$HELM_BIN.new" "$HELM_BIN"
rm -f "$HELM_CACHE"/bin/.helm-*
touch "$stamp"
log "built helm $STEAD_HELM_VERSION in $((SECONDS - start)) s: $("$HELM_BIN" version --short)"
