# The scale benchmark (tests/scale/run.sh): a private control plane on this
# machine, NODES kubelet-less nodes with one real agent each, WFFC claims
# with pods, IMMEDIATE claims, then NOISE claims and PVs that are not
# Stead's. Writes its section of docs/BENCHMARKS.md. Not part of `make test`;
# it never touches the bundled cluster of tests/cluster. Needs root.
#
#   make bench-scale                                        # 100 nodes, 5000 + 2000 claims, 10000 noise
#   make bench-scale NODES=5 WFFC=200 IMMEDIATE=50 NOISE=500  # a quick one

NODES ?= 100
WFFC ?= 5000
IMMEDIATE ?= 2000
NOISE ?= 10000

.PHONY: bench-scale

bench-scale:
	NODES=$(NODES) WFFC=$(WFFC) IMMEDIATE=$(IMMEDIATE) NOISE=$(NOISE) CARGO=$(CARGO) tests/scale/run.sh
