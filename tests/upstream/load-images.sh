#!/usr/bin/env bash
# Imports the images build.sh made (lib.sh E2E_IMAGES) into every node's
# containerd, under the names the suite asks for, where an image of that
# name and digest is not there yet. The specs' pods pull IfNotPresent, so a
# present image is used and nothing is pulled (there is no registry here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../cluster/lib.sh"
# shellcheck source=tests/cluster/images.sh
source "$here/../cluster/images.sh"
# shellcheck source=tests/upstream/lib.sh
source "$here/lib.sh"

[[ -r $STATE/nodes.count ]] || die "no local cluster in $STATE: run make cluster-up"

# load_node I: the images node I lacks, or has under another digest.
load_node() {
  local i=$1 kind name archive digest have
  for kind in "${!E2E_IMAGES[@]}"; do
    name=${E2E_IMAGES[$kind]}
    archive=$(e2e_image_archive "$kind")
    [[ -r $archive ]] || die "$archive is missing: run tests/upstream/build.sh"
    digest=$(tar -xOf "$archive" index.json | grep -o 'sha256:[0-9a-f]\{64\}' | head -1)
    have=$(ctr_k8s "$i" images list "name==$name" | awk 'NR > 1 {print $3}')
    [[ $have == "$digest" ]] && continue
    import_archive "$i" "$archive" >/dev/null
    log "$(node_name "$i"): imported $name"
  done
}

pids=()
for i in $(node_indexes); do
  [[ -S $(node_containerd_sock "$i") ]] ||
    die "the containerd of $(node_name "$i") is not running: run make cluster-up"
  load_node "$i" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
((status == 0)) || die "importing the e2e images failed on at least one node (errors above)"
log "the e2e images are on every node: ${E2E_IMAGES[*]}"
