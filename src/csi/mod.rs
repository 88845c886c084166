//! The CSI services: thin mapping of requests onto [`crate::storage`] and
//! [`crate::mount`], and of their errors onto gRPC codes ([`error`]).
//!
//! Build a [`Plugin`] from a [`Config`], then take its tonic services
//! ([`Plugin::identity`], [`Plugin::controller`], [`Plugin::node`]) to
//! serve, or a [`ControllerService`] to call in-process.

pub mod capability;
pub mod controller;
pub mod error;
pub mod identity;
pub mod locks;
pub mod node;
pub mod server;
pub mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;

pub use controller::ControllerService;
pub use error::{Error, Result};
pub use identity::IdentityService;
pub use node::NodeService;

use crate::proto::csi::v1::controller_server::ControllerServer;
use crate::proto::csi::v1::identity_server::IdentityServer;
use crate::proto::csi::v1::node_server::NodeServer;
use crate::storage::attach::Confinement;
use crate::storage::{self, PoolSpec, Store, VolumeId};
use locks::VolumeLocks;

/// What the plugin needs to run on a node.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Kubernetes node name; also the topology value.
    pub node_id: String,
    /// Pools, the first being the default.
    pub pools: Vec<PoolSpec>,
    /// Reported by NodeGetInfo; `None` means no limit.
    pub max_volumes_per_node: Option<i64>,
    /// Staging and target paths must lie under it (kubelet's `--root-dir`).
    pub kubelet_dir: PathBuf,
}

/// State shared by the three services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub store: Store,
    pub node_id: String,
    pub max_volumes_per_node: i64,
    pub locks: VolumeLocks,
    /// Per-snapshot locks (a table of their own: snapshot and volume ids
    /// may be equal strings).
    pub snapshot_locks: VolumeLocks,
    /// Where staging and target paths may lie.
    pub paths: Confinement,
}

/// The CSI plugin of one node.
#[derive(Debug, Clone)]
pub struct Plugin {
    shared: Arc<Shared>,
}

/// The sources of the agent-to-agent transfer server: this node's volumes
/// and snapshots, found in its store.
impl crate::transfer::Sources for Plugin {
    fn locate(
        &self,
        source: &crate::transfer::SourceRef,
    ) -> Result<PathBuf, crate::transfer::Error> {
        crate::transfer::Sources::locate(&self.shared.store, source)
    }
}

/// The volumes of this node that receive data from another node (the
/// cross-node restore of the provisioner): each step under the volume's
/// lock, as an RPC on it would be, on a blocking thread.
#[tonic::async_trait]
impl crate::transfer::Landing for Plugin {
    fn backend(&self, pool: Option<&str>) -> Option<storage::BackendKind> {
        self.shared.store.pool(pool).ok().map(|p| p.backend)
    }

