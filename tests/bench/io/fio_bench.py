#!/usr/bin/env python3
"""The parts of `make bench-io` that are not glue (tests/bench/io/run.sh is).

  fio_bench.py jobfile --runs N --size-mib S --runtime T --ramp R --engine E
      The fio job file every target runs, on stdout. Only the file differs
      between targets: `filename=${BENCH_IO_FILE}`, which fio expands from
      its environment (the pod's env, or the node's for the raw runs).
  fio_bench.py pools < daemonset.json
      The pools of Stead's DaemonSet: one line `NAME BACKEND NODE_PATH` each,
      NODE_PATH being the pool's folder on the node (the hostPath behind the
      container path of STEAD_POOLS).
  fio_bench.py extract LOG OUT
      The JSON fio wrote in a pod's log (kubectl logs merges stderr into it),
      checked and written to OUT.
  fio_bench.py section --results DIR --doc docs/BENCHMARKS.md
      Reads DIR/meta.env and DIR/<target>.json, writes the section
      `## Data path (make bench-io)` into the document (in place of the one
      there, the rest of the file kept) and prints it.

Python's standard library only (the machine's python3).
"""

import argparse
import json
import os
import re
import statistics
import sys

# The four measured jobs: (key, title, fio's rw, block size, what is reported).
JOBS = [
    ("seqread", "seq read 1 MiB", "read", "1M", "bw"),
    ("seqwrite", "seq write 1 MiB", "write", "1M", "bw"),
    ("randread", "rand read 4 KiB", "randread", "4k", "iops"),
    ("randwrite", "rand write 4 KiB", "randwrite", "4k", "iops"),
]
# The order they run in each round: writes first, so that every read reads
# blocks the round has written (the fill job wrote them all before).
RUN_ORDER = ["seqwrite", "seqread", "randwrite", "randread"]
IODEPTH = 16

# Targets, in the table's order: (key, title, the raw key it is compared to,
# the ratio target).
VOLUME_TARGETS = [
    ("dir", "dir", "raw-dir", 0.97),
    ("ext4", "image, ext4", "raw-image", 0.9),
    ("xfs", "image, xfs", "raw-image", 0.9),
    ("block", "block (image pool, volumeMode: Block)", "raw-image", 0.9),
]

START = "<!-- bench-io:start (written by tests/bench/io/run.sh) -->"
END = "<!-- bench-io:end -->"
HEADING = "## Data path (make bench-io)"


def jobfile(runs, size_mib, runtime, ramp, engine):
    """The job file: a fill of the whole file (not measured), then `runs`
    rounds of the four jobs, one after another (stonewall)."""
    out = [
        "; tests/bench/io: the same job for every target; only the file differs.",
        "[global]",
        "filename=${BENCH_IO_FILE}",
        f"size={size_mib}M",
        f"ioengine={engine}",
        "direct=1",
        f"iodepth={IODEPTH}",
        "numjobs=1",
        # Another random sequence in every job, so that a round does not
        # read the very blocks the one before read (whatever caches them).
        "randrepeat=0",
        "norandommap=1",
        "",
        "; Writes every block once, so that reads read data, not holes or",
        "; unwritten extents, and writes overwrite allocated blocks. Not measured.",
        "[fill]",
        "rw=write",
        "bs=1M",
        "",
    ]
    by_key = {k: (rw, bs) for k, _, rw, bs, _ in JOBS}
    for r in range(1, runs + 1):
        for key in RUN_ORDER:
            rw, bs = by_key[key]
            out += [
                f"[{key}-{r}]",
                "stonewall",
                f"rw={rw}",
                f"bs={bs}",
                "time_based=1",
                f"runtime={runtime}",
                f"ramp_time={ramp}",
                "",
            ]
    return "\n".join(out)


