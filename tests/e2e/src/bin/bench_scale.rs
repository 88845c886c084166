//! `make bench-scale` (tests/scale/run.sh starts the private control plane,
//! then this program): many kubelet-less nodes, one real agent per node.
//!
//! 1. NODES Node objects (Ready, with capacity and the topology label the
//!    kubelet would add when the plugin registers) and their CSINodes;
//!    one `stead node` process per node with its own `dir` pool, CSI socket
//!    and metrics port; this program plays the kubelets' only part the run
//!    needs: a pod bound to a node is reported Running.
//! 2. WFFC claims of a WaitForFirstConsumer class, each with a pod, then
//!    IMMEDIATE claims of an Immediate class, each burst created by 32
//!    concurrent clients; every claim must be Bound before a deadline.
//! 3. NOISE claims and NOISE PVs that are not Stead's (another class, a
//!    static PV pre-bound to each claim): what the agents' memory and
//!    requests do when the cluster holds objects they must not care about.
//!
//! Measured: claim→PV and claim→Bound per claim (from the return of the
//! claim's create call to the moment this program's watch sees its PV, or
//! the claim Bound), requests per claim as the agents count them (the sum of
//! their `stead_apiserver_requests_total`) and as the apiserver counts them
//! (its FlowSchema counter for the agents' group, and all clients'
//! `apiserver_request_total`), each agent's VmRSS (median, max) before, after
//! the claims and after the noise, and the CPU of the apiserver and the other
//! processes over each phase. Writes its section of docs/BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, CSIStorageCapacity, StorageClass};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use stead_e2e::bench::{self, machine, ms, percentile};
use stead_e2e::from_json;

const SECTION_START: &str =
    "<!-- bench-scale:start (written by tests/e2e/src/bin/bench_scale.rs) -->";
const SECTION_END: &str = "<!-- bench-scale:end -->";
const NS: &str = "scale";
const CAPACITY_NS: &str = "stead-system";
const WFFC_CLASS: &str = "scale-wffc";
const IMMEDIATE_CLASS: &str = "scale-immediate";
const NOISE_CLASS: &str = "scale-noise";
/// The apiserver's FlowSchema for the agents' group (tests/scale/rbac.yaml).
const AGENTS_FLOW_SCHEMA: &str = "stead-scale-agents";
/// Concurrent create calls of a burst (as in bench_provision).
const CLIENTS: usize = 32;
/// Linux x86_64 and arm64: /proc/<pid>/stat counts CPU time in 1/100 s.
const CLK_TCK: f64 = 100.0;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node_name(i: usize) -> String {
    format!("scale-node-{i:03}")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / CLK_TCK
}

/// One HTTP GET on an agent's health port (it answers one request per
/// connection, then closes).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).ok()?;
    let code = body.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body))
}

/// The agent's own count of its apiserver requests, by "verb resource code".
fn agent_requests(addr: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some((_, text)) = http_get(addr, "/metrics") else {
        return out;
    };
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("stead_apiserver_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let key = format!("{} {} {}", label("verb"), label("resource"), label("code"));
        let v: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry(key).or_default() += v as u64;
    }
    out
}

struct Agent {
    child: Child,
    addr: String,
}

/// The agents: one process per node, each stopped when this is dropped.
struct Agents(Vec<Agent>);

