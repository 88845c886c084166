//! Shared harness of the integration tests: a real `stead node` on a temp
//! socket with one `dir` and one `image` pool, driven by the generated tonic
//! clients. Everything a test mounts or attaches lives under its temp root
//! and is released when the [`Agent`] is dropped, even after a panic.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stead::proto::csi::v1::controller_client::ControllerClient;
use stead::proto::csi::v1::identity_client::IdentityClient;
use stead::proto::csi::v1::node_client::NodeClient;
use stead::proto::csi::v1::volume_capability::access_mode::Mode;
use stead::proto::csi::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use stead::proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use stead::proto::csi::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

pub const NODE: &str = "it-node";
pub const MIB: i64 = 1024 * 1024;

/// A running `stead node` and the directory it owns.
pub struct Agent {
    child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    /// The image file of a filesystem mounted at `root`, if the agent runs
    /// on one of its own ([`Agent::start_on_xfs`], [`Agent::start_on_fs`]).
    backing: Option<PathBuf>,
    /// The agent's STEAD_POOLS.
    pools: String,
    /// Where its output goes: in `root`, or beside the image of a root of
    /// its own, so that a test that fills that filesystem keeps the log.
    log: PathBuf,
    /// The length of the log when the running agent was started (the log
    /// is appended to across restarts).
    log_start: usize,
}

/// The pools of [`Agent::start`]: one `dir`, one `image`, under `root`.
/// No reserve: they lie on the machine's disk, whose free space the tests
/// do not control (the reserve has tests of its own).
pub fn default_pools(root: &Path) -> String {
    format!(
        "dir:dir:{}:reserve=0,image:image:{}:reserve=0",
        root.join("pools/dir").display(),
        root.join("pools/image").display()
    )
}

impl Agent {
    /// Starts an agent in a fresh temp root.
    pub async fn start(name: &str) -> Agent {
        assert!(
            nix::unistd::geteuid().is_root(),
            "integration tests mount and attach loop devices: run them as root"
        );
        let root = temp_root(name);
        fs::create_dir_all(&root).unwrap();
        let pools = default_pools(&root);
        let log = root.join("stead.log");
        Self::start_in(root, None, pools, log).await
    }

    /// Starts an agent whose root (and so both pools) is a fresh xfs with
    /// reflink on a loop device: snapshots and clones there are reflinks.
    pub async fn start_on_xfs(name: &str) -> Agent {
        Self::start_on_fs(name, "xfs", 2048, default_pools).await
    }

    /// Starts an agent whose root is a fresh filesystem of `fs` (`xfs`
    /// with reflink, `ext4`, `btrfs`) and `mib` MiB on a loop device, with
    /// the pools `pools` gives for that root (see [`default_pools`]).
    pub async fn start_on_fs(
        name: &str,
        fs: &str,
        mib: u64,
        pools: impl FnOnce(&Path) -> String,
    ) -> Agent {
        Self::start_on_fs_logging(name, fs, mib, pools, false).await
    }

