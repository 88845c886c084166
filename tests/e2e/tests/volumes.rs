//! Claims beyond the seed's: a raw block device, a ReadWriteOncePod claim,
//! and the dir backend whose files sit in the pool folder on the node.

use k8s_openapi::api::{
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod},
    storage::v1::StorageClass,
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
};
use std::time::Duration;

use serde_json::json;
use stead_e2e::*;

/// A claim of `class` for `size`, with extra spec fields.
fn claim(name: &str, class: &str, size: &str, spec: serde_json::Value) -> PersistentVolumeClaim {
    let mut claim = json!({
        "metadata": { "name": name },
        "spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": size } },
        },
    });
    for (k, v) in spec.as_object().expect("spec fields").clone() {
        claim["spec"][k] = v;
    }
    from_json(claim)
}

/// A busybox pod with claim `claim` mounted at /data.
fn pod_with_claim(name: &str, claim: &str) -> Pod {
    busybox_pod(
        name,
        "",
        json!({
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": claim } }],
            "containers": [{ "volumeMounts": [{ "name": "v", "mountPath": "/data" }] }],
        }),
    )
}

async fn delete_pod(pods: &Api<Pod>, name: &str) {
    if let Some(uid) = delete(pods, name).await {
        wait_deleted(pods, name, &uid, &format!("pod {name}")).await;
    }
}

/// Deletes the claim and waits until its PV is gone.
async fn delete_claim_and_volume(scn: &Scenario, pv: &PersistentVolume) {
    let claim = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.name.clone())
        .expect("a bound PV names its claim");
    delete(&scn.api::<PersistentVolumeClaim>(), &claim).await;
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());
    let what = format!("PV {} of deleted claim {claim}", pv.name_any());
    wait_deleted(&pvs, &pv.name_any(), &pv.uid().expect("uid"), &what).await;
}

#[tokio::test]
async fn block_claim_gives_the_pod_a_raw_device_that_keeps_its_bytes() {
    let scn = Scenario::new("block").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    create(
        &pvcs,
        &claim("raw", "stead", "64Mi", json!({ "volumeMode": "Block" })),
    )
    .await;
    let device_pod = |name: &str| {
        busybox_pod(
            name,
            "",
            json!({
                "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": "raw" } }],
                "containers": [{ "volumeDevices": [{ "name": "v", "devicePath": "/dev/stead" }] }],
            }),
        )
    };

    step("a pod gets the Block claim as /dev/stead, of the requested size");
    create(&pods, &device_pod("writer")).await;
    wait_ready(&pods, "writer").await;
    let pv = volume_of(&scn.client, &wait_bound(&pvcs, "raw").await).await;
    assert_eq!(
        pv.spec.as_ref().and_then(|s| s.volume_mode.as_deref()),
        Some("Block"),
        "volumeMode of PV {}",
        pv.name_any()
    );
    let size = sh(&pods, "writer", "blockdev --getsize64 /dev/stead").await;
    let size: u64 = size
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("blockdev: {size}"));
    assert!(
        size >= 64 << 20,
        "the device holds {size} bytes, the claim asked for 64Mi"
    );

    step("bytes written to the device are read back by the next pod");
    let token = token();
    sh(
        &pods,
        "writer",
        &format!("printf {token} > /dev/stead && sync"),
    )
    .await;
    delete_pod(&pods, "writer").await;
    create(&pods, &device_pod("reader")).await;
    wait_ready(&pods, "reader").await;
    let read = sh(&pods, "reader", "head -c 32 /dev/stead").await;
    assert_eq!(read, token, "the first 32 bytes of the device");

    step("delete the pod and the claim: the PV is gone");
    delete_pod(&pods, "reader").await;
    delete_claim_and_volume(&scn, &pv).await;
    scn.finish().await;
}

