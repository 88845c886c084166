//! The csi-snapshotter sidecar's job, done in the agent: for each
//! VolumeSnapshotContent of Stead whose data is on this node, take the
//! snapshot (CreateSnapshot), report it in the content's status, and delete
//! it when the snapshot-controller says so (deletionPolicy Delete) or let
//! it go (Retain). The protocol with the snapshot-controller is upstream's:
//! the `volumesnapshot-being-created` annotation while CreateSnapshot runs,
//! status fields `snapshotHandle`, `creationTime` (ns), `restoreSize`,
//! `readyToUse`, and the content finalizer removed once the snapshot is
//! deleted or retained.
//!
//! Which agent acts: the one whose node holds the source volume (its PV's
//! node affinity) for a new snapshot; the one that holds the snapshot in
//! its store for status and deletion. A content this agent acted on
//! carries the node label [`CONTENT_NODE_LABEL`], so that a deletion is
//! finished by it even after the snapshot itself is gone, and so that a
//! restore knows where the data is.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::snapshot_api::{
    ANN_BEING_CREATED, ANN_BEING_DELETED, CONTENT_FINALIZER, RESERVED_PREFIX, VolumeSnapshotClass,
    VolumeSnapshotContent,
};
use super::{Ctx, Error, csi_error, pv};
use crate::proto::csi::v1::controller_server::Controller as CsiController;
use crate::proto::csi::v1::{
    CreateSnapshotRequest, DeleteSnapshotRequest, ListSnapshotsRequest, Snapshot,
};

/// The node whose agent holds a content's snapshot (its name, as a restore
/// reads it to know where the data is).
pub const CONTENT_NODE_LABEL: &str = crate::NODE_LABEL;
/// How often the agent looks again for the VolumeSnapshot API when the
/// cluster does not have it.
const API_RECHECK: Duration = Duration::from_secs(60);

/// The name of the snapshot of a dynamic content: stable for the
/// VolumeSnapshot (its uid), as upstream names it.
fn snapshot_name(content: &VolumeSnapshotContent) -> Option<String> {
    content
        .spec
        .volume_snapshot_ref
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .map(|uid| format!("snapshot-{uid}"))
}

fn has_annotation(content: &VolumeSnapshotContent, key: &str) -> bool {
    content.annotations().contains_key(key)
}

/// Whether the snapshot-controller asks for the snapshot to go (upstream's
/// rule: a deleted content whose VolumeSnapshot is being deleted, or a
/// pre-provisioned one that was never bound; never while it is being
/// created).
fn should_delete(content: &VolumeSnapshotContent) -> bool {
    if content.metadata.deletion_timestamp.is_none() {
        return false;
    }
    if content.spec.source.snapshot_handle.is_some()
        && content
            .spec
            .volume_snapshot_ref
            .uid
            .as_deref()
            .unwrap_or_default()
            .is_empty()
    {
        return true;
    }
    !has_annotation(content, ANN_BEING_CREATED) && has_annotation(content, ANN_BEING_DELETED)
}

/// The local snapshot of that id, if this node holds it.
async fn local_snapshot<C: CsiController>(ctx: &Ctx<C>, id: &str) -> Option<Snapshot> {
    let req = ListSnapshotsRequest {
        snapshot_id: id.to_string(),
        ..Default::default()
    };
    ctx.csi
        .list_snapshots(tonic::Request::new(req))
        .await
        .ok()?
        .into_inner()
        .entries
        .into_iter()
        .find_map(|e| e.snapshot)
}

/// Whether this node holds snapshot `id`.
pub(crate) async fn holds_snapshot<C: CsiController>(ctx: &Ctx<C>, id: &str) -> bool {
    local_snapshot(ctx, id).await.is_some()
}

