# Conformance tier: upstream csi-sanity against a real `stead node`, one run
# per backend and access type (dir/mount, image/mount, image/block).
# Included by the top Makefile. Needs root and Go (csi-sanity is `go install`ed
# at the version pinned in tests/sanity/versions.env).

.PHONY: sanity sanity-install bench-csi bench-snapshot

# Every run, then one summary line per run; fails naming the runs that failed.
sanity:
	bash tests/sanity/run-sanity.sh

# Only fetch and build the pinned csi-sanity (cached under ~/.cache/stead).
sanity-install:
	bash tests/sanity/install-csi-sanity.sh

# The CSI latency / throughput / memory benchmark (benches/csi.rs); writes
# its section of docs/BENCHMARKS.md. Needs root (mounts, loop devices).
bench-csi:
	$(CARGO) build --locked --release
	$(CARGO) bench --locked --bench csi

# Snapshot / restore / clone times of image volumes on a reflink (xfs) and a
# copy (ext4) pool (benches/snapshot.rs); writes its section of
# docs/BENCHMARKS.md. Needs root (mounts, loop devices) and ~10 GB free in
# /var/tmp (STEAD_BENCH_DIR names another place).
bench-snapshot:
	$(CARGO) build --locked --release
	$(CARGO) bench --locked --bench snapshot
