#!/usr/bin/env bash
# Smoke test of the running cluster, in a namespace of its own:
#   1. a busybox Pod runs to Succeeded;
#   2. a 2-replica StatefulSet becomes Ready in order (pod 0 Ready before pod 1 exists);
#   3. pods on the pod network and on the host network reach the apiserver
#      through the kubernetes Service with their service-account token;
#   4. every node is Ready with its hostname and zone labels, and a pod on the
#      first node reaches a pod on every node, directly and through a Service;
#   5. the VolumeSnapshot API: its three CRDs Established, the snapshot-controller
#      running and holding its leader Lease, a VolumeSnapshotClass created and
#      deleted, a pre-provisioned VolumeSnapshot bound to its content by the
#      controller and deleted (its log free of "forbidden": its RBAC suffices).
# Prints one line per check and a closing "N passed, N failed" line.
# Output is captured before it is searched: under pipefail, `cmd | grep -q`
# fails at random when grep exits before cmd has written everything (SIGPIPE).
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

NS=stead-smoke
SMOKE=$CLUSTER_SRC/smoke
passed=0
failed=0

k() { kubectl_admin -n "$NS" "$@"; }
pass() { passed=$((passed + 1)); echo "PASS $1"; }
fail() {
  failed=$((failed + 1))
  echo "FAIL $1: $2"
  k get pods -o wide 2>&1 | sed 's/^/    /'
  k get events --sort-by=.lastTimestamp 2>&1 | tail -n 15 | sed 's/^/    /'
}

if [[ ! -r $KUBECONFIG_ADMIN ]] || ! probe_apiserver readyz >/dev/null 2>&1; then
  die "no cluster is running (run make cluster-up)"
fi

kubectl_admin delete namespace "$NS" --ignore-not-found --wait --timeout=120s >/dev/null
kubectl_admin create namespace "$NS" >/dev/null
deadline=$((SECONDS + 30))
until k get serviceaccount default >/dev/null 2>&1; do
  ((SECONDS < deadline)) || die "namespace $NS got no default service account in 30 s (kube-controller-manager?)"
  sleep 0.5
done

# 1. A pod runs to completion.
name="busybox pod runs to Succeeded"
k apply -f "$SMOKE/once.yaml" >/dev/null
if k wait --for=jsonpath='{.status.phase}'=Succeeded pod/once --timeout=90s >/dev/null &&
  logs=$(k logs once) && grep -q '^smoke-ok from once$' <<<"$logs"; then
  pass "$name"
else
  fail "$name" "phase $(k get pod once -o jsonpath='{.status.phase}' 2>&1)"
fi

# 2. Ordered StatefulSet.
name="2-replica StatefulSet Ready in order"
k apply -f "$SMOKE/statefulset.yaml" >/dev/null
# Watch the rollout: ordered-1 must never be seen while ordered-0 is not Ready.
out_of_order=
deadline=$((SECONDS + 120))
while ((SECONDS < deadline)); do
  seen=$(k get pods -l app=ordered -o \
    jsonpath='{range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status} {end}')
  [[ $seen == *ordered-1=* && $seen != *ordered-0=True* ]] && out_of_order="saw: $seen"
  [[ $seen == *ordered-0=True*ordered-1=True* ]] && break
  sleep 0.3
done
if [[ -n $out_of_order ]]; then
  fail "$name" "ordered-1 existed before ordered-0 was Ready ($out_of_order)"
elif k rollout status statefulset/ordered --timeout=5s >/dev/null; then
  ready0=$(k get pod ordered-0 -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastTransitionTime}')
  created1=$(k get pod ordered-1 -o jsonpath='{.metadata.creationTimestamp}')
  # RFC 3339 UTC timestamps of one format compare as strings.
  if [[ -n $ready0 && ! $created1 < $ready0 ]]; then
    pass "$name (ordered-0 Ready $ready0, ordered-1 created $created1)"
  else
    fail "$name" "ordered-1 created $created1 before ordered-0 Ready $ready0"
  fi
else
  fail "$name" "not rolled out in 120 s"
fi

