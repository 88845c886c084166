#!/usr/bin/env bash
# `make bench-compare`: Stead side by side with the provisioners users would
# install instead (issue 16), on the running bundled cluster. Glue only: it
# builds and imports the anchors' images once (tests/bench/anchors/build.sh
# --load), then runs the driver, tests/e2e/src/bin/bench_compare.rs, which
# deploys each configuration in turn (anchors/deploy.sh), runs the workloads,
# samples the provisioner's processes (anchors/pids.sh), removes it again
# (anchors/undeploy.sh), and writes the section "Side by side (make
# bench-compare)" of docs/BENCHMARKS.md; the same section goes to stdout.
#
#   tests/bench/compare.sh
#
# Environment (all optional):
#   ROUNDS          rounds, each of every configuration and the baseline (2)
#   CONFIGS         configurations, in order ("stead sidecar-defaults sidecar-tuned local-path")
#   BENCH_PODS      pods of the burst and of the emptyDir baseline (100)
#   BENCH_REPLICAS  replicas of the StatefulSet (20)
#   BENCH_CLAIMS    Immediate claims (500)
#   BENCH_DEADLINE  seconds any one wait of a workload may take (900)
#   STEAD_IMAGE_ARCHIVE  Stead's image, as `make image` writes it
#   CARGO           cargo (cargo)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/bench/lib.sh
source tests/bench/lib.sh

bench_cluster
tests/bench/anchors/build.sh --load >&2
export BENCH_STATE ROUNDS CONFIGS BENCH_PODS BENCH_REPLICAS BENCH_CLAIMS BENCH_DEADLINE
blog "bench-compare: ROUNDS=${ROUNDS:-2} CONFIGS=${CONFIGS:-stead sidecar-defaults sidecar-tuned local-path}"
"${CARGO:-cargo}" run --locked --release -p stead-e2e --bin bench_compare
