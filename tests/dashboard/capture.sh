#!/usr/bin/env bash
# Scrapes Stead agents' /metrics every few seconds and keeps every answer,
# as Prometheus' scrape loop would have seen it (the layout is in
# go/capture.go):
#
#   capture.sh OUT [--interval S] [--duration S] [--until FILE] --cluster
#   capture.sh OUT [--interval S] [--duration S] [--until FILE] [NAME=]URL...
#
# --cluster: the agents of the bundled cluster ($STEAD_CLUSTER_DIR/env), each
# pod labelled app.kubernetes.io/name=stead in stead-system through the
# apiserver's pod proxy on its health port; the instance is the pod's node
# (listed again at every round, so a rolled agent is followed). A URL: that
# endpoint, its instance NAME or else the URL's host:port.
#
# Stops after --duration seconds (default 300), as soon as --until FILE
# exists, or on SIGTERM/SIGINT, always after a whole round.
set -euo pipefail

die() { printf '[capture] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[capture] %s\n' "$*" >&2; }

(($# >= 1)) || die "usage: $0 OUT [--interval S] [--duration S] [--until FILE] (--cluster | [NAME=]URL...)"
out=$1
shift
interval=5 duration=300 until_file='' cluster=0
targets=()
while (($#)); do
  case $1 in
  --interval) interval=$2; shift 2 ;;
  --duration) duration=$2; shift 2 ;;
  --until) until_file=$2; shift 2 ;;
  --cluster) cluster=1; shift ;;
  -*) die "unknown option $1" ;;
  *) targets+=("$1"); shift ;;
  esac
done
[[ $interval =~ ^[0-9]+$ && $interval -ge 1 ]] || die "--interval $interval: whole seconds, at least 1"
[[ $duration =~ ^[0-9]+$ ]] || die "--duration $duration: whole seconds"
((cluster || ${#targets[@]})) || die "nothing to scrape: --cluster or URLs"

# The health port as deploy/base/daemonset.yaml names it.
health_port=9809
ns=stead-system
if ((cluster)); then
  env_file=${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}/env
  [[ -r $env_file ]] || die "no local cluster ($env_file is missing): run make cluster-up"
  # shellcheck disable=SC1090
  source "$env_file"
fi

mkdir -p "$out/scrapes"
{
  echo "interval=$interval"
  if ((cluster)); then echo "source=cluster"; else echo "source=${targets[*]}"; fi
  echo "started=$(date -u +%FT%TZ)"
} >"$out/meta"

stop=0
trap 'stop=1' TERM INT

# One scrape: the body into <ms>.om (through .part, so that a reader never
# takes half of one), or why it failed into <ms>.err.
scrape() { # instance, then the command that prints the body
  local inst=$1 ms dir
  shift
  ms=$(date +%s%3N)
  dir=$out/scrapes/$inst
  mkdir -p "$dir"
  if "$@" >"$dir/$ms.om.part" 2>"$dir/$ms.why"; then
    mv "$dir/$ms.om.part" "$dir/$ms.om"
    rm -f "$dir/$ms.why"
  else
    mv "$dir/$ms.why" "$dir/$ms.err"
    rm -f "$dir/$ms.om.part"
  fi
}

round() {
  local t name url pod node
  if ((cluster)); then
    while read -r pod node; do
      [[ -n $pod ]] || continue
      scrape "$node" "$KUBECTL" get --request-timeout=10s --raw \
        "/api/v1/namespaces/$ns/pods/$pod:$health_port/proxy/metrics" &
    done < <("$KUBECTL" -n "$ns" get pods -l app.kubernetes.io/name=stead \
      -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName}{"\n"}{end}' || true)
  fi
  for t in "${targets[@]}"; do
    if [[ $t == *=* ]]; then name=${t%%=*} url=${t#*=}; else name='' url=$t; fi
    if [[ -z $name ]]; then name=${url#*://}; name=${name%%/*}; fi
    scrape "$name" curl -fsS --max-time 10 "$url" &
  done
  until wait; do :; done # a signal ends wait early: wait again
}

# Milliseconds since the epoch into variable $1 (bash's clock: no fork).
now_ms() { local t=${EPOCHREALTIME/[.,]/}; printf -v "$1" '%d' $((t / 1000)); }

log "scraping every ${interval}s for up to ${duration}s into $out"
start=$SECONDS
rounds=0
t0=0 now=0
now_ms t0
next=$t0
while :; do
  next=$((next + interval * 1000))
  round
  rounds=$((rounds + 1))
  ((stop == 0)) || break
  [[ -z $until_file || ! -e $until_file ]] || break
  now_ms now
  ((now - t0 < duration * 1000)) || break
  # Rounds start every interval from the first (a slow round shortens the
  # wait, never shifts the ones after); the sleep is in short steps, so that
  # a signal or the --until file ends it soon.
  while ((now < next && stop == 0)); do
    sleep 0.2
    now_ms now
  done
  ((stop == 0)) || break
done
ok=$(find "$out/scrapes" -name '*.om' | wc -l)
bad=$(find "$out/scrapes" -name '*.err' | wc -l)
log "$rounds rounds in $((SECONDS - start))s: $ok scrapes, $bad failed"
if ((bad)); then
  first=$(find "$out/scrapes" -name '*.err' | sort | head -1)
  log "first failure ($first): $(head -c 400 "$first")"
fi
# A capture of nothing would draw an empty dashboard that looks like a quiet
# cluster: it fails instead.
((ok > 0)) || die "no scrape succeeded"
