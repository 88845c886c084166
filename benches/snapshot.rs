//! Snapshots, restores and clones of `image` volumes, measured against the
//! real `stead node` binary.
//!
//! `make bench-snapshot` (root: the bench and the plugin mount and attach
//! loop devices) builds the release binary and runs this program, which, for
//! each of two pools, each a filesystem on a sparse loop file in a temp dir
//! under /var/tmp (`STEAD_BENCH_DIR` names another place) —
//!
//! - `reflink`: xfs made with `mkfs.xfs -m reflink=1`, where a snapshot is a
//!   reflink clone of the volume's image;
//! - `copy`: ext4, which cannot clone, where a snapshot is a sparse copy —
//!
//! and for each volume size (64 MiB, 1 GiB, 10 GiB):
//!
//! 1. creates an image volume (ext4 inside), stages and publishes it, writes
//!    25% of its size as non-zero data through the mount, then `sync`;
//! 2. three rounds of: CreateSnapshot of the published volume (so its
//!    filesystem is frozen for the copy), CreateVolume with that snapshot as
//!    content source (same size), DeleteVolume of the restore and
//!    DeleteSnapshot; the copy method is read from the snapshot's record;
//! 3. three clones: CreateVolume with the live volume as source, each
//!    deleted again;
//!
//! then replaces its section of docs/BENCHMARKS.md and prints it. The pools
//! are unmounted and their files removed on the way out, after an error too.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Clients, Machine, Plugin, Result, Volume, binary_name, command_output, create, delete, fs_of,
    ms, percentile, section_head, set_up, tear_down, verdict, write_section,
};
use stead::proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use stead::proto::csi::v1::{CreateSnapshotRequest, DeleteSnapshotRequest, VolumeContentSource};
use stead::storage::snapshot::{Method, SNAPSHOT_DIR, SNAPSHOT_FILE};
use stead::storage::{BackendKind, PoolSpec, SnapshotMeta, VolumeId};

const LABEL: &str = "bench-snapshot";
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const SIZES: [u64; 3] = [64 * MIB, GIB, 10 * GIB];
/// The share of a volume's size written before it is snapshotted.
const FILL_PERCENT: u64 = 25;
/// Snapshot→restore rounds, and clones, per pool and size.
const ROUNDS: usize = 3;
/// Logical size of each pool's sparse loop file: room for a 10 GiB source,
/// its restore or clone and its snapshot, which Stead's capacity accounting
/// must see free. Only what is written takes space on the disk below.
const POOL_FS_BYTES: u64 = 40 * GIB;
/// What a pool's filesystem itself writes to its loop file (journal, log,
/// metadata), on top of the volumes' data.
const POOL_FS_SLACK: u64 = GIB;
/// The target for a reflink pool, whatever the volume's size.
const TARGET: Duration = Duration::from_millis(100);
const SECTION_START: &str = "<!-- bench-snapshot:start (written by benches/snapshot.rs) -->";
const SECTION_END: &str = "<!-- bench-snapshot:end -->";

