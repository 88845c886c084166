//! The seed's scenario: a replicated database as a StatefulSet (the one in
//! `deploy/examples/statefulset.yaml`), each replica on a node-local volume
//! from Stead that it keeps — data and all — through pod deletion, agent
//! restarts and scaling; deleting the claims deletes the volumes (class
//! `stead`) or keeps them (class `stead-retain`).

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Service},
};
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use stead_e2e::*;

/// The seed's Service and StatefulSet, the StatefulSet renamed, with
/// `replicas` and its claims of `class`.
fn seed(name: &str, replicas: i32, class: &str) -> (Service, StatefulSet) {
    let svc: Service = example("statefulset.yaml", "Service");
    let mut sts: StatefulSet = example("statefulset.yaml", "StatefulSet");
    sts.metadata.name = Some(name.into());
    let spec = sts.spec.as_mut().expect("the example has a spec");
    spec.replicas = Some(replicas);
    // One replica per node, as a replicated database is run: losing a node
    // then loses one replica, never two.
    if let Some(pod) = spec.template.spec.as_mut() {
        pod.affinity = Some(from_json(json!({"podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": {"app": "db"}},
                "topologyKey": "kubernetes.io/hostname",
            }],
        }})));
    }
    let template = &mut spec
        .volume_claim_templates
        .as_mut()
        .expect("the example has claims")[0];
    template
        .spec
        .as_mut()
        .expect("a claim spec")
        .storage_class_name = Some(class.into());
    (svc, sts)
}

async fn create_seed(scn: &Scenario, svc: &Service, sts: &StatefulSet) {
    let pp = PostParams::default();
    scn.api::<Service>()
        .create(&pp, svc)
        .await
        .expect("creating the headless Service db");
    scn.api::<StatefulSet>()
        .create(&pp, sts)
        .await
        .unwrap_or_else(|e| panic!("creating StatefulSet {}: {e}", sts.name_any()));
}

async fn scale(scn: &Scenario, sts: &str, replicas: i32) {
    scn.api::<StatefulSet>()
        .patch(
            sts,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "replicas": replicas } })),
        )
        .await
        .unwrap_or_else(|e| panic!("scaling StatefulSet {sts} to {replicas}: {e}"));
}

/// What a replica's volume is, as first seen: later steps check it is the
/// same claim on the same PV.
#[derive(Debug, Clone, PartialEq)]
struct Volume {
    claim_uid: String,
    pv: String,
    pv_uid: String,
    handle: String,
    node: String,
}

/// The Bound claim of pod `pod` (claim template `db-vol`) and its PV,
/// checked field by field against what Stead promises.
async fn volume_of_pod(scn: &Scenario, pod: &str, class: &str, reclaim: &str) -> Volume {
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let node = node_of(&pods.get(pod).await.expect("reading the pod"));
    let claim = format!("db-vol-{pod}");
    let pvc = wait_bound(&pvcs, &claim).await;
    let pv = volume_of(&scn.client, &pvc).await;
    let name = pv.name_any();
    let spec = pv.spec.as_ref().expect("a PV has a spec");
    let claim_ref = spec.claim_ref.as_ref().expect("a bound PV has a claimRef");
    assert_eq!(
        (
            claim_ref.namespace.as_deref(),
            claim_ref.name.as_deref(),
            claim_ref.uid.as_deref()
        ),
        (
            Some(scn.ns.as_str()),
            Some(claim.as_str()),
            pvc.uid().as_deref()
        ),
        "claimRef of PV {name}"
    );
    assert_eq!(
        pinned_node(&pv),
        Some(node.clone()),
        "node affinity of PV {name}"
    );
    let csi = spec.csi.as_ref().expect("a Stead PV has a csi source");
    assert_eq!(csi.driver, DRIVER, "driver of PV {name}");
    assert_eq!(
        spec.storage_class_name.as_deref(),
        Some(class),
        "class of PV {name}"
    );
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some(reclaim),
        "reclaim policy of PV {name}"
    );
    let capacity = &spec.capacity.as_ref().expect("a PV has a capacity")["storage"].0;
    assert!(
        quantity_bytes(capacity) >= 500 * 1024 * 1024,
        "PV {name} holds {capacity}, the claim asked for 500Mi"
    );
    Volume {
        claim_uid: pvc.uid().expect("uid"),
        pv: name,
        pv_uid: pv.uid().expect("uid"),
        handle: volume_handle(&pv),
        node,
    }
}