/// Runs the snapshotter until the provisioner stops. Waits for the
/// VolumeSnapshot API first: a cluster without its CRDs has no snapshots,
/// which is said once, not every few seconds.
pub(crate) async fn run<C: CsiController>(ctx: Arc<Ctx<C>>) {
    let api: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let mut said = false;
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                if !said {
                    tracing::info!(
                        "the cluster has no VolumeSnapshot API (snapshot.storage.k8s.io/v1 CRDs); snapshots are taken once it is installed"
                    );
                    said = true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list VolumeSnapshotContents"),
        }
        tokio::time::sleep(API_RECHECK).await;
    }
    // Which contents are this node's is read in its PV store: before its
    // first list, an empty store would pass over every new one.
    if ctx.volumes.wait_until_ready().await.is_err() {
        return;
    }
    tracing::info!("snapshotter started");
    Controller::new(api, watcher::Config::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "snapshot content reconcile");
            }
        })
        .await;
}

#[tracing::instrument(skip_all, fields(content = %content.name_any()))]
async fn reconcile<C: CsiController>(
    content: Arc<VolumeSnapshotContent>,
    ctx: Arc<Ctx<C>>,
) -> Result<Action, Error> {
    if content.spec.driver != crate::DRIVER_NAME {
        return Ok(Action::await_change());
    }
    let node = ctx.config.node.clone();
    let handle = content
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
        .or_else(|| content.spec.source.snapshot_handle.clone());
    let labelled_here = content.labels().get(CONTENT_NODE_LABEL) == Some(&node);

    if should_delete(&content) {
        let held = match &handle {
            Some(h) => holds_snapshot(&ctx, h).await,
            None => false,
        };
        if !held && !labelled_here {
            return Ok(Action::await_change());
        }
        if held && content.spec.deletion_policy == "Delete" {
            let id = handle.clone().unwrap_or_default();
            let req = DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            };
            if let Err(status) = ctx.csi.delete_snapshot(tonic::Request::new(req)).await {
                ctx.content_event(
                    &content,
                    EventType::Warning,
                    "SnapshotDeleteError",
                    format!(
                        "node {node} could not delete snapshot {id}: {}; the VolumeSnapshotContent keeps its finalizer and Stead retries with a backoff (up to 5 min); the agent's log on node {node} tells more",
                        status.message()
                    ),
                );
                return Err(csi_error("DeleteSnapshot", &id, &node, status));
            }
            tracing::info!(snapshot.id = %id, node = %node, "snapshot deleted for its content");
            ctx.capacity_changed.notify_one();
        }
        remove_finalizer(&ctx, &content).await?;
        ctx.succeeded(&content.uid().unwrap_or_default());
        return Ok(Action::await_change());
    }
    if content.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ready = content
        .status
        .as_ref()
        .and_then(|s| s.ready_to_use)
        .unwrap_or(false);

    // A dynamic content without a snapshot yet: the source's node takes it.
    if let (Some(volume), None) = (&content.spec.source.volume_handle, &handle) {
        let here = ctx
            .volumes
            .get(&ObjectRef::<PersistentVolume>::new(volume))
            .is_some_and(|p| pv::pv_node(&p) == Some(node.as_str()));
        if !here {
            return Ok(Action::await_change());
        }
        return create(&ctx, &content, volume).await;
    }
    if ready {
        if has_annotation(&content, ANN_BEING_CREATED) {
            patch_meta(
                &ctx,
                &content,
                json!({"annotations": {ANN_BEING_CREATED: null}}),
            )
            .await?;
        }
        return Ok(Action::await_change());
    }
    // A pre-provisioned content (or one whose status was lost): the node
    // that holds the snapshot reports it.
    let Some(id) = handle else {
        return Ok(Action::await_change());
    };
    let Some(snap) = local_snapshot(&ctx, &id).await else {
        return Ok(Action::await_change());
    };
    patch_meta(
        &ctx,
        &content,
        json!({"labels": {CONTENT_NODE_LABEL: node}}),
    )
    .await?;
    patch_status(&ctx, &content, &snap).await?;
    ctx.succeeded(&content.uid().unwrap_or_default());
    Ok(Action::await_change())
}

