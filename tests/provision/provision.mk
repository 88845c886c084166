# The provisioner's cluster suite and benchmark: the agent runs as a host
# process against the bundled local cluster (tests/cluster), so the suite can
# kill it at chosen points. Stead's DaemonSet must not run at the same time
# (both would serve this node): these targets remove it first.

PROVISION_ENV = $${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}/env

.PHONY: provision-test bench-provision undeploy-agent

undeploy-agent: cluster-up
	source $(PROVISION_ENV) && \
	  $$KUBECTL delete daemonset -n stead-system stead-node --ignore-not-found --wait=true && \
	  $$KUBECTL wait --for=delete pod -n stead-system -l app.kubernetes.io/name=stead --timeout=60s

provision-test: build undeploy-agent
	source $(PROVISION_ENV) && \
	  STEAD_BIN=$(CURDIR)/target/debug/stead \
	  $(CARGO) test --locked -p stead-e2e --test provision -- --test-threads=1 --nocapture

# 500 Immediate claims, then 100 WaitForFirstConsumer claims with a pod each;
# writes its section of docs/BENCHMARKS.md.
bench-provision: undeploy-agent
	$(CARGO) build --locked --release
	source $(PROVISION_ENV) && \
	  STEAD_BIN=$(CURDIR)/target/release/stead \
	  $(CARGO) run --locked --release -p stead-e2e --bin bench_provision
