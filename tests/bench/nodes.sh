#!/usr/bin/env bash
# make bench-nodes (issue 15's figures): on the bundled three-node cluster,
# with Stead deployed, moves a StatefulSet's volume holding BENCH_NODES_MIB
# MiB of random data from node to node (the move suite, BENCH_NODES_MOVES
# times), loses a node (the node-loss suite, BENCH_NODES_LOSSES times), and
# copies the same amount with dd through the same disk (BENCH_NODES_DD
# times); tests/e2e/src/bin/bench_nodes.rs writes the section of
# docs/BENCHMARKS.md from what they print. Not part of `make test`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/bench/lib.sh
source "$here/lib.sh"
bench_cluster

mib=${BENCH_NODES_MIB:-1024}
moves=${BENCH_NODES_MOVES:-3}
losses=${BENCH_NODES_LOSSES:-2}
copies=${BENCH_NODES_DD:-3}
cargo=${CARGO:-cargo}
log=$(mktemp /tmp/stead-bench-nodes.XXXXXX.log)
blog "log: $log"

for ((i = 1; i <= moves; i++)); do
  blog "move $i of $moves ($mib MiB)"
  STEAD_MOVE_MIB=$mib "$cargo" test --locked -p stead-e2e --test move \
    a_claim_moves_to_another_node_with_its_data_under_the_same_name -- --exact --test-threads=1 --nocapture 2>&1 | tee -a "$log" >&2 ||
    bdie "the move suite failed (log: $log)"
done
for ((i = 1; i <= losses; i++)); do
  blog "node loss $i of $losses"
  "$cargo" test --locked -p stead-e2e --test nodeloss -- --test-threads=1 --nocapture 2>&1 | tee -a "$log" >&2 ||
    bdie "the node-loss suite failed (log: $log)"
done

# dd through the disk the pulls read and write: a node's image pool folder.
node=${STEAD_NODE_NAMES%% *}
pool=$STEAD_NODES_DIR/$node/stead/pools/image
[[ -d $pool ]] || bdie "no image pool folder $pool on node $node"
src=$pool/bench-nodes-src
dst=$pool/bench-nodes-dst
trap 'rm -f "$src" "$dst"' EXIT
dd if=/dev/urandom of="$src" bs=1M count="$mib" conv=fsync status=none
sync # the source written back before the first copy is timed
for ((i = 1; i <= copies; i++)); do
  # The source read from the disk, as the holder reads its volume.
  dd if="$src" iflag=nocache count=0 status=none
  start=$(date +%s.%N)
  dd if="$src" of="$dst" bs=1M conv=fsync status=none
  end=$(date +%s.%N)
  rm -f "$dst"
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
  blog "dd $i of $copies: $secs s"
  echo "dd $((mib * 1024 * 1024)) $secs" >>"$log"
done

STEAD_MOVE_MIB=$mib "$cargo" run --locked -q -p stead-e2e --bin bench_nodes -- "$log"