/// CreateSnapshot for a dynamic content whose source is on this node.
async fn create<C: CsiController>(
    ctx: &Ctx<C>,
    content: &VolumeSnapshotContent,
    volume: &str,
) -> Result<Action, Error> {
    let node = ctx.config.node.clone();
    let Some(name) = snapshot_name(content) else {
        ctx.content_event(
            content,
            EventType::Warning,
            "SnapshotCreationFailed",
            "spec.volumeSnapshotRef.uid is missing; the snapshot cannot be named".into(),
        );
        return Ok(Action::await_change());
    };
    let parameters = match class_parameters(ctx, content).await? {
        Ok(p) => p,
        Err(note) => {
            ctx.content_event(content, EventType::Warning, "SnapshotCreationFailed", note);
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    // Said before the snapshot exists, as upstream does: the
    // snapshot-controller then does not delete the content under it.
    patch_meta(
        ctx,
        content,
        json!({"labels": {CONTENT_NODE_LABEL: node}, "annotations": {ANN_BEING_CREATED: "yes"}}),
    )
    .await?;
    let req = CreateSnapshotRequest {
        source_volume_id: volume.to_string(),
        name: name.clone(),
        parameters,
        ..Default::default()
    };
    let snap = match ctx.csi.create_snapshot(tonic::Request::new(req)).await {
        Ok(r) => r.into_inner().snapshot.unwrap_or_default(),
        Err(status) => {
            let next = if final_code(status.code()) {
                "Stead retries with a backoff (up to 5 min), which fails the same way until the VolumeSnapshotClass or the source volume changes: fix it, or delete this VolumeSnapshot and take a new one"
            } else {
                "Stead retries with a backoff (up to 5 min)"
            };
            let message = format!(
                "node {node} could not snapshot volume {volume} as {name}: {}; {next}",
                status.message()
            );
            ctx.content_event(
                content,
                EventType::Warning,
                "SnapshotCreationFailed",
                message.clone(),
            );
            patch_status_error(ctx, content, &message).await?;
            // A refusal is final: the annotation goes, so that the content
            // may be deleted. Anything else may still be in progress.
            if final_code(status.code()) {
                patch_meta(
                    ctx,
                    content,
                    json!({"annotations": {ANN_BEING_CREATED: null}}),
                )
                .await?;
            }
            return Err(csi_error("CreateSnapshot", volume, &node, status));
        }
    };
    patch_status(ctx, content, &snap).await?;
    patch_meta(
        ctx,
        content,
        json!({"annotations": {ANN_BEING_CREATED: null}}),
    )
    .await?;
    ctx.succeeded(&content.uid().unwrap_or_default());
    ctx.capacity_changed.notify_one();
    tracing::info!(snapshot.id = %snap.snapshot_id, volume.id = %volume, node = %node, bytes = snap.size_bytes, "snapshot taken for its content");
    ctx.content_event(
        content,
        EventType::Normal,
        "SnapshotCreated",
        format!(
            "node {node} took snapshot {} of volume {volume} ({} bytes to restore)",
            snap.snapshot_id, snap.size_bytes
        ),
    );
    Ok(Action::await_change())
}

/// The codes after which CreateSnapshot is known not to be running any
/// more (upstream's list of non-final codes is the complement).
fn final_code(code: tonic::Code) -> bool {
    use tonic::Code::*;
    !matches!(
        code,
        Cancelled | DeadlineExceeded | Unavailable | ResourceExhausted | Aborted
    )
}

/// The content's class parameters meant for the driver; `Err` with a note
/// when the class is missing or is another driver's.
async fn class_parameters<C: CsiController>(
    ctx: &Ctx<C>,
    content: &VolumeSnapshotContent,
) -> Result<Result<std::collections::HashMap<String, String>, String>, Error> {
    let Some(class_name) = content.spec.volume_snapshot_class_name.as_deref() else {
        return Ok(Ok(Default::default()));
    };
    let api: Api<VolumeSnapshotClass> = Api::all(ctx.client.clone());
    let Some(class) = api.get_opt(class_name).await? else {
        return Ok(Err(format!(
            "VolumeSnapshotClass {class_name} does not exist"
        )));
    };
    if class.driver != crate::DRIVER_NAME {
        return Ok(Err(format!(
            "VolumeSnapshotClass {class_name} is for driver {:?}, not {}",
            class.driver,
            crate::DRIVER_NAME
        )));
    }
    Ok(Ok(class
        .parameters
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .collect()))
}

async fn patch_meta<C>(
    ctx: &Ctx<C>,
    content: &VolumeSnapshotContent,
    metadata: serde_json::Value,
) -> Result<(), Error> {
    let api: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    api.patch(
        &content.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({ "metadata": metadata })),
    )
    .await?;
    Ok(())
}

async fn patch_status<C>(
    ctx: &Ctx<C>,
    content: &VolumeSnapshotContent,
    snap: &Snapshot,
) -> Result<(), Error> {
    let created = snap.creation_time.as_ref().map(|t| {
        t.seconds
            .saturating_mul(1_000_000_000)
            .saturating_add(i64::from(t.nanos))
    });
    let api: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    api.patch_status(
        &content.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {
            "snapshotHandle": snap.snapshot_id,
            "creationTime": created,
            "restoreSize": snap.size_bytes,
            "readyToUse": snap.ready_to_use,
            "error": null,
        }})),
    )
    .await?;
    Ok(())
}