impl Agents {
    fn start(
        bin: &Path,
        state: &Path,
        kubeconfig: &str,
        port_base: u16,
        n: usize,
    ) -> Result<Agents, Error> {
        let mut agents = Agents(Vec::with_capacity(n));
        for i in 1..=n {
            let name = node_name(i);
            let dir = state.join("nodes").join(&name);
            std::fs::create_dir_all(dir.join("kubelet"))?;
            let log = std::fs::File::create(state.join("logs").join(format!("stead.{i}.log")))?;
            let addr = format!("127.0.0.1:{}", port_base as usize + i);
            let child = Command::new(bin)
                .arg("node")
                .args(["--node-id", &name])
                .arg("--endpoint")
                .arg(format!("unix://{}", dir.join("csi.sock").display()))
                .arg("--kubelet-dir")
                .arg(dir.join("kubelet"))
                // No reserve: every pool shares this machine's disk, and the
                // dir volumes write nothing.
                .arg("--pool")
                .arg(format!("dir:dir:{}:reserve=0", dir.join("pool").display()))
                .arg("--state-dir")
                .arg(dir.join("state"))
                .args(["--registration=false", "--provisioner=true"])
                .args(["--capacity-namespace", CAPACITY_NS, "--health-addr", &addr])
                .env("KUBECONFIG", kubeconfig)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            // The pid file lets run.sh stop the agents if this program dies.
            std::fs::write(
                state.join("pids").join(format!("stead.{i}.pid")),
                child.id().to_string(),
            )?;
            agents.0.push(Agent { child, addr });
        }
        // Each opens its health port within seconds; 2 cores start 100.
        let deadline = Instant::now() + Duration::from_secs(120);
        for a in &agents.0 {
            while !matches!(http_get(&a.addr, "/readyz"), Some((200, _))) {
                if Instant::now() > deadline {
                    return Err(format!("agent on {} not ready after 120 s", a.addr).into());
                }
                // A poll: the loop checks its condition and deadline each round.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(agents)
    }

    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(|a| a.child.id()).collect()
    }

    /// (median, max) of a /proc status field over the agents, in KiB.
    fn memory(&self, field: &str) -> (u64, u64) {
        let mut v: Vec<u64> = self
            .pids()
            .into_iter()
            .map(|p| status_kib(p, field))
            .collect();
        v.sort();
        (
            v.get(v.len() / 2).copied().unwrap_or(0),
            v.last().copied().unwrap_or(0),
        )
    }

    fn requests(&self) -> BTreeMap<String, u64> {
        let mut sum = BTreeMap::new();
        for a in &self.0 {
            for (k, v) in agent_requests(&a.addr) {
                *sum.entry(k).or_default() += v;
            }
        }
        sum
    }

    fn cpu(&self) -> f64 {
        self.pids().into_iter().map(cpu_seconds).sum()
    }

    /// How many exited (none should).
    fn exited(&mut self) -> usize {
        self.0
            .iter_mut()
            .map(|a| a.child.try_wait())
            .filter(|r| !matches!(r, Ok(None)))
            .count()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &self.0 {
            let _ = Command::new("kill").arg(a.child.id().to_string()).status();
        }
        for a in &mut self.0 {
            let _ = a.child.wait();
        }
    }
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// The apiserver's own counters: requests dispatched for the agents'
/// FlowSchema, and every client's requests (apiserver_request_total).
async fn apiserver_counts(client: &Client) -> (u64, u64) {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let Ok(text) = client.request_text(req).await else {
        return (0, 0);
    };
    let sum = |prefix: &str, must: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix) && l.contains(must))
            .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    (
        sum(
            "apiserver_flowcontrol_dispatched_requests_total{",
            &format!("flow_schema=\"{AGENTS_FLOW_SCHEMA}\""),
        ),
        sum("apiserver_request_total{", ""),
    )
}

/// CPU seconds of the processes around the agents, read together.
#[derive(Clone, Copy, Default)]
struct Cpu {
    apiserver: f64,
    etcd: f64,
    kcm: f64,
    scheduler: f64,
    agents: f64,
    me: f64,
    at: Option<Instant>,
}

struct Pids {
    apiserver: u32,
    etcd: u32,
    kcm: u32,
    scheduler: u32,
}

fn cpu_now(p: &Pids, agents: &Agents) -> Cpu {
    Cpu {
        apiserver: cpu_seconds(p.apiserver),
        etcd: cpu_seconds(p.etcd),
        kcm: cpu_seconds(p.kcm),
        scheduler: cpu_seconds(p.scheduler),
        agents: agents.cpu(),
        me: cpu_seconds(std::process::id()),
        at: Some(Instant::now()),
    }
}

/// Moments seen by the watches, by claim name.
#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    pv: HashMap<String, Instant>,
    bound: HashMap<String, Instant>,
}

/// What one phase measured.
struct Phase {
    what: String,
    claims: usize,
    creating: Duration,
    all_pv: Duration,
    all_bound: Duration,
    pv_p50: Duration,
    pv_p99: Duration,
    bound_p50: Duration,
    bound_p99: Duration,
    requests: BTreeMap<String, u64>,
    apiserver_agents: u64,
    apiserver_all: u64,
    cpu: (Cpu, Cpu),
    missing: Vec<String>,
}

