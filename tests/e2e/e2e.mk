# Stead's image, Stead deployed from deploy/ on the bundled local cluster, the
# end-to-end suites and the demo.
#
#   make image     localhost/stead:<version>, built without Docker (buildah),
#                  as an OCI archive in target/image/
#   make deploy    bring the local cluster up, import the image, apply deploy/,
#                  wait for the agent to be Ready
#   make e2e       deploy, then the suites of tests/e2e against that cluster
#   make demo      deploy, then the seed's StatefulSet, step by step
#
# The suites take any KUBECONFIG; tests/e2e/kind.sh runs them on kind.

STEAD_VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)
STEAD_IMAGE_ARCHIVE ?= target/image/stead-$(STEAD_VERSION).oci.tar
E2E_SUITES ?= statefulset volumes nodes snapshots policy crossnode nodeloss move
STEAD_CLUSTER_ENV = $${STEAD_CLUSTER_DIR:-/tmp/stead-cluster}/env

.PHONY: image deploy e2e demo

image:
	tests/image/build.sh $(STEAD_IMAGE_ARCHIVE)

deploy: image cluster-up
	tests/e2e/deploy.sh $(STEAD_IMAGE_ARCHIVE)

# One test at a time: a scenario restarts the agent.
e2e: deploy
	source $(STEAD_CLUSTER_ENV) && \
	  $(CARGO) test --locked -p stead-e2e $(addprefix --test ,$(E2E_SUITES)) -- --test-threads=1 --nocapture

demo: deploy
	tests/e2e/demo.sh