def pools(ds):
    """(name, backend, node path) of each pool of the DaemonSet's agent."""
    spec = ds["spec"]["template"]["spec"]
    container = next(
        (c for c in spec["containers"] if any(e.get("name") == "STEAD_POOLS" for e in c.get("env", []))),
        None,
    )
    if container is None:
        raise SystemExit("the DaemonSet's containers have no STEAD_POOLS")
    value = next(e for e in container["env"] if e["name"] == "STEAD_POOLS").get("value")
    if not value:
        raise SystemExit("STEAD_POOLS has no literal value in the DaemonSet")
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
    mounts = [(m["mountPath"].rstrip("/"), host_paths[m["name"]])
              for m in container.get("volumeMounts", []) if m["name"] in host_paths]
    found = []
    for item in value.split(","):
        parts = item.strip().split(":")
        if len(parts) < 3:
            raise SystemExit(f"STEAD_POOLS entry {item!r} is not NAME:BACKEND:PATH")
        name, backend, path = parts[0], parts[1], parts[2].rstrip("/")
        # The deepest mount that holds the pool's path.
        best = max((m for m in mounts if path == m[0] or path.startswith(m[0] + "/")),
                   key=lambda m: len(m[0]), default=None)
        if best is None:
            raise SystemExit(f"pool {name}: no hostPath volume is mounted at or above {path}")
        found.append((name, backend, best[1].rstrip("/") + path[len(best[0]):]))
    return found


def extract(log_text):
    """fio's JSON document out of a log that may hold other lines before it."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"^\{", log_text, re.M):
        try:
            doc, _ = decoder.raw_decode(log_text[m.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and "jobs" in doc:
            return doc
    raise SystemExit("no fio JSON output in the log")


def check(doc, runs):
    """Every measured job is there, without error."""
    names = {j["jobname"]: j for j in doc["jobs"]}
    for key in RUN_ORDER:
        for r in range(1, runs + 1):
            j = names.get(f"{key}-{r}")
            if j is None:
                raise SystemExit(f"fio's output has no job {key}-{r}")
            if j.get("error"):
                raise SystemExit(f"fio job {key}-{r} failed with error {j['error']}")


def figures(doc, runs):
    """{job key: [figure of round 1, 2, ...]}: bytes/s for the sequential
    jobs, IOPS for the random ones; plus the 4 KiB jobs' p99 completion
    latency (µs) and every job's CPU (usr + sys, %)."""
    names = {j["jobname"]: j for j in doc["jobs"]}
    out, p99, cpu = {}, {}, {}
    for key, _, rw, _, kind in JOBS:
        side = "write" if "write" in rw else "read"
        vals, lat, c = [], [], []
        for r in range(1, runs + 1):
            j = names[f"{key}-{r}"]
            s = j[side]
            vals.append(float(s["bw_bytes"] if kind == "bw" else s["iops"]))
            pct = s.get("clat_ns", {}).get("percentile", {})
            if "99.000000" in pct:
                lat.append(pct["99.000000"] / 1000.0)
            c.append(float(j.get("usr_cpu", 0.0)) + float(j.get("sys_cpu", 0.0)))
        out[key], p99[key], cpu[key] = vals, lat, c
    return out, p99, cpu


def fmt(kind, v):
    if kind == "bw":
        return f"{v / 1e6:.0f} MB/s"
    return f"{v / 1000:.1f}k IOPS" if v >= 10000 else f"{v:.0f} IOPS"


def fmt_runs(kind, vals):
    if kind == "bw":
        return " / ".join(f"{v / 1e6:.0f}" for v in vals)
    return " / ".join(f"{v / 1000:.1f}k" if v >= 10000 else f"{v:.0f}" for v in vals)


def read_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                meta[k] = v
    return meta


def machine(meta):
    def read(p):
        try:
            with open(p) as f:
                return f.read()
        except OSError:
            return ""

    cpu = next((l.split(":", 1)[1].strip() for l in read("/proc/cpuinfo").splitlines()
                if l.startswith("model name")), "unknown CPU")
    mem = next((int(l.split()[1]) for l in read("/proc/meminfo").splitlines()
                if l.startswith("MemTotal:")), 0)
    cores = os.cpu_count() or 0
    return (f"{cores} cores (`nproc` = {cores}), {cpu}, {mem / 1024 / 1024:.1f} GiB memory, "
            f"Linux {read('/proc/sys/kernel/osrelease').strip()}; load average at start "
            f"{meta.get('load_start', '?')}, at the end {meta.get('load_end', '?')}: the cores are "
            f"shared with other builds")


