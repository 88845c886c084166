//! `make bench-provision`: how fast the agent turns claims into bound PVs on
//! the bundled local cluster.
//!
//! 1. 500 claims of an Immediate class, no pods: time from the first create
//!    to all Bound, and per claim from its create to the moment it is seen
//!    Bound (p50/p99).
//! 2. 100 claims of a WaitForFirstConsumer class, each consumed by a pod: the
//!    same figures (the scheduler, kubelet and the agent all in the loop).
//!
//! The agent (release build) runs as a host process so that its RSS, CPU
//! time and its own count of apiserver requests (`/metrics`) can be read.
//! Results replace this benchmark's section of docs/BENCHMARKS.md.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use stead_e2e::bench::{
    self, Deletion, Error, FirstSeen, PvDeletion, machine, ms, percentile, proc_stats,
};
use stead_e2e::{busybox_image, from_json};

const SECTION_START: &str =
    "<!-- bench-provision:start (written by tests/e2e/src/bin/bench_provision.rs) -->";
const SECTION_END: &str = "<!-- bench-provision:end -->";
/// The agent's health endpoint: on its node's address, where the host
/// reaches it (set once in main).
static HEALTH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn health() -> &'static str {
    HEALTH
        .get()
        .map(String::as_str)
        .unwrap_or("127.0.0.1:19810")
}
const CSI_SOCKET: &str = "/var/lib/kubelet/plugins/stead.csi.dev/csi.sock";

/// Requests the agent sent to the apiserver, from its /metrics: its
/// `stead_apiserver_requests_total` series summed by (verb, resource).
fn agent_requests() -> BTreeMap<(String, String), u64> {
    use std::io::{Read, Write};
    let mut by_kind = BTreeMap::new();
    let Ok(mut conn) = std::net::TcpStream::connect(health()) else {
        return by_kind;
    };
    let _ = conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = conn.read_to_string(&mut body);
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("stead_apiserver_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(n) = value.trim().parse::<u64>() else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        *by_kind
            .entry((label("verb"), label("resource")))
            .or_insert(0) += n;
    }
    by_kind
}

