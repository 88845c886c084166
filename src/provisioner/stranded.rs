//! Pods stranded from their data: a pod that is not scheduled, whose claim
//! is bound to a Stead volume on this node, while this node does not take
//! the pod (cordoned, a taint it does not tolerate, NotReady). The scheduler
//! says only that no node matches the volume's node affinity; the agent of
//! the volume's node says which node, why, and what to do, in a Warning
//! Event on the pod and on the claim.
//!
//! The agent watches only unscheduled pods (`spec.nodeName=`), not every
//! pod of the cluster. Each (pod, claim) is reported once per reason: again
//! only when the reason changes, or after it went away and came back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use kube::core::PartialObjectMeta;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tokio::sync::Notify;

use super::schedulable::{self, Unschedulable};
use super::{Ctx, claim, pv};

/// The reason of the Warning Event on the pod and on the claim.
pub const REASON: &str = "VolumeNodeUnschedulable";
/// The Event's action: what was held up.
const ACTION: &str = "Schedule";
/// Pods are checked again this often even when nothing they show changed:
/// a claim may get bound, or its PV known, after the pod was last seen.
const RECHECK: Duration = Duration::from_secs(30);

/// One claim of a pod that cannot start because its volume's node does not
/// take the pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Stranded {
    pub pod: ObjectReference,
    pub claim: ObjectReference,
    /// The PV (and volume) the claim is bound to.
    pub volume: String,
    pub reason: Unschedulable,
}

fn key(r: &ObjectReference) -> String {
    format!(
        "{}/{}",
        r.namespace.as_deref().unwrap_or_default(),
        r.name.as_deref().unwrap_or_default()
    )
}

impl Stranded {
    /// The Event's note: names the pod, the claim, the node and the reason,
    /// and what to do.
    pub fn message(&self, node: &str) -> String {
        let why = match &self.reason {
            Unschedulable::Taint { .. } => {
                format!("has {} that the pod does not tolerate", self.reason)
            }
            other => format!("is {other}"),
        };
        format!(
            "pod {} cannot be scheduled: its claim {} is bound to volume {} on node {node}, which {why}; {} and the pod returns with its data; deleting the claim gives the pod a new empty volume on another node and loses this one's data",
            key(&self.pod),
            key(&self.claim),
            self.volume,
            self.reason.remedy(node),
        )
    }
}

/// Trims a pod of the unscheduled-pod watch to what is read of it: its
/// identity, node name, claim volumes, tolerations and phase. Every agent
/// holds every unscheduled pod of the cluster; a burst of pending pods (a
/// StatefulSet scaled up, a deployment of thousands) must not cost each
/// agent their containers, environment and status too.
pub fn keep_what_is_read(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.labels = None;
    meta.owner_references = None;
    if let Some(spec) = pod.spec.as_mut() {
        *spec = k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name.take(),
            tolerations: spec.tolerations.take(),
            volumes: spec.volumes.take().map(|vs| {
                vs.into_iter()
                    .filter(|v| v.persistent_volume_claim.is_some())
                    .collect()
            }),
            ..Default::default()
        };
    }
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

/// Whether the pod waits for a node: not bound to one, not being deleted,
/// not finished.
pub fn is_unscheduled(pod: &Pod) -> bool {
    let node_name = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    node_name.is_none_or(str::is_empty)
        && pod.metadata.deletion_timestamp.is_none()
        && matches!(phase, None | Some("Pending"))
}

