//! An agent's identity touches only its own node's objects
//! (deploy/base/admission-policy.yaml): with a token of the agent's
//! ServiceAccount bound to the agent's pod on node A (so that it carries
//! node A's name, as kubelet's token of that pod does), deleting or patching
//! node B's PV and taking or patching node B's claim are refused (403, the
//! policy's message naming node A) and change nothing, while node A's own PV,
//! claim and capacity may be written. A token of that account bound to no
//! pod may write none of them.
//!
//! Needs two schedulable nodes running Stead's agents, installed from
//! `deploy/` (the policies with them), on Kubernetes 1.30 or later
//! (ValidatingAdmissionPolicy v1) whose pod-bound tokens name their node
//! (1.32 and later; 1.30 and 1.31 with ServiceAccountTokenPodNodeInfo, on by
//! default).

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount},
    storage::v1::CSIStorageCapacity,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use stead_e2e::*;

/// The agents' ServiceAccount (deploy/base/rbac.yaml).
const AGENT_ACCOUNT: &str = "stead-node";
/// A class of `deploy/` whose volumes are quick to make (a directory).
const CLASS: &str = "stead-dir";
/// The label of the node of a Stead PV (and capacity object).
const NODE_LABEL: &str = "stead.csi.dev/node";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// A claim whose node is chosen already, as the scheduler chooses it for a
/// pod: that node's agent provisions it.
fn claim_on(name: &str, node: &str) -> PersistentVolumeClaim {
    from_json(json!({
        "metadata": {"name": name, "annotations": {SELECTED_NODE: node}},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": CLASS,
            "resources": {"requests": {"storage": "16Mi"}},
        },
    }))
}

/// A capacity object of Stead's for `node`, as its agent publishes it.
fn capacity_of(node: &str) -> CSIStorageCapacity {
    from_json(json!({
        "metadata": {
            "name": format!("stead-e2e-policy-{node}"),
            "namespace": STEAD_NAMESPACE,
            "labels": {"csi.storage.k8s.io/drivername": DRIVER, NODE_LABEL: node},
        },
        "storageClassName": CLASS,
        "capacity": "1Gi",
        "nodeTopology": {"matchLabels": {TOPOLOGY_KEY: node}},
    }))
}

/// A token of the agents' ServiceAccount, bound to `pod` (it then carries
/// the pod's node), or to nothing.
async fn agent_token(client: &Client, pod: Option<&Pod>) -> String {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // The apiserver's own audience.
            audiences: vec![],
            expiration_seconds: Some(600),
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(p.name_any()),
                uid: p.uid(),
            }),
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), STEAD_NAMESPACE)
        .create_token_request(AGENT_ACCOUNT, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| {
            panic!("a token of ServiceAccount {STEAD_NAMESPACE}/{AGENT_ACCOUNT}: {e}")
        })
        .status
        .map(|s| s.token)
        .expect("a TokenRequest answers with a token")
}

/// A client of the same cluster that authenticates with `token` alone.
async fn client_with(token: String) -> Client {
    let mut config = kube::Config::infer()
        .await
        .unwrap_or_else(|e| panic!("no Kubernetes config ({e}): export KUBECONFIG"));
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Client::try_from(config).unwrap_or_else(|e| panic!("a client with the agent's token: {e}"))
}

/// Asserts that `what` was refused by an admission policy (403) with a
/// message holding each of `words`; returns the message.
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, kube::Error>,
    words: &[&str],
) -> String {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("denied request") => {
            for w in words {
                assert!(
                    s.message.contains(w),
                    "{what}: refused, but the message does not name {w:?}: {}",
                    s.message
                );
            }
            step(&format!("{what}: refused: {}", s.message));
            s.message.clone()
        }
        other => panic!("{what}: expected a 403 of an admission policy, got {other:?}"),
    }
}

/// Asserts that `what` was allowed.
fn allowed<T>(what: &str, result: Result<T, kube::Error>) {
    if let Err(e) = result {
        panic!("{what}: expected it allowed, got {e}");
    }
    step(&format!("{what}: allowed"));
}

fn merge(patch: serde_json::Value) -> Patch<serde_json::Value> {
    Patch::Merge(patch)
}

/// Sets the test's annotation on object `name` to `value` through `api`
/// (whose client says who asks).
async fn annotate<K>(api: &Api<K>, name: &str, value: &str) -> Result<K, kube::Error>
where
    K: Clone + std::fmt::Debug + k8s_openapi::serde::de::DeserializeOwned,
{
    let patch = json!({"metadata": {"annotations": {"stead.csi.dev/e2e-policy": value}}});
    api.patch(name, &PatchParams::default(), &merge(patch))
        .await
}

