#!/usr/bin/env bash
# Stops the cluster that up.sh started, and only it: the processes named by its
# pid files, the containers of its own containerd. Pods are deleted through the
# API first, so that the kubelet unmounts their volumes (CSI NodeUnpublish and
# NodeUnstage) while their driver still runs; whatever the kubelet left
# mounted below /var/lib/kubelet is unmounted after. Safe to run twice.
# --quiet: say nothing when there was nothing to stop.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"
take_cluster_lock

quiet=
[[ ${1:-} == --quiet ]] && quiet=1
say() { [[ -n $quiet ]] || log "$@"; }

stop_component() {
  local name=$1 pid i
  if pid=$(component_pid "$name"); then
    say "stopping $name ($pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
      [[ -e /proc/$pid ]] || break
      sleep 0.1
    done
    [[ -e /proc/$pid ]] && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$PIDS/$name.pid"
}

# delete_pods_of LABEL NAMESPACE/NAME...: deletes the pods, waits until gone.
delete_pods_of() {
  local label=$1 pod
  shift
  (($#)) || return 0
  say "deleting $# pod(s): $label"
  for pod in "$@"; do
    kubectl_admin delete pod -n "${pod%%/*}" "${pod#*/}" --grace-period=2 --wait=false >/dev/null 2>&1 || true
  done
  local left=("$@") still deadline=$((SECONDS + 60))
  while ((${#left[@]})) && ((SECONDS < deadline)); do
    sleep 1
    still=()
    for pod in "${left[@]}"; do
      [[ -n $(kubectl_admin get pod -n "${pod%%/*}" "${pod#*/}" --ignore-not-found -o name 2>/dev/null) ]] &&
        still+=("$pod")
    done
    left=("${still[@]}")
  done
  ((${#left[@]} == 0)) || log "warning: not gone after 60 s: ${left[*]}"
}

# Deletes every pod through the API: workloads first, the DaemonSet pods
# (CSI drivers among them) last, so that volumes are unpublished by their driver.
delete_pods() {
  local rows ns name kind daemonsets=() others=()
  rows=$(kubectl_admin get pods -A --request-timeout=5s -o \
    jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name} {.metadata.ownerReferences[0].kind}{"\n"}{end}') ||
    return 0
  while read -r ns name kind; do
    [[ -n $name ]] || continue
    if [[ $kind == DaemonSet ]]; then daemonsets+=("$ns/$name"); else others+=("$ns/$name"); fi
  done <<<"$rows"
  delete_pods_of workloads "${others[@]}"
  delete_pods_of "DaemonSet pods" "${daemonsets[@]}"
}

[[ -d $STATE ]] || [[ -S $CONTAINERD_SOCK ]] || exit 0
was_running=
for c in "${COMPONENTS[@]}"; do
  component_pid "$c" >/dev/null && was_running=1
done
[[ -n $was_running ]] || say "cluster is not running; removing what a stopped one may have left"

# Nothing may recreate what is deleted: controllers and scheduler stop first.
stop_component kube-controller-manager
stop_component kube-scheduler
if component_pid kubelet >/dev/null && probe_apiserver readyz >/dev/null 2>&1; then
  delete_pods
fi
stop_component kubelet
stop_component kube-proxy
if [[ -e $STATE/config/kube-proxy.yaml ]]; then
  "$BIN/kube-proxy" --cleanup --v=0 >/dev/null 2>&1 || true
fi
stop_component kube-apiserver
stop_component etcd

if component_pid containerd >/dev/null; then
  sweep_containers
fi
stop_component containerd
# Shims of our containerd that outlived it (found by its socket path, which
# no other containerd uses).
for cmdline in /proc/[0-9]*/cmdline; do
  if { tr '\0' ' ' <"$cmdline"; } 2>/dev/null | grep -- "-address $CONTAINERD_SOCK " >/dev/null; then
    pid=${cmdline#/proc/}
    kill -KILL "${pid%/cmdline}" 2>/dev/null || true
  fi
done

unmount_below "$KUBELET_DIR"
unmount_below "$CONTAINERD_STATE"
unmount_below "$CONTAINERD_ROOT"
# Never crosses into a mount that could not be undone.
rm -rf --one-file-system "$KUBELET_DIR" "$CONTAINERD_STATE"

# Host network pieces of up.sh.
for link in "$POD_BRIDGE" "$NODE_LINK"; do
  ip link show "$link" >/dev/null 2>&1 && ip link delete "$link"
done
while iptables -w -D FORWARD -s "$POD_CIDR" ! -d "$POD_CIDR" -m comment --comment stead-cluster \
  -j REJECT --reject-with icmp-net-prohibited 2>/dev/null; do :; done
if [[ -r $STATE/ip_forward.before ]]; then
  sysctl -qw "net.ipv4.ip_forward=$(<"$STATE/ip_forward.before")"
  rm -f "$STATE/ip_forward.before"
fi
[[ -z $was_running ]] || say "cluster down (logs kept in $LOGS)"
