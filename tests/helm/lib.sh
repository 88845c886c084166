# shellcheck shell=bash
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
# Settings of the Helm chart's checks. Sourced after tests/cluster/lib.sh,
# whose kubectl renders the kustomize base the chart must equal.

# helm.sh/helm/v3, built from go/ (its go.mod requires the same version as a
# tool; build.sh refuses to build when the two differ).
STEAD_HELM_VERSION=v3.22.0

HELM_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELM_MOD=$HELM_SRC/go
# Keyed by the version; the stamp beside the binary by go.mod, go.sum, the Go
# release and the flags.
HELM_CACHE=${STEAD_HELM_CACHE:-$STEAD_CACHE/helm-$STEAD_HELM_VERSION}
HELM_BIN=$HELM_CACHE/bin/helm

CHART=$HELM_SRC/../../deploy/helm/stead
RELEASE=stead
RELEASE_NS=stead-system

log() { printf '[helm] %s\n' "$*" >&2; }
die() { printf '[helm] error: %s\n' "$*" >&2; exit 1; }
