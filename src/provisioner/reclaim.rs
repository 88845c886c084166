//! Deleting what users released, and reclaiming what a crash leaked.
//!
//! Data is deleted only for a PV of this node that is Released with reclaim
//! policy Delete (or a PV the user deleted that is no longer bound), for
//! leaked volumes that never had a PV (see `ledger`), and for volumes of a
//! `release` class whose PV is gone, as node loss leaves them on a node that
//! comes back ([`reap_released`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tonic::Code;

use super::{Ctx, Error, claim, csi_error, pv};
use crate::metrics::Outcome;
use crate::proto::csi::v1::DeleteVolumeRequest;
use crate::proto::csi::v1::controller_server::Controller as CsiController;

impl<C: CsiController> Ctx<C> {
    /// DeleteVolume; a volume that is already gone counts as deleted.
    async fn delete_volume(&self, volume: &str) -> Result<(), Error> {
        let req = DeleteVolumeRequest {
            volume_id: volume.to_string(),
            ..Default::default()
        };
        match self.csi.delete_volume(tonic::Request::new(req)).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(csi_error("DeleteVolume", volume, &self.config.node, s)),
        }
    }

    /// Removes our finalizer; `false` when the PV changed meanwhile (and
    /// comes back to the reconcile).
    async fn drop_finalizer(&self, pv: &PersistentVolume) -> Result<bool, Error> {
        let remaining: Vec<&String> = pv
            .finalizers()
            .iter()
            .filter(|f| f.as_str() != pv::FINALIZER)
            .collect();
        // The resourceVersion makes this a compare-and-swap on the list.
        let patch = json!({"metadata": {
            "resourceVersion": pv.resource_version(),
            "finalizers": remaining,
        }});
        let api: Api<PersistentVolume> = Api::all(self.client.clone());
        match api
            .patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(true),
            // Gone already; or changed meanwhile, and the change brings the
            // PV back to this reconcile with its new resourceVersion.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// One PV's reconcile; its span names the PV and its volume (see
/// `reconcile::reconcile`).
#[tracing::instrument(skip_all, fields(
    pv = %pv.name_any(),
    volume.id = %pv::stead_volume_handle(&pv).unwrap_or_default(),
))]
pub(crate) async fn reconcile<C: CsiController>(
    pv: Arc<PersistentVolume>,
    ctx: Arc<Ctx<C>>,
) -> Result<Action, Error> {
    let Some(handle) = pv::stead_volume_handle(&pv) else {
        return Ok(Action::await_change());
    };
    if pv::pv_node(&pv) != Some(ctx.config.node.as_str()) {
        return Ok(Action::await_change());
    }
    // The old PV of a move, or the new one whose claim is to be made again.
    if let Some(action) = super::moving::on_pv(&pv, &ctx).await? {
        return Ok(action);
    }
    let name = pv.name_any();
    let delete_policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete");
    let ours = pv.finalizers().iter().any(|f| f == pv::FINALIZER);
    let released = matches!(phase(&pv), "Released" | "Failed");
    let uid = pv.uid().unwrap_or_default();
    let class = pv
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or_default();

    if pv.meta().deletion_timestamp.is_some() {
        if !ours {
            return Ok(Action::await_change());
        }
        ctx.metrics.deletion.start(&uid, class);
        if delete_policy {
            // A PV deleted while still bound waits for its claim to go
            // (kubernetes.io/pv-protection holds it); only then is the data
            // deleted.
            if phase(&pv) == "Bound" {
                return Ok(Action::await_change());
            }
            if let Some(wait) = delete_pv_volume(&ctx, &pv, handle).await? {
                return Ok(wait);
            }
            ctx.releasable.remove(handle).await?;
            tracing::info!(pv = %name, volume.id = %handle, "deleted volume of deleted PV");
            ctx.capacity_changed.notify_one();
        }
        if ctx.drop_finalizer(&pv).await? {
            let outcome = if delete_policy {
                Outcome::Success
            } else {
                Outcome::Retained
            };
            ctx.metrics.deletion.finish(&uid, outcome);
        }
        ctx.succeeded(&uid);
        return Ok(Action::await_change());
    }

    if released && delete_policy {
        ctx.metrics.deletion.start(&uid, class);
        if let Some(wait) = delete_pv_volume(&ctx, &pv, handle).await? {
            return Ok(wait);
        }
        ctx.releasable.remove(handle).await?;
        tracing::info!(pv = %name, volume.id = %handle, node = %ctx.config.node, "deleted volume of released PV");
        ctx.capacity_changed.notify_one();
        let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {
                ctx.metrics.deletion.finish(&uid, Outcome::Success);
                return Ok(Action::await_change());
            }
            Err(e) => return Err(e.into()),
        }
        // The deletion shows up as an update with deletionTimestamp, which
        // takes the branch above and drops the finalizer.
        ctx.succeeded(&uid);
    }
    Ok(Action::await_change())
}

