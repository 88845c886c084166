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
printf '%-36s %-8s %-10s %s\n' total "" "" "$((total_kib / 1024)) MiB (components only; pods not counted)"
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
