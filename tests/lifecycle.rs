//! Full volume lifecycles against the real agent, with data written and read
//! back across unpublish, unstage, restage and agent restarts.

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;

use common::*;
use stead::proto::csi::v1::*;
use tonic::Code;

/// Create → stage → publish → write → unpublish → unstage → (kill, restart)
/// → stage → publish → read back → tear down → delete, on one pool.
async fn lifecycle_keeps_data(name: &str, pool: &str, fs_type: &str) {
    let mut a = Agent::start(name).await;
    let cap = mount_cap(fs_type);
    let size = if fs_type == "xfs" {
        320 * MIB
    } else {
        64 * MIB
    };
    let vol = a.create("pvc-life", pool, cap.clone(), size).await;
    assert_eq!(vol.volume_id, "pvc-life");
    assert!(vol.capacity_bytes >= size);
    assert_eq!(
        vol.volume_context.get("pool").map(String::as_str),
        Some(pool)
    );
    assert_eq!(
        vol.accessible_topology[0]
            .segments
            .get(stead::TOPOLOGY_KEY)
            .map(String::as_str),
        Some(NODE)
    );

    let staging = a.staging("pvc-life");
    let target = a.target("pvc-life");
    a.stage("pvc-life", &staging, cap.clone()).await;
    a.publish("pvc-life", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    fs::write(target.join("hello.txt"), b"node-local data").unwrap();

    // Restart with the volume published: the agent serves it as before.
    a.restart().await;
    let stats = a.stats("pvc-life", &target).await;
    assert!(!stats.volume_condition.unwrap().abnormal);
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    assert!(stats.usage[0].total > 0);

    a.unpublish("pvc-life", &target).await;
    assert!(!target.exists(), "unpublish removes the target path");
    a.unstage("pvc-life", &staging).await;
    assert!(mounts_under(&a.root).is_empty());
    assert!(
        loops_under(&a.root).is_empty(),
        "unstage detaches the loop device"
    );

    a.restart().await;
    a.stage("pvc-life", &staging, cap.clone()).await;
    a.publish("pvc-life", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        fs::read(target.join("hello.txt")).unwrap(),
        b"node-local data"
    );

    // Deleting a volume in use is refused.
    let busy = a
        .controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-life".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");

    a.unpublish("pvc-life", &target).await;
    a.unstage("pvc-life", &staging).await;
    a.delete("pvc-life").await;
    a.delete("pvc-life").await; // idempotent
    let pool_dir = if pool == "dir" {
        a.dir_pool()
    } else {
        a.image_pool()
    };
    assert_eq!(
        fs::read_dir(pool_dir).unwrap().count(),
        0,
        "nothing left in the pool"
    );
}

#[tokio::test]
async fn dir_lifecycle_keeps_data_across_restage_and_restart() {
    lifecycle_keeps_data("life-dir", "dir", "").await;
}

#[tokio::test]
async fn image_ext4_lifecycle_keeps_data_across_restage_and_restart() {
    lifecycle_keeps_data("life-ext4", "image", "ext4").await;
}

#[tokio::test]
async fn image_xfs_lifecycle_keeps_data_across_restage_and_restart() {
    lifecycle_keeps_data("life-xfs", "image", "xfs").await;
}

