//! The CSI hot path, measured against the real `stead node` binary.
//!
//! `make bench-csi` (root: the plugin mounts and attaches loop devices) builds
//! the release binary and runs this program, which
//!
//! 1. starts `stead node` on a temp socket with one pool per backend;
//! 2. per backend, 200 sequential volumes: the latency of
//!    CreateVolume→NodeStageVolume→NodePublishVolume and of
//!    NodeUnpublishVolume→NodeUnstageVolume→DeleteVolume (p50/p99);
//! 3. per backend, 200 full create→publish→teardown cycles from 8 concurrent
//!    clients (one connection each): volumes per second;
//! 4. a fresh plugin with one `dir` pool: VmRSS idle, then idle again after
//!    1000 CreateVolume calls;
//!
//! then replaces its section of docs/BENCHMARKS.md and prints it. Every mount
//! and loop device under the temp dirs is released on the way out.
//!
//! The binary is `CARGO_BIN_EXE_stead` (the `cargo bench` build, i.e.
//! target/release/stead) unless `STEAD_BIN` names another.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    BoxError, Clients, Machine, Plugin, Result, Steps, Volume, binary_name, create, ms, percentile,
    section_head, set_up, tear_down, verdict, write_section,
};
use stead::proto::csi::v1::NodeGetCapabilitiesRequest;
use stead::storage::{BackendKind, PoolSpec};

const LABEL: &str = "bench-csi";
/// One pool per backend, named after it.
const BACKENDS: [BackendKind; 2] = [BackendKind::Dir, BackendKind::Image];
/// Volumes per backend, for the latency and for the throughput runs.
const VOLUMES: usize = 200;
/// Cycles run first and not counted: the first mkfs pays for cold caches.
const WARMUP: usize = 5;
const CLIENTS: usize = 8;
/// Sequential runs per backend; the headline p50 is their median, so that
/// one burst of noise from the machine's neighbours does not decide it.
const ROUNDS: usize = 3;
const RSS_VOLUMES: usize = 1000;
/// Small enough for loop files and a quick mkfs.ext4, big enough for ext4.
const VOLUME_BYTES: i64 = 64 << 20;
/// The RSS run only creates volumes; 1 MiB keeps 1000 of them within any pool.
const RSS_VOLUME_BYTES: i64 = 1 << 20;
const TARGETS: &str = "dir create→publish p50 < 2 ms; image p50 < 150 ms; RSS < 20 MiB";
const SECTION_START: &str = "<!-- bench-csi:start (written by benches/csi.rs) -->";
const SECTION_END: &str = "<!-- bench-csi:end -->";

#[tokio::main]
async fn main() -> Result<()> {
    let Some((bin, machine)) = common::begin(LABEL)? else {
        return Ok(());
    };

    let mut results = Vec::new();
    let floor;
    {
        let plugin = Plugin::start(&bin, LABEL, &pools(&BACKENDS)).await?;
        floor = round_trip(&plugin).await?;
        for backend in BACKENDS.map(BackendKind::as_str) {
            let mut setup = Vec::new();
            let mut teardown = Vec::new();
            let mut round_p50s = Vec::new();
            for round in 1..=ROUNDS {
                println!(
                    "bench-csi: {backend}: {VOLUMES} sequential volumes (round {round}/{ROUNDS})"
                );
                let (up, down) = sequential(&plugin, backend).await?;
                let totals: Vec<Duration> = up.iter().map(|s| s.iter().sum()).collect();
                round_p50s.push(percentile(&totals, 0.50));
                setup.extend(up);
                teardown.extend(down);
            }
            println!("bench-csi: {backend}: {VOLUMES} volumes from {CLIENTS} clients");
            let rate = concurrent(&plugin, backend).await?;
            results.push(BackendResult {
                backend,
                setup,
                teardown,
                round_p50s,
                volumes_per_s: rate,
            });
        }
        plugin.stop()?;
    }
    println!("bench-csi: memory with {RSS_VOLUMES} dir volumes");
    let memory = memory(&bin).await?;

    let section = render(&machine, &bin, &results, floor, &memory);
    let path = write_section(SECTION_START, SECTION_END, &section)?;
    println!("bench-csi: wrote {}", path.display());
    println!("\n{section}");
    Ok(())
}

// ------------------------------------------------------------------ the runs

/// The RPCs of a set-up and of a teardown, in order, for the per-RPC table.
const SETUP_RPCS: [&str; 3] = ["CreateVolume", "NodeStageVolume", "NodePublishVolume"];
const TEARDOWN_RPCS: [&str; 3] = ["NodeUnpublishVolume", "NodeUnstageVolume", "DeleteVolume"];