def section(results, meta):
    runs = int(meta["runs"])
    data = {}
    for name in sorted(os.listdir(results)):
        if name.endswith(".json"):
            with open(os.path.join(results, name)) as f:
                doc = json.load(f)
            check(doc, runs)
            # The pod's fio and the node's must be one build.
            if doc.get("fio version") != "fio-" + meta["fio_version"]:
                raise SystemExit(f"{name}: fio {doc.get('fio version')}, not fio-{meta['fio_version']} as on the node")
            data[name[:-5]] = figures(doc, runs)
    kinds = {k: kind for k, _, _, _, kind in JOBS}
    med = {t: {k: statistics.median(v) for k, v in d[0].items()} for t, d in data.items()}

    raws = [("raw-dir", f"raw: the `{meta['pool_dir']}` pool's filesystem ({meta['rawfs_dir']})")]
    if meta.get("raw_image_is_raw_dir") == "1":
        raws[0] = ("raw-dir", f"raw: the pool filesystem of `{meta['pool_dir']}` and `{meta['pool_image']}` "
                              f"({meta['rawfs_dir']})")
    else:
        raws.append(("raw-image", f"raw: the `{meta['pool_image']}` pool's filesystem ({meta['rawfs_image']})"))

    def raw_of(key):
        return "raw-dir" if key == "raw-image" and meta.get("raw_image_is_raw_dir") == "1" else key

    lines = [
        START,
        HEADING,
        "",
        f"- Machine: {machine(meta)}",
        f"- Versions: fio {meta['fio_version']} (Debian package fio {meta['fio_package']}), "
        f"Stead {meta['stead_describe']} (agent image {meta['stead_image']}), Linux {meta['kernel']}, "
        f"Kubernetes {meta['k8s_version']} (the bundled cluster of tests/cluster)",
        f"- Command: `make bench-io` (tests/bench/io/run.sh; BENCH_IO_SIZE={meta['size_mib']} "
        f"BENCH_IO_RUNTIME={meta['runtime']} BENCH_IO_RUNS={runs}), as root",
        f"- Date: {meta['date']}",
        f"- Setup: node `{meta['node']}`. A namespace and StorageClasses of the bench's own "
        f"(allowedTopologies: that node; WaitForFirstConsumer, Delete): `dir` (pool `{meta['pool_dir']}`), "
        f"`image` ext4 and xfs (pool `{meta['pool_image']}`, `csi.storage.k8s.io/fstype`), and a "
        f"`volumeMode: Block` claim of the `{meta['pool_image']}` pool; one volume at a time, each "
        f"deleted (its PV gone) before the next is made. In the pod (image FROM scratch: Debian's "
        f"/usr/bin/fio and its libraries) fio runs on a {meta['size_mib']} MiB file in the volume "
        f"(the block device itself for `block`, a {meta['size_mib']} MiB volume); filesystem volumes are "
        f"{meta['volume_mib']} MiB. *Raw*: the same job file, the same fio binary, on a "
        f"{meta['size_mib']} MiB file on the pool's filesystem itself, run in the node's mount namespace "
        f"(nsenter) at {meta['raw_file_dir']}, next to the pool folder (outside it, so that the agent "
        f"never sees the file). The block volume has no filesystem of its own, so its raw is the "
        f"filesystem its image lives on: the `{meta['pool_image']}` pool's.",
        f"- Job: ioengine={meta['engine']} ({meta['engine_why']}), direct=1, iodepth={IODEPTH}, one job "
        f"at a time; first a fill that writes the whole file (1 MiB, not measured), then {runs} rounds of "
        f"seq write 1 MiB, seq read 1 MiB, rand write 4 KiB, rand read 4 KiB, each time_based "
        f"{meta['runtime']} s after a {meta['ramp']} s ramp that is not counted (randrepeat=0, "
        f"norandommap). Figures are medians of the {runs} rounds; MB = 10^6 bytes.",
        f"- Caches: direct I/O bypasses the page cache of the filesystem under test, and an `image` "
        f"volume's loop device does direct I/O on its image file. Below both the volume and the raw "
        f"file lies the node's disk: {meta['pool_disk']}. {meta['cache_note']}",
        "",
        "| target | " + " | ".join(t for _, t, _, _, _ in JOBS) + " |",
        "|---|" + "---|" * len(JOBS),
    ]
    for key, title in raws:
        if key in med:
            lines.append(f"| {title} | " + " | ".join(fmt(kinds[k], med[key][k]) for k, *_ in JOBS) + " |")
    for key, title, raw, _ in VOLUME_TARGETS:
        if key not in med:
            lines.append(f"| {title} | " + " | ".join("not run" for _ in JOBS) + " |")
            continue
        r = raw_of(raw)
        cells = []
        for k, *_ in JOBS:
            ratio = med[key][k] / med[r][k] if med.get(r, {}).get(k) else float("nan")
            cells.append(f"{fmt(kinds[k], med[key][k])} ({ratio:.2f}×)")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    lines += ["", f"Each round (MB/s for the 1 MiB jobs, IOPS for the 4 KiB ones), in the order run; "
                  f"then the 4 KiB jobs' p99 completion latency (median of the rounds) and fio's CPU "
                  f"(usr + sys, median):", "",
              "| target | " + " | ".join(t for _, t, _, _, _ in JOBS)
              + " | rand read p99 | rand write p99 | CPU seq read / seq write / rand read / rand write |",
              "|---|" + "---|" * (len(JOBS) + 3)]
    for key, title in raws + [(k, t) for k, t, _, _ in VOLUME_TARGETS]:
        if key not in data:
            continue
        vals, p99, cpu = data[key]
        lat = [f"{statistics.median(p99[k]):.0f} µs" if p99[k] else "-" for k in ("randread", "randwrite")]
        c = " / ".join(f"{statistics.median(cpu[k]):.0f}%" for k, *_ in JOBS)
        lines.append(f"| {title.split(' (')[0]} | " + " | ".join(fmt_runs(kinds[k], vals[k]) for k, *_ in JOBS)
                     + f" | {lat[0]} | {lat[1]} | {c} |")

    lines += ["", "Targets (volume ÷ raw for each of the four jobs: dir ≥ 0.97×, image ≥ 0.9×; the block "
                  "volume is an image volume and is held to the image target):"]
    for key, title, raw, goal in VOLUME_TARGETS:
        if key not in med:
            lines.append(f"- {title}: not run")
            continue
        r = raw_of(raw)
        parts = []
        for k, t, *_ in JOBS:
            ratio = med[key][k] / med[r][k]
            verdict = "met" if ratio >= goal else "**missed**"
            parts.append(f"{t} {ratio:.2f}× {'≥' if ratio >= goal else '<'} {goal}×: {verdict}")
        lines.append(f"- {title}: " + "; ".join(parts))
    lines.append(END)
    return "\n".join(lines)


