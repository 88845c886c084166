# Stead — the one entry point for building, testing and demonstrating.
#
#   make test   fmt check, clippy -D warnings, cargo tests (real mounts; run as root),
#               the Helm chart's render check, the dashboard's PromQL check, csi-sanity
#               on every backend, the cluster tiers, the upstream Kubernetes
#               external-storage e2e suite
#   make demo   the seed's StatefulSet on the bundled local cluster
#
# Each test tier keeps its own targets in a fragment next to its code.

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release test lint fmt-check clippy unit

all: build

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

lint: fmt-check clippy

# Unit and integration tests. The integration tests mount loop devices and
# bind mounts, so they need root (CI runs as root). Two test threads: each
# test has its own temp root, sockets and loop devices, so they may overlap,
# and more than two on this project's 2-core machines only adds contention
# for the kernel's loop devices and mount table.
unit:
	$(CARGO) test --locked -- --test-threads=2

# The tiers wired into `make test` are the ones that pass; see README. The
# upstream e2e suite comes last: it judges what the cluster tiers built.
test: lint unit helm-check dashboard-check sanity cluster-smoke provision-test e2e helm-install-test upstream-e2e

-include tests/sanity/sanity.mk
-include tests/cluster/cluster.mk
-include tests/e2e/e2e.mk
-include tests/provision/provision.mk
-include benches/alloc.mk
-include benches/transfer.mk
-include tests/upstream/upstream.mk
-include tests/helm/helm.mk
-include tests/dashboard/dashboard.mk
-include tests/scale/scale.mk
-include tests/bench/compare.mk
-include tests/bench/io.mk
-include tests/bench/nodes.mk