/// The claims of `pod` whose Stead volume lives on `node_name` while `node`
/// does not take the pod. A claim is looked up with `claim_of` (namespace,
/// name: its metadata) and its volume with `pv_of` (namespace and name of
/// the claim: the PV of this node whose claimRef names it). What cannot be
/// judged (a claim not bound yet, a PV without node affinity, no Node
/// object) is skipped.
pub fn stranded_claims(
    pod: &Pod,
    node_name: &str,
    node: Option<&Node>,
    claim_of: impl Fn(&str, &str) -> Option<Arc<PartialObjectMeta<PersistentVolumeClaim>>>,
    pv_of: impl Fn(&str, &str) -> Option<Arc<PersistentVolume>>,
) -> Vec<Stranded> {
    if !is_unscheduled(pod) {
        return vec![];
    }
    let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
    let pod_key = format!("{ns}/{}", pod.name_any());
    let claims = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str());
    let mut found = Vec::new();
    for name in claims {
        let Some(pvc) = claim_of(ns, name) else {
            continue;
        };
        let Some(pv) = pv_of(ns, name) else {
            continue;
        };
        // The PV of this claim, not of an earlier claim of the same name.
        let claim_uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.as_deref());
        if claim_uid.is_none() || claim_uid != pvc.metadata.uid.as_deref() {
            continue;
        }
        if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
            tracing::debug!(pod = %pod_key, pvc = %claim::claim_key(&*pvc), pv = %pv.name_any(), "claim not bound yet; skipped");
            continue;
        }
        if pv::stead_volume_handle(&pv).is_none() {
            continue;
        }
        let volume = pv.name_any();
        let Some(pinned) = pv::pv_node(&pv) else {
            tracing::debug!(pod = %pod_key, pv = %volume, "Stead PV has no node affinity; skipped");
            continue;
        };
        if pinned != node_name {
            continue;
        }
        let Some(node) = node else {
            tracing::debug!(pod = %pod_key, node = %node_name, "Node object not known; skipped");
            continue;
        };
        if let Err(reason) = schedulable::for_pod(node, pod) {
            found.push(Stranded {
                pod: pod.object_ref(&()),
                claim: pvc.object_ref(&()),
                volume,
                reason,
            });
        }
    }
    found
}

/// This node's PVs by the claim (namespace, name) their claimRef names.
fn by_claim(volumes: &[Arc<PersistentVolume>]) -> HashMap<(String, String), Arc<PersistentVolume>> {
    volumes
        .iter()
        .filter_map(|pv| {
            let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
            Some(((r.namespace.clone()?, r.name.clone()?), pv.clone()))
        })
        .collect()
}

/// What was reported, per pod uid and claim: the reason last posted.
#[derive(Debug, Default)]
pub struct Reported {
    by_pod: HashMap<String, HashMap<String, Unschedulable>>,
}

impl Reported {
    /// Of what `pod_uid` is stranded by now (`found`), what is new or has a
    /// new reason: those are to be posted. Claims of the pod no longer
    /// stranded are forgotten, so that a reason that comes back is posted
    /// again.
    pub fn fresh(&mut self, pod_uid: &str, found: Vec<Stranded>) -> Vec<Stranded> {
        let seen = self.by_pod.entry(pod_uid.to_string()).or_default();
        let now: HashSet<String> = found.iter().map(|s| key(&s.claim)).collect();
        seen.retain(|claim, _| now.contains(claim));
        let fresh = found
            .into_iter()
            .filter(|s| seen.insert(key(&s.claim), s.reason.clone()).as_ref() != Some(&s.reason))
            .collect();
        if seen.is_empty() {
            self.by_pod.remove(pod_uid);
        }
        fresh
    }

    /// Forgets the pods that are no longer unscheduled (or gone).
    pub fn retain_pods(&mut self, live: &HashSet<String>) {
        self.by_pod.retain(|uid, _| live.contains(uid));
    }
}

impl<C> Ctx<C> {
    /// Reports the claims `pod` is stranded from; `pvs`: this node's PVs by
    /// claim ([`by_claim`]).
    fn check_pod(
        &self,
        pod: &Pod,
        pvs: &HashMap<(String, String), Arc<PersistentVolume>>,
        reported: &mut Reported,
    ) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        let node_name = self.config.node.as_str();
        let node = self.own_node();
        let found = stranded_claims(
            pod,
            node_name,
            node.as_deref(),
            |ns, name| self.claims.get(&ObjectRef::new(name).within(ns)),
            |ns, name| pvs.get(&(ns.to_string(), name.to_string())).cloned(),
        );
        for s in reported.fresh(uid, found) {
            let note = s.message(node_name);
            tracing::warn!(
                pod = %key(&s.pod),
                pvc = %key(&s.claim),
                volume.id = %s.volume,
                node = %node_name,
                reason = %s.reason,
                "pod cannot be scheduled: its volume's node does not take it"
            );
            self.events.post(
                s.claim.clone(),
                EventType::Warning,
                REASON,
                ACTION,
                note.clone(),
            );
            self.events
                .post(s.pod.clone(), EventType::Warning, REASON, ACTION, note);
        }
    }
}