#[tokio::main]
async fn main() -> Result<()> {
    let Some((bin, machine)) = common::begin(LABEL)? else {
        return Ok(());
    };
    let parent = std::env::var_os("STEAD_BENCH_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);

    let mut cases = Vec::new();
    for kind in [PoolKind::Reflink, PoolKind::Copy] {
        let pool = PoolFs::make(&parent, kind)?;
        // Declared after the pool, so dropped before it: the plugin's
        // mounts and loop devices go before the pool is unmounted.
        let plugin = Plugin::start(&bin, LABEL, &[pool.spec()]).await?;
        for size in SIZES {
            cases.push(measure(&plugin, &pool, size).await?);
        }
        plugin.stop()?;
        pool.remove()?;
    }

    let section = render(&machine, &bin, &parent, &cases);
    let path = write_section(SECTION_START, SECTION_END, &section)?;
    println!("{LABEL}: wrote {}", path.display());
    println!("\n{section}");
    Ok(())
}

// ------------------------------------------------------------------ the pools

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolKind {
    Reflink,
    Copy,
}

impl PoolKind {
    /// The pool's name in Stead, and the method its snapshots should record.
    fn name(self) -> &'static str {
        match self {
            PoolKind::Reflink => "reflink",
            PoolKind::Copy => "copy",
        }
    }

    fn fs(self) -> &'static str {
        match self {
            PoolKind::Reflink => "xfs",
            PoolKind::Copy => "ext4",
        }
    }

    fn mkfs(self) -> (&'static str, &'static [&'static str]) {
        match self {
            PoolKind::Reflink => ("mkfs.xfs", &["-q", "-f", "-m", "reflink=1"]),
            // Few inodes, written now: the lazy init of a 40 GiB inode table
            // would otherwise write in the background during the run.
            PoolKind::Copy => (
                "mkfs.ext4",
                &["-q", "-F", "-i", "1048576", "-E", "lazy_itable_init=0"],
            ),
        }
    }

    /// What the pool's file may come to take on the disk below. With
    /// trimming after each delete, the largest volume's data times the
    /// copies held at once (the source, then by sparse copy its snapshot
    /// and its restore); without, every copy ever made.
    fn need(self, trims: bool) -> u64 {
        let written = |size: u64| size * FILL_PERCENT / 100;
        let data = match (self, trims) {
            (PoolKind::Reflink, _) => SIZES.iter().map(|&s| written(s)).sum(),
            (PoolKind::Copy, true) => 3 * written(SIZES[SIZES.len() - 1]),
            // The source, a snapshot and a restore per round, the clones.
            (PoolKind::Copy, false) => {
                let copies = 1 + 3 * ROUNDS as u64;
                SIZES.iter().map(|&s| copies * written(s)).sum()
            }
        };
        data + POOL_FS_SLACK
    }
}

/// A filesystem on a sparse loop file, mounted for the run. Dropping it
/// unmounts it (the loop device goes with it: `mount -o loop` sets
/// autoclear) and removes the file, unless something is still mounted there.
struct PoolFs {
    kind: PoolKind,
    dir: tempfile::TempDir,
    mount: PathBuf,
    /// Whether its loop device passes discards down to the file (then
    /// `fstrim` gives deleted copies back to the disk below).
    trims: bool,
}

impl PoolFs {
    fn make(parent: &Path, kind: PoolKind) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stead-bench-{}.", kind.name()))
            .tempdir_in(parent)?;
        let file = dir.path().join(format!("{}.img", kind.fs()));
        fs::File::create(&file)?.set_len(POOL_FS_BYTES)?;
        let (mkfs, args) = kind.mkfs();
        run(Command::new(mkfs).args(args).arg(&file))?;
        let mount = dir.path().join("mnt");
        fs::create_dir(&mount)?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(&mount))?;
        let mut pool = Self {
            kind,
            dir,
            mount,
            trims: false,
        };
        let device = command_output(
            "findmnt",
            &[
                "-n",
                "-o",
                "SOURCE",
                "--mountpoint",
                &pool.mount.display().to_string(),
            ],
        )?;
        pool.trims = discards(&device);
        // Checked with the pool made: what it needs depends on whether its
        // loop device discards.
        let need = kind.need(pool.trims);
        let st = nix::sys::statvfs::statvfs(parent)?;
        let free = st.blocks_available() * st.fragment_size();
        if free < need {
            return Err(format!(
                "{}: {} GiB free, the {} pool needs {} GiB; set STEAD_BENCH_DIR to a roomier place",
                parent.display(),
                free / GIB,
                kind.name(),
                need.div_ceil(GIB)
            )
            .into());
        }
        fs::create_dir(pool.path())?;
        println!(
            "{LABEL}: pool {} on {} ({device}{}; {} GiB free, {} GiB needed)",
            kind.name(),
            pool.mount.display(),
            if pool.trims {
                ""
            } else {
                ", which does not discard: deleted copies stay in its file"
            },
            free / GIB,
            need.div_ceil(GIB)
        );
        Ok(pool)
    }

    /// The pool's folder: below the mount point, away from `lost+found`.
    fn path(&self) -> PathBuf {
        self.mount.join("pool")
    }

    fn spec(&self) -> PoolSpec {
        PoolSpec {
            name: self.kind.name().to_owned(),
            backend: BackendKind::Image,
            path: self.path(),
        }
    }

    /// Gives the blocks of deleted files back to the disk below: the loop
    /// file stays as sparse as what the pool holds.
    fn trim(&self) {
        if !self.trims {
            return;
        }
        let ok = Command::new("fstrim")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "{LABEL}: fstrim {} failed; the pool's file keeps what was deleted",
                self.mount.display()
            );
        }
    }

    /// Unmounts and removes the pool, saying what stayed if anything did.
    fn remove(mut self) -> Result<()> {
        self.unmount();
        let left = common::mounts_under(&self.mount);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} is still mounted", self.mount.display()).into())
        }
    }

    fn unmount(&mut self) {
        for m in common::mounts_under(&self.mount) {
            common::unmount(&m);
        }
        if !common::mounts_under(&self.mount).is_empty() {
            // Never delete through a live mount: keep it for a human.
            self.dir.disable_cleanup(true);
            eprintln!(
                "{LABEL}: kept {} (still mounted)",
                self.dir.path().display()
            );
        }
    }
}

