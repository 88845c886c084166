//! A full disk corrupts nothing: each test runs the real agent on a small
//! filesystem of its own (a loop device), fills it with a writer that is
//! not Stead, and looks at what each kind of volume does then: a thick
//! image still takes writes up to its size and checks clean, a thin one
//! fails them and its stats say why, a `dir` volume on btrfs stops at its
//! own size while its neighbours go on, and every record survives a
//! restart.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use stead::proto::csi::v1::*;

const CHUNK: usize = 1 << 20;

fn pool_spec(name: &str, backend: &str, root: &Path, extra: &str) -> String {
    format!(
        "{name}:{backend}:{}{extra}",
        root.join("pools").join(name).display()
    )
}

/// The byte at `offset` of the files the tests write: never all zeroes, so
/// that a lost block reads back wrong.
fn pattern(offset: u64) -> u8 {
    (offset / 4096 % 251) as u8 ^ (offset % 7) as u8 ^ 0x5a
}

/// Writes `n` bytes of [`pattern`] to the new file `path` and fsyncs it:
/// the bytes written, or the error and how many bytes write(2) had taken.
fn write_file(path: &Path, n: u64) -> Result<u64, (io::Error, u64)> {
    let mut f = File::create(path).map_err(|e| (e, 0))?;
    let mut done = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while done < n {
        let len = CHUNK.min((n - done) as usize);
        for (i, b) in buf[..len].iter_mut().enumerate() {
            *b = pattern(done + i as u64);
        }
        f.write_all(&buf[..len]).map_err(|e| (e, done))?;
        done += len as u64;
    }
    f.sync_all().map_err(|e| (e, done))?;
    Ok(done)
}

/// Whether `path` holds exactly `n` bytes of [`pattern`].
fn holds_pattern(path: &Path, n: u64) -> bool {
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let got = f.read(&mut buf).unwrap();
        if got == 0 {
            return at == n;
        }
        if buf[..got]
            .iter()
            .enumerate()
            .any(|(i, &b)| b != pattern(at + i as u64))
        {
            return false;
        }
        at += got as u64;
    }
}

/// A writer that is not Stead fills the filesystem of `dir` until it
/// refuses even 4 KiB; returns its file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("foreign-filler");
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    for size in [CHUNK, 64 << 10, 4096] {
        let buf = vec![0xa5u8; size];
        while f.write_all(&buf).is_ok() {}
    }
    // Delayed allocation may still fail here; the pool is full either way.
    let _ = f.sync_all();
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let left = st.blocks_available() * st.fragment_size();
    assert!(left < 1 << 20, "the filler left {left} bytes free");
    path
}

/// An agent on a fresh `fs` of `mib` MiB, with one pool of `backend` named
/// after it and no reserve (what the tests fill is the pool's own room).
async fn agent_on(test: &str, fs: &str, mib: u64, backend: &str) -> Agent {
    Agent::start_on_fs(test, fs, mib, |root| {
        pool_spec(backend, backend, root, ":reserve=0")
    })
    .await
}