async fn read_token(scn: &Scenario, pod: &str) -> String {
    sh(&scn.api(), pod, "cat /data/token")
        .await
        .trim()
        .to_owned()
}

/// Lines of the pod's write log (one per second while it runs).
async fn log_lines(scn: &Scenario, pod: &str) -> usize {
    let out = sh(&scn.api(), pod, "wc -l < /data/log").await;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("wc -l in {pod}: {out}"))
}

fn pod(set: &str, i: usize) -> String {
    format!("{set}-{i}")
}

#[tokio::test]
async fn seed_statefulset_keeps_each_replicas_data_through_pod_deletion_agent_restart_and_scaling()
{
    let scn = Scenario::new("db").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());
    let start = Instant::now();
    let timeline = PodTimeline::watch(pods.clone(), "app=db").await;
    let (svc, sts) = seed("db-ss", 3, "stead");
    create_seed(&scn, &svc, &sts).await;

    step("pods appear in order 0, 1, 2, each once the one before is Ready");
    for i in 0..3 {
        wait_ready(&pods, &pod("db-ss", i)).await;
    }
    assert_eq!(
        timeline.order(Moment::Created, start),
        ["db-ss-0", "db-ss-1", "db-ss-2"]
    );
    for i in 1..3 {
        let created = timeline
            .when(&pod("db-ss", i), Moment::Created, start)
            .expect("seen created");
        let before_ready = timeline
            .when(&pod("db-ss", i - 1), Moment::Ready, start)
            .expect("seen Ready");
        assert!(
            created >= before_ready,
            "db-ss-{i} was created before db-ss-{} was Ready",
            i - 1
        );
    }

    step("claims db-vol-db-ss-0..2 are Bound to three distinct PVs pinned to their pod's node");
    let mut volumes = Vec::new();
    for i in 0..3 {
        volumes.push(volume_of_pod(&scn, &pod("db-ss", i), "stead", "Delete").await);
    }
    let distinct: HashSet<_> = volumes.iter().map(|v| v.pv.clone()).collect();
    assert_eq!(distinct.len(), 3, "three claims, three PVs: {volumes:?}");
    let spread: HashSet<_> = volumes.iter().map(|v| v.node.clone()).collect();
    assert_eq!(spread.len(), 3, "one replica per node: {volumes:?}");
    step(&format!(
        "placement: {}",
        volumes
            .iter()
            .enumerate()
            .map(|(i, v)| format!("db-ss-{i} and its volume on {}", v.node))
            .collect::<Vec<_>>()
            .join(", ")
    ));

    step("each volume is in its node's pool, and in no other node's");
    let pool = pool_of(&scn.client, "stead").await;
    let mut disks = BTreeMap::new();
    for node in schedulable_nodes(&scn.client).await {
        disks.insert(node.name.clone(), NodeDisk::open(&scn, &node.name).await);
    }
    for v in &volumes {
        for (node, disk) in &disks {
            let here = disk.volume_dir(&pool, &v.handle).await.is_some();
            assert_eq!(
                here,
                *node == v.node,
                "volume {} on node {node}: {here}; it belongs on {} only",
                v.handle,
                v.node
            );
        }
    }

    step("each pod wrote its name and a random token into its volume");
    let mut tokens = Vec::new();
    for i in 0..3 {
        let t = read_token(&scn, &pod("db-ss", i)).await;
        let (name, hex) = t
            .split_once(' ')
            .unwrap_or_else(|| panic!("token of db-ss-{i}: {t:?}"));
        assert_eq!(name, pod("db-ss", i), "the token names its pod");
        assert_eq!(hex.len(), 32, "a 16-byte random token in hex: {t:?}");
        tokens.push(t);
    }
    assert_eq!(
        tokens.iter().collect::<HashSet<_>>().len(),
        3,
        "tokens differ: {tokens:?}"
    );

    step(
        "delete pod db-ss-1: it comes back on the same node with the same name, claim, PV and token",
    );
    let old = pods.get("db-ss-1").await.expect("reading db-ss-1");
    delete(&pods, "db-ss-1").await;
    let new = wait_replaced(&pods, "db-ss-1", &old.uid().expect("uid")).await;
    let claims: Vec<_> = new
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| {
            v.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.clone())
        })
        .collect();
    assert_eq!(
        claims,
        ["db-vol-db-ss-1"],
        "the new db-ss-1 mounts the same claim"
    );
    assert_eq!(
        volume_of_pod(&scn, "db-ss-1", "stead", "Delete").await,
        volumes[1]
    );
    assert_eq!(
        read_token(&scn, "db-ss-1").await,
        tokens[1],
        "db-ss-1's token survived"
    );

    step("restart the Stead agent while the pods write: mounts stay, writes go on, tokens intact");
    let mut before = BTreeMap::new();
    for i in 0..3 {
        let p = pods.get(&pod("db-ss", i)).await.expect("reading the pod");
        before.insert(i, (p.uid(), log_lines(&scn, &pod("db-ss", i)).await));
    }
    let nodes: HashSet<_> = volumes.iter().map(|v| v.node.clone()).collect();
    for node in &nodes {
        restart_agent(&scn.client, node).await;
    }
    for i in 0..3 {
        let name = pod("db-ss", i);
        let p = pods.get(&name).await.expect("reading the pod");
        assert_eq!(
            p.uid(),
            before[&i].0,
            "{name} was not replaced by the agent's restart"
        );
        let restarts = p
            .status
            .and_then(|s| s.container_statuses)
            .map(|cs| cs.iter().map(|c| c.restart_count).sum::<i32>());
        assert_eq!(restarts, Some(0), "{name}'s container never restarted");
        let mounts = sh(&pods, &name, "grep ' /data ' /proc/mounts").await;
        assert!(!mounts.trim().is_empty(), "{name} still has /data mounted");
        let target = before[&i].1 + 3;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines = log_lines(&scn, &name).await;
            if lines >= target {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} stopped writing after the agent restart: {lines} log lines, \
                 awaited {target} within 30 s"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let written = sh(
            &pods,
            &name,
            "echo after-restart > /data/probe && sync && cat /data/probe",
        )
        .await;
        assert_eq!(written.trim(), "after-restart", "{name} writes a new file");
        assert_eq!(
            read_token(&scn, &name).await,
            tokens[i],
            "{name}'s token survived"
        );
    }

    step("scale to 1: db-ss-2 terminates before db-ss-1, and the claims stay");
    let mark = Instant::now();
    let mut uids = Vec::new();
    for i in 1..3 {
        uids.push(
            pods.get(&pod("db-ss", i))
                .await
                .expect("reading the pod")
                .uid(),
        );
    }
    scale(&scn, "db-ss", 1).await;
    for (i, uid) in (1..3).zip(&uids) {
        wait_deleted(
            &pods,
            &pod("db-ss", i),
            uid.as_deref().expect("uid"),
            "a scaled-down pod",
        )
        .await;
    }
    assert_eq!(timeline.order(Moment::Gone, mark), ["db-ss-2", "db-ss-1"]);
    let two_gone = timeline
        .when("db-ss-2", Moment::Gone, mark)
        .expect("seen gone");
    let one_terminating = timeline
        .when("db-ss-1", Moment::Terminating, mark)
        .expect("seen terminating");
    assert!(
        one_terminating >= two_gone,
        "db-ss-1 began terminating before db-ss-2 was gone"
    );
    for (i, volume) in volumes.iter().enumerate() {
        let pvc = wait_bound(&pvcs, &format!("db-vol-db-ss-{i}")).await;
        assert_eq!(
            pvc.uid().as_ref(),
            Some(&volume.claim_uid),
            "claim of db-ss-{i} stays"
        );
    }

    step("scale back to 3: the same claims and PVs are reused on their nodes, tokens intact");
    scale(&scn, "db-ss", 3).await;
    for i in 0..3 {
        let name = pod("db-ss", i);
        wait_ready(&pods, &name).await;
        assert_eq!(
            volume_of_pod(&scn, &name, "stead", "Delete").await,
            volumes[i]
        );
        assert_eq!(
            read_token(&scn, &name).await,
            tokens[i],
            "{name}'s token survived"
        );
    }

    step(
        "delete the StatefulSet and its claims: the PVs and the volumes on the node's disk are gone",
    );
    for v in &volumes {
        assert!(
            disks[&v.node].volume_dir(&pool, &v.handle).await.is_some(),
            "volume {} is in pool {pool} on node {}",
            v.handle,
            v.node
        );
    }
    let sets: Api<StatefulSet> = scn.api();
    delete(&sets, "db-ss").await;
    for i in 0..3 {
        let name = pod("db-ss", i);
        if let Some(p) = pods.get_opt(&name).await.expect("reading the pod") {
            wait_deleted(
                &pods,
                &name,
                &p.uid().expect("uid"),
                "the StatefulSet's pod",
            )
            .await;
        }
    }
    for i in 0..3 {
        delete(&pvcs, &format!("db-vol-db-ss-{i}")).await;
    }
    for v in &volumes {
        wait_deleted(
            &pvs,
            &v.pv,
            &v.pv_uid,
            "the PV of a deleted claim (reclaim Delete)",
        )
        .await;
        assert_eq!(
            disks[&v.node].volume_dir(&pool, &v.handle).await,
            None,
            "volume {} is gone from the disk of node {}",
            v.handle,
            v.node
        );
    }
    drop(timeline);
    scn.finish().await;
}

