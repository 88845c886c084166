#!/usr/bin/env bash
# Installs the node runtime the cluster needs from Debian's packages, when
# missing: containerd, runc, the CNI plugins, iptables/conntrack for
# kube-proxy, buildah and busybox-static for the images, jq for the
# upstream e2e tier's report.
set -euo pipefail
# shellcheck source=tests/cluster/lib.sh
source "$(dirname "$0")/lib.sh"

[[ $(id -u) == 0 ]] || die "must run as root: the kubelet mounts volumes and runs containers"

# command → Debian package that provides it
declare -A wanted=(
  [containerd]=containerd
  [runc]=runc
  [/usr/lib/cni/bridge]=containernetworking-plugins
  [iptables]=iptables
  [conntrack]=conntrack
  [buildah]=buildah
  [/bin/busybox]=busybox-static
  [openssl]=openssl
  [mount]=mount
  [ip]=iproute2
  [mkfs.xfs]=xfsprogs
  [mkfs.btrfs]=btrfs-progs
  [nsenter]=util-linux
  [cc]=gcc
  # The upstream e2e tier's report (tests/upstream/run.sh).
  [jq]=jq
)
missing=()
for cmd in "${!wanted[@]}"; do
  if [[ $cmd == /* ]]; then [[ -x $cmd ]] && continue
  else command -v "$cmd" >/dev/null && continue
  fi
  missing+=("${wanted[$cmd]}")
done
# busybox (the dynamic one) also installs /bin/busybox; the image wants the static one.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
# The static libc gcc links the pause program against.
[[ -e /usr/lib/x86_64-linux-gnu/libc.a || -e /usr/lib/$(uname -m)-linux-gnu/libc.a ]] || missing+=(libc6-dev)

if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  command -v apt-get >/dev/null ||
    die "missing packages: ${missing[*]}; install them with your distribution's package manager"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101: the packages must not start their own daemons (containerd
  # would grab /run/containerd); the cluster starts its own.
  policy=/usr/sbin/policy-rc.d
  created_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
  fi
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
    { [[ -n $created_policy ]] && rm -f "$policy"; die "could not install ${missing[*]} with apt-get; install them by hand"; }
  [[ -n $created_policy ]] && rm -f "$policy"
fi
exit 0
