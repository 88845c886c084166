//! Snapshots through the cluster's VolumeSnapshot API (the
//! snapshot-controller and CRDs of external-snapshotter, the VolumeSnapshotClass
//! `stead` of deploy/snapshot): a snapshot of a StatefulSet member's volume
//! restored into a new claim, a claim cloned from another, a restore of a
//! `crossNodeRestore: refuse` class whose pod the scheduler put on another
//! node, and a deleted snapshot freeing its space.

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use stead_e2e::*;

const WAIT: Duration = Duration::from_secs(120);

fn snapshot_api(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind);
    let ar = ApiResource::from_gvk(&gvk);
    if kind == "VolumeSnapshotContent" {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), ns, &ar)
    }
}

fn claim_from(name: &str, source: serde_json::Value, size: &str) -> PersistentVolumeClaim {
    claim_of("stead", name, source, size)
}

/// [`claim_from`] of StorageClass `class`.
fn claim_of(
    class: &str,
    name: &str,
    source: serde_json::Value,
    size: &str,
) -> PersistentVolumeClaim {
    from_json(json!({
        "metadata": { "name": name },
        "spec": {
            "storageClassName": class,
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": size } },
            "dataSource": source,
        },
    }))
}

/// A pod on `node` with claim `claim` at /data.
fn reader(name: &str, claim: &str, node: &str) -> Pod {
    busybox_pod(
        name,
        "",
        json!({
            "nodeSelector": { "kubernetes.io/hostname": node },
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": claim } }],
            "containers": [{ "volumeMounts": [{ "name": "v", "mountPath": "/data" }] }],
        }),
    )
}

/// What node `node` publishes as free for class `class`.
async fn published_capacity(client: &Client, node: &str, class: &str) -> Option<u64> {
    let list = Api::<CSIStorageCapacity>::all(client.clone())
        .list(&ListParams::default())
        .await
        .ok()?;
    list.items
        .into_iter()
        .filter(|c| c.storage_class_name == class)
        .find(|c| {
            c.node_topology
                .as_ref()
                .and_then(|t| t.match_labels.as_ref())
                .is_some_and(|l| l.values().any(|v| v == node))
        })
        .and_then(|c| c.capacity)
        .map(|q| quantity_bytes(&q.0))
}

