//! Bad requests get precise errors and touch nothing.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use common::*;
use stead::proto::csi::v1::volume_capability::access_mode::Mode;
use stead::proto::csi::v1::*;
use tonic::Code;

const EVIL_IDS: &[&str] = &[
    "../../etc",
    "..",
    "a/b",
    "/etc/passwd",
    "nul\0byte",
    "new\nline",
];

fn snapshot(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = walk(dir);
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out
}

fn refused(code: Code) -> bool {
    matches!(code, Code::InvalidArgument | Code::NotFound)
}

#[tokio::test]
async fn evil_ids_are_refused_everywhere_and_touch_nothing() {
    let mut a = Agent::start("evil").await;
    let long = "x".repeat(129);
    let ids: Vec<String> = EVIL_IDS
        .iter()
        .map(|s| s.to_string())
        .chain([long])
        .collect();
    let before = snapshot(&a.root.join("pools"));
    let staging = a.staging("evil");
    let target = a.target("evil");
    for id in &ids {
        let e = a
            .controller
            .create_volume(create_req(id, "image", mount_cap(""), MIB))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "create {id:?}: {e:?}");
        let e = a
            .controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "delete {id:?}: {e:?}");
        let e = a
            .node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: path_str(&staging),
                volume_capability: Some(mount_cap("")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "stage {id:?}: {e:?}");
        let e = a
            .node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: path_str(&staging),
                target_path: path_str(&target),
                volume_capability: Some(mount_cap("")),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "publish {id:?}: {e:?}");
        let e = a
            .node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: path_str(&target),
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "unpublish {id:?}: {e:?}");
        let e = a
            .controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(refused(e.code()), "expand {id:?}: {e:?}");
    }
    assert_eq!(snapshot(&a.root.join("pools")), before);
    assert!(!target.exists());
    assert!(mounts_under(&a.root).is_empty());
    assert!(Path::new("/etc/passwd").exists());
}

#[tokio::test]
async fn create_refusals_name_the_field_and_leave_nothing_behind() {
    let mut a = Agent::start("refuse").await;
    let before = snapshot(&a.root.join("pools"));

    let mut req = create_req("pvc-p", "image", mount_cap(""), MIB);
    req.parameters.insert("replicas".into(), "3".into());
    let e = a.controller.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("replicas"), "{}", e.message());

    // external-provisioner's metadata parameters are accepted.
    let mut req = create_req("pvc-meta", "dir", mount_cap(""), MIB);
    req.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    a.controller.create_volume(req).await.unwrap();
    a.delete("pvc-meta").await;

    let e = a
        .controller
        .create_volume(create_req("pvc-p", "nosuchpool", mount_cap(""), MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("nosuchpool"), "{}", e.message());

    let e = a
        .controller
        .create_volume(create_req("pvc-p", "image", mount_cap("btrfs"), MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("fs_type"), "{}", e.message());

    let multi = with_mode(mount_cap(""), Mode::MultiNodeMultiWriter);
    let e = a
        .controller
        .create_volume(create_req("pvc-p", "image", multi, MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("node-local"), "{}", e.message());

    let e = a
        .controller
        .create_volume(create_req("pvc-p", "dir", block_cap(), MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "block on a dir pool");

    let mut req = create_req("pvc-p", "image", mount_cap(""), 10 * MIB);
    req.capacity_range = Some(CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: 5 * MIB,
    });
    let e = a.controller.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let e = a
        .controller
        .create_volume(create_req("pvc-p", "image", mount_cap(""), 1 << 60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    let mut req = create_req("pvc-p", "image", mount_cap(""), MIB);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([(stead::TOPOLOGY_KEY.into(), "other-node".into())]),
        }],
        preferred: vec![],
    });
    let e = a.controller.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    assert_eq!(
        snapshot(&a.root.join("pools")),
        before,
        "failed creates leave nothing"
    );
    assert!(loops_under(&a.root).is_empty());
}

#[tokio::test]
async fn same_name_with_other_size_is_already_exists() {
    let mut a = Agent::start("conflict").await;
    a.create("pvc-c", "dir", mount_cap(""), 8 * MIB).await;
    let mut req = create_req("pvc-c", "dir", mount_cap(""), 16 * MIB);
    req.capacity_range = Some(CapacityRange {
        required_bytes: 16 * MIB,
        limit_bytes: 16 * MIB,
    });
    let e = a.controller.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = a
        .controller
        .create_volume(create_req("pvc-c", "image", mount_cap(""), 8 * MIB))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "same name in another pool");
}

#[tokio::test]
async fn symlinked_or_relative_paths_are_refused() {
    let mut a = Agent::start("paths").await;
    let cap = mount_cap("");
    a.create("pvc-s", "dir", cap.clone(), MIB).await;
    let staging = a.staging("pvc-s");
    a.stage("pvc-s", &staging, cap.clone()).await;
    let link = a.root.join("pods/link");
    fs::create_dir_all(a.root.join("pods")).unwrap();
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let e = a
        .publish("pvc-s", &staging, &link, cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("symlink"), "{}", e.message());
    let e = a
        .publish(
            "pvc-s",
            &staging,
            Path::new("relative/target"),
            cap.clone(),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = a
        .publish(
            "pvc-s",
            &staging,
            &a.root.join("pods/../../escape"),
            cap.clone(),
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Unpublish through a symlink never unmounts what it points to.
    let e = a
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-s".into(),
            target_path: path_str(&link),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(mounts_under(&a.root).len(), 1, "only the staging mount");
}

#[tokio::test]
async fn socket_is_private_and_sigterm_stops_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let mut a = Agent::start("socket").await;
    let mode = fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A stale socket from a killed agent is replaced at start.
    a.restart().await;
    let info = a
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, stead::DRIVER_NAME);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let status = a.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(!a.socket.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn paths_outside_the_kubelet_dir_or_inside_a_pool_are_refused_by_name() {
    let mut a = Agent::start("confined").await;
    let cap = mount_cap("");
    a.create("pvc-k", "dir", cap.clone(), MIB).await;
    // The agent's kubelet directory is its root (STEAD_KUBELET_DIR).
    let outside = std::env::temp_dir().join(format!("stead-outside-{}", std::process::id()));
    let e = a
        .node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "pvc-k".into(),
            staging_target_path: path_str(&outside.join("staging")),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("staging_target_path"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("kubelet directory"), "{}", e.message());
    assert!(!outside.exists(), "nothing is created outside");

    let staging = a.staging("pvc-k");
    a.stage("pvc-k", &staging, cap.clone()).await;
    // A target inside a pool would mount a volume into the pools' tree.
    let in_pool = a.dir_pool().join("pvc-k-target");
    let e = a
        .publish("pvc-k", &staging, &in_pool, cap.clone(), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("target_path"), "{}", e.message());
    assert!(e.message().contains("pool"), "{}", e.message());
    assert!(!in_pool.exists());
    assert_eq!(mounts_under(&a.root).len(), 1, "only the staging mount");
}
