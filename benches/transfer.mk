# Cross-node transfer throughput (benches/transfer.rs): a 1 GiB volume
# pulled over the mutual-TLS stream on loopback against `dd` copying the
# same file along the same path, median of 3 runs each. Writes its section
# of docs/BENCHMARKS.md. Needs no cluster; root only for a pool in /var/tmp.

.PHONY: bench-transfer

bench-transfer:
	$(CARGO) bench --locked --bench transfer
