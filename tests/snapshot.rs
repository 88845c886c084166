//! Snapshots, restores and clones against the real agent: data written →
//! snapshot → more writes → restore shows exactly the snapshot's content;
//! consistency under a running writer; what a crash leaves; capacity; the
//! refusals.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use stead::proto::csi::v1::volume_content_source::{SnapshotSource, Type, VolumeSource};
use stead::proto::csi::v1::*;
use tonic::Code;

/// Every regular file and symlink under `root`, with a hash of its content
/// (or target) and its mode: what "exactly the same content" means here.
fn checksums(root: &Path) -> BTreeMap<PathBuf, (u64, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if rel.starts_with("lost+found") {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            let mut h = DefaultHasher::new();
            if md.file_type().is_symlink() {
                fs::read_link(&p).unwrap().hash(&mut h);
            } else if md.is_dir() {
                stack.push(p.clone());
            } else {
                fs::read(&p).unwrap().hash(&mut h);
            }
            out.insert(rel, (h.finish(), md.mode()));
        }
    }
    out
}

fn write_tree(root: &Path, generation: u8) {
    fs::create_dir_all(root.join("db/wal")).unwrap();
    let block: Vec<u8> = (0..256 * 1024u32).map(|i| (i as u8) ^ generation).collect();
    fs::write(root.join("db/table"), &block).unwrap();
    fs::write(
        root.join(format!("db/wal/{generation:04}")),
        [generation; 4096],
    )
    .unwrap();
    fs::write(root.join("token"), format!("generation {generation}")).unwrap();
    let _ = fs::remove_file(root.join("current"));
    std::os::unix::fs::symlink(format!("db/wal/{generation:04}"), root.join("current")).unwrap();
    fs::set_permissions(root.join("db/table"), fs::Permissions::from_mode(0o640)).unwrap();
    for f in [root.join("db/table"), root.join("token")] {
        fs::File::open(f).unwrap().sync_all().unwrap();
    }
}

fn snapshot_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn from_snapshot(mut req: CreateVolumeRequest, snap: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.into(),
        })),
    });
    req
}

/// The same request for exactly its required size (limit_bytes = required_bytes).
fn exact(mut req: CreateVolumeRequest) -> CreateVolumeRequest {
    if let Some(range) = req.capacity_range.as_mut() {
        range.limit_bytes = range.required_bytes;
    }
    req
}

fn from_volume(mut req: CreateVolumeRequest, vol: &str) -> CreateVolumeRequest {
    req.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: vol.into(),
        })),
    });
    req
}

impl Agent {
    async fn snapshot(&mut self, name: &str, source: &str) -> Snapshot {
        self.controller
            .create_snapshot(snapshot_req(name, source))
            .await
            .unwrap_or_else(|e| panic!("CreateSnapshot {name}: {e}"))
            .into_inner()
            .snapshot
            .unwrap()
    }

    async fn create_with(&mut self, req: CreateVolumeRequest) -> Volume {
        let name = req.name.clone();
        self.controller
            .create_volume(req)
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .unwrap()
    }

    async fn delete_snapshot(&mut self, id: &str) {
        self.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("DeleteSnapshot {id}: {e}"));
    }

    /// Stages and publishes `id`, returning its target path.
    async fn mount(&mut self, id: &str, cap: &VolumeCapability) -> PathBuf {
        let staging = self.staging(id);
        let target = self.target(id);
        self.stage(id, &staging, cap.clone()).await;
        self.publish(id, &staging, &target, cap.clone(), false)
            .await
            .unwrap();
        target
    }

    async fn unmount(&mut self, id: &str) {
        let staging = self.staging(id);
        let target = self.target(id);
        self.unpublish(id, &target).await;
        self.unstage(id, &staging).await;
    }

    async fn available(&mut self, pool: &str) -> i64 {
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

    fn snapshot_record(&self, pool: &str, id: &str) -> serde_json::Value {
        let path = self
            .root
            .join("pools")
            .join(pool)
            .join(".snapshots")
            .join(id)
            .join("snapshot.json");
        serde_json::from_slice(&fs::read(&path).unwrap()).unwrap()
    }
}