# 3. In-cluster clients reach the apiserver.
k apply -f "$SMOKE/apiserver-client.yaml" >/dev/null
for pod in in-cluster-pod-network in-cluster-host-network; do
  name="apiserver reachable from $pod"
  if k wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$pod" --timeout=90s >/dev/null &&
    logs=$(k logs "$pod") &&
    grep -Eq "\"username\": ?\"system:serviceaccount:$NS:default\"" <<<"$logs"; then
    pass "$name"
  else
    fail "$name" "$(k logs "$pod" 2>&1 | tail -n 3)"
  fi
done

# 4. Nodes and the network between them.
mapfile -t nodes < <(kubectl_admin get nodes -o \
  jsonpath='{range .items[*]}{.metadata.name} {.metadata.labels.kubernetes\.io/hostname} {.metadata.labels.topology\.kubernetes\.io/zone} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')
name="$(node_indexes | wc -l) node(s) Ready with hostname and zone labels"
want=() got=()
for i in $(node_indexes); do want+=("$(node_name "$i") $(node_name "$i") $(node_zone "$i") True"); done
mapfile -t got < <(printf '%s\n' "${nodes[@]}" | sort)
if [[ "${got[*]}" == "${want[*]}" ]]; then pass "$name"; else fail "$name" "got: ${got[*]}; want: ${want[*]}"; fi

for i in $(node_indexes); do
  n=$(node_name "$i")
  k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: web-$i
  labels: {app: web, node: "$n"}
spec:
  nodeName: $n
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, 'mkdir -p /www && echo "web on $n" > /www/index.html && exec httpd -f -p 8080 -h /www']
YAML
done
last=$(node_name "$(node_indexes | tail -1)")
k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Service
metadata:
  name: web-last
spec:
  selector: {app: web, node: "$last"}
  ports: [{port: 80, targetPort: 8080}]
YAML
name="pods reach pods on every node and a Service on $last"
if k wait --for=condition=Ready pod -l app=web --timeout=90s >/dev/null; then
  script=
  for i in $(node_indexes); do
    ip=$(k get pod "web-$i" -o jsonpath='{.status.podIP}')
    # (this busybox's wget -T crashes; timeout bounds it instead)
    script+="timeout 10 wget -q -O - http://$ip:8080/; "
  done
  # The Service's rules are written by kube-proxy a moment after its creation.
  script+="for t in \$(seq 30); do
    timeout 5 wget -q -O - http://\$WEB_LAST_SERVICE_HOST:80/ 2>/dev/null && exit 0; sleep 1; done; exit 1"
  k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: web-client
spec:
  nodeName: $(node_name 1)
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, '$script']
YAML
  want=
  for i in $(node_indexes); do want+="web on $(node_name "$i") "; done
  want+="web on $last"
  if k wait --for=jsonpath='{.status.phase}'=Succeeded pod/web-client --timeout=90s >/dev/null &&
    logs=$(k logs web-client) && [[ $(tr '\n' ' ' <<<"$logs" | sed 's/ $//') == "$want" ]]; then
    pass "$name"
  else
    fail "$name" "client said: $(k logs web-client 2>&1 | tr '\n' '|'); want: $want"
  fi
else
  fail "$name" "web pods not Ready in 90 s"
fi

# 5. The VolumeSnapshot API.
name="VolumeSnapshot CRDs Established"
bad=()
for c in "${SNAPSHOT_CRDS[@]}"; do
  st=$(kubectl_admin get crd "$c.snapshot.storage.k8s.io" \
    -o jsonpath='{.status.conditions[?(@.type=="Established")].status}' 2>&1) || true
  [[ $st == True ]] || bad+=("$c: ${st:-no Established condition}")
