# The data path against raw disk (issue 16, item 4; tests/bench/io/run.sh):
# fio (Debian's, in an image FROM scratch) runs sequential 1 MiB and random
# 4 KiB reads and writes at iodepth 16 with direct I/O from a pod on a Stead
# volume of each backend (dir; image ext4; image xfs; volumeMode: Block) and
# the same job on the pool's filesystem in the node itself; writes the
# section "## Data path (make bench-io)" of docs/BENCHMARKS.md with the
# ratios to raw. Needs root; runs on the bundled cluster with Stead deployed
# (hence `deploy`); removes everything it made. Not part of `make test`.
#
#   make bench-io                                              # 2 GiB file, 15 s jobs, 3 rounds
#   make bench-io BENCH_IO_SIZE=512 BENCH_IO_RUNTIME=5 BENCH_IO_RUNS=2   # a quick one
#   make bench-io-image                                        # only the fio image (cached)

BENCH_IO_SIZE ?= 2048
BENCH_IO_RUNTIME ?= 15
BENCH_IO_RAMP ?= 2
BENCH_IO_RUNS ?= 3

.PHONY: bench-io bench-io-image

bench-io: deploy
	BENCH_IO_SIZE=$(BENCH_IO_SIZE) BENCH_IO_RUNTIME=$(BENCH_IO_RUNTIME) BENCH_IO_RAMP=$(BENCH_IO_RAMP) \
	  BENCH_IO_RUNS=$(BENCH_IO_RUNS) tests/bench/io/run.sh

bench-io-image:
	tests/bench/io/image.sh
