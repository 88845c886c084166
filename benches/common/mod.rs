//! What the benchmark programs share: the plugin under test and its clean-up,
//! the CSI calls of a volume's life, the machine they ran on, the figures,
//! and their section of docs/BENCHMARKS.md.
//!
//! Each bench includes this with `mod common;` and uses a part of it.
#![allow(dead_code)]

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
    NodeUnstageVolumeRequest, ProbeRequest, VolumeCapability, VolumeContentSource,
};
use stead::storage::PoolSpec;
use tonic::transport::{Channel, Endpoint};

/// Any error, carried up to `main`.
pub type BoxError = Box<dyn Error + Send + Sync>;
pub type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The `stead` binary to measure and the machine it runs on (both printed),
/// or `None` when this program was not run by `cargo bench` (`cargo test
/// --benches` runs bench binaries without `--bench`: nothing to do there).
/// `label` is the bench's make target.
///
/// The binary is `CARGO_BIN_EXE_stead` (the `cargo bench` build, i.e.
/// target/release/stead) unless `STEAD_BIN` names another.
pub fn begin(label: &str) -> Result<Option<(PathBuf, Machine)>> {
    if !std::env::args().any(|a| a == "--bench") {
        let bench = label.trim_start_matches("bench-");
        println!("{label}: run it with `make {label}` (cargo bench --bench {bench})");
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            format!("{label} needs root: the plugin mounts and attaches loop devices").into(),
        );
    }
    let bin = std::env::var_os("STEAD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stead")));
    let machine = Machine::read()?;
    println!("{label}: {} on {}", bin.display(), machine.summary());
    Ok(Some((bin, machine)))
}

// ------------------------------------------------------------------ the plugin

/// A running `stead node` with its socket and kubelet dir in a temp dir.
/// Stopping it (or dropping it) sends SIGTERM, then releases whatever it
/// left mounted or attached under that dir and under its pools.
pub struct Plugin {
    child: Child,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// Prefix of its messages and of its log file's name.
    label: String,
    /// Where it may leave mounts and loop devices: its dir and the pools
    /// outside it.
    roots: Vec<PathBuf>,
}

impl Plugin {
    /// Starts `bin` with `pools`; a pool whose path is relative lies under
    /// the plugin's temp dir. Its output goes to
    /// `$CARGO_TARGET_TMPDIR/<label>-stead.log`.
    pub async fn start(bin: &Path, label: &str, pools: &[PoolSpec]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("stead-bench.").tempdir()?;
        let socket = dir.path().join("csi.sock");
        let log_dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(log_dir)?;
        let log = std::fs::File::create(log_dir.join(format!("{label}-stead.log")))?;
        let mut cmd = Command::new(bin);
        cmd.arg("node")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "bench-node", "--log-format", "text"])
            // Staging and target paths lie under the bench's own folder.
            .arg("--kubelet-dir")
            .arg(dir.path());
        let mut roots = vec![dir.path().to_path_buf()];
        for pool in pools {
            let path = dir.path().join(&pool.path);
            std::fs::create_dir_all(&path)?;
            cmd.arg("--pool").arg(
                PoolSpec {
                    path: path.clone(),
                    ..pool.clone()
                }
                .to_string(),
            );
            if !path.starts_with(dir.path()) {
                roots.push(path);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut plugin = Self {
            child,
            dir,
            socket,
            label: label.to_owned(),
            roots,
        };
        plugin.wait_ready().await?;
        Ok(plugin)
    }

    /// The plugin's temp dir (its kubelet dir).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "stead exited ({status}) before serving; see {}/{}-stead.log",
                    env!("CARGO_TARGET_TMPDIR"),
                    self.label
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

    pub fn status_kib(&self, field: &str) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {field} in /proc/{}/status", self.child.id()).into())
    }

    pub fn stop(mut self) -> Result<()> {
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
                eprintln!("{}: stead ignored SIGTERM for 15 s; killing it", self.label);
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }

    /// Unmounts and detaches what is still there under its roots; returns
    /// what could not be released (then the temp dir is kept, not deleted).
    fn release_leftovers(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        for root in &self.roots {
            for _ in 0..5 {
                let mounts = mounts_under(root);
                if mounts.is_empty() {
                    break;
                }
                for m in mounts {
                    eprintln!("{}: cleanup: umount {}", self.label, m.display());
                    unmount(&m);
                }
            }
            for loop_dev in loops_under(root) {
                eprintln!("{}: cleanup: losetup -d {loop_dev}", self.label);
                let ok = Command::new("losetup")
                    .args(["-d", &loop_dev])
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    failed.push(loop_dev);
                }
            }
            failed.extend(mounts_under(root).iter().map(|m| m.display().to_string()));
        }
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
                "{}: kept {} (mounts remain)",
                self.label,
                self.dir.path().display()
            );
        }
    }
}

/// Unmounts `path`, lazily when it is busy.
pub fn unmount(path: &Path) {
    if umount2(path, MntFlags::empty()).is_err() {
        let _ = umount2(path, MntFlags::MNT_DETACH);
    }
}