#[tokio::test]
async fn retain_class_keeps_the_released_volume_and_its_data() {
    let scn = Scenario::new("keep").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());
    let (svc, sts) = seed("db-keep", 1, "stead-retain");
    create_seed(&scn, &svc, &sts).await;

    step("db-keep-0 runs on a stead-retain volume");
    let p = wait_ready(&pods, "db-keep-0").await;
    let volume = volume_of_pod(&scn, "db-keep-0", "stead-retain", "Retain").await;
    let token = read_token(&scn, "db-keep-0").await;
    let pool = pool_of(&scn.client, "stead-retain").await;
    let disk = NodeDisk::open(&scn, &volume.node).await;

    step("delete the StatefulSet and its claim: the PV is Released, the volume stays on the disk");
    delete(&scn.api::<StatefulSet>(), "db-keep").await;
    wait_deleted(
        &pods,
        "db-keep-0",
        &p.uid().expect("uid"),
        "the StatefulSet's pod",
    )
    .await;
    delete(&pvcs, "db-vol-db-keep-0").await;
    wait_for(
        &pvs,
        &volume.pv,
        "the PV to be Released",
        GONE,
        |pv: Option<&PersistentVolume>| {
            pv.and_then(|pv| pv.status.as_ref())
                .is_some_and(|s| s.phase.as_deref() == Some("Released"))
        },
    )
    .await;
    // Give a wrongful deleter the time it would need.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pv = pvs
        .get(&volume.pv)
        .await
        .expect("the Retain PV still exists");
    assert_eq!(pv.status.and_then(|s| s.phase).as_deref(), Some("Released"));
    assert!(
        disk.volume_dir(&pool, &volume.handle).await.is_some(),
        "volume {} is still in pool {pool}",
        volume.handle
    );

    step(
        "the data is still there: the PV, freed of its old claim, serves the same token to a new pod",
    );
    pvs.patch(
        &volume.pv,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "claimRef": null } })),
    )
    .await
    .expect("clearing the Released PV's claimRef");
    let claim: PersistentVolumeClaim = from_json(json!({
        "metadata": { "name": "restored" },
        "spec": {
            "storageClassName": "stead-retain",
            "volumeName": volume.pv,
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": "500Mi" } },
        },
    }));
    let pp = PostParams::default();
    pvcs.create(&pp, &claim)
        .await
        .expect("creating claim restored");
    let reader = busybox_pod(
        "reader",
        "",
        json!({
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": "restored" } }],
            "containers": [{ "volumeMounts": [{ "name": "v", "mountPath": "/data" }] }],
        }),
    );
    pods.create(&pp, &reader)
        .await
        .expect("creating pod reader");
    wait_ready(&pods, "reader").await;
    assert_eq!(
        read_token(&scn, "reader").await,
        token,
        "the retained volume kept its token"
    );

    step("clean up: reclaim Delete on the PV, delete the claim: PV and volume gone");
    pvs.patch(
        &volume.pv,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "persistentVolumeReclaimPolicy": "Delete" } })),
    )
    .await
    .expect("setting reclaim Delete on the PV");
    let reader_uid = pods
        .get("reader")
        .await
        .expect("reader")
        .uid()
        .expect("uid");
    delete(&pods, "reader").await;
    wait_deleted(&pods, "reader", &reader_uid, "pod reader").await;
    delete(&pvcs, "restored").await;
    wait_deleted(
        &pvs,
        &volume.pv,
        &volume.pv_uid,
        "the PV, now reclaim Delete",
    )
    .await;
    assert_eq!(
        disk.volume_dir(&pool, &volume.handle).await,
        None,
        "the volume is gone"
    );
    scn.finish().await;
}