    /// [`Agent::start_on_fs`]; `log_inside`: the agent's output goes to a
    /// file on that filesystem, which a test that fills it fills too.
    pub async fn start_on_fs_logging(
        name: &str,
        fs: &str,
        mib: u64,
        pools: impl FnOnce(&Path) -> String,
        log_inside: bool,
    ) -> Agent {
        let root = temp_root(name);
        fs::create_dir_all(&root).unwrap();
        let img = root.with_extension("img");
        let f = fs::File::create(&img).unwrap();
        f.set_len(mib * MIB as u64).unwrap();
        drop(f);
        let (mkfs, args): (&str, &[&str]) = match fs {
            "xfs" => ("mkfs.xfs", &["-q", "-f", "-m", "reflink=1"]),
            "ext4" => ("mkfs.ext4", &["-q", "-F"]),
            "btrfs" => {
                assert!(
                    Command::new("mkfs.btrfs").arg("--version").output().is_ok(),
                    "mkfs.btrfs is missing: install btrfs-progs (.ci/run does)"
                );
                ("mkfs.btrfs", &["-q", "-f"])
            }
            other => panic!("no loop filesystem {other} in the harness"),
        };
        let ok = Command::new(mkfs)
            .args(args)
            .arg(&img)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{mkfs} {}", img.display());
        // -o loop sets autoclear: the device goes with the unmount.
        let ok = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&root)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount {} on {}", img.display(), root.display());
        let pools = pools(&root);
        let log = if log_inside {
            root.join("stead.log")
        } else {
            img.with_extension("log")
        };
        Self::start_in(root, Some(img), pools, log).await
    }

    async fn start_in(
        root: PathBuf,
        backing: Option<PathBuf>,
        pools: String,
        log: PathBuf,
    ) -> Agent {
        let socket = root.join("csi.sock");
        let log_start = log_len(&log);
        let child = spawn(&root, &socket, &pools, &log);
        let (controller, node, identity) = connect(&socket).await;
        Agent {
            child: Some(child),
            root,
            socket,
            controller,
            node,
            identity,
            backing,
            pools,
            log,
            log_start,
        }
    }

    pub fn dir_pool(&self) -> PathBuf {
        self.root.join("pools/dir")
    }

    pub fn image_pool(&self) -> PathBuf {
        self.root.join("pools/image")
    }

    /// A staging path for a volume (created, as the CO does).
    pub fn staging(&self, vol: &str) -> PathBuf {
        let p = self.root.join("staging").join(vol);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// A target path for a volume (not created: the plugin creates it).
    pub fn target(&self, vol: &str) -> PathBuf {
        let p = self.root.join("pods").join(vol);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }

    /// Kills the agent with SIGKILL: no chance to clean anything up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the agent and starts it again on the same root.
    pub async fn restart(&mut self) {
        self.kill();
        self.log_start = log_len(&self.log);
        self.child = Some(spawn(&self.root, &self.socket, &self.pools, &self.log));
        let (c, n, i) = connect(&self.socket).await;
        self.controller = c;
        self.node = n;
        self.identity = i;
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of the running agent's health endpoint: the harness
    /// asks for port 0, and the agent logs the port it got.
    pub async fn health_addr(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            let found = log
                .get(self.log_start..)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("serving health endpoint"))
                .find_map(|l| {
                    let addr = l.split_whitespace().find_map(|w| w.strip_prefix("addr="))?;
                    addr.parse().ok()
                });
            if let Some(addr) = found {
                return addr;
            }
            assert!(Instant::now() < deadline, "no health endpoint in the log");
            // A log file has no watch: the line is the condition.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One scrape of the agent's `/metrics`, checked to be OpenMetrics.
    pub async fn metrics(&self) -> String {
        let reply = http_get(self.health_addr().await, "/metrics").await;
        assert!(reply.status.contains("200"), "{}", reply.status);
        assert!(
            reply.head.contains(
                "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{}",
            reply.head
        );
        reply.body
    }

    pub async fn create(
        &mut self,
        name: &str,
        pool: &str,
        cap: VolumeCapability,
        bytes: i64,
    ) -> Volume {
        self.controller
            .create_volume(create_req(name, pool, cap, bytes))
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .unwrap()
    }

    pub async fn snapshot(&mut self, name: &str, source: &str) -> Snapshot {
        self.controller
            .create_snapshot(snapshot_req(name, source))
            .await
            .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e}"))
            .into_inner()
            .snapshot
            .unwrap()
    }

    pub async fn create_with(&mut self, req: CreateVolumeRequest) -> Volume {
        let name = req.name.clone();
        self.controller
            .create_volume(req)
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .unwrap()
    }

    /// Stages and publishes `id`, returning its target path.
    pub async fn mount(&mut self, id: &str, cap: &VolumeCapability) -> PathBuf {
        let staging = self.staging(id);
        let target = self.target(id);
        self.stage(id, &staging, cap.clone()).await;
        self.publish(id, &staging, &target, cap.clone(), false)
            .await
            .unwrap();
        target
    }

    pub async fn unmount(&mut self, id: &str) {
        let staging = self.staging(id);
        let target = self.target(id);
        self.unpublish(id, &target).await;
        self.unstage(id, &staging).await;
    }

    pub async fn available(&mut self, pool: &str) -> i64 {
        self.controller
            .get_capacity(GetCapacityRequest {
                parameters: [("pool".to_owned(), pool.to_owned())].into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .available_capacity
    }

    /// NodeGetVolumeStats of `id` at `path`; panics naming the volume if it fails.
    pub async fn stats(&mut self, id: &str, path: &Path) -> NodeGetVolumeStatsResponse {
        self.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: path_str(path),
                staging_target_path: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeGetVolumeStats {id}: {e}"))
            .into_inner()
    }

    pub async fn stage(&mut self, id: &str, staging: &Path, cap: VolumeCapability) {
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeStageVolume {id}: {e}"));
    }

    pub async fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: VolumeCapability,
        readonly: bool,
    ) -> Result<(), tonic::Status> {
        self.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
                target_path: path_str(target),
                volume_capability: Some(cap),
                readonly,
                ..Default::default()
            })
            .await
            .map(drop)
    }

    pub async fn unpublish(&mut self, id: &str, target: &Path) {
        self.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.into(),
                target_path: path_str(target),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnpublishVolume {id}: {e}"));
    }

    pub async fn unstage(&mut self, id: &str, staging: &Path) {
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: path_str(staging),
            })
            .await
            .unwrap_or_else(|e| panic!("NodeUnstageVolume {id}: {e}"));
    }

    pub async fn delete(&mut self, id: &str) {
        self.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteVolume {id}: {e}"));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- stead log ({}) ----\n{}",
                self.root.display(),
                self.log()
            );
        }
        release_under(&self.root);
        if mounts_under(&self.root).is_empty() {
            let _ = fs::remove_dir_all(&self.root);
            if let Some(img) = &self.backing {
                let _ = fs::remove_file(img);
                let _ = fs::remove_file(&self.log);
            }
        } else {
            eprintln!("mounts remain under {}; leaving it", self.root.display());
        }
    }
}

