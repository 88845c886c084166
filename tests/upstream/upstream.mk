# The Kubernetes external-storage e2e suite (k8s.io/kubernetes/test/e2e,
# External.Storage) against Stead on the bundled cluster; see
# tests/upstream/README.md.
#
#   make upstream-build      e2e.test, ginkgo, agnhost and the suite's images
#                            into the cluster's cache; nothing when cached
#   make upstream-e2e        deploy, then the suite without [Slow] and [Serial],
#                            in parallel; reports in target/upstream/fast/
#   make upstream-e2e-slow   deploy, then only the [Slow] and [Serial] specs;
#                            reports in target/upstream/slow/

UPSTREAM_DIR := tests/upstream

.PHONY: upstream-build upstream-e2e upstream-e2e-slow upstream-images-load

upstream-build:
	$(CLUSTER_DIR)/prereqs.sh
	$(UPSTREAM_DIR)/build.sh

upstream-images-load: upstream-build deploy
	$(UPSTREAM_DIR)/load-images.sh

upstream-e2e: upstream-images-load
	$(UPSTREAM_DIR)/run.sh fast

upstream-e2e-slow: upstream-images-load
	$(UPSTREAM_DIR)/run.sh slow
