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

# The nodes that exist on this machine, by what they left: a network
# namespace, a mount namespace file, a folder, a cgroup root.
found_nodes() {
  {
    ip netns list 2>/dev/null | awk '{print $1}'
    ls "$MNTNS_DIR" 2>/dev/null
    ls "$NODES_DIR" 2>/dev/null
    for h in /sys/fs/cgroup/*/; do ls -d "$h$NODE_PREFIX"* 2>/dev/null | xargs -r -n1 basename; done
  } | grep -E "^$NODE_PREFIX[0-9]+\$" | sort -u | sed "s/^$NODE_PREFIX//"
}
mapfile -t nodes < <(found_nodes)

[[ -d $STATE ]] || ((${#nodes[@]})) || ip link show "$HOST_LINK" >/dev/null 2>&1 || exit 0
was_running=
for c in "${CONTROL_PLANE[@]}"; do component_pid "$c" >/dev/null && was_running=1; done
for i in "${nodes[@]}"; do
  for c in "${NODE_COMPONENTS[@]}"; do component_pid "$(node_name "$i").$c" >/dev/null && was_running=1; done
done
[[ -n $was_running ]] || say "cluster is not running; removing what a stopped one may have left"

# Nothing may recreate what is deleted: controllers and scheduler stop first.
stop_component kube-controller-manager
stop_component kube-scheduler
stop_component snapshot-controller
kubelets=
for i in "${nodes[@]}"; do component_pid "$(node_name "$i").kubelet" >/dev/null && kubelets=1; done
if [[ -n $kubelets ]] && probe_apiserver readyz >/dev/null 2>&1; then
  delete_pods
fi

# kill_node_processes I: every process of node I: those in its network or
# mount namespace (its components, containerd's shims) and those in its
# cgroup tree (its containers, which have namespaces of their own).
kill_node_processes() {
  local i=$1 name pids=()
  name=$(node_name "$i")
  mapfile -t pids < <(node_mnt_pids "$i")
  mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$name" 2>/dev/null)
  mapfile -t -O "${#pids[@]}" pids < <(find /sys/fs/cgroup/*/"$name" -name cgroup.procs -exec cat {} + 2>/dev/null)
  ((${#pids[@]})) || return 0
  mapfile -t pids < <(printf '%s\n' "${pids[@]}" | sort -un)
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

# remove_node I: everything up.sh made for node I, in reverse.
remove_node() {
  local i=$1 name dir mnt h loops=() dev disk_dev img
  name=$(node_name "$i")
  dir=$(node_dir "$i")
  mnt=$(node_mntns "$i")
  stop_component "$name.kube-proxy"
  stop_component "$name.kubelet"
  if component_pid "$name.containerd" >/dev/null; then sweep_containers "$i"; fi
  stop_component "$name.containerd"
  # Twice: a process may fork while the first round runs.
  kill_node_processes "$i"
  kill_node_processes "$i"
  # The namespaces go with their last process and their pin.
  if [[ -e $mnt ]]; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    rm -f "$mnt"
  fi
  ip netns delete "$name" 2>/dev/null || true
  ip link delete "stead-n$i" 2>/dev/null || true
  ip route delete "$(node_pod_cidr "$i")" 2>/dev/null || true
  # Cgroups, deepest first (each is empty once its processes are gone).
  for h in /sys/fs/cgroup/*/; do
    [[ -d $h$name ]] || continue
    find "$h$name" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  # Loop devices on images of the node's disk (the volumes of its image
  # pools), then the disk itself.
  if disk_dev=$(findmnt -n -o MAJ:MIN --target "$dir/stead" 2>/dev/null) && mountpoint -q "$dir/stead"; then
    mapfile -t loops < <(losetup --list --noheadings --output NAME,BACK-MAJ:MIN 2>/dev/null |
      awk -v d="$disk_dev" '$2 == d {print $1}')
    for dev in "${loops[@]}"; do losetup --detach "$dev" 2>/dev/null || true; done
    umount "$dir/stead" 2>/dev/null || umount -l "$dir/stead" 2>/dev/null || true
  fi
  if mountpoint -q "$dir/btrfs"; then
    umount "$dir/btrfs" 2>/dev/null || umount -l "$dir/btrfs" 2>/dev/null || true
  fi
  for img in "$dir/disk.img" "$dir/btrfs.img"; do
    [[ -e $img ]] || continue
    mapfile -t loops < <(losetup --noheadings --output NAME --associated "$img" 2>/dev/null)
    for dev in "${loops[@]}"; do losetup --detach "$dev" 2>/dev/null || true; done
  done
  unmount_below "$dir"
  # Never crosses into a mount that could not be undone.
  rm -rf --one-file-system "$dir"
}

for i in "${nodes[@]}"; do remove_node "$i" & done
wait
stop_component kube-apiserver
stop_component etcd

# Host network pieces of up.sh (and of the single-node layout before it).
for link in "$HOST_LINK" stead-pods0; do
  ip link show "$link" >/dev/null 2>&1 && ip link delete "$link"
done
ip route delete "$SERVICE_CIDR" 2>/dev/null || true
for dir in "-i $HOST_LINK ! -o $HOST_LINK" "! -i $HOST_LINK -o $HOST_LINK"; do
  # shellcheck disable=SC2086 # two words each
  while iptables -w -D FORWARD $dir -m comment --comment stead-cluster \
    -j REJECT --reject-with icmp-net-prohibited 2>/dev/null; do :; done
done
while iptables -w -D FORWARD -s "$POD_CIDR" ! -d "$POD_CIDR" -m comment --comment stead-cluster \
  -j REJECT --reject-with icmp-net-prohibited 2>/dev/null; do :; done
if [[ -r $STATE/ip_forward.before ]]; then
  sysctl -qw "net.ipv4.ip_forward=$(<"$STATE/ip_forward.before")"
  rm -f "$STATE/ip_forward.before"
fi
if mountpoint -q "$MNTNS_DIR"; then umount "$MNTNS_DIR" 2>/dev/null || true; fi
rm -f "$STATE/nodes.count"

# What would make the next cluster-up start unclean, said by name.
left=()
mapfile -t -O 0 left < <(ip netns list 2>/dev/null | awk -v p="$NODE_PREFIX" 'index($1, p) == 1 {print "network namespace " $1}')
mapfile -t -O "${#left[@]}" left < <(findmnt -rn -o TARGET | grep -E "^($NODES_DIR|$MNTNS_DIR)(/|\$)" | sed 's/^/mount /')
mapfile -t -O "${#left[@]}" left < <(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^stead-n[0-9]+(@|$)/ || $2 == "'"$HOST_LINK"'" {print "link " $2}')
mapfile -t -O "${#left[@]}" left < <(ls -d /sys/fs/cgroup/*/"$NODE_PREFIX"* 2>/dev/null | sed 's/^/cgroup /')
mapfile -t -O "${#left[@]}" left < <(losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null | awk -v d="$NODES_DIR/" 'index($2, d) == 1 {print "loop device " $1 " on " $2}')
if ((${#left[@]})); then
  log "warning: left behind: ${left[*]}"
fi
[[ -z $was_running ]] || say "cluster down (logs kept in $LOGS)"
