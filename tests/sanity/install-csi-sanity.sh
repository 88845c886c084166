#!/usr/bin/env bash
# Installs the pinned csi-sanity into a per-version cache outside the repo and
# prints the binary's path on stdout (the only thing printed there).
#
#   tests/sanity/install-csi-sanity.sh        → ~/.cache/stead/go-tools/csi-sanity-<ver>/csi-sanity
#
# A cached binary is reused as is, so a second call returns at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/sanity/versions.env
source "$here/versions.env"

cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/stead/go-tools"
bin_dir="$cache_root/csi-sanity-$CSI_SANITY_VERSION"
bin="$bin_dir/csi-sanity"

if [[ -x "$bin" ]]; then
  echo "csi-sanity $CSI_SANITY_VERSION (cached)" >&2
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "install-csi-sanity: 'go' is not on PATH" >&2; exit 1; }
echo "csi-sanity $CSI_SANITY_VERSION: go install into $bin_dir" >&2

# Build into a scratch directory and rename it into place, so an interrupted
# install never leaves a half-written binary that a later call would trust.
mkdir -p "$cache_root"
staging="$(mktemp -d "$cache_root/.csi-sanity-$CSI_SANITY_VERSION.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

# GOTOOLCHAIN=local: build with the installed Go, never fetch another toolchain.
# GOFLAGS=-buildvcs=false: no VCS stamping outside a repository.
GOBIN="$staging" GOTOOLCHAIN=local GOFLAGS=-buildvcs=false \
  go install "$CSI_SANITY_MODULE/cmd/csi-sanity@$CSI_SANITY_VERSION" >&2

rm -rf "$bin_dir"
mv "$staging" "$bin_dir"
trap - EXIT
echo "$bin"
