//! Moving a claim's volume, with its data, to another node (issue 15).
//!
//! An operator asks with an annotation on the claim,
//! `stead.csi.dev/move-to=<node>` (`kubectl annotate pvc … stead.csi.dev/move-to=node-2`):
//! the same verb as for every other intent on an object, visible in
//! `kubectl describe`, undone by removing it, and it needs no client of
//! Stead's on the operator's machine. A node drain moves the volumes of its
//! node the same way when the Node says `stead.csi.dev/drain-moves-to`
//! (`any`, or a node's name): the agent of the drained node annotates its
//! claims ([`drain`]).
//!
//! Two agents share the work; each writes only objects the admission
//! policy lets it write (deploy/base/admission-policy.yaml):
//!
//! * the **holder** (the node of the claim's PV, P) agrees by setting P's
//!   reclaim policy to Retain (the old one kept in an annotation) and
//!   marking P `moving-to`; it takes that back if the annotation goes
//!   before the move began; once P is released it looks at the claim of
//!   P's name: bound to the new PV, it restores P's policy, and the normal
//!   reclaim deletes the old volume; recreated on P (a failed move), it
//!   frees P for that claim ([`holder_step`]);
//! * the **target** (the node named) waits for the holder's agreement and
//!   for no pod to use the claim, makes the new volume (the room is taken
//!   before anything is given up), puts its finalizer on the claim and
//!   deletes it (kubelet starts no pod on a claim being deleted, and the
//!   holder's transfer server refuses a volume in use), pulls the data
//!   (`crossnode::receive`: resumable, checked by digest), makes the new
//!   PV pre-bound to the claim's name, lets the old claim go and makes it
//!   again under the same name, bound to the new PV. A StatefulSet's pod
//!   finds its claim there and is scheduled to the target.
//!
//! Nothing is deleted before the new claim is Bound to the verified copy:
//! until then the old volume is Retained. A pull that can never succeed
//! recreates the claim on the old volume instead (`MoveFailed`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
};
use k8s_openapi::api::storage::v1::CSIStorageCapacity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::class::{self, ClassSpec};
use super::{Ctx, Error, claim, crossnode, pv, quantity, schedulable};
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::proto::csi::v1::{CapacityRange, CreateVolumeRequest, Volume};
use crate::storage::VolumeId;
use crate::transfer::SourceRef;

/// On a claim: the node its volume is to move to (the operator's ask).
pub const ANN_MOVE_TO: &str = "stead.csi.dev/move-to";
/// On a claim the target deleted: kept until its copy is made again.
pub const FINALIZER: &str = "stead.csi.dev/move";
/// On a claim made again by a move: the node whose agent made it.
pub const ANN_RECREATED_BY: &str = "stead.csi.dev/recreated-by";
/// On the new PV and the claim made again: `<node>/<pv>` it came from.
pub const ANN_MOVED_FROM: &str = "stead.csi.dev/moved-from";
/// On the claim made again on its old volume: why the move failed.
pub const ANN_MOVE_FAILED: &str = "stead.csi.dev/move-failed";
/// On the old PV: the node its data moves to (the holder agreed).
pub const ANN_MOVING_TO: &str = "stead.csi.dev/moving-to";
/// On the old PV: its reclaim policy before the move made it Retain.
pub const ANN_POLICY_BEFORE: &str = "stead.csi.dev/reclaim-policy-before-move";
/// On the new PV until its claim is made again: that claim (JSON of
/// [`Template`]), so that a target restarted between the old claim's end
/// and the new one's creation still makes it.
pub const ANN_RECREATE: &str = "stead.csi.dev/recreate-claim";
/// On a Node: drain moves the volumes of this node (`any` node with room,
/// or the node named).
pub const ANN_DRAIN: &str = "stead.csi.dev/drain-moves-to";

/// How often the holder looks at a released PV whose claim is being made
/// again, and the target at a move waiting for something.
const POLL: Duration = Duration::from_secs(5);
/// A claim still missing this long after its PV was released by a move is
/// reported on the PV (its data is kept).
const CLAIM_MISSING_TOO_LONG: Duration = Duration::from_secs(600);

/// The name of the target's new volume (and PV) for the claim of `uid`.
pub fn moved_name(uid: &str) -> String {
    format!("pvc-{uid}-moved")
}

fn annotation<'a, K: Resource>(obj: &'a K, key: &str) -> Option<&'a str> {
    obj.meta()
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The node a claim asks to move to.
pub fn move_to<K: Resource>(pvc: &K) -> Option<&str> {
    annotation(pvc, ANN_MOVE_TO)
}

fn has_finalizer<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// Whether a claim (as the claim store has it) is being moved to `node`:
/// the target's new volume for it is not a leak (`reclaim::reap_round`).
pub fn moving_here<K: Resource>(pvc: &K, node: &str) -> bool {
    move_to(pvc) == Some(node)
}

/// How long after a moving claim is gone a claim made again under its name
/// still waits for the move's copy (or, after a failed move, its old
/// volume) rather than being given a new, empty volume: the target makes
/// the claim again at once, and the PV controller binds a StatefulSet's to
/// the copy by name within seconds; this covers a target that is slow or
/// restarting.
pub const HOLD_AFTER_GONE: Duration = Duration::from_secs(15 * 60);

/// The claims whose volume is being moved, as this agent's claim watch saw
/// them (every agent sees every claim's metadata): a claim deleted by a
/// move and kept by its finalizer, and for [`HOLD_AFTER_GONE`] after it is
/// gone. A claim made again under its name meanwhile by someone else (a
/// StatefulSet's controller for its Pending pod), which names no volume yet,
/// is one no node may provision: the scheduler may well pick a third node
/// for its pod before the copy binds, and that node's volume would be empty
/// (see [`InFlight::holds`]).
#[derive(Debug, Default)]
pub struct InFlight {
    claims: std::sync::Mutex<InFlightState>,
}

#[derive(Debug, Default)]
struct InFlightState {
    /// By `namespace/name`.
    moving: std::collections::HashMap<String, Moving>,
    /// During a re-list of the claim watch: the keys it showed.
    listed: Option<std::collections::HashSet<String>>,
}

#[derive(Debug, Clone)]
struct Moving {
    uid: String,
    to: String,
    /// When the old claim was seen gone (`None`: still there).
    gone: Option<std::time::Instant>,
    /// The uid of the claim made again under its name, once bound (or
    /// made by the move): nothing is held any more, and the node the
    /// scheduler had picked for it hands its node choice over
    /// ([`InFlight::settled`]).
    settled: Option<String>,
}

impl InFlight {
    /// Looks at one event of the claim watch (before the store's filter).
    pub fn observe(
        &self,
        event: &kube::runtime::watcher::Event<PartialObjectMeta<PersistentVolumeClaim>>,
    ) {
        use kube::runtime::watcher::Event;
        let now = std::time::Instant::now();
        let mut state = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Init => state.listed = Some(Default::default()),
            Event::InitApply(c) => {
                if let Some(listed) = state.listed.as_mut() {
                    listed.insert(claim::claim_key(c));
                }
                state.apply(c, now);
            }
            Event::InitDone => {
                // A moving claim that left while the watch was down.
                if let Some(listed) = state.listed.take() {
                    for (key, m) in state.moving.iter_mut() {
                        if m.gone.is_none() && !listed.contains(key) {
                            m.gone = Some(now);
                        }
                    }
                }
            }
            Event::Apply(c) => state.apply(c, now),
            Event::Delete(c) => {
                let key = claim::claim_key(c);
                if let Some(m) = state.moving.get_mut(&key)
                    && Some(m.uid.as_str()) == c.uid().as_deref()
                {
                    m.gone.get_or_insert(now);
                }
            }
        }
        state.moving.retain(|_, m| {
            m.gone
                .is_none_or(|at| now.duration_since(at) < HOLD_AFTER_GONE)
        });
    }

    /// The node a move of claim `meta`'s name is under way to, when `meta`
    /// is a claim made again under that name by someone else than the move
    /// and not bound yet: no node gives it a volume of its own; the PV
    /// controller binds it to the move's copy (bound ahead to its name), or
    /// the target's agent gives it the copy (`recreate`), or after a failed
    /// move its old volume.
    pub fn holds(&self, meta: &ObjectMeta) -> Option<String> {
        let state = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let m = state.moving.get(&key_of(meta))?;
        if m.settled.is_some() {
            return None;
        }
        let made_by_move_or_bound = meta.annotations.as_ref().is_some_and(settles);
        let fresh = m.gone.is_none_or(|at| at.elapsed() < HOLD_AFTER_GONE);
        (meta.uid.as_deref() != Some(m.uid.as_str()) && !made_by_move_or_bound && fresh)
            .then(|| m.to.clone())
    }

    /// Whether `meta` is the claim made again under a moving claim's name,
    /// now bound: the scheduler may have picked a node for it before it was
    /// (`volume.kubernetes.io/selected-node`), which that node's agent hands
    /// over to the node of its volume (`reconcile::hand_over`), so that the
    /// claim is in that node's store (drains, expansion).
    pub fn settled(&self, meta: &ObjectMeta) -> bool {
        let state = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        state
            .moving
            .get(&key_of(meta))
            .is_some_and(|m| m.settled.is_some() && m.settled == meta.uid)
    }

    /// Forgets the move of `meta`'s name (its claim made again is settled).
    pub fn forget(&self, meta: &ObjectMeta) {
        let mut state = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        state.moving.remove(&key_of(meta));
    }
}

