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

use std::collections::HashMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stead::proto::csi::v1::controller_client::ControllerClient;
use stead::proto::csi::v1::identity_client::IdentityClient;
use stead::proto::csi::v1::node_client::NodeClient;
use stead::proto::csi::v1::node_service_capability::{self, rpc};
use stead::proto::csi::v1::volume_capability::{self, AccessMode, MountVolume, access_mode};
use stead::proto::csi::v1::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, NodeGetCapabilitiesRequest,
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, ProbeRequest, VolumeCapability,
};
use tonic::transport::{Channel, Endpoint};

type Result<T, E = Box<dyn Error + Send + Sync>> = std::result::Result<T, E>;

const BACKENDS: [&str; 2] = ["dir", "image"];
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
    // `cargo test --benches` runs bench binaries without `--bench`: nothing to do there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benches/csi: run it with `make bench-csi` (cargo bench --bench csi)");
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("benches/csi needs root: the plugin mounts and attaches loop devices".into());
    }
    let bin = std::env::var_os("STEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stead")));
    let machine = Machine::read()?;
    println!("bench-csi: {} on {}", bin.display(), machine.summary());

    let mut results = Vec::new();
    let floor;
    {
        let plugin = Plugin::start(&bin, &BACKENDS).await?;
        floor = round_trip(&plugin).await?;
        for backend in BACKENDS {
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
    write_section(&section)?;
    println!("\n{section}");
    Ok(())
}

// ------------------------------------------------------------------ the runs

struct Clients {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    stages: bool,
}

impl Clients {
    async fn connect(socket: &Path) -> Result<Self> {
        let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))?
            .connect()
            .await?;
        let mut node = NodeClient::new(channel.clone());
        let caps = node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await?
            .into_inner();
        let stages = caps.capabilities.iter().any(|c| {
            matches!(&c.r#type, Some(node_service_capability::Type::Rpc(r))
                if r.r#type == rpc::Type::StageUnstageVolume as i32)
        });
        Ok(Self {
            controller: ControllerClient::new(channel),
            node,
            stages,
        })
    }
}

/// One volume's names and paths, as kubelet would lay them out.
struct Volume {
    name: String,
    pool: String,
    bytes: i64,
    staging: PathBuf,
    target: PathBuf,
}

impl Volume {
    fn new(plugin: &Plugin, pool: &str, name: String, bytes: i64) -> Self {
        let staging = plugin.dir.path().join("staging").join(&name);
        let target = plugin.dir.path().join("pods").join(&name).join("mount");
        Self {
            name,
            pool: pool.to_owned(),
            bytes,
            staging,
            target,
        }
    }

    /// kubelet creates the staging dir and the target's parent, and the
    /// plugin creates the target itself (CSI spec, NodePublishVolume).
    fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.staging)?;
        if let Some(parent) = self.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(())
    }

    fn tidy(&self) {
        let _ = std::fs::remove_dir(&self.staging);
        if let Some(parent) = self.target.parent() {
            let _ = std::fs::remove_dir(&self.target);
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

async fn create(c: &mut Clients, v: &Volume) -> Result<(String, HashMap<String, String>)> {
    let created = c
        .controller
        .create_volume(CreateVolumeRequest {
            name: v.name.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: v.bytes,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability()],
            parameters: HashMap::from([("pool".to_owned(), v.pool.clone())]),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("CreateVolume {}: {s}", v.name))?
        .into_inner()
        .volume
        .ok_or_else(|| format!("CreateVolume {}: no volume in the response", v.name))?;
    Ok((created.volume_id, created.volume_context))
}

/// The RPCs of a set-up and of a teardown, in order, for the per-RPC table.
const SETUP_RPCS: [&str; 3] = ["CreateVolume", "NodeStageVolume", "NodePublishVolume"];
const TEARDOWN_RPCS: [&str; 3] = ["NodeUnpublishVolume", "NodeUnstageVolume", "DeleteVolume"];
type Steps = [Duration; 3];

/// CreateVolume → NodeStageVolume → NodePublishVolume; returns the volume
/// id and how long each RPC took.
async fn set_up(c: &mut Clients, v: &Volume) -> Result<(String, Steps)> {
    let mut steps = Steps::default();
    let t = Instant::now();
    let (id, context) = create(c, v).await?;
    steps[0] = t.elapsed();
    let t = Instant::now();
    let staging = if c.stages {
        let staging = v.staging.display().to_string();
        c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(capability()),
                volume_context: context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("NodeStageVolume {id}: {s}"))?;
        staging
    } else {
        String::new()
    };
    steps[1] = t.elapsed();
    let t = Instant::now();
    c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging,
            target_path: v.target.display().to_string(),
            volume_capability: Some(capability()),
            volume_context: context,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("NodePublishVolume {id}: {s}"))?;
    steps[2] = t.elapsed();
    Ok((id, steps))
}