/// What was sent between two readings of [`agent_requests`].
fn requests_since(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> BTreeMap<(String, String), u64> {
    after
        .iter()
        .map(|(k, n)| {
            (
                k.clone(),
                n.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

struct Agent {
    child: Child,
    root: PathBuf,
}

impl Agent {
    fn start(bin: &Path, node: &stead_e2e::LocalNode) -> Result<Agent, Error> {
        let root = PathBuf::from("/var/tmp/stead-bench-provision");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        let log = std::fs::File::create(root.join("agent.log"))?;
        let child = node
            .command(bin)
            .arg("node")
            .args([
                "--node-id",
                &node.name,
                "--endpoint",
                &format!("unix://{CSI_SOCKET}"),
            ])
            .arg("--pool")
            // No reserve: the pool shares this machine's disk.
            .arg(format!(
                "dir:dir:{}:reserve=0",
                root.join("pools/dir").display()
            ))
            .args([
                "--registration=true",
                "--provisioner=true",
                "--health-addr",
                health(),
            ])
            .arg("--state-dir")
            .arg(root.join("state"))
            .args(["--capacity-namespace", "default"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(health()).is_err() {
            if Instant::now() > deadline {
                return Err("the agent did not open its health endpoint".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Agent { child, root })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

struct Run {
    claims: usize,
    total: Duration,
    /// From the first create call to the return of the last one.
    creating: Duration,
    p50: Duration,
    p99: Duration,
    /// From a claim's create to the moment its PV is seen: the agent's part,
    /// before kube-controller-manager's binder takes over.
    pv_p50: Duration,
    pv_p99: Duration,
    /// From the first create until the last PV is seen.
    pv_all: Duration,
    /// By (verb, resource).
    requests: BTreeMap<(String, String), u64>,
    /// The teardown (see [`with_namespace`]): its namespace deleted, so its
    /// pods and claims at once (as `kubectl delete namespace` does), until
    /// every PV is gone.
    deletion: Deletion,
}

impl Run {
    fn requests_per_claim(&self) -> f64 {
        self.requests.values().sum::<u64>() as f64 / self.claims as f64
    }

    /// "verb resource n.nn" per kind, most first.
    fn breakdown(&self) -> String {
        let mut kinds: Vec<_> = self.requests.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        kinds
            .iter()
            .map(|((verb, resource), n)| {
                format!("{verb} {resource} {:.2}", **n as f64 / self.claims as f64)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Creates `n` claims (and a pod per claim when `pods`), concurrently, and
/// waits until all are Bound.
async fn run(client: &Client, ns: &str, class: &str, n: usize, pods: bool) -> Result<Run, Error> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    // Watch first, so that no transition is missed.
    let mut bound = FirstSeen::start(pvcs.clone(), |pvc: &PersistentVolumeClaim| {
        let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
        (phase == Some("Bound")).then(|| pvc.name_any())
    })
    .await?;
    // The PVs the agent creates for these claims, by claim name.
    let pv_seen = {
        let ns = ns.to_string();
        FirstSeen::start(
            Api::<PersistentVolume>::all(client.clone()),
            move |pv: &PersistentVolume| {
                let claim = pv.spec.as_ref()?.claim_ref.as_ref()?;
                (claim.namespace.as_deref() == Some(ns.as_str()))
                    .then(|| claim.name.clone().unwrap_or_default())
            },
        )
        .await?
    };
    let requests_before = agent_requests();
    let start = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let (client, created) = (client.clone(), created.clone());
            let ns = ns.to_string();
            let class = class.to_string();
            async move {
                let name = format!("c-{i:04}");
                let pvc: PersistentVolumeClaim = from_json(json!({
                    "metadata": {"name": name},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                             "resources": {"requests": {"storage": "16Mi"}}},
                }));
                let t = Instant::now();
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
                    .create(&PostParams::default(), &pvc)
                    .await?;
                created.lock().unwrap().insert(name.clone(), t);
                if pods {
                    let pod: Pod = from_json(json!({
                        "metadata": {"name": name},
                        "spec": {
                            "terminationGracePeriodSeconds": 0,
                            "containers": [{"name": "c", "image": busybox_image(),
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["sleep", "3600"],
                                "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
                            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": name}}],
                        },
                    }));
                    Api::<Pod>::namespaced(client, &ns)
                        .create(&PostParams::default(), &pod)
                        .await?;
                }
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    let creating = start.elapsed();
    bound
        .wait(n, start + Duration::from_secs(600))
        .await
        .map_err(|seen| format!("only {seen} of {n} claims were Bound within 10 minutes"))?;
    let total = start.elapsed();
    let requests = requests_since(&requests_before, &agent_requests());
    let pv_seen = pv_seen.times();
    let created = created.lock().unwrap();
    let since_created = |seen: &HashMap<String, Instant>| {
        let mut lat: Vec<Duration> = seen
            .iter()
            .filter_map(|(name, t)| created.get(name).map(|c| t.saturating_duration_since(*c)))
            .collect();
        lat.sort();
        lat
    };
    let lat = since_created(&bound.times());
    let pv_lat = since_created(&pv_seen);
    let pv_all = pv_seen
        .values()
        .max()
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or_default();
    Ok(Run {
        claims: n,
        total,
        creating,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        pv_p50: percentile(&pv_lat, 0.5),
        pv_p99: percentile(&pv_lat, 0.99),
        pv_all,
        requests,
        deletion: Deletion::default(),
    })
}

async fn with_namespace<F, Fut>(client: &Client, name: &str, body: F) -> Result<Run, Error>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<Run, Error>>,
{
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = from_json(json!({"metadata": {"name": name}}));
    namespaces.create(&PostParams::default(), &ns).await?;
    let mut result = body(name.to_string()).await;
    // Teardown: wait until every volume is deleted again, so that the next
    // run starts from nothing; timed, by a PV watch started first.
    let watch = PvDeletion::watch(client, name).await?;
    let deleting = Instant::now();
    namespaces.delete(name, &DeleteParams::default()).await?;
    let expected = result.as_ref().map(|r| r.claims).unwrap_or(0);
    let deletion = watch
        .finish(client, deleting, expected, Duration::from_secs(600))
        .await?;
    bench::namespace_gone(client, name, Duration::from_secs(600)).await?;
    if let Ok(run) = &mut result {
        run.deletion = deletion;
    }
    result
}

async fn class(client: &Client, name: &str, mode: &str) -> Result<(), Error> {
    let api: Api<StorageClass> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    let sc: StorageClass = from_json(json!({
        "metadata": {"name": name},
        "provisioner": "stead.csi.dev",
        "parameters": {"pool": "dir"},
        "volumeBindingMode": mode,
        "reclaimPolicy": "Delete",
    }));
    api.create(&PostParams::default(), &sc).await?;
    Ok(())
}

/// The agent's default workers and client rate limits, from its `--help`.
fn agent_defaults(bin: &Path) -> String {
    let help = Command::new(bin)
        .args(["node", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let default_of = |flag: &str| {
        let at = help.find(flag)?;
        let rest = &help[at..];
        let d = rest.find("[default: ")?;
        let v = &rest[d + 10..];
        Some(v[..v.find(']')?].to_string())
    };
    let get = |flag: &str| default_of(flag).unwrap_or_else(|| "?".into());
    format!(
        "{} workers, {} QPS, burst {}",
        get("--workers"),
        get("--kube-qps"),
        get("--kube-burst")
    )
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let bin = std::env::var_os("STEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/stead")
        });
    // The agent runs on the local cluster's first node, in its namespaces.
    let local = stead_e2e::LocalNode::first();
    let _ = HEALTH.set(format!("{}:19810", local.address));
    let immediate_n: usize = std::env::var("BENCH_IMMEDIATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let wffc_n: usize = std::env::var("BENCH_WFFC")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let client = Client::try_default().await?;
    let machine = machine();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();

    let settings = agent_defaults(&bin);
    let agent = Agent::start(&bin, &local)?;
    let pid = agent.child.id();
    let (rss_idle, _) = proc_stats(pid);
    class(&client, "bench-immediate", "Immediate").await?;
    class(&client, "bench-wffc", "WaitForFirstConsumer").await?;

    eprintln!("bench-provision: {immediate_n} claims, Immediate class, no pods");
    let imm = with_namespace(&client, "bench-immediate", |ns| {
        let client = client.clone();
        async move { run(&client, &ns, "bench-immediate", immediate_n, false).await }
    })
    .await?;
    let (rss_imm, cpu_imm) = proc_stats(pid);
    eprintln!("bench-provision: {wffc_n} claims, WaitForFirstConsumer class, a pod each");
    let wffc = with_namespace(&client, "bench-wffc", |ns| {
        let client = client.clone();
        async move { run(&client, &ns, "bench-wffc", wffc_n, true).await }
    })
    .await?;
    let (rss_end, cpu_end) = proc_stats(pid);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    drop(agent);
    for sc in ["bench-immediate", "bench-wffc"] {
        let _ = Api::<StorageClass>::all(client.clone())
            .delete(sc, &DeleteParams::default())
            .await;
    }

    let row = |what: &str, r: &Run| {
        format!(
            "| {what} | {} | {:.1} s | {:.1} s | {:.1} s | {} | {} | {} | {} | {:.2} |",
            r.claims,
            r.creating.as_secs_f64(),
            r.pv_all.as_secs_f64(),
            r.total.as_secs_f64(),
            ms(r.pv_p50),
            ms(r.pv_p99),
            ms(r.p50),
            ms(r.p99),
            r.requests_per_claim()
        )
    };
    let deletion_row = |what: &str, d: &Deletion| {
        format!(
            "| {what} | {} | {:.1} s | {} | {} |",
            d.pvs,
            d.all_gone.as_secs_f64(),
            ms(d.released_p50),
            ms(d.released_p99)
        )
    };
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let met = |ok: bool| if ok { "met" } else { "**missed**" };
    let section = format!(
        "{SECTION_START}
## Provisioning: claims to bound PVs

- Machine: {machine}
- Command: `make bench-provision` (release agent as a host process on the bundled local cluster, Kubernetes v1.34.4 from tests/cluster; `dir` pool; default agent settings: {settings})
- Date: {date}
- Claims are created by 32 concurrent clients. Per-claim latency: from the return of the claim's create call to the moment a watch sees its PV (the agent's work) and to the moment a watch sees the claim Bound (the agent, then kube-controller-manager's PV binder, which binds one claim at a time). Requests: what the agent itself sent to the apiserver from the first create until all claims are Bound (the sum of its `stead_apiserver_requests_total`), events and capacity updates included.

| run | claims | all created after | all PVs after | all Bound after | claim→PV p50 | p99 | claim→Bound p50 | p99 | agent requests per claim |
|---|---|---|---|---|---|---|---|---|---|
{}
{}

Deletion: the run's namespace deleted (its pods and claims at once), timed by a PV watch:

| run | PVs | all PVs gone after | a PV from Released to gone, p50 | p99 |
|---|---|---|---|---|
{}
{}

Requests per claim by verb and resource: Immediate: {}; WaitForFirstConsumer: {}.

Agent: RSS {} idle at start, {} after the Immediate run, {} at the end (peak {hwm}); CPU {cpu_imm:.1} s after the Immediate run, {cpu_end:.1} s at the end.

Targets (500 claims Bound < 60 s; p50 < 1 s; agent RSS < 60 MiB; at most 3 agent requests per claim):
- 500 Immediate claims Bound in {:.1} s < 60 s: {}
- p50 {} < 1 s: {} (the agent's own part, claim→PV: p50 {})
- RSS at the end {} < 60 MiB: {}
- apiserver requests per claim in the 500-claim burst {:.2} ≤ 3: {}

Between “all PVs” and “all Bound” the agent has nothing left to do: the claims wait for kube-controller-manager's PV binder, which runs one claim worker (`pv_controller_base.go`: “It must run only once”) making three writes per claim (PV status, claim, claim status) through its own rate-limited client. Stead does not bind claims itself: the binder would see a claim marked bound before its own PV cache (filled by that same single worker) holds the PV, and mark the claim `Lost`, a terminal state.
{SECTION_END}",
        row("Immediate, no pods", &imm),
        row("WaitForFirstConsumer, a pod per claim", &wffc),
        deletion_row("Immediate, no pods", &imm.deletion),
        deletion_row("WaitForFirstConsumer, a pod per claim", &wffc.deletion),
        imm.breakdown(),
        wffc.breakdown(),
        mib(rss_idle),
        mib(rss_imm),
        mib(rss_end),
        imm.total.as_secs_f64(),
        met(imm.total < Duration::from_secs(60)),
        ms(imm.p50),
        met(imm.p50 < Duration::from_secs(1)),
        ms(imm.pv_p50),
        mib(rss_end),
        met(rss_end < 60 * 1024),
        imm.requests_per_claim(),
        met(imm.requests_per_claim() <= 3.0),
    );
    bench::write_section(SECTION_START, SECTION_END, &section)?;
    println!("{section}");
    Ok(())
}
