"""Compares renders of Stead's Helm chart with the kustomize base, and a
render with the values that asked for it.

    render_check.py same CHART_YAML HELM_RENDER KUSTOMIZE_RENDER...
        The chart's objects and kustomize's are the same objects, field for
        field (types included: "true" is not true), once the labels that only
        Helm sets are set aside from each object's metadata.labels, and only
        there: a selector or a pod template that differs is a difference.
        Those labels must be on every one of the chart's objects, with the
        values a release of this chart (CHART_YAML) gives them. Lists keep their order,
        mappings do not count theirs; comments do not count.
    render_check.py values HELM_RENDER VALUES_FILE
        What VALUES_FILE asks for is in the render: each pool in STEAD_POOLS
        (the container's path, the reserve), its hostPath volume and its
        HostToContainer mount; each class with its parameters; the
        tolerations, node selector and log format; the ServiceMonitor on the
        metrics Service's health port, path /metrics.

Prints what differs and exits 1 when anything does.
"""

import difflib
import sys

import yaml

# Set by the chart's _helpers.tpl ("stead.labels") besides deploy/base's own
# app.kubernetes.io/part-of; RELEASE is the release name helm_check.sh uses.
RELEASE = "stead"


def helm_labels(chart):
    return {
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/version": str(chart["appVersion"]),
        "helm.sh/chart": f"{chart['name']}-{chart['version']}",
    }


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key(obj):
    meta = obj.get("metadata", {})
    return (obj.get("kind", "?"), meta.get("namespace", ""), meta.get("name", "?"))


def show(k):
    kind, ns, name = k
    return f"{kind} {ns + '/' if ns else ''}{name}"


def by_key(objs, origin, problems):
    out = {}
    for o in objs:
        k = key(o)
        if k in out:
            problems.append(f"{origin}: {show(k)} is there twice")
        out[k] = o
    return out


def dump(obj):
    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False).splitlines()


def same(helm_path, kustomize_paths, chart_path):
    with open(chart_path) as f:
        expected = helm_labels(yaml.safe_load(f))
    problems = []
    helm = by_key(load(helm_path), "helm template", problems)
    kust = {}
    for p in kustomize_paths:
        kust.update(by_key(load(p), "kubectl kustomize", problems))
    for k, obj in helm.items():
        labels = obj.get("metadata", {}).get("labels") or {}
        for name, value in expected.items():
            if labels.get(name) != value:
                problems.append(
                    f"helm template: {show(k)} has label {name}={labels.get(name)!r}, "
                    f"not {value!r}"
                )
            labels.pop(name, None)
        if not labels:
            obj.get("metadata", {}).pop("labels", None)
    for k in sorted(set(kust) - set(helm)):
        problems.append(f"only in kubectl kustomize: {show(k)}")
    for k in sorted(set(helm) - set(kust)):
        problems.append(f"only in helm template: {show(k)}")
    for k in sorted(set(helm) & set(kust)):
        if helm[k] != kust[k]:
            diff = difflib.unified_diff(
                dump(kust[k]),
                dump(helm[k]),
                f"kubectl kustomize: {show(k)}",
                f"helm template: {show(k)}",
                lineterm="",
            )
            problems.append("\n".join(diff))
    report(problems, f"{len(helm)} objects, the same in both")


