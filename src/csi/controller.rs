//! CSI Controller service: create, delete, list, validate, expand volumes
//! and report capacity — all local to this node.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::error::{Error, Result};
use super::{Shared, blocking, outcome, volume_id};
use super::{capability, snapshot};
use crate::proto::csi::v1::controller_server::Controller;
use crate::proto::csi::v1::controller_service_capability::{Rpc, Type as CapType, rpc};
use crate::proto::csi::v1::validate_volume_capabilities_response::Confirmed;
use crate::proto::csi::v1::{
    self as csi, ControllerExpandVolumeRequest, ControllerExpandVolumeResponse,
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerGetVolumeRequest, ControllerGetVolumeResponse, ControllerModifyVolumeRequest,
    ControllerModifyVolumeResponse, ControllerPublishVolumeRequest,
    ControllerPublishVolumeResponse, ControllerServiceCapability, ControllerUnpublishVolumeRequest,
    ControllerUnpublishVolumeResponse, CreateSnapshotRequest, CreateSnapshotResponse,
    CreateVolumeRequest, CreateVolumeResponse, DeleteSnapshotRequest, DeleteSnapshotResponse,
    DeleteVolumeRequest, DeleteVolumeResponse, GetCapacityRequest, GetCapacityResponse,
    GetSnapshotRequest, GetSnapshotResponse, ListSnapshotsRequest, ListSnapshotsResponse,
    ListVolumesRequest, ListVolumesResponse, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse, list_volumes_response,
};
use crate::storage::{AccessKind, BackendKind, NewVolume, VolumeId, VolumeMeta, attach, pool};

/// Key of the volume context entry naming the pool.
pub const CONTEXT_POOL: &str = "pool";
/// Key of the volume context entry naming the backend.
pub const CONTEXT_BACKEND: &str = "backend";

/// Prefix of ListVolumes page tokens; anything else is refused as ABORTED.
const TOKEN_PREFIX: &str = "after:";

/// The Controller service. Cheap to clone; the provisioner calls it
/// in-process through the generated `Controller` trait.
#[derive(Debug, Clone)]
pub struct ControllerService {
    shared: Arc<Shared>,
}

impl ControllerService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The CSI view of a stored volume.
pub(super) fn to_csi(meta: &VolumeMeta, node_id: &str) -> csi::Volume {
    let mut context = HashMap::from([
        (CONTEXT_POOL.to_owned(), meta.pool.clone()),
        (CONTEXT_BACKEND.to_owned(), meta.backend.as_str().to_owned()),
    ]);
    if let AccessKind::Mount { fs_type } = meta.access {
        context.insert("fsType".to_owned(), fs_type.as_str().to_owned());
    }
    csi::Volume {
        capacity_bytes: i64::try_from(meta.capacity_bytes).unwrap_or(i64::MAX),
        volume_id: meta.id.to_string(),
        volume_context: context,
        content_source: meta.source.as_ref().map(snapshot::source_to_csi),
        accessible_topology: vec![capability::node_topology(node_id)],
    }
}

fn bytes_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn create(shared: Arc<Shared>, req: CreateVolumeRequest) -> Result<CreateVolumeResponse> {
    if req.name.is_empty() {
        return Err(Error::missing("name"));
    }
    let id = VolumeId::parse(&req.name).map_err(|e| Error::invalid("name", e.to_string()))?;
    let caps = capability::parse_all(&req.volume_capabilities, "volume_capabilities")?;
    let pool = capability::parse_parameters(&req.parameters)?;
    let source = snapshot::parse_source(&req.volume_content_source)?;
    if !req.mutable_parameters.is_empty() {
        return Err(Error::invalid(
            "mutable_parameters",
            "volume attribute classes are not supported",
        ));
    }
    let (required, limit) = match &req.capacity_range {
        Some(r) => pool::check_range(r.required_bytes, r.limit_bytes)
            .map_err(|e| Error::invalid("capacity_range", e.to_string()))?,
        None => (0, 0),
    };
    if let Some(topo) = &req.accessibility_requirements
        && !topo.requisite.is_empty()
        && !topo
            .requisite
            .iter()
            .any(|t| capability::is_this_node(t, &shared.node_id))
    {
        return Err(Error::ResourceExhausted(format!(
            "volume {id}: accessibility_requirements.requisite does not include this node ({}={}); Stead creates volumes only on the node that serves the request",
            crate::TOPOLOGY_KEY,
            shared.node_id
        )));
    }
    let new = NewVolume {
        id: id.clone(),
        pool,
        access: caps[0].access,
        required,
        limit,
    };
    let _guards = snapshot::lock_for_create(&shared, &id, source.as_ref()).await;
    let s = shared.clone();
    let (meta, created) = blocking(move || Ok(s.store.create_from(&new, source.as_ref())?)).await?;
    if created {
        match &meta.source {
            None => tracing::info!(volume.id = %meta.id, pool = %meta.pool,
                capacity = meta.capacity_bytes, "volume created"),
            Some(from) => tracing::info!(volume.id = %meta.id, pool = %meta.pool,
                capacity = meta.capacity_bytes, from = %from, "volume created from its source"),
        }
    }
    Ok(CreateVolumeResponse {
        volume: Some(to_csi(&meta, &shared.node_id)),
    })
}