/// Whether a claim made again under a moving claim's name needs nothing
/// more from the hold: made by the move (bound ahead), or bound.
fn settles(annotations: &BTreeMap<String, String>) -> bool {
    annotations.contains_key(ANN_RECREATED_BY)
        || annotations.contains_key(claim::ANN_BIND_COMPLETED)
}

fn key_of(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

impl InFlightState {
    fn apply(&mut self, c: &PartialObjectMeta<PersistentVolumeClaim>, now: std::time::Instant) {
        let key = claim::claim_key(c);
        let uid = c.uid().unwrap_or_default();
        if c.meta().deletion_timestamp.is_some()
            && has_finalizer(c)
            && let Some(to) = move_to(c)
        {
            self.moving.insert(
                key,
                Moving {
                    uid,
                    to: to.to_string(),
                    gone: None,
                    settled: None,
                },
            );
            return;
        }
        let Some(m) = self.moving.get_mut(&key) else {
            return;
        };
        if m.uid == uid || m.settled.is_some() {
            return;
        }
        // A claim of that name made since: the old one is gone, and once the
        // new one is bound (or made by the move, bound ahead) nothing is held.
        m.gone.get_or_insert(now);
        if settles(c.annotations()) {
            m.settled = Some(uid);
        }
    }
}

/// What of a claim is made again: its labels, its annotations but those of
/// the binding and the move, its owners (a StatefulSet's retention policy),
/// and its spec without its volume and data source (the moved data is the
/// content now).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub owners: Vec<OwnerReference>,
    pub spec: PersistentVolumeClaimSpec,
}

/// Annotations the binder, the scheduler or a move wrote: not carried to
/// the claim made again.
const NOT_CARRIED: &[&str] = &[
    claim::ANN_SELECTED_NODE,
    claim::ANN_BIND_COMPLETED,
    claim::ANN_STORAGE_PROVISIONER,
    claim::ANN_BETA_STORAGE_PROVISIONER,
    claim::ANN_WAITS_FOR_SCHEDULER,
    "pv.kubernetes.io/bound-by-controller",
    "kubectl.kubernetes.io/last-applied-configuration",
    ANN_MOVE_TO,
    ANN_RECREATED_BY,
    ANN_MOVED_FROM,
    ANN_MOVE_FAILED,
];

impl Template {
    pub fn of(pvc: &PersistentVolumeClaim) -> Self {
        let mut spec = pvc.spec.clone().unwrap_or_default();
        spec.volume_name = None;
        spec.data_source = None;
        spec.data_source_ref = None;
        let mut annotations = pvc.annotations().clone();
        annotations.retain(|k, _| !NOT_CARRIED.contains(&k.as_str()));
        Template {
            namespace: pvc.namespace().unwrap_or_default(),
            name: pvc.name_any(),
            labels: pvc.labels().clone(),
            annotations,
            owners: pvc.owner_references().to_vec(),
            spec,
        }
    }

    /// The claim again, bound ahead to PV `volume` (of `node`), made by the
    /// agent of `by`.
    pub fn claim(
        &self,
        volume: &str,
        node: &str,
        by: &str,
        extra: &[(&str, String)],
    ) -> PersistentVolumeClaim {
        let mut annotations = self.annotations.clone();
        annotations.insert(claim::ANN_SELECTED_NODE.into(), node.into());
        annotations.insert(ANN_RECREATED_BY.into(), by.into());
        for (k, v) in extra {
            annotations.insert((*k).into(), v.clone());
        }
        let mut spec = self.spec.clone();
        spec.volume_name = Some(volume.into());
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: (!self.labels.is_empty()).then(|| self.labels.clone()),
                annotations: Some(annotations),
                owner_references: (!self.owners.is_empty()).then(|| self.owners.clone()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }
}

/// The pods that use claim `name` (of their namespace) on a node: bound to
/// one and not finished. A pod no node took yet does not (kubelet starts
/// none on a claim being deleted, and pvc-protection does not count it).
pub fn users(pods: &[Pod], name: &str) -> Vec<String> {
    pods.iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .filter_map(|p| {
            let spec = p.spec.as_ref()?;
            let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
            spec.volumes
                .iter()
                .flatten()
                .any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == name)
                })
                .then(|| format!("pod {} on node {node}", p.name_any()))
        })
        .collect()
}

/// What the holder does with its PV P marked `moving-to`, from P and the
/// claim of P's claim name now (`claim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderStep {
    /// Nothing until the claim changes (P still bound to its claim, and
    /// the move still asked or under way).
    Hold,
    /// Look again shortly (the claim is being made again).
    Wait,
    /// The move was taken back before it began: restore P.
    Cancel,
    /// The claim of that name is bound to another PV made by the move:
    /// restore P's policy; a Delete policy then deletes the old volume.
    Moved { to: String },
    /// The claim was made again on P (the move failed): free P for it.
    Rebind,
    /// A claim of that name that is neither: leave P retained, say so.
    Foreign(String),
}

pub fn holder_step(pv: &PersistentVolume, claim_now: Option<&PersistentVolumeClaim>) -> HolderStep {
    let name = pv.name_any();
    let phase = pv
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("");
    let bound_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref());
    let Some(c) = claim_now else {
        return HolderStep::Wait;
    };
    let same = c.uid().as_deref() == bound_uid && bound_uid.is_some();
    if same {
        // The claim P was bound to: a move not begun yet, or under way.
        if c.meta().deletion_timestamp.is_some() {
            return HolderStep::Wait;
        }
        return match move_to(c) {
            Some(_) if phase != "Released" => HolderStep::Hold,
            Some(_) => HolderStep::Wait,
            None => HolderStep::Cancel,
        };
    }
    let spec = c.spec.as_ref();
    let volume = spec.and_then(|s| s.volume_name.as_deref()).unwrap_or("");
    let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let recreated = annotation(c, ANN_RECREATED_BY).is_some();
    if volume == name {
        return if recreated {
            HolderStep::Rebind
        } else {
            HolderStep::Foreign(format!(
                "claim {} names PV {name} but was not made again by a move",
                claim::claim_key(c)
            ))
        };
    }
    // The copy's name comes from the old claim's uid, and the PV controller
    // binds a claim to it only by the name it was bound ahead to: a claim
    // bound to it is the move's, whoever made the claim.
    let to_copy = bound_uid.is_some_and(|u| volume == moved_name(u));
    if !recreated && !to_copy {
        return HolderStep::Foreign(format!(
            "claim {} is a new claim of the same name that a move did not make (bound to {})",
            claim::claim_key(c),
            if volume.is_empty() {
                "no PV yet"
            } else {
                volume
            }
        ));
    }
    if !bound || volume.is_empty() {
        return HolderStep::Wait;
    }
    HolderStep::Moved { to: volume.into() }
}