/// Watches the bench namespace's claims (Bound) and every PV (the first
/// moment one names a claim of the namespace).
fn watch(client: &Client, seen: Arc<Mutex<Seen>>) {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let s = seen.clone();
    tokio::spawn(async move {
        let mut w = std::pin::pin!(watcher(pvcs, watcher::Config::default()).applied_objects());
        while let Some(ev) = w.next().await {
            let Ok(pvc) = ev else { continue };
            if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                s.lock()
                    .unwrap()
                    .bound
                    .entry(pvc.name_any())
                    .or_insert_with(Instant::now);
            }
        }
    });
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    tokio::spawn(async move {
        let mut w = std::pin::pin!(watcher(pvs, watcher::Config::default()).applied_objects());
        while let Some(ev) = w.next().await {
            let Ok(pv) = ev else { continue };
            let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            if let Some(c) = claim.filter(|c| c.namespace.as_deref() == Some(NS)) {
                seen.lock()
                    .unwrap()
                    .pv
                    .entry(c.name.clone().unwrap_or_default())
                    .or_insert_with(Instant::now);
            }
        }
    });
}

/// Plays the kubelet's part for the pods of the bench: a pod the scheduler
/// bound to a node is reported Running (the CSI node calls are never made:
/// no volume is mounted).
fn kubelets(client: &Client) -> Arc<Mutex<usize>> {
    let running = Arc::new(Mutex::new(0usize));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    {
        let pods = pods.clone();
        tokio::spawn(async move {
            let mut queued = HashSet::new();
            let mut w = std::pin::pin!(watcher(pods, watcher::Config::default()).applied_objects());
            while let Some(ev) = w.next().await {
                let Ok(pod) = ev else { continue };
                let on_node = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some();
                let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                if on_node && phase != Some("Running") && queued.insert(pod.name_any()) {
                    let _ = tx.send(pod.name_any());
                }
            }
        });
    }
    let r = running.clone();
    tokio::spawn(async move {
        let rx = tokio_stream_of(rx);
        rx.for_each_concurrent(8, |name| {
            let (pods, r) = (pods.clone(), r.clone());
            async move {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let status = json!({"status": {
                    "phase": "Running", "startTime": now,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                        {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    ],
                }});
                if pods
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .is_ok()
                {
                    *r.lock().unwrap() += 1;
                }
            }
        })
        .await;
    });
    running
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> {
    stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn create_all<F>(n: usize, make: F) -> Result<Duration, Error>
where
    F: Fn(usize) -> futures::future::BoxFuture<'static, Result<(), kube::Error>>,
{
    let start = Instant::now();
    stream::iter(0..n)
        .map(make)
        .buffer_unordered(CLIENTS)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    Ok(start.elapsed())
}

fn claim(name: &str, class: &str, volume: Option<&str>) -> PersistentVolumeClaim {
    let mut spec = json!({"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                          "resources": {"requests": {"storage": "16Mi"}}});
    if let Some(v) = volume {
        spec["volumeName"] = json!(v);
    }
    from_json(json!({"metadata": {"name": name}, "spec": spec}))
}

fn pod(name: &str) -> Pod {
    from_json(json!({
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "localhost/none:scale", "command": ["sleep", "3600"],
                            "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": name}}],
        },
    }))
}

