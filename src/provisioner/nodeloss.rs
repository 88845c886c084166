//! Node loss: the volumes of a node that is gone, opted in per StorageClass
//! (`onNodeLoss: release`), are released so that their pods start on
//! another node with a new, empty volume (a replicated database rebuilds the
//! replica from its peers). The default (`keep`) deletes nothing and says
//! why the pod is stuck and what to do.
//!
//! A lost node's own agent is dead, so the other agents elect one through a
//! Lease ([`LEASE`], kube-lease-manager) and only the leader acts. Each
//! round it lists the Nodes and the Stead PVs' metadata (on demand, no
//! cluster-wide PV cache) and finds the nodes that hold Stead PVs and are
//! lost: their Node object is gone, or NotReady and tainted
//! `node.kubernetes.io/unreachable` for longer than the PV's class said
//! ([`verdict`]). For each PV there ([`plan`]): an Event on the claim; the
//! pods on the lost node that use the claim are deleted (grace 0); the claim
//! is deleted (the StatefulSet controller creates it again for its Pending
//! pod: `processReplica` calls `createMissingPersistentVolumeClaims`, in
//! Kubernetes v1.34.4's `pkg/controller/statefulset/stateful_set_control.go`;
//! so the pod gets a new empty volume on a live node); Stead's finalizer is removed from the PV and the PV deleted. Each
//! step is an Event on the claim, and is taken only after a fresh GET of the
//! Node says it is still lost (and while this agent still leads).
//!
//! Every step is idempotent and a round starts from what the apiserver says,
//! so a leader killed at any point leaves work that the next leader (or its
//! own next round) finishes; two leaders for a moment (a lease that expired
//! under a partitioned leader) do the same deletions, which 404 the second
//! time. Data is never deleted here: the lost node's volumes stay on its
//! disk until it comes back, when its own agent removes those whose PV is
//! gone (`reclaim::reap_released`), never while mounted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use super::class::{DEFAULT_NODE_LOSS_TIMEOUT, NodeLoss};
use super::{Ctx, Error, pv, scope};
use crate::NODE_LABEL;

/// The Lease the agents elect the node-loss leader with, in the agents'
/// namespace.
pub const LEASE: &str = "stead-node-loss";
/// The taint the node lifecycle controller puts on a node whose kubelet
/// stopped posting its status.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
/// How long a lease is held without renewal before another agent may take
/// it; the leader renews it [`LEASE_GRACE`] before that.
const LEASE_SECONDS: u64 = 15;
const LEASE_GRACE: u64 = 5;
/// A leader looks at the cluster this often.
const ROUND: Duration = Duration::from_secs(15);
/// PVs read per page while looking for the nodes that hold them.
const PAGE: u32 = 500;
/// The Events' action.
const ACTION: &str = "NodeLoss";

/// What the apiserver says of a node that holds Stead volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// No Node object of that name.
    Gone,
    /// Not Ready, and tainted unreachable (NoExecute) since `since` (the
    /// taint's timeAdded); `None`: the taint has no time, so how long is
    /// not known.
    Unreachable { since: Option<Timestamp> },
    /// Anything else: Ready, or NotReady without the taint (a kubelet that
    /// says it is not ready is alive).
    Live,
}

/// Whether a node is lost for a volume whose class gives `timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Live,
    /// Unreachable, not yet for `timeout`: lost at `until` if still so.
    Wait {
        until: Timestamp,
    },
    /// Lost: its Node is gone (`since: None`), or unreachable since `since`.
    Lost {
        since: Option<Timestamp>,
    },
}

