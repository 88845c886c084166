# Issue 15's figures (tests/bench/nodes.sh): a volume of 1 GiB of data moved
# between nodes of the bundled cluster against dd through the same disk, and
# the time from a lost node to its replica Ready elsewhere; writes the
# section "Moving data between nodes, and recovering from a lost node" of
# docs/BENCHMARKS.md. Not part of `make test` (about 10 minutes).
#
#   make bench-nodes
#   make bench-nodes BENCH_NODES_MIB=256 BENCH_NODES_MOVES=1 BENCH_NODES_LOSSES=1   # a quick one

BENCH_NODES_MIB ?= 1024
BENCH_NODES_MOVES ?= 3
BENCH_NODES_LOSSES ?= 2
BENCH_NODES_DD ?= 3

.PHONY: bench-nodes

bench-nodes: deploy
	source $(STEAD_CLUSTER_ENV) && BENCH_NODES_MIB=$(BENCH_NODES_MIB) BENCH_NODES_MOVES=$(BENCH_NODES_MOVES) \
	  BENCH_NODES_LOSSES=$(BENCH_NODES_LOSSES) BENCH_NODES_DD=$(BENCH_NODES_DD) tests/bench/nodes.sh