/// A pool per backend, named after it, in the plugin's temp dir.
fn pools(backends: &[BackendKind]) -> Vec<PoolSpec> {
    backends
        .iter()
        .map(|&backend| PoolSpec {
            name: backend.as_str().to_owned(),
            backend,
            path: Path::new("pools").join(backend.as_str()),
        })
        .collect()
}

/// p50 of an RPC that touches no disk (NodeGetCapabilities): the floor under
/// every other figure (client, HTTP/2, unix socket, plugin dispatch).
async fn round_trip(plugin: &Plugin) -> Result<Duration> {
    let mut c = Clients::connect(&plugin.socket).await?;
    let mut samples = Vec::with_capacity(VOLUMES);
    for _ in 0..WARMUP + VOLUMES {
        let t = Instant::now();
        c.node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await?;
        samples.push(t.elapsed());
    }
    Ok(percentile(&samples[WARMUP..], 0.50))
}

/// Per-RPC set-up and teardown latencies of `VOLUMES` volumes, one after another.
async fn sequential(plugin: &Plugin, pool: &str) -> Result<(Vec<Steps>, Vec<Steps>)> {
    let mut c = Clients::connect(&plugin.socket).await?;
    let mut setup = Vec::with_capacity(VOLUMES);
    let mut teardown = Vec::with_capacity(VOLUMES);
    for i in 0..WARMUP + VOLUMES {
        let v = Volume::new(plugin, pool, format!("bench-{pool}-seq-{i}"), VOLUME_BYTES);
        v.prepare()?;
        let (id, up) = set_up(&mut c, &v).await?;
        let down = tear_down(&mut c, &v, &id).await?;
        v.tidy();
        if i >= WARMUP {
            setup.push(up);
            teardown.push(down);
        }
    }
    Ok((setup, teardown))
}

