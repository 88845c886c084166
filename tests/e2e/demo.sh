#!/usr/bin/env bash
# The seed's StatefulSet on the bundled local cluster, step by step: three
# replicas, each on its own node-local volume; delete a pod and its data is
# still there. `make demo` deploys Stead first. Talks to the local cluster
# through its own kubeconfig, never the user's current context.
set -euo pipefail
cd "$(dirname "$0")/../.."

env_file=${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}/env
[[ -r $env_file ]] || { echo "no local cluster ($env_file): run make demo" >&2; exit 1; }
# shellcheck disable=SC1090
source "$env_file"
ns=stead-demo
start=$SECONDS

k() { "$KUBECTL" -n "$ns" "$@"; }
say() { printf '\n== [%3d s] %s\n' $((SECONDS - start)) "$*"; }
# Shows a command as a user would type it, then its output.
show() { printf '$ kubectl %s\n' "$*"; k "$@"; }
ready() {
  k wait --for=create "pod/$1" --timeout=120s >/dev/null
  k wait --for=condition=Ready "pod/$1" --timeout=120s >/dev/null
}
pvs() {
  printf '$ kubectl get pv\n'
  "$KUBECTL" get pv -o custom-columns='NAME:.metadata.name,CLAIM:.spec.claimRef.name,NAMESPACE:.spec.claimRef.namespace,CAPACITY:.spec.capacity.storage,CLASS:.spec.storageClassName,STATUS:.status.phase,NODE:.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]' |
    awk -v ns="$ns" 'NR == 1 || $3 == ns'
}

if "$KUBECTL" get namespace "$ns" >/dev/null 2>&1; then
  say "Removing the previous run's namespace $ns (its volumes go with its claims)"
  "$KUBECTL" delete namespace "$ns" --wait=true >/dev/null
fi
"$KUBECTL" create namespace "$ns" >/dev/null
say "Stead is running on every node (deployed from deploy/)"
printf '$ kubectl -n stead-system get pods\n'
"$KUBECTL" -n stead-system get pods -o wide

say "The seed's StatefulSet: 3 replicas, each with a 500Mi claim of StorageClass stead"
show apply -f deploy/examples/statefulset.yaml
for i in 0 1 2; do
  ready "db-ss-$i"
  say "db-ss-$i is Ready: its claim is Bound (pods start in order 0, 1, 2)"
  show get pvc,pods
done

say "Each claim has its own PV, provisioned by the node's agent and pinned to that node"
pvs

say "Each pod wrote its name and a random token into its volume"
for i in 0 1 2; do show exec "db-ss-$i" -- cat /data/token; done

say "Delete pod db-ss-1"
before=$(k exec db-ss-1 -- cat /data/token)
show delete pod db-ss-1
ready db-ss-1
say "db-ss-1 is back: same name, same claim, same PV, same node (its volume is there)"
show get pod db-ss-1 -o wide
show get pvc db-vol-db-ss-1
show exec db-ss-1 -- cat /data/token
after=$(k exec db-ss-1 -- cat /data/token)
if [[ $after != "$before" ]]; then
  echo "FAILED: db-ss-1's token was '$before', is now '$after'" >&2
  exit 1
fi
say "db-ss-1's data survived the pod: token $after"

say "On each node's disk: an image file per volume, its blocks reserved (allocated, then apparent size)"
if [[ -n ${STEAD_NODES_DIR:-} ]]; then
  for node in $STEAD_NODE_NAMES; do
    echo "$node:/var/lib/stead/pools/image (host folder $STEAD_NODES_DIR/$node/stead)"
    ls -lsh "$STEAD_NODES_DIR/$node"/stead/pools/image/*/disk.img 2>/dev/null | sed "s|$STEAD_NODES_DIR/$node/stead|/var/lib/stead|" || true
  done
else
  echo "(the nodes are not this machine)"
fi

cat <<TXT

The demo stays up. Look around with
  export KUBECONFIG=$KUBECONFIG
  kubectl -n $ns get pods,pvc; kubectl get pv
Clean up with: kubectl delete namespace $ns   (the volumes go with the claims)
Stop the cluster with: make cluster-down
TXT
