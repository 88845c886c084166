//! Node loss (issue 15): a node's kubelet and Stead agent are killed and its
//! Node deleted, as a node that is gone for good looks to the cluster.
//! - With a class that opts in (`onNodeLoss: release`), the StatefulSet's
//!   replica of that node runs again on another node within the timeout,
//!   with a new empty volume; the other replicas' tokens are untouched; each
//!   step is an Event on the old claim.
//! - With the default (`keep`), nothing is deleted, and a Warning Event on
//!   the claim says why the pod is stuck and what to do.
//!
//! Each scenario brings the node back at its end (its kubelet started again
//! registers the Node again, the DaemonSet puts an agent there), so later
//! suites find every node. Needs the bundled cluster (`tests/cluster`: the
//! kubelet's pid file and the node's namespaces).

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Service},
    storage::v1::StorageClass,
};
use kube::{Api, ResourceExt, api::DeleteParams};
use serde_json::json;
use stead_e2e::*;

/// The scenarios take a node down: one at a time, whatever the test threads.
static ONE_NODE_DOWN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long the release may take once the Node is deleted: the Lease (15 s,
/// if the leader was on the lost node), a leader's round (15 s), PodGC's
/// quarantine of pods on a deleted node (40 s), the StatefulSet's claim and
/// the new volume, the pod's start.
const RELEASED_WITHIN: Duration = Duration::from_secs(240);

/// The seed's Service and StatefulSet with its claims of `class`, spread one
/// per node while there are three (a spread constraint, not a required
/// anti-affinity, so that the replica of a lost node may join another).
fn seed(name: &str, class: &str) -> (Service, StatefulSet) {
    let svc: Service = example("statefulset.yaml", "Service");
    let mut sts: StatefulSet = example("statefulset.yaml", "StatefulSet");
    sts.metadata.name = Some(name.into());
    let spec = sts.spec.as_mut().expect("the example has a spec");
    spec.replicas = Some(3);
    if let Some(pod) = spec.template.spec.as_mut() {
        pod.affinity = None;
        pod.topology_spread_constraints = Some(from_json(json!([{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"app": "db"}},
        }])));
    }
    spec.volume_claim_templates
        .as_mut()
        .expect("the example has claims")[0]
        .spec
        .as_mut()
        .expect("a claim spec")
        .storage_class_name = Some(class.into());
    (svc, sts)
}

/// A class like `stead` (same pool) that releases its volumes on node loss.
async fn release_class(client: &kube::Client, name: &str) -> StorageClass {
    let pool = pool_of(client, "stead").await;
    let sc: StorageClass = from_json(json!({
        "metadata": {"name": name},
        "provisioner": DRIVER,
        "parameters": {"pool": pool, "onNodeLoss": "release", "nodeLossTimeout": "2m"},
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    }));
    let api = Api::<StorageClass>::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    create(&api, &sc).await;
    sc
}

/// A replica as first seen: its node, claim, PV and token.
#[derive(Debug, Clone)]
struct Replica {
    pod: String,
    node: String,
    claim_uid: String,
    pv: String,
    token: String,
}

async fn replicas(scn: &Scenario, sts: &str) -> Vec<Replica> {
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let mut out = Vec::new();
    for i in 0..3 {
        let pod = format!("{sts}-{i}");
        let p = wait_ready(&pods, &pod).await;
        let claim = wait_bound(&pvcs, &format!("db-vol-{pod}")).await;
        let pv = volume_of(&scn.client, &claim).await;
        out.push(Replica {
            node: node_of(&p),
            claim_uid: claim.uid().expect("claims have uids"),
            pv: pv.name_any(),
            token: sh(&pods, &pod, "cat /data/token").await,
            pod,
        });
    }
    let mut nodes: Vec<&str> = out.iter().map(|r| r.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "one replica per node: {out:?}");
    out
}

/// Kills the kubelet and the agent of `node` and deletes its Node; what it
/// takes to bring the node back.
async fn lose(client: &kube::Client, node: &str) -> StoppedKubelet {
    let local = LocalNode::all()
        .into_iter()
        .find(|n| n.name == node)
        .unwrap_or_else(|| panic!("node {node} is not a node of the local cluster"));
    step(&format!(
        "kill the kubelet and the Stead agent of {node}, delete its Node"
    ));
    let kubelet = local.kill_kubelet().await;
    let killed = local.kill_agent().await;
    assert!(killed > 0, "no Stead agent process ran on {node}");
    let nodes = Api::<Node>::all(client.clone());
    if let Some(uid) = delete(&nodes, node).await {
        wait_deleted(&nodes, node, &uid, &format!("Node {node}")).await;
    }
    kubelet
}