#[tokio::test]
async fn read_write_once_pod_claim_is_used_by_one_pod_at_a_time() {
    let scn = Scenario::new("rwop").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let spec = json!({ "accessModes": ["ReadWriteOncePod"] });
    create(&pvcs, &claim("solo", "stead", "64Mi", spec)).await;

    step("the first pod mounts the ReadWriteOncePod claim and writes a token");
    create(&pods, &pod_with_claim("first", "solo")).await;
    wait_ready(&pods, "first").await;
    let token = token();
    sh(
        &pods,
        "first",
        &format!("echo {token} > /data/token && sync"),
    )
    .await;

    step("a second pod on the same claim is not scheduled while the first runs");
    create(&pods, &pod_with_claim("second", "solo")).await;
    let pending = wait_for(
        &pods,
        "second",
        "the scheduler to refuse pod second (claim in use, ReadWriteOncePod)",
        POD_READY,
        |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        },
    )
    .await
    .expect("pod second exists");
    let why = pending
        .status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled")
        .and_then(|c| c.message)
        .unwrap_or_default();
    assert!(
        why.contains("ReadWriteOncePod"),
        "pod second is refused for the claim: {why}"
    );

    step("once the first pod is gone, the second runs and reads the token");
    delete_pod(&pods, "first").await;
    wait_ready(&pods, "second").await;
    let read = sh(&pods, "second", "cat /data/token").await;
    assert_eq!(read.trim(), token, "the token the first pod wrote");

    let pv = volume_of(&scn.client, &wait_bound(&pvcs, "solo").await).await;
    delete_pod(&pods, "second").await;
    delete_claim_and_volume(&scn, &pv).await;
    scn.finish().await;
}

#[tokio::test]
async fn dir_class_keeps_the_files_in_the_pool_folder_on_the_node() {
    let scn = Scenario::new("dir").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    create(&pvcs, &claim("files", "stead-dir", "64Mi", json!({}))).await;

    step("a pod writes a token into its stead-dir volume");
    create(&pods, &pod_with_claim("writer", "files")).await;
    let node = node_of(&wait_ready(&pods, "writer").await);
    let token = token();
    sh(
        &pods,
        "writer",
        &format!("echo {token} > /data/token && sync"),
    )
    .await;

    step("the file is in the volume's folder in the dir pool on the node's disk");
    let pv = volume_of(&scn.client, &wait_bound(&pvcs, "files").await).await;
    assert_eq!(
        pinned_node(&pv),
        Some(node.clone()),
        "node affinity of PV {}",
        pv.name_any()
    );
    let pool = pool_of(&scn.client, "stead-dir").await;
    let disk = NodeDisk::open(&scn, &node).await;
    let handle = volume_handle(&pv);
    let dir = disk
        .volume_dir(&pool, &handle)
        .await
        .unwrap_or_else(|| panic!("volume {handle} is not in pool {pool} on node {node}"));
    let on_disk = disk.sh(&format!("cat $(find {dir} -name token)")).await;
    assert_eq!(on_disk.trim(), token, "the token file under {dir}");

    step("delete the pod and the claim: the PV and the folder are gone");
    delete_pod(&pods, "writer").await;
    delete_claim_and_volume(&scn, &pv).await;
    assert_eq!(
        disk.volume_dir(&pool, &handle).await,
        None,
        "folder of {handle} removed"
    );
    scn.finish().await;
}

/// Online growth through the agent alone (no external-resizer): xfs, which
/// grows mounted without CAP_SYS_RESOURCE (this machine's root lacks it, so
/// ext4's online resize2fs is refused here; it grows at the next stage).
#[tokio::test]
async fn growing_a_claim_grows_the_mounted_xfs_filesystem_in_place() {
    let scn = Scenario::new("grow").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let classes: Api<StorageClass> = Api::all(scn.client.clone());
    let class = format!("{}-xfs", scn.ns);
    let sc: StorageClass = from_json(json!({
        "metadata": { "name": class },
        "provisioner": DRIVER,
        "parameters": { "pool": pool_of(&scn.client, "stead").await, "csi.storage.k8s.io/fstype": "xfs" },
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": true,
    }));
    create(&classes, &sc).await;
    // xfs refuses filesystems under 300 MB.
    create(&pvcs, &claim("growing", &class, "320Mi", json!({}))).await;

    step("a pod writes a token to a 320Mi xfs volume");
    create(&pods, &pod_with_claim("app", "growing")).await;
    wait_ready(&pods, "app").await;
    let token = token();
    sh(&pods, "app", &format!("echo {token} > /data/token && sync")).await;
    let before = df_kib(&pods, "app").await;
    assert!(before < 320 * 1024, "a 320Mi filesystem: {before} KiB");

    step("the claim asks for 640Mi: its capacity and the pod's filesystem grow, the pod runs on");
    let grow = json!({ "spec": { "resources": { "requests": { "storage": "640Mi" } } } });
    pvcs.patch("growing", &PatchParams::default(), &Patch::Merge(grow))
        .await
        .expect("asking for 640Mi");
    wait_for(
        &pvcs,
        "growing",
        "claim growing to report 640Mi",
        POD_READY,
        |c: Option<&PersistentVolumeClaim>| {
            c.and_then(|c| c.status.as_ref())
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .is_some_and(|q| quantity_bytes(&q.0) >= 640 << 20)
        },
    )
    .await;
    let now = df_kib(&pods, "app").await;
    assert!(
        now > 500 * 1024,
        "the pod's /data is {now} KiB once the claim reports 640Mi"
    );
    let read = sh(&pods, "app", "cat /data/token").await;
    assert_eq!(read.trim(), token, "the token survived the growth");

    let pv = volume_of(&scn.client, &wait_bound(&pvcs, "growing").await).await;
    delete_pod(&pods, "app").await;
    delete_claim_and_volume(&scn, &pv).await;
    delete(&classes, &class).await;
    scn.finish().await;
}

