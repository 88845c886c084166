//! Deleting what users released, and reclaiming what a crash leaked.
//!
//! Data is deleted only for a PV of this node that is Released with reclaim
//! policy Delete (or a PV the user deleted that is no longer bound), and for
//! leaked volumes that never had a PV (see `ledger`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tonic::Code;

use super::{Ctx, Error, claim, csi_error, pv};
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

    async fn drop_finalizer(&self, pv: &PersistentVolume) -> Result<(), Error> {
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
            Ok(_) => Ok(()),
            // Gone already; or changed meanwhile, and the change brings the
            // PV back to this reconcile with its new resourceVersion.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
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
    let name = pv.name_any();
    let delete_policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete");
    let ours = pv.finalizers().iter().any(|f| f == pv::FINALIZER);
    let released = matches!(phase(&pv), "Released" | "Failed");

    if pv.meta().deletion_timestamp.is_some() {
        if !ours {
            return Ok(Action::await_change());
        }
        if delete_policy {
            // A PV deleted while still bound waits for its claim to go
            // (kubernetes.io/pv-protection holds it); only then is the data
            // deleted.
            if phase(&pv) == "Bound" {
                return Ok(Action::await_change());
            }
            ctx.delete_volume(handle).await?;
            tracing::info!(pv = %name, volume.id = %handle, "deleted volume of deleted PV");
            ctx.capacity_changed.notify_one();
        }
        ctx.drop_finalizer(&pv).await?;
        ctx.succeeded(&pv.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }

    if released && delete_policy {
        if let Err(e) = ctx.delete_volume(handle).await {
            ctx.events.post(
                pv.object_ref(&()),
                EventType::Warning,
                "VolumeFailedDelete",
                "Delete",
                e.to_string(),
            );
            return Err(e);
        }
        tracing::info!(pv = %name, volume.id = %handle, node = %ctx.config.node, "deleted volume of released PV");
        ctx.capacity_changed.notify_one();
        let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
            Err(e) => return Err(e.into()),
        }
        // The deletion shows up as an update with deletionTimestamp, which
        // takes the branch above and drops the finalizer.
        ctx.succeeded(&pv.uid().unwrap_or_default());
    }
    Ok(Action::await_change())
}

pub(crate) fn error_policy<C: CsiController>(
    pv: Arc<PersistentVolume>,
    err: &Error,
    ctx: Arc<Ctx<C>>,
) -> Action {
    let wait = ctx.backoff(&pv.uid().unwrap_or_default());
    tracing::warn!(
        pv = %pv.name_any(),
        volume.id = %pv::stead_volume_handle(&pv).unwrap_or_default(),
        error = %err,
        retry_in = ?wait,
        "volume reclaim failed"
    );
    Action::requeue(wait)
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
    loop {
        tokio::time::sleep(period).await;
        let intents = match ctx.ledger.older_than(ctx.config.leak_grace).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read provisioning intents");
                continue;
            }
        };
        for intent in intents {
            // Ask the apiserver, not the cache: a PV created a moment ago
            // must not be mistaken for a leak.
            match pvs.get_opt(&intent.volume).await {
                Ok(Some(_)) => {
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
                    && claim::selected_node(c) == Some(ctx.config.node.as_str())
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
}
