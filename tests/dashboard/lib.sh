# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Settings of the dashboard's PromQL check and rendering (README.md here).
# Sourced after tests/cluster/lib.sh (STEAD_CACHE).

# github.com/prometheus/prometheus, whose PromQL engine go/ is built with
# (go/go.mod requires the same version; build.sh refuses to build when the
# two differ). Prometheus v3.x is tagged v0.3xx.y for Go.
STEAD_PROMETHEUS_VERSION=v0.316.0

DASH_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DASH_MOD=$DASH_SRC/go
# Keyed by the version; the stamp beside the binary by go/'s sources,
# go.mod, go.sum, the Go release and the flags.
DASH_CACHE=${STEAD_DASHBOARD_CACHE:-$STEAD_CACHE/dashboard-promql-$STEAD_PROMETHEUS_VERSION}
DASH_BIN=$DASH_CACHE/bin/dashboard
DASHBOARD_JSON=$(cd "$DASH_SRC/../.." && pwd)/deploy/grafana/stead-dashboard.json

dlog() { printf '[dashboard] %s\n' "$*" >&2; }
ddie() { printf '[dashboard] error: %s\n' "$*" >&2; exit 1; }
