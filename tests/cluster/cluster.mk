# The local single-node Kubernetes of tests/cluster (see tests/cluster/README.md).
#
#   make cluster-build    build etcd, the Kubernetes components and the images into
#                         the cache (~/.cache/stead/k8s-<version>); nothing when cached
#   make cluster-up       start it (idempotent); last line: export KUBECONFIG=...
#   make cluster-status   each component and the node; non-zero unless all healthy
#   make cluster-smoke    pod, ordered StatefulSet, in-cluster apiserver access,
#                         nodes and network, the VolumeSnapshot API
#                         (brings the cluster up first if needed, leaves it up)
#   make cluster-down     stop it, unmount what the kubelet left; safe to repeat

CLUSTER_DIR := tests/cluster

.PHONY: cluster-build cluster-up cluster-down cluster-status cluster-smoke

cluster-build:
	$(CLUSTER_DIR)/prereqs.sh
	$(CLUSTER_DIR)/build.sh

cluster-up:
	$(CLUSTER_DIR)/up.sh

cluster-down:
	$(CLUSTER_DIR)/down.sh

cluster-status:
	$(CLUSTER_DIR)/status.sh

cluster-smoke: cluster-up
	$(CLUSTER_DIR)/smoke.sh