/// The state of `node` (`None`: no Node object).
pub fn node_state(node: Option<&Node>) -> NodeState {
    let Some(node) = node else {
        return NodeState::Gone;
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    if ready {
        return NodeState::Live;
    }
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let unreachable: Vec<_> = taints
        .iter()
        .filter(|t| t.key == UNREACHABLE_TAINT)
        .collect();
    if unreachable.is_empty() {
        return NodeState::Live;
    }
    // The NoExecute taint carries timeAdded; the NoSchedule one does not.
    let since = unreachable
        .iter()
        .filter_map(|t| t.time_added.as_ref().map(|t| t.0))
        .min();
    NodeState::Unreachable { since }
}

/// Whether a node in `state` is lost, at `now`, for a class that waits
/// `timeout`.
pub fn verdict(state: &NodeState, timeout: Duration, now: Timestamp) -> Verdict {
    match state {
        NodeState::Live => Verdict::Live,
        NodeState::Gone => Verdict::Lost { since: None },
        // Unreachable since when is not known: not judged lost (the
        // taint manager's own taint always has its time).
        NodeState::Unreachable { since: None } => Verdict::Live,
        NodeState::Unreachable { since: Some(since) } => {
            let secs = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
            let until_s = since.as_second().saturating_add(secs);
            let until = Timestamp::from_second(until_s).unwrap_or(Timestamp::MAX);
            if now >= until {
                Verdict::Lost {
                    since: Some(*since),
                }
            } else {
                Verdict::Wait { until }
            }
        }
    }
}

/// How a lost node is described in Events.
pub fn describe(node: &str, since: Option<Timestamp>, timeout: Duration) -> String {
    match since {
        None => format!("node {node} is lost: its Node object is gone"),
        Some(t) => format!(
            "node {node} is lost: NotReady and tainted {UNREACHABLE_TAINT} since {t}, longer than the class's nodeLossTimeout of {} s",
            timeout.as_secs()
        ),
    }
}

/// One step of releasing a PV of a lost node, in the order taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A pod on the lost node that uses the claim (grace 0: its kubelet
    /// will never confirm).
    DeletePod {
        namespace: String,
        name: String,
    },
    /// The claim the PV is bound to (the uid its claimRef names).
    DeleteClaim {
        namespace: String,
        name: String,
    },
    /// Stead's finalizer, which only the node's own agent would remove once
    /// its volume is deleted.
    DropFinalizer,
    DeletePv,
}

/// The claim a PV's claimRef names: (namespace, name, uid).
pub fn claim_of(pv: &PersistentVolume) -> Option<(String, String, Option<String>)> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some((r.namespace.clone()?, r.name.clone()?, r.uid.clone()))
}

/// What is left to do to release `pv` of the lost node `node`, given its
/// claim as read now (`claim`: the object of the claimRef's namespace and
/// name, if any) and the pods bound to `node`. A claim of that name but
/// another uid is a new claim (the StatefulSet made it again): neither it
/// nor its pods are touched. Steps done already are left out, so a plan
/// made after a crash goes on where the last one stopped.
pub fn plan(
    pv: &PersistentVolume,
    claim: Option<&PersistentVolumeClaim>,
    pods: &[Pod],
    node: &str,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let ours = claim_of(pv).and_then(|(ns, name, uid)| {
        let c = claim?;
        let same = uid.is_some() && c.metadata.uid == uid;
        same.then_some((ns, name, c))
    });
    if let Some((ns, name, c)) = ours {
        for pod in pods {
            let spec = pod.spec.as_ref();
            let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
            let uses = spec
                .and_then(|s| s.volumes.as_deref())
                .unwrap_or_default()
                .iter()
                .filter_map(|v| v.persistent_volume_claim.as_ref())
                .any(|v| v.claim_name == name);
            // Already force-deleted: only finalizers hold it.
            let forced = pod.metadata.deletion_timestamp.is_some()
                && pod.metadata.deletion_grace_period_seconds == Some(0);
            if on_node && uses && !forced && pod.metadata.namespace.as_deref() == Some(&ns) {
                steps.push(Step::DeletePod {
                    namespace: ns.clone(),
                    name: pod.name_any(),
                });
            }
        }
        if c.metadata.deletion_timestamp.is_none() {
            steps.push(Step::DeleteClaim {
                namespace: ns,
                name,
            });
        }
    }
    if pv.finalizers().iter().any(|f| f == pv::FINALIZER) {
        steps.push(Step::DropFinalizer);
    }
    if pv.metadata.deletion_timestamp.is_none() {
        steps.push(Step::DeletePv);
    }
    steps
}

/// The note of the Warning on the claim of a kept volume on a lost node:
/// what holds the pod, and the three ways on.
pub fn kept_message(lost: &str, pv: &PersistentVolume) -> String {
    let claim = claim_of(pv)
        .map(|(ns, n, _)| format!("{ns}/{n}"))
        .unwrap_or_else(|| "(none)".into());
    let class = pv
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or_default();
    format!(
        "{lost}, and holds volume {} of claim {claim}; class {class} keeps it (onNodeLoss: keep, the default), so nothing is deleted and a pod of this claim cannot start on another node: its volume lives on that node. Next: bring the node back (the pod returns with its data); or delete claim {claim} and its pod so that the pod starts on another node with a new empty volume (the data on the lost node is given up); claims of a class with onNodeLoss: release are released so by themselves",
        pv.name_any()
    )
}

/// The claim of `pv` as the subject of an Event (it may be gone already:
/// the Event still names it).
fn claim_ref(pv: &PersistentVolume) -> Option<ObjectReference> {
    let (namespace, name, uid) = claim_of(pv)?;
    Some(ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(namespace),
        name: Some(name),
        uid,
        ..Default::default()
    })
}

