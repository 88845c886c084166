# Stead's Helm chart, deploy/helm/stead (see README, "Install with Helm").
#
#   make helm-build          the pinned helm (tests/helm/lib.sh) from the Go
#                            module proxy into ~/.cache/stead/helm-<version>;
#                            nothing when cached
#   make helm-check          helm lint --strict, and the chart's default render
#                            against `kubectl kustomize deploy`; needs no
#                            cluster (kubectl is the cluster's build, made
#                            first if it is not there)

HELM_DIR := tests/helm

.PHONY: helm-build helm-check

helm-build:
	$(HELM_DIR)/build.sh

helm-check: helm-build
	$(HELM_DIR)/check.sh