impl Drop for PoolFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Whether block device `device` (`/dev/loop3`) accepts discards.
fn discards(device: &str) -> bool {
    let name = device.trim_start_matches("/dev/");
    fs::read_to_string(format!("/sys/block/{name}/queue/discard_max_bytes"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|max| max > 0)
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status()?;
    if !status.success() {
        return Err(format!("{cmd:?}: {status}").into());
    }
    Ok(())
}

// ------------------------------------------------------------------ the runs

/// What one pool and size gave.
struct Case {
    pool: PoolKind,
    size: u64,
    written: u64,
    /// Writing the data through the mount, then `sync`.
    fill: Duration,
    snapshot: Vec<Duration>,
    restore: Vec<Duration>,
    clone: Vec<Duration>,
    /// The methods the snapshots' records name, as they came.
    methods: Vec<Method>,
    /// What the last snapshot holds on the pool's filesystem.
    allocated: u64,
    /// Whether deleted copies were trimmed from the pool's file.
    trimmed: bool,
}

/// How long CreateVolume of a volume filled from `source` takes; the
/// volume is deleted again.
async fn copy_to_new(
    c: &mut Clients,
    plugin: &Plugin,
    pool: &PoolFs,
    name: String,
    bytes: i64,
    source: Type,
) -> Result<Duration> {
    let v = Volume::new(plugin, pool.kind.name(), name, bytes);
    let source = VolumeContentSource {
        r#type: Some(source),
    };
    let t = Instant::now();
    let (id, _) = create(c, &v, Some(source)).await?;
    let took = t.elapsed();
    delete(c, &id).await?;
    Ok(took)
}

async fn measure(plugin: &Plugin, pool: &PoolFs, size: u64) -> Result<Case> {
    let name = |what: &str| format!("bench-{}-{}-{what}", pool.kind.name(), size_label(size));
    let bytes = i64::try_from(size)?;
    let mut c = Clients::connect(&plugin.socket).await?;
    let live = Volume::new(plugin, pool.kind.name(), name("source"), bytes);
    live.prepare()?;
    let (live_id, _) = set_up(&mut c, &live).await?;
    let written = size * FILL_PERCENT / 100;
    println!(
        "{LABEL}: {} {}: writing {} MiB",
        pool.kind.name(),
        size_label(size),
        written / MIB
    );
    let fill = fill(&live.target, written)?;

    let mut case = Case {
        pool: pool.kind,
        size,
        written,
        fill,
        snapshot: Vec::new(),
        restore: Vec::new(),
        clone: Vec::new(),
        methods: Vec::new(),
        allocated: 0,
        trimmed: pool.trims,
    };
    for round in 1..=ROUNDS {
        println!(
            "{LABEL}: {} {}: snapshot and restore (round {round}/{ROUNDS})",
            pool.kind.name(),
            size_label(size)
        );
        let t = Instant::now();
        let snap_id = c
            .controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: live_id.clone(),
                name: name(&format!("snap-{round}")),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("CreateSnapshot of {live_id}: {s}"))?
            .into_inner()
            .snapshot
            .ok_or("CreateSnapshot: no snapshot in the response")?
            .snapshot_id;
        case.snapshot.push(t.elapsed());
        let record = snapshot_record(&pool.path(), &snap_id)?;
        if record.allocated_bytes < written {
            return Err(format!(
                "snapshot {snap_id} holds {} bytes, less than the {written} written",
                record.allocated_bytes
            )
            .into());
        }
        case.methods.push(record.method);
        case.allocated = record.allocated_bytes;

        let from_snapshot = Type::Snapshot(SnapshotSource {
            snapshot_id: snap_id.clone(),
        });
        case.restore.push(
            copy_to_new(
                &mut c,
                plugin,
                pool,
                name(&format!("restore-{round}")),
                bytes,
                from_snapshot,
            )
            .await?,
        );
        c.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap_id.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("DeleteSnapshot {snap_id}: {s}"))?;
        pool.trim();
    }
    for round in 1..=ROUNDS {
        println!(
            "{LABEL}: {} {}: clone (round {round}/{ROUNDS})",
            pool.kind.name(),
            size_label(size)
        );
        let from_volume = Type::Volume(VolumeSource {
            volume_id: live_id.clone(),
        });
        case.clone.push(
            copy_to_new(
                &mut c,
                plugin,
                pool,
                name(&format!("clone-{round}")),
                bytes,
                from_volume,
            )
            .await?,
        );
        pool.trim();
    }
    tear_down(&mut c, &live, &live_id).await?;
    live.tidy();
    pool.trim();
    Ok(case)
}

