//! What only several nodes can show: a volume ties its pod to its node, the
//! scheduler places pods by Stead's capacity per node, and a class's
//! `allowedTopologies` keeps volumes in its zones. Needs at least three
//! schedulable nodes (the bundled cluster has them; tests/e2e/kind.sh makes
//! them on kind), zones labelled `topology.kubernetes.io/zone`.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{PersistentVolumeClaim, Pod},
    storage::v1::{CSIStorageCapacity, StorageClass},
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
};
use serde_json::json;
use stead_e2e::*;

/// At least three schedulable nodes, or the scenario means nothing.
async fn three_nodes(scn: &Scenario) -> Vec<ClusterNode> {
    let nodes = schedulable_nodes(&scn.client).await;
    assert!(
        nodes.len() >= 3,
        "these scenarios need three schedulable nodes, the cluster has {nodes:?}"
    );
    nodes
}

fn claim(name: &str, class: &str, size: &str) -> PersistentVolumeClaim {
    from_json(json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        },
    }))
}

/// A pod that writes a token into its claim (once) and keeps running.
fn writer(name: &str, claim: &str, extra: serde_json::Value) -> Pod {
    let mut spec = json!({
        "containers": [{"volumeMounts": [{"name": "v", "mountPath": "/data"}]}],
        "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    busybox_pod(
        name,
        "[ -s /data/token ] || { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /data/token; sync; }",
        spec,
    )
}

/// A StorageClass of one test, deleted at the end (also on failure).
struct TestClass(String);

impl TestClass {
    async fn create(client: &kube::Client, sc: serde_json::Value) -> TestClass {
        let sc: StorageClass = from_json(sc);
        create(&Api::<StorageClass>::all(client.clone()), &sc).await;
        TestClass(sc.name_any())
    }
}

impl Drop for TestClass {
    fn drop(&mut self) {
        let name = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let _ = Api::<StorageClass>::all(client().await)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join();
    }
}

#[tokio::test]
async fn a_pod_whose_node_is_cordoned_waits_for_it_and_returns_with_its_data() {
    let scn = Scenario::new("cordon").await;
    three_nodes(&scn).await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();

    step("a 1-replica StatefulSet writes a token into its stead-dir volume");
    let sts: StatefulSet = from_json(json!({
        "metadata": {"name": "solo"},
        "spec": {
            "serviceName": "solo",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "solo"}},
            "template": {
                "metadata": {"labels": {"app": "solo"}},
                "spec": writer("x", "data", json!({})).spec,
            },
            "volumeClaimTemplates": [claim("data", "stead-dir", "64Mi")],
        },
    }));
    let mut sts = sts;
    // The template's volume is the claim template's, not a named claim.
    if let Some(spec) = sts.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        spec.volumes = None;
        spec.containers[0].volume_mounts = Some(vec![from_json(
            json!({"name": "data", "mountPath": "/data"}),
        )]);
    }
    create(&scn.api::<StatefulSet>(), &sts).await;
    let first = wait_ready(&pods, "solo-0").await;
    let node = node_of(&first);
    let token = sh(&pods, "solo-0", "cat /data/token").await;
    step(&format!("solo-0 runs on {node}, token {}", token.trim()));

    step(&format!(
        "cordon {node} and delete solo-0: the new pod stays Pending"
    ));
    let cordon = NodeChange::cordon(&scn.client, &node).await;
    delete(&pods, "solo-0").await;
    let claim_name = "data-solo-0";
    let events = wait_event(
        &scn.client,
        claim_name,
        "VolumeNodeUnschedulable",
        &[&node],
        POD_READY,
    )
    .await;
    step(&format!("events of claim {claim_name}:\n{events}"));
    let pending = pods.get("solo-0").await.expect("reading solo-0");
    assert!(
        pending.uid() != first.uid(),
        "solo-0 was replaced by the StatefulSet"
    );
    assert_eq!(
        pending.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        None,
        "the new solo-0 is not scheduled anywhere while {node} is cordoned"
    );
    assert_eq!(
        pending.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    let pod_events = events_of(&scn.client, "solo-0").await;
    assert!(
        pod_events.contains("VolumeNodeUnschedulable") && pod_events.contains(&node),
        "the pod, too, says which node it waits for:\n{pod_events}"
    );
    assert!(
        pvcs.get(claim_name)
            .await
            .expect("claim")
            .status
            .and_then(|s| s.phase)
            .as_deref()
            == Some("Bound"),
        "the claim stays Bound to its volume"
    );

    step(&format!(
        "uncordon {node}: solo-0 returns there with its token"
    ));
    cordon.revert().await;
    let back = wait_ready(&pods, "solo-0").await;
    assert_eq!(
        node_of(&back),
        node,
        "solo-0 came back on its volume's node"
    );
    assert_eq!(sh(&pods, "solo-0", "cat /data/token").await, token);
    scn.finish().await;
}

