//! Moving a volume with its data (issue 15): a StatefulSet's claim asked to
//! move to another node (annotation stead.csi.dev/move-to) moves once its
//! pod is gone, under the same claim name, and the pod reads its old token
//! and checksum there; the old volume goes only then. A move asked while a
//! pod uses the claim waits, and taking the annotation back leaves all as
//! it was. A drained node that says stead.csi.dev/drain-moves-to=any moves
//! its volumes the same way to a node with room.
//!
//!   make e2e E2E_SUITES=move

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod, Service};
use kube::api::{EvictParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use stead_e2e::*;

/// A move copies 32 MiB (or `STEAD_MOVE_MIB`) and waits for the StatefulSet's pod to be made
/// again, scheduled and started; on a loaded machine that is well under
/// this.
const WAIT: Duration = Duration::from_secs(240);

/// How many MiB of random data the moved replica writes: 32, or what
/// `STEAD_MOVE_MIB` says (`make bench-nodes` moves 1 GiB this way).
fn data_mib() -> u64 {
    std::env::var("STEAD_MOVE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&m| m > 0)
        .unwrap_or(32)
}

/// The seed's StatefulSet, one replica, free to run on any node; its claim
/// holds the data with room to spare.
fn one_replica(name: &str) -> (Service, StatefulSet) {
    let svc: Service = example("statefulset.yaml", "Service");
    let mut sts: StatefulSet = example("statefulset.yaml", "StatefulSet");
    sts.metadata.name = Some(name.into());
    let spec = sts.spec.as_mut().expect("the example has a spec");
    spec.replicas = Some(1);
    if let Some(pod) = spec.template.spec.as_mut() {
        pod.affinity = None;
    }
    let size = format!("{}Mi", (data_mib() + 256).max(500));
    for t in spec.volume_claim_templates.iter_mut().flatten() {
        if let Some(r) = t.spec.as_mut().and_then(|s| s.resources.as_mut()) {
            r.requests = Some(
                [(
                    "storage".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity(size.clone()),
                )]
                .into(),
            );
        }
    }
    (svc, sts)
}

async fn annotate(pvcs: &Api<PersistentVolumeClaim>, name: &str, key: &str, value: Option<&str>) {
    pvcs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
    )
    .await
    .unwrap_or_else(|e| panic!("annotating claim {name}: {e}"));
}

/// The token and the sha256 of the data file in the pod's volume.
async fn fingerprint(pods: &Api<Pod>, pod: &str) -> (String, String) {
    let token = sh(pods, pod, "cat /data/token").await;
    let sum = sh(pods, pod, "sha256sum /data/big | cut -d' ' -f1").await;
    (token.trim().to_string(), sum.trim().to_string())
}

async fn reclaim_policy(client: &kube::Client, pv: &str) -> String {
    Api::<PersistentVolume>::all(client.clone())
        .get(pv)
        .await
        .unwrap_or_else(|e| panic!("reading PV {pv}: {e}"))
        .spec
        .and_then(|s| s.persistent_volume_reclaim_policy)
        .unwrap_or_default()
}

/// Waits until claim `name` is a new claim (not `old_uid`) bound to a PV
/// pinned to `node`; that PV.
async fn wait_moved(
    scn: &Scenario,
    name: &str,
    old_uid: &str,
    node: &str,
) -> (PersistentVolumeClaim, PersistentVolume) {
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let client = scn.client.clone();
    poll_until_async(
        &format!("claim {name} made again, bound on {node}"),
        WAIT,
        || {
            let (pvcs, client) = (pvcs.clone(), client.clone());
            async move {
                let c = pvcs
                    .get_opt(name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or("no claim of that name")?;
                if c.uid().as_deref() == Some(old_uid) {
                    return Err("still the old claim".to_string());
                }
                let phase = c
                    .status
                    .as_ref()
                    .and_then(|s| s.phase.clone())
                    .unwrap_or_default();
                if phase != "Bound" {
                    return Err(format!("new claim is {phase}"));
                }
                let pv = volume_of(&client, &c).await;
                match pinned_node(&pv) {
                    Some(n) if n == node => Ok((c, pv)),
                    other => Err(format!("bound to {} on {other:?}", pv.name_any())),
                }
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_claim_moves_to_another_node_with_its_data_under_the_same_name() {
    let scn = Scenario::new("move").await;
    let nodes = schedulable_nodes(&scn.client).await;
    if nodes.len() < 2 {
        step("one schedulable node only: a move needs a second node");
        scn.finish().await;
        return;
    }
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());
    let (svc, sts) = one_replica("mv");
    create(&scn.api::<Service>(), &svc).await;
    create(&scn.api::<StatefulSet>(), &sts).await;
    let pod = "mv-0";
    let claim = "db-vol-mv-0";

    let mib = data_mib();
    step(&format!(
        "the replica writes its token, and {mib} MiB of random bytes beside it"
    ));
    let p = wait_ready(&pods, pod).await;
    let holder = node_of(&p);
    sh(
        &pods,
        pod,
        &format!("dd if=/dev/urandom of=/data/big bs=1M count={mib} 2>/dev/null && sync"),
    )
    .await;
    let written = fingerprint(&pods, pod).await;
    assert_eq!(written.1.len(), 64, "a sha256: {:?}", written.1);
    let first = wait_bound(&pvcs, claim).await;
    let first_uid = first.uid().expect("claims have uids");
    let old_pv = volume_of(&scn.client, &first).await;
    assert_eq!(pinned_node(&old_pv).as_deref(), Some(holder.as_str()));
    let target = nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != holder)
        .expect("a second node");

    step(&format!(
        "asked to move to {target} while the pod uses it: the holder agrees, the target waits; taken back, all is as it was"
    ));
    annotate(&pvcs, claim, "stead.csi.dev/move-to", Some(&target)).await;
    wait_event(
        &scn.client,
        claim,
        "MoveAgreed",
        &[holder.as_str(), target.as_str()],
        WAIT,
    )
    .await;
    wait_event(
        &scn.client,
        claim,
        "MoveWaiting",
        &[pod, "no pod uses it"],
        WAIT,
    )
    .await;
    assert_eq!(
        reclaim_policy(&scn.client, &old_pv.name_any()).await,
        "Retain"
    );
    annotate(&pvcs, claim, "stead.csi.dev/move-to", None).await;
    wait_event(
        &scn.client,
        claim,
        "MoveCancelled",
        &[holder.as_str()],
        WAIT,
    )
    .await;
    assert_eq!(
        reclaim_policy(&scn.client, &old_pv.name_any()).await,
        "Delete"
    );
    let still = pvcs.get(claim).await.expect("reading the claim");
    assert_eq!(
        still.uid().as_deref(),
        Some(first_uid.as_str()),
        "the claim was left alone"
    );
    assert!(
        is_ready(&pods.get(pod).await.expect("reading the pod")),
        "the pod was left alone"
    );

    step(&format!(
        "asked again; {holder} cordoned and the pod deleted: the StatefulSet's new pod waits, the volume moves to {target}"
    ));
    annotate(&pvcs, claim, "stead.csi.dev/move-to", Some(&target)).await;
    wait_event(
        &scn.client,
        claim,
        "MoveAgreed",
        &[holder.as_str(), target.as_str()],
        WAIT,
    )
    .await;
    // The third node is left schedulable: the StatefulSet may make the
    // claim again before the move does, and the scheduler may pick that node
    // for its pod; no agent gives such a claim a volume of its own, and the
    // claim binds to the copy (`moving::InFlight`).
    let cordon = NodeChange::cordon(&scn.client, &holder).await;
    let old_pod_uid = p.uid().expect("pods have uids");
    delete(&pods, pod).await;
    let (_, new_pv) = wait_moved(&scn, claim, &first_uid, &target).await;
    // Recorded in the background, just after the claim is made again.
    let events = wait_event(&scn.client, claim, "Moved", &[target.as_str()], WAIT).await;
    for reason in ["MoveCopying", "Pulling", "Pulled", "Moved"] {
        assert!(
            events.contains(reason),
            "event {reason} on the claim:\n{events}"
        );
    }
    // What the copy took (bytes, seconds, MB/s), for the log.
    if let Some(pulled) = events.lines().find(|l| l.contains("Pulled:")) {
        step(pulled.trim());
    }
    // Read again after the event: the claim is bound to the copy, whoever
    // made it; one the move made (or a StatefulSet's it could mark) says so.
    let moved = pvcs.get(claim).await.expect("reading the moved claim");
    assert_eq!(
        moved.spec.as_ref().and_then(|s| s.volume_name.clone()),
        Some(new_pv.name_any()),
        "the claim made again is bound to the copy"
    );
    let annotations = moved.annotations();
    if let Some(by) = annotations.get("stead.csi.dev/recreated-by") {
        assert_eq!(by, &target);
    }
    assert!(
        !annotations.contains_key("stead.csi.dev/move-to"),
        "the ask is done"
    );

    step(&format!(
        "the pod runs on {target} and reads its old token and checksum"
    ));
    let again = wait_replaced(&pods, pod, &old_pod_uid).await;
    assert_eq!(node_of(&again), target);
    assert_eq!(
        fingerprint(&pods, pod).await,
        written,
        "token and sha256 after the move"
    );

    step(&format!(
        "the old volume on {holder} is gone, only once the copy was bound"
    ));
    wait_deleted(
        &pvs,
        &old_pv.name_any(),
        &old_pv.uid().unwrap_or_default(),
        "the old PV of the moved claim",
    )
    .await;
    wait_event(
        &scn.client,
        &old_pv.name_any(),
        "MovedAway",
        &[new_pv.name_any().as_str()],
        WAIT,
    )
    .await;
    cordon.revert().await;

    step(&format!(
        "{target} drained with stead.csi.dev/drain-moves-to=any: its volume moves to a node with room"
    ));
    let nodes_api: Api<Node> = Api::all(scn.client.clone());
    nodes_api
        .patch(
            &target,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"stead.csi.dev/drain-moves-to": "any"}}}),
            ),
        )
        .await
        .expect("annotating the node");
    let drained = NodeChange::cordon(&scn.client, &target).await;
    let moved_uid = moved.uid().expect("claims have uids");
    wait_event(&scn.client, claim, "DrainMove", &[target.as_str()], WAIT).await;
    // Asked once per claim: the node's annotation is not needed any more
    // (and must not outlive the test, which a later cordon would act on).
    nodes_api
        .patch(
            &target,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"stead.csi.dev/drain-moves-to": null}}}),
            ),
        )
        .await
        .expect("removing the node's annotation");
    let running = pods.get(pod).await.expect("reading the pod");
    let picked = poll_until_async("the drain's pick in the claim's annotation", WAIT, || {
        let pvcs = pvcs.clone();
        let moved_uid = moved_uid.clone();
        async move {
            match pvcs.get_opt(claim).await {
                Ok(Some(c)) if c.uid().as_deref() == Some(moved_uid.as_str()) => c
                    .annotations()
                    .get("stead.csi.dev/move-to")
                    .cloned()
                    .ok_or_else(|| "no move-to yet".to_string()),
                Ok(_) => Err("the claim is being made again".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
    assert_ne!(picked, target, "a drain moves away from the drained node");
    // What kubectl drain does after the cordon: evict.
    pods.evict(pod, &EvictParams::default())
        .await
        .expect("evicting the pod");
    wait_moved(&scn, claim, &moved_uid, &picked).await;
    let last = wait_replaced(&pods, pod, &running.uid().unwrap_or_default()).await;
    assert_eq!(node_of(&last), picked);
    assert_eq!(
        fingerprint(&pods, pod).await,
        written,
        "token and sha256 after the drain"
    );
    drained.revert().await;

    scn.finish().await;
}

/// The window of a move the StatefulSet can race into, made on purpose: a
/// claim deleted by a move (its finalizer, `move-to`) is gone, and a claim
/// of the same name is made again by someone else than the move, with a pod
/// the scheduler places on a node of its choosing. No agent gives it a
/// volume of its own (it would be empty where the moved data should be):
/// the node the scheduler picked says why, and no PV is made for it.
#[tokio::test]
async fn a_claim_made_again_while_it_moves_gets_no_empty_volume() {
    let scn = Scenario::new("move-race").await;
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let pvs: Api<PersistentVolume> = Api::all(scn.client.clone());
    let claim = "db-vol-held-0";
    let pvc =
        |annotations: serde_json::Value, finalizers: serde_json::Value| -> PersistentVolumeClaim {
            from_json(json!({
                "metadata": { "name": claim, "annotations": annotations, "finalizers": finalizers },
                "spec": {
                    "storageClassName": "stead",
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": "64Mi" } },
                },
            }))
        };

    step(
        "a claim is deleted by a move (to a node no agent serves, so that nothing finishes it) and goes",
    );
    create(
        &pvcs,
        &pvc(
            json!({"stead.csi.dev/move-to": "stead-node-elsewhere"}),
            json!(["stead.csi.dev/move"]),
        ),
    )
    .await;
    let old_uid = delete(&pvcs, claim).await.expect("the claim was there");
    pvcs.patch(
        claim,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("letting the old claim go");
    wait_deleted(&pvcs, claim, &old_uid, "the moving claim").await;

    step(
        "made again under its name by someone else, with a pod: the scheduler picks a node, whose agent makes no volume",
    );
    create(&pvcs, &pvc(json!({}), json!([]))).await;
    let again = pvcs.get(claim).await.expect("reading the claim made again");
    let new_uid = again.uid().expect("claims have uids");
    create(
        &pods,
        &busybox_pod(
            "held",
            "true",
            json!({"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
                   "containers": [{"volumeMounts": [{"name": "v", "mountPath": "/data"}]}]}),
        ),
    )
    .await;
    let events = wait_event(
        &scn.client,
        claim,
        "MoveInFlight",
        &[
            "moves to node stead-node-elsewhere",
            "gives it no volume of its own",
        ],
        WAIT,
    )
    .await;
    if let Some(said) = events.lines().find(|l| l.contains("MoveInFlight")) {
        step(said.trim());
    }
    // The agent that said so passes on the claim at each look (every 10 s)
    // and the scheduler waits for the claim's binding: after the event, a
    // PV for it would have been made at once, before it.
    let made = pvs
        .get_opt(&format!("pvc-{new_uid}"))
        .await
        .expect("reading PVs");
    assert!(
        made.is_none(),
        "no volume of its own for the claim made again"
    );
    let now = pvcs.get(claim).await.expect("reading the claim");
    assert_eq!(
        now.status.and_then(|s| s.phase).as_deref(),
        Some("Pending"),
        "the claim waits for the move's copy"
    );
    scn.finish().await;
}