/// What a leader remembers between its rounds: what it said, so that each
/// is said once per claim (another leader says it once more).
#[derive(Debug, Default)]
struct Worker {
    /// Claim uids (or PV names) told that their node is lost and kept.
    kept: HashSet<String>,
    /// PV names told that they are being released.
    releasing: HashSet<String>,
    /// PV names told that their node is unreachable and when they go.
    waiting: HashSet<String>,
}

/// Elects the node-loss leader among the agents and, while this agent
/// leads, releases the volumes of lost nodes ([`round`] every [`ROUND`]).
/// Never ends: a failure is logged and tried again.
pub(crate) async fn run<C>(ctx: Arc<Ctx<C>>) {
    let namespace = ctx
        .config
        .pod_namespace
        .clone()
        .unwrap_or_else(|| ctx.config.capacity_namespace.clone());
    // The pod name is unique among the agents; a node name too.
    let identity = ctx
        .config
        .pod_name
        .clone()
        .unwrap_or_else(|| ctx.config.node.clone());
    loop {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(ctx.client.clone(), LEASE)
            .with_namespace(&namespace)
            .with_identity(&identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(LEASE_GRACE)
            .build()
            .await;
        let manager = match manager {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(lease = %format!("{namespace}/{LEASE}"), error = %e, "cannot use the node-loss Lease; trying again in 30 s");
                tokio::time::sleep(Duration::from_secs(30)).await;
                continue;
            }
        };
        let (mut leading, task) = manager.watch().await;
        lead_while_elected(&ctx, &mut leading).await;
        // The lease task ended (its errors are retried inside it; it ends
        // when the channel does): start over.
        task.abort();
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Acts while `leading` says so; returns when the lease task ends.
async fn lead_while_elected<C>(ctx: &Ctx<C>, leading: &mut watch::Receiver<bool>) {
    loop {
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return;
            }
        }
        tracing::info!(node = %ctx.config.node, lease = LEASE, "this agent leads node loss");
        let mut worker = Worker::default();
        loop {
            if let Err(e) = round(ctx, &mut worker, leading).await {
                tracing::warn!(error = %e, "node-loss round failed; trying again next round");
            }
            tokio::select! {
                _ = tokio::time::sleep(ROUND) => {}
                r = leading.changed() => if r.is_err() { return },
            }
            if !*leading.borrow() {
                tracing::info!(node = %ctx.config.node, lease = LEASE, "this agent no longer leads node loss");
                break;
            }
        }
    }
}

