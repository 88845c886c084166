# shellcheck shell=bash
# The cluster's two images, built FROM scratch with buildah into OCI archives
# in the cache, and their import into containerd. Sourced after lib.sh.

IMAGES_DIR=$STEAD_K8S_CACHE/images

# buildah with a storage of its own in the cache: the machine's
# /var/lib/containers is left alone.
buildah_own() {
  buildah --root "$STEAD_K8S_CACHE/buildah/root" --runroot "$STEAD_K8S_CACHE/buildah/run" \
    --storage-driver vfs "$@"
}

# build_image REF ARCHIVE ROOTFS_DIR CMD...: an image of the files in ROOTFS_DIR.
build_image() {
  local ref=$1 archive=$2 rootfs=$3 ctr
  shift 3
  ctr=$(buildah_own from --quiet scratch)
  buildah_own copy --quiet "$ctr" "$rootfs" / >/dev/null
  buildah_own config --env PATH=/bin --cmd "$(printf '"%s",' "$@" | sed 's/,$//;s/^/[/;s/$/]/')" "$ctr"
  buildah_own commit --quiet --rm "$ctr" "$ref" >/dev/null
  rm -f "$archive"
  buildah_own push --quiet "$ref" "oci-archive:$archive:$ref"
  buildah_own rmi --force "$ref" >/dev/null
}

# Builds the busybox and pause archives when their inputs changed.
build_images() {
  mkdir -p "$IMAGES_DIR"
  local busybox_version key stage
  busybox_version=$(dpkg-query -W -f '${Version}' busybox-static)
  key=$(printf '%s\n' "$busybox_version" "$BUSYBOX_IMAGE" | sha256sum | cut -c1-16)
  if [[ ! -e $IMAGES_DIR/.busybox-$key ]]; then
    log "building image $BUSYBOX_IMAGE from busybox-static $busybox_version"
    stage=$(mktemp -d)
    mkdir -p "$stage/bin" "$stage/etc" "$stage/tmp" "$stage/root"
    chmod 1777 "$stage/tmp"
    cp /bin/busybox "$stage/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
      [[ $applet == busybox ]] || ln -s busybox "$stage/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$stage/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/etc/group"
    build_image "$BUSYBOX_IMAGE" "$IMAGES_DIR/busybox.oci.tar" "$stage" sh
    rm -rf "$stage"
    rm -f "$IMAGES_DIR"/.busybox-*
    touch "$IMAGES_DIR/.busybox-$key"
  fi
  key=$({ sha256sum <"$BIN/pause"; echo "$PAUSE_IMAGE"; } | sha256sum | cut -c1-16)
  if [[ ! -e $IMAGES_DIR/.pause-$key ]]; then
    log "building image $PAUSE_IMAGE"
    stage=$(mktemp -d)
    cp "$BIN/pause" "$stage/pause"
    build_image "$PAUSE_IMAGE" "$IMAGES_DIR/pause.oci.tar" "$stage" /pause
    rm -rf "$stage"
    rm -f "$IMAGES_DIR"/.pause-*
    touch "$IMAGES_DIR/.pause-$key"
  fi
}

# import_images I: imports the two images into node I's containerd unless
# it has them.
import_images() {
  local i=$1 have
  have=$(ctr_k8s "$i" images list --quiet)
  grep -qxF "$PAUSE_IMAGE" <<<"$have" || import_archive "$i" "$IMAGES_DIR/pause.oci.tar" >/dev/null
  grep -qxF "$BUSYBOX_IMAGE" <<<"$have" || import_archive "$i" "$IMAGES_DIR/busybox.oci.tar" >/dev/null
}