impl<C> Ctx<C> {
    /// Queues an event of a move on `obj`. The events of one object are
    /// a series per reason (kube's recorder keeps the first note of a
    /// reason and counts the rest), so each wait has a reason of its own.
    fn move_event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        if type_ == EventType::Warning {
            tracing::warn!(object = %obj.meta().name.as_deref().unwrap_or_default(), reason, "{note}");
        } else {
            tracing::info!(object = %obj.meta().name.as_deref().unwrap_or_default(), reason, "{note}");
        }
        self.events
            .post(obj.object_ref(&()), type_, reason, "Move", note);
    }

    /// Whether `what` (of one claim) is said for the first time.
    fn first(&self, what: &str) -> bool {
        self.first_no_room(what)
    }
}

/// The claim watch's hook (`reconcile::reconcile_meta`): a claim that asks
/// to move, or is kept by a move, is this module's. `None`: not a move's
/// claim for this node, reconciled as any other.
pub(crate) async fn on_claim<C: CsiController>(
    meta: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: &Arc<Ctx<C>>,
) -> Result<Option<Action>, Error> {
    let Some(target) = move_to(meta) else {
        // The ask taken back: the holder restores its PV now (not at its
        // next look, 30 s on). Found by the PV's usual name; a PV a move
        // made (another name) is looked at by its own requeue.
        if let Some(name) = claim::volume_name(meta)
            && let Some(pv) = ctx.volumes.get(&ObjectRef::new(&name))
            && annotation(&*pv, ANN_MOVING_TO).is_some()
            && meta.meta().deletion_timestamp.is_none()
        {
            return holder_pv(ctx, &pv).await.map(|_| None);
        }
        return Ok(None);
    };
    let node = ctx.config.node.as_str();
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &meta.namespace().unwrap_or_default());
    if target == node {
        let Some(pvc) = api.get_opt(&meta.name_any()).await? else {
            return Ok(Some(Action::await_change()));
        };
        if pvc.uid() != meta.uid() {
            return Ok(Some(Action::await_change()));
        }
        return target_step(ctx, &pvc).await.map(Some);
    }
    // The holder: the claim's PV is one of this node's (found in memory,
    // so that the agents of other nodes send nothing for it).
    if meta.meta().deletion_timestamp.is_some() {
        return Ok(Some(Action::await_change()));
    }
    let Some(pv) = pv_of_claim(ctx, meta.uid().as_deref()) else {
        // Not this node's; the target's agent says what is wrong.
        return Ok(None);
    };
    let Some(pvc) = api.get_opt(&meta.name_any()).await? else {
        return Ok(Some(Action::await_change()));
    };
    if pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()) != Some(pv.name_any().as_str()) {
        return Ok(None);
    }
    agree(ctx, &pvc, &pv, target).await.map(Some)
}

/// The PV of this node bound to the claim of `uid`, from the PV store (by
/// the usual name first, then by the claim reference: a PV a move made
/// has another name).
fn pv_of_claim<C>(ctx: &Ctx<C>, uid: Option<&str>) -> Option<Arc<PersistentVolume>> {
    let uid = uid?;
    let bound_here = |pv: &PersistentVolume| {
        pv::pv_node(pv) == Some(ctx.config.node.as_str())
            && pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.as_deref())
                == Some(uid)
    };
    if let Some(pv) = ctx.volumes.get(&ObjectRef::new(&format!("pvc-{uid}")))
        && bound_here(&pv)
    {
        return Some(pv);
    }
    ctx.volumes.state().into_iter().find(|pv| bound_here(pv))
}

/// The holder agrees to a move of `pvc` (bound to its PV `pv`) to `target`:
/// P is Retained and marked, so that deleting the claim keeps the data.
async fn agree<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    target: &str,
) -> Result<Action, Error> {
    let node = &ctx.config.node;
    if target == node.as_str() {
        return Ok(Action::await_change());
    }
    if annotation(pv, ANN_MOVING_TO) == Some(target) {
        return Ok(Action::await_change());
    }
    if pv::stead_volume_handle(pv).is_none() {
        return Ok(Action::await_change());
    }
    let before = annotation(pv, ANN_POLICY_BEFORE)
        .map(str::to_string)
        .or_else(|| {
            pv.spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.clone())
        })
        .unwrap_or_else(|| "Delete".into());
    let patch = json!({
        "metadata": {
            "resourceVersion": pv.resource_version(),
            "annotations": { ANN_MOVING_TO: target, ANN_POLICY_BEFORE: before },
        },
        "spec": { "persistentVolumeReclaimPolicy": "Retain" },
    });
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match api
        .patch(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        // Changed meanwhile: the change brings it back.
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Action::requeue(POLL)),
        Err(e) => return Err(e.into()),
    }
    ctx.move_event(
        pvc,
        EventType::Normal,
        "MoveAgreed",
        format!(
            "node {node} holds volume {} of claim {} and lets it move to node {target}: PV {} is Retained (was {before}) until the claim is bound to its copy there; remove annotation {ANN_MOVE_TO} before the move begins to take it back",
            pv::stead_volume_handle(pv).unwrap_or_default(),
            claim::claim_key(pvc),
            pv.name_any()
        ),
    );
    Ok(Action::await_change())
}

/// The PV watch's hook (`reclaim::reconcile`), for a PV of this node: the
/// holder's old PV marked `moving-to`, or the target's new PV whose claim
/// is still to be made again. `None`: reconciled as any other.
pub(crate) async fn on_pv<C: CsiController>(
    pv: &PersistentVolume,
    ctx: &Ctx<C>,
) -> Result<Option<Action>, Error> {
    if annotation(pv, ANN_MOVING_TO).is_some() && pv.meta().deletion_timestamp.is_none() {
        return holder_pv(ctx, pv).await.map(Some);
    }
    if let Some(raw) = annotation(pv, ANN_RECREATE)
        && pv.meta().deletion_timestamp.is_none()
    {
        return recreate_from_pv(ctx, pv, raw).await.map(Some);
    }
    Ok(None)
}