/// How long a volume may stay mounted after its PV is released before the
/// wait is reported: kubelet unmounts a deleted pod's volumes within seconds.
const MOUNTED_TOO_LONG: Duration = Duration::from_secs(60);

/// DeleteVolume of the volume of `pv`, which is released (or deleted) with
/// reclaim policy Delete. `None`: the volume is gone. `Some(action)`: the
/// plugin refused because the volume is still mounted on this node: kubelet
/// has not yet unmounted the pod that used it. That is the normal order of a
/// pod deleted with its claim, so it is not an error: the PV is reconciled
/// again as soon as the plugin sees the volume free (`storage::Freed`, wired
/// in `run`), or at its backoff if that signal is missed; only a wait longer
/// than [`MOUNTED_TOO_LONG`] is a Warning. Any other failure is one, and
/// goes to the error policy's backoff.
async fn delete_pv_volume<C: CsiController>(
    ctx: &Ctx<C>,
    pv: &PersistentVolume,
    handle: &str,
) -> Result<Option<Action>, Error> {
    let node = &ctx.config.node;
    let name = pv.name_any();
    let uid = pv.uid().unwrap_or_default();
    match ctx.delete_volume(handle).await {
        Ok(()) => Ok(None),
        Err(Error::Csi {
            code: Code::FailedPrecondition,
            message,
            ..
        }) => {
            let (wait, waited) = ctx.backoff_since(&uid);
            tracing::debug!(pv = %name, volume.id = %handle, node = %node, retry_in = ?wait,
                "volume still in use, deleted once unmounted: {message}");
            if waited >= MOUNTED_TOO_LONG {
                ctx.events.post(
                    pv.object_ref(&()),
                    EventType::Warning,
                    "VolumeFailedDelete",
                    "Delete",
                    still_mounted_note(node, &name, handle, &message, waited),
                );
            }
            Ok(Some(Action::requeue(wait)))
        }
        Err(e) => {
            ctx.events.post(
                pv.object_ref(&()),
                EventType::Warning,
                "VolumeFailedDelete",
                "Delete",
                format!(
                    "node {node} could not delete volume {handle} of released PV {name}: {e}; Stead retries with a backoff (up to 5 min); the agent's log on node {node} tells more"
                ),
            );
            Err(e)
        }
    }
}

/// The Warning of a released volume still mounted after `waited`.
fn still_mounted_note(node: &str, pv: &str, handle: &str, why: &str, waited: Duration) -> String {
    format!(
        "node {node} cannot delete volume {handle} of released PV {pv} yet: {why}. It has been mounted for {} s since it was released; Stead deletes it as soon as it is unmounted. If no pod on node {node} uses it any more, kubelet failed to unmount it: see kubelet's log on {node}",
        waited.as_secs()
    )
}

pub(crate) fn error_policy<C: CsiController>(
    pv: Arc<PersistentVolume>,
    err: &Error,
    ctx: Arc<Ctx<C>>,
) -> Action {
    let wait = ctx.failed("volume", pv.uid(), err);
    tracing::warn!(
        pv = %pv.name_any(),
        volume.id = %pv::stead_volume_handle(&pv).unwrap_or_default(),
        error = %err,
        retry_in = ?wait,
        "volume reclaim failed"
    );
    Action::requeue(wait)
}

/// Whether the PV found under an intent's volume name is that volume's own
/// (its hand-over, which ends the intent). A PV of the same name that is not
/// (another driver's, another node's, another claim's) neither ends the
/// intent nor lets the reaper delete data a PV may still name: the caller
/// leaves the volume for an operator and says so each round.
fn handed_over(
    found: &PersistentVolume,
    intent: &super::ledger::Intent,
    node: &str,
) -> Result<(), pv::PvMismatch> {
    pv::check_owned(found, &intent.volume, node, &intent.claim_uid)
}

