#!/usr/bin/env bash
# Builds the benchmark's anchors from the Go module proxy at the versions
# tests/bench/lib.sh pins, each with its OCI image FROM scratch (an archive
# that tests/cluster/load-image imports):
#
#   local-path-provisioner  (rancher/local-path-provisioner)
#   csi-provisioner         (kubernetes-csi/external-provisioner)
#
#   tests/bench/anchors/build.sh [--load]
#
# Prints the image names, one a line. Binaries and archives are cached in
# $BENCH_CACHE/<tool>-<version>/, keyed by their inputs: a second run builds
# nothing. --load also imports both images into every node of the running
# bundled cluster.
#
# Before a binary is built, the module version of every package it links is
# compared with what upstream's own module resolves to (go list in upstream's
# folder of the module cache): the two go.mod files of tests/bench/go/ must
# reproduce upstream's build, replace directives included, or nothing is
# built. The list is kept beside the binary (modules.txt).
set -euo pipefail
# shellcheck source=tests/bench/lib.sh
source "$(dirname "$0")/../lib.sh"

usage() { bdie "usage: $0 [--load]"; }
load=false
case $# in
  0) ;;
  1) [[ $1 == --load ]] || usage; load=true ;;
  *) usage ;;
esac

command -v go >/dev/null || bdie "go is missing: install Go 1.26 or newer (https://go.dev/dl) and put it on PATH"
command -v buildah >/dev/null || bdie "buildah is missing: apt-get install -y buildah"

mkdir -p "$BENCH_CACHE"
# One build at a time (deploy.sh runs this script too).
exec 8>"$BENCH_CACHE/.build.lock"
flock --timeout 1800 8 || bdie "another build holds $BENCH_CACHE/.build.lock"

# The module that provides each package linked into a binary, as
# "path resolved-path@version" (the replacement where a replace applies).
LINKED_FORMAT='{{with .Module}}{{if .Replace}}{{.Path}} {{.Replace.Path}}@{{.Replace.Version}}{{else}}{{.Path}} {{.Path}}@{{.Version}}{{end}}{{end}}'

# linked_modules DIR PKG SELF: those modules as DIR's module resolves them,
# the tool's own module (SELF) left out: it is the main module upstream.
linked_modules() {
  local dir=$1 pkg=$2 self=$3
  (cd "$dir" && go list -mod=readonly -deps -f "$LINKED_FORMAT" "$pkg") |
    awk -v self="$self" 'NF && $1 != self' | sort -u
}