/// Runs a filesystem checker that only reads (`e2fsck -fn`,
/// `xfs_repair -n`) on an image and asserts it found nothing to repair.
fn assert_checks_clean(tool: &str, args: &[&str], image: &Path) {
    let out = Command::new(tool).args(args).arg(image).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?} {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn with_allocation(mut req: CreateVolumeRequest, allocation: &str) -> CreateVolumeRequest {
    req.parameters
        .insert("allocation".to_owned(), allocation.to_owned());
    req
}

fn bytes_used(s: &NodeGetVolumeStatsResponse) -> i64 {
    s.usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .map(|u| u.used)
        .unwrap_or(-1)
}

fn image_of(a: &Agent, pool: &str, id: &str) -> PathBuf {
    a.root.join("pools").join(pool).join(id).join("disk.img")
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

#[tokio::test]
async fn a_full_ext4_pool_fails_no_write_into_a_thick_image_and_a_thin_one_says_why() {
    let mut a = agent_on("full-ext4", "ext4", 320, "image").await;
    let cap = mount_cap("ext4");
    let thick = a
        .create_with(with_allocation(
            create_req("pvc-thick", "image", cap.clone(), 64 * MIB),
            "thick",
        ))
        .await;
    let thin = a
        .create_with(with_allocation(
            create_req("pvc-thin", "image", cap.clone(), 64 * MIB),
            "thin",
        ))
        .await;
    assert_eq!(thick.volume_context["allocation"], "thick");
    assert_eq!(thin.volume_context["allocation"], "thin");
    assert!(allocated(&image_of(&a, "image", "pvc-thick")) >= 64 * MIB as u64);
    assert!(allocated(&image_of(&a, "image", "pvc-thin")) < MIB as u64);

    let thick_at = a.mount("pvc-thick", &cap).await;
    let thin_at = a.mount("pvc-thin", &cap).await;
    let filler = fill(&a.root);

    // The thick volume has its blocks: 48 MiB go in and come back.
    let n = 48 * MIB as u64;
    write_file(&thick_at.join("data"), n).expect("a thick volume takes writes on a full pool");
    assert!(holds_pattern(&thick_at.join("data"), n));
    let s = a.stats("pvc-thick", &thick_at).await;
    assert!(!s.volume_condition.as_ref().unwrap().abnormal, "{s:?}");

    // The thin one cannot: the loop device gets ENOSPC from the pool and
    // its filesystem sees I/O errors.
    let Err((e, _)) = write_file(&thin_at.join("data"), n) else {
        panic!("48 MiB went into a thin volume on a full pool");
    };
    assert!(
        matches!(
            e.raw_os_error(),
            Some(libc::EIO | libc::ENOSPC | libc::EROFS)
        ),
        "{e}"
    );
    let s = a.stats("pvc-thin", &thin_at).await;
    let cond = s.volume_condition.unwrap();
    assert!(cond.abnormal, "a thin volume on a full pool is abnormal");
    assert!(
        cond.message.contains("thin image") && cond.message.contains("pool image"),
        "{}",
        cond.message
    );

    // Nothing new is promised from a full pool, and nothing is left of it.
    let e = a
        .controller
        .create_volume(create_req("pvc-late", "image", cap.clone(), 16 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(!a.root.join("pools/image/pvc-late").exists());

    // Teardown works on the full pool; the thick image checks clean.
    a.unmount("pvc-thick").await;
    a.unmount("pvc-thin").await;
    assert_checks_clean("e2fsck", &["-f", "-n"], &image_of(&a, "image", "pvc-thick"));

    // Every record survived: a restarted agent serves both volumes, and
    // the thick one's data is all there.
    a.restart().await;
    let listed = a
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["pvc-thick", "pvc-thin"]);
    fs::remove_file(filler).unwrap();
    let at = a.mount("pvc-thick", &cap).await;
    assert!(holds_pattern(&at.join("data"), n));
    a.unmount("pvc-thick").await;
}

#[tokio::test]
async fn a_thick_xfs_volume_on_a_full_xfs_pool_takes_its_size_and_repairs_clean() {
    let mut a = agent_on("full-xfs", "xfs", 720, "image").await;
    let cap = mount_cap("xfs");
    // No allocation parameter: thick is the default.
    let v = a
        .create_with(create_req("pvc-x", "image", cap.clone(), 320 * MIB))
        .await;
    assert_eq!(v.volume_context["allocation"], "thick");
    let at = a.mount("pvc-x", &cap).await;
    let filler = fill(&a.root);
    // What the volume's own filesystem says it has, nearly all of it.
    let st = nix::sys::statvfs::statvfs(&at).unwrap();
    let room = st.blocks_available() * st.fragment_size();
    let n = room - room % (CHUNK as u64) - 4 * MIB as u64;
    // (mkfs.xfs gives a small filesystem a log of 64 MiB.)
    assert!(n > 200 * MIB as u64, "{room}");
    write_file(&at.join("data"), n).expect("a thick xfs volume takes writes on a full pool");
    assert!(holds_pattern(&at.join("data"), n));
    a.unmount("pvc-x").await;
    assert_checks_clean("xfs_repair", &["-n"], &image_of(&a, "image", "pvc-x"));
    fs::remove_file(filler).unwrap();
}

/// Writes `n` bytes, expecting the filesystem to refuse them past about
/// `limit`: how far it got.
fn write_past(path: &Path, n: u64, limit: u64) -> u64 {
    match write_file(path, n) {
        Ok(_) => panic!("{n} bytes went into a volume limited to {limit}"),
        Err((e, done)) => {
            assert!(
                matches!(e.raw_os_error(), Some(libc::EDQUOT | libc::ENOSPC)),
                "{e}"
            );
            done
        }
    }
}

#[tokio::test]
async fn a_dir_volume_on_btrfs_stops_at_its_size_while_the_others_go_on() {
    let mut a = agent_on("dir-btrfs", "btrfs", 512, "dir").await;
    assert!(
        a.log().contains("enforced: a btrfs subvolume per volume"),
        "{}",
        a.log()
    );
    let cap = mount_cap("");
    let limit = 16 * MIB as u64;
    for id in ["dir-a", "dir-b"] {
        let v = a
            .create_with(create_req(id, "dir", cap.clone(), 16 * MIB))
            .await;
        assert_eq!(v.volume_context["enforced"], "true");
    }
    let at_a = a.mount("dir-a", &cap).await;
    let at_b = a.mount("dir-b", &cap).await;

    let took = write_past(&at_a.join("big"), 4 * limit, limit);
    assert!(took <= limit + MIB as u64, "{took} bytes went in");
    // Its neighbour is not touched by that.
    write_file(&at_b.join("small"), 4 * MIB as u64).expect("the other volume works");

    // Usage comes from the qgroup, which counts at the next commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = Command::new("sync").arg("-f").arg(&at_a).status();
        let used = bytes_used(&a.stats("dir-a", &at_a).await);
        if used as u64 >= limit - MIB as u64 {
            assert!(used as u64 <= limit + MIB as u64, "{used}");
            break;
        }
        assert!(Instant::now() < deadline, "usage of dir-a stays at {used}");
        // A poll with a deadline on the usage itself: btrfs updates a qgroup
        // at its next transaction commit and offers nothing to wait on.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A snapshot of a volume that is a subvolume, restored into a new one:
    // the copy is whole, and limited like any volume of the pool.
    let snap = a.snapshot("snap-b", "dir-b").await;
    let c = a
        .create_with(from_snapshot(
            create_req("dir-c", "dir", cap.clone(), 16 * MIB),
            &snap.snapshot_id,
        ))
        .await;
    assert_eq!(c.volume_context["enforced"], "true");
    let at_c = a.mount("dir-c", &cap).await;
    assert!(holds_pattern(&at_c.join("small"), 4 * MIB as u64));
    let took = write_past(&at_c.join("big"), 4 * limit, limit);
    assert!(took <= limit, "{took} bytes went in beside 4 MiB restored");

    // Deleting a volume deletes its subvolume.
    a.unmount("dir-a").await;
    a.delete("dir-a").await;
    let list = Command::new("btrfs")
        .args(["subvolume", "list", "-o"])
        .arg(&a.root)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains("dir-a"), "{list}");
    assert!(list.contains("dir-b/data"), "{list}");

    // A restarted agent serves the rest, limits and all.
    a.unmount("dir-b").await;
    a.unmount("dir-c").await;
    a.restart().await;
    let at_b = a.mount("dir-b", &cap).await;
    assert!(holds_pattern(&at_b.join("small"), 4 * MIB as u64));
    write_past(&at_b.join("big"), 4 * limit, limit);
    // Expanded, it takes more, up to its new size.
    a.controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "dir-b".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 * limit as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    fs::remove_file(at_b.join("big")).unwrap();
    // The qgroup lets go of what was removed at the next commit.
    Command::new("sync").arg("-f").arg(&at_b).status().unwrap();
    let took = write_past(&at_b.join("big"), 4 * limit, 2 * limit);
    assert!(took > limit && took <= 2 * limit, "{took}");
    a.unmount("dir-b").await;
}

#[tokio::test]
async fn a_dir_pool_on_xfs_without_kernel_quota_is_accounted_not_enforced() {
    let mut a = agent_on("dir-xfs", "xfs", 512, "dir").await;
    let v = a
        .create_with(create_req("dir-x", "dir", mount_cap(""), 16 * MIB))
        .await;
    assert_eq!(v.volume_context["enforced"], "false");
    let log = a.log();
    assert!(log.contains("capacity accounted, not enforced"), "{log}");
    if !Path::new("/proc/fs/xfs/xqm").exists() {
        assert!(log.contains("CONFIG_XFS_QUOTA"), "{log}");
    }
}

#[tokio::test]
async fn a_pool_keeps_its_reserve_free() {
    let mut a = Agent::start_on_fs("reserve", "ext4", 256, |root| {
        format!(
            "{},{}",
            pool_spec("none", "image", root, ":reserve=0"),
            pool_spec("half", "image", root, ":reserve=50%")
        )
    })
    .await;
    let none = a.available("none").await;
    let half = a.available("half").await;
    let st = nix::sys::statvfs::statvfs(&a.root).unwrap();
    let size = (st.blocks() * st.fragment_size()) as i64;
    // Between the two calls the filesystem may have changed by a block or
    // two (the agent's socket, a journal commit).
    assert!(
        (none - half - size / 2).abs() <= 64 << 10,
        "{none} {half} {size}"
    );
    // A volume that would eat into the reserve is refused by name.
    let e = a
        .controller
        .create_volume(create_req("pvc-r", "half", mount_cap(""), half + 16 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("pool half"), "{e}");
}

#[tokio::test]
async fn an_agent_whose_log_is_on_the_full_disk_goes_on_serving() {
    let mut a = Agent::start_on_fs_logging(
        "full-log",
        "ext4",
        128,
        |root| pool_spec("dir", "dir", root, ":reserve=0"),
        true,
    )
    .await;
    let cap = mount_cap("");
    a.create("dir-l", "dir", cap.clone(), 16 * MIB).await;
    let at = a.mount("dir-l", &cap).await;
    let filler = fill(&a.root);
    // Every RPC logs a line, which the disk refuses now.
    let s = a.stats("dir-l", &at).await;
    assert!(!s.volume_condition.unwrap().abnormal);
    a.unmount("dir-l").await;
    a.delete("dir-l").await;
    fs::remove_file(filler).unwrap();
}