/// Periodically reclaims volumes whose intent outlived the grace period with
/// no PV and no claim on this node still waiting for them. Never ends: a
/// failure with one intent is logged and the others are still looked at
/// (and it is looked at again next round).
pub(crate) async fn reap_leaks<C: CsiController>(ctx: Arc<Ctx<C>>) {
    let period = ctx
        .config
        .leak_grace
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    // A claim still waiting for its volume is told by the claim store: an
    // empty store, before its first list, would tell of none.
    if ctx.claims.wait_until_ready().await.is_err() {
        return;
    }
    let mut released = Released::default();
    loop {
        tokio::time::sleep(period).await;
        reap_round(&ctx, &pvs, ctx.config.leak_grace).await;
        reap_released(&ctx, &pvs, &mut released, Instant::now()).await;
    }
}

/// The volumes of `release` classes whose PV the apiserver did not have,
/// and since when this agent has seen it so (in memory: a restart starts
/// the grace again, which only waits longer).
#[derive(Debug, Default)]
pub(crate) struct Released {
    missing: HashMap<String, Instant>,
}

/// One round of the returning node's reaper: a volume of a `release` class
/// (its node-loss mark, see `ledger::NODE_LOSS`) whose PV is gone from the
/// apiserver for [`Config::leak_grace`](super::Config) is deleted. That is
/// what node loss leaves on a node that comes back: the leader deleted the
/// PV (and the claim) while the node was away, and only this node can
/// delete the data. A volume that still has its provisioning intent is the
/// leak reaper's (its PV may be about to be made); one that is staged or
/// published is kept (DeleteVolume refuses it, `FailedPrecondition`) until
/// kubelet has unmounted it, and tried again each round.
pub(crate) async fn reap_released<C: CsiController>(
    ctx: &Ctx<C>,
    pvs: &Api<PersistentVolume>,
    released: &mut Released,
    now: Instant,
) {
    let grace = ctx.config.leak_grace;
    let (marks, intents) = match (
        ctx.releasable.older_than(Duration::ZERO).await,
        ctx.ledger.older_than(Duration::ZERO).await,
    ) {
        (Ok(m), Ok(i)) => (m, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot read the node-loss marks or provisioning intents");
            return;
        }
    };
    let provisioning: HashSet<&str> = intents.iter().map(|i| i.volume.as_str()).collect();
    let marked: HashSet<&str> = marks.iter().map(|m| m.volume.as_str()).collect();
    released.missing.retain(|v, _| marked.contains(v.as_str()));
    for mark in &marks {
        let volume = mark.volume.as_str();
        if provisioning.contains(volume) {
            continue;
        }
        match pvs.get_opt(volume).await {
            Ok(Some(_)) => {
                released.missing.remove(volume);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(pvc = %mark.claim, volume.id = %volume, error = %e, "cannot check PV");
                continue;
            }
        }
        let since = *released.missing.entry(volume.to_string()).or_insert(now);
        let waited = now.saturating_duration_since(since);
        if waited < grace {
            tracing::info!(pvc = %mark.claim, volume.id = %volume, node = %ctx.config.node,
                waited_s = waited.as_secs(), grace_s = grace.as_secs(),
                "the PV of this released volume is gone (node loss released its claim while this node was away); its data is removed after the grace");
            continue;
        }
        match ctx.delete_volume(volume).await {
            Ok(()) => {
                tracing::warn!(pvc = %mark.claim, volume.id = %volume, node = %ctx.config.node, waited_s = waited.as_secs(),
                    "removed the data of a volume released by node loss: its PV and claim were deleted while this node was away");
                released.missing.remove(volume);
                if let Err(e) = ctx.releasable.remove(volume).await {
                    // The volume is gone; next round finds nothing to
                    // delete and drops the mark again.
                    tracing::warn!(volume.id = %volume, error = %e, "cannot drop the node-loss mark of a removed volume");
                }
                ctx.capacity_changed.notify_one();
            }
            Err(e) => {
                tracing::warn!(pvc = %mark.claim, volume.id = %volume, node = %ctx.config.node, error = %e,
                "kept a volume released by node loss: it cannot be removed yet (staged or published: kubelet has not unmounted it); tried again next round")
            }
        }
    }
}

