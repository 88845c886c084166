//! Pools, backends and the on-disk volume store. Knows nothing of gRPC or
//! Kubernetes.
//!
//! Layout of a pool directory:
//!
//! ```text
//! <pool>/<folder>/volume.json   the volume record, written last at create
//! <pool>/<folder>/node.json     staging/publication intent log (attach)
//! <pool>/<folder>/data/         dir backend: the volume's files (a btrfs
//!                               subvolume where the pool enforces sizes)
//! <pool>/<folder>/disk.img      image backend: the image (thick or sparse)
//! <pool>/.tmp-<folder>          a create by an earlier version (removed at start)
//! <pool>/.del-<folder>-<n>      a volume being deleted (removed at start)
//! <pool>/.snapshots/            snapshots of the pool's volumes ([`snapshot`])
//! ```
//!
//! A volume exists exactly when its folder holds a readable `volume.json`.
//! A create makes the folder and the data in place, then writes the record
//! and fsyncs it with the folder and the pool ([`store`]); a folder without a
//! record is an unfinished create, removed at start when its data is
//! untouched and kept otherwise ([`recovery`]). A delete renames the folder
//! to `.del-` before removing its contents, so a crash at any instruction
//! leaves either the whole volume or none of it.
//!
//! Rooms: [`store`] (the volumes and their cache), [`recovery`] (what a
//! crash left), [`capacity`] (what a pool can still promise), [`quota`]
//! (what limits a `dir` volume to its size), [`usage`]
//! (measuring directory trees off the request path), [`attach`] (stage,
//! publish, expand on the node), the backends [`dir`] and [`image`], the
//! copies and freezes snapshots are made of ([`copy`]), and the shared
//! vocabulary in [`kind`].

pub mod attach;
pub mod capacity;
pub mod command;
pub mod copy;
pub mod dir;
pub mod id;
pub mod image;
pub mod incoming;
pub mod kind;
pub mod meta;
pub mod pool;
pub mod quota;
pub mod recovery;
pub mod snapshot;
pub mod store;
pub mod usage;

use std::io;
use std::path::{Path, PathBuf};

pub use attach::Attachment;
pub use capacity::{PoolCapacity, PoolStats};
pub use id::{IdError, VolumeId};
use image::ImageError;
pub use kind::{AccessKind, Allocation, BackendKind, Capability, FsType, Sharing};
pub use meta::VolumeMeta;
pub use pool::{PoolSpec, RangeError, Reserve};
pub use quota::{Enforcement, Quota};
pub use snapshot::{ContentSource, SnapshotMeta};
pub use store::{Freed, NewVolume, Pool, Store};

/// Errors of the storage layer; each names the volume or pool concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("volume {0} not found")]
    NotFound(VolumeId),
    #[error("pool {pool:?} is not configured on this node (pools: {known})")]
    UnknownPool { pool: String, known: String },
    #[error("volume {id} already exists with {existing}; the request asks for {requested}")]
    Conflict {
        id: VolumeId,
        existing: String,
        requested: String,
    },
    #[error("volume {id}: {source}")]
    Range {
        id: VolumeId,
        #[source]
        source: RangeError,
    },
    #[error(
        "volume {id}: it asks for {} and pool {pool} has {} free ({needed} vs {available} bytes, after the pool's reserve)",
        crate::provisioner::quantity::human(*needed as i64),
        crate::provisioner::quantity::human(*available as i64)
    )]
    Exhausted {
        id: VolumeId,
        pool: String,
        needed: u64,
        available: u64,
    },
    #[error("volume {id}: pool {pool} ({backend} backend) does not support {what}")]
    Unsupported {
        id: VolumeId,
        pool: String,
        backend: BackendKind,
        what: &'static str,
    },
    #[error("{0} not found")]
    SourceNotFound(ContentSource),
    #[error("volume {id} cannot be made from {from}: {reason}")]
    Source {
        id: VolumeId,
        from: ContentSource,
        reason: String,
    },
    #[error(
        "volume {id} cannot be made from {from}: it holds {size} bytes and limit_bytes is {limit}; a restore or clone is never smaller than its source"
    )]
    SmallerThanSource {
        id: VolumeId,
        from: ContentSource,
        size: u64,
        limit: u64,
    },
    #[error("volume {id}: {reason}")]
    Busy { id: VolumeId, reason: String },
    #[error("volume {id}: data from another node: {reason}")]
    Incoming { id: VolumeId, reason: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {id}: {source}")]
    Image {
        id: VolumeId,
        #[source]
        source: ImageError,
    },
    #[error("volume {id}: its limit ({quota:?}) could not be changed: {reason}")]
    Quota {
        id: VolumeId,
        quota: Quota,
        reason: String,
    },
    #[error("pool {pool} at {}: {reason}", path.display())]
    PoolUnusable {
        pool: String,
        path: PathBuf,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}