# check_upstream MOD_DIR MODULE VERSION PKG OUT: MOD_DIR's go.mod pins
# MODULE at VERSION and links the same module versions into PKG as
# upstream's module does (and as upstream's vendor/modules.txt lists, where
# it has one); the list goes to OUT.
check_upstream() {
  local mod=$1 module=$2 version=$3 pkg=$4 out=$5 pinned updir ours theirs
  pinned=$(cd "$mod" && go list -m -f '{{.Version}}' "$module")
  [[ $pinned == "$version" ]] ||
    bdie "${mod#"$BENCH_REPO"/}/go.mod pins $module $pinned, tests/bench/lib.sh says $version: make them agree"
  updir=$(cd "$mod" && go mod download -json "$module@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
  [[ -r $updir/go.mod ]] || bdie "no go.mod in the module folder of $module@$version ('$updir')"
  ours=$(linked_modules "$mod" "$pkg" "$module")
  theirs=$(linked_modules "$updir" "$pkg" "$module")
  if [[ $ours != "$theirs" ]]; then
    diff <(echo "$theirs") <(echo "$ours") | sed 's/^</  upstream:/; s/^>/  ours:    /' >&2 || true
    bdie "${mod#"$BENCH_REPO"/} links other module versions into $pkg than $module@$version does (above): copy upstream's require and replace directives into its go.mod"
  fi
  if [[ -r $updir/vendor/modules.txt ]]; then
    local vendored missing
    # "# path version" or "# path version => path version".
    vendored=$(sed -n 's/^# \([^ ]*\) \([^ ]*\)$/\1 \1@\2/p; s/^# \([^ ]*\) [^ ]* => \([^ ]*\) \([^ ]*\)$/\1 \2@\3/p' \
      "$updir/vendor/modules.txt" | sort -u)
    missing=$(comm -23 <(echo "$ours") <(echo "$vendored"))
    [[ -z $missing ]] || bdie "modules linked into $pkg that upstream's vendor/modules.txt does not list at these versions: $missing"
  fi
  echo "$ours" >"$out"
  blog "$module@$version: the $(wc -l <"$out") modules linked into ${pkg##*/} are upstream's versions"
}

# build_tool NAME MOD_DIR MODULE VERSION PKG OUT_DIR LDFLAGS: the binary
# OUT_DIR/bin/NAME, unless the stamp of the same inputs is there.
build_tool() {
  local name=$1 mod=$2 module=$3 version=$4 pkg=$5 dir=$6 ldflags=$7 key stamp start
  key=$(bench_key "$mod/go.mod" "$mod/go.sum" <<<"$(go env GOVERSION) CGO_ENABLED=0 -trimpath -ldflags $ldflags $pkg")
  stamp=$dir/.build-$key
  if [[ -e $stamp && -x $dir/bin/$name ]]; then
    blog "$name $version: cached in $dir/bin"
    return
  fi
  mkdir -p "$dir/bin"
  check_upstream "$mod" "$module" "$version" "$pkg" "$dir/modules.txt"
  blog "building $name $version into $dir/bin"
  start=$SECONDS
  (cd "$mod" && CGO_ENABLED=0 nice -n 10 go build -mod=readonly -trimpath -ldflags "$ldflags" \
    -o "$dir/bin/$name" "$pkg")
  rm -f "$dir"/.build-*
  touch "$stamp"
  blog "built $name $version in $((SECONDS - start)) s"
}

# build_tool_image NAME DIR REF PATH_IN_IMAGE CONFIG...: an image FROM
# scratch holding DIR/bin/NAME at PATH_IN_IMAGE and an empty /tmp, with the
# buildah config options CONFIG (entrypoint or cmd), written to
# DIR/image.oci.tar; unless the stamp of the same binary and layout is there.
build_tool_image() {
  local name=$1 dir=$2 ref=$3 path=$4 key stamp stage ctr
  shift 4
  key=$({ sha256sum <"$dir/bin/$name"; printf '%s\n' "$ref" "$path" "$@"; } | sha256sum | cut -c1-16)
  stamp=$dir/.image-$key
  if [[ -e $stamp && -r $dir/image.oci.tar ]]; then
    blog "image $ref: cached in $dir/image.oci.tar"
    return
  fi
  blog "building image $ref"
  stage=$(mktemp -d "${TMPDIR:-/tmp}/bench-image.XXXXXX")
  mkdir -p "$stage/tmp" "$stage$(dirname "$path")"
  chmod 1777 "$stage/tmp"
  cp "$dir/bin/$name" "$stage$path"
  ctr=$(bench_buildah from --quiet scratch)
  if ! { bench_buildah copy --quiet "$ctr" "$stage" / >/dev/null &&
    bench_buildah config --env "PATH=$(dirname "$path")" "$@" "$ctr" &&
    bench_buildah commit --quiet --rm "$ctr" "$ref" >/dev/null; }; then
    bench_buildah rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$stage"
    bdie "buildah could not build $ref"
  fi
  rm -rf "$stage"
  rm -f "$dir/image.oci.tar.new"
  bench_buildah push --quiet "$ref" "oci-archive:$dir/image.oci.tar.new:$ref"
  bench_buildah rmi --force "$ref" >/dev/null
  mv "$dir/image.oci.tar.new" "$dir/image.oci.tar"
  rm -f "$dir"/.image-*
  touch "$stamp"
}

total=$SECONDS

# Upstream's scripts/build: static, stripped, the release in main.VERSION;
# its image runs `local-path-provisioner` from /usr/bin.
build_tool local-path-provisioner "$BENCH_SRC/go/local-path-provisioner" \
  github.com/rancher/local-path-provisioner "$BENCH_LPP_VERSION" \
  github.com/rancher/local-path-provisioner "$BENCH_LPP_DIR" \
  "-s -w -X main.VERSION=$BENCH_LPP_VERSION"
build_tool_image local-path-provisioner "$BENCH_LPP_DIR" "$BENCH_LPP_IMAGE" \
  /usr/bin/local-path-provisioner \
  --cmd '["local-path-provisioner"]' \
  --label "org.opencontainers.image.version=$BENCH_LPP_VERSION" \
  --label "org.opencontainers.image.source=https://github.com/rancher/local-path-provisioner"

# Upstream's release-tools/build.make: static, not stripped, the release in
# main.version; its image's entrypoint is /csi-provisioner, the flags come
# from the pod's args.
build_tool csi-provisioner "$BENCH_SRC/go/external-provisioner" \
  github.com/kubernetes-csi/external-provisioner/v5 "$BENCH_EXTERNAL_PROVISIONER_VERSION" \
  github.com/kubernetes-csi/external-provisioner/v5/cmd/csi-provisioner "$BENCH_CSI_PROVISIONER_DIR" \
  "-X main.version=$BENCH_EXTERNAL_PROVISIONER_VERSION"
build_tool_image csi-provisioner "$BENCH_CSI_PROVISIONER_DIR" "$BENCH_CSI_PROVISIONER_IMAGE" \
  /csi-provisioner \
  --entrypoint '["/csi-provisioner"]' \
  --label "org.opencontainers.image.version=$BENCH_EXTERNAL_PROVISIONER_VERSION" \
  --label "org.opencontainers.image.source=https://github.com/kubernetes-csi/external-provisioner"

blog "anchors ready in $BENCH_CACHE ($((SECONDS - total)) s)"

if $load; then
  for archive in "$BENCH_LPP_ARCHIVE" "$BENCH_CSI_PROVISIONER_ARCHIVE"; do
    "$CLUSTER_SRC/load-image" "$archive" >/dev/null
  done
  blog "images imported into the bundled cluster"
fi
printf '%s\n' "$BENCH_LPP_IMAGE" "$BENCH_CSI_PROVISIONER_IMAGE"
