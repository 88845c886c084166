# Stead's image, for users with Docker:
#   docker build -t localhost/stead:0.1.0 .
# The tag is the crate version (deploy/base/kustomization.yaml deploys it).
# Without Docker, tests/image/build.sh builds the same image with buildah.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bin stead && strip target/release/stead

# The tools the agent runs: losetup (mount), blkid (util-linux, always there),
# mkfs.ext4/e2fsck/resize2fs (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs),
# btrfs (btrfs-progs: subvolumes and qgroups of dir pools on btrfs).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs btrfs-progs mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/stead /usr/bin/stead
ENTRYPOINT ["/usr/bin/stead"]
CMD ["node"]
