# Stead side by side with what users would install instead (issue 16, items
# 1 and 3): local-path-provisioner and Stead's own CSI plugin driven by
# upstream external-provisioner (defaults and tuned), each a pinned release
# built from the Go module proxy (tests/bench/anchors/), on the bundled
# 3-node cluster, in the same run. Writes the section "Side by side (make
# bench-compare)" of docs/BENCHMARKS.md. Not part of `make test`. It
# deploys and removes provisioners on the cluster: nothing else should use
# it meanwhile.
#
#   make bench-compare                                  # 2 rounds of all four
#   make bench-compare ROUNDS=1 CONFIGS="stead local-path"

ROUNDS ?= 2
CONFIGS ?= stead sidecar-defaults sidecar-tuned local-path

.PHONY: bench-compare

# `image` (tests/e2e/e2e.mk): deploy.sh stead deploys that archive.
bench-compare: image cluster-up
	ROUNDS='$(ROUNDS)' CONFIGS='$(CONFIGS)' CARGO='$(CARGO)' \
	  STEAD_IMAGE_ARCHIVE='$(abspath $(STEAD_IMAGE_ARCHIVE))' \
	  tests/bench/compare.sh

# Where the time of one burst goes (issue 16, item 2): tests/bench/trace.py
# runs (a) and (c) of bench-compare once on Stead and prints each stage's
# median, p90 and max from its own watches and the agents' CSI log lines.
#
#   make bench-trace                 # 100 pods
#   make bench-trace TRACE_PODS=20

TRACE_PODS ?= 100

.PHONY: bench-trace

bench-trace: image cluster-up
	STEAD_IMAGE_ARCHIVE='$(abspath $(STEAD_IMAGE_ARCHIVE))' tests/bench/anchors/deploy.sh stead
	tests/bench/trace.py --pods $(TRACE_PODS)