async fn delete(shared: Arc<Shared>, req: DeleteVolumeRequest) -> Result<DeleteVolumeResponse> {
    let id = volume_id(&req.volume_id)?;
    let _guard = shared.locks.lock(&id).await;
    let s = shared.clone();
    blocking(move || {
        let Some(meta) = s.store.get(&id) else {
            // DeleteVolume is idempotent: a volume that is gone is deleted.
            return Ok(());
        };
        attach::ensure_unused(&s.store, &meta)?;
        if s.store.delete(&id)? {
            tracing::info!(volume.id = %id, pool = %meta.pool, "volume deleted");
        }
        Ok(())
    })
    .await?;
    Ok(DeleteVolumeResponse {})
}

async fn validate(
    shared: Arc<Shared>,
    req: ValidateVolumeCapabilitiesRequest,
) -> Result<ValidateVolumeCapabilitiesResponse> {
    let id = volume_id(&req.volume_id)?;
    if req.volume_capabilities.is_empty() {
        return Err(Error::missing("volume_capabilities"));
    }
    let meta = shared.store.require(&id)?;
    let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
        confirmed: None,
        message,
    };
    let caps = match capability::parse_all(&req.volume_capabilities, "volume_capabilities") {
        Ok(c) => c,
        Err(e) => return Ok(unconfirmed(e.to_string())),
    };
    if let Err(e) = attach::check_access(&meta, &caps[0]) {
        return Ok(unconfirmed(e.to_string()));
    }
    match capability::parse_parameters(&req.parameters) {
        Ok(Some(p)) if p != meta.pool => {
            return Ok(unconfirmed(format!(
                "volume {id} is in pool {}, not {p}",
                meta.pool
            )));
        }
        Ok(_) => {}
        Err(e) => return Ok(unconfirmed(e.to_string())),
    }
    if !req.mutable_parameters.is_empty() {
        return Ok(unconfirmed(
            "volume attribute classes are not supported".into(),
        ));
    }
    Ok(ValidateVolumeCapabilitiesResponse {
        confirmed: Some(Confirmed {
            volume_context: req.volume_context,
            volume_capabilities: req.volume_capabilities,
            parameters: req.parameters,
            mutable_parameters: HashMap::new(),
        }),
        message: String::new(),
    })
}

fn list(shared: &Shared, req: &ListVolumesRequest) -> Result<ListVolumesResponse> {
    let max = usize::try_from(req.max_entries)
        .map_err(|_| Error::invalid("max_entries", format!("{} is negative", req.max_entries)))?;
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
    // Tokens name the last id returned, not a position, so volumes created
    // or deleted between pages neither shift nor invalidate them.
    let (page, more) = shared.store.list(after.as_ref(), max);
    let next_token = match (more, page.last()) {
        (true, Some(last)) => format!("{TOKEN_PREFIX}{}", last.id),
        _ => String::new(),
    };
    Ok(ListVolumesResponse {
        entries: page
            .iter()
            .map(|m| list_volumes_response::Entry {
                volume: Some(to_csi(m, &shared.node_id)),
                status: None,
            })
            .collect(),
        next_token,
    })
}

async fn capacity(shared: Arc<Shared>, req: GetCapacityRequest) -> Result<GetCapacityResponse> {
    let pool_name = capability::parse_parameters(&req.parameters)?;
    let caps = req
        .volume_capabilities
        .iter()
        .map(|c| capability::parse(c, "volume_capabilities"))
        .collect::<Result<Vec<_>>>()?;
    let none = GetCapacityResponse {
        available_capacity: 0,
        maximum_volume_size: None,
        minimum_volume_size: None,
    };
    if let Some(t) = &req.accessible_topology
        && !capability::is_this_node(t, &shared.node_id)
    {
        return Ok(none);
    }
    // A pool this node does not have offers nothing here (other nodes may
    // have it); that is capacity 0, not an error.
    let Ok(pool) = shared.store.pool(pool_name.as_deref()) else {
        return Ok(none);
    };
    if caps
        .iter()
        .any(|c| c.access == AccessKind::Block && !pool.backend.supports_block())
    {
        return Ok(none);
    }
    let access = caps.first().map(|c| c.access);
    let pool_name = pool.name.clone();
    let s = shared.clone();
    let cap = blocking(move || {
        let pool = s.store.pool(Some(&pool_name))?;
        Ok(s.store.capacity(pool, access)?)
    })
    .await?;
    Ok(GetCapacityResponse {
        available_capacity: bytes_i64(cap.available),
        maximum_volume_size: Some(bytes_i64(cap.available)),
        minimum_volume_size: Some(bytes_i64(cap.minimum)),
    })
}

