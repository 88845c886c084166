#!/usr/bin/env bash
# `make bench-io`: the data path against raw disk (issue 16, item 4). fio
# runs the same job (tests/bench/io/fio_bench.py jobfile: a fill, then
# BENCH_IO_RUNS rounds of seq read/write 1 MiB and rand read/write 4 KiB,
# iodepth 16, direct I/O, time_based) from inside a pod on a Stead volume of
# each backend (dir; image with ext4; image with xfs; a volumeMode: Block
# claim, fio on the device) and on the pool's filesystem itself, in the
# node's mount namespace; then writes the section "## Data path (make
# bench-io)" of docs/BENCHMARKS.md with the ratios to raw.
#
# Needs the bundled cluster up with Stead deployed (make deploy), and root
# (nsenter into the node, ctr on its containerd). Everything it makes (the
# namespace stead-bench-io with its claims and pods, the StorageClasses
# stead-bench-io-*, the raw test file on the node, the fio image in the
# node's containerd) is removed on exit, failure and Ctrl-C included. The
# fio outputs are kept in target/bench-io/.
#
#   BENCH_IO_SIZE     MiB of the file fio works on (default 2048)
#   BENCH_IO_RUNTIME  seconds each measured job runs (default 15)
#   BENCH_IO_RAMP     seconds before each job's figures count (default 2)
#   BENCH_IO_RUNS     rounds; the figures are their medians (default 3)
#   BENCH_IO_NODE     the node (default: the cluster's first, STEAD_NODE_NAME)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
# shellcheck source=tests/cluster/lib.sh
source "$here/../../cluster/lib.sh"

blog() { printf '[bench-io] %s\n' "$*" >&2; }
fail() {
  blog "error: $*"
  exit 1
}

((EUID == 0)) || fail "run as root (nsenter into the node, ctr on its containerd)"
env_file=$STATE/env
[[ -r $env_file ]] || fail "no local cluster ($env_file is missing): run make deploy"
# shellcheck disable=SC1090
source "$env_file"
k() { "$KUBECTL" "$@"; }

SIZE_MIB=${BENCH_IO_SIZE:-2048}
RUNTIME=${BENCH_IO_RUNTIME:-15}
RAMP=${BENCH_IO_RAMP:-2}
RUNS=${BENCH_IO_RUNS:-3}
NODE=${BENCH_IO_NODE:-$STEAD_NODE_NAME}
for v in SIZE_MIB RUNTIME RAMP RUNS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || fail "$v=${!v}: give a whole number"
done
((SIZE_MIB >= 64 && RUNTIME >= 1 && RUNS >= 1)) || fail "BENCH_IO_SIZE >= 64, BENCH_IO_RUNTIME >= 1, BENCH_IO_RUNS >= 1"

NS=stead-bench-io
PART_OF=app.kubernetes.io/part-of=stead-bench-io
PART_OF_YAML="app.kubernetes.io/part-of: stead-bench-io"
CLASS=stead-bench-io
# Where the volume is in the pod, and the file or device fio works on.
DATA_FILE=/data/stead-bench-io.dat
DEVICE=/dev/stead-bench-io
# A filesystem volume holds the file and its filesystem's own blocks (ext4's
# journal and inode tables, xfs's log; xfs needs at least 300 MiB).
VOLUME_MIB=$((SIZE_MIB + (SIZE_MIB / 8 > 320 ? SIZE_MIB / 8 : 320)))
# The longest a target may take: the fill at 10 MB/s or more, then the
# rounds, with room for the pod to start.
FIO_LIMIT=$((180 + SIZE_MIB / 10 + RUNS * 4 * (RUNTIME + RAMP + 5)))

node_index=
for i in $(node_indexes); do
  if [[ $(node_name "$i") == "$NODE" ]]; then node_index=$i; fi
