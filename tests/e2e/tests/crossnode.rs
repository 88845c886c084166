//! Cross-node restore (issue 15): a snapshot taken on one node, restored
//! into a claim whose pod must run on another node. The agent of the second
//! node makes the volume there and pulls the data from the agent of the
//! first over mutual TLS (Secret stead-transfer-tls, which
//! tests/e2e/deploy.sh makes); the pod reads the same token and the same
//! sha256 of a 64 MiB file of random bytes.
//!
//! Not in `make e2e`'s default suites yet; run it on the bundled cluster
//! (which `make deploy` brings up with the Secret) with
//!
//!   make e2e E2E_SUITES=crossnode
//!
//! or, against a cluster already deployed,
//!
//!   source /tmp/stead-cluster/env && cargo test -p stead-e2e --test crossnode -- --nocapture

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};
use serde_json::json;
use stead_e2e::*;

const WAIT: Duration = Duration::from_secs(180);

fn snapshots(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn claim(name: &str, source: Option<serde_json::Value>) -> PersistentVolumeClaim {
    let mut spec = json!({
        "storageClassName": "stead",
        "accessModes": ["ReadWriteOnce"],
        "resources": { "requests": { "storage": "500Mi" } },
    });
    if let Some(source) = source {
        spec["dataSource"] = source;
    }
    from_json(json!({ "metadata": { "name": name }, "spec": spec }))
}

/// A pod pinned by nodeSelector to `node`, claim `claim` at /data, running
/// `script` first.
fn pinned(name: &str, claim: &str, node: &str, script: &str) -> Pod {
    busybox_pod(
        name,
        script,
        json!({
            "nodeSelector": { "kubernetes.io/hostname": node },
            "volumes": [{ "name": "v", "persistentVolumeClaim": { "claimName": claim } }],
            "containers": [{ "volumeMounts": [{ "name": "v", "mountPath": "/data" }] }],
        }),
    )
}

/// The token and the sha256 of the 64 MiB file in pod `pod`'s volume.
async fn fingerprint(pods: &Api<Pod>, pod: &str) -> (String, String) {
    let token = sh(pods, pod, "cat /data/token").await;
    let sum = sh(pods, pod, "sha256sum /data/big | cut -d' ' -f1").await;
    (token.trim().to_string(), sum.trim().to_string())
}

#[tokio::test]
async fn a_snapshot_restored_on_another_node_holds_the_same_token_and_checksum() {
    let scn = Scenario::new("xrestore").await;
    let nodes = schedulable_nodes(&scn.client).await;
    let (Some(first), Some(second)) = (nodes.first(), nodes.get(1)) else {
        step("one schedulable node only: a cross-node restore needs a second node");
        scn.finish().await;
        return;
    };
    let (first, second) = (first.name.clone(), second.name.clone());
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let snaps = snapshots(&scn.client, &scn.ns);

    step(&format!(
        "a pod on {first} writes a token and 64 MiB of random bytes into its volume"
    ));
    create(&pvcs, &claim("data", None)).await;
    let token = token();
    create(&pods, &pinned("writer", "data", &first, "")).await;
    wait_ready(&pods, "writer").await;
    sh(
        &pods,
        "writer",
        &format!(
            "echo '{token}' > /data/token && dd if=/dev/urandom of=/data/big bs=1M count=64 2>/dev/null && sync"
        ),
    )
    .await;
    let written = fingerprint(&pods, "writer").await;
    assert_eq!(written.0, token);
    assert_eq!(written.1.len(), 64, "a sha256: {:?}", written.1);
    let source_pv = volume_of(&scn.client, &wait_bound(&pvcs, "data").await).await;
    assert_eq!(pinned_node(&source_pv).as_deref(), Some(first.as_str()));

    step(&format!(
        "a VolumeSnapshot of it, taken by the agent of {first}"
    ));
    let snap: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": { "name": "snap" },
        "spec": {
            "volumeSnapshotClassName": "stead",
            "source": { "persistentVolumeClaimName": "data" },
        },
    }));
    snaps
        .create(&PostParams::default(), &snap)
        .await
        .expect("creating VolumeSnapshot snap");
    poll_until_async("VolumeSnapshot snap to be readyToUse", WAIT, || async {
        match snaps.get_opt("snap").await {
            Ok(Some(s)) if s.data["status"]["readyToUse"] == json!(true) => Ok(()),
            Ok(s) => Err(format!(
                "status {}",
                s.map(|s| s.data["status"].to_string()).unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    // Written after the snapshot: the restore must not hold it.
    sh(
        &pods,
        "writer",
        "echo after-the-snapshot > /data/token && sync",
    )
    .await;

    step(&format!(
        "a claim restored from it, its pod pinned to {second}: the agent of {second} pulls the data from {first}"
    ));
    create(
        &pvcs,
        &claim(
            "restored",
            Some(
                json!({ "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap" }),
            ),
        ),
    )
    .await;
    create(&pods, &pinned("reader", "restored", &second, "")).await;
    wait_event(
        &scn.client,
        "restored",
        "Pulling",
        &[second.as_str(), first.as_str()],
        WAIT,
    )
    .await;
    wait_event(
        &scn.client,
        "restored",
        "Pulled",
        &[first.as_str(), "digest verified"],
        WAIT,
    )
    .await;
    wait_event(
        &scn.client,
        "restored",
        "ProvisioningSucceeded",
        &[second.as_str(), "pulled from node"],
        WAIT,
    )
    .await;
    wait_ready(&pods, "reader").await;
    assert_eq!(
        node_of(&pods.get("reader").await.expect("reading reader")),
        second,
        "the pod runs on the node it was pinned to"
    );
    let restored_pv = volume_of(&scn.client, &wait_bound(&pvcs, "restored").await).await;
    assert_eq!(
        pinned_node(&restored_pv).as_deref(),
        Some(second.as_str()),
        "the restored volume lives on {second}"
    );

    step("the restored volume holds the token and the checksum of the snapshot");
    let read = fingerprint(&pods, "reader").await;
    assert_eq!(
        read, written,
        "token and sha256 of /data/big, on {second} and {first}"
    );

    scn.finish().await;
}

/// Kills (SIGKILL) the Stead agent of `node` as a crash does; its kubelet
/// starts the container again in the same pod.
async fn crash_agent(client: &Client, node: &str) {
    let local = LocalNode::all()
        .into_iter()
        .find(|n| n.name == node)
        .unwrap_or_else(|| panic!("node {node} is not a node of the local cluster"));
    let killed = local.kill_agent().await;
    assert!(killed > 0, "no Stead agent process ran on {node}");
    step(&format!("the agent of {node} killed ({killed} processes)"));
    // Its restart is the kubelet's; the test waits for what it does next.
    agent_pod(client, node).await;
}

#[tokio::test]
async fn a_pull_broken_by_either_agent_s_crash_finishes_with_the_same_data() {
    let scn = Scenario::new("xbreak").await;
    let nodes = schedulable_nodes(&scn.client).await;
    let (Some(first), Some(second)) = (nodes.first(), nodes.get(1)) else {
        step("one schedulable node only: a cross-node restore needs a second node");
        scn.finish().await;
        return;
    };
    let (first, second) = (first.name.clone(), second.name.clone());
    let pods: Api<Pod> = scn.api();
    let pvcs: Api<PersistentVolumeClaim> = scn.api();
    let snaps = snapshots(&scn.client, &scn.ns);

    // 384 MiB: several seconds on the wire here, so that a crash right
    // after the pull begins lands in its middle.
    step(&format!(
        "a pod on {first} writes a token and 384 MiB of random bytes; a snapshot of it"
    ));
    create(&pvcs, &claim("data", None)).await;
    let token = token();
    create(&pods, &pinned("writer", "data", &first, "")).await;
    wait_ready(&pods, "writer").await;
    sh(
        &pods,
        "writer",
        &format!(
            "echo '{token}' > /data/token && dd if=/dev/urandom of=/data/big bs=1M count=384 2>/dev/null && sync"
        ),
    )
    .await;
    let written = fingerprint(&pods, "writer").await;
    let snap: DynamicObject = from_json(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": { "name": "snap" },
        "spec": {
            "volumeSnapshotClassName": "stead",
            "source": { "persistentVolumeClaimName": "data" },
        },
    }));
    snaps
        .create(&PostParams::default(), &snap)
        .await
        .expect("creating VolumeSnapshot snap");
    poll_until_async("VolumeSnapshot snap to be readyToUse", WAIT, || async {
        match snaps.get_opt("snap").await {
            Ok(Some(s)) if s.data["status"]["readyToUse"] == json!(true) => Ok(()),
            Ok(s) => Err(format!(
                "status {}",
                s.map(|s| s.data["status"].to_string()).unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;

    for (claim_name, victim, role) in [
        ("holder-crash", first.as_str(), "holder"),
        ("target-crash", second.as_str(), "target"),
    ] {
        step(&format!(
            "{claim_name}: restored on {second}; the {role}'s agent ({victim}) killed once the pull began"
        ));
        let source = json!({ "apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap" });
        create(&pvcs, &claim(claim_name, Some(source))).await;
        let reader = format!("{claim_name}-reader");
        create(&pods, &pinned(&reader, claim_name, &second, "")).await;
        wait_event(&scn.client, claim_name, "Pulling", &[first.as_str()], WAIT).await;
        crash_agent(&scn.client, victim).await;
        let seen = wait_event(
            &scn.client,
            claim_name,
            "Pulled",
            &[first.as_str(), "digest verified"],
            WAIT,
        )
        .await;
        // The crash broke the pull: the target said so and resumed, or a
        // restarted target pulled again (a second Pulling).
        let broken = seen.contains("could not finish pulling")
            || seen.contains("resumed at")
            || seen.contains("a broken one was resumed")
            || seen.lines().filter(|l| l.contains("Pulling")).count() >= 2;
        assert!(
            broken,
            "the {role}'s crash did not break the pull (it finished first?):\n{seen}"
        );
        wait_ready(&pods, &reader).await;
        assert_eq!(
            fingerprint(&pods, &reader).await,
            written,
            "{claim_name}: token and sha256 of /data/big after the broken pull"
        );
        let pv = volume_of(&scn.client, &wait_bound(&pvcs, claim_name).await).await;
        assert_eq!(pinned_node(&pv).as_deref(), Some(second.as_str()));
    }

    scn.finish().await;
}