fn log_len(log: &Path) -> usize {
    fs::metadata(log).map_or(0, |m| m.len() as usize)
}

/// A reply of the health endpoint.
pub struct Reply {
    pub status: String,
    /// The status line and the headers.
    pub head: String,
    pub body: String,
}

/// GET `path` on a health endpoint (waiting for it to listen).
pub async fn http_get(addr: SocketAddr, path: &str) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut conn = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "health endpoint {addr}: {e}");
                // Until the agent listens: the connect is the condition.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    Reply {
        status: head.lines().next().unwrap_or_default().to_string(),
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn temp_root(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "stead-it-{name}-{}-{}",
        std::process::id(),
        rand_suffix()
    ))
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

fn spawn(root: &Path, socket: &Path, pools: &str, log: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_stead"))
        .arg("node")
        .env("STEAD_CSI_ENDPOINT", format!("unix://{}", socket.display()))
        .env("NODE_NAME", NODE)
        // Staging and target paths of the tests lie under their root.
        .env("STEAD_KUBELET_DIR", root)
        .env("STEAD_POOLS", pools)
        // Port 0: the agent logs the port it got (see Agent::health_addr).
        .args(["--health-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start stead")
}

async fn connect(
    socket: &Path,
) -> (
    ControllerClient<Channel>,
    NodeClient<Channel>,
    IdentityClient<Channel>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if socket.exists()
            && let Ok(ch) = Endpoint::from_shared(format!("unix://{}", socket.display()))
                .unwrap()
                .connect()
                .await
        {
            let mut id = IdentityClient::new(ch.clone());
            if id.probe(ProbeRequest {}).await.is_ok() {
                return (ControllerClient::new(ch.clone()), NodeClient::new(ch), id);
            }
        }
        assert!(
            Instant::now() < deadline,
            "stead did not serve {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Unmounts everything under `root` (deepest first) and detaches every loop
/// device whose backing file is under it.
pub fn release_under(root: &Path) {
    // Found first: once `root` itself (a filesystem of its own) is lazily
    // unmounted, the loop devices of its images show their files by paths
    // relative to it, no longer under `root`.
    let early = loops_under(root);
    for _ in 0..5 {
        let mut m = mounts_under(root);
        if m.is_empty() {
            break;
        }
        m.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in m {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    // A loop device whose filesystem was lazily unmounted may still be busy:
    // `losetup -d` then only marks it for autoclear, and it goes once the
    // kernel has let go of the filesystem. Wait for that, asking again.
    for dev in early {
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loops = loops_under(root);
        if loops.is_empty() || Instant::now() > deadline {
            break;
        }
        for dev in loops {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    stead::mount::mount_table()
        .unwrap()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root))
        .collect()
}

pub fn loops_under(root: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args([
            "--list",
            "--noheadings",
            "--raw",
            "--output",
            "NAME,BACK-FILE",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, back)| Path::new(back.trim_end_matches(" (deleted)")).starts_with(root))
        .map(|(dev, _)| dev.to_owned())
        .collect()
}

pub fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

pub fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn with_mode(mut cap: VolumeCapability, mode: Mode) -> VolumeCapability {
    cap.access_mode = Some(AccessMode { mode: mode as i32 });
    cap
}

pub fn create_req(
    name: &str,
    pool: &str,
    cap: VolumeCapability,
    bytes: i64,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        parameters: HashMap::from([("pool".to_owned(), pool.to_owned())]),
        ..Default::default()
    }
}

/// Total size in bytes of the filesystem mounted at `path`, as `df` sees it.
pub fn df_size(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "df {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn snapshot_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

pub fn from_snapshot(mut req: CreateVolumeRequest, snap: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.into(),
        })),
    });
    req
}

pub fn from_volume(mut req: CreateVolumeRequest, vol: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: vol.into(),
        })),
    });
    req
}