#[tokio::test]
async fn agent_killed_between_every_step_serves_the_same_volume() {
    let mut a = Agent::start("killed").await;
    let cap = mount_cap("");
    a.create("pvc-k", "image", cap.clone(), 32 * MIB).await;
    a.restart().await;
    // Same name, same arguments after a restart: the same volume.
    let again = a.create("pvc-k", "image", cap.clone(), 32 * MIB).await;
    assert_eq!(again.capacity_bytes, 32 * MIB);
    let staging = a.staging("pvc-k");
    let target = a.target("pvc-k");
    a.stage("pvc-k", &staging, cap.clone()).await;
    a.restart().await;
    a.stage("pvc-k", &staging, cap.clone()).await; // idempotent after restart
    a.publish("pvc-k", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    fs::write(target.join("f"), b"x").unwrap();
    a.restart().await;
    a.publish("pvc-k", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(mounts_under(&a.root).len(), 2, "no duplicate mounts");
    a.unpublish("pvc-k", &target).await;
    a.restart().await;
    a.unpublish("pvc-k", &target).await; // idempotent
    a.unstage("pvc-k", &staging).await;
    a.restart().await;
    a.unstage("pvc-k", &staging).await;
    a.delete("pvc-k").await;
    assert!(loops_under(&a.root).is_empty());
}

#[tokio::test]
async fn reboot_like_loss_of_mounts_and_loops_is_healed_by_stage() {
    let mut a = Agent::start("reboot").await;
    let cap = mount_cap("");
    a.create("pvc-r", "image", cap.clone(), 32 * MIB).await;
    let staging = a.staging("pvc-r");
    let target = a.target("pvc-r");
    a.stage("pvc-r", &staging, cap.clone()).await;
    a.publish("pvc-r", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    fs::write(target.join("kept"), b"across reboot").unwrap();
    // A reboot: the agent dies, every mount and loop device vanishes.
    a.kill();
    release_under(&a.root);
    assert!(loops_under(&a.root).is_empty());
    a.restart().await;
    a.stage("pvc-r", &staging, cap.clone()).await;
    a.publish("pvc-r", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(fs::read(target.join("kept")).unwrap(), b"across reboot");
}

#[tokio::test]
async fn online_expansion_on_xfs_is_seen_by_df() {
    let mut a = Agent::start("grow-xfs").await;
    let cap = mount_cap("xfs");
    a.create("pvc-g", "image", cap.clone(), 320 * MIB).await;
    let staging = a.staging("pvc-g");
    let target = a.target("pvc-g");
    a.stage("pvc-g", &staging, cap.clone()).await;
    a.publish("pvc-g", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let before = df_size(&target);

    let grown = a
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-g".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 640 * MIB);
    assert!(grown.node_expansion_required);
    let r = a
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-g".into(),
            volume_path: path_str(&target),
            capacity_range: Some(CapacityRange {
                required_bytes: 640 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 640 * MIB);
    let after = df_size(&target);
    assert!(
        after > before + 250 * MIB as u64,
        "df inside the mount: {before} -> {after}"
    );
}

#[tokio::test]
async fn ext4_grows_online_or_says_why_and_grows_offline_on_restage() {
    let mut a = Agent::start("grow-ext4").await;
    let cap = mount_cap("ext4");
    a.create("pvc-e", "image", cap.clone(), 64 * MIB).await;
    let staging = a.staging("pvc-e");
    let target = a.target("pvc-e");
    a.stage("pvc-e", &staging, cap.clone()).await;
    a.publish("pvc-e", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let before = df_size(&target);
    a.controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-e".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 256 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let online = a
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-e".into(),
            volume_path: path_str(&target),
            ..Default::default()
        })
        .await;
    match online {
        Ok(_) => assert!(df_size(&target) > before + 150 * MIB as u64),
        Err(e) => {
            // Without CAP_SYS_RESOURCE the kernel refuses online ext4 growth.
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("ext4"), "{}", e.message());
            a.unpublish("pvc-e", &target).await;
            a.unstage("pvc-e", &staging).await;
            a.stage("pvc-e", &staging, cap.clone()).await;
            a.publish("pvc-e", &staging, &target, cap.clone(), false)
                .await
                .unwrap();
            assert!(
                df_size(&target) > before + 150 * MIB as u64,
                "restage grows ext4 offline"
            );
        }
    }
}

#[tokio::test]
async fn readonly_publish_refuses_writes() {
    let mut a = Agent::start("ro").await;
    for pool in ["dir", "image"] {
        let id = format!("pvc-ro-{pool}");
        let cap = mount_cap("");
        a.create(&id, pool, cap.clone(), 32 * MIB).await;
        let staging = a.staging(&id);
        let rw = a.target(&format!("{id}-rw"));
        let ro = a.target(&format!("{id}-ro"));
        a.stage(&id, &staging, cap.clone()).await;
        a.publish(&id, &staging, &rw, cap.clone(), false)
            .await
            .unwrap();
        a.publish(&id, &staging, &ro, cap.clone(), true)
            .await
            .unwrap();
        fs::write(rw.join("w"), b"writable").unwrap();
        let err = fs::write(ro.join("x"), b"nope").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{pool}: {err}");
        assert_eq!(fs::read(ro.join("w")).unwrap(), b"writable");
        // Same target, other readonly flag: incompatible.
        let e = a
            .publish(&id, &staging, &ro, cap.clone(), false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        a.unpublish(&id, &ro).await;
        a.unpublish(&id, &rw).await;
        a.unstage(&id, &staging).await;
    }
}

#[tokio::test]
async fn single_writer_volume_refuses_a_second_target() {
    use stead::proto::csi::v1::volume_capability::access_mode::Mode;
    let mut a = Agent::start("snsw").await;
    let cap = with_mode(mount_cap(""), Mode::SingleNodeSingleWriter);
    a.create("pvc-1w", "dir", cap.clone(), MIB).await;
    let staging = a.staging("pvc-1w");
    a.stage("pvc-1w", &staging, cap.clone()).await;
    let t1 = a.target("pvc-1w-a");
    let t2 = a.target("pvc-1w-b");
    a.publish("pvc-1w", &staging, &t1, cap.clone(), false)
        .await
        .unwrap();
    let e = a
        .publish("pvc-1w", &staging, &t2, cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!t2.exists());
}

#[tokio::test]
async fn block_volume_reads_back_what_was_written() {
    let mut a = Agent::start("block").await;
    let cap = block_cap();
    a.create("pvc-blk", "image", cap.clone(), 16 * MIB).await;
    let staging = a.staging("pvc-blk");
    let target = a.target("pvc-blk");
    a.stage("pvc-blk", &staging, cap.clone()).await;
    a.publish("pvc-blk", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert!(fs::metadata(&target).unwrap().file_type().is_block_device());
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    {
        let mut dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .unwrap();
        assert_eq!(dev.seek(SeekFrom::End(0)).unwrap(), 16 * MIB as u64);
        dev.seek(SeekFrom::Start(MIB as u64)).unwrap();
        dev.write_all(&pattern).unwrap();
        dev.sync_all().unwrap();
    }
    a.unpublish("pvc-blk", &target).await;
    a.unstage("pvc-blk", &staging).await;
    assert!(loops_under(&a.root).is_empty());
    a.restart().await;
    a.stage("pvc-blk", &staging, cap.clone()).await;
    a.publish("pvc-blk", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    let mut back = vec![0u8; pattern.len()];
    let mut dev = fs::File::open(&target).unwrap();
    dev.seek(SeekFrom::Start(MIB as u64)).unwrap();
    dev.read_exact(&mut back).unwrap();
    assert_eq!(back, pattern);
    drop(dev);
    a.unpublish("pvc-blk", &target).await;
    a.unstage("pvc-blk", &staging).await;
    a.delete("pvc-blk").await;
}

/// The node record is not fsynced, so a power loss may tear it. A torn
/// record is trusted as empty only once nothing of the volume is mounted;
/// while a mount is live every node RPC and DeleteVolume refuse, naming the
/// file, and the data stays.
#[tokio::test]
async fn torn_node_record_is_refused_while_mounted_and_reset_once_idle() {
    let mut a = Agent::start("torn").await;
    let cap = mount_cap("");
    a.create("pvc-torn", "dir", cap.clone(), 16 * MIB).await;
    let staging = a.staging("pvc-torn");
    let target = a.target("pvc-torn");
    a.stage("pvc-torn", &staging, cap.clone()).await;
    a.publish("pvc-torn", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    fs::write(target.join("kept"), b"through a torn record").unwrap();

    let record = fs::read_dir(a.dir_pool())
        .unwrap()
        .map(|e| e.unwrap().path().join("node.json"))
        .find(|p| p.exists())
        .expect("a node.json in the dir pool");
    a.kill();
    fs::write(&record, b"{\"staged\": {\"pa").unwrap();
    a.restart().await;

    let refused = a
        .controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-torn".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("node.json") && refused.message().contains("mounted at"),
        "{}",
        refused.message()
    );
    let refused = a
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-torn".into(),
            target_path: path_str(&target),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(
        fs::read(target.join("kept")).unwrap(),
        b"through a torn record"
    );

    // The power loss took the mounts as well: the record is reset and the
    // volume staged and published again with its data.
    a.kill();
    release_under(&a.root);
    a.restart().await;
    a.stage("pvc-torn", &staging, cap.clone()).await;
    a.publish("pvc-torn", &staging, &target, cap.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        fs::read(target.join("kept")).unwrap(),
        b"through a torn record"
    );
    assert!(a.log().contains("node record unreadable"), "{}", a.log());
    a.unpublish("pvc-torn", &target).await;
    a.unstage("pvc-torn", &staging).await;
    a.delete("pvc-torn").await;
    assert!(mounts_under(&a.root).is_empty());
}

/// The volume condition NodeGetVolumeStats gives for `id` at `path`.
async fn condition(a: &mut Agent, id: &str, path: &std::path::Path) -> VolumeCondition {
    a.stats(id, path)
        .await
        .volume_condition
        .expect("a volume condition")
}

/// What kubelet shows as the volume's condition when the node lost it
/// behind the agent's back: the publication unmounted, the data removed.
/// Each is abnormal with a message naming the volume and what is gone, and
/// the volume is still torn down and deleted cleanly afterwards.
#[tokio::test]
async fn a_volume_whose_mount_or_data_is_gone_is_reported_abnormal() {
    let mut a = Agent::start("cond").await;
    let cap = mount_cap("");
    for id in ["pvc-unmounted", "pvc-no-data"] {
        a.create(id, "dir", cap.clone(), 16 * MIB).await;
        let (staging, target) = (a.staging(id), a.target(id));
        a.stage(id, &staging, cap.clone()).await;
        a.publish(id, &staging, &target, cap.clone(), false)
            .await
            .unwrap();
        assert!(
            !condition(&mut a, id, &target).await.abnormal,
            "{id} before"
        );
    }

    // Someone unmounts the publication.
    let target = a.target("pvc-unmounted");
    nix::mount::umount(&target).unwrap();
    let cond = condition(&mut a, "pvc-unmounted", &target).await;
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("pvc-unmounted") && cond.message.contains("nothing is mounted"),
        "{cond:?}"
    );

    // Someone removes the volume's data folder on the node (the bind
    // keeps the removed folder alive, so the pod would write into nothing
    // that lasts).
    let data = fs::read_dir(a.dir_pool())
        .unwrap()
        .map(|e| e.unwrap().path().join("data"))
        .find(|d| {
            fs::read_to_string(d.parent().unwrap().join("volume.json"))
                .is_ok_and(|m| m.contains("pvc-no-data"))
        })
        .expect("the data folder of pvc-no-data");
    fs::remove_dir_all(&data).unwrap();
    let target = a.target("pvc-no-data");
    let cond = condition(&mut a, "pvc-no-data", &target).await;
    assert!(cond.abnormal, "{cond:?}");
    assert!(
        cond.message.contains("pvc-no-data") && cond.message.contains("is missing"),
        "{cond:?}"
    );

    for id in ["pvc-unmounted", "pvc-no-data"] {
        let (staging, target) = (a.staging(id), a.target(id));
        a.unpublish(id, &target).await;
        a.unstage(id, &staging).await;
        a.delete(id).await;
    }
    assert!(mounts_under(&a.root).is_empty());
    assert_eq!(fs::read_dir(a.dir_pool()).unwrap().count(), 0);
}
