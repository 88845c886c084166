#!/usr/bin/env bash
# What a running `make bench-scale` has done so far, read from outside it:
# claims by phase and class prefix, PVs, pods Running, the agents' VmRSS
# (median, max) and their own count of apiserver requests, and the CPU of
# the apiserver since it started. For a run too long to wait for.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/scale/lib.sh
source "$here/lib.sh"
[[ -r $SCALE_KUBECONFIG ]] || sdie "no bench-scale is running ($SCALE_KUBECONFIG is missing)"
k() { "$KUBECTL_BIN" --kubeconfig "$SCALE_KUBECONFIG" "$@"; }

date -u '+%H:%M:%S UTC'
echo "claims (prefix phase count):"
k get pvc -n scale --no-headers -o custom-columns=N:.metadata.name,P:.status.phase |
  awk '{split($1, a, "-"); n[a[1] " " $2]++} END {for (x in n) print "  " x, n[x]}' | sort
echo "PVs: $(k get pv --no-headers 2>/dev/null | wc -l)"
echo "pods Running: $(k get pods -n scale --no-headers --field-selector status.phase=Running 2>/dev/null | wc -l)"
echo "pods not scheduled yet: $(k get pods -n scale --no-headers --field-selector spec.nodeName= 2>/dev/null | wc -l)"

rss=() requests=0
for f in "$SCALE_PIDS"/stead.*.pid; do
  [[ -e $f ]] || continue
  name=$(basename "$f" .pid)
  pid=$(scale_pid "$name") || continue
  rss+=("$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")")
  port=$((SCALE_AGENT_PORT_BASE + ${name#stead.}))
  r=$(curl -fsS --max-time 5 "http://127.0.0.1:$port/metrics" |
    awk '/^stead_apiserver_requests_total\{/ {s += $NF} END {printf "%d", s}') || r=0
  requests=$((requests + r))
done
if ((${#rss[@]})); then
  mapfile -t rss < <(printf '%s\n' "${rss[@]}" | sort -n)
  printf 'agents: %d running; VmRSS median %.1f MiB, max %.1f MiB; requests sent %d\n' "${#rss[@]}" \
    "$(bc -l <<<"${rss[$((${#rss[@]} / 2))]} / 1024")" "$(bc -l <<<"${rss[-1]} / 1024")" "$requests"
fi
if pid=$(scale_pid kube-apiserver); then
  read -r ut st start < <(awk '{print $14, $15, $22}' "/proc/$pid/stat")
  up=$(awk '{print $1}' /proc/uptime)
  tck=$(getconf CLK_TCK)
  printf 'kube-apiserver: %.0f CPU s over %.0f s since it started: %.2f cores\n' \
    "$(bc -l <<<"($ut + $st) / $tck")" "$(bc -l <<<"$up - $start / $tck")" \
    "$(bc -l <<<"(($ut + $st) / $tck) / ($up - $start / $tck)")"
fi
