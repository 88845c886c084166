#!/usr/bin/env bash
# Deploys one of the benchmark's provisioners on the running bundled cluster,
# after removing whichever is deployed:
#
#   tests/bench/anchors/deploy.sh stead|sidecar-defaults|sidecar-tuned|local-path
#
#   stead             Stead's DaemonSet as tests/e2e/deploy.sh deploys it
#   sidecar-defaults  the same agents with their provisioner off and
#                     external-provisioner beside each (sidecar/defaults/)
#   sidecar-tuned     the same, csi-provisioner tuned (sidecar/tuned/)
#   local-path        rancher/local-path-provisioner (local-path/)
#
# and waits until it is ready to provision: its pods Ready, its provisioner
# controllers started, and for Stead's CSI driver the scheduler's capacity
# objects of the benchmark's class published for every node. Then it makes
# the StorageClasses bench-wffc (WaitForFirstConsumer) and, where the
# provisioner binds at once, bench-immediate (Immediate), both reclaimPolicy
# Delete and, for Stead's driver, on the dir pool; and writes
# $BENCH_STATE/current.env (KEY='value' lines, as bash reads them):
#
#   BENCH_NAME, BENCH_VERSION (human-readable), BENCH_CLASS_WFFC,
#   BENCH_CLASS_IMMEDIATE (empty when unsupported), BENCH_PROVISIONER (the
#   provisioner name of the classes), BENCH_NAMESPACE (where its pods run)
#
# Stead's image archive is `make image`'s (STEAD_IMAGE_ARCHIVE overrides);
# the anchors' images are built (cached) and imported by build.sh --load.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() {
  local IFS='|'
  bdie "usage: $0 ${BENCH_NAMES[*]}"
}
(($# == 1)) || usage
name=$1
[[ " ${BENCH_NAMES[*]} " == *" $name "* ]] || usage

bench_cluster
cd "$BENCH_REPO"

"$BENCH_SRC/anchors/undeploy.sh" all
mkdir -p "$BENCH_STATE"
rm -f "$BENCH_STATE/current.env"

mapfile -t nodes < <(bk get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
((${#nodes[@]})) || bdie "the cluster has no nodes"

need_stead_archive() {
  [[ -r $BENCH_STEAD_ARCHIVE ]] ||
    bdie "no Stead image at $BENCH_STEAD_ARCHIVE: run make image (or set STEAD_IMAGE_ARCHIVE)"
}

# make_class NAME BINDING PROVISIONER [PARAMETER=VALUE...]
make_class() {
  local class=$1 binding=$2 provisioner=$3 kv
  shift 3
  {
    cat <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $class
  labels:
    bench.stead.csi.dev/class: "true"
provisioner: $provisioner
volumeBindingMode: $binding
reclaimPolicy: Delete
YAML
    if (($#)); then
      echo "parameters:"
      for kv in "$@"; do printf '  %s: "%s"\n' "${kv%%=*}" "${kv#*=}"; done
    fi
  } | bk apply -f - >/dev/null
}

# The nodes that have a CSIStorageCapacity of class $1 owned by the object
# with uid $2 (Stead's agents and csi-provisioner both publish one per node
# and class, owned by the DaemonSet, selecting topology.stead.csi.dev/node).
capacity_nodes() {
  local class=$1 uid=$2
  bk -n "$BENCH_STEAD_NAMESPACE" get csistoragecapacities -o \
    jsonpath='{range .items[*]}{.storageClassName}{" "}{.metadata.ownerReferences[0].uid}{" "}{.nodeTopology.matchLabels.topology\.stead\.csi\.dev/node}{"\n"}{end}' |
    awk -v class="$class" -v uid="$uid" '$1 == class && $2 == uid && NF == 3 { print $3 }' | sort -u
}

capacity_published() {
  local have
  have=$(capacity_nodes "$1" "$2")
  [[ $have == "$(printf '%s\n' "${nodes[@]}" | sort -u)" ]]
}

wait_capacity() {
  local class=$1 uid
  uid=$(bk -n "$BENCH_STEAD_NAMESPACE" get daemonset stead-node -o jsonpath='{.metadata.uid}')
  if ! (bench_wait "capacity of $class on ${nodes[*]}" 120 capacity_published "$class" "$uid"); then
    bk -n "$BENCH_STEAD_NAMESPACE" get csistoragecapacities -o wide >&2 || true
    bdie "no CSIStorageCapacity of class $class on every node (${nodes[*]}) after 120 s; published for: $(capacity_nodes "$class" "$uid" | tr '\n' ' ')"
  fi
}

# Whether container $3 of every pod with label selector $2 in namespace $1
# logged that its provisioner controller started (the line
# sig-storage-lib-external-provisioner writes once its informers synced).
controllers_started() {
  local ns=$1 selector=$2 container=$3 pod pods log
  mapfile -t pods < <(bk -n "$ns" get pods -l "$selector" -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
  ((${#pods[@]})) || return 1
  for pod in "${pods[@]}"; do
    # Read whole: grep -q stopping early would fail kubectl (SIGPIPE).
    log=$(bk -n "$ns" logs "$pod" -c "$container") || return 1
    grep -q 'Started provisioner controller' <<<"$log" || return 1
  done
}

wait_controllers() {
  local ns=$1 selector=$2 container=$3
  if ! (bench_wait "the $container controllers ($ns, $selector)" 120 controllers_started "$ns" "$selector" "$container"); then
    bk -n "$ns" logs -l "$selector" -c "$container" --tail=20 >&2 || true
    bdie "$container did not start its provisioner controller within 120 s (logs above)"
  fi
}

rollout() {
  local ns=$1 what=$2 selector=$3
  if ! bk -n "$ns" rollout status "$what" --timeout=180s >&2; then
    bk -n "$ns" get pods -o wide >&2 || true
    bk -n "$ns" describe pods -l "$selector" | tail -n 40 >&2 || true
    bdie "$what in $ns did not become ready"
  fi
}

stead_version() {
  echo "Stead $(git -C "$BENCH_REPO" describe --tags --always --dirty 2>/dev/null || echo unknown)"
}

case $name in
  stead)
    need_stead_archive
    blog "deploying Stead (tests/e2e/deploy.sh $BENCH_STEAD_ARCHIVE)"
    tests/e2e/deploy.sh "$BENCH_STEAD_ARCHIVE" >&2
    make_class "$BENCH_WFFC_CLASS" WaitForFirstConsumer stead.csi.dev pool=dir
    make_class "$BENCH_IMMEDIATE_CLASS" Immediate stead.csi.dev pool=dir
    wait_capacity "$BENCH_WFFC_CLASS"
    provisioner=stead.csi.dev
    namespace=$BENCH_STEAD_NAMESPACE
    immediate=$BENCH_IMMEDIATE_CLASS
    version="$(stead_version) (in-process provisioner)"
    ;;
  sidecar-defaults | sidecar-tuned)
    variant=${name#sidecar-}
    need_stead_archive
    "$BENCH_SRC/anchors/build.sh" --load >/dev/null
    tests/cluster/load-image "$BENCH_STEAD_ARCHIVE" >/dev/null
    blog "deploying Stead without its provisioner + external-provisioner $BENCH_EXTERNAL_PROVISIONER_VERSION ($variant)"
    bk apply -k "$BENCH_SRC/anchors/sidecar/$variant" >/dev/null
    rollout "$BENCH_STEAD_NAMESPACE" daemonset/stead-node app.kubernetes.io/name=stead
    make_class "$BENCH_WFFC_CLASS" WaitForFirstConsumer stead.csi.dev pool=dir
    # Distributed external-provisioner takes Immediate claims too: each
    # node's instance tries to claim one after a random delay.
    make_class "$BENCH_IMMEDIATE_CLASS" Immediate stead.csi.dev pool=dir
    wait_controllers "$BENCH_STEAD_NAMESPACE" app.kubernetes.io/name=stead csi-provisioner
    wait_capacity "$BENCH_WFFC_CLASS"
    provisioner=stead.csi.dev
    namespace=$BENCH_STEAD_NAMESPACE
    immediate=$BENCH_IMMEDIATE_CLASS
    version="$(stead_version) + external-provisioner $BENCH_EXTERNAL_PROVISIONER_VERSION ($variant)"
    ;;
  local-path)
    "$BENCH_SRC/anchors/build.sh" --load >/dev/null
    # kustomize takes a base by relative path only: an overlay in
    # BENCH_STATE over local-path/, whose config.json lists every node.
    overlay=$BENCH_STATE/local-path
    rm -rf "$overlay"
    mkdir -p "$overlay"
    python3 - "$overlay/config-patch.yaml" "${nodes[@]}" <<'PY'
import json, sys
out, nodes = sys.argv[1], sys.argv[2:]
config = {"nodePathMap": [{"node": n, "paths": ["/var/lib/stead/local-path"]} for n in nodes]}
with open(out, "w") as f:
    f.write("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: local-path-config\n"
            "  namespace: local-path-storage\ndata:\n  config.json: |-\n")
    for line in json.dumps(config, indent=2).splitlines():
        f.write("    " + line + "\n")
PY
    cat >"$overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$overlay" "$BENCH_SRC/anchors/local-path")
patches:
  - path: config-patch.yaml
YAML
    blog "deploying local-path-provisioner $BENCH_LPP_VERSION on ${nodes[*]}"
    bk apply -k "$overlay" >/dev/null
    rollout "$BENCH_LPP_NAMESPACE" deployment/local-path-provisioner app=local-path-provisioner
    # Only WaitForFirstConsumer: with a nodePathMap it needs the node the
    # scheduler picked (an Immediate claim fails "no node was specified").
    make_class "$BENCH_WFFC_CLASS" WaitForFirstConsumer rancher.io/local-path
    wait_controllers "$BENCH_LPP_NAMESPACE" app=local-path-provisioner local-path-provisioner
    provisioner=rancher.io/local-path
    namespace=$BENCH_LPP_NAMESPACE
    immediate=
    version="local-path-provisioner $BENCH_LPP_VERSION"
    ;;
esac

# KEY='value', a ' in the value written '\'' (none of these has one).
env_line() { printf "%s='%s'\n" "$1" "${2//\'/\'\\\'\'}"; }
tmp=$BENCH_STATE/current.env.new
{
  env_line BENCH_NAME "$name"
  env_line BENCH_VERSION "$version"
  env_line BENCH_CLASS_WFFC "$BENCH_WFFC_CLASS"
  env_line BENCH_CLASS_IMMEDIATE "$immediate"
  env_line BENCH_PROVISIONER "$provisioner"
  env_line BENCH_NAMESPACE "$namespace"
} >"$tmp"
mv "$tmp" "$BENCH_STATE/current.env"
blog "ready: $version on ${#nodes[@]} node(s); $BENCH_STATE/current.env"