/// One burst of Stead claims (and a pod each when `pods`), then the wait
/// until every one of them is Bound.
#[allow(clippy::too_many_arguments)]
async fn phase(
    client: &Client,
    agents: &Agents,
    pids: &Pids,
    seen: &Arc<Mutex<Seen>>,
    what: &str,
    prefix: &str,
    class: &str,
    n: usize,
    pods: bool,
    deadline: Duration,
) -> Result<Phase, Error> {
    eprintln!("[bench-scale] {what}: {n} claims");
    let req_before = agents.requests();
    let (api_agents0, api_all0) = apiserver_counts(client).await;
    let cpu0 = cpu_now(pids, agents);
    let start = Instant::now();
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    let creating = {
        let names = names.clone();
        let (client, seen, class) = (client.clone(), seen.clone(), class.to_string());
        create_all(n, move |i| {
            let name = names[i].clone();
            let (client, seen, class) = (client.clone(), seen.clone(), class.clone());
            Box::pin(async move {
                let t = Instant::now();
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), NS)
                    .create(&PostParams::default(), &claim(&name, &class, None))
                    .await?;
                seen.lock().unwrap().created.insert(name.clone(), t);
                if pods {
                    Api::<Pod>::namespaced(client, NS)
                        .create(&PostParams::default(), &pod(&name))
                        .await?;
                }
                Ok(())
            })
        })
        .await?
    };
    // Poll the watches' record until every claim is Bound or the deadline.
    let limit = start + deadline;
    let missing = loop {
        let missing: Vec<String> = {
            let s = seen.lock().unwrap();
            names
                .iter()
                .filter(|c| !s.bound.contains_key(*c))
                .cloned()
                .collect()
        };
        if missing.is_empty() || Instant::now() > limit {
            break missing;
        }
        // A poll: the loop checks its condition and deadline each round.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let all_bound = start.elapsed();
    let req_after = agents.requests();
    let (api_agents1, api_all1) = apiserver_counts(client).await;
    let cpu1 = cpu_now(pids, agents);
    let s = seen.lock().unwrap();
    let lat = |m: &HashMap<String, Instant>| {
        let mut v: Vec<Duration> = names
            .iter()
            .filter_map(|c| Some(m.get(c)?.saturating_duration_since(*s.created.get(c)?)))
            .collect();
        v.sort();
        v
    };
    let (pv, bound) = (lat(&s.pv), lat(&s.bound));
    let all_pv = names
        .iter()
        .filter_map(|c| s.pv.get(c))
        .max()
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or_default();
    Ok(Phase {
        what: what.to_string(),
        claims: n,
        creating,
        all_pv,
        all_bound,
        pv_p50: percentile(&pv, 0.5),
        pv_p99: percentile(&pv, 0.99),
        bound_p50: percentile(&bound, 0.5),
        bound_p99: percentile(&bound, 0.99),
        requests: delta(&req_after, &req_before),
        apiserver_agents: api_agents1.saturating_sub(api_agents0),
        apiserver_all: api_all1.saturating_sub(api_all0),
        cpu: (cpu0, cpu1),
        missing,
    })
}

/// A phase's figures on stderr as soon as it ends: a run stopped later
/// still shows them.
fn progress(p: &Phase, rss: (u64, u64)) {
    eprintln!(
        "[bench-scale] {}: {} claims, {} not Bound; all PVs after {:.1} s, all Bound after {:.1} s; claim→PV p50 {} p99 {}; claim→Bound p50 {} p99 {}; agent requests {} ({:.1} per claim; apiserver's count {}); apiserver {} cores; agent RSS median {} max {}",
        p.what,
        p.claims,
        p.missing.len(),
        p.all_pv.as_secs_f64(),
        p.all_bound.as_secs_f64(),
        ms(p.pv_p50),
        ms(p.pv_p99),
        ms(p.bound_p50),
        ms(p.bound_p99),
        total(&p.requests),
        total(&p.requests) as f64 / p.claims.max(1) as f64,
        p.apiserver_agents,
        cores(&p.cpu, |c| c.apiserver),
        mib(rss.0),
        mib(rss.1),
    );
}

/// NOISE claims of a class that is not Stead's, each pre-bound to a static
/// PV of another driver, created together; the wait until all are Bound.
async fn noise(
    client: &Client,
    seen: &Arc<Mutex<Seen>>,
    n: usize,
    deadline: Duration,
) -> Result<(Duration, Duration, usize), Error> {
    eprintln!("[bench-scale] noise: {n} claims and {n} PVs that are not Stead's");
    let start = Instant::now();
    let c = client.clone();
    let creating = create_all(n, move |i| {
        let c = c.clone();
        Box::pin(async move {
            let name = format!("noise-{i:05}");
            let pv: PersistentVolume = from_json(json!({
                "metadata": {"name": name},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": NOISE_CLASS,
                    "claimRef": {"namespace": NS, "name": name},
                    "csi": {"driver": "other.csi.example", "volumeHandle": name},
                },
            }));
            Api::<PersistentVolume>::all(c.clone())
                .create(&PostParams::default(), &pv)
                .await?;
            Api::<PersistentVolumeClaim>::namespaced(c, NS)
                .create(
                    &PostParams::default(),
                    &claim(&name, NOISE_CLASS, Some(&name)),
                )
                .await?;
            Ok(())
        })
    })
    .await?;
    // Poll the watch's record until all are Bound or the deadline.
    let names: Vec<String> = (0..n).map(|i| format!("noise-{i:05}")).collect();
    let limit = start + deadline;
    let bound = loop {
        let bound = {
            let s = seen.lock().unwrap();
            names.iter().filter(|c| s.bound.contains_key(*c)).count()
        };
        if bound >= n || Instant::now() > limit {
            break bound;
        }
        // A poll: the loop checks its condition and deadline each round.
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    Ok((creating, start.elapsed(), bound))
}