/// NodeUnpublishVolume → NodeUnstageVolume → DeleteVolume, and how long each took.
async fn tear_down(c: &mut Clients, v: &Volume, id: &str) -> Result<Steps> {
    let mut steps = Steps::default();
    let t = Instant::now();
    c.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: v.target.display().to_string(),
        })
        .await
        .map_err(|s| format!("NodeUnpublishVolume {id}: {s}"))?;
    steps[0] = t.elapsed();
    let t = Instant::now();
    if c.stages {
        c.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: v.staging.display().to_string(),
            })
            .await
            .map_err(|s| format!("NodeUnstageVolume {id}: {s}"))?;
    }
    steps[1] = t.elapsed();
    let t = Instant::now();
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("DeleteVolume {id}: {s}"))?;
    steps[2] = t.elapsed();
    Ok(steps)
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
            Ok::<_, Box<dyn Error + Send + Sync>>(())
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
    let plugin = Plugin::start(bin, &["dir"]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_empty_kib = plugin.status_kib("VmRSS")?;
    let mut c = Clients::connect(&plugin.socket).await?;
    for i in 0..RSS_VOLUMES {
        let v = Volume::new(&plugin, "dir", format!("bench-rss-{i}"), RSS_VOLUME_BYTES);
        create(&mut c, &v).await?;
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

// ------------------------------------------------------------------ the plugin

/// A running `stead node` with its pools in a temp dir. Stopping it (or
/// dropping it) sends SIGTERM, then releases whatever it left mounted.
struct Plugin {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Plugin {
    async fn start(bin: &Path, pools: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("stead-bench.").tempdir()?;
        let socket = dir.path().join("csi.sock");
        let log_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(log_dir)?;
        let log = std::fs::File::create(log_dir.join("bench-csi-stead.log"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("node")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "bench-node", "--log-format", "text"])
            // Staging and target paths lie under the bench's own folder.
            .arg("--kubelet-dir")
            .arg(dir.path());
        for pool in pools {
            let path = dir.path().join("pools").join(pool);
            std::fs::create_dir_all(&path)?;
            cmd.arg("--pool")
                .arg(format!("{pool}:{pool}:{}", path.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut plugin = Self { child, dir, socket };
        plugin.wait_ready().await?;
        Ok(plugin)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "stead exited ({status}) before serving; see {}/bench-csi-stead.log",
                    env!("CARGO_TARGET_TMPDIR")
                )
                .into());
            }
            if self.socket.exists()
                && let Ok(channel) =
                    Endpoint::from_shared(format!("unix://{}", self.socket.display()))?
                        .connect()
                        .await
                && let Ok(r) = IdentityClient::new(channel).probe(ProbeRequest {}).await
                && r.into_inner().ready.unwrap_or(true)
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("stead was not ready within 30 s".into())
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {field} in /proc/{}/status", self.child.id()).into())
    }

    fn stop(mut self) -> Result<()> {
        self.terminate();
        match self.release_leftovers() {
            leftovers if leftovers.is_empty() => Ok(()),
            leftovers => Err(format!("left behind: {}", leftovers.join(", ")).into()),
        }
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let pid = Pid::from_raw(self.child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!("bench-csi: stead ignored SIGTERM for 15 s; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    /// Unmounts and detaches what is still there under the temp dir; returns
    /// what could not be released (then the dir is kept, not deleted).
    fn release_leftovers(&mut self) -> Vec<String> {
        let root = self.dir.path().to_path_buf();
        let mut failed = Vec::new();
        for _ in 0..5 {
            let mounts = mounts_under(&root);
            if mounts.is_empty() {
                break;
            }
            for m in mounts {
                eprintln!("bench-csi: cleanup: umount {}", m.display());
                if umount2(&m, MntFlags::empty()).is_err() {
                    let _ = umount2(&m, MntFlags::MNT_DETACH);
                }
            }
        }
        for loop_dev in loops_under(&root) {
            eprintln!("bench-csi: cleanup: losetup -d {loop_dev}");
            let ok = Command::new("losetup")
                .args(["-d", &loop_dev])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                failed.push(loop_dev);
            }
        }
        failed.extend(mounts_under(&root).iter().map(|m| m.display().to_string()));
        failed
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.terminate();
        if !self.release_leftovers().is_empty() {
            // Never delete through a live mount: keep the dir for a human.
            self.dir.disable_cleanup(true);
            eprintln!(
                "bench-csi: kept {} (mounts remain)",
                self.dir.path().display()
            );
        }
    }
}

/// Mount points at or under `root`, deepest first.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts
}

/// Loop devices whose backing file lives under `root`.
fn loops_under(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Path::new(backing.trim())
                .starts_with(root)
                .then(|| format!("/dev/{name}"))
        })
        .collect()
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

struct Machine {
    cores: String,
    model: String,
    kernel: String,
    date: String,
    load: String,
    pool_fs: String,
}

impl Machine {
    fn read() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let tmp = std::env::temp_dir();
        Ok(Self {
            cores: command_output("nproc", &[])?,
            model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?,
            load: std::fs::read_to_string("/proc/loadavg")?
                .split(' ')
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            pool_fs: command_output(
                "findmnt",
                &["-n", "-o", "FSTYPE", "-T", &tmp.display().to_string()],
            )
            .map(|fs| format!("{fs} ({})", tmp.display()))
            .unwrap_or_else(|_| tmp.display().to_string()),
        })
    }

    fn summary(&self) -> String {
        format!(
            "{} cores, {}, Linux {}",
            self.cores, self.model, self.kernel
        )
    }
}

fn command_output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(format!("{cmd} {}: {}", args.join(" "), out.status).into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Nearest-rank percentile.
fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

fn render(
    machine: &Machine,
    bin: &Path,
    results: &[BackendResult],
    floor: Duration,
    memory: &Memory,
) -> String {
    let bin_name = bin.file_name().map_or_else(
        || bin.display().to_string(),
        |n| format!("target/release/{}", n.to_string_lossy()),
    );
    let mut lines = vec![
        SECTION_START.to_owned(),
        "## CSI latency, throughput and memory".to_owned(),
        String::new(),
        format!(
            "- Machine: {} (`nproc` = {}; load average at start {}: the cores are shared with other builds)",
            machine.summary(),
            machine.cores,
            machine.load
        ),
        "- Command: `make bench-csi` (`cargo build --locked --release && cargo bench --locked --bench csi`), as root".to_owned(),
        format!("- Date: {}", machine.date),
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
    ];
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

/// Replaces this benchmark's section of docs/BENCHMARKS.md (or appends it).
fn write_section(section: &str) -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nOne section per benchmark, each rewritten by the program that measures it.\n".to_owned()
    });
    let new = match (old.find(SECTION_START), old.find(SECTION_END)) {
        (Some(a), Some(b)) if a < b => {
            let after = old[b + SECTION_END.len()..].trim_start_matches('\n');
            let gap = if after.is_empty() { "" } else { "\n" };
            format!("{}{section}{gap}{after}", &old[..a])
        }
        _ => format!("{}\n\n{section}", old.trim_end_matches('\n')),
    };
    std::fs::write(&path, new)?;
    println!("bench-csi: wrote {}", path.display());
    Ok(())
}
