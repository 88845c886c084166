#!/usr/bin/env bash
# Runs the upstream CSI conformance suite (csi-sanity) against a real
# `stead node` on a temporary unix socket.
#
#   tests/sanity/run-sanity.sh                     the matrix: dir/mount, image/mount, image/block
#   tests/sanity/run-sanity.sh BACKEND ACCESS [csi-sanity flags…]
#                                                  one run; BACKEND = dir|image, ACCESS = mount|block;
#                                                  extra flags go to csi-sanity (e.g. --ginkgo.focus=…)
#
# Needs root: the plugin mounts and attaches loop devices. Each run gets its
# own temp dir (socket, pool, staging and mount dirs); on exit, however it
# exits, the plugin is stopped and every mount and loop device under that dir
# is released before the dir is removed.
#
# Environment:
#   STEAD_BIN      use this stead binary instead of `cargo build --locked`
#   CSI_SANITY     use this csi-sanity binary instead of the pinned install
#   SANITY_OUT     where logs and reports are kept (default: target/sanity)
#   SANITY_VOLUME_SIZE  bytes per test volume (default 64 MiB: loop files,
#                  ext4; xfs would need ≥ 300 MiB on current xfsprogs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# shellcheck source=tests/sanity/versions.env
source "$here/versions.env"

out="${SANITY_OUT:-$repo/target/sanity}"
volume_size="${SANITY_VOLUME_SIZE:-$((64 * 1024 * 1024))}"
matrix=("dir mount" "image mount" "image block")

die() { echo "run-sanity: $*" >&2; exit 2; }

need_root() {
  [[ "$(id -u)" == 0 ]] || die "must run as root (the plugin mounts and attaches loop devices)"
}

# The binaries are resolved once and handed to every run through the environment.
resolve_binaries() {
  if [[ -z "${STEAD_BIN:-}" ]]; then
    echo "== cargo build --locked" >&2
    (cd "$repo" && cargo build --locked --bin stead)
    STEAD_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/stead"
  fi
  [[ -x "$STEAD_BIN" ]] || die "no stead binary at $STEAD_BIN"
  CSI_SANITY="${CSI_SANITY:-$("$here/install-csi-sanity.sh")}"
  [[ -x "$CSI_SANITY" ]] || die "no csi-sanity binary at $CSI_SANITY"
  export STEAD_BIN CSI_SANITY
}

# ---------------------------------------------------------------- the matrix