/// Writes `bytes` of pseudo-random (non-zero) data into a file under
/// `mount`, then runs `sync`; returns how long both took.
fn fill(mount: &Path, bytes: u64) -> Result<Duration> {
    let mut block = vec![0u8; MIB as usize];
    // xorshift64: cheap, and no block of it is all zeros.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let t = Instant::now();
    let mut f = fs::File::create(mount.join("data"))?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    drop(f);
    run(&mut Command::new("sync"))?;
    Ok(t.elapsed())
}

/// The record `<pool>/.snapshots/<folder>/snapshot.json` of snapshot `id`.
fn snapshot_record(pool: &Path, id: &str) -> Result<SnapshotMeta> {
    let folder = VolumeId::parse(id)?.folder_name()?;
    let path = pool.join(SNAPSHOT_DIR).join(folder).join(SNAPSHOT_FILE);
    let raw = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", path.display()))?)
}

// ------------------------------------------------------------------ the report

fn size_label(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{}GiB", bytes / GIB)
    } else {
        format!("{}MiB", bytes / MIB)
    }
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b >= GIB => format!("{:.2} GiB", b as f64 / GIB as f64),
        b => format!("{:.0} MiB", b as f64 / MIB as f64),
    }
}

/// A time in ms below a second, in s above.
fn span(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        ms(d)
    }
}

fn median(samples: &[Duration]) -> Duration {
    percentile(samples, 0.50)
}

/// `median (min–max)`.
fn spread(samples: &[Duration]) -> String {
    let (min, max) = (
        samples.iter().min().copied().unwrap_or_default(),
        samples.iter().max().copied().unwrap_or_default(),
    );
    format!("{} ({}–{})", span(median(samples)), span(min), span(max))
}

/// Decimal megabytes per second.
fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::Reflink => "reflink",
        Method::Copy => "copy",
    }
}

fn methods(case: &Case) -> String {
    let mut names: Vec<&str> = case.methods.iter().map(|&m| method_name(m)).collect();
    names.dedup();
    names.join(", ")
}

