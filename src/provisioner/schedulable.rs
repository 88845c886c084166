//! Whether a node can take pods: for an Immediate claim (no pod yet), and
//! for a given pod (its tolerations). Pure functions of the Node and Pod
//! objects, tested without a cluster.
//!
//! The rules follow the scheduler's filters that look at the node alone:
//! NodeUnschedulable (`spec.unschedulable`, which a pod passes only if it
//! tolerates the `node.kubernetes.io/unschedulable:NoSchedule` taint),
//! TaintToleration (taints of effect NoSchedule or NoExecute), and the
//! Ready condition, which the node lifecycle controller turns into the
//! `node.kubernetes.io/not-ready` / `unreachable` taints.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use kube::runtime::watcher;
use tokio::sync::{Notify, mpsc};

use super::Ctx;

/// The taint that stands for `spec.unschedulable` (a cordon).
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
/// The taint of a node whose Ready condition is False.
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
/// The taint of a node whose Ready condition is Unknown (or missing).
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";

/// Why a node does not take a pod (or an Immediate claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unschedulable {
    /// The agent's Node object does not exist (or is not known yet).
    NoNode,
    /// `spec.unschedulable` (`kubectl cordon`).
    Cordoned,
    /// The Ready condition is not True: its status (False, Unknown, or
    /// missing) and reason.
    NotReady {
        status: Option<String>,
        reason: Option<String>,
    },
    /// A taint of effect NoSchedule or NoExecute.
    Taint {
        key: String,
        value: String,
        effect: String,
    },
}

impl Unschedulable {
    fn taint(t: &Taint) -> Self {
        Unschedulable::Taint {
            key: t.key.clone(),
            value: t.value.clone().unwrap_or_default(),
            effect: t.effect.clone(),
        }
    }

    /// What to do about it on `node`, for users.
    pub fn remedy(&self, node: &str) -> String {
        match self {
            Unschedulable::NoNode => format!("bring node {node} back"),
            Unschedulable::Cordoned => format!("uncordon it (kubectl uncordon {node})"),
            Unschedulable::NotReady { .. } => {
                format!("bring node {node} back to Ready (its kubelet, its network)")
            }
            Unschedulable::Taint { key, value, effect } => {
                let taint = if value.is_empty() {
                    format!("{key}:{effect}")
                } else {
                    format!("{key}={value}:{effect}")
                };
                format!(
                    "remove the taint (kubectl taint nodes {node} {taint}-) or let the pod tolerate it"
                )
            }
        }
    }
}

/// Short, for logs and the reason of an event: `cordoned`,
/// `taint key=value:effect`, `NotReady (Ready=False: KubeletNotReady)`.
impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unschedulable::NoNode => write!(f, "no Node object"),
            Unschedulable::Cordoned => write!(f, "cordoned"),
            Unschedulable::NotReady { status, reason } => {
                write!(
                    f,
                    "NotReady (Ready={}",
                    status.as_deref().unwrap_or("missing")
                )?;
                if let Some(r) = reason.as_deref().filter(|r| !r.is_empty()) {
                    write!(f, ": {r}")?;
                }
                write!(f, ")")
            }
            Unschedulable::Taint { key, value, effect } if value.is_empty() => {
                write!(f, "taint {key}:{effect}")
            }
            Unschedulable::Taint { key, value, effect } => {
                write!(f, "taint {key}={value}:{effect}")
            }
        }
    }
}

/// Taints that keep pods off a node. PreferNoSchedule only steers.
fn repels(taint: &Taint) -> bool {
    matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
}

/// `None` when the node's Ready condition is True; else why not, and the
/// taint the node lifecycle controller puts on such a node.
fn not_ready(node: &Node) -> Option<(Unschedulable, &'static str)> {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    if ready.is_some_and(|c| c.status == "True") {
        return None;
    }
    let status = ready.map(|c| c.status.clone());
    let taint = if status.as_deref() == Some("False") {
        TAINT_NOT_READY
    } else {
        TAINT_UNREACHABLE
    };
    Some((
        Unschedulable::NotReady {
            status,
            reason: ready.and_then(|c| c.reason.clone()),
        },
        taint,
    ))
}

fn cordoned(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn taints(node: &Node) -> impl Iterator<Item = &Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|t| repels(t))
}