/// Full cycles per second with `CLIENTS` clients sharing `VOLUMES` volumes.
async fn concurrent(plugin: &Plugin, pool: &str) -> Result<f64> {
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(Clients::connect(&plugin.socket).await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (k, mut c) in clients.into_iter().enumerate() {
        let volumes: Vec<Volume> = (0..VOLUMES / CLIENTS)
            .map(|i| Volume::new(plugin, pool, format!("bench-{pool}-c{k}-{i}"), VOLUME_BYTES))
            .collect();
        tasks.spawn(async move {
            for v in &volumes {
                v.prepare()?;
                let (id, _) = set_up(&mut c, v).await?;
                tear_down(&mut c, v, &id).await?;
                v.tidy();
            }
            Ok::<_, BoxError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok((VOLUMES / CLIENTS * CLIENTS) as f64 / start.elapsed().as_secs_f64())
}

struct Memory {
    idle_empty_kib: u64,
    idle_full_kib: u64,
    peak_kib: u64,
}

/// VmRSS of a fresh plugin idle, then idle after `RSS_VOLUMES` CreateVolume calls.
async fn memory(bin: &Path) -> Result<Memory> {
    let plugin = Plugin::start(bin, LABEL, &pools(&[BackendKind::Dir])).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_empty_kib = plugin.status_kib("VmRSS")?;
    let mut c = Clients::connect(&plugin.socket).await?;
    for i in 0..RSS_VOLUMES {
        let v = Volume::new(&plugin, "dir", format!("bench-rss-{i}"), RSS_VOLUME_BYTES);
        create(&mut c, &v, None).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_full_kib = plugin.status_kib("VmRSS")?;
    let peak_kib = plugin.status_kib("VmHWM")?;
    drop(c);
    plugin.stop()?;
    Ok(Memory {
        idle_empty_kib,
        idle_full_kib,
        peak_kib,
    })
}

// ------------------------------------------------------------------ the report

struct BackendResult {
    backend: &'static str,
    setup: Vec<Steps>,
    teardown: Vec<Steps>,
    /// p50 of create→stage→publish in each round.
    round_p50s: Vec<Duration>,
    volumes_per_s: f64,
}

impl BackendResult {
    /// The median of the rounds' create→publish p50s.
    fn setup_p50(&self) -> Duration {
        let mut p = self.round_p50s.clone();
        p.sort();
        percentile(&p, 0.50)
    }

    fn rounds(&self) -> String {
        self.round_p50s
            .iter()
            .map(|d| format!("{:.2}", d.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(" / ")
    }

    fn setup_total(&self) -> Vec<Duration> {
        self.setup.iter().map(|s| s.iter().sum()).collect()
    }

    fn teardown_total(&self) -> Vec<Duration> {
        self.teardown.iter().map(|s| s.iter().sum()).collect()
    }

    /// The p50 of each RPC: set-up ones, then teardown ones.
    fn rpc_p50s(&self) -> Vec<Duration> {
        let column = |samples: &[Steps], k: usize| {
            percentile(&samples.iter().map(|s| s[k]).collect::<Vec<_>>(), 0.50)
        };
        (0..3)
            .map(|k| column(&self.setup, k))
            .chain((0..3).map(|k| column(&self.teardown, k)))
            .collect()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn render(
    machine: &Machine,
    bin: &Path,
    results: &[BackendResult],
    floor: Duration,
    memory: &Memory,
) -> String {
    let bin_name = binary_name(bin);
    let mut lines = section_head(
        SECTION_START,
        "CSI latency, throughput and memory",
        LABEL,
        machine,
    );
    lines.extend([
        format!(
            "- Setup: the real `{bin_name}` on a unix socket, driven by the generated tonic client; \
             pools on {}; {} MiB volumes, mount access, SINGLE_NODE_WRITER, image formatted ext4 \
             (the default); {WARMUP} warm-up cycles per backend not counted.",
            machine.pool_fs,
            VOLUME_BYTES >> 20
        ),
        String::new(),
        format!(
            "| backend | create→stage→publish p50 (median of {ROUNDS} rounds) | p50 of each round, ms | p99 | unpublish→unstage→delete p50 | p99 | volumes/s, {CLIENTS} clients (full cycle) |"
        ),
        "|---|---|---|---|---|---|---|".to_owned(),
    ]);
    for r in results {
        let (setup, teardown) = (r.setup_total(), r.teardown_total());
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} |",
            r.backend,
            ms(r.setup_p50()),
            r.rounds(),
            ms(percentile(&setup, 0.99)),
            ms(percentile(&teardown, 0.50)),
            ms(percentile(&teardown, 0.99)),
            r.volumes_per_s
        ));
    }
    lines.extend([
        String::new(),
        format!(
            "p50 of each RPC in the sequential runs (for scale: a NodeGetCapabilities round trip, \
             which touches no disk, takes {} at p50):",
            ms(floor)
        ),
        String::new(),
        format!(
            "| backend | {} |",
            SETUP_RPCS
                .iter()
                .chain(&TEARDOWN_RPCS)
                .copied()
                .collect::<Vec<_>>()
                .join(" | ")
        ),
        "|---|---|---|---|---|---|---|".to_owned(),
    ]);
    for r in results {
        let p50s: Vec<String> = r.rpc_p50s().into_iter().map(ms).collect();
        lines.push(format!("| {} | {} |", r.backend, p50s.join(" | ")));
    }
    lines.extend([
        String::new(),
        format!(
            "Latency: {ROUNDS} rounds of {VOLUMES} volumes per backend, one after another (p99 and the \
             per-RPC p50s pool every round). Throughput: {VOLUMES} volumes per backend from {CLIENTS} \
             concurrent clients, one connection each."
        ),
        String::new(),
        format!(
            "Memory (a fresh plugin with one `dir` pool): VmRSS idle at start {}; idle after \
             {RSS_VOLUMES} CreateVolume calls ({} MiB `dir` volumes) {}; peak (VmHWM) {}.",
            mib(memory.idle_empty_kib),
            RSS_VOLUME_BYTES >> 20,
            mib(memory.idle_full_kib),
            mib(memory.peak_kib)
        ),
        String::new(),
        format!("Targets ({TARGETS}):"),
    ]);
    let p50 = |b: &str| {
        results
            .iter()
            .find(|r| r.backend == b)
            .map(BackendResult::setup_p50)
    };
    if let Some(d) = p50("dir") {
        let met = d < Duration::from_millis(2);
        lines.push(format!(
            "- dir create→publish p50 {} < 2 ms: {}",
            ms(d),
            verdict(met)
        ));
    }
    if let Some(d) = p50("image") {
        let met = d < Duration::from_millis(150);
        lines.push(format!(
            "- image create→publish p50 {} < 150 ms: {}",
            ms(d),
            verdict(met)
        ));
    }
    let met = memory.idle_full_kib < 20 * 1024;
    lines.push(format!(
        "- RSS idle with {RSS_VOLUMES} volumes {} < 20 MiB: {}",
        mib(memory.idle_full_kib),
        verdict(met)
    ));
    lines.push(SECTION_END.to_owned());
    lines.join("\n") + "\n"
}