/// The holder's old PV (see [`holder_step`]).
async fn holder_pv<C: CsiController>(ctx: &Ctx<C>, pv: &PersistentVolume) -> Result<Action, Error> {
    let node = &ctx.config.node;
    let name = pv.name_any();
    let Some(claim_ref) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return Ok(Action::await_change());
    };
    let (ns, claim_name) = (
        claim_ref.namespace.clone().unwrap_or_default(),
        claim_ref.name.clone().unwrap_or_default(),
    );
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let now = api.get_opt(&claim_name).await?;
    let step = holder_step(pv, now.as_ref());
    tracing::debug!(pv = %name, ?step, "moved PV");
    let restore = || {
        let before = annotation(pv, ANN_POLICY_BEFORE)
            .unwrap_or("Delete")
            .to_string();
        json!({
            "metadata": {
                "resourceVersion": pv.resource_version(),
                "annotations": { ANN_MOVING_TO: null, ANN_POLICY_BEFORE: null },
            },
            "spec": { "persistentVolumeReclaimPolicy": before },
        })
    };
    let patch = match &step {
        // The claim's changes bring P back; the cancel is looked at then,
        // and every 30 s (an annotation removed shows only on the claim).
        HolderStep::Hold => return Ok(Action::requeue(Duration::from_secs(30))),
        HolderStep::Wait => {
            let released_for = pv_released_for(pv);
            if now.is_none()
                && released_for.is_some_and(|d| d >= CLAIM_MISSING_TOO_LONG)
                && ctx.first(&format!("move-missing/{}", pv.uid().unwrap_or_default()))
            {
                ctx.move_event(
                    pv,
                    EventType::Warning,
                    "MoveStalled",
                    format!(
                        "claim {ns}/{claim_name} of PV {name} was deleted by a move to node {} and has not been made again for {} s; the data stays on node {node} (PV {name} is Retained): let the agent of node {} finish, or make the claim again with spec.volumeName: {name}",
                        annotation(pv, ANN_MOVING_TO).unwrap_or_default(),
                        released_for.unwrap_or_default().as_secs(),
                        annotation(pv, ANN_MOVING_TO).unwrap_or_default()
                    ),
                );
            }
            // Reported (data kept): looked at less often from then on.
            let long = released_for.is_some_and(|d| d >= CLAIM_MISSING_TOO_LONG);
            return Ok(Action::requeue(if long {
                Duration::from_secs(60)
            } else {
                POLL
            }));
        }
        HolderStep::Foreign(why) => {
            if ctx.first(&format!("move-foreign/{}", pv.uid().unwrap_or_default())) {
                ctx.move_event(
                    pv,
                    EventType::Warning,
                    "MoveStalled",
                    format!(
                        "PV {name} on node {node} was being moved, but {why}; its data is kept (Retained) for an operator to decide"
                    ),
                );
            }
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
        HolderStep::Cancel => restore(),
        HolderStep::Moved { .. } => restore(),
        HolderStep::Rebind => {
            let mut p = restore();
            p["spec"]["claimRef"] = json!({ "uid": null, "resourceVersion": null });
            p
        }
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match pvs
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
            return Ok(Action::requeue(POLL));
        }
        Err(e) => return Err(e.into()),
    }
    let handle = pv::stead_volume_handle(pv).unwrap_or_default();
    let before = annotation(pv, ANN_POLICY_BEFORE).unwrap_or("Delete");
    match step {
        HolderStep::Cancel => {
            if let Some(c) = &now {
                ctx.move_event(
                    c,
                    EventType::Normal,
                    "MoveCancelled",
                    format!(
                        "annotation {ANN_MOVE_TO} was removed before the move began: volume {handle} stays on node {node}, PV {name} has its reclaim policy {before} again"
                    ),
                );
            }
        }
        HolderStep::Moved { to } => ctx.move_event(
            pv,
            EventType::Normal,
            "MovedAway",
            format!(
                "claim {ns}/{claim_name} is bound to PV {to}, its copy on node {}: {}",
                annotation(pv, ANN_MOVING_TO).unwrap_or_default(),
                if before == "Delete" {
                    format!("volume {handle} on node {node} and PV {name} are deleted now")
                } else {
                    format!("PV {name} keeps reclaim policy {before}, so volume {handle} stays on node {node}")
                }
            ),
        ),
        HolderStep::Rebind => {
            if let Some(c) = &now {
                ctx.move_event(
                    c,
                    EventType::Normal,
                    "MoveRolledBack",
                    format!(
                        "the claim is bound again to its old volume {handle} on node {node} (PV {name}, reclaim policy {before})"
                    ),
                );
            }
        }
        _ => {}
    }
    Ok(Action::await_change())
}

/// How long a released PV has been released, from its status.
fn pv_released_for(pv: &PersistentVolume) -> Option<Duration> {
    let at = pv.status.as_ref()?.last_phase_transition_time.as_ref()?;
    let secs = jiff_secs_since(at);
    Some(Duration::from_secs(secs))
}

fn jiff_secs_since(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> u64 {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.duration_since(t.0)
        .as_secs()
        .try_into()
        .unwrap_or_default()
}

/// Whether a Stead PV's volume is a `dir` one (its context says).
fn is_dir(pv: &PersistentVolume) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .and_then(|c| c.volume_attributes.as_ref())
        .and_then(|a| a.get(crate::csi::controller::CONTEXT_BACKEND))
        .is_some_and(|b| b == "dir")
}

/// Why the target cannot take claim `pvc` (bound to `pv` of `holder`).
fn refusal<C>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    pv: Option<&PersistentVolume>,
    class: Option<&ClassSpec>,
) -> Option<String> {
    let node = &ctx.config.node;
    let key = claim::claim_key(pvc);
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let Some(pv) = pv.filter(|_| bound) else {
        return Some(format!(
            "claim {key} is not bound to a volume yet; only a bound claim's volume can move"
        ));
    };
    if pv::stead_volume_handle(pv).is_none() {
        return Some(format!(
            "claim {key} is bound to PV {}, which is not a Stead volume",
            pv.name_any()
        ));
    }
    let holder = pv::pv_node(pv).unwrap_or_default();
    if holder == node.as_str() {
        return Some(format!("claim {key}'s volume is on node {node} already"));
    }
    if is_dir(pv) {
        return Some(format!(
            "volume {} of claim {key} is a dir volume, and only image volumes can be transferred between nodes",
            pv.name_any()
        ));
    }
    let Some(class) = class else {
        return Some(format!(
            "the StorageClass of claim {key} is not known on node {node} (or not a Stead class)"
        ));
    };
    if let Some(why) = crossnode::cannot_pull(ctx, class) {
        return Some(why);
    }
    if let Err(why) = schedulable::for_immediate(ctx.own_node().as_deref()) {
        return Some(format!(
            "node {node} is {why}: the claim's pod could not run there"
        ));
    }
    None
}