done
[[ -n $node_index ]] || fail "node $NODE is not a node of the bundled cluster (${STEAD_NODE_NAMES:-none})"
mntns=${STEAD_MNTNS_DIR:-$MNTNS_DIR}/$NODE
innode() { nsenter --mount="$mntns" -- "$@"; }
innode true || fail "cannot enter the mount namespace of $NODE ($mntns)"
command -v python3 >/dev/null || fail "python3 is needed (it reads fio's JSON and writes the section)"

work=$(mktemp -d "${TMPDIR:-/tmp}/stead-bench-io.XXXXXX")
results=$work/results
mkdir -p "$results"
keep=$repo/target/bench-io

# --- cleanup: everything this run made, whatever stopped it ----------------
raw_files=()
image_loaded=
cleanup() {
  local rc=$? pvs f
  trap - EXIT
  set +e
  blog "removing what the bench made"
  if k get namespace "$NS" >/dev/null 2>&1; then
    k delete namespace "$NS" --wait=false >/dev/null
    k wait --for=delete "namespace/$NS" --timeout=300s >/dev/null ||
      blog "warning: namespace $NS still there after 300 s"
  fi
  # The claims' PVs go once their agent deleted the volumes (reclaim Delete).
  mapfile -t pvs < <(k get pv --no-headers -o custom-columns=NAME:.metadata.name,CLASS:.spec.storageClassName 2>/dev/null |
    awk -v p="$CLASS-" 'index($2, p) == 1 { print $1 }')
  if ((${#pvs[@]})); then
    k wait --for=delete "${pvs[@]/#/pv/}" --timeout=300s >/dev/null ||
      blog "warning: PVs of the bench's classes still there after 300 s: ${pvs[*]}"
  fi
  k delete storageclass -l "$PART_OF" --ignore-not-found >/dev/null
  for f in "${raw_files[@]}"; do innode rm -f "$f" "$f.probe"; done
  if [[ -n $image_loaded ]]; then
    ctr_k8s "$node_index" images rm "$image_loaded" >/dev/null 2>&1 ||
      blog "warning: could not remove $image_loaded from $NODE's containerd"
  fi
  if ((rc == 0)); then
    rm -rf "$work"
  else
    blog "failed (exit $rc); logs and outputs kept in $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- what is there: Stead, its pools on the node ----------------------------
k -n stead-system rollout status daemonset/stead-node --timeout=120s >/dev/null ||
  fail "Stead's DaemonSet is not ready: run make deploy"
ds_json=$work/daemonset.json
k -n stead-system get daemonset stead-node -o json >"$ds_json"
pool_dir='' pool_dir_path='' pool_image='' pool_image_path=''
while read -r name backend path; do
  if [[ $backend == dir && -z $pool_dir ]]; then pool_dir=$name pool_dir_path=$path; fi
  if [[ $backend == image && -z $pool_image ]]; then pool_image=$name pool_image_path=$path; fi
done < <(python3 "$here/fio_bench.py" pools <"$ds_json")
[[ -n $pool_dir && -n $pool_image ]] || fail "Stead's STEAD_POOLS needs a dir pool and an image pool"
blog "node $NODE; pools: $pool_dir (dir) at $pool_dir_path, $pool_image (image) at $pool_image_path"

# raw_file POOL_PATH: the raw test file on the pool's filesystem: at the root
# of that filesystem when the pool is a folder in it (the agent never looks
# there), else a regular file in the pool folder (the agent takes only
# folders for volumes).
raw_file() {
  local mnt
  mnt=$(innode findmnt -n -o TARGET -T "$1")
  if [[ ${1%/} != "${mnt%/}" ]]; then echo "${mnt%/}/stead-bench-io-raw.dat"; else echo "${1%/}/.stead-bench-io-raw.dat"; fi
}
# fs_of PATH: "FSTYPE on SOURCE, mounted at TARGET" of the filesystem of PATH.
fs_of() {
  innode findmnt -n -o FSTYPE,SOURCE,TARGET -T "$1" | awk '{ printf "%s on %s, mounted at %s", $1, $2, $3 }'
}
# disk_of PATH: what the filesystem of PATH lies on, and whether the host's
# page cache sits between it and the machine's disk.
disk_of() {
  local src loop back dio
  src=$(innode findmnt -n -o SOURCE -T "$1")
  src=${src%%[[]*} # btrfs names a subvolume: /dev/loop3[/sub]
  if [[ $src == /dev/loop* && -r /sys/block/${src#/dev/}/loop/backing_file ]]; then
    loop=${src#/dev/}
    back=$(</sys/block/"$loop"/loop/backing_file)
    dio=$(</sys/block/"$loop"/loop/dio)
    printf '%s, a loop device over %s (%s; direct I/O %s)' "$src" "$back" \
      "$(findmnt -n -o FSTYPE,SOURCE -T "$back" | awk '{ printf "%s on %s", $1, $2 }')" \
      "$([[ $dio == 1 ]] && echo on || echo off)"
  else
    printf '%s' "$src"
  fi
}
# avail_mib PATH: free MiB on the filesystem of PATH, in the node.
avail_mib() { innode df -B1M --output=avail "$1" | tail -n 1 | tr -d ' '; }
need_space() {
  local path=$1 mib=$2 what=$3 have
  have=$(avail_mib "$path")
  ((have >= mib + 256)) ||
    fail "$what needs $mib MiB (and 256 MiB to spare) on the filesystem of $path in $NODE; it has $have MiB: lower BENCH_IO_SIZE"
}

raw_dir_file=$(raw_file "$pool_dir_path")
raw_image_file=$(raw_file "$pool_image_path")
same_fs=0
[[ $(innode stat -c %d "$pool_dir_path") == $(innode stat -c %d "$pool_image_path") ]] && same_fs=1

# --- the image ---------------------------------------------------------------
built=$("$here/image.sh")
read -r image archive <<<"$built"
[[ -n $image && -r $archive ]] || fail "tests/bench/io/image.sh gave no image"
# The node's fio is the host's (the node's mount namespace sees the host's
# /usr), the same binary as the image's.
host_fio=$(command -v fio)
# Only into the bench's node: its pods run nowhere else.
import_archive "$node_index" "$archive" "$image" >/dev/null
image_loaded=$image
blog "image $image in $NODE's containerd"

# --- leftovers of an interrupted run, then the bench's own objects ----------
if k get namespace "$NS" >/dev/null 2>&1; then
  blog "removing namespace $NS left by an earlier run"
  k delete namespace "$NS" --wait=true --timeout=300s >/dev/null
fi
k delete storageclass -l "$PART_OF" --ignore-not-found >/dev/null
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata:
  name: $NS
  labels:
    $PART_OF_YAML
YAML
# class NAME POOL [FSTYPE]: a class of the bench, its volumes on NODE only.
class() {
  local name=$1 pool=$2 fstype=
  [[ -z ${3:-} ]] || fstype="  csi.storage.k8s.io/fstype: $3"
  k apply -f - >/dev/null <<YAML
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: $CLASS-$name
  labels:
    $PART_OF_YAML
provisioner: stead.csi.dev
parameters:
  pool: $pool
$fstype
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
allowedTopologies:
  - matchLabelExpressions:
      - key: topology.stead.csi.dev/node
        values: [$NODE]
YAML
}
class dir "$pool_dir"
class ext4 "$pool_image" ext4
class xfs "$pool_image" xfs
class block "$pool_image"

# pod_yaml NAME CONTAINER_ARGS_JSON VOLUME_YAML MOUNT_YAML ENV_VALUE: a pod on
# NODE running fio once (restartPolicy Never).
pod_yaml() {
  local name=$1 args=$2 volume_yaml=$3 mount_yaml=$4 file=$5
  cat <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $name
  namespace: $NS
  labels:
    $PART_OF_YAML
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: 5
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchFields:
              - key: metadata.name
                operator: In
                values: [$NODE]
  containers:
    - name: fio
      image: $image
      imagePullPolicy: Never
      command: [/usr/bin/fio]
      args: $args
      env:
        - name: BENCH_IO_FILE
          value: "$file"
$mount_yaml
  volumes:
$volume_yaml
YAML
}

# pod_done NAME LIMIT: waits until the pod has Succeeded or Failed and prints
# which; fails after LIMIT seconds with what the pod and its events say.
pod_done() {
  local pod=$1 limit=$2 deadline phase
  deadline=$((SECONDS + limit))
  while :; do
    phase=$(k -n "$NS" get pod "$pod" -o 'jsonpath={.status.phase}' 2>/dev/null || true)
    if [[ $phase == Succeeded || $phase == Failed ]]; then
      echo "$phase"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      k -n "$NS" describe pod "$pod" | tail -n 30 >&2 || true
      k -n "$NS" logs "$pod" --tail=20 >&2 || true
      fail "pod $pod not finished after $limit s (phase ${phase:-unknown})"
    fi
    sleep 2 # a poll: the loop checks the phase and its deadline
  done
}

# --- the engine: io_uring where it works in a pod and on the node, else libaio
# probe_pod ENGINE: whether fio with ENGINE does direct I/O in a pod of NODE
# (a 16 MiB file in an emptyDir).
probe_pod() {
  local engine=$1 pod=probe-${1//_/-} phase
  pod_yaml "$pod" \
    "[\"--name=probe\", \"--ioengine=$engine\", \"--direct=1\", \"--filename=/probe/probe.dat\", \"--size=16M\", \"--rw=randread\", \"--bs=4k\", \"--iodepth=16\"]" \
    "    - name: probe
      emptyDir: {}" \
    "      volumeMounts:
        - name: probe
          mountPath: /probe" /probe/probe.dat | k apply -f - >/dev/null
  phase=$(pod_done "$pod" 180)
  k -n "$NS" logs "$pod" >"$work/$pod.log" 2>&1 || true
  k -n "$NS" delete pod "$pod" --wait=true --timeout=120s >/dev/null
  [[ $phase == Succeeded ]]
}
# probe_node ENGINE: the same on the pool's filesystem, in the node.
probe_node() {
  local engine=$1 ok=0
  raw_files+=("$raw_image_file")
  innode "$host_fio" --name=probe "--ioengine=$engine" --direct=1 "--filename=$raw_image_file.probe" \
    --size=16M --rw=randread --bs=4k --iodepth=16 >"$work/node-probe-$engine.log" 2>&1 && ok=1
  innode rm -f "$raw_image_file.probe"
  ((ok))
}
# first_error LOG...: the first line of the logs that reads like an error.
first_error() { cat "$@" 2>/dev/null | grep -m1 -i 'fio:\|err' || echo "no error line in the logs"; }
engine=
for e in io_uring libaio; do
  if probe_pod "$e" && probe_node "$e"; then
    engine=$e
    break
  fi
  blog "fio's $e engine does not work here: $(first_error "$work/probe-${e//_/-}.log" "$work/node-probe-$e.log")"
done
[[ -n $engine ]] || fail "neither io_uring nor libaio works for fio (logs in $work)"
if [[ $engine == io_uring ]]; then
  engine_why="io_uring: it works both in a pod and on the node"
else
  engine_why="libaio: io_uring failed in a pod or on the node ($(first_error "$work/probe-io-uring.log" "$work/node-probe-io_uring.log" | tr '|' '/'))"
fi
blog "engine $engine"

python3 "$here/fio_bench.py" jobfile --runs "$RUNS" --size-mib "$SIZE_MIB" --runtime "$RUNTIME" \
  --ramp "$RAMP" --engine "$engine" >"$work/bench.fio"
k -n "$NS" create configmap stead-bench-io-job --from-file=bench.fio="$work/bench.fio" >/dev/null

# --- raw: the pool's filesystem, in the node ---------------------------------
# run_raw KEY FILE: the job on FILE, in the node's mount namespace.
run_raw() {
  local key=$1 file=$2
  need_space "$(dirname "$file")" "$SIZE_MIB" "the raw run ($file)"
  raw_files+=("$file")
  blog "$key: fio on $file (about $((RUNS * 4 * (RUNTIME + RAMP))) s after the fill)"
  if ! timeout "$FIO_LIMIT" nsenter --mount="$mntns" -- env BENCH_IO_FILE="$file" "$host_fio" \
    --output-format=json - <"$work/bench.fio" >"$work/$key.log" 2>"$work/$key.err"; then
    tail -n 20 "$work/$key.err" >&2
    fail "fio failed on $file in $NODE"
  fi
  python3 "$here/fio_bench.py" extract "$work/$key.log" "$results/$key.json" --runs "$RUNS"
  innode rm -f "$file"
}
run_raw raw-dir "$raw_dir_file"
if ((same_fs)); then
  blog "raw-image: the $pool_image pool is on the same filesystem as the $pool_dir pool: one raw run for both"
else
  run_raw raw-image "$raw_image_file"
fi

# --- the volumes, one at a time -----------------------------------------------
loops=()
# run_volume KEY: a claim of class stead-bench-io-KEY and a pod running the job on it.
run_volume() {
  local key=$1 claim=data-$1 pod=fio-$1 mode=Filesystem mib=$VOLUME_MIB file=$DATA_FILE
  local volume_yaml mount_yaml pv handle phase deadline loop
  if [[ $key == block ]]; then mode=Block mib=$SIZE_MIB file=$DEVICE; fi
  need_space "$([[ $key == dir ]] && echo "$pool_dir_path" || echo "$pool_image_path")" "$mib" "the $key volume"
  blog "$key: a ${mib} MiB $mode claim and its pod (about $((RUNS * 4 * (RUNTIME + RAMP))) s after the fill)"
  k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $claim
  namespace: $NS
  labels:
    $PART_OF_YAML
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: $CLASS-$key
  volumeMode: $mode
  resources:
    requests:
      storage: ${mib}Mi
YAML
  volume_yaml="    - name: job
      configMap:
        name: stead-bench-io-job
    - name: data
      persistentVolumeClaim:
        claimName: $claim"
  if [[ $mode == Block ]]; then
    mount_yaml="      volumeMounts:
        - name: job
          mountPath: /job
      volumeDevices:
        - name: data
          devicePath: $DEVICE"
  else
    mount_yaml="      volumeMounts:
        - name: job
          mountPath: /job
        - name: data
          mountPath: /data"
  fi
  pod_yaml "$pod" '["--output-format=json", "/job/bench.fio"]' "$volume_yaml" "$mount_yaml" "$file" | k apply -f - >/dev/null
  if ! k -n "$NS" wait --for=jsonpath='{.status.phase}'=Bound "pvc/$claim" --timeout=180s >/dev/null; then
    k -n "$NS" describe pvc "$claim" | tail -n 20 >&2
    fail "claim $claim not Bound after 180 s"
  fi
  pv=$(k -n "$NS" get pvc "$claim" -o 'jsonpath={.spec.volumeName}')
  handle=$(k get pv "$pv" -o 'jsonpath={.spec.csi.volumeHandle}')
  # What an image volume's loop device does, seen while fio runs.
  if [[ $key != dir ]]; then
    deadline=$((SECONDS + 180))
    until [[ $(k -n "$NS" get pod "$pod" -o 'jsonpath={.status.phase}') != Pending ]] || ((SECONDS >= deadline)); do
      sleep 1 # a poll: the loop checks the phase and its deadline
    done
    loop=$(losetup --list --noheadings --output NAME,DIO,BACK-FILE 2>/dev/null | awk -v h="/$handle/" 'index($3, h) { print $1 " direct I/O " ($2 == 1 ? "on" : "off") }' | head -n 1)
    loops+=("$key: ${loop:-no loop device found for $handle}")
  fi
  phase=$(pod_done "$pod" "$FIO_LIMIT")
  k -n "$NS" logs "$pod" >"$work/$key.log" 2>&1 || true
  if [[ $phase != Succeeded ]]; then
    tail -n 30 "$work/$key.log" >&2
    fail "fio failed in pod $pod ($key volume)"
  fi
  python3 "$here/fio_bench.py" extract "$work/$key.log" "$results/$key.json" --runs "$RUNS"
  # Gone before the next is made: the node's disk holds one at a time.
  k -n "$NS" delete pod "$pod" --wait=true --timeout=120s >/dev/null
  k -n "$NS" delete pvc "$claim" --wait=true --timeout=120s >/dev/null
  k wait --for=delete "pv/$pv" --timeout=300s >/dev/null || fail "PV $pv of the $key volume not gone after 300 s"
}
for key in dir ext4 xfs block; do run_volume "$key"; done

# --- the section ---------------------------------------------------------------
pool_disk=$(disk_of "$pool_image_path")
loops_text=$(printf '%s; ' "${loops[@]}")
loops_text=${loops_text%; }
if [[ $pool_disk == *"direct I/O off"* ]]; then
  cache_note="That loop device does buffered I/O on its file, so the host's page cache keeps what the runs read and write below the pool's filesystem, for the raw runs and the volumes alike: the figures say how close each stack above that disk comes to the pool's filesystem, not how fast the machine's disk is. Loop devices of the image volumes while fio ran: ${loops_text:-none}."
else
  cache_note="Loop devices of the image volumes while fio ran: ${loops_text:-none}."
fi
stead_image=$(python3 -c '
import json, sys
t = json.load(open(sys.argv[1]))["spec"]["template"]
digest = (t["metadata"].get("annotations") or {}).get("stead.csi.dev/image-digest")
print(t["spec"]["containers"][0]["image"] + ("@" + digest if digest else ""))' "$ds_json")
fio_version=$("$host_fio" --version)
{
  echo "node=$NODE"
  echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "load_start=$load_start"
  echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)"
  echo "fio_version=${fio_version#fio-}"
  echo "fio_package=$(dpkg-query -W -f '${Version}' fio)"
  echo "stead_describe=$(git -C "$repo" describe --tags --always --dirty 2>/dev/null || echo unknown)"
  echo "stead_image=$stead_image"
  echo "kernel=$(uname -r)"
  echo "k8s_version=$STEAD_K8S_VERSION"
  echo "size_mib=$SIZE_MIB"
  echo "volume_mib=$VOLUME_MIB"
  echo "runtime=$RUNTIME"
  echo "ramp=$RAMP"
  echo "runs=$RUNS"
  echo "engine=$engine"
  echo "engine_why=$engine_why"
  echo "pool_dir=$pool_dir"
  echo "pool_image=$pool_image"
  echo "rawfs_dir=$(fs_of "$pool_dir_path")"
  echo "rawfs_image=$(fs_of "$pool_image_path")"
  echo "raw_image_is_raw_dir=$same_fs"
  echo "raw_file_dir=$raw_dir_file$([[ $same_fs == 1 ]] || echo " and $raw_image_file")"
  echo "pool_disk=$pool_disk"
  echo "cache_note=$cache_note"
} >"$results/meta.env"
rm -rf "$keep"
mkdir -p "$keep"
cp "$results"/* "$work/bench.fio" "$keep/"
python3 "$here/fio_bench.py" section --results "$results" --doc "$repo/docs/BENCHMARKS.md"
blog "section written to docs/BENCHMARKS.md; fio outputs in $keep"
