//! What reserving an image's blocks costs at create: thick against thin,
//! 1 GiB and 10 GiB, on xfs and on ext4.
//!
//! `make bench-alloc` (root: loop devices and mounts) runs this program,
//! which, for each filesystem, makes a 24 GiB sparse file on the machine's
//! temp dir, formats it, mounts it from a loop device of its own, opens a
//! Stead store with one `image` pool on it (no reserve), and times
//! `Store::create` (folder, image file, fallocate for thick, the record,
//! every fsync) a few times per size and allocation. Around each create
//! the pool's filesystem is synced and the loop device's written sectors
//! read (`/sys/block/loopN/stat`), so that the bytes the create made the
//! disk write are known: a reservation that wrote zeroes would write the
//! whole size. It then replaces its section of docs/BENCHMARKS.md and
//! prints it. Everything is unmounted and detached on the way out.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stead::storage::{
    AccessKind, Allocation, BackendKind, FsType, NewVolume, PoolSpec, Reserve, Store, VolumeId,
};

use common::Result;

const GIB: u64 = 1 << 30;
const SIZES: [u64; 2] = [GIB, 10 * GIB];
const ALLOCATIONS: [Allocation; 2] = [Allocation::Thick, Allocation::Thin];
const FILESYSTEMS: [&str; 2] = ["xfs", "ext4"];
/// Creates per size, allocation and filesystem; the figures are medians.
const REPEATS: usize = 7;
/// Size of each pool's filesystem (a sparse file: only what is written
/// takes room on the machine's disk).
const POOL_FS_BYTES: u64 = 24 * GIB;
const SECTION_START: &str = "<!-- bench-alloc:start (written by benches/alloc.rs) -->";
const SECTION_END: &str = "<!-- bench-alloc:end -->";

fn main() -> Result<()> {
    // `cargo test --benches` runs bench binaries without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benches/alloc: run it with `make bench-alloc` (cargo bench --bench alloc)");
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("benches/alloc needs root: it mounts loop filesystems".into());
    }
    let machine = common::Machine::read()?.with_load();
    println!("bench-alloc: {machine}");
    let tmp = tempfile::Builder::new()
        .prefix("stead-bench-alloc-")
        .tempdir()?;
    let mut rows = Vec::new();
    for fs_name in FILESYSTEMS {
        let mounted = LoopFs::make(tmp.path(), fs_name)?;
        let measured = measure(&mounted);
        drop(mounted);
        rows.extend(measured?);
    }
    let section = render(&machine, &rows);
    println!("{section}");
    common::write_section(SECTION_START, SECTION_END, &section)?;
    Ok(())
}

/// One filesystem on a loop device of its own, mounted; undone on drop.
struct LoopFs {
    fs: &'static str,
    device: String,
    mount: PathBuf,
}

