# Stead's Helm chart, deploy/helm/stead (see README, "Install with Helm").
#
#   make helm-build          the pinned helm (tests/helm/lib.sh) from the Go
#                            module proxy into ~/.cache/stead/helm-<version>;
#                            nothing when cached
#   make helm-check          helm lint --strict, and the chart's default render
#                            against `kubectl kustomize deploy`; needs no
#                            cluster (kubectl is the cluster's build, made
#                            first if it is not there)
#   make helm-install-test   on the bundled cluster: helm install, the seed
#                            StatefulSet, helm upgrade (the agents roll, the
#                            data stays), helm uninstall (nothing left); then
#                            Stead from deploy/ again, as `make deploy` left it

HELM_DIR := tests/helm

.PHONY: helm-build helm-check helm-install-test

helm-build:
	$(HELM_DIR)/build.sh

helm-check: helm-build
	$(HELM_DIR)/check.sh

# The image and the cluster as `make deploy` has them (tests/e2e/e2e.mk),
# without deploy/: the chart installs Stead. Afterwards deploy/ is applied
# again, so the tiers after this one (a `deploy` make already counts as
# done) find the Stead they expect.
helm-install-test: helm-build image cluster-up
	$(HELM_DIR)/install.sh $(STEAD_IMAGE_ARCHIVE)
	tests/e2e/deploy.sh $(STEAD_IMAGE_ARCHIVE)
