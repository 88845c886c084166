//! Where a pulled source lands on this node: a volume made empty for it by
//! CreateVolume, which receives the data beside its image and takes it as
//! its image once verified (`storage::incoming`). The provisioner reaches
//! the storage through this seam (as the server reaches it through
//! [`super::Sources`]), so that it still never touches a pool itself.

use std::path::PathBuf;

use crate::storage::{self, BackendKind};

/// How far a volume's arrival is (see `storage::incoming::Arrival`).
pub use crate::storage::incoming::Arrival;

/// The volumes of this node that receive data from another node.
#[tonic::async_trait]
pub trait Landing: Send + Sync + 'static {
    /// The backend of a pool of this node (`None`: the default pool);
    /// `None` when no such pool is configured.
    fn backend(&self, pool: Option<&str>) -> Option<BackendKind>;

    /// Prepares volume `volume` to receive its data, or tells how far an
    /// earlier call got (`Arrival::Pull` names the file to pull into).
    async fn begin(&self, volume: &str) -> Result<Arrival, storage::Error>;

    /// Makes the verified pulled data the volume's image; `received` says
    /// what it is, for its record.
    async fn settle(&self, volume: &str, received: &str) -> Result<(), storage::Error>;
}

/// The target a pull into volume folder `folder` writes (for tests and
/// tools that look at a volume's folder).
pub fn target_in(folder: &std::path::Path) -> PathBuf {
    folder.join(storage::incoming::INCOMING_IMAGE)
}
