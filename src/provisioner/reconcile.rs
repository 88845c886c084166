//! Claim → volume → PersistentVolume, for the claims this node owns.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tonic::Code;

use super::claim::{self, Allowed, Concern, Decision};
use super::class::{self, ClassSpec};
use super::source::{self, Resolution};
use super::{Ctx, Error, crossnode, csi_error, pv, quantity, schedulable};
use crate::metrics::Outcome;
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::proto::csi::v1::{
    CapacityRange, ControllerExpandVolumeRequest, GetCapacityRequest, Volume, VolumeContentSource,
};

/// How long to wait before looking again at a claim that cannot succeed
/// until somebody changes it (its class, its size): the watch re-triggers
/// on any change anyway.
const RECHECK: Duration = Duration::from_secs(300);
/// A create still running after this long gets a `Provisioning` event.
const SLOW_CREATE: Duration = Duration::from_secs(2);

impl<C: CsiController> Ctx<C> {
    /// Queues an event of the provisioning of a claim (recorded in the
    /// background).
    pub(crate) fn event(
        &self,
        pvc: &PersistentVolumeClaim,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.events
            .post(pvc.object_ref(&()), type_, reason, "Provision", note);
    }

    /// Queues an event of the expansion of a claim.
    fn resize_event(
        &self,
        pvc: &PersistentVolumeClaim,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.events
            .post(pvc.object_ref(&()), type_, reason, "Resize", note);
    }

    pub(crate) fn fail(&self, pvc: &PersistentVolumeClaim, note: String) {
        tracing::warn!(pvc = %claim::claim_key(pvc), node = %self.config.node, "{note}");
        self.event(pvc, EventType::Warning, "ProvisioningFailed", note);
    }

    /// Free bytes this node offers to `class` (GetCapacity on our own pool).
    async fn free_bytes(&self, class: &ClassSpec) -> Result<i64, tonic::Status> {
        let req = GetCapacityRequest {
            parameters: class.csi_parameters().into_iter().collect(),
            accessible_topology: Some(claim::node_topology(&self.config.node)),
            ..Default::default()
        };
        let resp = self.csi.get_capacity(tonic::Request::new(req)).await?;
        Ok(resp.into_inner().available_capacity)
    }
}