/// Whether this node takes an Immediate claim. The rule: only a node that
/// would take any pod does, that is one that is Ready, not cordoned, and has
/// no taint of effect NoSchedule or NoExecute at all, whatever its key. An
/// Immediate claim is bound before any pod uses it, so the tolerations of
/// the pods that will use it cannot be known: a taint some of them might
/// tolerate keeps the claim off the node all the same (its volume would pin
/// every later pod of the claim to a node they may not be let on), and the
/// claim goes to a node with no such taint. Otherwise the first reason, in
/// that order: no Node, cordoned, NotReady, the first such taint.
pub fn for_immediate(node: Option<&Node>) -> Result<(), Unschedulable> {
    let Some(node) = node else {
        return Err(Unschedulable::NoNode);
    };
    if cordoned(node) {
        return Err(Unschedulable::Cordoned);
    }
    if let Some((why, _)) = not_ready(node) {
        return Err(why);
    }
    match taints(node).next() {
        Some(t) => Err(Unschedulable::taint(t)),
        None => Ok(()),
    }
}

/// Whether `node` takes `pod`, weighing the pod's tolerations: a cordon
/// counts unless the pod tolerates the cordon's taint, NotReady unless it
/// tolerates the NotReady taint with effect NoSchedule, and a NoSchedule
/// or NoExecute taint unless the pod tolerates it. Otherwise the first
/// reason, in that order.
pub fn for_pod(node: &Node, pod: &Pod) -> Result<(), Unschedulable> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    let tolerated = |taint: &Taint| tolerations.iter().any(|t| tolerates(t, taint));
    let condition_taint = |key: &str| Taint {
        key: key.to_string(),
        effect: "NoSchedule".to_string(),
        ..Default::default()
    };
    if cordoned(node) && !tolerated(&condition_taint(TAINT_UNSCHEDULABLE)) {
        return Err(Unschedulable::Cordoned);
    }
    if let Some((why, taint)) = not_ready(node)
        && !tolerated(&condition_taint(taint))
    {
        return Err(why);
    }
    match taints(node).find(|t| !tolerated(t)) {
        Some(t) => Err(Unschedulable::taint(t)),
        None => Ok(()),
    }
}

/// Whether `toleration` tolerates `taint`, by the Kubernetes rules: an
/// empty effect matches every effect, an empty key every key (with
/// operator Exists: every taint), Exists ignores the value, Equal (the
/// default) wants the same value; any other operator tolerates nothing.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or_default() {
        "Exists" => true,
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// How this node's verdict for Immediate claims changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It does not take them (any more, or for another reason now).
    Unschedulable(Unschedulable),
    /// It takes them: again after `was`, or for the first time known.
    Schedulable { was: Option<Unschedulable> },
}

/// The last verdict for Immediate claims, to act on changes only (a node's
/// status is rewritten every few minutes without changing anything).
#[derive(Debug, Default)]
pub struct Verdict {
    last: Option<Result<(), Unschedulable>>,
}

impl Verdict {
    /// Takes the verdict of now; `Some` when it differs from the last one.
    pub fn observe(&mut self, now: Result<(), Unschedulable>) -> Option<Change> {
        if self.last.as_ref() == Some(&now) {
            return None;
        }
        let was = self.last.replace(now.clone());
        Some(match now {
            Err(why) => Change::Unschedulable(why),
            Ok(()) => Change::Schedulable {
                was: was.and_then(Result::err),
            },
        })
    }
}

