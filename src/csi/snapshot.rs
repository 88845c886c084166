//! The snapshot RPCs of the Controller service (CreateSnapshot,
//! DeleteSnapshot, ListSnapshots, GetSnapshot) and the content source of
//! CreateVolume: requests parsed and checked here, the work done by
//! [`crate::storage::snapshot`].

use std::sync::Arc;

use super::error::{Error, Result};
use super::locks::VolumeGuard;
use super::{Shared, blocking};
use crate::proto::csi::v1::volume_content_source::{
    SnapshotSource, Type as SourceType, VolumeSource,
};
use crate::proto::csi::v1::{
    self as csi, CreateSnapshotRequest, CreateSnapshotResponse, DeleteSnapshotRequest,
    DeleteSnapshotResponse, GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest,
    ListSnapshotsResponse, list_snapshots_response,
};
use crate::storage::{ContentSource, SnapshotMeta, VolumeId};

/// Prefix of ListSnapshots page tokens; anything else is refused as ABORTED.
const TOKEN_PREFIX: &str = "after-snapshot:";

/// The CSI view of a stored snapshot.
pub(super) fn to_csi(s: &SnapshotMeta) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: i64::try_from(s.size_bytes).unwrap_or(i64::MAX),
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_secs,
            nanos: s.created_nanos,
        }),
        // The copy is complete when the record exists: nothing is cut or
        // uploaded afterwards.
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

/// Parses CreateVolume's `volume_content_source`.
pub(super) fn parse_source(
    src: &Option<csi::VolumeContentSource>,
) -> Result<Option<ContentSource>> {
    let Some(src) = src else {
        return Ok(None);
    };
    match &src.r#type {
        Some(SourceType::Snapshot(SnapshotSource { snapshot_id })) => {
            if snapshot_id.is_empty() {
                return Err(Error::missing("volume_content_source.snapshot.snapshot_id"));
            }
            // An id Stead would never issue names no snapshot of Stead's.
            VolumeId::parse(snapshot_id)
                .map(|id| Some(ContentSource::Snapshot(id)))
                .map_err(|e| {
                    Error::NotFound(format!(
                        "volume_content_source.snapshot.snapshot_id: no such snapshot ({e})"
                    ))
                })
        }
        Some(SourceType::Volume(VolumeSource { volume_id })) => {
            if volume_id.is_empty() {
                return Err(Error::missing("volume_content_source.volume.volume_id"));
            }
            VolumeId::parse(volume_id)
                .map(|id| Some(ContentSource::Volume(id)))
                .map_err(|e| {
                    Error::NotFound(format!(
                        "volume_content_source.volume.volume_id: no such volume ({e})"
                    ))
                })
        }
        None => Err(Error::invalid(
            "volume_content_source",
            "names neither a snapshot nor a volume",
        )),
    }
}

/// The content source of a created volume, for CreateVolume's answer.
pub(super) fn source_to_csi(s: &ContentSource) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            ContentSource::Volume(id) => SourceType::Volume(VolumeSource {
                volume_id: id.to_string(),
            }),
        }),
    }
}

/// Takes the locks a create from `source` needs besides the new volume's:
/// the snapshot's (so that it is not deleted during the copy) or the source
/// volume's (so that it is not unstaged or deleted during the copy).
/// Volume locks are taken in id order, so two creates that each name the
/// other as source cannot wait on each other.
pub(super) async fn lock_for_create(
    shared: &Shared,
    id: &VolumeId,
    source: Option<&ContentSource>,
) -> Vec<VolumeGuard> {
    match source {
        None => vec![shared.locks.lock(id).await],
        Some(ContentSource::Snapshot(s)) => {
            vec![
                shared.locks.lock(id).await,
                shared.snapshot_locks.lock(s).await,
            ]
        }
        Some(ContentSource::Volume(v)) if v == id => vec![shared.locks.lock(id).await],
        Some(ContentSource::Volume(v)) => {
            let (first, second) = if id < v { (id, v) } else { (v, id) };
            vec![
                shared.locks.lock(first).await,
                shared.locks.lock(second).await,
            ]
        }
    }
}

fn snapshot_name(raw: &str, field: &'static str) -> Result<VolumeId> {
    if raw.is_empty() {
        return Err(Error::missing(field));
    }
    VolumeId::parse(raw).map_err(|e| Error::invalid(field, e.to_string()))
}

