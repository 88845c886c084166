//! Cross-node transfer throughput: a 1 GiB volume pulled over the mutual
//! TLS stream on loopback, against `dd` copying the same file along the
//! same path.
//!
//! `make bench-transfer` runs this program, which opens a Stead store with
//! one `image` pool in a folder on the machine's disk (/var/tmp), creates a
//! thin 1 GiB volume and writes all of it with pseudo-random bytes (so that
//! every byte is data and nothing compresses), then, [`RUNS`] times each,
//! in turn:
//! - `transfer`: an in-process Pull server on 127.0.0.1 (the agent holding
//!   the volume) and `stead::transfer::pull` into a folder beside the pool
//!   (the other agent), timed from the call to its return: TLS handshake,
//!   every chunk read, checksummed, sent, checked and written, the content
//!   digest on both sides, the fsyncs, the rename;
//! - `dd`: `dd if=<image> of=<folder>/copy.img bs=1M conv=fsync`, buffered
//!   writes and one fsync at the end, as the receiver writes;
//! - `dd direct`: the same with `oflag=direct` (no page cache on the write
//!   side), for scale.
//!
//! Before every run the source's pages are dropped from the page cache
//! (posix_fadvise DONTNEED on that file only, after an fsync), so every
//! run reads it from the disk; each copy is deleted after its run. It then
//! replaces its section of docs/BENCHMARKS.md and prints it.

mod common;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stead::storage::{AccessKind, Allocation, FsType, NewVolume, PoolSpec, Store, VolumeId};
use stead::transfer::{self, Options, SourceRef, TransferService, TrustDir, certs};

use common::Result;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Runs per method; the figures are medians.
const RUNS: usize = 3;
const SECTION_START: &str = "<!-- bench-transfer:start (written by benches/transfer.rs) -->";
const SECTION_END: &str = "<!-- bench-transfer:end -->";

fn main() -> Result<()> {
    // `cargo test --benches` runs bench binaries without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benches/transfer: run it with `make bench-transfer`");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench())
}

struct Row {
    method: &'static str,
    command: String,
    times: Vec<Duration>,
    /// CPU seconds (user + system) each run took: this process's for a
    /// transfer (both ends), dd's for dd.
    cpu: Vec<f64>,
    note: String,
}

/// CPU seconds (user + system) used so far by this process and by its
/// waited-for children, from /proc/self/stat.
fn cpu_seconds(tick: f64) -> Result<(f64, f64)> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    let after = stat.rsplit_once(") ").map(|(_, a)| a).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0.0))
        .collect();
    // Fields 14-17 of proc(5): utime, stime, cutime, cstime; `after`
    // starts at field 3.
    let get = |i: usize| f.get(i - 3).copied().unwrap_or(0.0) / tick;
    Ok((get(14) + get(15), get(16) + get(17)))
}