#[tokio::test]
async fn a_statefulset_members_snapshot_restores_and_a_claim_clones_on_its_node() {
    let scn = Scenario::new("snap").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let snapshots = snapshot_api(&scn.client, &scn.ns, "VolumeSnapshot");
    let contents = snapshot_api(&scn.client, &scn.ns, "VolumeSnapshotContent");

    step("the seed's StatefulSet with one replica writes its token");
    let svc: Service = example("statefulset.yaml", "Service");
    let mut sts: StatefulSet = example("statefulset.yaml", "StatefulSet");
    sts.spec.as_mut().expect("a spec").replicas = Some(1);
    create(&scn.api::<Service>(), &svc).await;
    create(&scn.api::<StatefulSet>(), &sts).await;
    wait_ready(&pods, "db-ss-0").await;
    let node = node_of(&pods.get("db-ss-0").await.expect("reading db-ss-0"));
    let token = sh(&pods, "db-ss-0", "cat /data/token").await;
    assert!(token.starts_with("db-ss-0 "), "token {token:?}");
    let free_before = published_capacity(&scn.client, &node, "stead").await;

    step("a VolumeSnapshot of db-vol-db-ss-0 becomes ready, taken by the agent of its node");
    let snap: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": { "name": "db-snap" },
        "spec": {
            "volumeSnapshotClassName": "stead",
            "source": { "persistentVolumeClaimName": "db-vol-db-ss-0" },
        },
    }));
    snapshots
        .create(&PostParams::default(), &snap)
        .await
        .expect("creating VolumeSnapshot db-snap");
    let ready = poll_until_async("VolumeSnapshot db-snap to be readyToUse", WAIT, || async {
        match snapshots.get_opt("db-snap").await {
            Ok(Some(s)) if s.data["status"]["readyToUse"] == json!(true) => Ok(s),
            Ok(s) => Err(format!(
                "status {}; events:\n{}",
                s.map(|s| s.data["status"].to_string()).unwrap_or_default(),
                events_of(&scn.client, "db-snap").await
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let content_name = ready.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .expect("a bound content")
        .to_string();
    let content = contents
        .get(&content_name)
        .await
        .expect("reading the content");
    assert_eq!(
        content.labels().get("stead.csi.dev/node"),
        Some(&node),
        "the content names the node that holds the snapshot"
    );
    let status = &content.data["status"];
    let handle = status["snapshotHandle"]
        .as_str()
        .expect("a snapshot handle")
        .to_string();
    assert!(status["creationTime"].as_i64().unwrap_or(0) > 0, "{status}");
    assert!(
        status["restoreSize"].as_u64().unwrap_or(0) >= 500 * 1024 * 1024,
        "{status}"
    );

    step("db-ss-0 writes on: a new token after the snapshot");
    sh(
        &pods,
        "db-ss-0",
        "echo 'db-ss-0 after-the-snapshot' > /data/token && sync",
    )
    .await;

    step("a claim restored from the snapshot, its pod on the snapshot's node, reads the old token");
    create(
        &pvcs,
        &claim_from(
            "db-restore",
            json!({ "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "db-snap" }),
            "500Mi",
        ),
    )
    .await;
    create(&pods, &reader("restore-reader", "db-restore", &node)).await;
    wait_ready(&pods, "restore-reader").await;
    assert_eq!(sh(&pods, "restore-reader", "cat /data/token").await, token);
    wait_event(
        &scn.client,
        "db-restore",
        "ProvisioningSucceeded",
        &["VolumeSnapshot", "db-snap"],
        WAIT,
    )
    .await;

    step("a claim cloned from db-vol-db-ss-0 holds its current data");
    create(
        &pvcs,
        &claim_from(
            "db-clone",
            json!({ "kind": "PersistentVolumeClaim", "name": "db-vol-db-ss-0" }),
            "500Mi",
        ),
    )
    .await;
    create(&pods, &reader("clone-reader", "db-clone", &node)).await;
    wait_ready(&pods, "clone-reader").await;
    assert_eq!(
        sh(&pods, "clone-reader", "cat /data/token").await.trim(),
        "db-ss-0 after-the-snapshot"
    );

    let elsewhere = schedulable_nodes(&scn.client)
        .await
        .into_iter()
        .map(|n| n.name)
        .find(|n| *n != node);
    if let Some(other) = elsewhere {
        // The default class pulls the data to the node the scheduler chose
        // (tests/e2e/tests/crossnode.rs); one that says crossNodeRestore:
        // refuse keeps it where it is.
        let refuse = format!("stead-refuse-{}", scn.ns);
        let classes: Api<StorageClass> = Api::all(scn.client.clone());
        create(
            &classes,
            &from_json(json!({
                "metadata": { "name": refuse },
                "provisioner": "stead.csi.dev",
                "parameters": { "pool": "image", "csi.storage.k8s.io/fstype": "ext4", "crossNodeRestore": "refuse" },
                "volumeBindingMode": "WaitForFirstConsumer",
                "reclaimPolicy": "Delete",
            })),
        )
        .await;
        step(&format!(
            "a restore of class {refuse} whose pod prefers {other}: the scheduler picks a node other than {node}, Stead moves the claim's node choice to {node}, the pod runs there and reads the old token"
        ));
        create(
            &pvcs,
            &claim_of(
                &refuse,
                "db-restore-steered",
                json!({ "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "db-snap" }),
                "500Mi",
            ),
        )
        .await;
        create(
            &pods,
            &busybox_pod(
                "steered-reader",
                "",
                json!({
                    "affinity": { "nodeAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "preference": { "matchExpressions": [{
                            "key": "kubernetes.io/hostname", "operator": "In", "values": [other],
                        }] },
                    }] } },
                    "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": "db-restore-steered" } }],
                    "containers": [{ "volumeMounts": [{ "name": "v", "mountPath": "/data" }] }],
                }),
            ),
        )
        .await;
        // A preference, not a rule: the scheduler may weigh other scores
        // above it and pick a third node. Whichever node it picked, the
        // event names the holder the choice moves to.
        wait_event(
            &scn.client,
            "db-restore-steered",
            "ProvisioningFailed",
            &[&format!("moved to {node}"), "crossNodeRestore: refuse"],
            WAIT,
        )
        .await;
        wait_ready(&pods, "steered-reader").await;
        assert_eq!(
            node_of(
                &pods
                    .get("steered-reader")
                    .await
                    .expect("reading steered-reader")
            ),
            node,
            "the pod runs where the data is"
        );
        assert_eq!(sh(&pods, "steered-reader", "cat /data/token").await, token);
        delete(&pods, "steered-reader").await;
        delete(&pvcs, "db-restore-steered").await;

        step(&format!(
            "a restore of class {refuse} whose pod must run on {other}: the claim says the data is on {node}, the pod stays Pending"
        ));
        create(
            &pvcs,
            &claim_of(
                &refuse,
                "db-restore-elsewhere",
                json!({ "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "db-snap" }),
                "500Mi",
            ),
        )
        .await;
        create(
            &pods,
            &reader("elsewhere-reader", "db-restore-elsewhere", &other),
        )
        .await;
        wait_event(
            &scn.client,
            "db-restore-elsewhere",
            "ProvisioningFailed",
            &[node.as_str(), other.as_str(), "does not move data"],
            WAIT,
        )
        .await;
        let pod = pods
            .get("elsewhere-reader")
            .await
            .expect("reading elsewhere-reader");
        assert_eq!(
            pod.status.and_then(|s| s.phase).as_deref(),
            Some("Pending"),
            "a pod that cannot run where its data is does not start"
        );
        delete(&pods, "elsewhere-reader").await;
        delete(&pvcs, "db-restore-elsewhere").await;
        delete(&classes, &refuse).await;
    } else {
        step("one schedulable node only: the cross-node case needs a second node");
    }

    step(
        "the snapshot counted against the pool; deleting it deletes its content and frees the space",
    );
    let disk = NodeDisk::open(&scn, &node).await;
    let pool = pool_of(&scn.client, "stead").await;
    let record = disk
        .sh(&format!(
            "cat /pools/{pool}/.snapshots/{handle}/snapshot.json"
        ))
        .await;
    let allocated = serde_json::from_str::<serde_json::Value>(&record).expect("a snapshot record")
        ["allocated_bytes"]
        .as_u64()
        .expect("allocated_bytes");
    let with_snapshot = published_capacity(&scn.client, &node, "stead").await;
    let content_uid = content.uid().expect("uid");
    delete(&snapshots, "db-snap").await;
    poll_until_async("the snapshot's content to be deleted", WAIT, || async {
        match contents.get_opt(&content_name).await {
            Ok(Some(c)) if c.uid().as_deref() == Some(content_uid.as_str()) => Err(format!(
                "still there: {}; events:\n{}",
                c.data,
                events_of(&scn.client, &content_name).await
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    poll_until_async("the snapshot folder to go", WAIT, || async {
        let left = disk
            .sh(&format!("ls /pools/{pool}/.snapshots/ 2>/dev/null || true"))
            .await;
        if left.contains(&handle) {
            Err(format!("still there: {left}"))
        } else {
            Ok(())
        }
    })
    .await;
    if let (Some(before), Some(with)) = (free_before, with_snapshot) {
        step(&format!(
            "capacity of {node}: {before} before, {with} with the snapshot ({allocated} bytes promised)"
        ));
        // The capacity object is re-published once the snapshot is gone;
        // it gives back what the snapshot held (within what the pods'
        // own writes moved meanwhile).
        poll_until_async("the capacity to come back", WAIT, || async {
            let now = published_capacity(&scn.client, &node, "stead")
                .await
                .unwrap_or(0);
            if now + allocated / 2 >= with + allocated {
                Ok(())
            } else {
                Err(format!("{now} published, {with} with the snapshot"))
            }
        })
        .await;
    }
    scn.finish().await;
}

/// deletionPolicy Retain keeps the snapshot when its VolumeSnapshot and
/// content go; a pre-provisioned content naming it (deletionPolicy Delete)
/// brings it back, is reported ready by the node that holds it, restores,
/// and deleting it deletes the snapshot.
#[tokio::test]
async fn a_retained_snapshot_outlives_its_objects_and_comes_back_pre_provisioned() {
    let scn = Scenario::new("snap-retain").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let snapshots = snapshot_api(&scn.client, &scn.ns, "VolumeSnapshot");
    let contents = snapshot_api(&scn.client, &scn.ns, "VolumeSnapshotContent");
    let classes: Api<DynamicObject> = Api::all_with(
        scn.client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "snapshot.storage.k8s.io",
            "v1",
            "VolumeSnapshotClass",
        )),
    );
    let class_name = format!("stead-retain-{}", scn.ns);
    let class: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": { "name": class_name },
        "driver": DRIVER,
        "deletionPolicy": "Retain",
    }));
    classes
        .create(&PostParams::default(), &class)
        .await
        .expect("creating the Retain VolumeSnapshotClass");

    step("a claim with a token, snapshotted with deletionPolicy Retain");
    create(
        &pvcs,
        &from_json(json!({
            "metadata": { "name": "data" },
            "spec": {
                "storageClassName": "stead",
                "accessModes": ["ReadWriteOnce"],
                "resources": { "requests": { "storage": "64Mi" } },
            },
        })),
    )
    .await;
    let node = schedulable_nodes(&scn.client).await[0].name.clone();
    create(
        &pods,
        &busybox_pod(
            "writer",
            "echo kept-by-retain > /data/token && sync",
            json!({
                "nodeSelector": { "kubernetes.io/hostname": node },
                "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": "data" } }],
                "containers": [{ "volumeMounts": [{ "name": "v", "mountPath": "/data" }] }],
            }),
        ),
    )
    .await;
    wait_ready(&pods, "writer").await;
    poll_until_async("the token on the volume", WAIT, || async {
        let t = sh(&pods, "writer", "cat /data/token 2>/dev/null || true").await;
        if t.trim() == "kept-by-retain" {
            Ok(())
        } else {
            Err(t)
        }
    })
    .await;
    let snap: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": { "name": "kept" },
        "spec": {
            "volumeSnapshotClassName": class_name,
            "source": { "persistentVolumeClaimName": "data" },
        },
    }));
    snapshots
        .create(&PostParams::default(), &snap)
        .await
        .expect("creating VolumeSnapshot kept");
    let ready = poll_until_async("VolumeSnapshot kept to be ready", WAIT, || async {
        match snapshots.get_opt("kept").await {
            Ok(Some(s)) if s.data["status"]["readyToUse"] == json!(true) => Ok(s),
            other => Err(format!(
                "{:?}",
                other.map(|o| o.map(|s| s.data["status"].clone()))
            )),
        }
    })
    .await;
    let content_name = ready.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .expect("a bound content")
        .to_string();
    let handle =
        contents.get(&content_name).await.expect("the content").data["status"]["snapshotHandle"]
            .as_str()
            .expect("a handle")
            .to_string();

    step("deleting the VolumeSnapshot and then its content keeps the snapshot on the node's disk");
    delete(&snapshots, "kept").await;
    delete(&contents, &content_name).await;
    poll_until_async("the content to be gone", WAIT, || async {
        match contents.get_opt(&content_name).await {
            Ok(None) => Ok(()),
            other => Err(format!(
                "{:?}",
                other.map(|o| o.map(|c| c.metadata.finalizers))
            )),
        }
    })
    .await;
    let disk = NodeDisk::open(&scn, &node).await;
    let pool = pool_of(&scn.client, "stead").await;
    let listing = disk.sh(&format!("ls /pools/{pool}/.snapshots/")).await;
    assert!(
        listing.contains(&handle),
        "snapshot {handle} retained: {listing}"
    );

    step("a pre-provisioned content with the retained handle binds, is ready, and restores");
    let imported = format!("imported-{}", scn.ns);
    let content: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": { "name": imported },
        "spec": {
            "driver": DRIVER,
            "deletionPolicy": "Delete",
            "source": { "snapshotHandle": handle },
            "volumeSnapshotRef": { "name": "imported", "namespace": scn.ns },
        },
    }));
    contents
        .create(&PostParams::default(), &content)
        .await
        .expect("creating the pre-provisioned content");
    let snap: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": { "name": "imported" },
        "spec": { "source": { "volumeSnapshotContentName": imported } },
    }));
    snapshots
        .create(&PostParams::default(), &snap)
        .await
        .expect("creating VolumeSnapshot imported");
    poll_until_async("VolumeSnapshot imported to be ready", WAIT, || async {
        match snapshots.get_opt("imported").await {
            Ok(Some(s)) if s.data["status"]["readyToUse"] == json!(true) => Ok(()),
            other => Err(format!(
                "{:?}; content events:\n{}",
                other.map(|o| o.map(|s| s.data["status"].clone())),
                events_of(&scn.client, &imported).await
            )),
        }
    })
    .await;
    create(
        &pvcs,
        &claim_from(
            "back",
            json!({ "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "imported" }),
            "64Mi",
        ),
    )
    .await;
    create(&pods, &reader("back-reader", "back", &node)).await;
    wait_ready(&pods, "back-reader").await;
    assert_eq!(
        sh(&pods, "back-reader", "cat /data/token").await.trim(),
        "kept-by-retain"
    );

    step("deleting it (deletionPolicy Delete) deletes the snapshot from the disk");
    delete(&snapshots, "imported").await;
    poll_until_async("the retained snapshot to be deleted", WAIT, || async {
        let listing = disk
            .sh(&format!("ls /pools/{pool}/.snapshots/ 2>/dev/null || true"))
            .await;
        let gone = contents.get_opt(&imported).await.ok().flatten().is_none();
        if gone && !listing.contains(&handle) {
            Ok(())
        } else {
            Err(format!("content gone: {gone}; snapshots: {listing}"))
        }
    })
    .await;
    let _ = classes.delete(&class_name, &Default::default()).await;
    scn.finish().await;
}