impl LoopFs {
    fn make(dir: &Path, fs: &'static str) -> Result<LoopFs> {
        let img = dir.join(format!("{fs}.img"));
        fs::File::create(&img)?.set_len(POOL_FS_BYTES)?;
        let (mkfs, args): (&str, &[&str]) = match fs {
            "xfs" => ("mkfs.xfs", &["-q", "-f"]),
            _ => ("mkfs.ext4", &["-q", "-F"]),
        };
        run(Command::new(mkfs).args(args).arg(&img))?;
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&img))?;
        let mount = dir.join(fs);
        fs::create_dir(&mount)?;
        let mounted = LoopFs { fs, device, mount };
        run(Command::new("mount")
            .arg(&mounted.device)
            .arg(&mounted.mount))?;
        Ok(mounted)
    }

    /// Sectors written to the device so far (field 7 of its `stat`).
    fn written_bytes(&self) -> Result<u64> {
        let name = Path::new(&self.device)
            .file_name()
            .ok_or("no device name")?
            .to_string_lossy()
            .into_owned();
        let stat = fs::read_to_string(format!("/sys/block/{name}/stat"))?;
        let sectors: u64 = stat
            .split_whitespace()
            .nth(6)
            .ok_or("short stat")?
            .parse()?;
        Ok(sectors * 512)
    }

    fn sync(&self) -> Result<()> {
        let dir = fs::File::open(&self.mount)?;
        rustix::fs::syncfs(&dir)?;
        Ok(())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Row {
    fs: &'static str,
    size: u64,
    allocation: Allocation,
    latencies: Vec<Duration>,
    written: Vec<u64>,
    allocated: u64,
}

fn measure(on: &LoopFs) -> Result<Vec<Row>> {
    let pool = on.mount.join("pool");
    let store = Store::open(&[PoolSpec {
        reserve: Reserve::Bytes(0),
        ..PoolSpec::new("bench", BackendKind::Image, &pool)
    }])?;
    let mut rows = Vec::new();
    let mut n = 0;
    for size in SIZES {
        for allocation in ALLOCATIONS {
            let mut row = Row {
                fs: on.fs,
                size,
                allocation,
                latencies: Vec::new(),
                written: Vec::new(),
                allocated: 0,
            };
            for _ in 0..REPEATS {
                n += 1;
                let id = VolumeId::parse(&format!("bench-{n}"))?;
                on.sync()?;
                let before = on.written_bytes()?;
                let start = Instant::now();
                let (meta, _) = store.create(&NewVolume {
                    id: id.clone(),
                    pool: None,
                    access: AccessKind::Mount {
                        fs_type: FsType::Ext4,
                    },
                    required: size,
                    limit: 0,
                    allocation: Some(allocation),
                })?;
                row.latencies.push(start.elapsed());
                on.sync()?;
                row.written.push(on.written_bytes()? - before);
                let img = store.data_path(&meta)?;
                row.allocated = fs::metadata(&img)?.blocks() * 512;
                store.delete(&id)?;
            }
            println!(
                "  {} {} {}: p50 {:.2} ms",
                on.fs,
                human(size),
                allocation,
                ms(median(&row.latencies))
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

fn median<T: Copy + Ord>(v: &[T]) -> T {
    let mut s = v.to_vec();
    s.sort_unstable();
    s[s.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

fn render(machine: &str, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{SECTION_START}");
    let _ = writeln!(
        s,
        "## Image allocation: what reserving the blocks costs at create\n"
    );
    let _ = writeln!(s, "- Machine: {machine}");
    let _ = writeln!(
        s,
        "- Command: `make bench-alloc` (`cargo bench --locked --bench alloc`), as root"
    );
    let _ = writeln!(
        s,
        "- Date: {}",
        run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "- Setup: `Store::create` of one `image` volume (folder, image, fallocate for thick, record, every fsync) on a 24 GiB filesystem of its own on a loop device (a sparse file on the machine's disk), {REPEATS} creates per row, each deleted before the next. *Written* is what the loop device wrote for the create, read from its `stat` around a syncfs before and after: a reservation that wrote zeroes would write the volume's size.\n"
    );
    let _ = writeln!(
        s,
        "| pool fs | size | allocation | create p50 | max | written to the disk (p50) | allocated to the image |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} ms | {:.2} ms | {} | {} |",
            r.fs,
            human(r.size),
            r.allocation,
            ms(median(&r.latencies)),
            ms(*r.latencies.iter().max().unwrap_or(&Duration::ZERO)),
            human(median(&r.written)),
            human(r.allocated)
        );
    }
    // The verdict is measured, not assumed: a thick create that made the
    // disk write more than 1% of the volume wrote data, not metadata.
    let _ = writeln!(s);
    for r in rows.iter().filter(|r| r.allocation == Allocation::Thick) {
        let written = median(&r.written);
        let whole = r.allocated >= r.size;
        let metadata = written < r.size / 100;
        let _ = writeln!(
            s,
            "- {} {} thick: {} allocated, {} written: {}",
            r.fs,
            human(r.size),
            if whole { "all" } else { "**not all**" },
            human(written),
            if metadata && whole {
                "a metadata operation"
            } else {
                "**not a metadata operation**"
            }
        );
    }
    let _ = write!(s, "{SECTION_END}");
    s
}
