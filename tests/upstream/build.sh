#!/usr/bin/env bash
# Builds what the upstream e2e tier runs, into the cluster's cache (see
# lib.sh), once per set of inputs:
#   - e2e.test: `go test -c` of k8s.io/kubernetes/test/e2e at the cluster's
#     release, from go/ (a sibling of the cluster's module that selects the
#     same versions, so the Go module and build caches are shared);
#   - the ginkgo CLI of the version that release requires;
#   - agnhost, from the same module, for its image;
#   - the images the External.Storage specs start (lib.sh E2E_IMAGES),
#     FROM scratch with buildah, under the names e2e.test asks for.
# A second run finds them all and builds nothing. Importing the images into
# the nodes is load-images.sh's (it needs the cluster).
#
#   tests/upstream/build.sh            everything
#   tests/upstream/build.sh binaries   only e2e.test, ginkgo and agnhost
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/cluster/images.sh
source "$here/../cluster/images.sh"
# shellcheck source=tests/upstream/lib.sh
source "$here/lib.sh"

DEBS=$STEAD_K8S_CACHE/upstream/debs

# --- binaries -------------------------------------------------------------

# The versions a module selects, replacements applied.
selected_versions() {
  (cd "$1" && go list -m -f '{{.Path}} {{with .Replace}}{{.Path}}@{{.Version}}{{else}}{{.Version}}{{end}}' all) | sort
}