fn render(machine: &Machine, bin: &Path, parent: &Path, cases: &[Case]) -> String {
    let bin_name = binary_name(bin);
    let untrimmed: Vec<&str> = [PoolKind::Reflink, PoolKind::Copy]
        .into_iter()
        .filter(|&k| cases.iter().any(|c| c.pool == k && !c.trimmed))
        .map(PoolKind::name)
        .collect();
    let trim_note = if untrimmed.is_empty() {
        String::new()
    } else {
        let (pools, its) = if untrimmed.len() == 1 {
            ("pool", "its file")
        } else {
            ("pools", "their files")
        };
        format!(
            " (the loop device of the {} {pools} did not discard: deleted copies stayed in {its})",
            untrimmed.join(" and ")
        )
    };
    let mut lines = section_head(
        SECTION_START,
        "Snapshots, restores and clones of image volumes",
        LABEL,
        machine,
    );
    lines.extend([
        format!(
            "- Setup: the real `{bin_name}` on a unix socket, driven by the generated tonic client. \
             Two `image` pools, each a filesystem on a sparse {} GiB loop file on {}, mounted with \
             `mount -o loop`: `reflink`, xfs made with `mkfs.xfs -m reflink=1`; `copy`, ext4 (no \
             reflink). Per pool and size: one volume (ext4 inside, mount access), staged and \
             published; {FILL_PERCENT}% of its size written through the mount as pseudo-random \
             data, then `sync`; then {ROUNDS} rounds of CreateSnapshot of the published volume (its \
             filesystem is frozen for the copy) → CreateVolume with that snapshot as source, same \
             size (not staged) → DeleteVolume, DeleteSnapshot, `fstrim` of the pool{trim_note}; \
             then {ROUNDS} clones (CreateVolume with the live volume as source), each deleted. \
             Method: what the snapshot's record (`<pool>/.snapshots/<id>/snapshot.json`) names; \
             it holds: the record's `allocated_bytes`.",
            POOL_FS_BYTES / GIB,
            fs_of(parent)
        ),
        String::new(),
        format!(
            "| pool | volume | written | method | snapshot holds | CreateSnapshot median (min–max of {ROUNDS}) | restore from the snapshot | clone of the live volume | write + `sync` of the data |"
        ),
        "|---|---|---|---|---|---|---|---|---|".to_owned(),
    ]);
    for c in cases {
        lines.push(format!(
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} ({:.0} MB/s) |",
            c.pool.name(),
            c.pool.fs(),
            human_bytes(c.size),
            human_bytes(c.written),
            methods(c),
            human_bytes(c.allocated),
            spread(&c.snapshot),
            spread(&c.restore),
            spread(&c.clone),
            span(c.fill),
            mb_per_s(c.written, c.fill)
        ));
    }

    lines.extend([
        String::new(),
        format!(
            "Target (reflink pool: a snapshot in < {} ms at 10 GiB, whatever the size):",
            TARGET.as_millis()
        ),
    ]);
    for c in cases.iter().filter(|c| c.pool == PoolKind::Reflink) {
        let slowest = c.snapshot.iter().max().copied().unwrap_or_default();
        let cloned = c.methods.iter().all(|&m| m == Method::Reflink);
        let note = if cloned {
            String::new()
        } else {
            format!(" (the snapshots were made by {}, not reflink)", methods(c))
        };
        lines.push(format!(
            "- {}: CreateSnapshot median {}, slowest {} < {} ms: {}{note}; restore median {}, clone median {}",
            human_bytes(c.size),
            ms(median(&c.snapshot)),
            ms(slowest),
            TARGET.as_millis(),
            verdict(cloned && slowest < TARGET),
            ms(median(&c.restore)),
            ms(median(&c.clone)),
        ));
    }

    let copy: Vec<&Case> = cases.iter().filter(|c| c.pool == PoolKind::Copy).collect();
    if let Some((big, smaller)) = copy.split_last() {
        let rates = |c: &Case| {
            format!(
                "{:.0} / {:.0} / {:.0} MB/s",
                mb_per_s(c.allocated, median(&c.snapshot)),
                mb_per_s(c.allocated, median(&c.restore)),
                mb_per_s(c.allocated, median(&c.clone))
            )
        };
        let smaller: Vec<String> = smaller
            .iter()
            .map(|c| format!("{} at {}", rates(c), human_bytes(c.size)))
            .collect();
        lines.extend([
            String::new(),
            format!(
                "What the copy pool's time is bound by: a snapshot, a restore and a clone there each \
                 read the source image and write every allocated byte of it again (holes are \
                 skipped), then fsync the copy before answering. So the time follows the bytes \
                 written, not the volume's size, over the write throughput of the pool's stack \
                 (ext4 on a loop file on {}, the root disk). At {} the snapshot held {}, and \
                 snapshot / restore / clone ran at {} (MB = 10^6 bytes: what the snapshot holds over \
                 the median time); for scale, writing the data through the volume's mount and \
                 `sync` ran at {:.0} MB/s. The source had just been written, so its reads likely \
                 came from the page cache: it is the writing that is paid for. Smaller volumes: {}; \
                 the smaller the copy, the larger the share of the fixed costs (freeze, fsyncs, the \
                 record). On the reflink pool the same calls share the image's extents instead of \
                 copying them: see its rows above.",
                fs_of(parent),
                human_bytes(big.size),
                human_bytes(big.allocated),
                rates(big),
                mb_per_s(big.written, big.fill),
                smaller.join("; ")
            ),
        ]);
    }
    lines.push(SECTION_END.to_owned());
    lines.join("\n") + "\n"
}
