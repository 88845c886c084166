#!/usr/bin/env bash
# The render check of Stead's Helm chart (deploy/helm/stead); needs no
# cluster:
#   1. helm lint --strict, with the default values, values-test.yaml and
#      values-cluster.yaml (install.sh's);
#   2. `helm template` with the default values renders the same objects as
#      `kubectl kustomize deploy`, field for field, Helm's own labels set
#      aside (render_check.py same); with snapshotClass.enabled, the same as
#      deploy/ and deploy/snapshot/ together;
#   3. a render with values-test.yaml, and one with values-cluster.yaml,
#      has what those values ask for (render_check.py values).
# kubectl is the cluster's (tests/cluster/build.sh), helm the pinned one
# (build.sh). Renders are left in target/helm/ to read. Prints
# "helm-check: N passed, N failed" last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/helm/lib.sh
source "$here/lib.sh"
cd "$here/../.."

[[ -x $HELM_BIN ]] || die "$HELM_BIN is missing: run tests/helm/build.sh"
# The cluster's kubectl, built with the cluster's binaries when it is not
# there yet; when it is, the cluster's build is left alone: this check must
# never rebuild what a running cluster uses.
if [[ ! -x $KUBECTL_BIN ]]; then
  log "$KUBECTL_BIN is missing: building the cluster's binaries (tests/cluster/build.sh)"
  "$CLUSTER_SRC/prereqs.sh"
  "$CLUSTER_SRC/build.sh"
fi
# Debian's python3 and its python3-yaml (.ci/run installs it), whatever
# python3 comes first on PATH.
python=/usr/bin/python3
"$python" -c 'import yaml' 2>/dev/null || die "$python has no PyYAML: apt-get install python3-yaml"

out=target/helm
mkdir -p "$out"
chart=deploy/helm/stead
values_files=("$HELM_SRC/values-test.yaml" "$HELM_SRC/values-cluster.yaml")
passed=0 failed=0
step() { log "$*"; }
# check WHAT CMD...: runs one check, counted.
check() {
  local what=$1
  shift
  if "$@"; then passed=$((passed + 1)); else log "FAILED: $what"; failed=$((failed + 1)); fi
}

step "helm lint --strict $chart (default values, then ${values_files[*]##*/})"
check "helm lint of the default values" "$HELM_BIN" lint --strict "$chart"
for values in "${values_files[@]}"; do
  check "helm lint with $values" "$HELM_BIN" lint --strict "$chart" --namespace "$RELEASE_NS" -f "$values"
done

render() {
  local file=$1
  shift
  "$HELM_BIN" template "$RELEASE" "$chart" --namespace "$RELEASE_NS" "$@" >"$out/$file" ||
    die "helm template $* failed"
}

step "helm template (default values) against kubectl kustomize deploy"
render default.yaml
"$KUBECTL_BIN" kustomize deploy >"$out/kustomize.yaml"
check "the chart's default render against kubectl kustomize deploy" \
  "$python" "$HELM_SRC/render_check.py" same "$chart/Chart.yaml" "$out/default.yaml" "$out/kustomize.yaml"

step "helm template --set snapshotClass.enabled=true against kubectl kustomize deploy + deploy/snapshot"
render snapshot.yaml --set snapshotClass.enabled=true
"$KUBECTL_BIN" kustomize deploy/snapshot >"$out/kustomize-snapshot.yaml"
check "the chart's render with the VolumeSnapshotClass against deploy/ + deploy/snapshot/" \
  "$python" "$HELM_SRC/render_check.py" same "$chart/Chart.yaml" "$out/snapshot.yaml" \
  "$out/kustomize.yaml" "$out/kustomize-snapshot.yaml"

for values in "${values_files[@]}"; do
  step "helm template -f ${values##*/}: what the values ask for"
  render "${values##*/}" -f "$values"
  check "the render with $values has what it asks for" \
    "$python" "$HELM_SRC/render_check.py" values "$out/${values##*/}" "$values"
done

echo "helm-check: $passed passed, $failed failed"
((failed == 0)) || die "renders in $out/"
