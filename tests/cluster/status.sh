#!/usr/bin/env bash
# Shows each component of the cluster (pid, health) and the node.
# Exit 0 when all are running and healthy, 1 otherwise.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

health() {
  case $1 in
    etcd) probe "http://127.0.0.1:$ETCD_CLIENT_PORT/health" ;;
    containerd) ctr --address "$CONTAINERD_SOCK" version ;;
    kube-apiserver) probe_apiserver readyz ;;
    kube-controller-manager) probe -k https://127.0.0.1:10257/healthz ;;
    kube-scheduler) probe -k https://127.0.0.1:10259/healthz ;;
    kubelet) probe http://127.0.0.1:10248/healthz ;;
    kube-proxy) probe http://127.0.0.1:10256/healthz ;;
  esac
}

ok=0
total_kib=0
printf '%-24s %-8s %-10s %s\n' COMPONENT PID STATE RSS
for c in "${COMPONENTS[@]}"; do
  rss=-
  if pid=$(component_pid "$c"); then
    if health "$c" >/dev/null 2>&1; then state=healthy; else state=unhealthy; ok=1; fi
    kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    total_kib=$((total_kib + kib))
    rss="$((kib / 1024)) MiB"
  else
    pid=- state=stopped ok=1
  fi
  printf '%-24s %-8s %-10s %s\n' "$c" "$pid" "$state" "$rss"
done
printf '%-24s %-8s %-10s %s\n' total "" "" "$((total_kib / 1024)) MiB (components only; pods not counted)"
if [[ $ok == 0 ]]; then
  echo
  kubectl_admin get nodes -o wide
  echo
  echo "state: $STATE   kubectl: $KUBECTL_BIN"
  echo "export KUBECONFIG=$KUBECONFIG_ADMIN"
fi
exit "$ok"