async fn patch_status_error<C>(
    ctx: &Ctx<C>,
    content: &VolumeSnapshotContent,
    message: &str,
) -> Result<(), Error> {
    let api: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let now = k8s_openapi::jiff::Timestamp::now();
    api.patch_status(
        &content.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {
            "readyToUse": false,
            "error": {"message": message, "time": now.to_string()},
        }})),
    )
    .await?;
    Ok(())
}

/// Removes the snapshot-controller's finalizer, guarded by the
/// resourceVersion the decision was made on.
async fn remove_finalizer<C>(ctx: &Ctx<C>, content: &VolumeSnapshotContent) -> Result<(), Error> {
    let finalizers = content.finalizers();
    if !finalizers.iter().any(|f| f == CONTENT_FINALIZER) {
        return Ok(());
    }
    let kept: Vec<&String> = finalizers
        .iter()
        .filter(|f| *f != CONTENT_FINALIZER)
        .collect();
    let api: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    match api
        .patch(
            &content.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {
                "resourceVersion": content.resource_version(),
                "finalizers": kept,
            }})),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Changed meanwhile: the watch brings the new version.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn error_policy<C: CsiController>(
    content: Arc<VolumeSnapshotContent>,
    err: &Error,
    ctx: Arc<Ctx<C>>,
) -> Action {
    let wait = ctx.failed("snapshot", content.uid(), err);
    tracing::warn!(content = %content.name_any(), error = %err, retry_in = ?wait, "snapshot content failed");
    Action::requeue(wait)
}

impl<C> Ctx<C> {
    /// Queues an event on a VolumeSnapshotContent.
    fn content_event(
        &self,
        content: &VolumeSnapshotContent,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.events
            .post(content.object_ref(&()), type_, reason, "Snapshot", note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap;

    fn content(
        annotations: &[(&str, &str)],
        deleted: bool,
        preprovisioned: bool,
    ) -> VolumeSnapshotContent {
        let mut c = VolumeSnapshotContent::default();
        c.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        );
        if deleted {
            c.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        }
        if preprovisioned {
            c.spec.source.snapshot_handle = Some("snapshot-x".into());
        } else {
            c.spec.source.volume_handle = Some("pvc-x".into());
            c.spec.volume_snapshot_ref.uid = Some("u".into());
        }
        c
    }

    #[test]
    fn deletion_follows_the_snapshot_controllers_annotations() {
        assert!(!should_delete(&content(
            &[(ANN_BEING_DELETED, "yes")],
            false,
            false
        )));
        assert!(should_delete(&content(
            &[(ANN_BEING_DELETED, "yes")],
            true,
            false
        )));
        // Not while CreateSnapshot may be running.
        assert!(!should_delete(&content(
            &[(ANN_BEING_DELETED, "yes"), (ANN_BEING_CREATED, "yes")],
            true,
            false
        )));
        assert!(!should_delete(&content(&[], true, false)));
        // A pre-provisioned content never bound to a VolumeSnapshot.
        assert!(should_delete(&content(&[], true, true)));
    }

    #[test]
    fn snapshots_are_named_by_their_volume_snapshot() {
        assert_eq!(
            snapshot_name(&content(&[], false, false)).as_deref(),
            Some("snapshot-u")
        );
        assert_eq!(snapshot_name(&content(&[], false, true)), None);
        assert!(final_code(tonic::Code::InvalidArgument));
        assert!(!final_code(tonic::Code::Aborted));
    }
}
