#!/usr/bin/env python3
"""Where the time of a claim and of its pod goes (issue 16, item 2).

Runs the burst of `make bench-compare` (N pods created at once, each with
its own WaitForFirstConsumer claim of class bench-wffc) on the running
bundled cluster with Stead deployed (tests/bench/anchors/deploy.sh stead),
then deletes it all at once, and prints, per stage, the median, p90 and
max over the claims, from watches this script holds open on the apiserver
(claims, PVs, pods and events of the namespace, each event stamped when it
arrives here) and from the agents' own log lines of each CSI call:

    tests/bench/trace.py [--pods 100] [--class bench-wffc]

Stages of the bind and the pod start, per claim and its pod:
  created -> the scheduler's node choice (selected-node on the claim)
  node choice -> PV created (Stead: reads the claim, CreateVolume, POST PV)
  PV created -> claim Bound (the PV controller's binder)
  claim Bound -> pod bound to its node (the scheduler's PreBind)
  pod bound -> NodeStageVolume, NodePublishVolume returned (kubelet, Stead)
  NodePublishVolume -> pod Running (kubelet and containerd)
and of the deletion (pods and claims deleted as two collections), per PV:
  pod deleted -> NodeUnpublishVolume, NodeUnstageVolume returned (kubelet)
  claim deleted -> PV Released (pvc-protection, the PV controller)
  Released -> DeleteVolume returned -> PV deleting -> Stead's finalizer off
  (Stead) -> PV gone (pv-protection)

Needs the cluster's env ($STATE/env, as tests/cluster/lib.sh writes it) and
kubectl access to the agents' logs. Removes what it made.
"""

import argparse
import calendar
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

STEAD_FINALIZER = "stead.csi.dev/volume-protection"
STATE = os.environ.get("STEAD_CLUSTER_DIR", "/tmp/stead-cluster")


def cluster_env():
    out = subprocess.run(
        ["bash", "-c", f'set -e; source "{STATE}/env"; printf "%s\\0%s" "$KUBECTL" "$KUBECONFIG"'],
        check=True, capture_output=True, text=True).stdout
    kubectl, kubeconfig = out.split("\0")
    env = dict(os.environ, KUBECONFIG=kubeconfig)
    return kubectl, env


KUBECTL, ENV = cluster_env()


def k(*args, stdin=None, check=True):
    return subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True,
                          env=ENV, check=check).stdout