# The two modules must select the same version of every module they share:
# then what the cluster's build compiled is reused from the build cache, and
# e2e.test tests with the very code the cluster runs.
check_same_versions() {
  local differ v
  differ=$(join <(selected_versions "$CLUSTER_SRC/go/k8s") <(selected_versions "$UPSTREAM_MOD") |
    awk '$2 != $3')
  [[ -z $differ ]] || die "$UPSTREAM_MOD and $CLUSTER_SRC/go/k8s select different versions (module, cluster's, ours):
$differ"
  v=$(cd "$UPSTREAM_MOD" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
  [[ $v == "$STEAD_K8S_VERSION" ]] ||
    die "$UPSTREAM_MOD/go.mod requires k8s.io/kubernetes $v, tests/cluster/lib.sh says $STEAD_K8S_VERSION"
}

# go_key FLAGS...: the cache key of a build from go/: its module files, the
# Go release and the flags.
go_key() {
  { cat "$UPSTREAM_MOD/go.mod" "$UPSTREAM_MOD/go.sum"; go env GOVERSION; echo "$*"; } |
    sha256sum | cut -c1-16
}

# build_go NAME KEY CMD...: runs the build CMD in go/ unless NAME's stamp
# for KEY is there.
build_go() {
  local name=$1 key=$2 start=$SECONDS
  shift 2
  if [[ -e $UPSTREAM_BIN/.$name-$key ]]; then
    log "$name: cached in $UPSTREAM_BIN"
    return
  fi
  log "building $name ($STEAD_K8S_VERSION) into $UPSTREAM_BIN; a cold build takes a while"
  (cd "$UPSTREAM_MOD" && CGO_ENABLED=0 "$@")
  rm -f "$UPSTREAM_BIN/.$name"-*
  touch "$UPSTREAM_BIN/.$name-$key"
  log "built $name in $((SECONDS - start)) s"
}

build_binaries() {
  command -v go >/dev/null || die "go is missing: install Go 1.26 or newer (https://go.dev/dl) and put it on PATH"
  mkdir -p "$UPSTREAM_BIN"
  check_same_versions
  # providerless, -trimpath and CGO_ENABLED=0 as the cluster's build, so that
  # the packages it compiled are valid here; the release stamped alike.
  local goflags=(-trimpath -tags providerless) ldflags agnhost_version want have
  read -ra ldflags < <(k8s_version_ldflags "$UPSTREAM_MOD")
  build_go e2e.test "$(go_key e2e.test "${goflags[@]}" -s -w version-ldflags)" \
    go test -c "${goflags[@]}" -ldflags "-s -w ${ldflags[*]}" -o "$E2E_TEST" k8s.io/kubernetes/test/e2e
  # agnhost reports its image's version (test/images/agnhost/VERSION), as
  # its upstream Makefile stamps it.
  agnhost_version=$(<"$(cd "$UPSTREAM_MOD" && go list -f '{{.Dir}}' k8s.io/kubernetes/test/images/agnhost)/VERSION")
  build_go ginkgo+agnhost "$(go_key ginkgo agnhost -trimpath -s -w "main.Version=$agnhost_version")" \
    go build -trimpath -ldflags "-s -w -X main.Version=$agnhost_version" -o "$UPSTREAM_BIN/" \
    github.com/onsi/ginkgo/v2/ginkgo k8s.io/kubernetes/test/images/agnhost
  # The CLI must be the version of the library inside e2e.test.
  want=$(cd "$UPSTREAM_MOD" && go list -m -f '{{.Version}}' github.com/onsi/ginkgo/v2)
  have=$("$GINKGO" version | awk '{print $NF}')
  [[ v$have == "$want" ]] || die "ginkgo CLI $have, but e2e.test's ginkgo library is $want"
}

# --- images ---------------------------------------------------------------

# The suite must still ask for the names lib.sh pins.
check_image_names() {
  local listed kind
  listed=$("$E2E_TEST" --list-images)
  for kind in "${!E2E_IMAGES[@]}"; do
    grep -qxF "${E2E_IMAGES[$kind]}" <<<"$listed" ||
      die "e2e.test of $STEAD_K8S_VERSION does not ask for ${E2E_IMAGES[$kind]}; its list (--list-images):
$listed"
  done
}

# stage_busybox DIR: Debian's busybox-static with a link per applet in /bin,
# and what a shell image has besides (passwd, group, a /tmp).
stage_busybox() {
  local stage=$1 applet
  mkdir -p "$stage/bin" "$stage/etc" "$stage/tmp" "$stage/root"
  chmod 1777 "$stage/tmp"
  cp /bin/busybox "$stage/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -s busybox "$stage/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$stage/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/etc/group"
}

# deb_closure PKG...: the packages and, recursively, the shared libraries
# they depend on (the packages of section libs), one "name=version" a line:
# the candidate versions of this machine's apt sources. One apt-cache call
# per level of depth (each call reads the whole cache).
deb_closure() {
  local -A seen=()
  local round=("$@") next p dep roots=" $* "
  while ((${#round[@]})); do
    next=()
    # name, version, section, then the dependencies (of alternatives the
    # first, no versions), tab-separated, per package.
    while IFS=$'\t' read -r p version section deps; do
      [[ -n ${seen[$p]:-} ]] && continue
      [[ $roots == *" $p "* || ${section##*/} == libs ]] || continue
      seen[$p]=1
      echo "$p=$version"
      for dep in $deps; do [[ -n ${seen[$dep]:-} ]] || next+=("$dep"); done
    done < <(apt-cache show --no-all-versions "${round[@]}" 2>/dev/null | awk '
      function flush() { if (name != "") printf "%s\t%s\t%s\t%s\n", name, ver, sec, deps; name = ""; deps = "" }
      /^Package: / { flush(); name = $2 }
      /^Version: / { ver = $2 }
      /^Section: / { sec = $2 }
      /^(Pre-)?Depends: / {
        sub(/^[^:]*: /, ""); n = split($0, d, ",")
        for (i = 1; i <= n; i++) { x = d[i]; sub(/\|.*/, "", x); gsub(/\([^)]*\)|:any|[ \t]/, "", x); deps = deps " " x }
      }
      END { flush() }')
    mapfile -t round < <(printf '%s\n' "${next[@]}" | sort -u | sed '/^$/d')
  done | sort
}

# stage_debs STAGE NAME=VERSION...: those Debian packages, downloaded once
# into the cache, unpacked into STAGE with Debian 12's merged /usr (bin,
# sbin and lib are links into usr/); documentation left out.
stage_debs() {
  local stage=$1 pv deb d
  shift
  mkdir -p "$DEBS" "$stage/usr/bin" "$stage/usr/sbin" "$stage/usr/lib" "$stage/usr/lib64"
  for d in bin sbin lib lib64; do [[ -e $stage/$d ]] || ln -s "usr/$d" "$stage/$d"; done
  local fetch=()
  for pv in "$@"; do [[ -e $DEBS/$pv.deb ]] || fetch+=("$pv"); done
  if ((${#fetch[@]})); then
    # Into a folder of its own, then named name=version.deb (apt's names
    # encode the epoch): one apt-get for all. root downloads, as apt's
    # sandbox user could not write the cache.
    d=$(mktemp -d)
    (cd "$d" && apt-get download -q=2 -o APT::Sandbox::User=root "${fetch[@]}") ||
      die "apt-get download failed for ${fetch[*]} (apt-get update first?)"
    for pv in "${fetch[@]}"; do
      mv "$d/${pv%%=*}_"*.deb "$DEBS/$pv.deb"
    done
    rm -rf "$d"
  fi
  for pv in "$@"; do
    deb=$DEBS/$pv.deb
    dpkg-deb --fsys-tarfile "$deb" |
      tar -x --keep-directory-symlink -C "$stage" \
        --exclude=./usr/share/doc --exclude=./usr/share/man --exclude=./usr/share/info \
        --exclude=./usr/share/lintian --exclude=./usr/share/locale
  done
}

# check_linked STAGE: every program and library of STAGE finds the
# libraries it needs inside STAGE (the loader run in a chroot of it).
check_linked() {
  local stage=$1 f missing=()
  while IFS= read -r f; do
    head -c 4 "$f" | grep -q $'\x7fELF' || continue
    if chroot "$stage" /lib64/ld-linux-x86-64.so.2 --list "/${f#"$stage"/}" 2>&1 | grep -q 'not found'; then
      missing+=("/${f#"$stage"/}: $(chroot "$stage" /lib64/ld-linux-x86-64.so.2 --list "/${f#"$stage"/}" 2>&1 |
        grep 'not found' | awk '{print $1}' | tr '\n' ' ')")
    fi
  done < <(find "$stage/usr/bin" "$stage/usr/sbin" -type f)
  ((${#missing[@]} == 0)) || die "libraries missing from the image's packages:
$(printf '  %s\n' "${missing[@]}")"
}

# build_oci NAME ARCHIVE ROOTFS ENTRYPOINT CMD: an image of the files in
# ROOTFS (ENTRYPOINT and CMD as JSON lists) in the OCI archive ARCHIVE under
# NAME; buildah's storage is the cluster's (images.sh), left empty after.
build_oci() {
  local name=$1 archive=$2 rootfs=$3 entrypoint=$4 cmd=$5 ctr
  ctr=$(buildah_own from --quiet scratch)
  buildah_own copy --quiet "$ctr" "$rootfs" / >/dev/null
  buildah_own config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --entrypoint "$entrypoint" --cmd "$cmd" "$ctr"
  buildah_own commit --quiet --rm "$ctr" "$name" >/dev/null
  rm -f "$archive"
  buildah_own push --quiet "$name" "oci-archive:$archive:$name"
  buildah_own rmi --force "$name" >/dev/null
}

# The packages of each image built from Debian's (their library closure is
# added). The specs only exec shell commands in these images; the programs
# they are named after are there as upstream has them.
NGINX_DEBS=(nginx nginx-common)
# Upstream's is Debian jessie with dnsutils: a Debian userland.
JESSIE_DEBS=(bash dash coreutils grep sed findutils util-linux mount gzip tar bind9-dnsutils bind9-host)

# recipe KIND STAGE: fills STAGE with image KIND's files and prints its
# entrypoint and cmd (JSON lists), one a line.
recipe() {
  local kind=$1 stage=$2
  case $kind in
    busybox)
      stage_busybox "$stage"
      printf '%s\n' '[]' '["sh"]'
      ;;
    agnhost)
      # As upstream's (test/images/agnhost/Dockerfile): /agnhost and its
      # agnhost-2 link, /uploads, the user and group some specs look for;
      # a shell and coreutils (alpine's there) from busybox.
      stage_busybox "$stage"
      cp "$AGNHOST" "$stage/agnhost"
      ln -s agnhost "$stage/agnhost-2"
      mkdir -p "$stage/uploads" "$stage/home/user-defined-in-image"
      echo 'user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh' >>"$stage/etc/passwd"
      printf 'user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' \
        >>"$stage/etc/group"
      printf '%s\n' '["/agnhost"]' '["pause"]'
      ;;
    nginx)
      # Upstream's is nginx on alpine: nginx, with busybox for the shell.
      local debs
      mapfile -t debs < <(deb_closure "${NGINX_DEBS[@]}")
      stage_debs "$stage" "${debs[@]}"
      stage_busybox "$stage"
      echo 'www-data:x:33:33:www-data:/var/www:/bin/false' >>"$stage/etc/passwd"
      echo 'www-data:x:33:' >>"$stage/etc/group"
      mkdir -p "$stage/var/lib/nginx" "$stage/var/log/nginx" "$stage/run" "$stage/etc/nginx/modules-enabled"
      check_linked "$stage"
      chroot "$stage" /usr/sbin/nginx -t -q || die "nginx does not start in its image"
      printf '%s\n' '["nginx", "-g", "daemon off;"]' '[]'
      ;;
    jessie-dnsutils)
      local debs
      mapfile -t debs < <(deb_closure "${JESSIE_DEBS[@]}")
      stage_debs "$stage" "${debs[@]}"
      ln -sf dash "$stage/usr/bin/sh"
      mkdir -p "$stage/tmp" "$stage/root" "$stage/etc"
      chmod 1777 "$stage/tmp"
      printf 'root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' \
        >"$stage/etc/passwd"
      printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/etc/group"
      check_linked "$stage"
      chroot "$stage" /bin/sh -c 'dig -v && echo x | sha256sum && blockdev --help' >/dev/null 2>&1 ||
        die "the jessie-dnsutils image's programs do not run"
      printf '%s\n' '[]' '["/bin/sh"]'
      ;;
    *) die "no recipe for image $kind" ;;
  esac
}

# image_inputs KIND: what image KIND is made of, for its cache key.
image_inputs() {
  echo "recipes $(sha256sum <"$here/build.sh")"
  echo "busybox-static $(dpkg-query -W -f '${Version}' busybox-static)"
  case $1 in
    agnhost) echo "agnhost $(sha256sum <"$AGNHOST")" ;;
    nginx) deb_closure "${NGINX_DEBS[@]}" ;;
    jessie-dnsutils) deb_closure "${JESSIE_DEBS[@]}" ;;
  esac
}

build_e2e_image() {
  local kind=$1 name=${E2E_IMAGES[$1]} key archive stage config start=$SECONDS
  archive=$(e2e_image_archive "$kind")
  key=$({ echo "$name"; image_inputs "$kind"; } | sha256sum | cut -c1-16)
  if [[ -e $IMAGES_DIR/.e2e-$kind-$key && -e $archive ]]; then
    log "image $name: cached in $IMAGES_DIR"
    return
  fi
  log "building image $name"
  stage=$(mktemp -d)
  config=$(recipe "$kind" "$stage")
  build_oci "$name" "$archive" "$stage" "$(sed -n 1p <<<"$config")" "$(sed -n 2p <<<"$config")"
  rm -rf "$stage"
  rm -f "$IMAGES_DIR/.e2e-$kind"-*
  touch "$IMAGES_DIR/.e2e-$kind-$key"
  log "built image $name in $((SECONDS - start)) s ($(du -h "$archive" | cut -f1) archive)"
}

build_images() {
  command -v buildah >/dev/null || die "buildah is missing: run tests/cluster/prereqs.sh"
  mkdir -p "$IMAGES_DIR"
  check_image_names
  local kind
  for kind in busybox agnhost nginx jessie-dnsutils; do
    [[ -n ${E2E_IMAGES[$kind]:-} ]] || die "lib.sh names no image $kind"
    build_e2e_image "$kind"
  done
}

total=$SECONDS
case ${1:-all} in
  binaries) build_binaries ;;
  all) build_binaries && build_images ;;
  *) die "usage: $0 [binaries]" ;;
esac
log "ready in $((SECONDS - total)) s: $UPSTREAM_BIN, images in $IMAGES_DIR"