/// Stead's capacity objects of `class` in every namespace, by node; one per
/// node, since the scheduler takes any object that fits.
async fn capacities(client: &kube::Client, class: &str) -> BTreeMap<String, u64> {
    let mut by_node = BTreeMap::new();
    for c in Api::<CSIStorageCapacity>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("listing CSIStorageCapacity")
        .items
        .into_iter()
        .filter(|c| c.storage_class_name == class)
    {
        let Some(node) = c
            .node_topology
            .as_ref()
            .and_then(|t| t.match_labels.as_ref())
            .and_then(|l| l.get(TOPOLOGY_KEY).cloned())
        else {
            continue;
        };
        let bytes = c.capacity.as_ref().map_or(0, |q| quantity_bytes(&q.0));
        let name = format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any());
        if let Some((other, _)) = by_node.insert(node.clone(), (name.clone(), bytes)) {
            panic!("two capacity objects of class {class} for node {node}: {other} and {name}");
        }
    }
    by_node.into_iter().map(|(n, (_, b))| (n, b)).collect()
}

#[tokio::test]
async fn the_scheduler_places_a_claim_by_stead_capacity_on_another_node() {
    let scn = Scenario::new("capacity").await;
    let nodes = three_nodes(&scn).await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let class = "stead-dir";
    const GI: u64 = 1 << 30;

    step("every node publishes a CSIStorageCapacity for each Stead class");
    for c in ["stead", "stead-dir", "stead-retain", "stead-xfs"] {
        let caps = capacities(&scn.client, c).await;
        for n in &nodes {
            assert!(
                caps.contains_key(&n.name),
                "no capacity of class {c} for node {}: {caps:?}",
                n.name
            );
        }
    }
    let full = nodes[0].name.clone();
    let before = capacities(&scn.client, class).await[&full];
    step(&format!(
        "{full} has {} MiB for class {class}",
        before >> 20
    ));
    assert!(
        before > 3 * GI,
        "{full} has room for the test: {before} bytes"
    );

    step(&format!("a claim on {full} takes all but 1 GiB of it"));
    let filler = (before - GI) >> 20;
    create(&pvcs, &claim("filler", class, &format!("{filler}Mi"))).await;
    create(
        &pods,
        &writer(
            "filler",
            "filler",
            json!({"nodeSelector": {"kubernetes.io/hostname": full}}),
        ),
    )
    .await;
    wait_ready(&pods, "filler").await;
    let after = poll_until_async(
        &format!("the capacity of {full} to drop below 2 GiB"),
        POD_READY,
        || async {
            match capacities(&scn.client, class).await.get(&full) {
                Some(b) if *b < 2 * GI => Ok(*b),
                other => Err(format!("capacity {other:?} after the filler")),
            }
        },
    )
    .await;
    step(&format!("{full} now publishes {} MiB", after >> 20));

    step(&format!(
        "a 2Gi claim whose pod prefers {full}: the scheduler places it elsewhere"
    ));
    create(&pvcs, &claim("probe", class, "2Gi")).await;
    create(
        &pods,
        &writer(
            "probe",
            "probe",
            json!({"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "preference": {"matchExpressions": [{
                    "key": "kubernetes.io/hostname", "operator": "In", "values": [full],
                }]},
            }]}}}),
        ),
    )
    .await;
    let probe = wait_ready(&pods, "probe").await;
    let placed = node_of(&probe);
    assert_ne!(
        placed, full,
        "the probe pod was not placed on the full node"
    );
    let bound = wait_bound(&pvcs, "probe").await;
    let pv = volume_of(&scn.client, &bound).await;
    assert_eq!(pinned_node(&pv), Some(placed.clone()));
    let events = events_of(&scn.client, "probe").await;
    assert!(
        !events.contains("ProvisioningFailed"),
        "no failed attempt on the full node:\n{events}"
    );
    step(&format!(
        "probe runs on {placed}; events of the claim:\n{events}"
    ));

    step(&format!(
        "delete the filler: the capacity of {full} comes back"
    ));
    delete(&pods, "filler").await;
    delete(&pvcs, "filler").await;
    poll_until_async(
        &format!("the capacity of {full} to come back"),
        POD_READY,
        || async {
            match capacities(&scn.client, class).await.get(&full) {
                Some(b) if *b > before - GI / 2 => Ok(()),
                other => Err(format!(
                    "capacity {other:?} after the filler was deleted (was {before})"
                )),
            }
        },
    )
    .await;
    scn.finish().await;
}