class Watch(threading.Thread):
    """Holds `kubectl get --raw PATH?watch=1` open; stamps each event."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.events = []  # (time, type, object)
        self.lock = threading.Lock()
        self.proc = subprocess.Popen([KUBECTL, "get", "--raw", path], stdout=subprocess.PIPE,
                                     env=ENV, text=True)
        self.start()

    def run(self):
        for line in self.proc.stdout:
            now = time.time()
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append((now, ev.get("type"), ev.get("object", {})))

    def snapshot(self):
        with self.lock:
            return list(self.events)

    def stop(self):
        self.proc.terminate()


def first(events, pred):
    for t, typ, obj in events:
        if pred(typ, obj):
            return t
    return None


def manifests(ns, i, cls):
    name = f"t{i:03d}"
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": name, "namespace": ns},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": cls,
                      "resources": {"requests": {"storage": "16Mi"}}}}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "c", "image": "localhost/busybox:stead",
                                    "imagePullPolicy": "Never",
                                    "command": ["sh", "-c", "echo written > /v/file && exec sleep 3600"],
                                    "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
                    "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": name}}]}}
    return name, claim, pod


def create(obj):
    k("create", "-f", "-", stdin=json.dumps(obj))
    return time.time()


def wait_for(what, cond, limit=900):
    deadline = time.time() + limit
    while not cond():
        if time.time() > deadline:
            sys.exit(f"trace: {what}: not so after {limit} s")
        time.sleep(0.2)  # a poll of the watches' state, not a wait for time


def phase_of(obj):
    return obj.get("status", {}).get("phase")


def agent_log_lines(since):
    """(time, rpc, volume id) of every CSI call the agents logged as ok."""
    out = []
    pods = k("-n", "stead-system", "get", "pods", "-l", "app.kubernetes.io/name=stead",
             "-o", "jsonpath={.items[*].metadata.name}").split()
    for p in pods:
        log = k("-n", "stead-system", "logs", p, "-c", "stead", f"--since-time={since}",
                "--timestamps", check=False)
        for line in log.splitlines():
            if '"ok"' not in line and " ok" not in line:
                continue
            m = re.match(r"(\S+)\s", line)
            rpc = re.search(r'rpc[=":\s]+"?([A-Za-z]+)', line)
            vol = re.search(r'volume\.id[=":\s]+"?([A-Za-z0-9._-]+)', line)
            if not (m and rpc and vol):
                continue
            ts = m.group(1)
            # RFC 3339 with nanoseconds from kubectl --timestamps.
            base, frac = (ts.rstrip("Z").split(".") + ["0"])[:2]
            t = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)
            out.append((t, rpc.group(1), vol.group(1)))
    return out


QUEUES = ("claims", "volumes", "pvcprotection", "pvprotection")


def controller_queues():
    """{queue: (adds, queue seconds, work seconds)} of kube-controller-manager's
    PV binder and protection controllers, from its /metrics (the admin
    certificate of the bundled cluster; None when it cannot be read)."""
    pki = f"{STATE}/pki"
    try:
        text = subprocess.run(
            ["curl", "-sfk", "--compressed", "--cert", f"{pki}/admin.crt", "--key", f"{pki}/admin.key",
             "https://127.0.0.1:10257/metrics"], capture_output=True, text=True, check=True,
            timeout=30).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    out = {}
    for q in QUEUES:
        vals = []
        for metric in ("workqueue_adds_total", "workqueue_queue_duration_seconds_sum",
                       "workqueue_work_duration_seconds_sum"):
            m = re.search(rf'^{metric}{{name="{q}"}} (\S+)$', text, re.M)
            vals.append(float(m.group(1)) if m else 0.0)
        out[q] = tuple(vals)
    return out


def queue_rows(before, after):
    if before is None or after is None:
        return ["(kube-controller-manager's /metrics could not be read: no queue figures)"]
    rows = ["| kube-controller-manager queue | adds | mean wait in the queue | mean work per item |",
            "|---|---|---|---|"]
    for q in QUEUES:
        adds = after[q][0] - before[q][0]
        if adds <= 0:
            continue
        wait = (after[q][1] - before[q][1]) / adds
        work = (after[q][2] - before[q][2]) / adds
        rows.append(f"| {q} | {adds:.0f} | {wait * 1000:.0f} ms | {work * 1000:.1f} ms |")
    return rows


def stats(name, values, out):
    values = [v for v in values if v is not None]
    if not values:
        out.append(f"| {name} | — | — | — | 0 |")
        return
    values.sort()
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    out.append(f"| {name} | {statistics.median(values):.2f} s | {p90:.2f} s | "
               f"{values[-1]:.2f} s | {len(values)} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--class", dest="cls", default="bench-wffc")
    ap.add_argument("--creators", type=int, default=32)
    args = ap.parse_args()

    ns = f"trace-{int(time.time())}"
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    k("create", "namespace", ns)
    w_pvc = Watch(f"/api/v1/namespaces/{ns}/persistentvolumeclaims?watch=1")
    w_pod = Watch(f"/api/v1/namespaces/{ns}/pods?watch=1")
    w_pv = Watch("/api/v1/persistentvolumes?watch=1")
    time.sleep(1)  # lets the three watches open before the first create

    items = [manifests(ns, i, args.cls) for i in range(args.pods)]
    queues_before = controller_queues()
    created = {}
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.creators) as pool:
        futs = {}
        for name, claim, pod in items:
            futs[pool.submit(create, claim)] = name
            pool.submit(create, pod)
        for f in futs:
            created[futs[f]] = f.result()

    def all_running():
        run = {o["metadata"]["name"] for _, _, o in w_pod.snapshot() if phase_of(o) == "Running"}
        return len(run) == args.pods

    wait_for("every pod Running", all_running)
    t_running = time.time() - t0
    queues_bound = controller_queues()

    # Deletion: pods and claims at once.
    t_del = time.time()
    # Both collections at once, each one call, as `make bench-compare`'s (c)
    # does (the apiserver deletes the items of a collection in turn).
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda kind: k("delete", "--raw", f"/api/v1/namespaces/{ns}/{kind}"),
                      ["pods", "persistentvolumeclaims"]))

    def pvs_gone():
        gone = {o["metadata"]["name"] for _, typ, o in w_pv.snapshot()
                if typ == "DELETED" and o.get("spec", {}).get("claimRef", {}).get("namespace") == ns}
        return len(gone) == args.pods

    wait_for("every PV gone", pvs_gone)
    t_gone = time.time() - t_del
    queues_gone = controller_queues()
    time.sleep(2)  # lets the agents' last log lines reach their files
    calls = agent_log_lines(since)
    for w in (w_pvc, w_pod, w_pv):
        w.stop()
    k("delete", "namespace", ns, "--wait=false")

    pvc_ev, pod_ev, pv_ev = w_pvc.snapshot(), w_pod.snapshot(), w_pv.snapshot()
    rows = {n: {} for n, _, _ in items}
    for name in rows:
        r = rows[name]
        r["created"] = created[name]
        mine = [(t, ty, o) for t, ty, o in pvc_ev if o["metadata"]["name"] == name]
        r["selected"] = first(mine, lambda ty, o: "volume.kubernetes.io/selected-node"
                              in o["metadata"].get("annotations", {}))
        r["bound"] = first(mine, lambda ty, o: phase_of(o) == "Bound")
        r["claim_deleted"] = first(mine, lambda ty, o: "deletionTimestamp" in o["metadata"])
        pvs = [(t, ty, o) for t, ty, o in pv_ev
               if o.get("spec", {}).get("claimRef", {}).get("namespace") == ns
               and o["spec"]["claimRef"].get("name") == name]
        r["pv"] = first(pvs, lambda ty, o: True)
        r["pv_released"] = first(pvs, lambda ty, o: phase_of(o) == "Released")
        r["pv_gone"] = first(pvs, lambda ty, o: ty == "DELETED")
        r["pv_deleting"] = first(pvs, lambda ty, o: "deletionTimestamp" in o["metadata"])
        r["pv_ours_gone"] = first(pvs, lambda ty, o: "deletionTimestamp" in o["metadata"] and
                                  STEAD_FINALIZER not in o["metadata"].get("finalizers", []))
        handle = next((o["spec"].get("csi", {}).get("volumeHandle") for _, _, o in pvs), None)
        r["handle"] = handle
        pods = [(t, ty, o) for t, ty, o in pod_ev if o["metadata"]["name"] == name]
        r["pod_bound"] = first(pods, lambda ty, o: o.get("spec", {}).get("nodeName"))
        r["running"] = first(pods, lambda ty, o: phase_of(o) == "Running")
        r["pod_deleted"] = first(pods, lambda ty, o: "deletionTimestamp" in o["metadata"])
        for rpc in ("CreateVolume", "NodeStageVolume", "NodePublishVolume", "NodeUnpublishVolume",
                    "NodeUnstageVolume", "DeleteVolume"):
            r[rpc] = next((t for t, c, v in calls if c == rpc and v == handle), None)

    def d(a, b):
        return lambda r: (r[b] - r[a]) if r.get(a) and r.get(b) else None

    stages = [
        ("created → scheduler's node choice (scheduler)", d("created", "selected")),
        ("node choice → PV created (Stead)", d("selected", "pv")),
        ("  of which: node choice → CreateVolume returned", d("selected", "CreateVolume")),
        ("PV created → claim Bound (PV controller)", d("pv", "bound")),
        ("claim Bound → pod bound to its node (scheduler PreBind)", d("bound", "pod_bound")),
        ("pod bound → NodeStageVolume returned (kubelet, Stead)", d("pod_bound", "NodeStageVolume")),
        ("NodeStageVolume → NodePublishVolume returned (kubelet, Stead)",
         d("NodeStageVolume", "NodePublishVolume")),
        ("NodePublishVolume → pod Running (kubelet, containerd)", d("NodePublishVolume", "running")),
        ("created → claim Bound", d("created", "bound")),
        ("created → pod Running", d("created", "running")),
        ("pod deleted → NodeUnpublishVolume returned (kubelet)", d("pod_deleted", "NodeUnpublishVolume")),
        ("claim deleted → PV Released (PV controller)", d("claim_deleted", "pv_released")),
        ("PV Released → DeleteVolume returned (Stead)", d("pv_released", "DeleteVolume")),
        ("NodeUnpublishVolume → NodeUnstageVolume returned (kubelet)",
         d("NodeUnpublishVolume", "NodeUnstageVolume")),
        ("NodeUnstageVolume → DeleteVolume returned (Stead)", d("NodeUnstageVolume", "DeleteVolume")),
        ("DeleteVolume → PV deleting (Stead's DELETE)", d("DeleteVolume", "pv_deleting")),
        ("PV deleting → Stead's finalizer off (Stead)", d("pv_deleting", "pv_ours_gone")),
        ("Stead's finalizer off → PV gone (pv-protection)", d("pv_ours_gone", "pv_gone")),
        ("PV Released → PV gone", d("pv_released", "pv_gone")),
    ]
    out = [f"trace: {args.pods} pods, a {args.cls} claim each; all Running after "
           f"{t_running:.1f} s; deleted at once, every PV gone after {t_gone:.1f} s; "
           f"{len(calls)} CSI calls in the agents' logs",
           "",
           "| stage | median | p90 | max | claims |",
           "|---|---|---|---|---|"]
    for name, f in stages:
        stats(name, [f(r) for r in rows.values()], out)
    out += ["", "From the first create until every pod ran:"] + queue_rows(queues_before, queues_bound)
    out += ["", "From the deletion until every PV was gone:"] + queue_rows(queues_bound, queues_gone)
    print("\n".join(out))


if __name__ == "__main__":
    main()