def values(helm_path, values_path):
    with open(values_path) as f:
        asked = yaml.safe_load(f)
    problems = []
    objs = by_key(load(helm_path), "helm template", problems)
    ns = next(k[1] for k in objs if k[0] == "DaemonSet")

    def get(kind, name, namespace=""):
        obj = objs.get((kind, namespace, name))
        if obj is None:
            problems.append(f"no {show((kind, namespace, name))} in the render")
        return obj or {}

    ds = get("DaemonSet", "stead-node", ns)
    pod = ds.get("spec", {}).get("template", {}).get("spec", {})
    container = next((c for c in pod.get("containers", []) if c["name"] == "stead"), {})
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def expect(what, have, want):
        if have != want:
            problems.append(f"{what}: {have!r}, asked {want!r}")

    entries = []
    for p in asked.get("pools", []):
        path = f"/var/lib/stead/pools/{p['name']}"
        entry = f"{p['name']}:{p['backend']}:{path}"
        if "reserve" in p:
            entry += f":reserve={p['reserve']}"
        entries.append(entry)
        vol = f"pool-{p['name']}"
        expect(
            f"volume {vol}",
            volumes.get(vol, {}).get("hostPath"),
            {"path": p["hostPath"], "type": "DirectoryOrCreate"},
        )
        m = mounts.get(vol, {})
        expect(f"mount {vol}", (m.get("mountPath"), m.get("mountPropagation")), (path, "HostToContainer"))
    if "pools" in asked:
        expect("STEAD_POOLS", env.get("STEAD_POOLS"), ",".join(entries))
    if "logFormat" in asked:
        expect("STEAD_LOG_FORMAT", env.get("STEAD_LOG_FORMAT"), asked["logFormat"])
    for field in ("tolerations", "nodeSelector", "priorityClassName"):
        if field in asked:
            expect(f"the pods' {field}", pod.get(field), asked[field])
    for c in asked.get("storageClasses", []):
        sc = get("StorageClass", c["name"])
        params = {"pool": c["pool"]}
        if c.get("fsType"):
            params["csi.storage.k8s.io/fstype"] = c["fsType"]
        if c.get("allocation"):
            params["allocation"] = c["allocation"]
        what = f"StorageClass {c['name']}"
        expect(f"{what} parameters", sc.get("parameters"), params)
        expect(f"{what} provisioner", sc.get("provisioner"), "stead.csi.dev")
        expect(f"{what} reclaimPolicy", sc.get("reclaimPolicy"), c["reclaimPolicy"])
        expect(f"{what} volumeBindingMode", sc.get("volumeBindingMode"), c["bindingMode"])
        expect(f"{what} allowVolumeExpansion", sc.get("allowVolumeExpansion"), c.get("allowVolumeExpansion"))
        expect(f"{what} mountOptions", sc.get("mountOptions"), c.get("mountOptions"))
        default = (sc.get("metadata", {}).get("annotations") or {}).get("storageclass.kubernetes.io/is-default-class")
        expect(f"{what} is-default-class", default, "true" if c.get("isDefault") else None)
    monitor = asked.get("metrics", {}).get("serviceMonitor", {})
    if monitor.get("enabled"):
        sm = get("ServiceMonitor", "stead", ns)
        svc = get("Service", "stead-metrics", ns)
        selector = sm.get("spec", {}).get("selector", {}).get("matchLabels", {})
        svc_labels = svc.get("metadata", {}).get("labels", {})
        if not selector or any(svc_labels.get(k) != v for k, v in selector.items()):
            problems.append(f"the ServiceMonitor's selector {selector} does not select the Service {svc_labels}")
        pod_labels = ds.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        svc_selector = svc.get("spec", {}).get("selector", {})
        if not svc_selector or any(pod_labels.get(k) != v for k, v in svc_selector.items()):
            problems.append(f"the metrics Service's selector {svc_selector} does not select the agents {pod_labels}")
        ports = {p["name"]: p for p in svc.get("spec", {}).get("ports", [])}
        expect("the metrics Service's port", ports.get("health", {}).get("targetPort"), "health")
        endpoints = sm.get("spec", {}).get("endpoints", [{}])
        expect("the ServiceMonitor's endpoint", (endpoints[0].get("port"), endpoints[0].get("path")), ("health", "/metrics"))
        for k, v in (monitor.get("labels") or {}).items():
            expect(f"the ServiceMonitor's label {k}", sm.get("metadata", {}).get("labels", {}).get(k), v)
    report(problems, f"{values_path}: every value is in the render ({len(objs)} objects)")


def report(problems, ok):
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{len(problems)} difference(s)", file=sys.stderr)
        sys.exit(1)
    print(ok)


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "same":
        same(sys.argv[3], sys.argv[4:], sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "values":
        values(sys.argv[2], sys.argv[3])
    else:
        sys.exit(
            "usage: render_check.py same CHART_YAML HELM_RENDER KUSTOMIZE_RENDER...\n"
            "       render_check.py values HELM_RENDER VALUES_FILE"
        )