/// The node label values of every Stead PV, read page by page as metadata.
async fn pv_node_labels(pvs: &Api<PersistentVolume>) -> Result<HashSet<String>, kube::Error> {
    let mut params = ListParams::default().labels(NODE_LABEL).limit(PAGE);
    let mut labels = HashSet::new();
    loop {
        let page = pvs.list_metadata(&params).await?;
        for p in &page.items {
            if let Some(v) = p.labels().get(NODE_LABEL) {
                labels.insert(v.clone());
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(labels),
        }
    }
}

/// One round of the leader: every lost (or unreachable) node that holds
/// Stead PVs, and each of its PVs.
async fn round<C>(
    ctx: &Ctx<C>,
    worker: &mut Worker,
    leading: &watch::Receiver<bool>,
) -> Result<(), Error> {
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let nodes = nodes_api.list(&ListParams::default()).await?;
    let by_label: HashMap<String, &Node> = nodes
        .items
        .iter()
        .map(|n| (scope::node_label(&n.name_any()), n))
        .collect();
    let mut suspects: BTreeMap<String, NodeState> = BTreeMap::new();
    for label in pv_node_labels(&pvs).await? {
        let state = node_state(by_label.get(&label).copied());
        if state != NodeState::Live {
            suspects.insert(label, state);
        }
    }
    for label in suspects.keys() {
        let list = pvs
            .list(&ListParams::default().labels(&format!("{NODE_LABEL}={label}")))
            .await?;
        let mut pods: Option<Vec<Pod>> = None;
        for found in list.items {
            if !*leading.borrow() {
                return Ok(());
            }
            if pv::stead_volume_handle(&found).is_none() {
                continue;
            }
            let Some(node) = pv::pv_node(&found).map(str::to_string) else {
                continue;
            };
            // The state of the node this PV is pinned to (a hashed label
            // may stand for more than one name).
            let state = node_state(nodes.items.iter().find(|n| n.name_any() == node));
            if let Err(e) = volume(ctx, worker, leading, &found, &node, &state, &mut pods).await {
                tracing::warn!(pv = %found.name_any(), node = %node, error = %e, "node loss: step failed; tried again next round");
            }
        }
    }
    Ok(())
}

/// One PV of a node that is not live.
async fn volume<C>(
    ctx: &Ctx<C>,
    worker: &mut Worker,
    leading: &watch::Receiver<bool>,
    found: &PersistentVolume,
    node: &str,
    state: &NodeState,
    pods: &mut Option<Vec<Pod>>,
) -> Result<(), Error> {
    let name = found.name_any();
    let now = Timestamp::now();
    let Some(subject) = claim_ref(found) else {
        return Ok(());
    };
    let timeout = match pv::node_loss(found) {
        NodeLoss::Keep => {
            // Said once a kept volume's node is lost by the default wait.
            if let Verdict::Lost { since } = verdict(state, DEFAULT_NODE_LOSS_TIMEOUT, now) {
                let key = subject.uid.clone().unwrap_or_else(|| name.clone());
                // A Released PV's claim is gone already: no pod waits for it.
                let released = matches!(
                    found.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Released" | "Failed")
                );
                if found.metadata.deletion_timestamp.is_none()
                    && !released
                    && worker.kept.insert(key)
                {
                    let lost = describe(node, since, DEFAULT_NODE_LOSS_TIMEOUT);
                    let note = kept_message(&lost, found);
                    tracing::warn!(pv = %name, node, "{note}");
                    ctx.events.post(
                        subject,
                        EventType::Warning,
                        "NodeLostVolumeKept",
                        ACTION,
                        note,
                    );
                }
            }
            return Ok(());
        }
        NodeLoss::Release { timeout } => timeout,
    };
    let since = match verdict(state, timeout, now) {
        Verdict::Live => return Ok(()),
        Verdict::Wait { until } => {
            if worker.waiting.insert(name.clone()) {
                let note = format!(
                    "node {node} is NotReady and tainted {UNREACHABLE_TAINT}; if it stays so until {until} (the class's nodeLossTimeout of {} s), claim {}/{} is released: its pod starts on another node with a new empty volume and the data of volume {name} on {node} is given up. Bring the node back before then to keep it",
                    timeout.as_secs(),
                    subject.namespace.as_deref().unwrap_or_default(),
                    subject.name.as_deref().unwrap_or_default(),
                );
                ctx.events
                    .post(subject, EventType::Warning, "NodeUnreachable", ACTION, note);
            }
            return Ok(());
        }
        Verdict::Lost { since } => since,
    };
    let claim_key = format!(
        "{}/{}",
        subject.namespace.as_deref().unwrap_or_default(),
        subject.name.as_deref().unwrap_or_default()
    );
    let claim = match claim_of(found) {
        Some((ns, n, _)) => {
            Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&n)
                .await?
        }
        None => None,
    };
    if pods.is_none() {
        let on_node = Api::<Pod>::all(ctx.client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?;
        *pods = Some(on_node.items);
    }
    let steps = plan(
        found,
        claim.as_ref(),
        pods.as_deref().unwrap_or_default(),
        node,
    );
    if steps.is_empty() {
        return Ok(());
    }
    let lost = describe(node, since, timeout);
    if worker.releasing.insert(name.clone()) {
        let note = format!(
            "{lost}; class {} releases claim {claim_key} (onNodeLoss: release): its pods on {node} are deleted, then the claim, then PV {name}, so that the pod starts on another node with a new empty volume; the data of volume {name} on {node} is given up (removed by that node's agent if it comes back)",
            found
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref())
                .unwrap_or_default(),
        );
        tracing::warn!(pv = %name, pvc = %claim_key, node, "{note}");
        ctx.events.post(
            subject.clone(),
            EventType::Warning,
            "NodeLost",
            ACTION,
            note,
        );
    }
    for step in steps {
        // Fresh: the node may have come back since the list.
        let now_state = node_state(
            Api::<Node>::all(ctx.client.clone())
                .get_opt(node)
                .await?
                .as_ref(),
        );
        if !matches!(
            verdict(&now_state, timeout, Timestamp::now()),
            Verdict::Lost { .. }
        ) {
            let note = format!(
                "node {node} is back ({now_state:?}): node loss stops for claim {claim_key} and PV {name}; what was done stays done, nothing more is deleted"
            );
            tracing::info!(pv = %name, node, "{note}");
            ctx.events
                .post(subject, EventType::Normal, "NodeLossStopped", ACTION, note);
            worker.releasing.remove(&name);
            return Ok(());
        }
        if !*leading.borrow() {
            return Ok(());
        }
        take(ctx, found, &step).await?;
        let (reason, note) = match &step {
            Step::DeletePod {
                namespace,
                name: pod,
            } => (
                "NodeLossPodDeleted",
                format!(
                    "deleted pod {namespace}/{pod} (grace 0) on lost node {node}: it used claim {claim_key}, and its kubelet will never confirm its end"
                ),
            ),
            Step::DeleteClaim { .. } => (
                "NodeLossClaimDeleted",
                format!(
                    "deleted claim {claim_key} of volume {name} on lost node {node}: its StatefulSet creates it again for its Pending pod, with a new empty volume on a live node (any other owner must create it again)"
                ),
            ),
            Step::DropFinalizer => (
                "NodeLossFinalizerRemoved",
                format!(
                    "removed finalizer {} from PV {name} of lost node {node}: its agent, which would remove it after deleting the volume, is gone",
                    pv::FINALIZER
                ),
            ),
            Step::DeletePv => (
                "NodeLossVolumeReleased",
                format!(
                    "deleted PV {name} of lost node {node} (claim {claim_key}); should the node come back, its agent removes the volume's data there after its leak grace, never while it is mounted"
                ),
            ),
        };
        tracing::warn!(pv = %name, pvc = %claim_key, node, reason, "{note}");
        ctx.events
            .post(subject.clone(), EventType::Normal, reason, ACTION, note);
    }
    Ok(())
}