    async fn begin(&self, volume: &str) -> Result<crate::transfer::Arrival, storage::Error> {
        let id = VolumeId::parse(volume)?;
        let _lock = self.shared.locks.lock(&id).await;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.store.begin_incoming(&id))
            .await
            .map_err(|e| storage::Error::Io {
                what: "preparing a volume to receive its data",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    async fn settle(&self, volume: &str, received: &str) -> Result<(), storage::Error> {
        let id = VolumeId::parse(volume)?;
        let _lock = self.shared.locks.lock(&id).await;
        let (shared, received) = (self.shared.clone(), received.to_owned());
        tokio::task::spawn_blocking(move || shared.store.settle_incoming(&id, &received))
            .await
            .map_err(|e| storage::Error::Io {
                what: "settling the data a volume received",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map(|_| ())
    }
}

impl Plugin {
    /// Opens the pools (creating missing directories, finishing interrupted
    /// creates and deletes, loading every volume) and builds the services.
    /// Blocking: call it before serving, or from `spawn_blocking`.
    pub fn new(config: Config) -> Result<Plugin, storage::Error> {
        let store = Store::open(&config.pools)?;
        let pools: Vec<PathBuf> = store.pools().iter().map(|p| p.root.clone()).collect();
        let paths = Confinement::new(&config.kubelet_dir, &pools);
        Ok(Plugin {
            shared: Arc::new(Shared {
                store,
                node_id: config.node_id,
                max_volumes_per_node: config.max_volumes_per_node.unwrap_or(0).max(0),
                locks: VolumeLocks::default(),
                snapshot_locks: VolumeLocks::default(),
                paths,
            }),
        })
    }

    /// The Identity service, ready to serve.
    pub fn identity(&self) -> IdentityServer<IdentityService> {
        IdentityServer::new(self.identity_service())
    }

    /// The Identity service for in-process calls (the health endpoint's
    /// readiness is its Probe).
    pub fn identity_service(&self) -> IdentityService {
        IdentityService::new(self.shared.clone())
    }

    /// The Controller service, ready to serve.
    pub fn controller(&self) -> ControllerServer<ControllerService> {
        ControllerServer::new(self.controller_service())
    }

    /// The Node service, ready to serve.
    pub fn node(&self) -> NodeServer<NodeService> {
        NodeServer::new(NodeService::new(self.shared.clone()))
    }

    /// The Node service for in-process calls (tests that stage a volume
    /// beside the provisioner).
    pub fn node_service(&self) -> NodeService {
        NodeService::new(self.shared.clone())
    }

    /// The Controller service for in-process calls through the generated
    /// `controller_server::Controller` trait (cheap to clone).
    pub fn controller_service(&self) -> ControllerService {
        ControllerService::new(self.shared.clone())
    }

    /// Tells which volumes stop being mounted here (see `storage::Freed`).
    pub fn freed(&self) -> crate::storage::Freed {
        self.shared.store.freed().clone()
    }

    /// The node id this plugin serves.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// Number of volumes on this node.
    pub fn volume_count(&self) -> usize {
        self.shared.store.len()
    }

    /// What each pool holds now. Blocking (see [`Store::stats`]).
    pub fn pool_stats(&self) -> Vec<storage::PoolStats> {
        self.shared.store.stats()
    }
}

/// Runs blocking storage or mount work off the async executor, inside the
/// caller's span (so that storage's log lines carry the RPC's and the
/// claim's fields).
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(f))
        .await
        .map_err(|e| Error::Internal(format!("worker task failed: {e}")))?
}

/// Parses a request's volume id field.
pub(crate) fn volume_id(raw: &str) -> Result<VolumeId> {
    if raw.is_empty() {
        return Err(Error::missing("volume_id"));
    }
    VolumeId::parse(raw).map_err(|e| Error::invalid("volume_id", e.to_string()))
}

/// The span of one RPC: every line logged while it runs (storage's
/// included, see [`blocking`]) carries the RPC and the volume id, under the
/// provisioner's claim span when the provisioner made the call in-process.
pub(crate) fn span(rpc: &'static str, volume: &str) -> tracing::Span {
    tracing::info_span!("csi", rpc, volume.id = volume)
}

/// Logs the outcome of one RPC (one line) and converts its error.
pub(crate) fn outcome<T>(
    rpc: &'static str,
    volume: &str,
    res: Result<T>,
    quiet: bool,
) -> std::result::Result<tonic::Response<T>, tonic::Status> {
    match res {
        Ok(v) => {
            if quiet {
                tracing::debug!(rpc, volume.id = volume, "ok");
            } else {
                tracing::info!(rpc, volume.id = volume, "ok");
            }
            Ok(tonic::Response::new(v))
        }
        Err(e) => {
            let code = e.code();
            if code == tonic::Code::Internal {
                tracing::error!(rpc, volume.id = volume, code = ?code, error = %e, "failed");
            } else {
                tracing::warn!(rpc, volume.id = volume, code = ?code, error = %e, "refused");
            }
            Err(e.into())
        }
    }
}
