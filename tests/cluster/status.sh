#!/usr/bin/env bash
# Shows each component of the cluster (pid, health, RSS): the control plane,
# then every node's; then the nodes as the apiserver sees them.
# Exit 0 when all are running and healthy, 1 otherwise.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

# health COMPONENT [NODE_INDEX]
health() {
  case $1 in
    etcd) probe "http://127.0.0.1:$ETCD_CLIENT_PORT/health" ;;
    kube-apiserver) probe_apiserver readyz ;;
    kube-controller-manager) probe -k https://127.0.0.1:10257/healthz ;;
    kube-scheduler) probe -k https://127.0.0.1:10259/healthz ;;
    snapshot-controller) probe_snapshot_controller && snapshot_controller_leads ;;
    containerd) ctr --address "$(node_containerd_sock "$2")" version ;;
    kubelet) probe "http://$(node_ip "$2"):10248/healthz" ;;
    kube-proxy) probe "http://$(node_ip "$2"):10256/healthz" ;;
  esac
}

ok=0
total_kib=0
# row NAME PIDFILE_NAME COMPONENT [NODE_INDEX]
row() {
  local name=$1 pidname=$2 c=$3 i=${4:-} rss=- pid state kib
  if pid=$(component_pid "$pidname"); then
    if health "$c" "$i" >/dev/null 2>&1; then state=healthy; else state=unhealthy; ok=1; fi
    kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total_kib=$((total_kib + kib))
    rss="$((kib / 1024)) MiB"
  else
    pid=- state=stopped ok=1
  fi
  printf '%-36s %-8s %-10s %s\n' "$name" "$pid" "$state" "$rss"
}

[[ -r $STATE/nodes.count ]] || { echo "no cluster in $STATE (make cluster-up)"; exit 1; }
printf '%-36s %-8s %-10s %s\n' COMPONENT PID STATE RSS
for c in "${CONTROL_PLANE[@]}"; do row "$c" "$c" "$c"; done
for i in $(node_indexes); do
  n=$(node_name "$i")
  for c in "${NODE_COMPONENTS[@]}"; do row "$n/$c" "$n.$c" "$c" "$i"; done
done
printf '%-36s %-8s %-10s %s\n' components "" "" "$((total_kib / 1024)) MiB"

# rss_of PID...: the sum of their resident memory, KiB.
rss_of() {
  local p kib=0 k
  for p in "$@"; do
    k=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    kib=$((kib + ${k:-0}))
  done
  echo "$kib"
}
# What else each node runs: containerd's shims (in its mount namespace) and
# the containers of its pods (in its cgroup tree).
whole_kib=$total_kib
for i in $(node_indexes); do
  n=$(node_name "$i")
  shims=()
  for p in $(node_mnt_pids "$i"); do
    [[ $(readlink "/proc/$p/exe" 2>/dev/null) == *containerd-shim* ]] && shims+=("$p")
  done
  mapfile -t pods < <(find "/sys/fs/cgroup/memory/$n" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -un)
  s_kib=$(rss_of "${shims[@]}")
  p_kib=$(rss_of "${pods[@]}")
  whole_kib=$((whole_kib + s_kib + p_kib))
  printf '%-36s %-8s %-10s %s\n' "$n/pods" "${#pods[@]}" processes \
    "$((p_kib / 1024)) MiB (+ $((s_kib / 1024)) MiB in ${#shims[@]} shims)"
done
printf '%-36s %-8s %-10s %s\n' "whole cluster" "" "" "$((whole_kib / 1024)) MiB (sum of RSS: components, shims, pods)"
echo
for i in $(node_indexes); do
  n=$(node_name "$i")
  printf '%s: address %s, pods %s, zone %s, netns %s, mount ns %s, folders %s\n' "$n" "$(node_ip "$i")" \
    "$(node_pod_cidr "$i")" "$(node_zone "$i")" "$n" "$(node_mntns "$i")" "$(node_dir "$i")"
done
if [[ $ok == 0 ]]; then
  echo
  kubectl_admin get nodes -o wide -L topology.kubernetes.io/zone
  echo
  echo "state: $STATE   kubectl: $KUBECTL_BIN"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
fi
exit "$ok"