def replace_section(old, text):
    """`text` in place of the bench-io section of `old`: between its markers,
    else from its heading to the next section (a `## ` heading or another
    bench's start marker), else appended."""
    a, b = old.find(START), old.find(END)
    if a != -1 and b > a:
        return old[:a] + text + old[b + len(END):]
    h = re.search(r"^" + re.escape(HEADING) + r"[^\n]*\n", old, re.M)
    if h:
        nxt = re.compile(r"^(## |<!-- bench-)", re.M).search(old, h.end())
        tail = old[nxt.start():] if nxt else ""
        return old[:h.start()] + text + "\n\n" + tail if tail else old[:h.start()] + text + "\n"
    return old.rstrip() + "\n\n" + text + "\n"


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jobfile")
    j.add_argument("--runs", type=int, required=True)
    j.add_argument("--size-mib", type=int, required=True)
    j.add_argument("--runtime", type=int, required=True)
    j.add_argument("--ramp", type=int, required=True)
    j.add_argument("--engine", required=True, choices=["io_uring", "libaio"])
    sub.add_parser("pools")
    e = sub.add_parser("extract")
    e.add_argument("log")
    e.add_argument("out")
    e.add_argument("--runs", type=int, required=True)
    s = sub.add_parser("section")
    s.add_argument("--results", required=True)
    s.add_argument("--doc", required=True)
    a = p.parse_args()

    if a.cmd == "jobfile":
        print(jobfile(a.runs, a.size_mib, a.runtime, a.ramp, a.engine))
    elif a.cmd == "pools":
        for name, backend, path in pools(json.load(sys.stdin)):
            print(name, backend, path)
    elif a.cmd == "extract":
        with open(a.log, errors="replace") as f:
            doc = extract(f.read())
        check(doc, a.runs)
        with open(a.out, "w") as f:
            json.dump(doc, f)
    elif a.cmd == "section":
        text = section(a.results, read_meta(os.path.join(a.results, "meta.env")))
        try:
            with open(a.doc) as f:
                old = f.read()
        except FileNotFoundError:
            old = "# Benchmarks\n"
        new = replace_section(old, text)
        tmp = a.doc + ".tmp"
        with open(tmp, "w") as f:
            f.write(new)
        os.replace(tmp, a.doc)
        print(text)


if __name__ == "__main__":
    main()