async fn create_cluster_objects(client: &Client, nodes: usize) -> Result<(), Error> {
    for (name, mode, provisioner) in [
        (WFFC_CLASS, "WaitForFirstConsumer", "stead.csi.dev"),
        (IMMEDIATE_CLASS, "Immediate", "stead.csi.dev"),
        (NOISE_CLASS, "Immediate", "kubernetes.io/no-provisioner"),
    ] {
        let mut sc = json!({
            "metadata": {"name": name},
            "provisioner": provisioner,
            "volumeBindingMode": mode,
            "reclaimPolicy": "Delete",
        });
        if provisioner == "stead.csi.dev" {
            sc["parameters"] = json!({"pool": "dir"});
        }
        Api::<StorageClass>::all(client.clone())
            .create(&PostParams::default(), &from_json(sc))
            .await?;
    }
    let c = client.clone();
    create_all(nodes, move |i| {
        let c = c.clone();
        Box::pin(async move {
            let name = node_name(i + 1);
            // What a kubelet reports, and the label it adds when the
            // plugin registers (the CSI node's topology).
            let node: Node = from_json(json!({"metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "topology.stead.csi.dev/node": name,
            }}}));
            let nodes: Api<Node> = Api::all(c.clone());
            nodes.create(&PostParams::default(), &node).await?;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let resources =
                json!({"cpu": "32", "memory": "256Gi", "pods": "250", "ephemeral-storage": "1Ti"});
            let status = json!({"status": {
                "capacity": resources, "allocatable": resources,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "message": "bench-scale: no kubelet",
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
            }});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            // The apiserver's TaintNodesByCondition admission gives a new
            // node the not-ready taint; the node lifecycle controller (off
            // here) takes it off once the node is Ready.
            nodes
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": {"taints": null}})),
                )
                .await?;
            let csinode: CSINode = from_json(json!({
                "metadata": {"name": name},
                "spec": {"drivers": [{"name": "stead.csi.dev", "nodeID": name,
                                      "topologyKeys": ["topology.stead.csi.dev/node"]}]},
            }));
            Api::<CSINode>::all(c)
                .create(&PostParams::default(), &csinode)
                .await?;
            Ok(())
        })
    })
    .await?;
    Ok(())
}