/// The target's step for claim `pvc` (annotated to move to this node).
async fn target_step<C: CsiController>(
    ctx: &Arc<Ctx<C>>,
    pvc: &PersistentVolumeClaim,
) -> Result<Action, Error> {
    let node = ctx.config.node.clone();
    let key = claim::claim_key(pvc);
    let uid = pvc.uid().unwrap_or_default();
    let deleting = pvc.meta().deletion_timestamp.is_some();
    let ours = has_finalizer(pvc);
    if deleting && !ours {
        // Deleted by someone else before the move began.
        return Ok(Action::await_change());
    }
    let pv_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let old = if pv_name.is_empty() {
        None
    } else {
        pvs.get_opt(&pv_name).await?
    };
    let class_name = claim::class_name(pvc).unwrap_or_default().to_string();
    let class = ctx
        .classes
        .get(&ObjectRef::new(&class_name))
        .filter(|sc| class::is_stead(sc))
        .and_then(|sc| class::parse(&sc).ok());
    if !deleting && let Some(why) = refusal(ctx, pvc, old.as_ref(), class.as_ref()) {
        if ctx.first(&format!(
            "move-refused/{uid}/{}",
            pvc.resource_version().unwrap_or_default()
        )) {
            ctx.move_event(
                    pvc,
                    EventType::Warning,
                    "MoveRefused",
                    format!("node {node} does not move claim {key} here: {why}; nothing was changed; fix it, or remove annotation {ANN_MOVE_TO}"),
                );
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let (Some(old), Some(class)) = (old, class) else {
        // Deleting, and its PV or class gone: nothing this node can do; the
        // claim stays until an operator looks (the data is Retained).
        tracing::warn!(pvc = %key, "a claim being moved lost its PV or StorageClass");
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    let holder = pv::pv_node(&old).unwrap_or_default().to_string();
    if annotation(&old, ANN_MOVING_TO) != Some(node.as_str()) {
        if ctx.first(&format!("move-agree/{uid}")) {
            ctx.move_event(
                pvc,
                EventType::Normal,
                "MoveWaitingForHolder",
                format!("node {node} waits for the agent of node {holder}, which holds volume {pv_name}, to let it go (it marks PV {pv_name} {ANN_MOVING_TO}={node})"),
            );
        }
        return Ok(Action::requeue(POLL));
    }
    if !deleting {
        let pods: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
        let list = pods.list(&ListParams::default()).await?;
        let using = users(&list.items, &pvc.name_any());
        if !using.is_empty() {
            if ctx.first(&format!("move-pods/{uid}/{}", using.join(","))) {
                ctx.move_event(
                    pvc,
                    EventType::Normal,
                    "MoveWaiting",
                    format!(
                        "claim {key} moves to node {node} once no pod uses it ({} does): Stead stops nothing itself; scale the workload down, or cordon node {holder} and delete the pod (its replacement waits, Pending, and runs on node {node} after the move)",
                        using.join(", ")
                    ),
                );
            }
            return Ok(Action::requeue(POLL));
        }
    }
    // The room first: nothing is given up for a move that has no room.
    let target_name = moved_name(&uid);
    let size = old
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity::to_bytes(&q.0).ok())
        .unwrap_or(0);
    let volume = if ctx.pv_known(&target_name) {
        None
    } else {
        match create_target(ctx, pvc, &class, &target_name, size).await? {
            Ok(v) => Some(v),
            Err(action) => return Ok(action),
        }
    };
    if !deleting {
        give_up_claim(ctx, pvc).await?;
        ctx.move_event(
            pvc,
            EventType::Normal,
            "MoveCopying",
            format!(
                "claim {key} is deleted and kept (finalizer {FINALIZER}) while node {node} copies volume {pv_name} from node {holder} into {target_name}; kubelet starts no pod on it meanwhile, and the old volume stays until the claim is bound to the copy"
            ),
        );
    }
    if let Some(volume) = volume {
        let source = VolumeId::parse(pv::stead_volume_handle(&old).unwrap_or_default())
            .map(SourceRef::Volume)
            .map_err(|e| Error::Csi {
                op: "Move",
                volume: pv_name.clone(),
                node: node.clone(),
                code: tonic::Code::InvalidArgument,
                message: e.to_string(),
            })?;
        let plan = crossnode::Plan {
            holder: holder.clone(),
            source,
            size_bytes: Some(size),
            what: format!("volume {pv_name} of claim {key}"),
        };
        if let Err(action) = crossnode::receive(ctx, pvc, &plan, &volume).await? {
            if !ctx.ledger.contains(&target_name).await? {
                // Rolled back: this pull can never succeed as it is.
                return roll_back(ctx, pvc, &old, &holder).await;
            }
            return Ok(action);
        }
        make_pv(ctx, pvc, &class, &volume, &holder, &pv_name).await?;
        ctx.ledger.remove(&target_name).await?;
        ctx.capacity_changed.notify_one();
    }
    let template = Template::of(pvc);
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &template.namespace);
    if !release_claim(&api, pvc).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let made = recreate(
        ctx,
        &template,
        &target_name,
        &node,
        &[(ANN_MOVED_FROM, format!("{holder}/{pv_name}"))],
    )
    .await?;
    ctx.succeeded(&uid);
    if let Some(made) = made {
        ctx.move_event(
            &made,
            EventType::Normal,
            "Moved",
            format!(
                "claim {key} was made again bound to PV {target_name} on node {node}, a verified copy of volume {pv_name} of node {holder}; its pod runs on node {node} now"
            ),
        );
    }
    Ok(Action::await_change())
}

/// CreateVolume of the target's volume (intent first); `Ok(Err)`: what to
/// do meanwhile (no room: said, nothing else changed).
async fn create_target<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
    name: &str,
    size: i64,
) -> Result<Result<Volume, Action>, Error> {
    let node = &ctx.config.node;
    let key = claim::claim_key(pvc);
    let uid = pvc.uid().unwrap_or_default();
    let mut request: CreateVolumeRequest = match claim::create_request(pvc, class, node) {
        Ok(r) => r,
        Err(e) => {
            ctx.move_event(
                pvc,
                EventType::Warning,
                "MoveRefused",
                format!(
                    "node {node} cannot make the copy of claim {key}: {e}; nothing was changed"
                ),
            );
            return Ok(Err(Action::requeue(Duration::from_secs(300))));
        }
    };
    request.name = name.to_string();
    let range = request
        .capacity_range
        .get_or_insert(CapacityRange::default());
    range.required_bytes = range.required_bytes.max(size);
    if range.limit_bytes != 0 && range.limit_bytes < size {
        range.limit_bytes = size;
    }
    ctx.ledger.record(name, &key, &uid).await?;
    match ctx.csi.create_volume(tonic::Request::new(request)).await {
        Ok(resp) => Ok(Ok(resp.into_inner().volume.unwrap_or_default())),
        Err(status) => {
            // The intent stays: a volume this call may have found (a move
            // under way) keeps its data; the reaper removes what no move
            // asks for any more (`reclaim::reap_round`).
            let wait = ctx.backoff(&uid);
            ctx.move_event(
                pvc,
                EventType::Warning,
                "MoveFailed",
                format!(
                    "node {node} cannot make the copy of claim {key} ({} in pool {}): {}; nothing was changed, the claim stays on its node, and node {node} tries again in {} s",
                    quantity::human(size),
                    class.pool.as_deref().unwrap_or("(default)"),
                    status.message(),
                    wait.as_secs()
                ),
            );
            Ok(Err(Action::requeue(wait)))
        }
    }
}

/// Puts the move's finalizer on the claim and deletes it: from now on no
/// pod starts on it, and it stays until the move lets it go.
async fn give_up_claim<C>(ctx: &Ctx<C>, pvc: &PersistentVolumeClaim) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    let mut finalizers = pvc.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        finalizers.push(FINALIZER.to_string());
        let patch = json!({"metadata": {
            "resourceVersion": pvc.resource_version(),
            "finalizers": finalizers,
        }});
        api.patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pvc.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pvc.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the move's finalizer from the old claim and waits (briefly)
