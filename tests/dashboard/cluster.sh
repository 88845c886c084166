#!/usr/bin/env bash
# The workload behind `make dashboard` on the bundled cluster, captured as it
# runs (capture.sh --cluster):
#
#   cluster.sh CAPTURE_DIR [--interval S]
#
# In namespace stead-dashboard (removed first if a previous run left it, and
# at the end): 30 claims of the e2e classes, each with a busybox pod that
# writes into it, created five at a time; all Bound and Running; one claim,
# of `stead-xfs`, grown online from 320Mi to 384Mi (xfs grows mounted without
# CAP_SYS_RESOURCE, which ext4's online resize needs and this machine's root
# lacks: tests/e2e/tests/volumes.rs); half the pods and claims deleted and
# their PVs waited out; a quiet minute. Every wait has a deadline; on any
# failure the capture stops and the namespace goes.
set -euo pipefail
cd "$(dirname "$0")/../.."

die() { printf '[dashboard] error: %s\n' "$*" >&2; exit 1; }
say() { printf '[dashboard] [%3d s] %s\n' $((SECONDS - start)) "$*" >&2; }
(($# >= 1)) || die "usage: $0 CAPTURE_DIR [--interval S]"
out=$1
interval=5
[[ ${2:-} != --interval ]] || interval=$3
env_file=${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}/env
[[ -r $env_file ]] || die "no local cluster ($env_file is missing): run make cluster-up"
# shellcheck disable=SC1090
source "$env_file"
ns=stead-dashboard
claims=30
start=$SECONDS
k() { "$KUBECTL" -n "$ns" "$@"; }

"$KUBECTL" -n stead-system rollout status daemonset/stead-node --timeout=120s >/dev/null ||
  die "the Stead agents are not all Ready: run make deploy"
# The e2e classes this cluster has (stead-btrfs comes with tests/e2e/deploy.sh).
classes=()
for c in stead stead-dir stead-btrfs; do
  if "$KUBECTL" get storageclass "$c" >/dev/null 2>&1; then classes+=("$c"); fi
done
[[ ${classes[0]:-} == stead ]] || die "no StorageClass stead: run make deploy"
"$KUBECTL" get storageclass stead-xfs >/dev/null || die "no StorageClass stead-xfs: run make deploy"

if "$KUBECTL" get namespace "$ns" >/dev/null 2>&1; then
  say "removing the previous run's namespace $ns"
  "$KUBECTL" delete namespace "$ns" --wait=true --timeout=300s >/dev/null
fi
rm -rf "$out"
mkdir -p "$out"
stop=$out/stop capture=''
# Whatever ends the script (done, a failed wait, Ctrl-C): the capture stops
# after its round, and the namespace goes with its claims.
finish() {
  local rc=$?
  touch "$stop"
  if [[ -n $capture ]]; then wait "$capture" || rc=1; fi
  say "removing namespace $ns"
  "$KUBECTL" delete namespace "$ns" --wait=true --timeout=300s >/dev/null || rc=1
  exit "$rc"
}
trap finish EXIT
"$KUBECTL" create namespace "$ns" >/dev/null
tests/dashboard/capture.sh "$out" --interval "$interval" --duration 1800 --until "$stop" --cluster &
capture=$!

# One claim and its pod; the pod writes 8 MiB into the volume, then sleeps.
# dash-00 is the one that grows: xfs, which refuses filesystems under 300 MB.
manifest() { # index, class
  local name size=64Mi class=$2
  name=$(printf 'dash-%02d' "$1")
  if (($1 == 0)); then class=stead-xfs size=320Mi; fi
  cat <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $name
  labels: {app: stead-dashboard}
spec:
  storageClassName: $class
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: $size}}
---
apiVersion: v1
kind: Pod
metadata:
  name: $name
  labels: {app: stead-dashboard}
spec:
  terminationGracePeriodSeconds: 2
  containers:
    - name: main
      image: ${STEAD_BUSYBOX_IMAGE:-localhost/busybox:stead}
      imagePullPolicy: IfNotPresent
      command: [sh, -c, "trap 'exit 0' TERM; dd if=/dev/zero of=/data/fill bs=1M count=8 && sync; while true; do sleep 1; done"]
      volumeMounts: [{name: data, mountPath: /data}]
  volumes:
    - name: data
      persistentVolumeClaim: {claimName: $name}
YAML
}

# The sleeps below pace the workload, not wait for it: a dashboard shows
# time series, so idle stretches between the phases are what it must draw.
say "a quiet start (20 s)"
sleep 20
say "$claims claims of ${classes[*]}, each with a pod, five at a time"
for ((i = 0; i < claims; i += 5)); do
  for ((j = i; j < i + 5 && j < claims; j++)); do
    manifest "$j" "${classes[j % ${#classes[@]}]}"
    echo ---
  done | k apply -f - >/dev/null
  sleep 5
done
say "waiting for every pod to be Ready (its claim Bound, its volume mounted)"
k wait --for=condition=Ready pod -l app=stead-dashboard --timeout=300s >/dev/null || {
  k get pvc,pods -o wide >&2
  die "not every pod is Ready within 300 s"
}
bound=$(k get pvc -l app=stead-dashboard -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c '^Bound$' || true)
((bound == claims)) || die "$bound of $claims claims Bound"
say "all $claims pods Ready"

say "dash-00 (class stead-xfs, mounted) grows to 384Mi"
k patch pvc dash-00 --type merge -p '{"spec":{"resources":{"requests":{"storage":"384Mi"}}}}' >/dev/null
k wait --for=jsonpath='{.status.capacity.storage}'=384Mi pvc/dash-00 --timeout=180s >/dev/null || {
  k get pvc dash-00 -o yaml >&2
  die "dash-00 does not report 384Mi within 180 s"
}
say "dash-00 is 384Mi"
sleep 30

half=()
for ((i = 1; i < claims; i += 2)); do half+=("$(printf 'dash-%02d' "$i")"); done
pvs=()
for c in "${half[@]}"; do pvs+=("pv/$(k get pvc "$c" -o jsonpath='{.spec.volumeName}')"); done
say "deleting ${#half[@]} pods and their claims (reclaim Delete)"
for c in "${half[@]}"; do
  k delete pod "$c" --wait=false >/dev/null
  k delete pvc "$c" --wait=false >/dev/null
  sleep 1
done
k wait --for=delete "${half[@]/#/pod/}" --timeout=180s >/dev/null
"$KUBECTL" wait --for=delete "${pvs[@]}" --timeout=300s >/dev/null
say "their PVs are gone"

say "a quiet end (60 s)"
sleep 60
say "done"