/// Brings `node` back and waits for its agent.
async fn restore(client: &kube::Client, kubelet: StoppedKubelet, node: &str) {
    step(&format!("start the kubelet of {node} again"));
    kubelet.start(client).await;
    // Polled: the DaemonSet controller creates the agent's pod once the
    // Node is back; agent_pod waits for it to be Ready.
    poll_until_async(
        &format!("a Stead agent pod on {node}"),
        POD_READY,
        || async {
            let pods = Api::<Pod>::namespaced(client.clone(), STEAD_NAMESPACE);
            let lp = kube::api::ListParams::default()
                .labels(AGENT_LABELS)
                .fields(&format!("spec.nodeName={node}"));
            let list = pods.list(&lp).await.map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(is_ready)
                .then_some(())
                .ok_or_else(|| format!("{} agent pods, none Ready", list.items.len()))
        },
    )
    .await;
}

#[tokio::test]
async fn an_opted_in_replica_starts_elsewhere_with_an_empty_volume_when_its_node_is_lost() {
    let _one = ONE_NODE_DOWN.lock().await;
    let scn = Scenario::new("nodeloss-release").await;
    let client = scn.client.clone();
    let class = "stead-e2e-release";
    release_class(&client, class).await;
    let (svc, sts) = seed("db-ss", class);
    create(&scn.api::<Service>(), &svc).await;
    create(&scn.api::<StatefulSet>(), &sts).await;
    let before = replicas(&scn, "db-ss").await;
    let lost = before[1].clone();
    let pvs = Api::<PersistentVolume>::all(client.clone());
    let old_pv = pvs.get(&lost.pv).await.expect("the PV of the lost replica");
    assert_eq!(
        old_pv
            .labels()
            .get("stead.csi.dev/on-node-loss")
            .map(String::as_str),
        Some("release"),
        "the PV records the opt-in"
    );

    let kubelet = lose(&client, &lost.node).await;
    let started = Instant::now();

    step(&format!(
        "{} runs again on another node, on a new volume",
        lost.pod
    ));
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let claim_name = format!("db-vol-{}", lost.pod);
    let (pod, claim) = poll_until_async(
        &format!("{} Ready on another node with a new claim", lost.pod),
        RELEASED_WITHIN,
        || async {
            let p = pods.get_opt(&lost.pod).await.map_err(|e| e.to_string())?;
            let c = pvcs.get_opt(&claim_name).await.map_err(|e| e.to_string())?;
            match (p, c) {
                (Some(p), Some(c))
                    if is_ready(&p)
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            != Some(&lost.node)
                        && c.uid().as_deref() != Some(&lost.claim_uid) =>
                {
                    Ok((p, c))
                }
                (p, c) => Err(format!(
                    "pod on {:?}, ready {}; claim uid {:?}",
                    p.as_ref().and_then(|p| p.spec.as_ref()?.node_name.clone()),
                    p.as_ref().is_some_and(is_ready),
                    c.and_then(|c| c.uid())
                )),
            }
        },
    )
    .await;
    let took = started.elapsed();
    let new_pv = volume_of(&client, &claim).await;
    assert_ne!(new_pv.name_any(), lost.pv);
    assert_eq!(
        pinned_node(&new_pv).as_deref(),
        Some(node_of(&pod).as_str())
    );
    let token = sh(&pods, &lost.pod, "cat /data/token").await;
    assert_ne!(
        token, lost.token,
        "a new, empty volume: the replica wrote a new token"
    );
    println!(
        "  {} on {} after {:.0} s (node {} deleted), new PV {}",
        lost.pod,
        node_of(&pod),
        took.as_secs_f64(),
        lost.node,
        new_pv.name_any()
    );

    step("the other replicas' data is untouched");
    for r in before.iter().filter(|r| r.pod != lost.pod) {
        let p = wait_ready(&pods, &r.pod).await;
        assert_eq!(node_of(&p), r.node);
        assert_eq!(
            sh(&pods, &r.pod, "cat /data/token").await,
            r.token,
            "{}",
            r.pod
        );
        let c = pvcs.get(&format!("db-vol-{}", r.pod)).await.expect("claim");
        assert_eq!(
            c.uid().as_deref(),
            Some(r.claim_uid.as_str()),
            "{} keeps its claim",
            r.pod
        );
    }

    step("every step is an Event on the old claim; the old PV is gone");
    let events = wait_event(
        &client,
        &claim_name,
        "NodeLossVolumeReleased",
        &[&lost.pv, &lost.node],
        Duration::from_secs(30),
    )
    .await;
    for reason in [
        "NodeLost",
        "NodeLossClaimDeleted",
        "NodeLossFinalizerRemoved",
    ] {
        assert!(events.contains(reason), "{reason} in:\n{events}");
    }
    // The delete is taken; kube-controller-manager's pv-protection
    // controller lets the PV go once no claim uses it, which a loaded
    // machine may take seconds to do.
    let (api, name) = (&pvs, lost.pv.as_str());
    poll_until_async(
        "the lost node's PV to be gone",
        Duration::from_secs(90),
        || async move {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(pv)) => Err(format!(
                    "PV {name} still there (deletion {:?}, finalizers {:?})",
                    pv.metadata.deletion_timestamp, pv.metadata.finalizers
                )),
                Err(e) => Err(format!("reading PV {name}: {e}")),
            }
        },
    )
    .await;
    println!("{events}");

    restore(&client, kubelet, &lost.node).await;
    step("the node is back: its old volume waits out the leak grace before it goes");
    let disk = NodeDisk::open(&scn, &lost.node).await;
    let pool = pool_of(&client, "stead").await;
    assert!(
        disk.volume_dir(&pool, &lost.pv).await.is_some(),
        "the returning node does not delete at once what node loss released"
    );
    drop(disk);

    scn.finish().await;
    let _ = Api::<StorageClass>::all(client)
        .delete(class, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn without_the_opt_in_nothing_is_deleted_and_a_warning_says_why_and_what_to_do() {
    let _one = ONE_NODE_DOWN.lock().await;
    let scn = Scenario::new("nodeloss-keep").await;
    let client = scn.client.clone();
    let (svc, sts) = seed("db-ss", "stead");
    create(&scn.api::<Service>(), &svc).await;
    create(&scn.api::<StatefulSet>(), &sts).await;
    let before = replicas(&scn, "db-ss").await;
    let lost = before[1].clone();
    let claim_name = format!("db-vol-{}", lost.pod);

    let kubelet = lose(&client, &lost.node).await;

    step("a Warning on the claim says the node is lost, nothing is deleted, and what to do");
    let events = wait_event(
        &client,
        &claim_name,
        "NodeLostVolumeKept",
        &[&lost.node, &lost.pv, "bring the node back", "delete claim"],
        Duration::from_secs(120),
    )
    .await;
    println!("{events}");
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let claim = pvcs.get(&claim_name).await.expect("the claim is kept");
    assert_eq!(claim.uid().as_deref(), Some(lost.claim_uid.as_str()));
    assert!(claim.metadata.deletion_timestamp.is_none());
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&lost.pv)
        .await
        .expect("the PV is kept");
    assert!(pv.metadata.deletion_timestamp.is_none());
    assert!(
        pv.finalizers()
            .iter()
            .any(|f| f == "stead.csi.dev/volume-protection")
    );
    for e in ["NodeLossClaimDeleted", "NodeLossVolumeReleased"] {
        assert!(!events.contains(e), "no {e} for a kept volume:\n{events}");
    }

    restore(&client, kubelet, &lost.node).await;
    step(&format!(
        "{} returns to {} with its data",
        lost.pod, lost.node
    ));
    let pods: Api<Pod> = scn.api();
    // Ready is not enough: the pod object may still carry the status its
    // node reported before it was lost, and only kubelet knows whether its
    // container runs again. Polled until the pod answers, with its token.
    let (pod, token) = poll_until_async(
        &format!("{} running again and answering", lost.pod),
        POD_READY * 2,
        || async {
            match pods.get_opt(&lost.pod).await.map_err(|e| e.to_string())? {
                Some(p) if is_ready(&p) => {
                    let token = try_sh(&pods, &lost.pod, "cat /data/token").await?;
                    Ok((p, token))
                }
                p => Err(format!("ready: {}", p.as_ref().is_some_and(is_ready))),
            }
        },
    )
    .await;
    assert_eq!(node_of(&pod), lost.node);
    assert_eq!(token, lost.token);
    scn.finish().await;
}