done
if ((${#bad[@]} == 0)); then pass "$name (${SNAPSHOT_CRDS[*]})"; else fail "$name" "${bad[*]}"; fi

lease=$SNAPSHOT_CONTROLLER_LEASE_NS/$SNAPSHOT_CONTROLLER_LEASE
name="snapshot-controller running and holding Lease $lease"
if ! pid=$(component_pid snapshot-controller); then
  fail "$name" "not running"
elif ! probe_snapshot_controller >/dev/null 2>&1; then
  fail "$name" "pid $pid: http://$SNAPSHOT_CONTROLLER_ADDR/healthz/leader-election fails"
elif ! snapshot_controller_leads; then
  fail "$name" "pid $pid; Lease: $(kubectl_admin -n "$SNAPSHOT_CONTROLLER_LEASE_NS" get lease \
    "$SNAPSHOT_CONTROLLER_LEASE" -o jsonpath='{.spec.holderIdentity}' 2>&1), want $(snapshot_controller_identity)"
else
  pass "$name (pid $pid, holder $(snapshot_controller_identity))"
fi

# Cluster-scoped, so a throwaway name that the namespace's deletion would not clean.
class=stead-smoke-$$-$RANDOM
name="VolumeSnapshotClass created and deleted"
if ! kubectl_admin apply -f - >/dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotClass
metadata:
  name: $class
driver: smoke.stead.csi.dev
deletionPolicy: Delete
YAML
then
  fail "$name" "create refused"
elif ! back=$(kubectl_admin get volumesnapshotclass "$class" -o jsonpath='{.driver} {.deletionPolicy}' 2>&1) ||
  [[ $back != "smoke.stead.csi.dev Delete" ]]; then
  fail "$name" "read back: $back"
elif ! kubectl_admin delete volumesnapshotclass "$class" --wait --timeout=30s >/dev/null; then
  fail "$name" "delete failed"
elif [[ -n $(kubectl_admin get volumesnapshotclass "$class" --ignore-not-found -o name) ]]; then
  fail "$name" "still there after its deletion"
else
  pass "$name ($class)"
fi
kubectl_admin delete volumesnapshotclass "$class" --ignore-not-found >/dev/null 2>&1 || true

# A pre-provisioned snapshot needs no CSI driver: binding it to its content
# (the content's volumeSnapshotRef.uid, the content's bound-protection
# finalizer, the snapshot's status) and releasing it are the
# snapshot-controller's own work. Only a driver's csi-snapshotter sidecar
# takes the finalizer off a content, so the test does that for the missing one.
content=stead-smoke-$$-$RANDOM
content_finalizer=snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection
name="pre-provisioned VolumeSnapshot bound to its content by the snapshot-controller, then deleted"
k apply -f - >/dev/null <<YAML
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshotContent
metadata:
  name: $content
spec:
  deletionPolicy: Retain
  driver: smoke.stead.csi.dev
  source:
    snapshotHandle: smoke-handle
  volumeSnapshotRef:
    name: pre-provisioned
    namespace: $NS
---
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: pre-provisioned
spec:
  source:
    volumeSnapshotContentName: $content
YAML
if ! k wait --for=jsonpath='{.status.boundVolumeSnapshotContentName}'="$content" \
  volumesnapshot/pre-provisioned --timeout=60s >/dev/null; then
  fail "$name" "not bound in 60 s: $(k get volumesnapshot pre-provisioned -o jsonpath='{.status}' 2>&1)"
elif ! uid=$(k get volumesnapshot pre-provisioned -o jsonpath='{.metadata.uid}') ||
  ! bound=$(kubectl_admin get volumesnapshotcontent "$content" \
    -o jsonpath='{.spec.volumeSnapshotRef.uid} {.metadata.finalizers}') ||
  [[ -z $uid || $bound != "$uid "*"\"$content_finalizer\""* ]]; then
  fail "$name" "content's volumeSnapshotRef.uid and finalizers: '$bound'; the snapshot's uid: $uid"
elif ! k delete volumesnapshot pre-provisioned --wait --timeout=60s >/dev/null; then
  fail "$name" "not deleted in 60 s (finalizers: $(k get volumesnapshot pre-provisioned \
    -o jsonpath='{.metadata.finalizers}' 2>&1))"
elif forbidden=$(grep -i forbidden "$LOGS/snapshot-controller.log" | tail -n 3); [[ -n $forbidden ]]; then
  fail "$name" "the controller was refused: $forbidden"
else
  pass "$name"
fi
# Deleted first: the controller puts the finalizer back on a content that is
# not being deleted.
kubectl_admin delete volumesnapshotcontent "$content" --ignore-not-found --wait=false >/dev/null 2>&1 || true
kubectl_admin patch volumesnapshotcontent "$content" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
kubectl_admin wait --for=delete volumesnapshotcontent "$content" --timeout=30s >/dev/null 2>&1 ||
  echo "warning: VolumeSnapshotContent $content is left"

if ((failed == 0)); then
  kubectl_admin delete namespace "$NS" --wait=false >/dev/null
else
  echo "namespace $NS kept for inspection"
fi
echo "cluster-smoke: $passed passed, $failed failed"
((failed == 0))
