#!/usr/bin/env bash
# Stead installed, upgraded and uninstalled with its Helm chart on the bundled
# local cluster (make cluster-up), with the seed's StatefulSet on it:
#   1. the image imported into every node (as tests/e2e/deploy.sh does), a
#      Stead that deploy.sh applied taken down first (only while it has no
#      volumes; `make deploy` applies it again);
#   2. helm install with values-cluster.yaml (the e2e overlay's pools and
#      classes) and the image's digest as a pod annotation, into namespace
#      stead-system made and labelled as deploy/ has it (the release keeps
#      its record there, so the namespace is not the chart's: README);
#   3. the seed StatefulSet (deploy/examples/statefulset.yaml) Ready, a token
#      written into each replica's volume;
#   4. helm upgrade with another log format: the DaemonSet rolls, every agent
#      runs the new template, the tokens are still there, and still there
#      after each replica's pod is deleted and comes back (its volume staged
#      and published again by the new agents);
#   5. the workload deleted (its volumes reclaimed by the agents), helm
#      uninstall: every object of the release is gone, and the release too;
#      then the namespace.
# Waits on conditions (kubectl wait, rollout status, helm --wait), never on
# time. Talks to the cluster through its own kubeconfig.
#
#   tests/helm/install.sh <oci-archive>     (make helm-install-test builds it)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/helm/lib.sh
source "$here/lib.sh"
cd "$here/../.."