/// One round of [`reap_leaks`]: the intents older than `grace`. A volume
/// goes only when the apiserver (not this node's PV store, which a PV may
/// have dropped out of) has no PV of its name, and no claim waits for it.
async fn reap_round<C: CsiController>(ctx: &Ctx<C>, pvs: &Api<PersistentVolume>, grace: Duration) {
    let intents = match ctx.ledger.older_than(grace).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read provisioning intents");
            return;
        }
    };
    for intent in intents {
        // Ask the apiserver, not the cache: a PV created a moment ago
        // must not be mistaken for a leak.
        match pvs.get_opt(&intent.volume).await {
            Ok(Some(found)) => {
                if let Err(why) = handed_over(&found, &intent, &ctx.config.node) {
                    tracing::warn!(pvc = %intent.claim, volume.id = %intent.volume, mismatch = %why,
                        "a PV of this volume's name is not its own; volume and intent kept, inspect both");
                    continue;
                }
                if let Err(e) = ctx.ledger.remove(&intent.volume).await {
                    tracing::warn!(pvc = %intent.claim, volume.id = %intent.volume, error = %e, "cannot drop the intent of a volume that has its PV");
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(pvc = %intent.claim, volume.id = %intent.volume, error = %e, "cannot check PV");
                continue;
            }
        }
        let waiting = ctx.claims.state().iter().any(|c| {
            c.uid().as_deref() == Some(intent.claim_uid.as_str())
                && c.meta().deletion_timestamp.is_none()
                && claim::selected_node(&**c) == Some(ctx.config.node.as_str())
                // The copy a move makes here for a claim of another node.
                || c.uid().as_deref() == Some(intent.claim_uid.as_str())
                    && super::moving::moving_here(&**c, &ctx.config.node)
        });
        if waiting {
            continue;
        }
        match ctx.delete_volume(&intent.volume).await {
            Ok(()) => {
                tracing::warn!(
                    volume.id = %intent.volume,
                    pvc = %intent.claim,
                    since = intent.since,
                    "reclaimed leaked volume: its claim is gone and it never got a PV"
                );
                if let Err(e) = ctx.ledger.remove(&intent.volume).await {
                    // The volume is gone; next round DeleteVolume finds
                    // nothing and the removal is tried again.
                    tracing::warn!(pvc = %intent.claim, volume.id = %intent.volume, error = %e, "cannot drop the intent of a reclaimed volume");
                }
                ctx.capacity_changed.notify_one();
            }
            Err(e) => {
                tracing::warn!(pvc = %intent.claim, volume.id = %intent.volume, error = %e, "cannot reclaim leaked volume")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::v1::Volume;
    use crate::provisioner::claim::tests::pvc;
    use crate::provisioner::class::{self, tests::class as sc};
    use crate::provisioner::ledger::Intent;
    use crate::provisioner::tests::{Answer, Fake, NODE, fake, fake_answering, legacy_pv, status};
    use std::sync::Arc as StdArc;

    /// The PV of a 16 MiB claim of class `stead` (reclaim Delete) on this
    /// node, in `phase`.
    fn released_pv(phase: &str) -> PersistentVolume {
        let mut pv = pv::tests::made_for(&pvc("data-0", "16Mi", Some(NODE)), NODE);
        pv.metadata.uid = Some("pv-uid".into());
        pv.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
            phase: Some(phase.into()),
            ..Default::default()
        });
        pv
    }

    fn deleted(mut pv: PersistentVolume) -> Arc<PersistentVolume> {
        pv.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        Arc::new(pv)
    }

    #[tokio::test]
    async fn a_released_pv_is_timed_until_its_finalizer_goes() {
        let f = fake(&[]).await;
        let pv = released_pv("Released");
        reconcile(Arc::new(pv.clone()), f.ctx.clone())
            .await
            .unwrap();
        assert!(f.requested(&format!(
            "DELETE /api/v1/persistentvolumes/{}",
            pv.name_any()
        )));
        let text = f.metrics(&[]);
        assert!(
            !text.contains("stead_deletion_duration_seconds_count"),
            "{text}"
        );
        // The apiserver's deletion comes back as an update.
        reconcile(deleted(pv.clone()), f.ctx.clone()).await.unwrap();
        f.metrics(&[
            r#"stead_deletion_duration_seconds_count{class="stead",outcome="success"} 1"#,
            r#"stead_csi_rpc_duration_seconds_count{method="DeleteVolume",code="OK"} 2"#,
            r#"stead_apiserver_requests_total{verb="delete",resource="persistentvolumes",code="200"} 1"#,
            r#"stead_apiserver_requests_total{verb="patch",resource="persistentvolumes",code="200"} 1"#,
        ]);
    }

    #[tokio::test]
    async fn a_deleted_pv_whose_policy_keeps_the_data_is_timed_as_retained() {
        let f = fake(&[]).await;
        let mut pv = released_pv("Bound");
        pv.spec.as_mut().unwrap().persistent_volume_reclaim_policy = Some("Retain".into());
        reconcile(deleted(pv), f.ctx.clone()).await.unwrap();
        let text = f.metrics(&[
            r#"stead_deletion_duration_seconds_count{class="stead",outcome="retained"} 1"#,
        ]);
        assert!(!text.contains("DeleteVolume"), "the data is kept: {text}");
    }

    /// A volume of claim `db/data-0` on this node's disk with its intent,
    /// and no PV in this node's store: what a crash between CreateVolume
    /// and the PV leaves, or what an earlier version's unlabelled PV looks
    /// like from the store. Its name.
    async fn volume_with_intent(f: &Fake) -> String {
        let class = class::parse(&sc("stead", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        let claim = pvc("data-0", "16Mi", Some(NODE));
        let req = claim::create_request(&claim, &class, NODE).unwrap();
        let name = req.name.clone();
        f.ctx
            .csi
            .create_volume(tonic::Request::new(req))
            .await
            .unwrap();
        f.ctx
            .ledger
            .record(&name, "db/data-0", claim.metadata.uid.as_deref().unwrap())
            .await
            .unwrap();
        assert!(
            f.ctx
                .volumes
                .get(&kube::runtime::reflector::ObjectRef::new(&name))
                .is_none()
        );
        name
    }

    /// One round of the reaper, for intents of any age; whether the round
    /// left no intent.
    async fn reap(f: &Fake) -> bool {
        let pvs: Api<PersistentVolume> = Api::all(f.ctx.client.clone());
        reap_round(&f.ctx, &pvs, Duration::ZERO).await;
        f.ctx
            .ledger
            .older_than(Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    }

    #[tokio::test]
    async fn a_volume_whose_pv_is_not_in_this_nodes_store_is_never_taken_for_a_leak() {
        // The PV an earlier version made: no node label, so not in the
        // label-selected store, but on the apiserver.
        let found = legacy_pv();
        let answer: Answer = StdArc::new(move |method: &http::Method, path: &str, _: &str| {
            (*method == http::Method::GET
                && path.ends_with(&format!("/persistentvolumes/{}", found.name_any())))
            .then(|| (200, serde_json::to_string(&found).unwrap()))
        });
        let f = fake_answering(&[], Some(answer)).await;
        assert_eq!(volume_with_intent(&f).await, legacy_pv().name_any());
        assert!(reap(&f).await, "its PV ends its intent");
        let text = f.metrics(&[]);
        assert!(!text.contains("DeleteVolume"), "the volume is kept: {text}");
    }

    #[tokio::test]
    async fn a_volume_with_no_pv_anywhere_and_no_claim_waiting_is_reclaimed() {
        let answer: Answer = StdArc::new(|method: &http::Method, _: &str, _: &str| {
            (*method == http::Method::GET).then(|| status(404, "NotFound"))
        });
        let f = fake_answering(&[], Some(answer)).await;
        volume_with_intent(&f).await;
        assert!(reap(&f).await);
        f.metrics(&[r#"stead_csi_rpc_duration_seconds_count{method="DeleteVolume",code="OK"} 1"#]);
    }

    /// A volume of a `release` class that got its PV (its intent gone, its
    /// node-loss mark kept), on an apiserver that no longer has that PV (or
    /// has it: `pv_exists`): what node loss leaves on a node that comes
    /// back. The fake and the volume's name.
    async fn released_volume(pv_exists: bool) -> (Fake, String) {
        let answer: Answer = StdArc::new(move |method: &http::Method, path: &str, _: &str| {
            (*method == http::Method::GET && path.contains("/persistentvolumes/") && !pv_exists)
                .then(|| status(404, "NotFound"))
        });
        let f = fake_answering(&[], Some(answer)).await;
        let name = volume_with_intent(&f).await;
        f.ctx.ledger.remove(&name).await.unwrap();
        f.ctx
            .releasable
            .record(&name, "db/data-0", "0a1b2c3d-0000-4000-8000-000000000001")
            .await
            .unwrap();
        (f, name)
    }

    /// The volumes on the fake's pool.
    async fn on_disk(f: &Fake) -> Vec<String> {
        let listed = f
            .ctx
            .csi
            .list_volumes(tonic::Request::new(Default::default()))
            .await
            .unwrap()
            .into_inner();
        listed
            .entries
            .into_iter()
            .filter_map(|e| e.volume.map(|v| v.volume_id))
            .collect()
    }

    /// Whether the volume's node-loss mark is still there.
    async fn marked(f: &Fake, volume: &str) -> bool {
        f.ctx
            .releasable
            .older_than(Duration::ZERO)
            .await
            .unwrap()
            .iter()
            .any(|m| m.volume == volume)
    }

    #[tokio::test]
    async fn a_released_volume_whose_pv_is_gone_is_removed_only_after_the_grace() {
        let (f, name) = released_volume(false).await;
        let pvs: Api<PersistentVolume> = Api::all(f.ctx.client.clone());
        let grace = f.ctx.config.leak_grace;
        let mut released = Released::default();
        let t0 = Instant::now();
        // The times are given, not waited for: the grace counts from the
        // round that first found the PV gone.
        reap_released(&f.ctx, &pvs, &mut released, t0).await;
        reap_released(
            &f.ctx,
            &pvs,
            &mut released,
            t0 + grace - Duration::from_secs(1),
        )
        .await;
        assert_eq!(
            on_disk(&f).await,
            std::slice::from_ref(&name),
            "kept within the grace"
        );
        reap_released(&f.ctx, &pvs, &mut released, t0 + grace).await;
        assert!(on_disk(&f).await.is_empty(), "removed after the grace");
        assert!(!marked(&f, &name).await, "its mark goes with it");
    }

    #[tokio::test]
    async fn a_released_volume_whose_pv_exists_or_that_still_provisions_is_kept() {
        let (f, name) = released_volume(true).await;
        let pvs: Api<PersistentVolume> = Api::all(f.ctx.client.clone());
        let mut released = Released::default();
        let t0 = Instant::now();
        reap_released(&f.ctx, &pvs, &mut released, t0).await;
        reap_released(
            &f.ctx,
            &pvs,
            &mut released,
            t0 + Duration::from_secs(86_400),
        )
        .await;
        assert_eq!(
            on_disk(&f).await,
            std::slice::from_ref(&name),
            "its PV is there"
        );
        assert!(marked(&f, &name).await);

        // No PV, but its intent is back (a claim being provisioned): the
        // leak reaper's, which knows whether a claim waits for it.
        let (f, name) = released_volume(false).await;
        f.ctx.ledger.record(&name, "db/data-0", "u").await.unwrap();
        let pvs: Api<PersistentVolume> = Api::all(f.ctx.client.clone());
        let mut released = Released::default();
        reap_released(&f.ctx, &pvs, &mut released, t0).await;
        reap_released(
            &f.ctx,
            &pvs,
            &mut released,
            t0 + Duration::from_secs(86_400),
        )
        .await;
        assert_eq!(on_disk(&f).await, [name]);
    }

    /// Stages volume `name` as kubelet does (a real bind mount); its
    /// staging path.
    async fn stage(f: &Fake, name: &str) -> String {
        use crate::proto::csi::v1::node_server::Node as _;
        use crate::proto::csi::v1::volume_capability::{
            AccessMode, AccessType, MountVolume, access_mode::Mode,
        };
        use crate::proto::csi::v1::{NodeStageVolumeRequest, VolumeCapability};
        let staging = f.tmp.path().join("kubelet/staging").join(name);
        std::fs::create_dir_all(&staging).unwrap();
        let staging_path = staging.display().to_string();
        f.node
            .node_stage_volume(tonic::Request::new(NodeStageVolumeRequest {
                volume_id: name.to_string(),
                staging_target_path: staging_path.clone(),
                volume_capability: Some(VolumeCapability {
                    access_mode: Some(AccessMode {
                        mode: Mode::SingleNodeWriter as i32,
                    }),
                    access_type: Some(AccessType::Mount(MountVolume::default())),
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
        staging_path
    }

    /// Undoes [`stage`].
    async fn unstage(f: &Fake, name: &str, staging_path: String) {
        use crate::proto::csi::v1::NodeUnstageVolumeRequest;
        use crate::proto::csi::v1::node_server::Node as _;
        f.node
            .node_unstage_volume(tonic::Request::new(NodeUnstageVolumeRequest {
                volume_id: name.to_string(),
                staging_target_path: staging_path,
            }))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_released_volume_still_mounted_is_deleted_once_unmounted_without_a_warning() {
        let f = fake(&[]).await;
        let name = volume_with_intent(&f).await;
        let pv = released_pv("Released");
        assert_eq!(pv::stead_volume_handle(&pv), Some(name.as_str()));
        // The claim and its pod were deleted together: the PV is Released
        // while kubelet still has the volume mounted.
        let staging = stage(&f, &name).await;
        let mut freed = f.ctx.config.freed.subscribe();
        let action = reconcile(Arc::new(pv.clone()), f.ctx.clone()).await;
        assert!(action.is_ok(), "not an error: {action:?}");
        assert_eq!(
            on_disk(&f).await,
            std::slice::from_ref(&name),
            "kept while staged"
        );
        assert_eq!(f.posted(), vec![], "no Warning for kubelet's normal order");
        assert!(!f.requested(&format!(
            "DELETE /api/v1/persistentvolumes/{}",
            pv.name_any()
        )));

        unstage(&f, &name, staging).await;
        assert_eq!(
            freed.try_recv().unwrap(),
            name,
            "the plugin tells the volume is free"
        );
        reconcile(Arc::new(pv.clone()), f.ctx.clone())
            .await
            .unwrap();
        assert!(on_disk(&f).await.is_empty(), "deleted once unmounted");
        assert!(f.requested(&format!(
            "DELETE /api/v1/persistentvolumes/{}",
            pv.name_any()
        )));
    }

    #[test]
    fn a_volume_mounted_too_long_after_release_is_reported_with_the_next_step() {
        let note = still_mounted_note(
            NODE,
            "pvc-1",
            "pvc-1",
            "volume pvc-1 is staged at /s",
            Duration::from_secs(64),
        );
        for part in [
            NODE,
            "pvc-1",
            "staged at /s",
            "64 s",
            "as soon as it is unmounted",
            "kubelet's log",
        ] {
            assert!(note.contains(part), "{part} in {note}");
        }
    }

    #[tokio::test]
    async fn a_released_volume_is_never_removed_while_it_is_mounted() {
        let (f, name) = released_volume(false).await;
        // kubelet of the returning node has not yet unmounted the old pod's
        // volume: it is staged (a real bind mount).
        let staging_path = stage(&f, &name).await;
        let pvs: Api<PersistentVolume> = Api::all(f.ctx.client.clone());
        let grace = f.ctx.config.leak_grace;
        let mut released = Released::default();
        let t0 = Instant::now();
        reap_released(&f.ctx, &pvs, &mut released, t0).await;
        reap_released(&f.ctx, &pvs, &mut released, t0 + grace).await;
        assert_eq!(
            on_disk(&f).await,
            std::slice::from_ref(&name),
            "kept while staged"
        );
        assert!(marked(&f, &name).await);
        f.metrics(&[r#"stead_csi_rpc_duration_seconds_count{method="DeleteVolume",code="FailedPrecondition"} 1"#]);

        unstage(&f, &name, staging_path).await;
        reap_released(
            &f.ctx,
            &pvs,
            &mut released,
            t0 + grace + Duration::from_secs(1),
        )
        .await;
        assert!(on_disk(&f).await.is_empty(), "removed once unmounted");
        assert!(!marked(&f, &name).await);
    }

    #[test]
    fn only_the_volumes_own_pv_ends_its_intent() {
        let class = class::parse(&sc("stead", &[], "WaitForFirstConsumer", "Delete")).unwrap();
        let claim = pvc("db-vol-db-ss-0", "500Mi", Some("node-a"));
        let volume = Volume {
            volume_id: format!("pvc-{}", claim.metadata.uid.clone().unwrap()),
            capacity_bytes: 500 << 20,
            ..Default::default()
        };
        let own = pv::build_pv(&claim, &class, &volume, "node-a");
        let intent = Intent {
            volume: volume.volume_id.clone(),
            claim: "db/db-vol-db-ss-0".into(),
            claim_uid: claim.metadata.uid.clone().unwrap(),
            since: 0,
        };
        assert!(handed_over(&own, &intent, "node-a").is_ok());
        // The same name on another node, or for another claim: not ours.
        assert!(handed_over(&own, &intent, "node-b").is_err());
        let other_claim = Intent {
            claim_uid: "someone-else".into(),
            ..intent.clone()
        };
        assert!(handed_over(&own, &other_claim, "node-a").is_err());
    }
}
