# What reserving an image's blocks costs at create (benches/alloc.rs):
# thick and thin, 1 GiB and 10 GiB, on xfs and ext4 loop filesystems.
# Writes its section of docs/BENCHMARKS.md. Needs root (loop mounts).

.PHONY: bench-alloc

bench-alloc:
	$(CARGO) bench --locked --bench alloc