/// A create that the apiserver admits (or refuses) and does not keep.
fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn an_agents_token_writes_only_its_own_nodes_volumes_claims_and_capacity() {
    let scn = Scenario::new("policy").await;
    let nodes = schedulable_nodes(&scn.client).await;
    assert!(
        nodes.len() >= 2,
        "this scenario needs two schedulable nodes, the cluster has {nodes:?}"
    );
    let (a, b) = (nodes[0].name.as_str(), nodes[1].name.as_str());
    let pvcs = scn.api::<PersistentVolumeClaim>();
    let pvs = Api::<PersistentVolume>::all(scn.client.clone());

    step(&format!(
        "a claim on node {a} and one on node {b}, each bound to a PV of its node"
    ));
    create(&pvcs, &claim_on("on-a", a)).await;
    create(&pvcs, &claim_on("on-b", b)).await;
    let pv_a = volume_of(&scn.client, &wait_bound(&pvcs, "on-a").await).await;
    let pv_b = volume_of(&scn.client, &wait_bound(&pvcs, "on-b").await).await;
    for (pv, node) in [(&pv_a, a), (&pv_b, b)] {
        assert_eq!(
            pinned_node(pv).as_deref(),
            Some(node),
            "PV {}",
            pv.name_any()
        );
        assert_eq!(
            pv.labels().get(NODE_LABEL).map(String::as_str),
            Some(node),
            "PV {} carries its node's label (its agent watches it by it)",
            pv.name_any()
        );
    }
    let (name_a, name_b) = (pv_a.name_any(), pv_b.name_any());

    step(&format!("the token of node {a}'s agent, bound to its pod"));
    let agent = agent_pod(&scn.client, a).await;
    let as_a = client_with(agent_token(&scn.client, Some(&agent)).await).await;
    let pvs_as_a = Api::<PersistentVolume>::all(as_a.clone());
    let pvcs_as_a = Api::<PersistentVolumeClaim>::namespaced(as_a.clone(), &scn.ns);
    let caps_as_a = Api::<CSIStorageCapacity>::namespaced(as_a.clone(), STEAD_NAMESPACE);

    step(&format!("node {b}'s PV and claim, as node {a}'s agent"));
    refused(
        &format!("deleting node {b}'s PV {name_b}"),
        pvs_as_a.delete(&name_b, &DeleteParams::default()).await,
        &[a, &name_b],
    );
    refused(
        &format!("patching node {b}'s PV {name_b} to Retain"),
        pvs_as_a
            .patch(
                &name_b,
                &PatchParams::default(),
                &merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}})),
            )
            .await,
        &[a, &name_b],
    );
    refused(
        &format!("taking node {b}'s claim on-b for node {a}"),
        pvcs_as_a
            .patch(
                "on-b",
                &PatchParams::default(),
                &merge(json!({"metadata": {"annotations": {SELECTED_NODE: a}}})),
            )
            .await,
        &[a, "on-b", b],
    );
    refused(
        &format!("patching the status of node {b}'s claim on-b"),
        pvcs_as_a
            .patch_status(
                "on-b",
                &PatchParams::default(),
                &merge(json!({"status": {"allocatedResources": {"storage": "1Gi"}}})),
            )
            .await,
        &[a, "on-b"],
    );
    refused(
        &format!("publishing the capacity of node {b}"),
        caps_as_a.create(&dry_run(), &capacity_of(b)).await,
        &[a],
    );

    step("nothing of node B's changed");
    let now = pvs.get(&name_b).await.expect("node B's PV is still there");
    assert_eq!(now.uid(), pv_b.uid(), "the same PV");
    assert!(
        now.metadata.deletion_timestamp.is_none(),
        "not being deleted"
    );
    assert_eq!(
        now.spec.and_then(|s| s.persistent_volume_reclaim_policy),
        pv_b.spec
            .clone()
            .and_then(|s| s.persistent_volume_reclaim_policy),
        "its reclaim policy"
    );
    let claim_b = pvcs
        .get("on-b")
        .await
        .expect("node B's claim is still there");
    assert_eq!(
        claim_b.annotations().get(SELECTED_NODE).map(String::as_str),
        Some(b),
        "still node {b}'s"
    );
    assert_eq!(
        claim_b.status.and_then(|s| s.phase).as_deref(),
        Some("Bound")
    );

    step(&format!(
        "node {a}'s own PV, claim and capacity, as its agent"
    ));
    allowed(
        &format!("annotating node {a}'s PV {name_a}"),
        annotate(&pvs_as_a, &name_a, "own").await,
    );
    allowed(
        &format!("deleting node {a}'s PV {name_a} (dry run)"),
        pvs_as_a
            .delete(
                &name_a,
                &DeleteParams {
                    dry_run: true,
                    ..Default::default()
                },
            )
            .await,
    );
    allowed(
        &format!("annotating node {a}'s claim on-a"),
        annotate(&pvcs_as_a, "on-a", "own").await,
    );
    allowed(
        &format!("publishing the capacity of node {a} (dry run)"),
        caps_as_a.create(&dry_run(), &capacity_of(a)).await,
    );
    assert!(
        pvs.get(&name_a)
            .await
            .expect("node A's PV")
            .metadata
            .deletion_timestamp
            .is_none(),
        "a dry run deletes nothing"
    );

    step(
        "a token of the agents' account bound to no pod names no node: refused on node A's PV too",
    );
    let unbound = client_with(agent_token(&scn.client, None).await).await;
    refused(
        &format!("annotating node {a}'s PV {name_a} with an unbound token"),
        annotate(&Api::<PersistentVolume>::all(unbound), &name_a, "unbound").await,
        &["bound to its pod"],
    );

    scn.finish().await;
}
