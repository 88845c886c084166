#!/usr/bin/env bash
# Runs the upstream external-storage e2e suite (e2e.test of the cluster's
# release, External.Storage) against Stead on the bundled cluster, with the
# testdriver files of this folder; ginkgo in parallel; reports in
# target/upstream/<pass>/ (junit.xml, report.json, the log) and one summary
# line: "upstream-e2e <pass>: ran N, passed P, failed F, skipped S".
#
#   tests/upstream/run.sh fast   not [Slow], not [Serial] (make upstream-e2e)
#   tests/upstream/run.sh slow   only [Slow] or [Serial] (make upstream-e2e-slow)
#
# Both leave out [Disruptive] (they restart kubelet or nodes, which this
# cluster's tiers do themselves), [Flaky], and every [Feature:…] but the two
# whose needs are met: VolumeSnapshotDataSource (the VolumeSnapshot API, which
# the cluster runs) and VolumeSourceXFS (xfs, which Stead formats). README.md
# says why each left-out category is left out.
#
# UPSTREAM_E2E_PROCS: ginkgo processes (default 3); UPSTREAM_E2E_FOCUS: a
# regexp that replaces the focus below (to rerun some specs; the label
# filter and the skips still apply).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/upstream/lib.sh
source "$here/lib.sh"

pass=${1:-fast}
procs=${UPSTREAM_E2E_PROCS:-3}
out=$(cd "$here/../.." && pwd)/target/upstream/$pass
[[ -x $E2E_TEST && -x $GINKGO ]] || die "e2e.test or ginkgo is missing: run tests/upstream/build.sh"
[[ -r $KUBECONFIG_ADMIN ]] || die "no local cluster ($KUBECONFIG_ADMIN): run make deploy"
command -v jq >/dev/null || die "jq is missing: apt-get install jq"

features='Feature: isEmpty || Feature: isSubsetOf {VolumeSnapshotDataSource, VolumeSourceXFS}'
case $pass in
  fast) labels="!Disruptive && !Flaky && !Slow && !Serial && ($features)" ;;
  slow) labels="!Disruptive && !Flaky && (Slow || Serial) && ($features)" ;;
  *) die "usage: $0 fast|slow" ;;
esac

driver='External Storage \[Driver: stead\.csi\.dev\]'
# stead-driver.yaml: every suite. stead-xfs-driver.yaml: only growing a
# volume, on its default filesystem (xfs).
focus=(
  --focus "$driver \[Testpattern:"
  --focus "$driver \[Class: stead-xfs\] \[Testpattern: [^]]*\(default fs\)[^]]*\] (volume-expand|ephemeral .*should support expansion of pvcs created for ephemeral pvcs)"
)
# provisioning "should provision storage with any volume data source" needs
# a volume populator (registry.k8s.io/sig-storage/hello-populator) and the
# volume-data-source-validator: images of kubernetes-csi modules that this
# machine's Go module proxy does not serve and no registry here could give.
skip=(--skip "$driver \[Testpattern: [^]]*\] provisioning should provision storage with any volume data source")
# A mounted ext4 grows only with CAP_SYS_RESOURCE (bit 24 of the capability
# set); without it, the agent's online resize2fs is refused and the volume
# grows at its next stage. Then the specs that wait for an ext4 to grow
# under a running pod cannot pass here: they run on xfs (above) instead.
if ! (((0x$(awk '/^CapEff/ {print $2}' /proc/self/status) >> 24) & 1)); then
  log "no CAP_SYS_RESOURCE here: the online-expansion specs run on stead-xfs only (see README.md)"
  skip+=(
    --skip "$driver \[Testpattern: Dynamic PV \(default fs\)\(allowExpansion\)\] volume-expand should resize volume when PVC is edited while pod is using it"
    --skip "$driver \[Testpattern: Generic Ephemeral-volume \(default fs\) [^]]*\] ephemeral should support expansion of pvcs created for ephemeral pvcs"
  )
fi
[[ -n ${UPSTREAM_E2E_FOCUS:-} ]] && focus=(--focus "$UPSTREAM_E2E_FOCUS")

# The classes and the snapshot class the testdriver files copy.
for c in stead stead-xfs; do
  kubectl_admin get storageclass "$c" >/dev/null ||
    die "StorageClass $c is missing: make deploy applies deploy/"
done
kubectl_admin get volumesnapshotclass stead >/dev/null ||
  die "VolumeSnapshotClass stead is missing: make deploy applies deploy/snapshot/"

rm -rf "$out"
mkdir -p "$out"
log "pass $pass: $procs ginkgo processes; log in $out/e2e.log"
start=$SECONDS
status=0
# e2e.test flags after "--": the cluster, the drivers; its own progress
# and failure dumps go to the log.
"$GINKGO" --procs "$procs" --timeout 3h --no-color --silence-skips \
  --label-filter "$labels" "${focus[@]}" "${skip[@]}" \
  --output-dir "$out" --junit-report junit.xml --json-report report.json \
  "$E2E_TEST" -- \
  --kubeconfig "$KUBECONFIG_ADMIN" \
  --provider skeleton \
  --storage.testdriver "$here/stead-driver.yaml" \
  --storage.testdriver "$here/stead-xfs-driver.yaml" \
  >"$out/e2e.log" 2>&1 || status=$?
elapsed=$((SECONDS - start))

# Ginkgo's own lines ("Ran N of M Specs", "SUCCESS!/FAIL! -- ...") and the
# names of the failed specs.
grep -E '^(Ran [0-9]+ of [0-9]+ Specs|SUCCESS!|FAIL!|  \[FAIL\])' "$out/e2e.log" >&2 || true
[[ -r $out/report.json ]] || die "ginkgo wrote no report (exit $status); see $out/e2e.log"
# Specs that ran (passed or failed) and those skipped at run time (by the
# suite, for a capability or pattern the driver lacks); specs left out by
# the filters above are not counted.
read -r ran passed failed skipped < <(jq -r '
  [.[].SpecReports[] | select(.LeafNodeType == "It")] as $s |
  ($s | map(select(.State == "passed")) | length) as $p |
  ($s | map(select(.State == "failed" or .State == "panicked" or .State == "timedout" or .State == "aborted" or .State == "interrupted")) | length) as $f |
  ($s | map(select(.State == "skipped" and .NumAttempts > 0)) | length) as $k |
  "\($p + $f) \($p) \($f) \($k)"' "$out/report.json")
jq -r '.[].SpecReports[] | select(.LeafNodeType == "It" and .State == "skipped" and .NumAttempts > 0) |
  "\(.ContainerHierarchyTexts | join(" ")) \(.LeafNodeText): \(.Failure.Message)"' \
  "$out/report.json" | sort >"$out/skipped.txt"
echo "upstream-e2e $pass: ran $ran, passed $passed, failed $failed, skipped $skipped in ${elapsed} s (runtime skips and why: $out/skipped.txt)"
((status == 0 && failed == 0)) || die "upstream-e2e $pass failed (ginkgo exit $status); see $out/e2e.log"
