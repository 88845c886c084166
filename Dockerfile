# Stead's image, for users with Docker:
#   docker build -t localhost/stead:0.1.0 .
# The tag is the crate version (deploy/base/kustomization.yaml deploys it).
# Without Docker, tests/image/build.sh builds the same image with buildah.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bin stead

# The agent runs mkfs/resize/fsck for ext4 and xfs, losetup and blkid.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/stead /usr/bin/stead
ENTRYPOINT ["/usr/bin/stead"]
CMD ["node"]