/// Written → snapshot (taken while published, so frozen for an image) →
/// more writes → restore (twice the size) shows exactly the snapshot's
/// content; the source deleted, the snapshot still restores.
async fn restore_shows_the_snapshot(a: &mut Agent, pool: &str, fs_type: &str, method: &str) {
    let cap = mount_cap(fs_type);
    let size = if fs_type == "xfs" {
        320 * MIB
    } else {
        64 * MIB
    };
    a.create("pvc-src", pool, cap.clone(), size).await;
    let src = a.mount("pvc-src", &cap).await;
    write_tree(&src, 1);
    let at_snapshot = checksums(&src);

    let snap = a.snapshot("snap-1", "pvc-src").await;
    assert_eq!(snap.source_volume_id, "pvc-src");
    assert!(snap.ready_to_use);
    assert!(snap.size_bytes >= size, "{snap:?}");
    assert!(snap.creation_time.is_some());
    assert_eq!(a.snapshot_record(pool, "snap-1")["method"], method);
    // Idempotent by name; another source under that name is refused.
    assert_eq!(a.snapshot("snap-1", "pvc-src").await, snap);
    let other = a
        .controller
        .create_snapshot(snapshot_req("snap-1", "pvc-other"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists, "{other:?}");

    write_tree(&src, 2);
    assert_ne!(checksums(&src), at_snapshot);

    let restore = create_req("pvc-restore", pool, cap.clone(), 2 * size);
    let vol = a
        .create_with(from_snapshot(restore.clone(), "snap-1"))
        .await;
    assert!(vol.capacity_bytes >= 2 * size);
    assert!(matches!(
        vol.content_source.and_then(|c| c.r#type),
        Some(Type::Snapshot(SnapshotSource { snapshot_id })) if snapshot_id == "snap-1"
    ));
    // Idempotent by name, with the same source.
    a.create_with(from_snapshot(restore, "snap-1")).await;
    let restored = a.mount("pvc-restore", &cap).await;
    assert_eq!(checksums(&restored), at_snapshot);
    if pool == "image" {
        // Grown like an expansion: the filesystem fills the larger volume.
        assert!(df_size(&restored) > size as u64, "{}", df_size(&restored));
    }
    a.unmount("pvc-restore").await;
    a.delete("pvc-restore").await;

    // The source goes; its snapshot stays valid.
    a.unmount("pvc-src").await;
    a.delete("pvc-src").await;
    a.create_with(from_snapshot(
        create_req("pvc-again", pool, cap.clone(), size),
        "snap-1",
    ))
    .await;
    let again = a.mount("pvc-again", &cap).await;
    assert_eq!(checksums(&again), at_snapshot);
    a.unmount("pvc-again").await;
    a.delete("pvc-again").await;

    a.delete_snapshot("snap-1").await;
    a.delete_snapshot("snap-1").await; // idempotent
    let pool_dir = a.root.join("pools").join(pool);
    assert_eq!(
        fs::read_dir(pool_dir.join(".snapshots")).unwrap().count(),
        0
    );
    let left: Vec<_> = fs::read_dir(&pool_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".snapshots")
        .collect();
    assert!(left.is_empty(), "left in the pool: {left:?}");
}

#[tokio::test]
async fn an_image_restore_shows_exactly_the_snapshot_on_a_copy_pool() {
    let mut a = Agent::start("snap-img").await;
    restore_shows_the_snapshot(&mut a, "image", "ext4", "copy").await;
}

#[tokio::test]
async fn an_image_restore_shows_exactly_the_snapshot_on_a_reflink_pool() {
    let mut a = Agent::start_on_xfs("snap-img-xfs").await;
    restore_shows_the_snapshot(&mut a, "image", "xfs", "reflink").await;
}

#[tokio::test]
async fn a_dir_restore_shows_exactly_the_snapshot() {
    let mut a = Agent::start("snap-dir").await;
    restore_shows_the_snapshot(&mut a, "dir", "", "copy").await;
}

#[tokio::test]
async fn a_dir_restore_shows_exactly_the_snapshot_on_a_reflink_pool() {
    let mut a = Agent::start_on_xfs("snap-dir-xfs").await;
    restore_shows_the_snapshot(&mut a, "dir", "", "reflink").await;
}

/// A clone of a published volume has its content at the moment of the
/// clone; later writes to either stay their own.
#[tokio::test]
async fn a_clone_is_a_copy_of_the_live_volume() {
    let mut a = Agent::start("clone").await;
    for (pool, fs_type) in [("image", "ext4"), ("dir", "")] {
        let cap = mount_cap(fs_type);
        let src_id = format!("pvc-src-{pool}");
        let clone_id = format!("pvc-clone-{pool}");
        a.create(&src_id, pool, cap.clone(), 64 * MIB).await;
        let src = a.mount(&src_id, &cap).await;
        write_tree(&src, 7);
        let before = checksums(&src);
        let vol = a
            .create_with(from_volume(
                create_req(&clone_id, pool, cap.clone(), 64 * MIB),
                &src_id,
            ))
            .await;
        assert!(matches!(
            vol.content_source.and_then(|c| c.r#type),
            Some(Type::Volume(VolumeSource { volume_id })) if volume_id == src_id
        ));
        let clone = a.mount(&clone_id, &cap).await;
        assert_eq!(checksums(&clone), before);
        write_tree(&clone, 8);
        assert_eq!(
            checksums(&src),
            before,
            "the source is not touched by the clone's writes"
        );
        a.unmount(&clone_id).await;
        a.unmount(&src_id).await;
        a.delete(&clone_id).await;
        a.delete(&src_id).await;
    }
}

/// A request whose range only asks for less than its source (required
/// below it, no limit) gets a copy of the source's size, as Kubernetes asks
/// when the source claim's volume was rounded up: here a 1 MiB claim whose
/// ext4 volume holds 16 MiB, then a restore and a clone asking 1 MiB.
#[tokio::test]
async fn a_copy_asking_less_than_its_source_gets_the_sources_size() {
    let mut a = Agent::start("copy-size").await;
    let cap = mount_cap("ext4");
    let src = a.create("pvc-src", "image", cap.clone(), MIB).await;
    assert_eq!(src.capacity_bytes, 16 * MIB, "ext4's floor");
    let target = a.mount("pvc-src", &cap).await;
    write_tree(&target, 3);
    let want = checksums(&target);
    a.unmount("pvc-src").await;
    a.snapshot("snap", "pvc-src").await;

    for (id, req) in [
        (
            "pvc-restore",
            from_snapshot(create_req("pvc-restore", "image", cap.clone(), MIB), "snap"),
        ),
        (
            "pvc-clone",
            from_volume(
                create_req("pvc-clone", "image", cap.clone(), MIB),
                "pvc-src",
            ),
        ),
    ] {
        let vol = a.create_with(req).await;
        assert_eq!(vol.capacity_bytes, 16 * MIB, "{id}: the source's size");
        let copy = a.mount(id, &cap).await;
        assert_eq!(checksums(&copy), want, "{id}: the source's data");
        a.unmount(id).await;
        a.delete(id).await;
    }
    a.delete_snapshot("snap").await;
    a.delete("pvc-src").await;
}

/// A snapshot taken while a writer appends and fsyncs restores to a
/// filesystem that fsck finds clean, holding a prefix of what was written.
#[tokio::test]
async fn a_snapshot_under_a_running_writer_restores_to_a_clean_filesystem() {
    let mut a = Agent::start("snap-writer").await;
    let cap = mount_cap("ext4");
    a.create("pvc-busy", "image", cap.clone(), 64 * MIB).await;
    let target = a.mount("pvc-busy", &cap).await;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, target) = (stop.clone(), written.clone(), target.clone());
        std::thread::spawn(move || {
            let mut log = fs::File::create(target.join("log")).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let dir = target.join(format!("d{}", n % 16));
                fs::create_dir_all(&dir).unwrap();
                fs::write(dir.join(format!("f{n}")), [n as u8; 1024]).unwrap();
                writeln!(log, "record {n}").unwrap();
                log.sync_data().unwrap();
                n += 1;
                written.store(n, Ordering::SeqCst);
            }
        })
    };
    // Snapshot once the writer is well under way (a condition, not a time).
    while written.load(Ordering::SeqCst) < 200 {
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
    a.snapshot("snap-busy", "pvc-busy").await;
    let at_snapshot = written.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    a.create_with(from_snapshot(
        create_req("pvc-calm", "image", cap.clone(), 64 * MIB),
        "snap-busy",
    ))
    .await;
    let img = fs::read_dir(a.image_pool())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("pvc-calm")
        })
        .unwrap()
        .join("disk.img");
    // Clean as after a crash: the journal replays (-p), then a forced check
    // must find nothing to fix.
    let replay = Command::new("e2fsck")
        .args(["-p"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(replay.code().unwrap_or(8) < 4, "e2fsck -p {replay:?}");
    let check = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let restored = a.mount("pvc-calm", &cap).await;
    let records = fs::read_to_string(restored.join("log")).unwrap();
    let n = records.lines().count() as u64;
    assert!(
        n > 0 && n <= at_snapshot,
        "{n} records, {at_snapshot} written at the snapshot"
    );
    for (i, line) in records.lines().enumerate() {
        assert_eq!(line, format!("record {i}"));
    }
    a.unmount("pvc-calm").await;
    a.unmount("pvc-busy").await;
}

/// A crash in the middle of a snapshot, a restore or a clone leaves a
/// folder without its record; the next start removes it, and the same
/// requests succeed again.
#[tokio::test]
async fn a_crash_in_the_middle_leaves_nothing_behind() {
    let mut a = Agent::start("snap-crash").await;
    let cap = mount_cap("");
    a.create("pvc-src", "image", cap.clone(), 16 * MIB).await;
    a.snapshot("snap-ok", "pvc-src").await;
    a.kill();
    let pool = a.image_pool();
    // A snapshot interrupted before its record: a copy, no record.
    fs::create_dir_all(pool.join(".snapshots/snap-torn")).unwrap();
    fs::write(pool.join(".snapshots/snap-torn/disk.img"), [1u8; 4096]).unwrap();
    // A snapshot interrupted while being deleted.
    fs::create_dir_all(pool.join(".snapshots/.del-snap-gone-1")).unwrap();
    // A restore interrupted after its data, before its record.
    fs::create_dir_all(pool.join("pvc-half")).unwrap();
    fs::write(pool.join("pvc-half/.restoring"), b"").unwrap();
    fs::write(pool.join("pvc-half/disk.img"), [2u8; 4096]).unwrap();
    a.restart().await;

    let listed = a
        .controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ids: Vec<_> = listed
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    assert_eq!(ids, ["snap-ok"]);
    assert!(!pool.join(".snapshots/snap-torn").exists());
    assert!(!pool.join(".snapshots/.del-snap-gone-1").exists());
    assert!(!pool.join("pvc-half").exists());
    a.snapshot("snap-torn", "pvc-src").await;
    a.create_with(from_snapshot(
        create_req("pvc-half", "image", cap, 16 * MIB),
        "snap-ok",
    ))
    .await;
}

/// What cannot be made is refused with the code the CSI spec gives, and
/// nothing is created.
#[tokio::test]
async fn impossible_restores_and_snapshots_are_refused_by_name() {
    let mut a = Agent::start("snap-refuse").await;
    let ext4 = mount_cap("ext4");
    a.create("pvc-src", "image", ext4.clone(), 64 * MIB).await;
    // Formatted ext4 at first stage.
    a.mount("pvc-src", &ext4).await;
    a.unmount("pvc-src").await;
    a.snapshot("snap", "pvc-src").await;

    let cases = [
        (
            // An exact 32 MiB: no size in range holds the 64 MiB snapshot.
            from_snapshot(
                exact(create_req("r1", "image", ext4.clone(), 32 * MIB)),
                "snap",
            ),
            Code::OutOfRange,
            "smaller",
        ),
        (
            from_snapshot(create_req("r2", "dir", ext4.clone(), 64 * MIB), "snap"),
            Code::InvalidArgument,
            "pool image",
        ),
        (
            from_snapshot(
                create_req("r3", "image", mount_cap("xfs"), 512 * MIB),
                "snap",
            ),
            Code::InvalidArgument,
            "xfs",
        ),
        (
            from_snapshot(create_req("r4", "image", block_cap(), 64 * MIB), "snap"),
            Code::InvalidArgument,
            "block",
        ),
        (
            from_snapshot(create_req("r5", "image", ext4.clone(), 64 * MIB), "no-such"),
            Code::NotFound,
            "no-such",
        ),
        (
            from_volume(create_req("r6", "image", ext4.clone(), 64 * MIB), "no-such"),
            Code::NotFound,
            "no-such",
        ),
    ];
    for (req, code, word) in cases {
        let name = req.name.clone();
        let err = a.controller.create_volume(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(word), "{name}: {}", err.message());
    }
    let no_source = a
        .controller
        .create_snapshot(snapshot_req("s2", "no-such"))
        .await
        .unwrap_err();
    assert_eq!(no_source.code(), Code::NotFound, "{no_source:?}");
    let mut with_param = snapshot_req("s3", "pvc-src");
    with_param.parameters.insert("speed".into(), "fast".into());
    let bad = a.controller.create_snapshot(with_param).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("speed"), "{}", bad.message());

    // A block volume in use on a pool that cannot reflink: no consistent copy.
    let blk = block_cap();
    a.create("pvc-blk", "image", blk.clone(), 16 * MIB).await;
    let staging = a.staging("pvc-blk");
    a.stage("pvc-blk", &staging, blk.clone()).await;
    let busy = a
        .controller
        .create_snapshot(snapshot_req("s4", "pvc-blk"))
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains("reflink"), "{}", busy.message());
    a.unstage("pvc-blk", &staging).await;
    a.snapshot("s4", "pvc-blk").await;

    let volumes: Vec<String> = fs::read_dir(a.image_pool())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        volumes
            .iter()
            .all(|v| !v.starts_with('r') || v == ".snapshots"),
        "{volumes:?}"
    );
    let snaps: Vec<String> = fs::read_dir(a.image_pool().join(".snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
}

/// A snapshot counts against its pool: on a reflink pool it promises what
/// it shares with its source; deleting it gives that back.
#[tokio::test]
async fn a_snapshot_counts_against_its_pool_until_deleted() {
    let mut a = Agent::start_on_xfs("snap-cap").await;
    let cap = mount_cap("");
    a.create("pvc-src", "dir", cap.clone(), 64 * MIB).await;
    let src = a.mount("pvc-src", &cap).await;
    fs::write(src.join("data"), vec![9u8; 32 * MIB as usize]).unwrap();
    fs::File::open(src.join("data"))
        .unwrap()
        .sync_all()
        .unwrap();
    a.unmount("pvc-src").await;
    let before = a.available("dir").await;
    a.snapshot("snap-cap", "pvc-src").await;
    let with_snapshot = a.available("dir").await;
    let taken = before - with_snapshot;
    // 32 MiB shared with the source, give or take the filesystem's own
    // metadata moving meanwhile.
    assert!(
        (30 * MIB..=34 * MIB).contains(&taken),
        "the snapshot took {taken} bytes of the pool's capacity"
    );
    a.delete_snapshot("snap-cap").await;
    let after = a.available("dir").await;
    assert!(
        (after - before).abs() < 2 * MIB,
        "before {before}, after {after}"
    );
}

#[tokio::test]
async fn list_snapshots_filters_and_pages() {
    let mut a = Agent::start("snap-list").await;
    let cap = mount_cap("");
    a.create("pvc-a", "dir", cap.clone(), 16 * MIB).await;
    a.create("pvc-b", "dir", cap.clone(), 16 * MIB).await;
    for (s, v) in [("s1", "pvc-a"), ("s2", "pvc-b"), ("s3", "pvc-a")] {
        a.snapshot(s, v).await;
    }
    let list = |req: ListSnapshotsRequest| {
        let mut c = a.controller.clone();
        async move {
            let r = c.list_snapshots(req).await.unwrap().into_inner();
            let ids: Vec<String> = r
                .entries
                .iter()
                .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
                .collect();
            (ids, r.next_token)
        }
    };
    assert_eq!(
        list(ListSnapshotsRequest {
            source_volume_id: "pvc-a".into(),
            ..Default::default()
        })
        .await
        .0,
        ["s1", "s3"]
    );
    assert_eq!(
        list(ListSnapshotsRequest {
            snapshot_id: "s2".into(),
            ..Default::default()
        })
        .await
        .0,
        ["s2"]
    );
    let (page, token) = list(ListSnapshotsRequest {
        max_entries: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(page, ["s1", "s2"]);
    let (rest, end) = list(ListSnapshotsRequest {
        starting_token: token,
        ..Default::default()
    })
    .await;
    assert_eq!((rest, end), (vec!["s3".to_string()], String::new()));
    let bad = a
        .controller
        .list_snapshots(ListSnapshotsRequest {
            starting_token: "12".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Aborted);
}

/// An agent killed while a volume's filesystem is frozen for a snapshot
/// (its marker still there) thaws it at its next start.
#[tokio::test]
async fn a_filesystem_left_frozen_by_a_killed_agent_is_thawed_at_start() {
    let mut a = Agent::start("snap-frozen").await;
    let cap = mount_cap("ext4");
    a.create("pvc-frozen", "image", cap.clone(), 64 * MIB).await;
    a.mount("pvc-frozen", &cap).await;
    let staging = a.staging("pvc-frozen");
    a.kill();
    // What the agent leaves when killed between FIFREEZE and FITHAW.
    let froze = Command::new("fsfreeze")
        .arg("-f")
        .arg(&staging)
        .status()
        .unwrap();
    assert!(froze.success(), "fsfreeze -f {}", staging.display());
    let snapshots = a.image_pool().join(".snapshots");
    fs::create_dir_all(&snapshots).unwrap();
    fs::write(snapshots.join(".freezing-pvc-frozen"), path_str(&staging)).unwrap();
    a.restart().await;
    // Thawed: unfreezing again is refused as "not frozen".
    let again = Command::new("fsfreeze")
        .arg("-u")
        .arg(&staging)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "the filesystem was still frozen after the restart"
    );
    assert!(!snapshots.join(".freezing-pvc-frozen").exists());
    a.snapshot("snap-after", "pvc-frozen").await;
    a.unmount("pvc-frozen").await;
}