/// Watches the unscheduled pods of the cluster and reports those stranded
/// from a volume of this node: when a pod changes, when this node changes
/// (`node_changed`), and every [`RECHECK`]. Never ends; watch errors are
/// logged and the watch goes on (with backoff).
pub(crate) async fn run<C>(ctx: Arc<Ctx<C>>, node_changed: Arc<Notify>) {
    let (pods, writer) = reflector::store::<Pod>();
    let events = reflector::reflector(
        writer,
        watcher(
            Api::<Pod>::all(ctx.client.clone()),
            watcher::Config::default().fields("spec.nodeName="),
        )
        .modify(keep_what_is_read),
    )
    .default_backoff()
    .applied_objects();
    let mut events = std::pin::pin!(events);
    let mut reported = Reported::default();
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let all = tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(pod)) => {
                    ctx.check_pod(&pod, &by_claim(&ctx.volumes.state()), &mut reported);
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "unscheduled Pod watch error");
                    false
                }
                None => return,
            },
            _ = node_changed.notified() => true,
            _ = tick.tick() => true,
        };
        if all {
            let state = pods.state();
            let pvs = by_claim(&ctx.volumes.state());
            for pod in &state {
                ctx.check_pod(pod, &pvs, &mut reported);
            }
            let live: HashSet<String> = state
                .iter()
                .filter(|p| is_unscheduled(p))
                .filter_map(|p| p.metadata.uid.clone())
                .collect();
            reported.retain_pods(&live);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;
    use crate::provisioner::pv::tests::made_for;
    use crate::provisioner::schedulable::tests::{cordon, node, not_ready, taint, tainted};
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimVolumeSource, PodSpec, PodStatus, Volume as PodVolume,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    const NODE: &str = "stead-node-2";

    #[test]
    fn a_pod_is_kept_with_what_is_read_of_it_only() {
        let mut p = pod("db-ss-0", &["data-0"]);
        let spec = p.spec.as_mut().unwrap();
        spec.containers = vec![k8s_openapi::api::core::v1::Container {
            name: "db".into(),
            image: Some("postgres".into()),
            ..Default::default()
        }];
        spec.tolerations = Some(vec![k8s_openapi::api::core::v1::Toleration {
            key: Some("node.kubernetes.io/unschedulable".into()),
            ..Default::default()
        }]);
        spec.volumes.as_mut().unwrap().push(PodVolume {
            name: "config".into(),
            config_map: Some(Default::default()),
            ..Default::default()
        });
        p.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        p.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        keep_what_is_read(&mut p);
        let spec = p.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty());
        assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(1));
        let volumes: Vec<&str> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["v-data-0"]);
        assert_eq!(p.metadata.labels, None);
        assert_eq!(p.status.as_ref().unwrap().conditions, None);
        // What decides is still there: identity, unscheduled, pending.
        assert_eq!(p.metadata.uid.as_deref(), Some("uid-db-ss-0"));
        assert!(is_unscheduled(&p));
    }

    fn pod(name: &str, claims: &[&str]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("db".into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                volumes: Some(
                    claims
                        .iter()
                        .map(|c| PodVolume {
                            name: format!("v-{c}"),
                            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                                claim_name: c.to_string(),
                                read_only: None,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                ..Default::default()
            }),
        }
    }

    /// A claim bound to its Stead PV on `on`.
    fn bound(name: &str, on: &str) -> (Arc<PersistentVolumeClaim>, Arc<PersistentVolume>) {
        let mut c = pvc(name, "1Gi", Some(on));
        c.metadata.uid = Some(format!("uid-{name}"));
        let mut pv = made_for(&c, on);
        pv.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        });
        c.spec.as_mut().unwrap().volume_name = Some(pv.name_any());
        (Arc::new(c), Arc::new(pv))
    }

    fn find(
        pod: &Pod,
        node: Option<&Node>,
        objects: &[(Arc<PersistentVolumeClaim>, Arc<PersistentVolume>)],
    ) -> Vec<Stranded> {
        use kube::core::PartialObjectMetaExt;
        let pvs = by_claim(&objects.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>());
        stranded_claims(
            pod,
            NODE,
            node,
            |ns, name| {
                objects
                    .iter()
                    .find(|(c, _)| {
                        c.metadata.namespace.as_deref() == Some(ns) && c.name_any() == name
                    })
                    .map(|(c, _)| Arc::new(c.metadata.clone().into_response_partial()))
            },
            |ns, name| pvs.get(&(ns.to_string(), name.to_string())).cloned(),
        )
    }

    #[test]
    fn a_pending_pod_whose_volume_is_on_a_cordoned_node_is_reported_with_the_remedy() {
        let objects = [bound("db-vol-db-ss-1", NODE)];
        let p = pod("db-ss-1", &["db-vol-db-ss-1"]);
        let found = find(&p, Some(&cordon(node(NODE))), &objects);
        assert_eq!(found.len(), 1, "{found:?}");
        let s = &found[0];
        assert_eq!(s.reason, Unschedulable::Cordoned);
        assert_eq!(s.volume, "pvc-uid-db-vol-db-ss-1");
        // The events' regarding objects are the pod and the claim, whole.
        assert_eq!(s.pod.kind.as_deref(), Some("Pod"));
        assert_eq!(s.pod.api_version.as_deref(), Some("v1"));
        assert_eq!(s.pod.namespace.as_deref(), Some("db"));
        assert_eq!(s.pod.name.as_deref(), Some("db-ss-1"));
        assert_eq!(s.pod.uid.as_deref(), Some("uid-db-ss-1"));
        assert_eq!(s.claim.kind.as_deref(), Some("PersistentVolumeClaim"));
        assert_eq!(s.claim.api_version.as_deref(), Some("v1"));
        assert_eq!(s.claim.namespace.as_deref(), Some("db"));
        assert_eq!(s.claim.name.as_deref(), Some("db-vol-db-ss-1"));
        assert_eq!(s.claim.uid.as_deref(), Some("uid-db-vol-db-ss-1"));
        assert_eq!(
            s.message(NODE),
            "pod db/db-ss-1 cannot be scheduled: its claim db/db-vol-db-ss-1 is bound to volume \
             pvc-uid-db-vol-db-ss-1 on node stead-node-2, which is cordoned; uncordon it \
             (kubectl uncordon stead-node-2) and the pod returns with its data; deleting the \
             claim gives the pod a new empty volume on another node and loses this one's data"
        );
    }

    #[test]
    fn taints_and_notready_are_named_and_tolerated_taints_are_not() {
        let objects = [bound("data", NODE)];
        let p = pod("web-0", &["data"]);
        let n = tainted(node(NODE), taint("dedicated", "db", "NoExecute"));
        let found = find(&p, Some(&n), &objects);
        let note = found[0].message(NODE);
        assert!(
            note.contains("which has taint dedicated=db:NoExecute that the pod does not tolerate"),
            "{note}"
        );
        assert!(
            note.contains("kubectl taint nodes stead-node-2 dedicated=db:NoExecute-"),
            "{note}"
        );

        let mut tolerant = p.clone();
        tolerant.spec.as_mut().unwrap().tolerations =
            Some(vec![k8s_openapi::api::core::v1::Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }]);
        assert!(find(&tolerant, Some(&n), &objects).is_empty());

        let found = find(&p, Some(&not_ready(node(NODE))), &objects);
        assert!(
            found[0]
                .message(NODE)
                .contains("which is NotReady (Ready=False: KubeletNotReady)"),
            "{}",
            found[0].message(NODE)
        );
    }

    #[test]
    fn only_unscheduled_pods_with_a_volume_of_this_node_on_an_unschedulable_node_count() {
        let objects = [bound("here", NODE), bound("there", "stead-node-3")];
        let down = cordon(node(NODE));
        // A volume of another node is that node's agent's business.
        assert!(find(&pod("a", &["there"]), Some(&down), &objects).is_empty());
        // A schedulable node: the pod waits for something else.
        assert!(find(&pod("a", &["here"]), Some(&node(NODE)), &objects).is_empty());
        // Scheduled, finished, or being deleted: nothing to say.
        let mut scheduled = pod("a", &["here"]);
        scheduled.spec.as_mut().unwrap().node_name = Some(NODE.into());
        assert!(find(&scheduled, Some(&down), &objects).is_empty());
        let mut failed = pod("a", &["here"]);
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        assert!(find(&failed, Some(&down), &objects).is_empty());
        let mut deleting = pod("a", &["here"]);
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(find(&deleting, Some(&down), &objects).is_empty());
        // No Node object known: nothing can be judged.
        assert!(find(&pod("a", &["here"]), None, &objects).is_empty());
        // Of two claims, only the one on this node.
        let found = find(&pod("a", &["there", "here"]), Some(&down), &objects);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].claim.name.as_deref(), Some("here"));
    }

    #[test]
    fn bad_api_data_is_skipped_not_panicked_on() {
        let down = cordon(node(NODE));
        // A claim not bound yet (its PV is not Bound).
        let (c, pv) = bound("unbound", NODE);
        let mut pv = (*pv).clone();
        pv.status = None;
        let objects = [(c, Arc::new(pv))];
        assert!(find(&pod("a", &["unbound"]), Some(&down), &objects).is_empty());
        // The PV of an earlier claim of the same name.
        let (c, pv) = bound("again", NODE);
        let mut c = (*c).clone();
        c.metadata.uid = Some("uid-of-the-new-claim".into());
        let objects = [(Arc::new(c), pv)];
        assert!(find(&pod("a", &["again"]), Some(&down), &objects).is_empty());
        // A Stead PV without node affinity.
        let (c, pv) = bound("loose", NODE);
        let mut pv = (*pv).clone();
        pv.spec.as_mut().unwrap().node_affinity = None;
        let objects = [(c, Arc::new(pv))];
        assert!(find(&pod("a", &["loose"]), Some(&down), &objects).is_empty());
        // A claim that does not exist, a pod without spec.
        assert!(find(&pod("a", &["missing"]), Some(&down), &[]).is_empty());
        let bare = Pod::default();
        assert!(find(&bare, Some(&down), &[]).is_empty());
    }

    #[test]
    fn each_pod_and_reason_is_reported_once_and_again_when_the_reason_changes() {
        let objects = [bound("data", NODE)];
        let p = pod("web-0", &["data"]);
        let cordoned = cordon(node(NODE));
        let mut reported = Reported::default();
        let uid = "uid-web-0";

        let first = reported.fresh(uid, find(&p, Some(&cordoned), &objects));
        assert_eq!(first.len(), 1);
        // Every resync finds it again: nothing new to post.
        for _ in 0..3 {
            assert!(
                reported
                    .fresh(uid, find(&p, Some(&cordoned), &objects))
                    .is_empty()
            );
        }
        // Uncordoned, but tainted now: a new reason, posted once.
        let tainted_now = tainted(node(NODE), taint("maintenance", "", "NoSchedule"));
        let second = reported.fresh(uid, find(&p, Some(&tainted_now), &objects));
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].reason.to_string(), "taint maintenance:NoSchedule");
        assert!(
            reported
                .fresh(uid, find(&p, Some(&tainted_now), &objects))
                .is_empty()
        );
        // Fixed, then cordoned again: a new episode, posted again.
        assert!(
            reported
                .fresh(uid, find(&p, Some(&node(NODE)), &objects))
                .is_empty()
        );
        assert_eq!(
            reported
                .fresh(uid, find(&p, Some(&cordoned), &objects))
                .len(),
            1
        );
        // A pod that is gone is forgotten.
        reported.retain_pods(&HashSet::new());
        assert!(reported.by_pod.is_empty());
    }
}