run_matrix() {
  need_root
  resolve_binaries
  local failed=() run backend access
  for run in "${matrix[@]}"; do
    read -r backend access <<<"$run"
    bash "${BASH_SOURCE[0]}" "$backend" "$access" || failed+=("$backend/$access")
  done

  echo
  echo "== csi-sanity $CSI_SANITY_VERSION, one line per run"
  for run in "${matrix[@]}"; do
    read -r backend access <<<"$run"
    printf '%-12s %s\n' "$backend/$access" "$(cat "$out/$backend-$access.summary" 2>/dev/null || echo 'no summary')"
  done
  if ((${#failed[@]})); then
    echo "csi-sanity FAILED for: ${failed[*]} (logs in $out)" >&2
    return 1
  fi
  echo "csi-sanity passed for every run (logs in $out)"
}

# ---------------------------------------------------------------- one run

tmp=""
plugin_pid=""

# Mount points at or under $1, deepest first (mountinfo field 5).
mounts_under() {
  awk -v root="$1" '$5 == root || index($5, root "/") == 1 { print $5 }' /proc/self/mountinfo |
    awk '{ print length($0) " " $0 }' | sort -rn | cut -d' ' -f2-
}

# Loop devices whose backing file lives under $1.
loops_under() {
  losetup --list --noheadings --raw --output NAME,BACK-FILE 2>/dev/null |
    awk -v root="$1" 'index($2, root "/") == 1 { print $1 }'
}

stop_plugin() {
  [[ -n "$plugin_pid" ]] || return 0
  if kill -0 "$plugin_pid" 2>/dev/null; then
    kill -TERM "$plugin_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
      kill -0 "$plugin_pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$plugin_pid" 2>/dev/null; then
      echo "run-sanity: stead (pid $plugin_pid) ignored SIGTERM for 15 s; killing it" >&2
      kill -KILL "$plugin_pid" 2>/dev/null || true
    fi
  fi
  wait "$plugin_pid" 2>/dev/null || true
  plugin_pid=""
}

cleanup() {
  local rc=$? m l leftovers=0
  stop_plugin
  if [[ -n "$tmp" && -d "$tmp" ]]; then
    # Stacked mounts show up again after the top one goes: loop until none.
    for _ in 1 2 3 4 5; do
      m="$(mounts_under "$tmp")"
      [[ -n "$m" ]] || break
      while read -r m; do
        echo "run-sanity: cleanup: umount $m (left by the run)" >&2
        umount "$m" 2>/dev/null || umount -l "$m" || true
      done <<<"$m"
    done
    while read -r l; do
      [[ -n "$l" ]] || continue
      echo "run-sanity: cleanup: losetup -d $l (left by the run)" >&2
      losetup -d "$l" || leftovers=1
    done <<<"$(loops_under "$tmp")"
    if [[ -n "$(mounts_under "$tmp")" ]]; then
      echo "run-sanity: cleanup: mounts remain under $tmp; not removing it" >&2
      leftovers=1
    else
      rm -rf --one-file-system "$tmp"
    fi
  fi
  ((leftovers == 0)) || rc=1
  exit "$rc"
}

wait_for_socket() {
  local sock=$1
  for _ in $(seq 1 300); do
    [[ -S "$sock" ]] && return 0
    kill -0 "$plugin_pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# The specs csi-sanity did not run, with the reason it gave (pending ones are
# disabled upstream), from ginkgo's JSON report.
list_skipped() {
  python3 - "$1" <<'PY'
import json, sys
for suite in json.load(open(sys.argv[1])):
    for spec in suite.get("SpecReports") or []:
        state = spec.get("State")
        if spec.get("LeafNodeType") != "It" or state not in ("skipped", "pending"):
            continue
        name = " ".join(spec.get("ContainerHierarchyTexts") or []) + " " + spec.get("LeafNodeText", "")
        if state == "pending":
            reason = "pending: disabled in csi-test itself (XIt)"
        else:
            reason = (spec.get("Failure") or {}).get("Message", "").strip() or "(no reason given)"
        print(f"{name.strip()}  —  {reason}")
PY
}

run_one() {
  local backend=$1 access=$2
  shift 2
  case "$backend" in dir | image) ;; *) die "backend must be dir or image, not '$backend'" ;; esac
  case "$access" in mount | block) ;; *) die "access must be mount or block, not '$access'" ;; esac
  need_root
  resolve_binaries

  local name="$backend-$access" lock
  mkdir -p "$out"
  # Two runs of the same kind at once (two engineers on one machine) would
  # overwrite each other's logs and reports: the second one waits.
  exec {lock}>"$out/$name.lock"
  if ! flock -n "$lock"; then
    echo "run-sanity: another $name run holds $out/$name.lock; waiting for it" >&2
    flock "$lock"
  fi
  rm -f "$out/$name".{log,json,summary,skipped,stead.log}

  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/stead-sanity-$name.XXXXXX")"
  mkdir "$tmp/pool"
  local sock="$tmp/csi.sock"

  echo "== csi-sanity $CSI_SANITY_VERSION: $backend backend, $access access (in $tmp)"
  # reserve=0: the pool lies on this machine's disk, whose free space the
  # run does not control; the default reserve (15% of it) is not under test.
  "$STEAD_BIN" node \
    --endpoint "unix://$sock" \
    --node-id sanity-node \
    --pool "sanity:$backend:$tmp/pool:reserve=0" \
    --kubelet-dir "$tmp" \
    --log-format text \
    >"$out/$name.stead.log" 2>&1 &
  plugin_pid=$!
  if ! wait_for_socket "$sock"; then
    if kill -0 "$plugin_pid" 2>/dev/null; then
      echo "run-sanity: stead did not create $sock within 30 s; its log:" >&2
    else
      echo "run-sanity: stead exited before serving $sock; its log:" >&2
    fi
    tail -n 40 "$out/$name.stead.log" >&2
    echo "plugin did not start" >"$out/$name.summary"
    return 1
  fi

  printf 'pool: sanity\n' >"$tmp/parameters.yaml"
  # The staging and mount dirs must not exist: csi-sanity creates and
  # removes them around every spec.
  local rc=0
  "$CSI_SANITY" \
    --csi.endpoint "unix://$sock" \
    --csi.stagingdir "$tmp/staging" \
    --csi.mountdir "$tmp/mount" \
    --csi.testvolumesize "$volume_size" \
    --csi.testvolumeexpandsize "$((2 * volume_size))" \
    --csi.testvolumeaccesstype "$access" \
    --csi.testvolumeparameters "$tmp/parameters.yaml" \
    --ginkgo.no-color \
    --ginkgo.timeout 20m \
    --ginkgo.json-report "$out/$name.json" \
    "$@" 2>&1 | tee "$out/$name.log" || rc=$?

  if ! kill -0 "$plugin_pid" 2>/dev/null; then
    echo "run-sanity: stead exited during the run; tail of its log:" >&2
    tail -n 40 "$out/$name.stead.log" >&2
    rc=1
  fi

  # ginkgo's closing lines: "Ran N of M Specs in …" and "SUCCESS! -- N Passed | …".
  local ran verdict
  ran="$(grep -E '^Ran [0-9]+ of [0-9]+ Specs' "$out/$name.log" | tail -n 1 || true)"
  verdict="$(grep -E '[0-9]+ Passed \| [0-9]+ Failed' "$out/$name.log" | tail -n 1 || true)"
  echo "${ran:-no 'Ran' line} | ${verdict:-no verdict line} (exit $rc)" >"$out/$name.summary"
  if [[ -s "$out/$name.json" ]] && command -v python3 >/dev/null; then
    list_skipped "$out/$name.json" >"$out/$name.skipped" || true
    echo "-- specs not run ($(wc -l <"$out/$name.skipped")), with csi-sanity's reason:"
    sed 's/^/   /' "$out/$name.skipped"
  fi
  echo "-- $name: $(cat "$out/$name.summary")"
  return "$rc"
}

case $# in
  0) run_matrix ;;
  1) die "usage: $0 [BACKEND ACCESS [csi-sanity flags…]]" ;;
  *) run_one "$@" ;;
esac
