//! CSI Node service: parse the request, call [`crate::storage::attach`]
//! under the volume's lock, map the outcome. The state machine of stage,
//! publish, unpublish, unstage and filesystem growth lives in storage.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::capability;
use super::error::{Error, Result};
use super::{Shared, blocking, outcome, volume_id};
use crate::proto::csi::v1::node_server::Node;
use crate::proto::csi::v1::node_service_capability::{Rpc, Type as CapType, rpc};
use crate::proto::csi::v1::volume_usage::Unit;
use crate::proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, VolumeCondition, VolumeUsage,
};
use crate::storage::Capability;
use crate::storage::attach::stats::{Counts, Probe, VolumeStats};
use crate::storage::attach::{self, Publish};

/// How old the measurement of a `dir` volume's tree may be before a stats
/// call queues a new one (kubelet asks every minute by default).
const TREE_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// The Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    shared: Arc<Shared>,
}

impl NodeService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Validates the form of a staging or target path from a request:
/// required, absolute, without `.`/`..` components or NUL. Where it may lie
/// and what it may be is checked by storage at the moment of use
/// ([`attach::Confinement`]).
pub(crate) fn checked_path(raw: &str, field: &'static str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::missing(field));
    }
    if raw.contains('\0') {
        return Err(Error::invalid(field, "contains a NUL byte"));
    }
    let path = PathBuf::from(raw);
    if !path.is_absolute() {
        return Err(Error::invalid(
            field,
            format!("{raw:?} is not an absolute path"),
        ));
    }
    if raw.split('/').any(|c| c == "." || c == "..") {
        return Err(Error::invalid(
            field,
            format!("{raw:?} contains '.' or '..'"),
        ));
    }
    // Normalize away duplicate and trailing slashes for comparisons.
    Ok(path.components().collect())
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_response(stats: VolumeStats) -> NodeGetVolumeStatsResponse {
    let usage = |c: Counts, unit: Unit| VolumeUsage {
        total: clamp(c.total),
        available: clamp(c.available),
        used: clamp(c.used),
        unit: unit as i32,
    };
    let condition = match &stats.abnormal {
        Some(why) => VolumeCondition {
            abnormal: true,
            message: why.clone(),
        },
        None => VolumeCondition {
            abnormal: false,
            message: "volume is attached and mounted".into(),
        },
    };
    NodeGetVolumeStatsResponse {
        usage: stats
            .bytes
            .map(|c| usage(c, Unit::Bytes))
            .into_iter()
            .chain(stats.inodes.map(|c| usage(c, Unit::Inodes)))
            .collect(),
        volume_condition: Some(condition),
    }
}

fn capabilities() -> NodeGetCapabilitiesResponse {
    let cap = |t: rpc::Type| NodeServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    };
    NodeGetCapabilitiesResponse {
        capabilities: vec![
            cap(rpc::Type::StageUnstageVolume),
            cap(rpc::Type::GetVolumeStats),
            cap(rpc::Type::ExpandVolume),
            cap(rpc::Type::VolumeCondition),
            cap(rpc::Type::SingleNodeMultiWriter),
        ],
    }
}

fn required_cap(cap: Option<&crate::proto::csi::v1::VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::missing("volume_capability"))?;
    capability::parse(cap, "volume_capability")
}