/// until it is gone; `false`: still there, look again.
async fn release_claim(
    api: &Api<PersistentVolumeClaim>,
    pvc: &PersistentVolumeClaim,
) -> Result<bool, Error> {
    let name = pvc.name_any();
    let mut current = api.get_opt(&name).await?;
    for _ in 0..40 {
        let Some(c) = current.as_ref().filter(|c| c.uid() == pvc.uid()) else {
            return Ok(true);
        };
        if has_finalizer(c) {
            let rest: Vec<&String> = c.finalizers().iter().filter(|f| *f != FINALIZER).collect();
            let patch = json!({"metadata": {
                "resourceVersion": c.resource_version(),
                "finalizers": rest,
            }});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // kube-controller-manager's pvc-protection lets it go once no pod
        // uses it; a claim still there after ten seconds is looked at again.
        tokio::time::sleep(Duration::from_millis(250)).await;
        current = api.get_opt(&name).await?;
    }
    Ok(current.is_none_or(|c| c.uid() != pvc.uid()))
}

/// Makes the claim of `template` again, bound ahead to PV `volume` of
/// `node`. A claim of that name made meanwhile by someone else (a
/// StatefulSet's controller, for its Pending pod) that names no volume yet
/// is given this one; one that names another is left and reported.
/// `Some(claim)`: the claim now bound (or binding) to `volume`.
async fn recreate<C>(
    ctx: &Ctx<C>,
    template: &Template,
    volume: &str,
    node: &str,
    extra: &[(&str, String)],
) -> Result<Option<PersistentVolumeClaim>, Error> {
    let by = &ctx.config.node;
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &template.namespace);
    let claim = template.claim(volume, node, by, extra);
    match api.create(&PostParams::default(), &claim).await {
        Ok(c) => return Ok(Some(c)),
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let Some(existing) = api.get_opt(&template.name).await? else {
        return Ok(None);
    };
    let names = existing
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .unwrap_or("");
    if names == volume {
        // A claim a StatefulSet made meanwhile, which the PV controller
        // bound to the copy by its name (the new PV is bound ahead to the
        // claim's name): said to be the move's, which the holder waits for.
        if annotation(&existing, ANN_RECREATED_BY) == Some(by.as_str()) || node != by.as_str() {
            return Ok(Some(existing));
        }
        let mut annotations = serde_json::Map::new();
        annotations.insert(ANN_RECREATED_BY.into(), json!(by));
        annotations.insert(claim::ANN_SELECTED_NODE.into(), json!(node));
        for (k, v) in extra {
            annotations.insert((*k).into(), json!(v));
        }
        let patch = json!({"metadata": {"annotations": annotations}});
        return match api
            .patch(
                &template.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(marked) => Ok(Some(marked)),
            // Selected by the scheduler for another node before the binder
            // bound it: the admission policy leaves that node's claim alone,
            // and the mark is only a note (the holder knows the copy by its
            // name, `holder_step`).
            Err(kube::Error::Api(s)) if s.code == 403 || s.code == 409 => {
                tracing::debug!(pvc = %claim::claim_key(&existing), reason = %s.message,
                    "the claim made again is bound to the copy; not marked as the move's");
                Ok(Some(existing))
            }
            Err(e) => Err(e.into()),
        };
    }
    if !names.is_empty() {
        ctx.move_event(
            &existing,
            EventType::Warning,
            "MoveStalled",
            format!(
                "a claim of the same name, bound to {names}, was made before node {by} could make it again on PV {volume}; PV {volume} keeps the moved data for an operator (bind a claim to it with spec.volumeName: {volume})"
            ),
        );
        return Ok(None);
    }
    let patch = json!({
        "metadata": {
            "resourceVersion": existing.resource_version(),
            "annotations": { ANN_RECREATED_BY: by, claim::ANN_SELECTED_NODE: node },
        },
        "spec": { "volumeName": volume },
    });
    let adopted = api
        .patch(
            &template.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(Some(adopted))
}

/// The target's new PV, pre-bound to the claim's name (no uid: the claim
/// made again has a new one), with the claim to make again.
async fn make_pv<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
    volume: &Volume,
    holder: &str,
    old: &str,
) -> Result<(), Error> {
    let node = &ctx.config.node;
    let mut pv = pv::build_pv(pvc, class, volume, node);
    if let Some(r) = pv.spec.as_mut().and_then(|s| s.claim_ref.as_mut()) {
        *r = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: pvc.namespace(),
            name: Some(pvc.name_any()),
            ..Default::default()
        };
    }
    let template = serde_json::to_string(&Template::of(pvc)).unwrap_or_default();
    let annotations = pv.metadata.annotations.get_or_insert_default();
    annotations.insert(ANN_MOVED_FROM.into(), format!("{holder}/{old}"));
    annotations.insert(ANN_RECREATE.into(), template);
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let name = pv.name_any();
    match api.create(&PostParams::default(), &pv).await {
        Ok(_) => {
            ctx.made_pv(&name);
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get_opt(&name).await?;
            let ours = existing.as_ref().is_some_and(|e| {
                pv::stead_volume_handle(e) == Some(volume.volume_id.as_str())
                    && pv::pv_node(e) == Some(node.as_str())
            });
            if ours {
                ctx.made_pv(&name);
                Ok(())
            } else {
                Err(Error::PvVanished { pv: name })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The target's new PV still says which claim to make again: made, unless
/// it exists; once the PV is bound the note goes.
async fn recreate_from_pv<C>(
    ctx: &Ctx<C>,
    pv: &PersistentVolume,
    raw: &str,
) -> Result<Action, Error> {
    let name = pv.name_any();
    let bound = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if bound {
        let patch = json!({"metadata": {"annotations": { ANN_RECREATE: null }}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        return Ok(Action::await_change());
    }
    let Ok(template) = serde_json::from_str::<Template>(raw) else {
        tracing::warn!(pv = %name, "annotation {ANN_RECREATE} does not hold a claim; ignored");
        return Ok(Action::await_change());
    };
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &template.namespace);
    match claims.get_opt(&template.name).await? {
        // A claim made again by someone else (a StatefulSet), not bound
        // yet: given the copy (the first try, right after the old claim
        // went, may have been refused or raced).
        Some(c)
            if c.meta().deletion_timestamp.is_none()
                && !has_finalizer(&c)
                && c.spec
                    .as_ref()
                    .and_then(|s| s.volume_name.as_deref())
                    .is_none_or(str::is_empty) =>
        {
            let moved_from = annotation(pv, ANN_MOVED_FROM)
                .unwrap_or_default()
                .to_string();
            let node = ctx.config.node.clone();
            recreate(
                ctx,
                &template,
                &name,
                &node,
                &[(ANN_MOVED_FROM, moved_from)],
            )
            .await?;
            Ok(Action::requeue(POLL))
        }
        // The old claim still there (a move under way), or the new one
        // bound: the target's claim reconcile goes on with it.
        Some(_) => Ok(Action::requeue(POLL)),
        None => {
            let moved_from = annotation(pv, ANN_MOVED_FROM)
                .unwrap_or_default()
                .to_string();
            let node = ctx.config.node.clone();
            match recreate(
                ctx,
                &template,
                &name,
                &node,
                &[(ANN_MOVED_FROM, moved_from)],
            )
            .await
            {
                Ok(_) => Ok(Action::requeue(POLL)),
                // The claim's namespace is gone (or going): it would have
                // taken the claim and its volume with it, and so it takes
                // the copy (a PV with no claim that can never get one). The
                // old volume stays Retained on its node (see `holder_pv`).
                Err(Error::Kube(kube::Error::Api(s)))
                    if s.code == 404
                        || (s.code == 403 && s.message.contains("being terminated")) =>
                {
                    ctx.move_event(
                        pv,
                        EventType::Warning,
                        "MoveAbandoned",
                        format!(
                            "namespace {} of claim {} is gone, so the claim cannot be made again: PV {name}, the copy on node {}, is deleted; the old volume stays Retained on its node",
                            template.namespace, template.name, ctx.config.node
                        ),
                    );
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => Ok(Action::await_change()),
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// A pull that can never succeed, after the claim was given up: the claim
/// is made again on its old volume, which the holder frees for it.
async fn roll_back<C>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    old: &PersistentVolume,
    holder: &str,
) -> Result<Action, Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    if !release_claim(&api, pvc).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let template = Template::of(pvc);
    let why = format!(
        "node {} could not copy the data (see the claim's events before this one)",
        ctx.config.node
    );
    let made = recreate(
        ctx,
        &template,
        &old.name_any(),
        holder,
        &[(ANN_MOVE_FAILED, why.clone())],
    )
    .await?;
    if let Some(made) = made {
        ctx.move_event(
            &made,
            EventType::Warning,
            "MoveFailed",
            format!(
                "{why}: the claim was made again on its old volume {} on node {holder}, whose agent binds it there; nothing was lost; remove annotation {ANN_MOVE_FAILED} and ask again with {ANN_MOVE_TO} to retry",
                old.name_any()
            ),
        );
    }
    Ok(Action::await_change())
}

/// A drained node's agent asks to move its volumes (see module doc): while
/// its Node is cordoned and says `stead.csi.dev/drain-moves-to`, every
/// claim bound to one of its image volumes gets `move-to` the node named,
/// or for `any` the schedulable node with the most room in the claim's
/// class (its CSIStorageCapacity). Looked at every 10 s; never ends.
pub(crate) async fn drain<C: CsiController>(ctx: Arc<Ctx<C>>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Err(e) = drain_round(&ctx).await {
            tracing::warn!(error = %e, "drain: asking to move this node's volumes failed; tried again in 10 s");
        }
    }
}

/// The node a drain moves a volume of `size` bytes of `class` to, from
/// `nodes` and the capacities published (the most room that fits, ties to
/// the lower name); `None`: no node fits.
pub fn pick_target(
    here: &str,
    class: &str,
    size: i64,
    nodes: &[Node],
    capacities: &[CSIStorageCapacity],
) -> Option<String> {
    let mut best: Option<(i64, String)> = None;
    for n in nodes {
        let name = n.name_any();
        if name == here || schedulable::for_immediate(Some(n)).is_err() {
            continue;
        }
        let room = capacities
            .iter()
            .filter(|c| c.storage_class_name == class)
            .filter(|c| {
                c.node_topology
                    .as_ref()
                    .and_then(|t| t.match_labels.as_ref())
                    .and_then(|l| l.get(crate::TOPOLOGY_KEY))
                    == Some(&name)
            })
            .filter_map(|c| c.capacity.as_ref())
            .filter_map(|q| quantity::to_bytes(&q.0).ok())
            .max();
        let Some(room) = room.filter(|r| *r >= size) else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(r, n)| room > *r || (room == *r && name < *n))
        {
            best = Some((room, name));
        }
    }
    best.map(|(_, n)| n)
}

async fn drain_round<C: CsiController>(ctx: &Ctx<C>) -> Result<(), Error> {
    let node = ctx.config.node.clone();
    let Some(own) = ctx.own_node() else {
        return Ok(());
    };
    let Some(wanted) = annotation(&*own, ANN_DRAIN).map(str::to_string) else {
        return Ok(());
    };
    if own
        .spec
        .as_ref()
        .is_none_or(|s| s.unschedulable != Some(true))
    {
        return Ok(());
    }
    let mine: Vec<Arc<PersistentVolume>> = ctx
        .volumes
        .state()
        .into_iter()
        .filter(|p| pv::pv_node(p) == Some(node.as_str()))
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
        .filter(|p| annotation(&**p, ANN_MOVING_TO).is_none())
        .collect();
    if mine.is_empty() {
        return Ok(());
    }
    let (nodes, capacities) = if wanted == "any" {
        let nodes = Api::<Node>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let caps = Api::<CSIStorageCapacity>::namespaced(
            ctx.client.clone(),
            &ctx.config.capacity_namespace,
        )
        .list(&ListParams::default().labels(&format!(
            "{}={}",
            super::capacity::LABEL_DRIVER,
            crate::DRIVER_NAME
        )))
        .await?
        .items;
        (nodes, caps)
    } else {
        (vec![], vec![])
    };
    for p in mine {
        let Some(r) = p.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
            continue;
        };
        let (ns, name) = (
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
        );
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        // From the claim store (its metadata keeps the move's annotation):
        // a round sends nothing for claims already asked.
        let stored = ctx
            .claims
            .get(&ObjectRef::<PartialObjectMeta<PersistentVolumeClaim>>::new(&name).within(&ns));
        // Not in the store: a claim whose node choice names another node
        // (made again by a StatefulSet during a move, before the handover);
        // read once.
        let c = match stored {
            Some(c) => c,
            None => match claims.get_metadata_opt(&name).await? {
                Some(c) => Arc::new(c),
                None => continue,
            },
        };
        if c.uid().as_deref() != r.uid.as_deref() || move_to(&*c).is_some() {
            continue;
        }
        if is_dir(&p) {
            if ctx.first(&format!("drain-dir/{}", c.uid().unwrap_or_default())) {
                ctx.move_event(
                    &*c,
                    EventType::Warning,
                    "MoveRefused",
                    format!(
                        "node {node} is drained and says {ANN_DRAIN}={wanted}, but claim {ns}/{name} has a dir volume ({}), which cannot be transferred between nodes; it stays on node {node}",
                        p.name_any()
                    ),
                );
            }
            continue;
        }
        let class = p
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_default();
        let size = p
            .spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .and_then(|q| quantity::to_bytes(&q.0).ok())
            .unwrap_or(0);
        let target = if wanted == "any" {
            pick_target(&node, &class, size, &nodes, &capacities)
        } else {
            Some(wanted.clone())
        };
        let Some(target) = target else {
            if ctx.first(&format!("drain-none/{}", c.uid().unwrap_or_default())) {
                ctx.move_event(
                    &*c,
                    EventType::Warning,
                    "MoveRefused",
                    format!(
                        "node {node} is drained and says {ANN_DRAIN}=any, but no other schedulable node has {} free in StorageClass {class} for claim {ns}/{name}; it stays on node {node}",
                        quantity::human(size)
                    ),
                );
            }
            continue;
        };
        let patch = json!({"metadata": {
            "resourceVersion": c.resource_version(),
            "annotations": { ANN_MOVE_TO: target },
        }});
        match claims
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => ctx.move_event(
                &*c,
                EventType::Normal,
                "DrainMove",
                format!(
                    "node {node} is drained and says {ANN_DRAIN}={wanted}: claim {ns}/{name} is asked to move to node {target}"
                ),
            ),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        NodeSpec, NodeStatus, PersistentVolumeClaimStatus, PersistentVolumeClaimVolumeSource,
        PersistentVolumeSpec, PersistentVolumeStatus, PodSpec, PodStatus, Volume as PodVolume,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::provisioner::claim::tests::pvc;

    fn bound(mut c: PersistentVolumeClaim, volume: &str) -> PersistentVolumeClaim {
        c.spec.as_mut().unwrap().volume_name = Some(volume.into());
        c.status = Some(PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            ..Default::default()
        });
        c
    }

    fn old_pv(phase: &str, claim_uid: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pvc-old".into()),
                annotations: Some(BTreeMap::from([
                    (ANN_MOVING_TO.to_string(), "node-b".to_string()),
                    (ANN_POLICY_BEFORE.to_string(), "Delete".to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                claim_ref: Some(ObjectReference {
                    namespace: Some("db".into()),
                    name: Some("data".into()),
                    uid: Some(claim_uid.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: Some(PersistentVolumeStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn with_annotation(mut c: PersistentVolumeClaim, k: &str, v: &str) -> PersistentVolumeClaim {
        c.metadata
            .annotations
            .get_or_insert_default()
            .insert(k.into(), v.into());
        c
    }

    #[test]
    fn the_claim_made_again_keeps_what_is_the_users_and_is_bound_ahead_to_the_copy() {
        let mut c = with_annotation(
            bound(pvc("data", "1Gi", Some("node-a")), "pvc-old"),
            ANN_MOVE_TO,
            "node-b",
        );
        c = with_annotation(c, "team", "db");
        c = with_annotation(c, claim::ANN_BIND_COMPLETED, "yes");
        c.metadata.labels = Some(BTreeMap::from([("app".into(), "db".into())]));
        c.metadata.finalizers = Some(vec![
            "kubernetes.io/pvc-protection".into(),
            FINALIZER.into(),
        ]);
        c.metadata.owner_references = Some(vec![OwnerReference {
            kind: "StatefulSet".into(),
            name: "db-ss".into(),
            ..Default::default()
        }]);
        let t = Template::of(&c);
        // Through the PV's annotation and back.
        let t: Template = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        let again = t.claim(
            "pvc-x-moved",
            "node-b",
            "node-b",
            &[(ANN_MOVED_FROM, "node-a/pvc-old".into())],
        );
        assert_eq!(again.metadata.name.as_deref(), Some("data"));
        assert_eq!(again.metadata.namespace.as_deref(), Some("db"));
        assert!(again.metadata.uid.is_none() && again.metadata.resource_version.is_none());
        assert!(
            again.metadata.finalizers.is_none(),
            "no finalizer is carried"
        );
        let a = again.metadata.annotations.as_ref().unwrap();
        assert_eq!(a["team"], "db");
        assert_eq!(a[claim::ANN_SELECTED_NODE], "node-b");
        assert_eq!(a[ANN_RECREATED_BY], "node-b");
        assert_eq!(a[ANN_MOVED_FROM], "node-a/pvc-old");
        assert!(!a.contains_key(ANN_MOVE_TO), "the ask is done");
        assert!(!a.contains_key(claim::ANN_BIND_COMPLETED));
        assert_eq!(again.metadata.labels.as_ref().unwrap()["app"], "db");
        assert_eq!(
            again.metadata.owner_references.as_ref().unwrap()[0].name,
            "db-ss"
        );
        let spec = again.spec.as_ref().unwrap();
        assert_eq!(spec.volume_name.as_deref(), Some("pvc-x-moved"));
        assert_eq!(spec.resources, c.spec.as_ref().unwrap().resources);
        assert_eq!(
            spec.storage_class_name,
            c.spec.as_ref().unwrap().storage_class_name
        );
    }

    fn moving_claim(uid: &str, to: &str) -> PartialObjectMeta<PersistentVolumeClaim> {
        use kube::core::PartialObjectMetaExt;
        let mut c = pvc("data-0", "1Gi", Some("node-a"));
        c.metadata.uid = Some(uid.into());
        c.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Default::default(),
        ));
        c.metadata.finalizers = Some(vec![FINALIZER.into()]);
        c.metadata
            .annotations
            .get_or_insert_default()
            .insert(ANN_MOVE_TO.into(), to.into());
        c.metadata.into_response_partial()
    }

    #[test]
    fn only_a_claim_made_again_by_someone_else_and_not_bound_is_held_for_the_move() {
        use kube::runtime::watcher::Event;
        let seen = InFlight::default();
        let old = moving_claim("old", "node-b");
        let mut again = pvc("data-0", "1Gi", Some("node-c")).metadata;
        again.uid = Some("new".into());
        // Nothing moves yet.
        assert_eq!(seen.holds(&again), None);
        seen.observe(&Event::Apply(old.clone()));
        // The old claim itself is the move's, not held.
        assert_eq!(seen.holds(&old.metadata), None);
        assert_eq!(seen.holds(&again), Some("node-b".into()));
        // The claim the target made again (bound ahead, marked) is not held.
        let mut recreated = again.clone();
        recreated
            .annotations
            .get_or_insert_default()
            .insert(ANN_RECREATED_BY.into(), "node-b".into());
        assert_eq!(seen.holds(&recreated), None);
        // Another claim's name is not held.
        let mut other = again.clone();
        other.name = Some("data-1".into());
        assert_eq!(seen.holds(&other), None);
        // Once a claim of that name is bound, nothing is held any more.
        let mut bound = again.clone();
        bound
            .annotations
            .get_or_insert_default()
            .insert(claim::ANN_BIND_COMPLETED.into(), "yes".into());
        {
            use kube::core::PartialObjectMetaExt;
            seen.observe(&Event::Apply(bound.clone().into_response_partial()));
        }
        assert_eq!(seen.holds(&again), None);
        // ... and the node the scheduler had picked for it hands it over.
        assert!(seen.settled(&bound));
        assert!(!seen.settled(&old.metadata));
        seen.forget(&bound);
        assert!(!seen.settled(&bound));
    }

    #[test]
    fn a_moving_claim_that_left_while_the_watch_was_down_is_gone_at_the_re_list() {
        use kube::runtime::watcher::Event;
        let seen = InFlight::default();
        seen.observe(&Event::Apply(moving_claim("old", "node-b")));
        seen.observe(&Event::Init);
        seen.observe(&Event::InitDone);
        let mut again = pvc("data-0", "1Gi", None).metadata;
        again.uid = Some("new".into());
        // Still held (gone only now, not for the hold's whole time).
        assert_eq!(seen.holds(&again), Some("node-b".into()));
        let state = seen.claims.lock().unwrap();
        assert!(state.moving["db/data-0"].gone.is_some());
    }

    fn pod(name: &str, node: Option<&str>, phase: &str, claim: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                volumes: Some(vec![PodVolume {
                    name: "v".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.into(),
                        read_only: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_pods_on_a_node_and_not_finished_use_the_claim() {
        let pods = vec![
            pod("running", Some("node-a"), "Running", "data"),
            pod("pending-unscheduled", None, "Pending", "data"),
            pod("scheduled", Some("node-a"), "Pending", "data"),
            pod("done", Some("node-a"), "Succeeded", "data"),
            pod("other", Some("node-a"), "Running", "logs"),
        ];
        assert_eq!(
            users(&pods, "data"),
            vec!["pod running on node node-a", "pod scheduled on node node-a"]
        );
        assert!(users(&pods[1..2], "data").is_empty());
    }

    #[test]
    fn the_holder_keeps_its_volume_until_the_claim_is_bound_to_a_copy_the_move_made() {
        let old_uid = "0a1b2c3d-0000-4000-8000-000000000001";
        let asked = with_annotation(
            bound(pvc("data", "1Gi", Some("node-a")), "pvc-old"),
            ANN_MOVE_TO,
            "node-b",
        );
        // Bound, the ask standing: hold.
        assert_eq!(
            holder_step(&old_pv("Bound", old_uid), Some(&asked)),
            HolderStep::Hold
        );
        // The ask removed before the claim was given up: cancel.
        let taken_back = bound(pvc("data", "1Gi", Some("node-a")), "pvc-old");
        assert_eq!(
            holder_step(&old_pv("Bound", old_uid), Some(&taken_back)),
            HolderStep::Cancel
        );
        // Released: the old claim being deleted, or gone: wait.
        let mut deleting = asked.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(
            holder_step(&old_pv("Released", old_uid), Some(&deleting)),
            HolderStep::Wait
        );
        assert_eq!(
            holder_step(&old_pv("Released", old_uid), None),
            HolderStep::Wait
        );
        // A new claim the move made, not bound yet: wait; bound: moved.
        let mut again = with_annotation(
            pvc("data", "1Gi", Some("node-b")),
            ANN_RECREATED_BY,
            "node-b",
        );
        again.metadata.uid = Some("new-uid".into());
        again.spec.as_mut().unwrap().volume_name = Some("pvc-x-moved".into());
        assert_eq!(
            holder_step(&old_pv("Released", old_uid), Some(&again)),
            HolderStep::Wait
        );
        let again = bound(again, "pvc-x-moved");
        assert_eq!(
            holder_step(&old_pv("Released", old_uid), Some(&again)),
            HolderStep::Moved {
                to: "pvc-x-moved".into()
            }
        );
        // Made again on the old PV (the move failed): free it for the claim.
        let mut back = with_annotation(
            pvc("data", "1Gi", Some("node-a")),
            ANN_RECREATED_BY,
            "node-b",
        );
        back.metadata.uid = Some("new-uid".into());
        back.spec.as_mut().unwrap().volume_name = Some("pvc-old".into());
        assert_eq!(
            holder_step(&old_pv("Released", old_uid), Some(&back)),
            HolderStep::Rebind
        );
        // A claim of the same name nobody's move made: never deleted for it.
        let mut stranger = bound(pvc("data", "1Gi", Some("node-c")), "pvc-elsewhere");
        stranger.metadata.uid = Some("other-uid".into());
        assert!(matches!(
            holder_step(&old_pv("Released", old_uid), Some(&stranger)),
            HolderStep::Foreign(_)
        ));
        let mut claims_old = stranger.clone();
        claims_old.spec.as_mut().unwrap().volume_name = Some("pvc-old".into());
        assert!(matches!(
            holder_step(&old_pv("Released", old_uid), Some(&claims_old)),
            HolderStep::Foreign(_)
        ));
        // A StatefulSet's claim, not marked by the move (the scheduler had
        // selected a third node for it), bound by the PV controller to the
        // copy of the old claim: moved.
        let copy = moved_name(old_uid);
        let mut adopted = bound(pvc("data", "1Gi", Some("node-c")), &copy);
        adopted.metadata.uid = Some("sts-uid".into());
        assert_eq!(
            holder_step(&old_pv("Released", old_uid), Some(&adopted)),
            HolderStep::Moved { to: copy }
        );
    }

    fn node(name: &str, cordoned: bool, ready: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(cordoned),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![k8s_openapi::api::core::v1::NodeCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn capacity(node: &str, class: &str, room: &str) -> CSIStorageCapacity {
        CSIStorageCapacity {
            metadata: ObjectMeta::default(),
            capacity: Some(Quantity(room.into())),
            maximum_volume_size: None,
            node_topology: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    crate::TOPOLOGY_KEY.to_string(),
                    node.to_string(),
                )])),
                match_expressions: None,
            }),
            storage_class_name: class.into(),
        }
    }

    #[test]
    fn a_drain_moves_to_the_schedulable_node_with_the_most_room_that_fits() {
        let nodes = vec![
            node("node-a", true, true),
            node("node-b", false, true),
            node("node-c", false, true),
            node("node-d", true, true),
            node("node-e", false, false),
        ];
        let caps = vec![
            capacity("node-a", "fast", "100Gi"),
            capacity("node-b", "fast", "2Gi"),
            capacity("node-c", "fast", "5Gi"),
            capacity("node-c", "slow", "50Gi"),
            capacity("node-d", "fast", "90Gi"),
            capacity("node-e", "fast", "80Gi"),
        ];
        let gi = 1 << 30;
        assert_eq!(
            pick_target("node-a", "fast", gi, &nodes, &caps).as_deref(),
            Some("node-c")
        );
        assert_eq!(
            pick_target("node-a", "fast", 3 * gi, &nodes, &caps).as_deref(),
            Some("node-c")
        );
        assert_eq!(
            pick_target("node-a", "fast", 6 * gi, &nodes, &caps),
            None,
            "cordoned and NotReady nodes do not count"
        );
        assert_eq!(
            pick_target("node-c", "fast", gi, &nodes, &caps).as_deref(),
            Some("node-b")
        );
        assert_eq!(pick_target("node-a", "none", 1, &nodes, &caps), None);
    }

    #[test]
    fn the_copy_has_a_name_of_its_own() {
        assert_eq!(moved_name("abc"), "pvc-abc-moved");
        assert!(VolumeId::parse(&moved_name("0a1b2c3d-0000-4000-8000-000000000001")).is_ok());
    }
}