async fn bench() -> Result<()> {
    let machine = common::Machine::read()?.with_load();
    println!("bench-transfer: {machine}");
    let root = tempfile::Builder::new()
        .prefix("stead-bench-transfer-")
        .tempdir_in("/var/tmp")?;
    let disk = disk_of(root.path());
    let spec: PoolSpec = format!("img:image:{}:reserve=0", root.path().join("pool").display())
        .parse()
        .map_err(|e: String| e)?;
    let store = Arc::new(Store::open(&[spec])?);
    let id = VolumeId::parse("bench-transfer")?;
    let (meta, _) = store.create(&NewVolume {
        id: id.clone(),
        pool: None,
        access: AccessKind::Mount {
            fs_type: FsType::Ext4,
        },
        required: GIB,
        limit: 0,
        allocation: Some(Allocation::Thin),
    })?;
    let src = store.data_path(&meta)?;
    fill(&src)?;
    let into = root.path().join("other-node");
    fs::create_dir(&into)?;

    let trust_dir = root.path().join("trust");
    certs::generate(transfer::DEFAULT_SERVER_NAME, 1)?.write_to(&trust_dir)?;
    let trust = Arc::new(TrustDir::open(&trust_dir, transfer::DEFAULT_SERVER_NAME)?);
    let listener = transfer::server::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(transfer::serve(
        listener,
        TransferService::new(store.clone()),
        trust.clone(),
        async {
            let _ = stopped.await;
        },
    ));

    let source = SourceRef::Volume(id);
    let target = into.join("disk.img");
    let copy = into.join("copy.img");
    let mut transfer_row = Row {
        method: "transfer",
        command: "`stead::transfer::pull` over mutual TLS 1.3 on 127.0.0.1".into(),
        times: Vec::new(),
        cpu: Vec::new(),
        note: String::new(),
    };
    let dd_args = |extra: &str| {
        format!(
            "if={} of={} bs=1M conv=fsync{extra}",
            src.display(),
            copy.display()
        )
    };
    let mut dd_row = Row {
        method: "dd",
        command: "`dd bs=1M conv=fsync`".into(),
        times: Vec::new(),
        cpu: Vec::new(),
        note: String::new(),
    };
    let mut direct_row = Row {
        method: "dd direct",
        command: "`dd bs=1M conv=fsync oflag=direct`".into(),
        times: Vec::new(),
        cpu: Vec::new(),
        note: String::new(),
    };
    let tick: f64 = run(Command::new("getconf").arg("CLK_TCK"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(100.0);
    let mut wire_total = 0;
    for run in 0..RUNS {
        drop_cache(&src)?;
        let wire = Arc::new(AtomicU64::new(0));
        let options = Options {
            wire_bytes: Some(wire.clone()),
            ..Options::default()
        };
        let (cpu0, _) = cpu_seconds(tick)?;
        let t = Instant::now();
        let report = transfer::pull(&addr, &trust, &source, &target, &options).await?;
        let took = t.elapsed();
        transfer_row.cpu.push(cpu_seconds(tick)?.0 - cpu0);
        if report.received_bytes != GIB {
            return Err(format!("run {run}: received {} bytes", report.received_bytes).into());
        }
        wire_total = wire.load(Ordering::Relaxed);
        println!("transfer run {run}: {took:?} ({} on the wire)", wire_total);
        transfer_row.times.push(took);
        fs::remove_file(&target)?;

        for (row, extra) in [(&mut dd_row, ""), (&mut direct_row, " oflag=direct")] {
            drop_cache(&src)?;
            let args = dd_args(extra);
            let (_, cpu0) = cpu_seconds(tick)?;
            let t = Instant::now();
            let out = Command::new("dd")
                .args(args.split(' '))
                .stderr(std::process::Stdio::null())
                .status()?;
            let took = t.elapsed();
            if !out.success() {
                return Err(format!("dd {args}: {out}").into());
            }
            println!("{} run {run}: {took:?}", row.method);
            row.times.push(took);
            row.cpu.push(cpu_seconds(tick)?.1 - cpu0);
            fs::remove_file(&copy)?;
        }
    }
    transfer_row.note = format!(
        "{:.1} MiB on the wire for 1024 MiB of data (TLS records, HTTP/2 frames, chunk headers)",
        wire_total as f64 / MIB as f64
    );
    let _ = stop.send(());
    let _ = server.await;
    let section = render(&machine, &disk, &[transfer_row, dd_row, direct_row]);
    common::write_section(SECTION_START, SECTION_END, &section)?;
    println!("{section}");
    Ok(())
}

/// Writes all of `path` (1 GiB) with pseudo-random bytes and fsyncs it.
fn fill(path: &Path) -> Result<()> {
    let f = File::options().write(true).open(path)?;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut pos = 0;
    while pos < GIB {
        for word in buf.chunks_exact_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            word.copy_from_slice(&seed.to_le_bytes());
        }
        f.write_all_at(&buf, pos)?;
        pos += buf.len() as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Drops the source's pages from the page cache (clean after the fsync at
/// fill time), so that every run reads it from the disk.
fn drop_cache(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    Ok(())
}

fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t[t.len() / 2]
}

fn median_f(v: &[f64]) -> f64 {
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    t.get(t.len() / 2).copied().unwrap_or(0.0)
}

fn mbps(d: Duration) -> f64 {
    GIB as f64 / 1e6 / d.as_secs_f64()
}

fn run(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The filesystem and device under `path`.
fn disk_of(path: &Path) -> String {
    let fs = run(Command::new("findmnt")
        .args(["-no", "FSTYPE,SOURCE", "-T"])
        .arg(path))
    .unwrap_or_default();
    let dev = fs.split_whitespace().nth(1).unwrap_or("").to_owned();
    let model = run(Command::new("lsblk")
        .args(["-dno", "SIZE,ROTA,MODEL"])
        .arg(&dev))
    .unwrap_or_default();
    format!(
        "{} on {dev} ({}), folder {}",
        fs.split_whitespace().next().unwrap_or("?"),
        if model.is_empty() {
            "no lsblk data".into()
        } else {
            format!("lsblk SIZE ROTA MODEL: {model}")
        },
        PathBuf::from("/var/tmp").display()
    )
}

fn render(machine: &str, disk: &str, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{SECTION_START}");
    let _ = writeln!(
        s,
        "## Cross-node transfer: a 1 GiB volume over the TLS stream against `dd`\n"
    );
    let _ = writeln!(s, "- Machine: {machine}");
    let _ = writeln!(s, "- Disk: {disk}");
    let _ = writeln!(
        s,
        "- Command: `make bench-transfer` (`cargo bench --locked --bench transfer`), as root"
    );
    let _ = writeln!(
        s,
        "- Date: {}",
        run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "- Setup: one `image` pool in a folder on that disk; a thin 1 GiB volume written whole with pseudo-random bytes and fsync'd (every byte is data, so nothing is skipped as a hole). Each run copies its image into another folder of the same disk: *transfer* is `stead::transfer::pull` from an in-process Pull server on 127.0.0.1 (both ends in one process, on the same 2 cores), timed from the call to its return (TLS handshake, 1 MiB chunks each with its BLAKE3, the content digest on both sides, a checkpoint every 64 MiB, the final fsyncs and rename); *dd* copies the same file to the same folder with `bs=1M conv=fsync` (buffered writes and one fsync, as the receiver writes), and `oflag=direct` for scale. Before every run the source's pages are dropped from the page cache (fsync, then `posix_fadvise(DONTNEED)` on that file only), so each run reads it from the disk; each copy is deleted after its run. {RUNS} runs of each, interleaved; MB = 10^6 bytes.\n"
    );
    let _ = writeln!(
        s,
        "| method | command | median | min–max of {RUNS} | throughput (median) | CPU time (median) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in rows {
        let mut t = r.times.clone();
        t.sort();
        let (lo, hi) = (t.first().copied(), t.last().copied());
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} s | {:.2} s–{:.2} s | {:.0} MB/s | {:.2} s |",
            r.method,
            r.command,
            median(&r.times).as_secs_f64(),
            lo.unwrap_or_default().as_secs_f64(),
            hi.unwrap_or_default().as_secs_f64(),
            mbps(median(&r.times)),
            median_f(&r.cpu),
        );
    }
    let ratio = mbps(median(&rows[0].times)) / mbps(median(&rows[1].times));
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "- transfer / dd (conv=fsync): {:.0}% of the loopback copy rate; {}",
        ratio * 100.0,
        rows[0].note
    );
    let _ = writeln!(
        s,
        "- CPU time is user + system of this process for a transfer (sender and receiver together: reading, BLAKE3 of every chunk and the content digest on each side, TLS, HTTP/2, protobuf) and of `dd` for dd (its reads and writes; the kernel's writeback of the page cache is charged to neither). With the load average above the core count the transfer, which needs the CPU, waits for it; `dd` mostly waits for the disk."
    );
    let _ = writeln!(s, "{SECTION_END}");
    s
}