impl NodeService {
    async fn do_stage(&self, req: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
        let cap = required_cap(req.volume_capability.as_ref())?;
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            Ok(attach::stage(&s.store, &s.paths, &meta, &staging, &cap)?)
        })
        .await?;
        Ok(NodeStageVolumeResponse {})
    }

    async fn do_unstage(&self, req: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            Ok(attach::unstage(&s.store, &s.paths, &meta, &staging)?)
        })
        .await?;
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn do_publish(&self, req: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let target = checked_path(&req.target_path, "target_path")?;
        let cap = required_cap(req.volume_capability.as_ref())?;
        // Stead advertises STAGE_UNSTAGE_VOLUME, so the CO always stages first.
        let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
        if staging == target {
            return Err(Error::invalid(
                "target_path",
                "must differ from staging_target_path",
            ));
        }
        let publish = Publish {
            staging,
            target,
            cap,
            readonly: req.readonly,
        };
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            Ok(attach::publish(&s.store, &s.paths, &meta, &publish)?)
        })
        .await?;
        Ok(NodePublishVolumeResponse {})
    }

    async fn do_unpublish(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let target = checked_path(&req.target_path, "target_path")?;
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            Ok(attach::unpublish(&s.store, &s.paths, &meta, &target)?)
        })
        .await?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn do_stats(&self, req: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        let id = volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(Error::missing("volume_path"));
        }
        let path = PathBuf::from(&req.volume_path);
        // The node record is read under the volume's lock, like every
        // other reader and writer of it; the tree of a `dir` volume is
        // measured after the lock is released, by the usage meter.
        let probe = {
            let _guard = self.shared.locks.lock(&id).await;
            let s = self.shared.clone();
            blocking(move || {
                let meta = s.store.require(&id)?;
                Ok(attach::stats::probe(&s.store, &meta, &path)?)
            })
            .await?
        };
        let stats = match probe {
            Probe::Done(stats) => stats,
            Probe::Tree(pending) => {
                let usage = self
                    .shared
                    .store
                    .usage()
                    .measure(&pending.id, pending.data.clone(), TREE_MAX_AGE)
                    .await;
                pending.finish(usage)
            }
        };
        Ok(to_response(stats))
    }

    async fn do_expand(&self, req: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(Error::missing("volume_path"));
        }
        let required = match &req.capacity_range {
            Some(r) => {
                crate::storage::pool::check_range(r.required_bytes, r.limit_bytes)
                    .map_err(|e| Error::invalid("capacity_range", e.to_string()))?
                    .0
            }
            None => 0,
        };
        let path = PathBuf::from(&req.volume_path);
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        let capacity = blocking(move || {
            let meta = s.store.require(&id)?;
            Ok(attach::expand_filesystem(&s.store, &meta, &path, required)?)
        })
        .await?;
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: clamp(capacity),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodeStageVolume",
            &id,
            self.do_stage(req)
                .instrument(super::span("NodeStageVolume", &id))
                .await,
            false,
        )
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodeUnstageVolume",
            &id,
            self.do_unstage(req)
                .instrument(super::span("NodeUnstageVolume", &id))
                .await,
            false,
        )
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodePublishVolume",
            &id,
            self.do_publish(req)
                .instrument(super::span("NodePublishVolume", &id))
                .await,
            false,
        )
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodeUnpublishVolume",
            &id,
            self.do_unpublish(req)
                .instrument(super::span("NodeUnpublishVolume", &id))
                .await,
            false,
        )
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodeGetVolumeStats",
            &id,
            self.do_stats(req)
                .instrument(super::span("NodeGetVolumeStats", &id))
                .await,
            true,
        )
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodeExpandVolume",
            &id,
            self.do_expand(req)
                .instrument(super::span("NodeExpandVolume", &id))
                .await,
            false,
        )
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.shared.node_id.clone(),
            max_volumes_per_node: self.shared.max_volumes_per_node,
            accessible_topology: Some(capability::node_topology(&self.shared.node_id)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::{Config, Plugin};
    use crate::storage::{AccessKind, BackendKind, FsType, NewVolume, PoolSpec, VolumeId};

    #[tokio::test]
    async fn stats_wait_for_the_volume_lock_like_every_reader_of_the_node_record() {
        let tmp = tempfile::tempdir().unwrap();
        let plugin = Plugin::new(Config {
            node_id: "n".into(),
            pools: vec![
                PoolSpec::new("d", BackendKind::Dir, tmp.path().join("pool"))
                    .with_reserve(crate::storage::Reserve::Bytes(0)),
            ],
            max_volumes_per_node: None,
            kubelet_dir: tmp.path().join("kubelet"),
        })
        .unwrap();
        let id = VolumeId::parse("v").unwrap();
        plugin
            .shared
            .store
            .create(&NewVolume {
                id: id.clone(),
                pool: None,
                access: AccessKind::Mount {
                    fs_type: FsType::Ext4,
                },
                required: 1 << 20,
                limit: 0,
                allocation: None,
            })
            .unwrap();
        let svc = NodeService::new(plugin.shared.clone());
        // Another RPC of the volume (a publish rewriting its record) runs.
        let guard = plugin.shared.locks.lock(&id).await;
        let req = NodeGetVolumeStatsRequest {
            volume_id: "v".into(),
            volume_path: tmp
                .path()
                .join("kubelet/pods/x/mount")
                .display()
                .to_string(),
            staging_target_path: String::new(),
        };
        let mut stats = Box::pin(svc.do_stats(req));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), &mut stats)
                .await
                .is_err(),
            "stats read the node record while another RPC held the volume"
        );
        drop(guard);
        let e = stats.await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    }

    #[test]
    fn paths_are_checked() {
        assert!(checked_path("", "target_path").is_err());
        assert!(checked_path("relative/x", "target_path").is_err());
        assert!(checked_path("/a/../etc", "target_path").is_err());
        assert!(checked_path("/a/./b", "target_path").is_err());
        assert!(checked_path("/a\0b", "target_path").is_err());
        assert_eq!(
            checked_path("/a//b/", "target_path").unwrap(),
            PathBuf::from("/a/b")
        );
    }
}
