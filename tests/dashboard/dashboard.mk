# Stead's Grafana dashboard, deploy/grafana/stead-dashboard.json
# (tests/dashboard/README.md).
#
#   make dashboard-build   the PromQL program on Prometheus' engine (the
#                          version in tests/dashboard/lib.sh) from the Go
#                          module proxy into ~/.cache/stead/dashboard-promql-<version>;
#                          nothing when cached
#   make dashboard-check   every panel's PromQL parses with Grafana's
#                          variables substituted, names stead_ series and
#                          filters on $instance; needs no cluster
#   make dashboard-local   two local agents (cargo test dashboard_local, as
#                          root), scraped while real CSI RPCs run on their
#                          sockets; every panel evaluated, docs/dashboard.png
#   make dashboard         the same on the bundled cluster: 30 claims with
#                          pods, one grown, half deleted (tests/dashboard/cluster.sh),
#                          the agents scraped through the apiserver's pod proxy

DASH_DIR := tests/dashboard
DASH_OUT := target/dashboard
DASH_PNG := docs/dashboard.png

.PHONY: dashboard-build dashboard-check dashboard-local dashboard

dashboard-build:
	$(DASH_DIR)/build.sh

dashboard-check: dashboard-build
	$(DASH_DIR)/render.sh --check

dashboard-local: dashboard-build
	rm -rf $(DASH_OUT)/local
	mkdir -p $(DASH_OUT)/local
	STEAD_DASHBOARD_CAPTURE=$(CURDIR)/$(DASH_OUT)/local \
	  $(CARGO) test --locked --test dashboard_local -- --ignored --nocapture
	$(DASH_DIR)/render.sh $(DASH_OUT)/local $(DASH_PNG) \
	  "From two local agents (make dashboard-local): no apiserver, so the Claims and Apiserver rows have no series."

dashboard: dashboard-build deploy
	$(DASH_DIR)/cluster.sh $(DASH_OUT)/cluster
	$(DASH_DIR)/render.sh $(DASH_OUT)/cluster $(DASH_PNG) \
	  "From the bundled cluster (make dashboard): 30 claims with pods, one grown, half deleted."