pub(super) async fn create(
    shared: Arc<Shared>,
    req: CreateSnapshotRequest,
) -> Result<CreateSnapshotResponse> {
    let id = snapshot_name(&req.name, "name")?;
    let source = snapshot_name(&req.source_volume_id, "source_volume_id")?;
    if let Some(key) = req.parameters.keys().next() {
        return Err(Error::invalid(
            "parameters",
            format!("{key:?} is not a snapshot parameter of Stead (it takes none)"),
        ));
    }
    let _snap = shared.snapshot_locks.lock(&id).await;
    let _vol = shared.locks.lock(&source).await;
    let s = shared.clone();
    let (snap, taken) = blocking(move || Ok(s.store.create_snapshot(&id, &source)?)).await?;
    if taken {
        tracing::info!(snapshot.id = %snap.id, volume.id = %snap.source, pool = %snap.pool,
            method = ?snap.method, bytes = snap.allocated_bytes, "snapshot taken");
    }
    Ok(CreateSnapshotResponse {
        snapshot: Some(to_csi(&snap)),
    })
}

pub(super) async fn delete(
    shared: Arc<Shared>,
    req: DeleteSnapshotRequest,
) -> Result<DeleteSnapshotResponse> {
    let id = snapshot_name(&req.snapshot_id, "snapshot_id")?;
    let _snap = shared.snapshot_locks.lock(&id).await;
    let s = shared.clone();
    blocking(move || {
        if let Some(snap) = s.store.snapshot(&id)
            && s.store.delete_snapshot(&id)?
        {
            tracing::info!(snapshot.id = %id, pool = %snap.pool, "snapshot deleted");
        }
        Ok(())
    })
    .await?;
    Ok(DeleteSnapshotResponse {})
}

pub(super) fn list(shared: &Shared, req: &ListSnapshotsRequest) -> Result<ListSnapshotsResponse> {
    let max = usize::try_from(req.max_entries)
        .map_err(|_| Error::invalid("max_entries", format!("{} is negative", req.max_entries)))?;
    let empty = ListSnapshotsResponse {
        entries: Vec::new(),
        next_token: String::new(),
    };
    let entry = |s: &SnapshotMeta| list_snapshots_response::Entry {
        snapshot: Some(to_csi(s)),
    };
    if !req.snapshot_id.is_empty() {
        // One snapshot or none; an id Stead would not issue matches none.
        let found = VolumeId::parse(&req.snapshot_id)
            .ok()
            .and_then(|id| shared.store.snapshot(&id))
            .filter(|s| {
                req.source_volume_id.is_empty() || s.source.as_str() == req.source_volume_id
            });
        return Ok(ListSnapshotsResponse {
            entries: found.iter().map(entry).collect(),
            next_token: String::new(),
        });
    }
    let source = if req.source_volume_id.is_empty() {
        None
    } else {
        match VolumeId::parse(&req.source_volume_id) {
            Ok(id) => Some(id),
            Err(_) => return Ok(empty),
        }
    };
    let after = if req.starting_token.is_empty() {
        None
    } else {
        let id = req
            .starting_token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|raw| VolumeId::parse(raw).ok())
            .ok_or_else(|| {
                Error::Aborted(format!(
                    "starting_token {:?} was not issued by this plugin",
                    req.starting_token
                ))
            })?;
        Some(id)
    };
    let (page, more) = shared
        .store
        .list_snapshots(source.as_ref(), after.as_ref(), max);
    let next_token = match (more, page.last()) {
        (true, Some(last)) => format!("{TOKEN_PREFIX}{}", last.id),
        _ => String::new(),
    };
    Ok(ListSnapshotsResponse {
        entries: page.iter().map(entry).collect(),
        next_token,
    })
}

pub(super) fn get(shared: &Shared, req: &GetSnapshotRequest) -> Result<GetSnapshotResponse> {
    let id = snapshot_name(&req.snapshot_id, "snapshot_id")?;
    let snap = shared
        .store
        .snapshot(&id)
        .ok_or_else(|| Error::NotFound(format!("snapshot {id} not found")))?;
    Ok(GetSnapshotResponse {
        snapshot: Some(to_csi(&snap)),
    })
}