/// Takes one step; what is gone already counts as done.
async fn take<C>(ctx: &Ctx<C>, found: &PersistentVolume, step: &Step) -> Result<(), Error> {
    let gone = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map_err(Error::from),
    };
    let name = found.name_any();
    match step {
        Step::DeletePod { namespace, name } => {
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
            gone(
                api.delete(name, &DeleteParams::default().grace_period(0))
                    .await
                    .map(drop),
            )
        }
        Step::DeleteClaim {
            namespace,
            name: claim,
        } => {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
            // Only the claim of this PV, not a newer one of the same name.
            let uid = claim_of(found).and_then(|(_, _, u)| u);
            let params = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(claim, &params).await {
                // The uid differs: a newer claim, not ours; leave it.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                r => gone(r.map(drop)),
            }
        }
        Step::DropFinalizer => {
            let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
            let remaining: Vec<&String> = found
                .finalizers()
                .iter()
                .filter(|f| f.as_str() != pv::FINALIZER)
                .collect();
            // A compare-and-swap on the list: a PV changed since it was
            // read is looked at again next round.
            let patch = json!({"metadata": {
                "resourceVersion": found.resource_version(),
                "finalizers": remaining,
            }});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                r => gone(r.map(drop)),
            }
        }
        Step::DeletePv => {
            let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
            gone(api.delete(&name, &DeleteParams::default()).await.map(drop))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;
    use k8s_openapi::api::core::v1::{
        NodeCondition, NodeSpec, NodeStatus, PersistentVolumeClaimVolumeSource, PodSpec, Taint,
        Volume,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn node(ready: &str, taints: Vec<Taint>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n2".into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn unreachable(effect: &str, added: Option<i64>) -> Taint {
        Taint {
            key: UNREACHABLE_TAINT.into(),
            effect: effect.into(),
            time_added: added.map(|s| Time(at(s))),
            value: None,
        }
    }

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn a_deleted_node_is_lost_at_once() {
        assert_eq!(node_state(None), NodeState::Gone);
        assert_eq!(
            verdict(&NodeState::Gone, FIVE_MIN, at(0)),
            Verdict::Lost { since: None }
        );
    }

    #[test]
    fn an_unreachable_node_is_lost_only_after_the_timeout_from_the_taints_time() {
        let n = node(
            "Unknown",
            vec![
                unreachable("NoSchedule", None),
                unreachable("NoExecute", Some(0)),
            ],
        );
        let state = node_state(Some(&n));
        assert_eq!(state, NodeState::Unreachable { since: Some(at(0)) });
        assert_eq!(
            verdict(&state, FIVE_MIN, at(299)),
            Verdict::Wait { until: at(300) }
        );
        assert_eq!(
            verdict(&state, FIVE_MIN, at(300)),
            Verdict::Lost { since: Some(at(0)) }
        );
        // A longer class waits longer on the same node.
        assert_eq!(
            verdict(&state, Duration::from_secs(3600), at(300)),
            Verdict::Wait { until: at(3600) }
        );
    }

    #[test]
    fn a_ready_node_or_a_notready_one_without_the_taint_is_live() {
        // Ready again while the taint is still there (the controller takes
        // it off a moment later): live.
        let back = node("True", vec![unreachable("NoExecute", Some(0))]);
        assert_eq!(node_state(Some(&back)), NodeState::Live);
        // A kubelet that says it is not ready is alive, whatever the time.
        let not_ready = node("False", vec![]);
        assert_eq!(node_state(Some(&not_ready)), NodeState::Live);
        assert_eq!(
            verdict(&node_state(Some(&not_ready)), FIVE_MIN, at(100_000)),
            Verdict::Live
        );
        // A taint without its time: how long is not known, so not lost.
        let untimed = node("Unknown", vec![unreachable("NoSchedule", None)]);
        assert_eq!(
            verdict(&node_state(Some(&untimed)), FIVE_MIN, at(100_000)),
            Verdict::Live
        );
    }

    fn released_pv(claim: &PersistentVolumeClaim) -> PersistentVolume {
        let class = crate::provisioner::class::parse(&crate::provisioner::class::tests::class(
            "db",
            &[("onNodeLoss", "release")],
            "WaitForFirstConsumer",
            "Delete",
        ))
        .unwrap();
        let volume = crate::proto::csi::v1::Volume {
            volume_id: format!("pvc-{}", claim.metadata.uid.clone().unwrap()),
            capacity_bytes: 16 << 20,
            ..Default::default()
        };
        pv::build_pv(claim, &class, &volume, "n2")
    }

    fn pod(name: &str, node: &str, claim: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("db".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                volumes: Some(vec![Volume {
                    name: "data".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.into(),
                        read_only: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn a_pv_of_a_lost_node_is_released_pods_then_claim_then_finalizer_then_pv() {
        let claim = pvc("data-0", "16Mi", Some("n2"));
        let pv = released_pv(&claim);
        let pods = [
            pod("db-0", "n2", "data-0"),
            pod("other", "n2", "data-1"),
            pod("elsewhere", "n1", "data-0"),
        ];
        assert_eq!(
            plan(&pv, Some(&claim), &pods, "n2"),
            [
                Step::DeletePod {
                    namespace: "db".into(),
                    name: "db-0".into()
                },
                Step::DeleteClaim {
                    namespace: "db".into(),
                    name: "data-0".into()
                },
                Step::DropFinalizer,
                Step::DeletePv,
            ]
        );
    }

    #[test]
    fn a_plan_after_a_crash_goes_on_where_the_last_one_stopped() {
        let mut claim = pvc("data-0", "16Mi", Some("n2"));
        let mut pv = released_pv(&claim);
        let mut forced = pod("db-0", "n2", "data-0");
        forced.metadata.deletion_timestamp = Some(Time(at(0)));
        forced.metadata.deletion_grace_period_seconds = Some(0);
        claim.metadata.deletion_timestamp = Some(Time(at(0)));
        // Pod force-deleted, claim being deleted: the PV's steps are left.
        assert_eq!(
            plan(&pv, Some(&claim), &[forced.clone()], "n2"),
            [Step::DropFinalizer, Step::DeletePv]
        );
        // Finalizer gone too, PV deleted (pv-protection holds it while the
        // claim is bound): nothing left.
        pv.metadata.finalizers = None;
        pv.metadata.deletion_timestamp = Some(Time(at(0)));
        assert!(plan(&pv, Some(&claim), &[forced], "n2").is_empty());
        // A pod merely Terminating (its grace not 0) is deleted with grace 0.
        let mut terminating = pod("db-0", "n2", "data-0");
        terminating.metadata.deletion_timestamp = Some(Time(at(0)));
        terminating.metadata.deletion_grace_period_seconds = Some(30);
        assert_eq!(plan(&pv, Some(&claim), &[terminating], "n2").len(), 1);
    }

    #[test]
    fn a_new_claim_of_the_same_name_and_its_pod_are_never_touched() {
        let old = pvc("data-0", "16Mi", Some("n2"));
        let pv = released_pv(&old);
        let mut new = old.clone();
        new.metadata.uid = Some("a-newer-claim".into());
        // Its pod may even be scheduled (on a live node, or Pending).
        let steps = plan(&pv, Some(&new), &[pod("db-0", "n2", "data-0")], "n2");
        assert_eq!(steps, [Step::DropFinalizer, Step::DeletePv]);
        // No claim at all: the PV alone.
        assert_eq!(
            plan(&pv, None, &[], "n2"),
            [Step::DropFinalizer, Step::DeletePv]
        );
    }

    #[test]
    fn the_kept_warning_names_node_since_claim_and_the_next_steps() {
        let claim = pvc("data-0", "16Mi", Some("n2"));
        let mut pv = released_pv(&claim);
        pv.spec.as_mut().unwrap().storage_class_name = Some("stead".into());
        let lost = describe("n2", Some(at(0)), FIVE_MIN);
        assert!(lost.starts_with(
            "node n2 is lost: NotReady and tainted node.kubernetes.io/unreachable since 2027-01-15T08:00:00Z"
        ), "{lost}");
        let note = kept_message(&describe("n2", None, FIVE_MIN), &pv);
        for part in [
            "node n2 is lost: its Node object is gone",
            &format!("holds volume {} of claim db/data-0", pv.name_any()),
            "class stead keeps it (onNodeLoss: keep, the default)",
            "cannot start on another node",
            "bring the node back",
            "delete claim db/data-0",
            "onNodeLoss: release",
        ] {
            assert!(note.contains(part), "{part:?} in {note}");
        }
    }

    /// The leader's steps for one PV of a node that is gone, against a fake
    /// apiserver: the claim, the pods of the node, then each step after a
    /// fresh GET of the Node; `back_after`: the Node GET answers a Ready node
    /// from that GET on (the node came back mid-way).
    async fn release_on_fake(
        back_after: Option<usize>,
    ) -> (
        crate::provisioner::tests::Fake,
        Vec<String>,
        Vec<(String, String)>,
    ) {
        use crate::provisioner::tests::{Answer, fake_answering, status};
        use std::sync::atomic::{AtomicUsize, Ordering};
        let claim = pvc("data-0", "16Mi", Some("n2"));
        let claim_json = serde_json::to_string(&claim).unwrap();
        let pod_json = serde_json::to_value(pod("db-0", "n2", "data-0")).unwrap();
        let node_gets = Arc::new(AtomicUsize::new(0));
        let answer: Answer = Arc::new(move |method: &http::Method, path: &str, _: &str| {
            let get = *method == http::Method::GET;
            match path {
                "/api/v1/namespaces/db/persistentvolumeclaims/data-0" if get => {
                    Some((200, claim_json.clone()))
                }
                "/api/v1/pods" if get => Some((
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {},
                           "items": [pod_json.clone()]})
                    .to_string(),
                )),
                "/api/v1/namespaces/db/pods/db-0" => Some((200, pod_json.to_string())),
                "/api/v1/nodes/n2" if get => {
                    let n = node_gets.fetch_add(1, Ordering::SeqCst);
                    if back_after.is_some_and(|b| n >= b) {
                        let mut back = node("True", vec![]);
                        back.metadata.name = Some("n2".into());
                        Some((200, serde_json::to_string(&back).unwrap()))
                    } else {
                        Some(status(404, "NotFound"))
                    }
                }
                _ => None,
            }
        });
        let f = fake_answering(&[], Some(answer)).await;
        let pv = released_pv(&claim);
        let (_tx, leading) = watch::channel(true);
        let mut worker = Worker::default();
        let mut pods = None;
        volume(
            &f.ctx,
            &mut worker,
            &leading,
            &pv,
            "n2",
            &NodeState::Gone,
            &mut pods,
        )
        .await
        .unwrap();
        let seen: Vec<String> = f
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                let q = if r.query.contains("gracePeriodSeconds")
                    || r.body.contains("\"gracePeriodSeconds\":0")
                {
                    " grace=0"
                } else if r.body.contains("\"uid\"") && r.method == "DELETE" {
                    " uid-precondition"
                } else {
                    ""
                };
                format!("{} {}{q}", r.method, r.path)
            })
            .collect();
        let posted = f.posted();
        (f, seen, posted)
    }

    #[tokio::test]
    async fn the_leader_releases_a_pv_of_a_gone_node_step_by_step_rechecking_the_node() {
        let (_f, seen, posted) = release_on_fake(None).await;
        let pv = "/api/v1/persistentvolumes/pvc-0a1b2c3d-0000-4000-8000-000000000001";
        assert_eq!(
            seen,
            [
                "GET /api/v1/namespaces/db/persistentvolumeclaims/data-0".to_string(),
                "GET /api/v1/pods".into(),
                "GET /api/v1/nodes/n2".into(),
                "DELETE /api/v1/namespaces/db/pods/db-0 grace=0".into(),
                "GET /api/v1/nodes/n2".into(),
                "DELETE /api/v1/namespaces/db/persistentvolumeclaims/data-0 uid-precondition"
                    .into(),
                "GET /api/v1/nodes/n2".into(),
                format!("PATCH {pv}"),
                "GET /api/v1/nodes/n2".into(),
                format!("DELETE {pv}"),
            ]
        );
        let reasons: Vec<&str> = posted.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "NodeLost",
                "NodeLossPodDeleted",
                "NodeLossClaimDeleted",
                "NodeLossFinalizerRemoved",
                "NodeLossVolumeReleased"
            ]
        );
        assert!(
            posted[0].1.starts_with(
                "node n2 is lost: its Node object is gone; class db releases claim db/data-0"
            ),
            "{}",
            posted[0].1
        );
        assert!(
            posted[1]
                .1
                .contains("deleted pod db/db-0 (grace 0) on lost node n2")
        );
    }

    #[tokio::test]
    async fn a_node_that_comes_back_mid_way_stops_the_release() {
        // The Node is back at the second fresh GET: the pod was deleted,
        // the claim and the PV are left alone.
        let (_f, seen, posted) = release_on_fake(Some(1)).await;
        assert!(
            seen.iter()
                .any(|r| r.starts_with("DELETE /api/v1/namespaces/db/pods/db-0"))
        );
        assert!(
            !seen
                .iter()
                .any(|r| r.contains("persistentvolumeclaims/data-0") && r.starts_with("DELETE")),
            "{seen:?}"
        );
        assert!(
            !seen.iter().any(|r| r.contains("/persistentvolumes/")),
            "{seen:?}"
        );
        let last = posted.last().unwrap();
        assert_eq!(last.0, "NodeLossStopped");
        assert!(last.1.contains("node n2 is back"), "{}", last.1);
    }

    #[tokio::test]
    async fn a_kept_pv_of_a_gone_node_gets_one_warning_and_nothing_is_deleted() {
        let f = crate::provisioner::tests::fake(&[]).await;
        let pv = pv::tests::made_for(&pvc("data-0", "16Mi", Some("n2")), "n2");
        assert_eq!(pv::node_loss(&pv), NodeLoss::Keep);
        let (_tx, leading) = watch::channel(true);
        let mut worker = Worker::default();
        for _ in 0..3 {
            let mut pods = None;
            volume(
                &f.ctx,
                &mut worker,
                &leading,
                &pv,
                "n2",
                &NodeState::Gone,
                &mut pods,
            )
            .await
            .unwrap();
        }
        let posted = f.posted();
        assert_eq!(
            posted.len(),
            1,
            "once per claim, not every round: {posted:?}"
        );
        assert_eq!(posted[0].0, "NodeLostVolumeKept");
        assert!(
            posted[0]
                .1
                .contains("node n2 is lost: its Node object is gone")
        );
        // Its claim deleted (as the Warning suggests): the PV is Released,
        // nothing more is said.
        let mut released = pv.clone();
        released.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
            phase: Some("Released".into()),
            ..Default::default()
        });
        let mut fresh = Worker::default();
        volume(
            &f.ctx,
            &mut fresh,
            &leading,
            &released,
            "n2",
            &NodeState::Gone,
            &mut None,
        )
        .await
        .unwrap();
        assert!(f.posted().is_empty());
        let seen = f.requests.lock().unwrap().clone();
        assert!(seen.is_empty(), "nothing read, nothing deleted: {seen:?}");
    }

    #[tokio::test]
    async fn a_round_finds_the_nodes_that_hold_stead_pvs_and_are_gone() {
        use crate::provisioner::tests::{Answer, fake_answering};
        let kept = pv::tests::made_for(&pvc("data-0", "16Mi", Some("n2")), "n2");
        let kept_json = serde_json::to_value(&kept).unwrap();
        let mut live = node("True", vec![]);
        live.metadata.name = Some("n1".into());
        let live_json = serde_json::to_value(&live).unwrap();
        let answer: Answer = Arc::new(move |method: &http::Method, path: &str, query: &str| {
            if *method != http::Method::GET {
                return None;
            }
            let list = |kind: &str, items: Vec<serde_json::Value>| {
                Some((
                    200,
                    json!({"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items})
                        .to_string(),
                ))
            };
            match path {
                // n1 is the only Node: n2, which holds a PV, is gone.
                "/api/v1/nodes" => list("NodeList", vec![live_json.clone()]),
                "/api/v1/persistentvolumes" if query.contains("%3Dn2") => {
                    list("PersistentVolumeList", vec![kept_json.clone()])
                }
                "/api/v1/persistentvolumes" => Some((
                    200,
                    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                    "metadata": {}, "items": [
                        {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                         "metadata": {"name": "a", "labels": {NODE_LABEL: "n1"}}},
                        {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                         "metadata": {"name": "b", "labels": {NODE_LABEL: "n2"}}},
                    ]})
                    .to_string(),
                )),
                _ => None,
            }
        });
        let f = fake_answering(&[], Some(answer)).await;
        let (_tx, leading) = watch::channel(true);
        let mut worker = Worker::default();
        round(&f.ctx, &mut worker, &leading).await.unwrap();
        let posted = f.posted();
        assert_eq!(posted.len(), 1, "{posted:?}");
        assert_eq!(posted[0].0, "NodeLostVolumeKept");
        assert!(
            posted[0]
                .1
                .contains(&format!("holds volume {}", kept.name_any()))
        );
        let seen = f.requests.lock().unwrap().clone();
        let pv_lists: Vec<&str> = seen
            .iter()
            .filter(|r| r.path == "/api/v1/persistentvolumes")
            .map(|r| r.query.as_str())
            .collect();
        assert_eq!(
            pv_lists.len(),
            2,
            "the metadata list, then n2's PVs alone: {seen:?}"
        );
        assert!(
            !pv_lists[1].contains("%3Dn1"),
            "the live node's PVs are not read"
        );
    }
}
