#!/usr/bin/env bash
# Builds Stead's container image without Docker: the release binary from
# cargo (glibc, dynamically linked), the tools the agent runs and every shared
# library they load, assembled FROM scratch with buildah, written as an OCI
# archive that tests/cluster/load-image imports.
#
#   tests/image/build.sh [ARCHIVE]   default target/image/stead-<version>.oci.tar
#
# The image is tagged localhost/stead:<crate version>. The Dockerfile at the
# top of the repository builds the same image where Docker is available.
set -euo pipefail
cd "$(dirname "$0")/../.."

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
tag=localhost/stead:$version
archive=${1:-target/image/stead-$version.oci.tar}
deployed=$(sed -n 's/^ *newTag: *//p' deploy/base/kustomization.yaml)
[[ $deployed == "$version" ]] ||
  die "deploy/base/kustomization.yaml deploys localhost/stead:$deployed but the crate is $version: make them agree"

# What the agent runs (src/storage/image.rs): losetup and blkid for its loop
# devices, mkfs for new filesystems, e2fsck/resize2fs/xfs_growfs to grow them;
# btrfs for the subvolumes and qgroups of dir pools on btrfs (storage/quota.rs).
# It mounts through the kernel's API, not mount(8).
tools=(/usr/sbin/losetup /usr/sbin/blkid /usr/sbin/mkfs.ext4 /usr/sbin/e2fsck /usr/sbin/resize2fs
  /usr/sbin/mkfs.xfs /usr/sbin/xfs_growfs /usr/bin/btrfs)
missing=()
for t in "${tools[@]}"; do [[ -x $t ]] || missing+=("$t"); done
command -v buildah >/dev/null || missing+=(buildah)
command -v strip >/dev/null || missing+=(strip)
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null || [[ $(id -u) != 0 ]]; then
    die "missing ${missing[*]}: install buildah, binutils, e2fsprogs, xfsprogs, btrfs-progs and mount"
  fi
  log "installing buildah binutils e2fsprogs xfsprogs btrfs-progs mount"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah binutils e2fsprogs xfsprogs btrfs-progs mount >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      buildah binutils e2fsprogs xfsprogs btrfs-progs mount >/dev/null; }
fi

start=$SECONDS
log "building the release binary"
cargo build --locked --release --bin stead
# cargo puts it under CARGO_TARGET_DIR when that is set.
bin=${CARGO_TARGET_DIR:-target}/release/stead

work=$(mktemp -d "${TMPDIR:-/tmp}/stead-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs"/{usr/bin,usr/sbin,usr/lib64,etc,tmp,run,dev,proc,sys}
chmod 1777 "$rootfs/tmp"
# Debian's merged /usr, so that the paths the binaries were linked with hold.
ln -s usr/bin "$rootfs/bin"
ln -s usr/sbin "$rootfs/sbin"
ln -s usr/lib "$rootfs/lib"
ln -s usr/lib64 "$rootfs/lib64"

# Copies a file to the same path in the image, following symlinks.
put() { mkdir -p "$rootfs$(dirname "$2")" && cp -L "$1" "$rootfs$2"; }
# Copies the shared libraries an ELF file loads, ld-linux included.
put_libs() {
  local lib
  for lib in $(ldd "$1" | grep -o '/[^ ]*'); do
    lib=${lib/#\/lib\//\/usr\/lib\/}
    lib=${lib/#\/lib64\//\/usr\/lib64\/}
    [[ -e $rootfs$lib ]] || put "$lib" "$lib"
  done
}

put "$bin" /usr/bin/stead
put_libs "$bin"
# Symbols only matter to a debugger; the image leaves them out.
strip "$rootfs/usr/bin/stead"
for t in "${tools[@]}"; do
  put "$t" "$t"
  put_libs "$t"
done
# mke2fs's defaults (block size, features per fs type); without the file it
# falls back to older built-in ones.
put /etc/mke2fs.conf /etc/mke2fs.conf

rootfs_size=$(du -sb "$rootfs" | cut -f1)

# buildah's own store in the work folder, vfs driver: works in any sandbox
# and leaves the machine's container storage alone.
b() { buildah --root "$work/storage" --runroot "$work/run" --storage-driver vfs "$@"; }
ctr=$(b from --quiet scratch)
# A reproducible layer: same files, same bytes (so an unchanged build keeps
# its digest and tests/e2e/deploy.sh leaves the running agent alone).
tar -C "$rootfs" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$work/rootfs.tar" .
b add --quiet "$ctr" "$work/rootfs.tar" / >/dev/null
b config \
  --env PATH=/usr/sbin:/usr/bin \
  --entrypoint '["/usr/bin/stead"]' --cmd node \
  --label org.opencontainers.image.title=stead \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.description="Stead: CSI driver and provisioner for node-local volumes" \
  "$ctr"
b commit --quiet --rm --timestamp 0 "$ctr" "$tag" >/dev/null
mkdir -p "$(dirname "$archive")"
rm -f "$archive"
b push --quiet "$tag" "oci-archive:$archive:$tag"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
log "built $tag in $((SECONDS - start)) s: $(mib "$rootfs_size") unpacked, archive $(mib "$(stat -c %s "$archive")") at $archive"
echo "$archive"
