#!/usr/bin/env bash
# Prints, one a line, the host PIDs of every process of the provisioner
# deploy.sh deployed ($BENCH_STATE/current.env): every process of every
# container of its pods, sandboxes (pause) and sidecars included, and for
# local-path the helper pods that exist at this moment; so that a driver can
# sample /proc/PID/status (VmRSS) and /proc/PID/stat (utime, stime).
#
#   tests/bench/anchors/pids.sh
#
# Found through the nodes' containerd, not the apiserver: the running tasks
# of the containers whose pod is in the deployment's namespace (each holds
# that deployment's pods only: stead-system, local-path-storage), then every
# process in each task's PID namespace (a container's children and their
# children live there too). The nodes share the host's PID namespace, so
# these are host PIDs. Prints nothing when no such container runs.
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/../lib.sh"

(($# == 0)) || bdie "usage: $0 (no arguments; the deployment is $BENCH_STATE/current.env's)"
[[ -r $BENCH_STATE/current.env ]] || bdie "nothing deployed ($BENCH_STATE/current.env is missing): run tests/bench/anchors/deploy.sh NAME"
# shellcheck disable=SC1091
source "$BENCH_STATE/current.env"
[[ -n ${BENCH_NAMESPACE:-} ]] || bdie "$BENCH_STATE/current.env names no BENCH_NAMESPACE"
[[ -r $STATE/nodes.count ]] || bdie "no local cluster in $STATE: run make cluster-up"

# The init process of each running task of the namespace's containers.
inits=()
for i in $(node_indexes); do
  [[ -S $(node_containerd_sock "$i") ]] ||
    bdie "the containerd of $(node_name "$i") is not running ($(node_containerd_sock "$i"))"
  # kubelet labels every container (sandboxes too) with its pod's namespace.
  containers=$(ctr_k8s "$i" containers list --quiet "labels.\"io.kubernetes.pod.namespace\"==$BENCH_NAMESPACE")
  [[ -n $containers ]] || continue
  # "TASK PID STATUS" lines after a header.
  mapfile -t -O "${#inits[@]}" inits < <(ctr_k8s "$i" tasks list |
    awk 'NR == FNR { want[$1] = 1; next } FNR > 1 && $3 == "RUNNING" && ($1 in want) { print $2 }' \
      <(echo "$containers") -)
done
((${#inits[@]})) || exit 0

# Every process whose PID namespace is one of those tasks'. A task in the
# host's PID namespace (hostPID) stands for itself alone.
# find exits 1 when a process of the glob exits before it reads the link,
# which is common while pods start and stop: that process is simply gone.
host_ns=$(readlink /proc/self/ns/pid)
{ find /proc/[0-9]*/ns/pid -maxdepth 0 -printf '%p %l\n' 2>/dev/null || true; } |
  awk -v host="$host_ns" -v inits="${inits[*]}" '
    BEGIN { n = split(inits, list, " "); for (k = 1; k <= n; k++) init[list[k]] = 1 }
    { split($1, part, "/"); pid = part[3]; ns[pid] = $2 }
    END {
      for (p in init) if (p in ns) { if (ns[p] == host) print p; else want[ns[p]] = 1 }
      for (p in ns) if (ns[p] in want) print p
    }' | sort -nu