/// Size in KiB of the filesystem on /data in the pod (`df -k`).
async fn df_kib(pods: &Api<Pod>, pod: &str) -> u64 {
    let out = sh(pods, pod, "df -k /data").await;
    let size = out.lines().nth(1).and_then(|l| l.split_whitespace().nth(1));
    size.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("df -k /data in {pod}: {out}"))
}

/// On a dir pool on btrfs (the bundled nodes' `dir-btrfs` disk, class
/// `stead-btrfs` of the e2e overlay) a volume is a subvolume limited to its
/// size: a pod writing past its claim gets EDQUOT or ENOSPC, and a
/// neighbour's volume on the same pool goes on taking writes.
#[tokio::test]
async fn a_dir_volume_on_btrfs_stops_its_pod_at_the_claims_size() {
    let scn = Scenario::new("btrfs").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    create(&pvcs, &claim("limited", "stead-btrfs", "64Mi", json!({}))).await;
    create(&pvcs, &claim("neighbour", "stead-btrfs", "64Mi", json!({}))).await;
    create(&pods, &pod_with_claim("filler", "limited")).await;
    let node = node_of(&wait_ready(&pods, "filler").await);
    let mut other = pod_with_claim("other", "neighbour");
    // A nodeSelector, not nodeName: the scheduler must see the pod to choose
    // its WaitForFirstConsumer claim's node.
    other.spec.as_mut().expect("a pod spec").node_selector = Some(
        [("kubernetes.io/hostname".to_string(), node.clone())]
            .into_iter()
            .collect(),
    );
    create(&pods, &other).await;
    wait_ready(&pods, "other").await;
    wait_event(
        &scn.client,
        "limited",
        "ProvisioningSucceeded",
        &["created volume"],
        Duration::from_secs(60),
    )
    .await;
    let events = events_of(&scn.client, "limited").await;
    assert!(
        !events.contains("not enforced"),
        "a btrfs dir volume is enforced: {events}"
    );

    step("the pod writes 100 MiB into its 64Mi claim: the write stops at the limit");
    let out = sh(
        &pods,
        "filler",
        "dd if=/dev/zero of=/data/big bs=1M count=100 conv=fsync 2>&1; echo rc=$?",
    )
    .await;
    assert!(
        !out.contains("rc=0") && (out.contains("quota exceeded") || out.contains("No space left")),
        "dd past the claim: {out}"
    );
    let size: u64 = sh(&pods, "filler", "stat -c %s /data/big")
        .await
        .trim()
        .parse()
        .expect("a size");
    assert!(size <= 65 << 20, "{size} bytes written into a 64Mi claim");

    step("the neighbour's volume on the same pool still takes its writes");
    let out = sh(
        &pods,
        "other",
        "dd if=/dev/zero of=/data/some bs=1M count=16 conv=fsync 2>&1; echo rc=$?",
    )
    .await;
    assert!(out.contains("rc=0"), "the neighbour's write: {out}");
    delete_pod(&pods, "filler").await;
    delete_pod(&pods, "other").await;
    scn.finish().await;
}
