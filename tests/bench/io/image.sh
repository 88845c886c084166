#!/usr/bin/env bash
# The fio image of `make bench-io`: FROM scratch (buildah, tests/cluster's
# build_image), holding Debian's /usr/bin/fio, every shared library `ldd`
# lists for it and the dynamic loader; nothing else (the pod runs fio as its
# command, so no shell is needed). Installs the Debian package fio with
# apt-get when it is missing. Cached as an OCI archive in
# ~/.cache/stead/bench/fio-<package version>/, keyed by that version, the
# image's name and this script: a second run builds nothing.
#
#   tests/bench/io/image.sh      prints `IMAGE ARCHIVE` (one line)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../../cluster/lib.sh"
# shellcheck source=tests/cluster/images.sh
source "$here/../../cluster/images.sh"

blog() { printf '[bench-io] %s\n' "$*" >&2; }

if ! command -v fio >/dev/null || ! dpkg-query -W -f '${Status}' fio 2>/dev/null | grep -q 'install ok installed'; then
  blog "installing the Debian package fio"
  # Another apt-get may hold the lock (other builds on the machine): wait for it.
  apt_get=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
  if ! DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install fio >&2; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >&2
    DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install fio >&2
  fi
fi
fio_bin=$(command -v fio)
version=$(dpkg-query -W -f '${Version}' fio)
# An image tag allows letters, digits, '_', '.' and '-' (Debian versions may
# carry '+', '~' or an epoch's ':').
image=localhost/stead-bench-fio:$(tr -c 'A-Za-z0-9_.\n-' '_' <<<"$version")
dir=$STEAD_CACHE/bench/fio-$version
archive=$dir/fio.oci.tar
key=$({ printf '%s\n' "$version" "$image"; sha256sum <"$here/image.sh"; } | sha256sum | cut -c1-16)

if [[ ! -e $dir/.built-$key || ! -s $archive ]]; then
  blog "building image $image from fio $version"
  mkdir -p "$dir"
  stage=$(mktemp -d "${TMPDIR:-/tmp}/stead-bench-fio.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  install -D -m 0755 "$fio_bin" "$stage/usr/bin/fio"
  # Every library ldd resolves (`name => /path (addr)`) and the loader
  # (`/lib64/ld-linux-x86-64.so.2 (addr)`), at the path the binary looks for
  # it; the vDSO has no file.
  libs=$(ldd "$fio_bin" | sed -n 's/.*=> \(\/[^ ]*\) (0x[0-9a-f]*)$/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x[0-9a-f]*)$/\1/p')
  [[ -n $libs ]] || { blog "error: ldd lists no libraries for $fio_bin"; exit 1; }
  while read -r lib; do
    [[ -e $lib ]] || { blog "error: ldd names $lib, which does not exist"; exit 1; }
    install -D -m 0755 "$(readlink -f "$lib")" "$stage$lib"
  done <<<"$libs"
  # No ld.so.cache: the loader finds these in its default directories, and
  # the ceph libraries through the RUNPATH of the libraries that need them.
  mkdir -m 1777 "$stage/tmp"
  build_image "$image" "$archive.tmp" "$stage" /usr/bin/fio --version
  mv -f "$archive.tmp" "$archive"
  rm -f "$dir"/.built-*
  touch "$dir/.built-$key"
fi
echo "$image $archive"