/// Follows this agent's own Node (`events`: the reflector of `ctx.nodes`)
/// and acts on what changes: says once, at info, why Immediate claims are
/// left to other nodes; when the node takes them again (or, schedulable,
/// its labels change, which allowedTopologies look at), asks the claims
/// controller to look at every claim again (`resync`), if an Immediate
/// claim was passed over meanwhile; and tells the stranded-pod check
/// (`node_changed`) on every change of the Node. Never ends.
pub(crate) async fn follow<C>(
    ctx: Arc<Ctx<C>>,
    events: impl Stream<Item = Result<watcher::Event<Node>, watcher::Error>>,
    resync: mpsc::Sender<()>,
    node_changed: Arc<Notify>,
) {
    let node = ctx.config.node.clone();
    let mut events = std::pin::pin!(events);
    let mut verdict = Verdict::default();
    let mut labels = None;
    while let Some(ev) = events.next().await {
        match ev {
            // During a (re)list the store keeps what it had until InitDone:
            // no news before that.
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "Node watch error");
                continue;
            }
        }
        node_changed.notify_one();
        let own = ctx.own_node();
        let now = for_immediate(own.as_deref());
        let schedulable = now.is_ok();
        let now_labels = own.and_then(|n| n.metadata.labels.clone());
        let relabelled = labels != now_labels;
        labels = now_labels;
        let change = verdict.observe(now);
        let changed = change.is_some() || relabelled;
        match change {
            Some(Change::Unschedulable(why)) => tracing::info!(
                node = %node,
                reason = %why,
                "node {node} is not schedulable ({why}): Immediate claims are left to other nodes \
                 (a claim has no pod yet, so no tolerations: only a Ready node with no cordon \
                 and no NoSchedule/NoExecute taint takes one)"
            ),
            Some(Change::Schedulable { was: Some(was) }) => tracing::info!(
                node = %node,
                was = %was,
                "node {node} is schedulable again: it takes Immediate claims"
            ),
            Some(Change::Schedulable { was: None }) => {
                tracing::debug!(node = %node, "node is schedulable: it takes Immediate claims");
            }
            None => {}
        }
        // A reconcile that passes a claim over sets the flag and then reads
        // the node again; this reads the flag after the store has the new
        // Node: so either that second read saw the node schedulable (and
        // took the claim) or this sees the flag.
        if schedulable && changed && ctx.immediate_waiting.swap(false, Ordering::SeqCst) {
            tracing::debug!(node = %node, "reconsidering claims passed over while the node was not schedulable");
            // One pending resync is enough: a full channel already has it.
            let _ = resync.try_send(());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A Ready, uncordoned, untainted node.
    pub fn node(name: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: Some("KubeletReady".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    pub fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: (!value.is_empty()).then(|| value.into()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    pub fn tainted(mut n: Node, t: Taint) -> Node {
        n.spec
            .get_or_insert_default()
            .taints
            .get_or_insert_default()
            .push(t);
        n
    }

    pub fn cordon(mut n: Node) -> Node {
        n.spec.get_or_insert_default().unschedulable = Some(true);
        // What the node lifecycle controller adds right after.
        tainted(n, taint(TAINT_UNSCHEDULABLE, "", "NoSchedule"))
    }

    pub fn not_ready(mut n: Node) -> Node {
        let c = &mut n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0];
        c.status = "False".into();
        c.reason = Some("KubeletNotReady".into());
        n
    }

    fn toleration(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Toleration {
            key: opt(key),
            operator: opt(op),
            value: opt(value),
            effect: opt(effect),
            ..Default::default()
        }
    }

    fn pod_tolerating(tolerations: Vec<Toleration>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                tolerations: Some(tolerations),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_ready_untainted_node_takes_immediate_claims() {
        assert_eq!(for_immediate(Some(&node("n1"))), Ok(()));
        // PreferNoSchedule only steers the scheduler; it keeps nothing off.
        let soft = tainted(node("n1"), taint("spot", "yes", "PreferNoSchedule"));
        assert_eq!(for_immediate(Some(&soft)), Ok(()));
    }

    #[test]
    fn immediate_claims_are_refused_by_a_missing_cordoned_notready_or_tainted_node() {
        assert_eq!(for_immediate(None), Err(Unschedulable::NoNode));
        // Cordoned wins over its own taint: it is what the user did.
        let e = for_immediate(Some(&cordon(node("n1")))).unwrap_err();
        assert_eq!(e, Unschedulable::Cordoned);
        assert_eq!(e.to_string(), "cordoned");
        let e = for_immediate(Some(&not_ready(node("n1")))).unwrap_err();
        assert_eq!(e.to_string(), "NotReady (Ready=False: KubeletNotReady)");
        let mut gone = node("n1");
        gone.status = None;
        assert_eq!(
            for_immediate(Some(&gone)).unwrap_err().to_string(),
            "NotReady (Ready=missing)"
        );
        // Any NoSchedule/NoExecute taint counts: no pod, no tolerations.
        for effect in ["NoSchedule", "NoExecute"] {
            let n = tainted(node("n1"), taint("dedicated", "db", effect));
            assert_eq!(
                for_immediate(Some(&n)).unwrap_err().to_string(),
                format!("taint dedicated=db:{effect}")
            );
        }
        let n = tainted(node("n1"), taint("gpu", "", "NoSchedule"));
        assert_eq!(
            for_immediate(Some(&n)).unwrap_err().to_string(),
            "taint gpu:NoSchedule"
        );
    }

    #[test]
    fn toleration_matching_follows_the_kubernetes_rules() {
        let t = taint("dedicated", "db", "NoSchedule");
        // Equal (also the default operator) wants key, value and effect.
        assert!(tolerates(
            &toleration("dedicated", "Equal", "db", "NoSchedule"),
            &t
        ));
        assert!(tolerates(
            &toleration("dedicated", "", "db", "NoSchedule"),
            &t
        ));
        assert!(!tolerates(
            &toleration("dedicated", "Equal", "web", "NoSchedule"),
            &t
        ));
        assert!(!tolerates(
            &toleration("other", "Equal", "db", "NoSchedule"),
            &t
        ));
        // Exists ignores the value.
        assert!(tolerates(
            &toleration("dedicated", "Exists", "", "NoSchedule"),
            &t
        ));
        // An empty effect matches every effect.
        assert!(tolerates(&toleration("dedicated", "Exists", "", ""), &t));
        assert!(tolerates(&toleration("dedicated", "Equal", "db", ""), &t));
        // A different effect does not.
        assert!(!tolerates(
            &toleration("dedicated", "Exists", "", "NoExecute"),
            &t
        ));
        // An empty key with Exists tolerates every taint.
        assert!(tolerates(&toleration("", "Exists", "", ""), &t));
        assert!(tolerates(
            &toleration("", "Exists", "", ""),
            &taint("x", "", "NoExecute")
        ));
        // An operator Kubernetes does not know tolerates nothing.
        assert!(!tolerates(&toleration("dedicated", "Gt", "db", ""), &t));
        // Equal with no value matches a taint with no value.
        assert!(tolerates(
            &toleration("gpu", "Equal", "", "NoSchedule"),
            &taint("gpu", "", "NoSchedule")
        ));
    }

    #[test]
    fn a_pod_passes_what_it_tolerates_and_is_stopped_by_the_rest() {
        let n = tainted(node("n1"), taint("dedicated", "db", "NoSchedule"));
        let plain = pod_tolerating(vec![]);
        assert_eq!(
            for_pod(&n, &plain).unwrap_err().to_string(),
            "taint dedicated=db:NoSchedule"
        );
        let db = pod_tolerating(vec![toleration("dedicated", "Equal", "db", "NoSchedule")]);
        assert_eq!(for_pod(&n, &db), Ok(()));

        // The first taint it does not tolerate is named.
        let n = tainted(n, taint("maintenance", "", "NoExecute"));
        assert_eq!(
            for_pod(&n, &db).unwrap_err().to_string(),
            "taint maintenance:NoExecute"
        );
        let everything = pod_tolerating(vec![toleration("", "Exists", "", "")]);
        assert_eq!(for_pod(&n, &everything), Ok(()));
    }

    #[test]
    fn a_cordon_or_notready_stops_a_pod_unless_it_tolerates_their_taints() {
        let plain = pod_tolerating(vec![]);
        assert_eq!(
            for_pod(&cordon(node("n1")), &plain),
            Err(Unschedulable::Cordoned)
        );
        // A DaemonSet's pods tolerate the cordon's taint.
        let ds = pod_tolerating(vec![toleration(
            TAINT_UNSCHEDULABLE,
            "Exists",
            "",
            "NoSchedule",
        )]);
        assert_eq!(for_pod(&cordon(node("n1")), &ds), Ok(()));

        let down = not_ready(node("n1"));
        assert!(matches!(
            for_pod(&down, &plain),
            Err(Unschedulable::NotReady { .. })
        ));
        // The default NoExecute toleration every pod gets does not let it
        // be scheduled there; a NoSchedule one does.
        let default = pod_tolerating(vec![toleration(TAINT_NOT_READY, "Exists", "", "NoExecute")]);
        assert!(for_pod(&down, &default).is_err());
        let tolerant = pod_tolerating(vec![toleration(
            TAINT_NOT_READY,
            "Exists",
            "",
            "NoSchedule",
        )]);
        assert_eq!(for_pod(&down, &tolerant), Ok(()));
    }

    #[test]
    fn only_changes_of_the_verdict_are_acted_on() {
        let mut v = Verdict::default();
        assert_eq!(
            v.observe(Err(Unschedulable::NoNode)),
            Some(Change::Unschedulable(Unschedulable::NoNode))
        );
        assert_eq!(v.observe(Err(Unschedulable::NoNode)), None);
        assert_eq!(
            v.observe(Ok(())),
            Some(Change::Schedulable {
                was: Some(Unschedulable::NoNode)
            })
        );
        // A status heartbeat that changes nothing says nothing.
        assert_eq!(v.observe(Ok(())), None);
        assert_eq!(
            v.observe(Err(Unschedulable::Cordoned)),
            Some(Change::Unschedulable(Unschedulable::Cordoned))
        );
        assert_eq!(v.observe(Err(Unschedulable::Cordoned)), None);
        // Another reason is said once more.
        let t = Unschedulable::taint(&taint("k", "v", "NoSchedule"));
        assert_eq!(
            v.observe(Err(t.clone())),
            Some(Change::Unschedulable(t.clone()))
        );
        assert_eq!(
            v.observe(Ok(())),
            Some(Change::Schedulable { was: Some(t) })
        );
        let mut fresh = Verdict::default();
        assert_eq!(
            fresh.observe(Ok(())),
            Some(Change::Schedulable { was: None })
        );
    }

    #[test]
    fn remedies_name_the_command_for_the_node() {
        assert_eq!(
            Unschedulable::Cordoned.remedy("stead-node-2"),
            "uncordon it (kubectl uncordon stead-node-2)"
        );
        let t = Unschedulable::taint(&taint("dedicated", "db", "NoSchedule"));
        assert!(
            t.remedy("n2")
                .contains("kubectl taint nodes n2 dedicated=db:NoSchedule-"),
            "{}",
            t.remedy("n2")
        );
    }
}