/// One claim's reconcile from its metadata, as the claim watch has it: a
/// claim that concerns this node (`claim::concerns`) is read whole and
/// reconciled ([`reconcile`]); any other is left alone without a request.
pub(crate) async fn reconcile_meta<C: CsiController>(
    meta: Arc<PartialObjectMeta<PersistentVolumeClaim>>,
    ctx: Arc<Ctx<C>>,
) -> Result<Action, Error> {
    // A claim asked to move (or kept by a move, being deleted) is the
    // move's (`moving`).
    if let Some(action) = super::moving::on_claim(&meta, &ctx).await? {
        return Ok(action);
    }
    // A claim being deleted needs nothing more from us, and what is kept
    // of it must not outlive it.
    if meta.meta().deletion_timestamp.is_some() {
        ctx.forget(&meta.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    let key = claim::claim_key(&*meta);
    // Made again (by a StatefulSet) while its volume moves: the move's copy
    // is its volume, not one of this node's (`moving::InFlight`).
    if let Some(to) = ctx.in_flight.holds(meta.meta()) {
        let node = &ctx.config.node;
        let selected_here = meta
            .annotations()
            .get(claim::ANN_SELECTED_NODE)
            .is_some_and(|n| n == node);
        if selected_here
            && ctx.first_no_room(&format!(
                "move-in-flight/{}",
                meta.uid().unwrap_or_default()
            ))
        {
            ctx.events.post(
                meta.object_ref(&()),
                EventType::Normal,
                "MoveInFlight",
                "Provision",
                format!(
                    "claim {key} was made again while its volume moves to node {to}: node {node} gives it no volume of its own; it is bound to the move's copy there (or, if the move failed, to its old volume), and its pod is scheduled again"
                ),
            );
        }
        // The node choice goes to the move's target, whose store then
        // holds the claim; the scheduler picks again once it is bound.
        if selected_here && to != *node {
            select_node(&ctx, &*meta, &to).await?;
        }
        tracing::debug!(pvc = %key, to = %to, "skipped: made again while its volume moves");
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    if ctx.in_flight.settled(meta.meta()) {
        hand_over(&ctx, &meta).await?;
        ctx.in_flight.forget(meta.meta());
    }
    match claim::concerns(&*meta, &ctx.config.node, ctx.has_pv(&*meta)) {
        Concern::Read => {}
        // Not on a node that takes no Immediate claims: there, the claim is
        // read (a restore may still come to the node that holds its data).
        Concern::Take if schedulable::for_immediate(ctx.own_node().as_deref()).is_ok() => {
            return take_from_meta(&meta, ctx).await;
        }
        Concern::Take => {}
        // Debug, as `reconcile` says why it skips: which agents passed on a
        // claim is what one asks first when a claim stays Pending.
        Concern::No(why) => {
            tracing::debug!(pvc = %key, why, "skipped");
            return Ok(Action::await_change());
        }
        Concern::NotYet | Concern::Provisioned => return Ok(Action::await_change()),
    }
    // A bound claim of this node is read for its size alone (expansion):
    // not again at a change that cannot have grown it (kube-controller-
    // manager binding it, writing its status).
    let uid = meta.uid().unwrap_or_default();
    // The version read itself (the echo of this node's own take) is not
    // read again either.
    if let Some(read) = ctx.size_read(&uid)
        && (read.version.is_some() && read.version == meta.meta().resource_version
            || !claim::Writes::of(meta.meta()).may_have_grown(Some(read.size)))
    {
        tracing::trace!(pvc = %key, "its volume is made, and its size was not written since");
        return Ok(Action::await_change());
    }
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &meta.namespace().unwrap_or_default());
    match api.get_opt(&meta.name_any()).await? {
        Some(pvc) => reconcile(Arc::new(pvc), ctx).await,
        // Deleted since the event: its deletion is an event of its own.
        None => Ok(Action::await_change()),
    }
}

/// A claim made again during a move of its name, now bound: when the
/// scheduler had picked this node for it, the node choice goes to the node
/// of its volume (the move's copy, or after a failed move the old one), so
/// that the claim is in that node's claim store (and leaves this one's).
async fn hand_over<C: CsiController>(
    ctx: &Ctx<C>,
    meta: &PartialObjectMeta<PersistentVolumeClaim>,
) -> Result<(), Error> {
    let node = &ctx.config.node;
    if meta.annotations().get(claim::ANN_SELECTED_NODE) != Some(node) {
        return Ok(());
    }
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &meta.namespace().unwrap_or_default());
    let Some(pvc) = api.get_opt(&meta.name_any()).await? else {
        return Ok(());
    };
    let Some(volume) = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty())
    else {
        return Ok(());
    };
    if ctx.pv_known(&volume) {
        return Ok(());
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = pvs.get_opt(&volume).await? else {
        return Ok(());
    };
    if let Some(holder) = pv::pv_node(&pv).filter(|n| *n != node.as_str()) {
        move_node(ctx, &pvc, holder).await?;
    }
    Ok(())
}

/// An Immediate claim of Stead's that no node took yet, taken from its
/// metadata: the take (an optimistic patch) answers with the whole claim,
/// so it is not read first. What needs the claim's class and size is
/// decided then; a claim this node cannot serve is given back, and its
/// class and size remembered so that it is not taken again until it could
/// be served (room made, the node's labels changed).
async fn take_from_meta<C: CsiController>(
    meta: &PartialObjectMeta<PersistentVolumeClaim>,
    ctx: Arc<Ctx<C>>,
) -> Result<Action, Error> {
    let node = ctx.config.node.clone();
    let key = claim::claim_key(meta);
    let uid = meta.uid().unwrap_or_default();
    if let Some(back) = ctx.given_back(&uid)
        && let Some(why) = cannot_serve(&ctx, &key, &back.class, back.bytes).await?
    {
        tracing::debug!(pvc = %key, node = %node, "{}", why.note());
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    // This node's turn to take it (see `take_turn`); the claim comes back
    // then, or sooner if it changes (another node took it).
    if let Some(wait) = ctx.stagger(&uid) {
        tracing::trace!(pvc = %key, node = %node, ?wait, "waits its turn to take the claim");
        return Ok(Action::requeue(wait));
    }
    let Some(pvc) = select_node(&ctx, meta, &node).await? else {
        tracing::debug!(pvc = %key, "another agent took it first");
        return Ok(Action::await_change());
    };
    let class_name = claim::class_name(&pvc).unwrap_or_default().to_string();
    let sc = ctx.classes.get(&ObjectRef::new(&class_name));
    let wffc = sc
        .as_ref()
        .is_some_and(|sc| sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
    let has_source = pvc
        .spec
        .as_ref()
        .is_some_and(|s| s.data_source.is_some() || s.data_source_ref.is_some());
    // What cannot be decided before the take: a class unknown here, a
    // WaitForFirstConsumer claim whose node choice someone removed (the
    // scheduler chooses again), a node the class excludes, no room.
    let why = match (&sc, claim::requested_bytes(&pvc)) {
        (None, _) => Some(Unservable::Other(format!(
            "StorageClass {class_name} of claim {key} is not known on node {node} yet"
        ))),
        (Some(sc), _) if !class::is_stead(sc) || wffc => Some(Unservable::Other(format!(
            "claim {key} is not an Immediate claim of Stead's"
        ))),
        // A claim Stead cannot serve (a broken class, a bad size) is
        // reported by the node that took it; one filled from a source goes
        // where its data is (see `fill_from`).
        (_, Err(_)) => None,
        _ if has_source => None,
        (Some(_), Ok((wanted, _))) => cannot_serve(&ctx, &key, &class_name, wanted).await?,
    };
    let Some(why) = why else {
        tracing::info!(pvc = %key, node = %node, "took Immediate claim");
        return reconcile(Arc::new(pvc), ctx).await;
    };
    let wanted = claim::requested_bytes(&pvc).map(|(b, _)| b).unwrap_or(0);
    ctx.give_back(&uid, &class_name, wanted);
    if give_back(&ctx, &pvc, wffc).await? {
        tracing::debug!(pvc = %key, node = %node, "took the claim, gave it back: {}", why.note());
    }
    // Every node without room looks again every 30 s (room may be made):
    // each says so once per claim, not at every look.
    if let Unservable::NoRoom(note) = why
        && ctx.first_no_room(&uid)
    {
        ctx.fail(&pvc, note);
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Why this node cannot serve an Immediate claim.
enum Unservable {
    /// Its pool has no room: said on the claim, once per claim and node.
    NoRoom(String),
    /// Anything else: said in the debug log.
    Other(String),
}

impl Unservable {
    fn note(&self) -> &str {
        match self {
            Unservable::NoRoom(n) | Unservable::Other(n) => n,
        }
    }
}

/// Why this node cannot serve an Immediate claim of `class` asking for
/// `wanted` bytes, from what it knows without a request: the class, the
/// node's labels against its allowedTopologies, the pool's free bytes.
async fn cannot_serve<C: CsiController>(
    ctx: &Ctx<C>,
    key: &str,
    class_name: &str,
    wanted: i64,
) -> Result<Option<Unservable>, Error> {
    let node = &ctx.config.node;
    let Some(sc) = ctx.classes.get(&ObjectRef::new(class_name)) else {
        return Ok(Some(Unservable::Other(format!(
            "StorageClass {class_name} is not known on node {node} yet"
        ))));
    };
    if !class::is_stead(&sc) || sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer") {
        return Ok(Some(Unservable::Other(format!(
            "StorageClass {class_name} is not an Immediate class of Stead's"
        ))));
    }
    let Ok(class) = class::parse(&sc) else {
        return Ok(None);
    };
    if claim::allowed_here(&Decision::Claim, &class, node, ctx.own_node().as_deref())
        != Allowed::Yes
    {
        // As for an unschedulable node: looked at again when its labels
        // change (`schedulable::follow`).
        ctx.immediate_waiting.store(true, Ordering::SeqCst);
        return Ok(Some(Unservable::Other(format!(
            "StorageClass {class_name}'s allowedTopologies do not include node {node}"
        ))));
    }
    let free = ctx
        .free_bytes(&class)
        .await
        .map_err(|s| csi_error("GetCapacity", class_name, node, s))?;
    Ok((free < wanted).then(|| {
        Unservable::NoRoom(format!(
            "node {node} cannot take claim {key}: it asks for {} and pool {} has {} free; a node with room will take it",
            quantity::human(wanted),
            class.pool.as_deref().unwrap_or("(default)"),
            quantity::human(free)
        ))
    }))
}

/// Gives back a claim this node took from its metadata and cannot serve:
/// removes its node choice with an optimistic patch (a claim changed since
/// the take is left as it is; `false` then). A WaitForFirstConsumer claim
/// is marked as such, so that agents leave it to the scheduler.
async fn give_back<C>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    wffc: bool,
) -> Result<bool, Error> {
    let waits = wffc.then_some(ctx.config.node.as_str());
    let patch = json!({"metadata": {
        "resourceVersion": pvc.resource_version(),
        "annotations": {
            claim::ANN_SELECTED_NODE: null,
            claim::ANN_WAITS_FOR_SCHEDULER: waits,
        },
    }});
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    match api
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One claim's reconcile. Its span names the claim and its volume with the
/// field names the CSI layer uses, so that the lines of the RPCs it makes
/// in-process carry them too.
#[tracing::instrument(skip_all, fields(
    pvc = %claim::claim_key(&*pvc),
    volume.id = %claim::volume_name(&*pvc).unwrap_or_default(),
))]
pub(crate) async fn reconcile<C: CsiController>(
    pvc: Arc<PersistentVolumeClaim>,
    ctx: Arc<Ctx<C>>,
) -> Result<Action, Error> {
    // A claim being deleted needs nothing more from us, and what is kept
    // of it must not outlive it.
    if pvc.meta().deletion_timestamp.is_some() {
        ctx.forget(&pvc.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    let Some(class_name) = claim::class_name(&pvc) else {
        return Ok(Action::await_change());
    };
    // A claim whose class does not exist yet is re-triggered when it
    // appears (the StorageClass watch); the requeue is a safety net.
    let Some(sc) = ctx.classes.get(&ObjectRef::new(class_name)) else {
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    if !class::is_stead(&sc) {
        return Ok(Action::await_change());
    }
    let node = ctx.config.node.clone();
    let key = claim::claim_key(&*pvc);
    let uid = pvc.uid().unwrap_or_default();

    // Decide on the binding mode alone, so that a broken class is reported
    // only by the node that would have provisioned the claim.
    let wffc = sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    let probe = ClassSpec {
        name: class_name.to_string(),
        pool: None,
        fs_type: None,
        allocation: None,
        wait_for_first_consumer: wffc,
        reclaim_delete: true,
        mount_options: vec![],
        allowed_topologies: vec![],
        node_loss: class::NodeLoss::Keep,
        cross_node: class::CrossNode::Pull,
    };
    if let Some(action) = expand_if_grown(&ctx, &pvc).await? {
        ctx.read_size(&uid, &pvc.metadata);
        return Ok(action);
    }
    if ctx.has_pv(&*pvc) {
        // Its volume is made (and the claim bound to it, or about to be):
        // nothing to do until its size is written again.
        ctx.read_size(&uid, &pvc.metadata);
    }
    let decision = claim::decide(&pvc, &probe, &node);
    // A claim filled from a source can only go where its data is, however
    // schedulable that node is (see `source`).
    let has_source = pvc
        .spec
        .as_ref()
        .is_some_and(|s| s.data_source.is_some() || s.data_source_ref.is_some());
    if let Decision::Skip(why) = decision {
        // Debug, not trace: which agents passed on a claim is what one asks
        // first when a claim stays Pending (and what the race test waits for).
        tracing::debug!(pvc = %key, why, "skipped");
        return Ok(Action::await_change());
    }
    if decision == Decision::Claim
        && !has_source
        && schedulable::for_immediate(ctx.own_node().as_deref()).is_err()
    {
        // The claim waits for the node to turn schedulable: say so, then
        // read the node again, so that a change between the first read and
        // the flag is not missed (`schedulable::follow` clears the flag
        // after it stores the Node).
        ctx.immediate_waiting.store(true, Ordering::SeqCst);
        if let Err(why) = schedulable::for_immediate(ctx.own_node().as_deref()) {
            // Once per claim at debug; the node's state is said once at info.
            tracing::debug!(pvc = %key, node = %node, reason = %why, "skipped: this node is not schedulable, so it leaves Immediate claims to other nodes");
            return Ok(Action::await_change());
        }
    }
    // The claim is this node's from here (an Immediate one once taken).
    if decision == Decision::Provision {
        ctx.metrics.provisioning.start(&uid, class_name);
    }
    let parsed = class::parse(&sc)
        .map_err(|e| e.to_string())
        .and_then(|class| {
            let request = claim::create_request(&pvc, &class, &node).map_err(|e| e.to_string())?;
            let src = source::data_source(&pvc).map_err(|e| e.to_string())?;
            Ok((class, request, src))
        });
    let (class, mut request, src) = match parsed {
        Ok(ok) => ok,
        Err(why) => {
            // An Immediate claim that cannot be provisioned is taken like any
            // other before it is reported: one agent reports it, not every
            // node of the cluster.
            if decision == Decision::Claim && take(&ctx, &pvc).await?.is_none() {
                return Ok(Action::await_change());
            }
            ctx.fail(&pvc, format!("{why}; no volume was created"));
            return Ok(Action::requeue(RECHECK));
        }
    };
    let volume_name = request.name.clone();

    // A PV of that name means the work is done (or a restart found it done).
    if ctx.pv_known(&volume_name) {
        // Observed by the attempt that made it; a clock started since (a
        // reconcile before the claim is bound, a restarted agent) is not
        // the claim's wait.
        ctx.metrics.provisioning.forget(&uid);
        ctx.read_size(&uid, &pvc.metadata);
        return Ok(Action::await_change());
    }

    // Data from another node: pulled into the volume once it is made.
    let mut pull = None;
    let from = match &src {
        None => None,
        Some(src) => match fill_from(&ctx, &pvc, &decision, &class, src).await? {
            Ok(Fill::Here(content)) => {
                request.volume_content_source = Some(content);
                Some(src.to_string())
            }
            Ok(Fill::Pull(plan)) => {
                // As a restore on one node (`storage::snapshot`): a copy is
                // never smaller than its source, so a request for less is
                // met by the source's size; only a limit below it is refused.
                if let Some(size) = plan.size_bytes {
                    let range = request.capacity_range.get_or_insert_default();
                    if range.limit_bytes != 0 && range.limit_bytes < size {
                        ctx.fail(
                            &pvc,
                            format!(
                                "{src} holds {} and claim {key} limits its volume to {}; a restore or clone is never smaller than its source: raise the claim's limit; no volume was created",
                                quantity::human(size),
                                quantity::human(range.limit_bytes)
                            ),
                        );
                        return Ok(Action::requeue(RECHECK));
                    }
                    range.required_bytes = range.required_bytes.max(size);
                }
                let from = format!("{src}, pulled from node {}", plan.holder);
                pull = Some(plan);
                Some(from)
            }
            Err(action) => return Ok(action),
        },
    };
    let wanted = request
        .capacity_range
        .map(|r| r.required_bytes)
        .unwrap_or(0);

    let mut allowed = claim::allowed_here(&decision, &class, &node, ctx.own_node().as_deref());
    if allowed == Allowed::Skip {
        // The node's labels may change to match: as for an unschedulable
        // node, flag the claim, then read the node again.
        ctx.immediate_waiting.store(true, Ordering::SeqCst);
        allowed = claim::allowed_here(&decision, &class, &node, ctx.own_node().as_deref());
    }
    match allowed {
        Allowed::Yes => {}
        Allowed::Skip => {
            tracing::debug!(pvc = %key, node = %node, class = %class.name, "skipped: the class's allowedTopologies do not include this node");
            return Ok(Action::await_change());
        }
        Allowed::NotKnownYet => {
            tracing::debug!(pvc = %key, node = %node, "Node not known yet; allowedTopologies checked again shortly");
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        Allowed::Refuse(note) => {
            ctx.fail(&pvc, note);
            return Ok(Action::requeue(RECHECK));
        }
    }

    let pvc = if decision == Decision::Claim {
        let free = ctx
            .free_bytes(&class)
            .await
            .map_err(|s| csi_error("GetCapacity", &volume_name, &node, s))?;
        if free < wanted {
            let note = format!(
                "node {node} cannot take claim {key}: it asks for {} and pool {} has {} free; another node with room takes it, and this node looks again every 30 s",
                quantity::human(wanted),
                class.pool.as_deref().unwrap_or("(default)"),
                quantity::human(free)
            );
            // Every node without room looks again every 30 s (room may be
            // made): each says so once per claim, not at every look.
            if ctx.first_no_room(&uid) {
                ctx.fail(&pvc, note);
            } else {
                tracing::debug!(pvc = %key, node = %node, "{note}");
            }
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        match take(&ctx, &pvc).await? {
            Some(taken) => taken,
            None => return Ok(Action::await_change()),
        }
    } else {
        pvc
    };

    ctx.ledger.record(&volume_name, &key, &uid).await?;
    if class.node_loss.is_release() {
        // Before the volume and its PV: a PV that says `release` always has
        // a claim that says so (what the admission policy lets another
        // node's agent delete), and a volume that may lose its PV to node
        // loss always has its mark (what this node reclaims on return).
        label_claim(&ctx, &pvc, &class).await?;
        ctx.releasable.record(&volume_name, &key, &uid).await?;
    }
    // Most creates take milliseconds, and their claim gets one event, when
    // it is done. One that takes longer (a thick image, a copy of a
    // snapshot) says what it is doing meanwhile.
    let create = ctx.csi.create_volume(tonic::Request::new(request));
    tokio::pin!(create);
    let created = tokio::select! {
        r = &mut create => r,
        () = tokio::time::sleep(SLOW_CREATE) => {
            ctx.event(
                &pvc,
                EventType::Normal,
                "Provisioning",
                format!(
                    "node {node} is creating volume {volume_name} ({}) in pool {}{}",
                    quantity::human(wanted),
                    class.pool.as_deref().unwrap_or("(default)"),
                    from.as_ref()
                        .map(|f| format!(" from {f}"))
                        .unwrap_or_default()
                ),
            );
            create.await
        }
    };
    let volume = match created {
        Ok(resp) => resp.into_inner().volume.unwrap_or_default(),
        Err(status) => return create_failed(&ctx, &pvc, &volume_name, status).await,
    };
    if let Some(plan) = &pull
        && let Err(action) = crossnode::receive(&ctx, &pvc, plan, &volume).await?
    {
        return Ok(action);
    }
    create_pv(&ctx, &pvc, &class, &volume).await?;
    // The claim is read again only when its size is written (expansion),
    // not when it is bound or its status written.
    ctx.read_size(&uid, &pvc.metadata);
    ctx.metrics.provisioning.finish(&uid, Outcome::Success);
    ctx.ledger.remove(&volume_name).await?;
    ctx.succeeded(&uid);
    ctx.capacity_changed.notify_one();
    tracing::info!(pvc = %key, volume.id = %volume_name, node = %node, bytes = volume.capacity_bytes, "provisioned");
    ctx.event(
        &pvc,
        EventType::Normal,
        "ProvisioningSucceeded",
        succeeded_note(&volume, &node, from.as_deref()),
    );
    Ok(Action::await_change())
}

/// The note of a claim's `ProvisioningSucceeded` event. A volume that is
/// not held to its size (a directory on a filesystem that cannot limit it,
/// as its context says) is said to be so, where the claim's owner looks.
fn succeeded_note(volume: &Volume, node: &str, from: Option<&str>) -> String {
    let enforced = volume
        .volume_context
        .get(crate::csi::controller::CONTEXT_ENFORCED)
        .is_none_or(|v| v != "false");
    format!(
        "created volume {} ({}) on node {node}{}{}",
        volume.volume_id,
        quantity::human(volume.capacity_bytes),
        from.map(|f| format!(" from {f}")).unwrap_or_default(),
        if enforced {
            ""
        } else {
            "; capacity accounted, not enforced: the pool's filesystem cannot limit a directory, so a pod may write past the claim's size (see the agent's log for why)"
        }
    )
}

/// Where the data of a claim filled from a source comes from.
enum Fill {
    /// This node holds it: CreateVolume copies it.
    Here(VolumeContentSource),
    /// Another node holds it: pulled into the new volume (`crossnode`).
    Pull(crossnode::Plan),
}

/// The content source of a claim filled from `src`, when this node holds
/// the data, or the pull of it from the node that does; otherwise what to
/// do instead (`Err`): wait for the source, let the holder take an
/// Immediate claim, or, for a claim whose pod the scheduler put on this
/// node and whose data this node cannot pull (`crossNodeRestore: refuse`,
/// no transfer here, a dir pool), say where the data is and move the node
/// choice there (release it when no node is known to hold the data).
async fn fill_from<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    decision: &Decision,
    class: &ClassSpec,
    src: &source::SourceRef,
) -> Result<Result<Fill, Action>, Error> {
    let node = &ctx.config.node;
    let key = claim::claim_key(pvc);
    match source::resolve(ctx, src).await? {
        Resolution::Wait(why) => {
            tracing::debug!(pvc = %key, "waiting for the data source: {why}");
            // Looked at again with a growing interval; said once, at the
            // first wait, by the node that would provision it.
            let wait = ctx.backoff(&pvc.uid().unwrap_or_default());
            if *decision == Decision::Provision && wait <= Duration::from_secs(1) {
                ctx.event(
                    pvc,
                    EventType::Normal,
                    "WaitingForDataSource",
                    format!("node {node} waits for the claim's data source: {why}"),
                );
            }
            Ok(Err(Action::requeue(wait.min(Duration::from_secs(30)))))
        }
        Resolution::Refuse(why) => {
            if *decision == Decision::Claim && take(ctx, pvc).await?.is_none() {
                return Ok(Err(Action::await_change()));
            }
            ctx.fail(pvc, format!("{why}; no volume was created"));
            Ok(Err(Action::requeue(RECHECK)))
        }
        Resolution::Ready(r) if r.node.as_deref() == Some(node.as_str()) => {
            Ok(Ok(Fill::Here(r.content)))
        }
        Resolution::Ready(r) => {
            if *decision == Decision::Claim {
                tracing::debug!(pvc = %key, holder = r.node.as_deref().unwrap_or("unknown"),
                    "skipped: the data of its source is on another node");
                return Ok(Err(Action::await_change()));
            }
            let Some(holder) = r.node else {
                ctx.fail(
                    pvc,
                    format!(
                        "the data of {src} is on no node known to Stead, but the scheduler chose node {node} for claim {key}; Stead does not move data between nodes, so the node choice is released"
                    ),
                );
                release_node(ctx, pvc).await?;
                return Ok(Err(Action::requeue(Duration::from_secs(30))));
            };
            let why = match class.cross_node {
                class::CrossNode::Refuse => format!(
                    "StorageClass {} says crossNodeRestore: refuse, so Stead does not move data between nodes",
                    class.name
                ),
                class::CrossNode::Pull => match crossnode::cannot_pull(ctx, class) {
                    Some(why) => why,
                    None => {
                        let Some(source) = crossnode::source_of(&r.content) else {
                            ctx.fail(
                                pvc,
                                format!(
                                    "the handle of {src} is not a volume or snapshot id of Stead's; no volume was created"
                                ),
                            );
                            return Ok(Err(Action::requeue(RECHECK)));
                        };
                        return Ok(Ok(Fill::Pull(crossnode::Plan {
                            holder,
                            source,
                            size_bytes: r.size_bytes,
                            what: src.to_string(),
                        })));
                    }
                },
            };
            // The scheduler keeps a claim's selected node once set: its next
            // attempt places the pod on the holder, or leaves it Pending if
            // the pod cannot run there; meanwhile the holder's agent makes
            // the volume. Released instead, the choice could fall on another
            // node that lacks the data, again and again.
            ctx.fail(
                pvc,
                format!(
                    "the data of {src} is on node {holder}, but the scheduler chose node {node} for claim {key}; {why}, so the claim's node choice is moved to {holder}: its pod runs there, or stays Pending if it cannot (a nodeSelector or affinity that excludes {holder})"
                ),
            );
            move_node(ctx, pvc, &holder).await?;
            Ok(Err(Action::await_change()))
        }
    }
}

/// Removes `selected-node` from a claim, so that the scheduler picks a
/// node again: this node's part in it ends.
async fn release_node<C>(ctx: &Ctx<C>, pvc: &PersistentVolumeClaim) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    // A WaitForFirstConsumer claim is marked as such, so that agents leave
    // it to the scheduler (see `claim::concerns`).
    let wffc = claim::class_name(pvc)
        .and_then(|c| ctx.classes.get(&ObjectRef::new(c)))
        .is_some_and(|sc| sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
    let waits = wffc.then_some(ctx.config.node.as_str());
    let patch = json!({"metadata": {"annotations": {
        claim::ANN_SELECTED_NODE: null,
        claim::ANN_WAITS_FOR_SCHEDULER: waits,
    }}});
    api.patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    ctx.metrics
        .provisioning
        .finish(&pvc.uid().unwrap_or_default(), Outcome::Released);
    Ok(())
}

/// Sets a claim's `selected-node` to `holder` in place of this node's, with
/// an optimistic-concurrency patch: a claim changed meanwhile (released by
/// the scheduler, moved by another agent) is left as it now is.
pub(crate) async fn move_node<C>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    holder: &str,
) -> Result<(), Error> {
    let key = claim::claim_key(pvc);
    if select_node(ctx, pvc, holder).await?.is_some() {
        tracing::info!(pvc = %key, node = %ctx.config.node, holder = %holder, "moved the claim's node choice to the node that holds its data");
    } else {
        tracing::debug!(pvc = %key, "claim changed meanwhile; looked at again");
    }
    Ok(())
}

/// Sets a claim's `selected-node` to `node` with an optimistic-concurrency
/// patch: the resourceVersion makes the apiserver refuse it when the claim
/// changed meanwhile (another agent took or moved it), and then `None`.
async fn select_node<C, K: Resource<DynamicType = ()>>(
    ctx: &Ctx<C>,
    pvc: &K,
    node: &str,
) -> Result<Option<PersistentVolumeClaim>, Error> {
    let meta = pvc.meta();
    let patch = json!({"metadata": {
        "resourceVersion": meta.resource_version,
        "annotations": {claim::ANN_SELECTED_NODE: node},
    }});
    let api: Api<PersistentVolumeClaim> = Api::namespaced(
        ctx.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
    );
    match api
        .patch(
            meta.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(updated) => Ok(Some(updated)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Labels a claim of a `release` class as its PV is labelled (the node, the
/// opt-in; see `pv::labels`), unless it is already: what the admission
/// policy reads before it lets the node-loss leader delete the claim.
async fn label_claim<C>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
) -> Result<(), Error> {
    let wanted = pv::labels(class, &ctx.config.node);
    let has = pvc.labels();
    if wanted.iter().all(|(k, v)| has.get(k) == Some(v)) {
        return Ok(());
    }
    let patch = json!({"metadata": {"labels": wanted}});
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    api.patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// Takes an Immediate claim for this node: sets `selected-node` with an
/// optimistic-concurrency patch (the resourceVersion makes the apiserver
/// refuse it when another agent took the claim first). `None` when another
/// agent won.
async fn take<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
) -> Result<Option<Arc<PersistentVolumeClaim>>, Error> {
    let node = &ctx.config.node;
    let key = claim::claim_key(pvc);
    let taken = select_node(ctx, pvc, node).await?;
    match &taken {
        Some(_) => tracing::info!(pvc = %key, node = %node, "took Immediate claim"),
        None => tracing::debug!(pvc = %key, "another agent took it first"),
    }
    Ok(taken.map(Arc::new))
}

async fn create_pv<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    class: &ClassSpec,
    volume: &Volume,
) -> Result<(), Error> {
    let node = &ctx.config.node;
    let pv = pv::build_pv(pvc, class, volume, node);
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let name = pv.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &pv).await {
        Ok(_) => {
            ctx.made_pv(&name);
            Ok(())
        }
        // An earlier attempt may have got this far; but the name alone does
        // not prove it (anyone may create a PV of any name): read it back.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let Some(existing) = api.get_opt(&name).await? else {
                return Err(Error::PvVanished { pv: name });
            };
            let uid = pvc.uid().unwrap_or_default();
            match pv::check_owned(&existing, &volume.volume_id, node, &uid) {
                Ok(()) => {
                    ctx.made_pv(&name);
                    Ok(())
                }
                Err(mismatch) => {
                    let err = Error::ForeignPv {
                        pv: name,
                        claim: claim::claim_key(pvc),
                        mismatch,
                    };
                    ctx.fail(
                        pvc,
                        format!("node {node} created volume {}, but {err}", volume.volume_id),
                    );
                    Err(err)
                }
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// What the user of a claim whose expansion failed can do, by the plugin's
/// code.
fn resize_next_step(code: Code, node: &str) -> String {
    match code {
        Code::ResourceExhausted | Code::OutOfRange => format!(
            "the claim keeps its size; free space in that pool on node {node} and Stead retries with a backoff (up to 5 min)"
        ),
        Code::InvalidArgument | Code::FailedPrecondition => {
            "the claim keeps its size; Stead retries with a backoff, but the request must change for this to succeed".to_string()
        }
        _ => format!(
            "the claim keeps its size; Stead retries with a backoff (up to 5 min); the agent's log on node {node} tells more"
        ),
    }
}

/// Whether the intent of a volume survives a failed CreateVolume: it goes
/// only for the codes with which the plugin guarantees that nothing was
/// created (the request was refused before any folder or file was made, see
/// `storage::Store::create`). Any other failure may have left a volume
/// behind, which only the intent lets the reaper find. AlreadyExists means
/// a volume of that very name exists (made with other parameters): it is
/// this claim's, so its intent stays too.
pub(crate) fn intent_survives(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted
    )
}

/// CreateVolume said no. The intent goes only when nothing was created
/// (`intent_survives`); what happens to the claim depends on why.
async fn create_failed<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
    volume_name: &str,
    status: tonic::Status,
) -> Result<Action, Error> {
    let node = &ctx.config.node;
    let key = claim::claim_key(pvc);
    if !intent_survives(status.code()) {
        ctx.ledger.remove(volume_name).await?;
    }
    match status.code() {
        Code::ResourceExhausted => {
            // As upstream does: give the claim back so that the scheduler
            // (or another agent) picks a node with room.
            ctx.fail(
                pvc,
                format!(
                    "node {node} has no room for claim {key}: {}; its node choice is released, so the scheduler tries another node (or waits until a node has room)",
                    status.message()
                ),
            );
            release_node(ctx, pvc).await?;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
        Code::InvalidArgument | Code::AlreadyExists | Code::OutOfRange => {
            ctx.fail(
                pvc,
                format!(
                    "node {node} refused volume {volume_name} for claim {key}: {}; fix the claim or its StorageClass (a claim's class cannot change: delete and recreate the claim); Stead checks it again every {} s",
                    status.message(),
                    RECHECK.as_secs()
                ),
            );
            Ok(Action::requeue(RECHECK))
        }
        _ => {
            ctx.fail(
                pvc,
                format!(
                    "node {node} could not create volume {volume_name} for claim {key} ({:?}): {}; will retry",
                    status.code(),
                    status.message()
                ),
            );
            Err(csi_error("CreateVolume", volume_name, node, status))
        }
    }
}

/// For a claim (its metadata, as the claims controller has it, or the
/// whole claim).
pub(crate) fn error_policy<C: CsiController, K: Resource>(
    pvc: Arc<K>,
    err: &Error,
    ctx: Arc<Ctx<C>>,
) -> Action {
    let wait = ctx.failed("claim", pvc.meta().uid.clone(), err);
    tracing::warn!(
        pvc = %claim::claim_key(&*pvc),
        volume.id = %claim::volume_name(&*pvc).unwrap_or_default(),
        error = %err,
        retry_in = ?wait,
        "provisioning failed"
    );
    Action::requeue(wait)
}

/// [`expand`], counted by outcome.
async fn expand_if_grown<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
) -> Result<Option<Action>, Error> {
    let res = expand(ctx, pvc).await;
    match &res {
        Ok(None) => {}
        Ok(Some(_)) => ctx.metrics.expansion(Outcome::Success),
        Err(_) => ctx.metrics.expansion(Outcome::Failure),
    }
    res
}

/// The external-resizer's job, done in the agent: a bound claim of this
/// node whose request grew beyond its PV gets ControllerExpandVolume, the PV
/// its new capacity, and the claim the status that tells kubelet to finish
/// with NodeExpandVolume (or its new capacity, when no node step is needed).
/// `None` when the claim is not a grown claim of this node.
async fn expand<C: CsiController>(
    ctx: &Ctx<C>,
    pvc: &PersistentVolumeClaim,
) -> Result<Option<Action>, Error> {
    let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()) else {
        return Ok(None);
    };
    if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        return Ok(None);
    }
    let Some(pv) = ctx
        .volumes
        .get(&ObjectRef::<PersistentVolume>::new(pv_name))
    else {
        return Ok(None);
    };
    let Some(handle) = pv::stead_volume_handle(&pv) else {
        return Ok(None);
    };
    if pv::pv_node(&pv) != Some(ctx.config.node.as_str()) {
        return Ok(None);
    }
    let size = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
        q.and_then(|q| quantity::to_bytes(&q.0).ok()).unwrap_or(0)
    };
    let wanted = size(
        pvc.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage")),
    );
    let has = size(
        pv.spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage")),
    );
    if wanted <= has {
        return Ok(None);
    }
    let key = claim::claim_key(pvc);
    let node = ctx.config.node.clone();
    let req = ControllerExpandVolumeRequest {
        volume_id: handle.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: wanted,
            limit_bytes: 0,
        }),
        volume_capability: None,
        ..Default::default()
    };
    let resp = match ctx
        .csi
        .controller_expand_volume(tonic::Request::new(req))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => {
            ctx.resize_event(
                pvc,
                EventType::Warning,
                "VolumeResizeFailed",
                format!(
                    "node {node} could not expand volume {handle} of claim {key} to {}: {}; {}",
                    quantity::human(wanted),
                    status.message(),
                    resize_next_step(status.code(), &node)
                ),
            );
            return Err(csi_error("ControllerExpandVolume", handle, &node, status));
        }
    };
    let new_size = quantity::format(resp.capacity_bytes.max(wanted));
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    pvs.patch(
        pv_name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"capacity": {"storage": new_size}}})),
    )
    .await?;
    // What kubelet reads to run NodeExpandVolume on the mounted volume.
    let status = if resp.node_expansion_required {
        json!({"status": {
            "allocatedResources": {"storage": new_size},
            "allocatedResourceStatuses": {"storage": "NodeResizePending"},
            "conditions": [{"type": "FileSystemResizePending", "status": "True",
                            "message": "Waiting for the node to grow the filesystem"}],
        }})
    } else {
        json!({"status": {
            "capacity": {"storage": new_size},
            "allocatedResources": {"storage": new_size},
            "allocatedResourceStatuses": null,
        }})
    };
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default());
    claims
        .patch_status(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    tracing::info!(pvc = %key, volume.id = %handle, size = %new_size, node_step = resp.node_expansion_required, "expanded");
    ctx.resize_event(
        pvc,
        EventType::Normal,
        "VolumeResizeSuccessful",
        format!("node {node} expanded volume {handle} to {new_size}"),
    );
    ctx.capacity_changed.notify_one();
    Ok(Some(Action::await_change()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::claim::tests::pvc;

    #[test]
    fn a_failed_expansion_says_what_the_user_can_do() {
        let full = resize_next_step(Code::ResourceExhausted, "node-a");
        assert!(
            full.contains("free space") && full.contains("node-a"),
            "{full}"
        );
        let refused = resize_next_step(Code::InvalidArgument, "node-a");
        assert!(refused.contains("the request must change"), "{refused}");
        let other = resize_next_step(Code::Internal, "node-a");
        assert!(other.contains("log on node node-a"), "{other}");
        for note in [full, refused, other] {
            assert!(note.contains("keeps its size"), "{note}");
        }
    }
    use crate::provisioner::class::tests::class as sc;
    use crate::provisioner::tests::{Fake, NODE, fake, fake_answering};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::runtime::watcher;
    use std::collections::HashMap;

    fn stead() -> k8s_openapi::api::storage::v1::StorageClass {
        sc("stead", &[], "WaitForFirstConsumer", "Delete")
    }

    /// A context knowing class `stead`, after one reconcile of its claim
    /// `db/data-0` of `size` on this node.
    async fn reconciled(size: &str) -> (Fake, Arc<PersistentVolumeClaim>) {
        let f = fake(&[stead()]).await;
        let claim = Arc::new(pvc("data-0", size, Some(NODE)));
        reconcile(claim.clone(), f.ctx.clone()).await.unwrap();
        (f, claim)
    }

    #[tokio::test]
    async fn a_claim_event_before_the_pv_watch_shows_the_pv_creates_nothing_again() {
        let (f, claim) = reconciled("16Mi").await;
        let before = f.requests.lock().unwrap().len();
        assert_eq!(f.posted().len(), 1, "ProvisioningSucceeded");
        // The binder writes the claim before this agent's PV watch has the
        // PV: the claim's events find the PV known, read nothing, post nothing.
        reconcile(claim.clone(), f.ctx.clone()).await.unwrap();
        reconcile_meta(meta(&claim), f.ctx.clone()).await.unwrap();
        let seen = f.requests.lock().unwrap().clone();
        assert_eq!(seen.len(), before, "{:?}", &seen[before..]);
        assert!(f.posted().is_empty());
    }

    #[tokio::test]
    async fn a_release_claim_is_labelled_and_marked_before_its_volume_and_pv() {
        let class = sc(
            "db",
            &[("onNodeLoss", "release")],
            "WaitForFirstConsumer",
            "Delete",
        );
        let f = fake(&[class]).await;
        let mut claim = pvc("data-0", "16Mi", Some(NODE));
        claim.spec.as_mut().unwrap().storage_class_name = Some("db".into());
        reconcile(Arc::new(claim.clone()), f.ctx.clone())
            .await
            .unwrap();
        let seen = f.requests.lock().unwrap().clone();
        let label = seen
            .iter()
            .position(|r| {
                r.method == "PATCH"
                    && r.path == "/api/v1/namespaces/db/persistentvolumeclaims/data-0"
                    && r.body.contains(r#""stead.csi.dev/on-node-loss":"release""#)
                    && r.body.contains(r#""stead.csi.dev/node":"node-a""#)
            })
            .unwrap_or_else(|| panic!("the claim is labelled: {seen:?}"));
        let pv = seen
            .iter()
            .position(|r| r.method == "POST" && r.path == "/api/v1/persistentvolumes")
            .unwrap();
        assert!(label < pv, "the claim's label before the PV: {seen:?}");
        assert!(
            seen[pv]
                .body
                .contains(r#""stead.csi.dev/on-node-loss":"release""#)
        );
        assert!(
            seen[pv]
                .body
                .contains(r#""stead.csi.dev/node-loss-timeout-seconds":"300""#)
        );
        let marks = f.ctx.releasable.older_than(Duration::ZERO).await.unwrap();
        assert_eq!(marks.len(), 1, "the volume's node-loss mark stays");
        assert_eq!(marks[0].claim, "db/data-0");
        assert!(
            f.ctx
                .ledger
                .older_than(Duration::ZERO)
                .await
                .unwrap()
                .is_empty(),
            "its intent went with the PV"
        );
    }

    #[tokio::test]
    async fn a_claim_of_this_node_is_timed_once_from_first_seen_to_its_pv() {
        let (mut f, claim) = reconciled("16Mi").await;
        assert!(
            f.requested("POST /api/v1/persistentvolumes"),
            "{:?}",
            f.requests
        );
        f.metrics(&[
            r#"stead_provision_duration_seconds_count{class="stead",outcome="success"} 1"#,
            // The provisioner's in-process RPC, and its request.
            r#"stead_csi_rpc_duration_seconds_count{method="CreateVolume",code="OK"} 1"#,
            r#"stead_apiserver_requests_total{verb="create",resource="persistentvolumes",code="201"} 1"#,
        ]);

        // Looked at again before it is bound, with its PV made: no second
        // observation, and no clock left running (its deletion would be
        // observed as abandoned).
        let class = class::parse(&stead()).unwrap();
        let volume = Volume {
            volume_id: claim::volume_name(&*claim).unwrap(),
            capacity_bytes: 16 << 20,
            ..Default::default()
        };
        let made = pv::build_pv(&claim, &class, &volume, NODE);
        f.volumes.apply_watcher_event(&watcher::Event::Apply(made));
        reconcile(claim.clone(), f.ctx.clone()).await.unwrap();
        let mut deleted = (*claim).clone();
        deleted.metadata.deletion_timestamp = Some(Time(Default::default()));
        reconcile(Arc::new(deleted), f.ctx.clone()).await.unwrap();
        let text = f.metrics(&[
            r#"stead_provision_duration_seconds_count{class="stead",outcome="success"} 1"#,
        ]);
        assert!(!text.contains(r#"outcome="abandoned""#), "{text}");
    }

    #[tokio::test]
    async fn expansions_are_counted_by_outcome_and_failed_reconciles_by_reason() {
        let mut f = fake(&[stead()]).await;
        let class = class::parse(&stead()).unwrap();
        let small = pvc("data-0", "16Mi", Some(NODE));
        let req = claim::create_request(&small, &class, NODE).unwrap();
        let volume = f
            .ctx
            .csi
            .create_volume(tonic::Request::new(req))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let made = pv::build_pv(&small, &class, &volume, NODE);
        f.volumes
            .apply_watcher_event(&watcher::Event::Apply(made.clone()));
        let grown = |size: &str, pv: &str| {
            let mut c = pvc("data-0", size, Some(NODE));
            c.spec.as_mut().unwrap().volume_name = Some(pv.into());
            c.status = Some(k8s_openapi::api::core::v1::PersistentVolumeClaimStatus {
                phase: Some("Bound".into()),
                ..Default::default()
            });
            Arc::new(c)
        };
        reconcile(grown("32Mi", &volume.volume_id), f.ctx.clone())
            .await
            .unwrap();

        // A PV whose volume is not on the node: ControllerExpandVolume fails.
        let mut lost = made.clone();
        lost.metadata.name = Some("pv-lost".into());
        lost.spec
            .as_mut()
            .unwrap()
            .csi
            .as_mut()
            .unwrap()
            .volume_handle = "pvc-lost".into();
        f.volumes.apply_watcher_event(&watcher::Event::Apply(lost));
        let claim = grown("32Mi", "pv-lost");
        let err = reconcile(claim.clone(), f.ctx.clone()).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Csi {
                    code: Code::NotFound,
                    ..
                }
            ),
            "{err}"
        );
        error_policy(claim, &err, f.ctx.clone());

        f.metrics(&[
            r#"stead_volume_expansions_total{outcome="success"} 1"#,
            r#"stead_volume_expansions_total{outcome="failure"} 1"#,
            r#"stead_csi_rpc_duration_seconds_count{method="ControllerExpandVolume",code="OK"} 1"#,
            r#"stead_csi_rpc_duration_seconds_count{method="ControllerExpandVolume",code="NotFound"} 1"#,
            r#"stead_apiserver_requests_total{verb="patch",resource="persistentvolumeclaims/status",code="200"} 1"#,
            r#"stead_reconcile_errors_total{controller="claim",reason="csi"} 1"#,
        ]);
    }

    #[tokio::test]
    async fn a_claim_without_room_is_given_back_and_timed_as_released() {
        let (f, _) = reconciled("1000Ti").await;
        assert!(
            f.requested("PATCH /api/v1/namespaces/db/persistentvolumeclaims/data-0"),
            "the node choice is released: {:?}",
            f.requests
        );
        let text = f.metrics(&[
            r#"stead_provision_duration_seconds_count{class="stead",outcome="released"} 1"#,
            r#"stead_csi_rpc_duration_seconds_count{method="CreateVolume",code="ResourceExhausted"} 1"#,
        ]);
        assert!(!text.contains(r#"outcome="success""#), "{text}");
    }

    #[tokio::test]
    async fn a_node_without_room_says_so_once_per_claim_not_at_every_look() {
        let now = sc("stead-now", &[], "Immediate", "Delete");
        let f = fake(&[now]).await;
        let mut claim = pvc("big", "1000Ti", None);
        claim.spec.as_mut().unwrap().storage_class_name = Some("stead-now".into());
        let claim = Arc::new(claim);
        for _ in 0..3 {
            let action = reconcile(claim.clone(), f.ctx.clone()).await.unwrap();
            assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        }
        let posted = f.posted();
        assert_eq!(posted.len(), 1, "{posted:?}");
        assert_eq!(posted[0].0, "ProvisioningFailed");
        assert!(
            posted[0]
                .1
                .starts_with("node node-a cannot take claim db/big: it asks for 1000Ti"),
            "{posted:?}"
        );
        assert!(
            f.requests.lock().unwrap().is_empty(),
            "the claim is not taken"
        );
        // Once deleted, forgotten: a claim of that uid would be told again.
        let mut deleted = (*claim).clone();
        deleted.metadata.deletion_timestamp = Some(Time(Default::default()));
        reconcile(Arc::new(deleted), f.ctx.clone()).await.unwrap();
        reconcile(claim, f.ctx.clone()).await.unwrap();
        assert_eq!(f.posted().len(), 1);
    }

    /// The metadata of `claim`, as the claim watch has it.
    fn meta(claim: &PersistentVolumeClaim) -> Arc<PartialObjectMeta<PersistentVolumeClaim>> {
        use kube::core::PartialObjectMetaExt;
        Arc::new(claim.metadata.clone().into_response_partial())
    }

    #[tokio::test]
    async fn only_claims_that_concern_this_node_are_read_whole() {
        let f = fake(&[stead()]).await;
        // Another node's, and one the PV controller has not looked at yet:
        // no request.
        for other in [
            pvc("data-0", "16Mi", Some("node-b")),
            pvc("data-0", "16Mi", None),
        ] {
            reconcile_meta(meta(&other), f.ctx.clone()).await.unwrap();
        }
        assert!(f.requests.lock().unwrap().is_empty(), "{:?}", f.requests);
        // Being deleted: nothing to read either.
        let mut deleted = pvc("data-0", "16Mi", Some(NODE));
        deleted.metadata.deletion_timestamp = Some(Time(Default::default()));
        reconcile_meta(meta(&deleted), f.ctx.clone()).await.unwrap();
        assert!(f.requests.lock().unwrap().is_empty(), "{:?}", f.requests);
        // This node's: read, then reconciled.
        reconcile_meta(meta(&pvc("data-0", "16Mi", Some(NODE))), f.ctx.clone())
            .await
            .unwrap();
        assert!(
            f.requested("GET /api/v1/namespaces/db/persistentvolumeclaims/data-0"),
            "{:?}",
            f.requests
        );
    }

    #[tokio::test]
    async fn a_claim_made_again_while_its_volume_moves_gets_no_volume_of_its_own() {
        use kube::runtime::watcher::Event;
        let f = fake(&[stead()]).await;
        // The old claim, deleted by a move to node-b and kept by the move's
        // finalizer, then gone.
        let mut old = pvc("data-0", "16Mi", Some("node-c"));
        old.metadata.deletion_timestamp = Some(Time(Default::default()));
        old.metadata.finalizers = Some(vec![super::super::moving::FINALIZER.into()]);
        old.metadata
            .annotations
            .get_or_insert_default()
            .insert(super::super::moving::ANN_MOVE_TO.into(), "node-b".into());
        f.ctx
            .in_flight
            .observe(&Event::Apply((*meta(&old)).clone()));
        f.ctx
            .in_flight
            .observe(&Event::Delete((*meta(&old)).clone()));
        // A StatefulSet makes it again; the scheduler picks this node before
        // the PV controller binds it to the copy: nothing is made here, and
        // the node choice goes to the move's target (one optimistic patch).
        let mut again = pvc("data-0", "16Mi", Some(NODE));
        again.metadata.uid = Some("0a1b2c3d-0000-4000-8000-000000000002".into());
        again.metadata.resource_version = Some("7".into());
        f.ctx
            .in_flight
            .observe(&Event::Apply((*meta(&again)).clone()));
        let action = reconcile_meta(meta(&again), f.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        let seen = f.requests.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].body.contains(r#""resourceVersion":"7""#),
            "{:?}",
            seen[0]
        );
        assert!(
            seen[0]
                .body
                .contains(&format!(r#""{}":"node-b""#, claim::ANN_SELECTED_NODE)),
            "{:?}",
            seen[0]
        );
        f.requests.lock().unwrap().clear();
        // Selected for the target now: this node sends nothing more.
        let mut handed = again.clone();
        handed
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(claim::ANN_SELECTED_NODE.into(), "node-b".into());
        let action = reconcile_meta(meta(&handed), f.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        assert!(f.requests.lock().unwrap().is_empty(), "{:?}", f.requests);
        let posted = f.posted();
        assert_eq!(posted.len(), 1, "said once: {posted:?}");
        assert_eq!(posted[0].0, "MoveInFlight");
        assert!(posted[0].1.contains("moves to node node-b"), "{posted:?}");
        // Bound (to the copy) before the handover: this node reads it (its
        // volume's node takes the node choice), then reconciles it as any
        // other again.
        let mut bound = again.clone();
        bound
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(claim::ANN_BIND_COMPLETED.into(), "yes".into());
        f.ctx
            .in_flight
            .observe(&Event::Apply((*meta(&bound)).clone()));
        assert_eq!(f.ctx.in_flight.holds(&again.metadata), None);
        reconcile_meta(meta(&bound), f.ctx.clone()).await.unwrap();
        assert!(
            f.requested("GET /api/v1/namespaces/db/persistentvolumeclaims/data-0"),
            "{:?}",
            f.requests
        );
    }

    /// A fake whose apiserver answers a claim's PATCH with `claim` as it
    /// is once taken by this node (the take's answer).
    async fn taking(
        classes: &[k8s_openapi::api::storage::v1::StorageClass],
        claim: &PersistentVolumeClaim,
    ) -> Fake {
        let mut taken = claim.clone();
        taken.metadata.resource_version = Some("2".into());
        taken
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(claim::ANN_SELECTED_NODE.into(), NODE.into());
        let body = serde_json::to_string(&taken).unwrap();
        fake_answering(
            classes,
            Some(Arc::new(move |method, path, _| {
                (*method == http::Method::PATCH && path.contains("persistentvolumeclaims"))
                    .then(|| (200, body.clone()))
            })),
        )
        .await
    }

    /// An Immediate claim as the claim watch has it: no node chosen, the PV
    /// controller naming Stead its provisioner.
    fn immediate(name: &str, size: &str) -> PersistentVolumeClaim {
        let mut c = pvc(name, size, None);
        c.spec.as_mut().unwrap().storage_class_name = Some("stead-now".into());
        c.metadata.resource_version = Some("1".into());
        c.metadata.annotations = Some(
            [(
                claim::ANN_STORAGE_PROVISIONER.to_string(),
                "stead.csi.dev".to_string(),
            )]
            .into(),
        );
        c
    }

    /// The claim's first looks at this node: its turn to take it (see
    /// `take_turn`) waited out, with nothing sent before it.
    async fn at_its_turn(f: &Fake, claim: &PersistentVolumeClaim) -> Action {
        let turn = crate::provisioner::take_turn(
            &claim.uid().unwrap(),
            NODE,
            crate::provisioner::TAKE_SLOTS,
        );
        if !turn.is_zero() {
            let first = reconcile_meta(meta(claim), f.ctx.clone()).await.unwrap();
            assert_eq!(first, Action::requeue(turn));
            assert!(requests(f).is_empty(), "nothing sent before its turn");
        }
        reconcile_meta(meta(claim), f.ctx.clone()).await.unwrap()
    }

    fn requests(f: &Fake) -> Vec<String> {
        f.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    #[tokio::test]
    async fn an_immediate_claim_is_taken_from_its_metadata_without_a_read() {
        let claim = immediate("small", "16Mi");
        let f = taking(&[sc("stead-now", &[], "Immediate", "Delete")], &claim).await;
        at_its_turn(&f, &claim).await;
        // The take, then the PV: nothing read.
        assert_eq!(
            requests(&f),
            [
                "PATCH /api/v1/namespaces/db/persistentvolumeclaims/small",
                "POST /api/v1/persistentvolumes",
            ]
        );
        let take = &f.requests.lock().unwrap()[0].body;
        assert!(
            take.contains(r#""resourceVersion":"1""#) && take.contains(NODE),
            "{take}"
        );
        // One event, when it is done (the create took milliseconds).
        let posted = f.posted();
        assert_eq!(posted.len(), 1, "{posted:?}");
        assert_eq!(posted[0].0, "ProvisioningSucceeded");
    }

    #[tokio::test]
    async fn an_immediate_claim_waits_this_nodes_turn_and_is_left_alone_once_another_took_it() {
        let mut claim = immediate("turn", "16Mi");
        // A claim whose turn here is not the first.
        let uid = (0..)
            .map(|i| format!("0a1b2c3d-0000-4000-8000-{i:012}"))
            .find(|u| {
                !crate::provisioner::take_turn(u, NODE, crate::provisioner::TAKE_SLOTS).is_zero()
            })
            .unwrap();
        claim.metadata.uid = Some(uid.clone());
        let f = taking(&[sc("stead-now", &[], "Immediate", "Delete")], &claim).await;
        let first = reconcile_meta(meta(&claim), f.ctx.clone()).await.unwrap();
        assert_eq!(
            first,
            Action::requeue(crate::provisioner::take_turn(
                &uid,
                NODE,
                crate::provisioner::TAKE_SLOTS
            ))
        );
        // Meanwhile node-b's take reached this node's watch.
        claim
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(claim::ANN_SELECTED_NODE.into(), "node-b".into());
        let then = reconcile_meta(meta(&claim), f.ctx.clone()).await.unwrap();
        assert_eq!(then, Action::await_change());
        assert_eq!(requests(&f), Vec::<String>::new(), "no take, no read");
    }

    #[tokio::test]
    async fn an_immediate_claim_without_room_is_given_back_and_not_taken_again() {
        let claim = immediate("big", "1000Ti");
        let f = taking(&[sc("stead-now", &[], "Immediate", "Delete")], &claim).await;
        let action = at_its_turn(&f, &claim).await;
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        for _ in 0..2 {
            let action = reconcile_meta(meta(&claim), f.ctx.clone()).await.unwrap();
            assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        }
        // Taken, given back with the version of the take, then left alone
        // while the pool has no room for its size.
        let seen = f.requests.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[1].body.contains(r#""resourceVersion":"2""#),
            "{:?}",
            seen[1]
        );
        assert!(
            seen[1]
                .body
                .contains(&format!(r#""{}":null"#, claim::ANN_SELECTED_NODE)),
            "{:?}",
            seen[1]
        );
        assert!(
            !seen[1].body.contains(NODE),
            "not marked WaitForFirstConsumer: {:?}",
            seen[1]
        );
        let posted = f.posted();
        assert_eq!(posted.len(), 1, "{posted:?}");
        assert!(
            posted[0].1.starts_with(
                "node node-a cannot take claim db/big: it asks for 1000Ti and pool (default) has"
            ),
            "{posted:?}"
        );
    }

    #[tokio::test]
    async fn a_wait_for_first_consumer_claim_taken_by_mistake_is_marked_to_wait_for_the_scheduler()
    {
        // Its node choice removed by someone: it looks Immediate.
        let mut claim = immediate("late", "16Mi");
        claim.spec.as_mut().unwrap().storage_class_name = Some("stead".into());
        let f = taking(&[stead()], &claim).await;
        at_its_turn(&f, &claim).await;
        let seen = f.requests.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[1]
                .body
                .contains(&format!(r#""{}":"{NODE}""#, claim::ANN_WAITS_FOR_SCHEDULER)),
            "{:?}",
            seen[1]
        );
        assert!(f.posted().is_empty());
        // Marked so, every agent leaves it to the scheduler.
        let mut marked = claim.clone();
        marked
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(claim::ANN_WAITS_FOR_SCHEDULER.into(), NODE.into());
        assert_eq!(
            claim::concerns(&*meta(&marked), "node-b", false),
            Concern::NotYet
        );
    }

    #[test]
    fn a_volume_not_held_to_its_size_is_said_so_on_its_event() {
        let mut volume = Volume {
            volume_id: "pvc-1".into(),
            capacity_bytes: 64 << 20,
            volume_context: HashMap::from([("enforced".to_string(), "false".to_string())]),
            ..Default::default()
        };
        let note = succeeded_note(&volume, "n1", None);
        assert!(
            note.starts_with(
                "created volume pvc-1 (64Mi) on node n1; capacity accounted, not enforced"
            ),
            "{note}"
        );
        volume
            .volume_context
            .insert("enforced".into(), "true".into());
        assert_eq!(
            succeeded_note(&volume, "n1", Some("snapshot s")),
            "created volume pvc-1 (64Mi) on node n1 from snapshot s"
        );
        // A volume of an older agent says nothing: nothing is claimed.
        volume.volume_context.clear();
        assert_eq!(
            succeeded_note(&volume, "n1", None),
            "created volume pvc-1 (64Mi) on node n1"
        );
    }

    #[test]
    fn intent_goes_only_when_create_volume_made_nothing() {
        for code in [
            Code::InvalidArgument,
            Code::OutOfRange,
            Code::ResourceExhausted,
        ] {
            assert!(!intent_survives(code), "{code:?}: nothing was created");
        }
        for code in [
            Code::AlreadyExists,
            Code::Internal,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::FailedPrecondition,
            Code::Unknown,
            Code::Cancelled,
        ] {
            assert!(intent_survives(code), "{code:?}: a volume may exist");
        }
    }
}