(($# == 1)) || die "usage: $0 <oci-archive>"
archive=$1
[[ -r $archive ]] || die "$archive: no such archive (make image)"
[[ -x $HELM_BIN ]] || die "$HELM_BIN is missing: run tests/helm/build.sh"
[[ -r $STATE/env ]] || die "no local cluster ($STATE/env is missing): run make cluster-up"
# shellcheck disable=SC1091
source "$STATE/env"

workload=stead-helm-test
out=target/helm/install
mkdir -p "$out"
passed=0
start=$SECONDS

k() { "$KUBECTL" "$@"; }
kw() { "$KUBECTL" -n "$workload" "$@"; }
helm() { "$HELM_BIN" --kubeconfig "$KUBECONFIG" --namespace "$RELEASE_NS" "$@"; }
step() { log "[$((SECONDS - start)) s] $*"; }
ok() {
  passed=$((passed + 1))
  log "ok: $*"
}
# On a failure: what the agents and the workload looked like.
dump_state() {
  k -n "$RELEASE_NS" get pods -o wide >&2 || true
  k -n "$RELEASE_NS" logs -l app.kubernetes.io/name=stead --tail=30 --prefix >&2 || true
  kw get pods,pvc -o wide >&2 || true
}
trap 'rc=$?; ((rc == 0)) || dump_state' EXIT

# The PVs of driver stead.csi.dev, one name a line.
stead_pvs() {
  k get pv -o jsonpath='{range .items[?(@.spec.csi.driver=="stead.csi.dev")]}{.metadata.name}{"\n"}{end}'
}

# Deletes the workload namespace and waits until its claims' volumes are
# reclaimed: the agents must still run for that.
delete_workload() {
  local pvs=() pv
  k get namespace "$workload" >/dev/null 2>&1 || return 0
  mapfile -t pvs < <(kw get pvc -o jsonpath='{range .items[*]}{.spec.volumeName}{"\n"}{end}' | sed '/^$/d')
  k delete namespace "$workload" --wait=true --timeout=180s >/dev/null
  for pv in "${pvs[@]}"; do
    k wait --for=delete "pv/$pv" --timeout=120s >/dev/null
  done
}

# --- 1. the cluster without another Stead --------------------------------

step "the cluster as this scenario needs it: no Stead but this release's"
delete_workload
if helm status "$RELEASE" >/dev/null 2>&1; then
  log "a release $RELEASE from an earlier run: uninstalling it"
  helm uninstall "$RELEASE" --wait --timeout 5m >/dev/null
fi
if k get csidriver stead.csi.dev >/dev/null 2>&1 || k get namespace "$RELEASE_NS" >/dev/null 2>&1; then
  # Applied from deploy/ (tests/e2e/deploy.sh): taken down, unless it still
  # has volumes, whose data only a running agent may delete.
  # Volumes whose claims an earlier suite deleted a moment ago are being
  # reclaimed by those agents: waited for (up to 180 s). A volume still
  # bound to a claim, or one that does not go, stops the scenario.
  volumes_left=$(stead_pvs)
  for ((waited = 0; waited < 180; waited += 2)); do
    [[ -n $volumes_left ]] || break
    bound=$(k get pv -o jsonpath='{range .items[?(@.spec.csi.driver=="stead.csi.dev")]}{.metadata.name}{" "}{.status.phase}{" "}{.spec.claimRef.namespace}{"/"}{.spec.claimRef.name}{"\n"}{end}' |
      while read -r pv phase ref; do
        [[ $phase == Bound ]] && k -n "${ref%%/*}" get pvc "${ref#*/}" >/dev/null 2>&1 && echo "$pv ($ref)"
      done || true)
    [[ -z $bound ]] || die "Stead is deployed (not by Helm) and has volumes in use; delete their claims first:
$bound"
    ((waited % 20)) || log "waiting for the volumes of deleted claims to be reclaimed: $(tr '\n' ' ' <<<"$volumes_left")"
    # The poll's interval, not its condition: the loop ends when the
    # volumes are gone (or one is still in use), at the latest after 90
    # polls.
    sleep 2
    volumes_left=$(stead_pvs)
  done
  [[ -z $volumes_left ]] || die "Stead is deployed (not by Helm) and has volumes that were not reclaimed in 180 s:
$(k get pv $volumes_left -o wide 2>&1)" # shellcheck disable=SC2086
  log "Stead deployed from deploy/: deleting it"
  k delete csidriver,clusterrole,clusterrolebinding,validatingadmissionpolicy,validatingadmissionpolicybinding \
    -l app.kubernetes.io/part-of=stead \
    --wait=true >/dev/null
  # Every class of the driver: the e2e overlay's stead-btrfs has no label.
  mapfile -t classes < <(k get storageclass \
    -o jsonpath='{range .items[?(@.provisioner=="stead.csi.dev")]}{.metadata.name}{"\n"}{end}' | sed '/^$/d')
  ((${#classes[@]} == 0)) || k delete storageclass "${classes[@]}" --wait=true >/dev/null
  if k get crd volumesnapshotclasses.snapshot.storage.k8s.io >/dev/null 2>&1; then
    k delete volumesnapshotclass -l app.kubernetes.io/part-of=stead --wait=true >/dev/null
  fi
  k delete namespace "$RELEASE_NS" --ignore-not-found --wait=true --timeout=180s >/dev/null
fi

step "the image $archive imported into every node"
tests/cluster/load-image "$archive" >/dev/null
digest=$(tar -xOf "$archive" index.json | grep -o 'sha256:[0-9a-f]\{64\}' | head -1)
[[ -n $digest ]] || die "$archive has no image manifest"

# --- 2. helm install -------------------------------------------------------

# The release keeps its record in its namespace: made first, with deploy/'s
# label, and not the chart's (namespace.create=false).
snapshots=false
k get crd volumesnapshotclasses.snapshot.storage.k8s.io >/dev/null 2>&1 && snapshots=true
install_args=(
  -f "$HELM_SRC/values-cluster.yaml"
  --set namespace.create=false
  --set "snapshotClass.enabled=$snapshots"
  --set-string "podAnnotations.stead\.csi\.dev/image-digest=$digest"
)
step "helm install $RELEASE $CHART (revision 1)"
k create namespace "$RELEASE_NS" >/dev/null
k label namespace "$RELEASE_NS" pod-security.kubernetes.io/enforce=privileged >/dev/null
helm install "$RELEASE" "$CHART" "${install_args[@]}" --wait --timeout 5m >/dev/null
k -n "$RELEASE_NS" rollout status daemonset/stead-node --timeout=180s >/dev/null
helm get manifest "$RELEASE" >"$out/manifest.yaml"
objects=$(k get -f "$out/manifest.yaml" -o name | wc -l)
want=$(grep -c '^kind:' "$out/manifest.yaml")
((objects == want)) || die "the release has $want objects, the cluster $objects of them"
# Every object of the release carries its labels (the chart's helpers).
unlabelled=$(k get -f "$out/manifest.yaml" \
  -o 'jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.labels.app\.kubernetes\.io/instance}{"\n"}{end}' |
  awk -v release="$RELEASE" '$2 != release')
[[ -z $unlabelled ]] || die "objects of the release without app.kubernetes.io/instance=$RELEASE: $unlabelled"
ok "installed: $objects objects, the agent Ready on every node"

# --- 3. the seed's workload -----------------------------------------------

step "the seed StatefulSet, a token in each replica's volume"
k create namespace "$workload" >/dev/null
kw apply -f deploy/examples/statefulset.yaml >/dev/null
kw rollout status statefulset/db-ss --timeout=300s >/dev/null
replicas=$(kw get statefulset db-ss -o 'jsonpath={.spec.replicas}')
declare -A token volume
for ((i = 0; i < replicas; i++)); do
  pod=db-ss-$i
  token[$pod]="$pod $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  kw exec "$pod" -- sh -c "echo '${token[$pod]}' > /data/helm-token && sync /data/helm-token"
  volume[$pod]=$(kw get pvc "db-vol-$pod" -o 'jsonpath={.spec.volumeName}')
done
ok "$replicas replicas Ready, each with a token on its own volume"

# tokens_kept WHEN: each replica reads its token back from the same PV.
tokens_kept() {
  local pod have pv
  for pod in "${!token[@]}"; do
    have=$(kw exec "$pod" -- cat /data/helm-token)
    pv=$(kw get pvc "db-vol-$pod" -o 'jsonpath={.spec.volumeName}')
    [[ $have == "${token[$pod]}" && $pv == "${volume[$pod]}" ]] ||
      die "$1: $pod reads '$have' from $pv; it wrote '${token[$pod]}' to ${volume[$pod]}"
  done
  ok "$1: every token is there, on the same volume"
}

# --- 4. helm upgrade ---------------------------------------------------------

step "helm upgrade $RELEASE --set logFormat=json (revision 2): the DaemonSet rolls"
generation=$(k -n "$RELEASE_NS" get daemonset stead-node -o 'jsonpath={.metadata.generation}')
helm upgrade "$RELEASE" "$CHART" --reuse-values --set logFormat=json --wait --timeout 5m >/dev/null
k -n "$RELEASE_NS" rollout status daemonset/stead-node --timeout=300s >/dev/null
format=$(k -n "$RELEASE_NS" get daemonset stead-node \
  -o 'jsonpath={.spec.template.spec.containers[0].env[?(@.name=="STEAD_LOG_FORMAT")].value}')
now=$(k -n "$RELEASE_NS" get daemonset stead-node -o 'jsonpath={.metadata.generation}')
revision=$(helm history "$RELEASE" --max 1 -o json | grep -o '"revision":[0-9]*' | cut -d: -f2)
[[ $format == json && $now -gt $generation && $revision == 2 ]] ||
  die "after the upgrade: log format '$format', generation $generation → $now, revision '$revision'"
# Every agent pod of the new template, and only those: rollout status saw
# them all updated and Ready.
desired=$(k -n "$RELEASE_NS" get daemonset stead-node -o 'jsonpath={.status.desiredNumberScheduled}')
updated=$(k -n "$RELEASE_NS" get daemonset stead-node -o 'jsonpath={.status.updatedNumberScheduled}')
((updated == desired)) || die "$updated of $desired agents run the upgraded template"
ok "upgraded: revision 2, $updated agents rolled to log format json"
tokens_kept "after the agents rolled"

step "each replica's pod deleted and back: its volume staged and published by the new agents"
for pod in "${!token[@]}"; do
  uid=$(kw get pod "$pod" -o 'jsonpath={.metadata.uid}')
  # Gone for good before the StatefulSet makes it again, same name.
  kw delete pod "$pod" --wait=true --timeout=120s >/dev/null
  kw wait --for=create "pod/$pod" --timeout=120s >/dev/null
  kw wait --for=condition=Ready "pod/$pod" --timeout=180s >/dev/null
  [[ $(kw get pod "$pod" -o 'jsonpath={.metadata.uid}') != "$uid" ]] || die "$pod was not made again"
done
tokens_kept "after each pod came back"

# --- 5. helm uninstall -------------------------------------------------------

step "the workload deleted: its volumes reclaimed by the agents"
delete_workload
ok "the workload's claims and volumes are gone"

step "helm uninstall $RELEASE: every object of the release gone"
helm get manifest "$RELEASE" >"$out/manifest.yaml"
# The agents' CSIStorageCapacity objects are not the release's but their
# DaemonSet's: the garbage collector deletes them after it.
mapfile -t capacities < <(k -n "$RELEASE_NS" get csistoragecapacities \
  -l csi.storage.k8s.io/drivername=stead.csi.dev -o name)
((${#capacities[@]} > 0)) || die "the agents published no CSIStorageCapacity in $RELEASE_NS"
helm uninstall "$RELEASE" --wait --timeout 5m >/dev/null
left=$(k get -f "$out/manifest.yaml" --ignore-not-found -o name)
[[ -z $left ]] || die "left after helm uninstall:
$left"
k -n "$RELEASE_NS" wait --for=delete "${capacities[@]}" --timeout=120s >/dev/null
"$HELM_BIN" --kubeconfig "$KUBECONFIG" list --all-namespaces --all -q | grep -qx "$RELEASE" &&
  die "helm still lists release $RELEASE"
ok "uninstalled: no object of the release, none of its ${#capacities[@]} capacity objects, no release"
k delete namespace "$RELEASE_NS" --wait=true --timeout=180s >/dev/null

echo "helm-install-test: $passed passed, 0 failed ($((SECONDS - start)) s)"