async fn expand(
    shared: Arc<Shared>,
    req: ControllerExpandVolumeRequest,
) -> Result<ControllerExpandVolumeResponse> {
    let id = volume_id(&req.volume_id)?;
    let Some(range) = req.capacity_range else {
        return Err(Error::missing("capacity_range"));
    };
    let (required, limit) = pool::check_range(range.required_bytes, range.limit_bytes)
        .map_err(|e| Error::invalid("capacity_range", e.to_string()))?;
    let _guard = shared.locks.lock(&id).await;
    let s = shared.clone();
    let meta = blocking(move || Ok(s.store.expand(&id, required, limit)?)).await?;
    // The filesystem of a mounted image volume grows on the node; a block
    // device is grown here already (its loop device refreshed if attached);
    // a directory has nothing to grow.
    let node_expansion_required =
        meta.backend == BackendKind::Image && matches!(meta.access, AccessKind::Mount { .. });
    Ok(ControllerExpandVolumeResponse {
        capacity_bytes: bytes_i64(meta.capacity_bytes),
        node_expansion_required,
    })
}

fn capabilities() -> ControllerGetCapabilitiesResponse {
    let cap = |t: rpc::Type| ControllerServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    };
    ControllerGetCapabilitiesResponse {
        capabilities: vec![
            cap(rpc::Type::CreateDeleteVolume),
            cap(rpc::Type::ListVolumes),
            cap(rpc::Type::GetCapacity),
            cap(rpc::Type::ExpandVolume),
            cap(rpc::Type::SingleNodeMultiWriter),
            cap(rpc::Type::CreateDeleteSnapshot),
            cap(rpc::Type::ListSnapshots),
            cap(rpc::Type::GetSnapshot),
            cap(rpc::Type::CloneVolume),
        ],
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        outcome(
            "CreateVolume",
            &name,
            create(self.shared.clone(), req)
                .instrument(super::span("CreateVolume", &name))
                .await,
            false,
        )
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "DeleteVolume",
            &id,
            delete(self.shared.clone(), req)
                .instrument(super::span("DeleteVolume", &id))
                .await,
            false,
        )
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Error::Unimplemented("ControllerPublishVolume").into())
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Error::Unimplemented("ControllerUnpublishVolume").into())
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "ValidateVolumeCapabilities",
            &id,
            validate(self.shared.clone(), req)
                .instrument(super::span("ValidateVolumeCapabilities", &id))
                .await,
            true,
        )
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        outcome(
            "ListVolumes",
            "",
            list(&self.shared, request.get_ref()),
            true,
        )
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        outcome(
            "GetCapacity",
            "",
            capacity(self.shared.clone(), request.into_inner())
                .instrument(super::span("GetCapacity", ""))
                .await,
            true,
        )
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        let name = req.name.clone();
        let source = req.source_volume_id.clone();
        outcome(
            "CreateSnapshot",
            &source,
            snapshot::create(self.shared.clone(), req)
                .instrument(super::span("CreateSnapshot", &name))
                .await,
            false,
        )
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        let id = req.snapshot_id.clone();
        outcome(
            "DeleteSnapshot",
            "",
            snapshot::delete(self.shared.clone(), req)
                .instrument(super::span("DeleteSnapshot", &id))
                .await,
            false,
        )
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        outcome(
            "ListSnapshots",
            "",
            snapshot::list(&self.shared, request.get_ref()),
            true,
        )
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        outcome(
            "GetSnapshot",
            "",
            snapshot::get(&self.shared, request.get_ref()),
            true,
        )
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "ControllerExpandVolume",
            &id,
            expand(self.shared.clone(), req)
                .instrument(super::span("ControllerExpandVolume", &id))
                .await,
            false,
        )
    }

    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        Err(Error::Unimplemented("ControllerGetVolume").into())
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Error::Unimplemented("ControllerModifyVolume").into())
    }
}
