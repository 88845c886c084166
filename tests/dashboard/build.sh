#!/usr/bin/env bash
# Builds the dashboard's PromQL program (go/, on Prometheus' engine at
# lib.sh STEAD_PROMETHEUS_VERSION, from the Go module proxy) into the cache
# (lib.sh DASH_BIN), once per set of inputs: go/*.go, go/testdata, go.mod, go.sum, the Go
# release and the flags. A second run builds nothing. Prints nothing on
# stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/dashboard/lib.sh
source "$here/lib.sh"

command -v go >/dev/null || ddie "go is missing: install Go 1.26 or newer (https://go.dev/dl) and put it on PATH"

module=github.com/prometheus/prometheus
goflags=(-trimpath)
key=$({ cat "$DASH_MOD/go.mod" "$DASH_MOD/go.sum" "$DASH_MOD"/*.go "$DASH_MOD"/testdata/*; go env GOVERSION
  echo "CGO_ENABLED=0 ${goflags[*]}"; } | sha256sum | cut -c1-16)
stamp=$DASH_CACHE/bin/.dashboard-$key
if [[ -e $stamp && -x $DASH_BIN ]]; then
  dlog "PromQL program on $module $STEAD_PROMETHEUS_VERSION: cached in $DASH_BIN"
  exit 0
fi

v=$(cd "$DASH_MOD" && GOTOOLCHAIN=local go list -m -f '{{.Version}}' "$module")
[[ $v == "$STEAD_PROMETHEUS_VERSION" ]] ||
  ddie "$DASH_MOD/go.mod requires $module $v, tests/dashboard/lib.sh says $STEAD_PROMETHEUS_VERSION: make them agree"

dlog "building the PromQL program on $module $STEAD_PROMETHEUS_VERSION into $DASH_BIN; a cold build takes a few minutes"
start=$SECONDS
mkdir -p "$DASH_CACHE/bin"
(cd "$DASH_MOD" && GOTOOLCHAIN=local go vet . && GOTOOLCHAIN=local go test -count=1 .)
# Into a scratch file, then renamed: an interrupted build leaves no binary
# that a later run would trust.
(cd "$DASH_MOD" && CGO_ENABLED=0 GOTOOLCHAIN=local go build "${goflags[@]}" -o "$DASH_BIN.new" .)
mv "$DASH_BIN.new" "$DASH_BIN"
rm -f "$DASH_CACHE"/bin/.dashboard-*
touch "$stamp"
dlog "built $DASH_BIN in $((SECONDS - start)) s"
