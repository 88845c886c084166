#!/usr/bin/env bash
# Removes one of the benchmark's provisioners from the running bundled
# cluster (see deploy.sh), or all of them, with its StorageClasses
# bench-wffc and bench-immediate, and waits until its pods are gone:
#
#   tests/bench/anchors/undeploy.sh stead|sidecar-defaults|sidecar-tuned|local-path|all
#
# stead and sidecar-*: Stead's DaemonSet (with its capacity objects) and the
# sidecar's RBAC; the rest of Stead's install (namespace, CSIDriver, RBAC,
# admission policies, its own classes) stays, as tests/e2e/deploy.sh left
# it. local-path: its namespace (the provisioner, its ConfigMap, its helper
# pods) and its cluster RBAC.
#
# Claims and PersistentVolumes are never deleted: PVs the removed
# provisioner made stay (and are named on stderr) until it is deployed again.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
  local IFS='|'
  bdie "usage: $0 ${BENCH_NAMES[*]}|all"
}
(($# == 1)) || usage
name=$1
[[ $name == all || " ${BENCH_NAMES[*]} " == *" $name "* ]] || usage

bench_cluster

# Which deployment Stead's DaemonSet is: the sidecar overlays say so in an
# annotation, tests/e2e/deploy.sh's has none. Empty when there is none.
current_agents() {
  local which
  which=$(bk -n "$BENCH_STEAD_NAMESPACE" get daemonset stead-node --ignore-not-found \
    -o jsonpath='{.metadata.name}/{.metadata.annotations.bench\.stead\.csi\.dev/name}')
  case $which in
    "") ;;
    stead-node/) echo stead ;;
    stead-node/*) echo "${which#stead-node/}" ;;
  esac
}

# remove_classes PROVISIONER: the benchmark's classes of that provisioner.
remove_classes() {
  local provisioner=$1 classes
  mapfile -t classes < <(bk get storageclasses -l bench.stead.csi.dev/class=true \
    -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.provisioner}{"\n"}{end}' |
    awk -v p="$provisioner" '$2 == p { print $1 }')
  ((${#classes[@]})) || return 0
  bk delete storageclass "${classes[@]}" --ignore-not-found >/dev/null
}

# warn_pvs PROVISIONER: names the PVs it made that are still there.
warn_pvs() {
  local provisioner=$1 pvs
  pvs=$(bk get pv -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.metadata.annotations.pv\.kubernetes\.io/provisioned-by}{"\n"}{end}' |
    awk -v p="$provisioner" '$2 == p { print $1 }')
  [[ -z $pvs ]] ||
    blog "warning: $(wc -l <<<"$pvs") PV(s) of $provisioner remain (not deleted): $(head -5 <<<"$pvs" | tr '\n' ' ')"
}

no_pods() {
  local out
  out=$(bk -n "$1" get pods -l "$2" -o name) || return 1
  [[ -z $out ]]
}

# Capacity objects still owned by the DaemonSet of uid $1 (the garbage
# collector deletes them after it).
no_capacity_of() {
  local out
  out=$(bk -n "$BENCH_STEAD_NAMESPACE" get csistoragecapacities \
    -o jsonpath='{range .items[*]}{.metadata.ownerReferences[*].uid}{"\n"}{end}') || return 1
  ! grep -qw "$1" <<<"$out"
}

remove_agents() {
  local uid
  uid=$(bk -n "$BENCH_STEAD_NAMESPACE" get daemonset stead-node --ignore-not-found -o jsonpath='{.metadata.uid}')
  if [[ -n $uid ]]; then
    blog "removing Stead's DaemonSet ($(current_agents))"
    # Foreground: the DaemonSet goes once its pods are gone.
    bk -n "$BENCH_STEAD_NAMESPACE" delete daemonset stead-node --cascade=foreground \
      --wait=true --timeout=180s >/dev/null
    bench_wait "Stead's agent pods gone" 180 no_pods "$BENCH_STEAD_NAMESPACE" app.kubernetes.io/name=stead
    bench_wait "the capacity objects of the removed DaemonSet gone" 120 no_capacity_of "$uid"
  fi
  bk delete -f "$BENCH_SRC/anchors/sidecar/defaults/csi-provisioner-rbac.yaml" --ignore-not-found >/dev/null
  remove_classes stead.csi.dev
  warn_pvs stead.csi.dev
}

remove_local_path() {
  if [[ -n $(bk get namespace "$BENCH_LPP_NAMESPACE" --ignore-not-found -o name) ]]; then
    blog "removing local-path-provisioner (namespace $BENCH_LPP_NAMESPACE)"
    # The namespace goes once everything in it is gone, its pods included.
    bk delete namespace "$BENCH_LPP_NAMESPACE" --wait=true --timeout=180s >/dev/null
  fi
  bk delete clusterrolebinding local-path-provisioner-bind --ignore-not-found >/dev/null
  bk delete clusterrole local-path-provisioner-role --ignore-not-found >/dev/null
  remove_classes rancher.io/local-path
  warn_pvs rancher.io/local-path
}

current_env_name() {
  [[ -r $BENCH_STATE/current.env ]] || return 0
  # shellcheck disable=SC1091
  (source "$BENCH_STATE/current.env" && echo "${BENCH_NAME:-}")
}

case $name in
  all)
    remove_agents
    remove_local_path
    rm -f "$BENCH_STATE/current.env"
    ;;
  stead | sidecar-*)
    agents=$(current_agents)
    if [[ -n $agents && $agents != "$name" ]]; then
      blog "$name is not deployed (Stead's DaemonSet is $agents): nothing removed"
      exit 0
    fi
    remove_agents
    ;;
  local-path)
    remove_local_path
    ;;
esac
if [[ $name != all && $(current_env_name) == "$name" ]]; then
  rm -f "$BENCH_STATE/current.env"
fi