#[tokio::test]
async fn allowed_topologies_keep_every_volume_in_its_zone() {
    let scn = Scenario::new("zone").await;
    let nodes = three_nodes(&scn).await;
    let zone = "zone-b";
    let inside: Vec<String> = nodes
        .iter()
        .filter(|n| n.zone.as_deref() == Some(zone))
        .map(|n| n.name.clone())
        .collect();
    assert!(
        !inside.is_empty() && inside.len() < nodes.len(),
        "nodes must be in {zone} and outside it: {nodes:?}"
    );
    let class = TestClass::create(
        &scn.client,
        json!({
            "metadata": {"name": format!("stead-{}", scn.ns)},
            "provisioner": DRIVER,
            "parameters": {"pool": "dir"},
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
            "allowedTopologies": [{"matchLabelExpressions": [
                {"key": "topology.kubernetes.io/zone", "values": [zone]},
            ]}],
        }),
    )
    .await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();

    step(&format!(
        "3 claims of a class allowed only in {zone} ({inside:?}), pods free to go anywhere"
    ));
    for i in 0..3 {
        create(&pvcs, &claim(&format!("z-{i}"), &class.0, "32Mi")).await;
        create(
            &pods,
            &writer(&format!("z-{i}"), &format!("z-{i}"), json!({})),
        )
        .await;
    }
    let pool = pool_of(&scn.client, &class.0).await;
    let mut disks = BTreeMap::new();
    for n in &nodes {
        disks.insert(n.name.clone(), NodeDisk::open(&scn, &n.name).await);
    }
    for i in 0..3 {
        let p = wait_ready(&pods, &format!("z-{i}")).await;
        let node = node_of(&p);
        let pv = volume_of(&scn.client, &wait_bound(&pvcs, &format!("z-{i}")).await).await;
        step(&format!(
            "z-{i}: pod and volume {} on {node}",
            pv.name_any()
        ));
        assert!(
            inside.contains(&node),
            "z-{i} runs on {node}, outside {zone}"
        );
        assert_eq!(pinned_node(&pv), Some(node.clone()));
        for (n, disk) in &disks {
            let here = disk.volume_dir(&pool, &volume_handle(&pv)).await.is_some();
            assert_eq!(
                here,
                *n == node,
                "volume {} is on {n}: {here}; it belongs on {node} only",
                pv.name_any()
            );
        }
    }
    scn.finish().await;
    drop(class);
}