#[tokio::test]
async fn retention_policy_delete_removes_the_claims_on_scale_down_and_with_the_statefulset() {
    let scn = Scenario::new("auto").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());
    let (svc, mut sts) = seed("db-auto", 2, "stead");
    sts.spec
        .as_mut()
        .expect("spec")
        .persistent_volume_claim_retention_policy = Some(from_json(
        json!({ "whenDeleted": "Delete", "whenScaled": "Delete" }),
    ));
    create_seed(&scn, &svc, &sts).await;

    step("db-auto-0 and db-auto-1 run, each on its own volume");
    let mut volumes = Vec::new();
    for i in 0..2 {
        wait_ready(&pods, &pod("db-auto", i)).await;
        volumes.push(volume_of_pod(&scn, &pod("db-auto", i), "stead", "Delete").await);
    }

    step("scale to 1 (whenScaled: Delete): db-auto-1's claim, PV and volume are deleted");
    scale(&scn, "db-auto", 1).await;
    wait_deleted(
        &pvcs,
        "db-vol-db-auto-1",
        &volumes[1].claim_uid,
        "db-auto-1's claim",
    )
    .await;
    wait_deleted(&pvs, &volumes[1].pv, &volumes[1].pv_uid, "db-auto-1's PV").await;
    let kept = wait_bound(&pvcs, "db-vol-db-auto-0").await;
    assert_eq!(
        kept.uid().as_ref(),
        Some(&volumes[0].claim_uid),
        "db-auto-0 keeps its claim"
    );

    step("delete the StatefulSet (whenDeleted: Delete): db-auto-0's claim and PV go with it");
    delete(&scn.api::<StatefulSet>(), "db-auto").await;
    wait_deleted(
        &pvcs,
        "db-vol-db-auto-0",
        &volumes[0].claim_uid,
        "db-auto-0's claim",
    )
    .await;
    wait_deleted(&pvs, &volumes[0].pv, &volumes[0].pv_uid, "db-auto-0's PV").await;
    scn.finish().await;
}