/// Mount points at or under `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
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
pub fn loops_under(root: &Path) -> Vec<String> {
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

// ------------------------------------------------------------------ a volume's life

pub struct Clients {
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub stages: bool,
}

impl Clients {
    pub async fn connect(socket: &Path) -> Result<Self> {
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
pub struct Volume {
    pub name: String,
    pub pool: String,
    pub bytes: i64,
    pub staging: PathBuf,
    pub target: PathBuf,
}

impl Volume {
    pub fn new(plugin: &Plugin, pool: &str, name: String, bytes: i64) -> Self {
        let staging = plugin.dir().join("staging").join(&name);
        let target = plugin.dir().join("pods").join(&name).join("mount");
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
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.staging)?;
        if let Some(parent) = self.target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(())
    }

    pub fn tidy(&self) {
        let _ = std::fs::remove_dir(&self.staging);
        if let Some(parent) = self.target.parent() {
            let _ = std::fs::remove_dir(&self.target);
            let _ = std::fs::remove_dir(parent);
        }
    }
}

pub fn capability() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// CreateVolume of `v`, empty or filled from `source`; returns the volume
/// id and context.
pub async fn create(
    c: &mut Clients,
    v: &Volume,
    source: Option<VolumeContentSource>,
) -> Result<(String, HashMap<String, String>)> {
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
            volume_content_source: source,
            ..Default::default()
        })
        .await
        .map_err(|s| format!("CreateVolume {}: {s}", v.name))?
        .into_inner()
        .volume
        .ok_or_else(|| format!("CreateVolume {}: no volume in the response", v.name))?;
    Ok((created.volume_id, created.volume_context))
}

/// DeleteVolume of `id`.
pub async fn delete(c: &mut Clients, id: &str) -> Result<()> {
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(|s| format!("DeleteVolume {id}: {s}"))?;
    Ok(())
}

/// How long each of the three RPCs of a set-up or a teardown took.
pub type Steps = [Duration; 3];

/// CreateVolume → NodeStageVolume → NodePublishVolume; returns the volume
/// id and how long each RPC took.
pub async fn set_up(c: &mut Clients, v: &Volume) -> Result<(String, Steps)> {
    let mut steps = Steps::default();
    let t = Instant::now();
    let (id, context) = create(c, v, None).await?;
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
pub async fn tear_down(c: &mut Clients, v: &Volume, id: &str) -> Result<Steps> {
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
    delete(c, id).await?;
    steps[2] = t.elapsed();
    Ok(steps)
}

// ------------------------------------------------------------------ the report

pub struct Machine {
    pub cores: String,
    pub model: String,
    pub kernel: String,
    pub date: String,
    pub load: String,
    /// The filesystem of the temp dir, where the csi bench's pools lie.
    pub pool_fs: String,
}

impl Machine {
    pub fn read() -> Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown".to_owned(), |(_, m)| m.trim().to_owned());
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
            pool_fs: fs_of(&std::env::temp_dir()),
        })
    }

    pub fn summary(&self) -> String {
        format!(
            "{} cores, {}, Linux {}",
            self.cores, self.model, self.kernel
        )
    }

    /// [`Machine::summary`] with the load the run started at.
    pub fn with_load(&self) -> String {
        format!(
            "{}; load average at start {} (the cores are shared with other builds)",
            self.summary(),
            self.load
        )
    }
}

/// The opening lines of a bench's section of docs/BENCHMARKS.md: its start
/// marker, its title, and the machine, command and date of the run.
pub fn section_head(start: &str, title: &str, label: &str, machine: &Machine) -> Vec<String> {
    let bench = label.trim_start_matches("bench-");
    vec![
        start.to_owned(),
        format!("## {title}"),
        String::new(),
        format!(
            "- Machine: {} (`nproc` = {}; load average at start {}: the cores are shared with other builds)",
            machine.summary(),
            machine.cores,
            machine.load
        ),
        format!(
            "- Command: `make {label}` (`cargo build --locked --release && cargo bench --locked --bench {bench}`), as root"
        ),
        format!("- Date: {}", machine.date),
    ]
}

/// The measured binary as the report names it: `target/release/stead`.
pub fn binary_name(bin: &Path) -> String {
    bin.file_name().map_or_else(
        || bin.display().to_string(),
        |n| format!("target/release/{}", n.to_string_lossy()),
    )
}

/// The filesystem type holding `path`, as `ext4 (/tmp)`.
pub fn fs_of(path: &Path) -> String {
    command_output(
        "findmnt",
        &["-n", "-o", "FSTYPE", "-T", &path.display().to_string()],
    )
    .map(|fs| format!("{fs} ({})", path.display()))
    .unwrap_or_else(|_| path.display().to_string())
}

pub fn command_output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(format!("{cmd} {}: {}", args.join(" "), out.status).into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Nearest-rank percentile.
pub fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// Replaces the section of docs/BENCHMARKS.md between the markers `start`
/// and `end` (which `section` begins and ends with), or appends it; returns
/// the file's path.
pub fn write_section(start: &str, end: &str, section: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nOne section per benchmark, each rewritten by the program that measures it.\n".to_owned()
    });
    let new = match (old.find(start), old.find(end)) {
        (Some(a), Some(b)) if a < b => {
            let after = old[b + end.len()..].trim_start_matches('\n');
            let gap = if after.is_empty() { "" } else { "\n" };
            format!("{}{section}{gap}{after}", &old[..a])
        }
        _ => format!("{}\n\n{section}", old.trim_end_matches('\n')),
    };
    std::fs::write(&path, new)?;
    Ok(path)
}