fn cores(cpu: &(Cpu, Cpu), f: fn(&Cpu) -> f64) -> String {
    let wall = match (cpu.0.at, cpu.1.at) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    if wall <= 0.0 {
        return "?".into();
    }
    format!("{:.2}", (f(&cpu.1) - f(&cpu.0)) / wall)
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let bin = PathBuf::from(std::env::var("STEAD_BIN")?);
    let state = PathBuf::from(std::env::var("SCALE_STATE")?);
    let agent_kubeconfig = std::env::var("SCALE_AGENT_KUBECONFIG")?;
    let port_base: u16 = env_or("SCALE_AGENT_PORT_BASE", 31000);
    let nodes: usize = env_or("NODES", 100);
    let wffc: usize = env_or("WFFC", 5000);
    let immediate: usize = env_or("IMMEDIATE", 2000);
    let noise_n: usize = env_or("NOISE", 10000);
    // Generous: the point is to report, by name, what did not bind.
    let deadline = Duration::from_secs(env_or("DEADLINE", 1800));
    let pids = Pids {
        apiserver: env_or("SCALE_APISERVER_PID", 0),
        etcd: env_or("SCALE_ETCD_PID", 0),
        kcm: env_or("SCALE_KCM_PID", 0),
        scheduler: env_or("SCALE_SCHEDULER_PID", 0),
    };
    let k8s = std::env::var("SCALE_K8S_VERSION").unwrap_or_default();
    let machine = machine();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    let client = Client::try_default().await?;
    let run_start = Instant::now();

    create_cluster_objects(&client, nodes).await?;
    eprintln!("[bench-scale] {nodes} nodes made; starting {nodes} agents");
    let mut agents = Agents::start(&bin, &state, &agent_kubeconfig, port_base, nodes)?;
    // Settled: every agent has published its capacity for both Stead classes.
    let caps: Api<CSIStorageCapacity> = Api::namespaced(client.clone(), CAPACITY_NS);
    let settle = Instant::now() + Duration::from_secs(300);
    loop {
        let n = caps
            .list_metadata(&ListParams::default())
            .await?
            .items
            .len();
        if n >= nodes * 2 {
            break;
        }
        if Instant::now() > settle {
            return Err(format!(
                "only {n} of {} CSIStorageCapacity objects after 300 s",
                nodes * 2
            )
            .into());
        }
        // A poll: the loop checks its condition and deadline each round.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let agents_up = run_start.elapsed();
    let rss_idle = agents.memory("VmRSS");
    let cpu_start = cpu_now(&pids, &agents);
    let req_start = agents.requests();

    let seen: Arc<Mutex<Seen>> = Arc::default();
    watch(&client, seen.clone());
    let running = kubelets(&client);

    let w = phase(
        &client,
        &agents,
        &pids,
        &seen,
        "WaitForFirstConsumer, a pod per claim",
        "w",
        WFFC_CLASS,
        wffc,
        true,
        deadline,
    )
    .await?;
    let rss_wffc = agents.memory("VmRSS");
    progress(&w, rss_wffc);
    let im = phase(
        &client,
        &agents,
        &pids,
        &seen,
        "Immediate, no pods",
        "i",
        IMMEDIATE_CLASS,
        immediate,
        false,
        deadline,
    )
    .await?;
    let rss_claims = agents.memory("VmRSS");
    progress(&im, rss_claims);
    let pods_running = *running.lock().unwrap();

    let req_noise0 = agents.requests();
    let cpu_noise0 = cpu_now(&pids, &agents);
    let (noise_creating, noise_all, noise_bound) = noise(&client, &seen, noise_n, deadline).await?;
    let cpu_noise1 = cpu_now(&pids, &agents);
    let req_noise = total(&delta(&agents.requests(), &req_noise0));
    let rss_noise = agents.memory("VmRSS");
    let hwm = agents.memory("VmHWM");
    let exited = agents.exited();
    let cpu_end = cpu_now(&pids, &agents);
    let req_all = delta(&agents.requests(), &req_start);
    drop(agents);

    // --- the section ---
    let row = |p: &Phase| {
        format!(
            "| {} | {} | {:.1} s | {:.1} s | {:.1} s | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
            p.what,
            p.claims,
            p.creating.as_secs_f64(),
            p.all_pv.as_secs_f64(),
            p.all_bound.as_secs_f64(),
            ms(p.pv_p50),
            ms(p.pv_p99),
            ms(p.bound_p50),
            ms(p.bound_p99),
            total(&p.requests) as f64 / p.claims.max(1) as f64,
            p.apiserver_agents as f64 / p.claims.max(1) as f64,
            p.apiserver_all as f64 / p.claims.max(1) as f64,
            cores(&p.cpu, |c| c.apiserver),
        )
    };
    let bound_line = |p: &Phase| {
        if p.missing.is_empty() {
            format!("- {}: all {} claims Bound", p.what, p.claims)
        } else {
            let some: Vec<&str> = p.missing.iter().take(20).map(String::as_str).collect();
            format!(
                "- {}: **{} of {} claims not Bound** after {:.0} s: {}{}",
                p.what,
                p.missing.len(),
                p.claims,
                deadline.as_secs_f64(),
                some.join(", "),
                if p.missing.len() > 20 { ", …" } else { "" }
            )
        }
    };
    let breakdown = |m: &BTreeMap<String, u64>| {
        let mut v: Vec<(&String, &u64)> = m.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.iter()
            .take(10)
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let whole = (cpu_start, cpu_end);
    let noise_cpu = (cpu_noise0, cpu_noise1);
    let claims_total = wffc + immediate;
    let met = |ok: bool| if ok { "met" } else { "**missed**" };
    let all_ok =
        w.missing.is_empty() && im.missing.is_empty() && noise_bound >= noise_n && exited == 0;
    let growth = rss_noise.1 as i64 - rss_claims.1 as i64;
    let section = format!(
        "{SECTION_START}
## Scale: {nodes} nodes, one agent each

- Machine: {machine}
- Command: `make bench-scale NODES={nodes} WFFC={wffc} IMMEDIATE={immediate} NOISE={noise_n}` (tests/scale/run.sh), as root
- Date: {date}
- Setup: a private control plane on this machine (etcd, kube-apiserver, kube-controller-manager running only the PV binder, kube-scheduler; Kubernetes {k8s} from tests/cluster's build, etcd without fsync); {nodes} Node objects without kubelets (made Ready once, with the topology label and a CSINode; the node lifecycle controller is off, so nothing taints them), and per node one real release `stead node` process (provisioner on, kubelet registration off, its own `dir` pool on the root disk, CSI socket and metrics port; default settings). No kwok: the bench program itself reports a pod Running once the scheduler has bound it (no volume is mounted: the CSI node calls need a kubelet). Credential: every agent uses one client certificate bound to `cluster-admin` (an admin kubeconfig, not the DaemonSet's RBAC and admission policies, which need pod-bound tokens).
- Claims (16Mi each) are created by {CLIENTS} concurrent clients, the WaitForFirstConsumer ones each followed by its pod. Latency is watch-based: from the return of the claim's create call to the moment the bench's watch sees the claim's PV (the agent's part) and sees the claim Bound (then kube-controller-manager's binder). Requests per claim: what the agents sent over the phase (the sum of every agent's `stead_apiserver_requests_total`, capacity refreshes and events included) ÷ claims; the apiserver's own count of the agents' requests (its `apiserver_flowcontrol_dispatched_requests_total` for the agents' FlowSchema); and every client's requests (`apiserver_request_total`: agents, scheduler, binder, the bench itself) ÷ claims. apiserver CPU: its utime+stime over the phase ÷ wall time, in cores.
- Agents up and settled (all {nodes} published their capacity) {:.1} s after the start.

| phase | claims | all created after | all PVs after | all Bound after | claim→PV p50 | p99 | claim→Bound p50 | p99 | agent requests per claim (agents' count) | (apiserver's count) | all clients' requests per claim | apiserver CPU, cores |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{}
{}

{}
{}
- Pods reported Running: {pods_running} of {wffc}.
- The agents' requests over both phases ({claims_total} claims), by verb, resource and code (top 10): {}.

Agent memory (VmRSS over the {nodes} agents, median / max): {} / {} idle (settled, no claims); {} / {} after the WaitForFirstConsumer claims; {} / {} after all {claims_total} claims; {} / {} after {noise_n} claims and {noise_n} PVs that are not Stead's (claims created in {:.1} s, {noise_bound} of {noise_n} Bound after {:.1} s); peak (VmHWM) {} / {}. Agent requests during the noise: {req_noise} in all ({:.2} per noise claim). Agents that exited: {exited}.

CPU over the whole run, in cores (utime+stime ÷ wall): apiserver {}, etcd {}, kube-controller-manager {}, kube-scheduler {}, the {nodes} agents together {}, the bench program {}; during the noise: apiserver {}, agents {}.

Targets (all Bound; agent RSS flat with the noise, < 30 MiB):
- all claims Bound: {}
- agent RSS max after the noise {} < 30 MiB: {}; change with the noise {:+.1} MiB (max), {:+.1} MiB (median)
{SECTION_END}",
        agents_up.as_secs_f64(),
        row(&w),
        row(&im),
        bound_line(&w),
        bound_line(&im),
        breakdown(&req_all),
        mib(rss_idle.0),
        mib(rss_idle.1),
        mib(rss_wffc.0),
        mib(rss_wffc.1),
        mib(rss_claims.0),
        mib(rss_claims.1),
        mib(rss_noise.0),
        mib(rss_noise.1),
        noise_creating.as_secs_f64(),
        noise_all.as_secs_f64(),
        mib(hwm.0),
        mib(hwm.1),
        req_noise as f64 / noise_n.max(1) as f64,
        cores(&whole, |c| c.apiserver),
        cores(&whole, |c| c.etcd),
        cores(&whole, |c| c.kcm),
        cores(&whole, |c| c.scheduler),
        cores(&whole, |c| c.agents),
        cores(&whole, |c| c.me),
        cores(&noise_cpu, |c| c.apiserver),
        cores(&noise_cpu, |c| c.agents),
        met(all_ok),
        mib(rss_noise.1),
        met(rss_noise.1 < 30 * 1024),
        growth as f64 / 1024.0,
        (rss_noise.0 as i64 - rss_claims.0 as i64) as f64 / 1024.0,
    );
    bench::write_section(SECTION_START, SECTION_END, &section)?;
    println!("{section}");
    if !all_ok {
        return Err("not every claim was Bound (or an agent exited): see the section above".into());
    }
    Ok(())
}
