//! Agent-to-agent transfer of a volume's or a snapshot's data (issue 15):
//! the agent that holds the data serves `stead.transfer.v1.Transfer/Pull`
//! over mutual TLS, and the agent that is to hold a copy pulls it into a
//! staging file beside its target, resumably, and renames it into place
//! only once the whole content digest is verified.
//!
//! Rooms: [`server`] (the Pull service: data extents only, each chunk with
//! its checksum, a trailer with the content digest), [`receiver`] (staging
//! file, durable checkpoint, resume, verification, rollback), [`tls`] (the
//! trust material in a Secret-volume layout, reloaded when kubelet swaps
//! it), [`certs`] (a CA and the agents' leaf for that Secret), [`extent`]
//! (SEEK_DATA/SEEK_HOLE), [`digest`] (the layout-independent content
//! digest), [`source`] (what can be sent, found through `storage`) and
//! [`landing`] (the volume a pull lands in, also through `storage`).
//!
//! The cross-node restore of the provisioner (`provisioner::crossnode`)
//! calls [`receiver::pull`] with the address of the agent that holds the
//! snapshot or volume, the trust of this agent ([`tls::TrustDir`]) and the
//! target file in the new volume's folder that [`Landing::begin`] names
//! (the folder carrying the storage layer's `.incoming` marker until the
//! data is verified and settled, see `storage::incoming`).

pub mod certs;
pub mod digest;
pub mod extent;
pub mod landing;
pub mod receiver;
pub mod server;
pub mod source;
pub mod tls;

use std::io;
use std::path::{Path, PathBuf};

pub use landing::{Arrival, Landing};
pub use receiver::{Options, Report, pull, rollback};
pub use server::{TransferService, serve};
pub use source::{SourceRef, Sources};
pub use tls::TrustDir;

use crate::storage::BackendKind;

/// Bytes of data per chunk on the wire (gRPC's default message limit is
/// 4 MiB; 1 MiB keeps a chunk's checksum and write cheap to redo).
pub const CHUNK_BYTES: usize = 1 << 20;

/// The name in the agents' certificate that a client checks by default.
pub const DEFAULT_SERVER_NAME: &str = "transfer.stead.csi.dev";

/// Errors of the transfer path; each names the source, the target or the
/// peer concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {reason}")]
    BadRequest { field: &'static str, reason: String },
    #[error("{0} not found on this node")]
    SourceNotFound(SourceRef),
    #[error(
        "{source_ref} is in pool {pool} of the {backend} backend: only image volumes and snapshots (one file) can be transferred"
    )]
    Unimplemented {
        source_ref: SourceRef,
        pool: String,
        backend: BackendKind,
    },
    #[error("{source_ref}: {reason}")]
    Storage {
        source_ref: SourceRef,
        reason: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("trust material in {}: {reason}", dir.display())]
    Trust { dir: PathBuf, reason: String },
    #[error("transfer listener {addr}: {reason}")]
    Serve { addr: String, reason: String },
    #[error("peer {peer}: {reason}")]
    Connect { peer: String, reason: String },
    #[error("pulling {source_ref} from {peer}: {status}")]
    Rpc {
        source_ref: SourceRef,
        peer: String,
        status: tonic::Status,
    },
    #[error("pulling {source_ref} from {peer}: the peer broke the protocol: {reason}")]
    Protocol {
        source_ref: SourceRef,
        peer: String,
        reason: String,
    },
    #[error(
        "pulling {source_ref} into {}: content digest {actual} differs from the sender's {expected}; the staging file was removed",
        target.display()
    )]
    DigestMismatch {
        source_ref: SourceRef,
        target: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "target {} already exists and no transfer into it is under way; it is never overwritten",
        .0.display()
    )]
    TargetExists(PathBuf),
    #[error("target {}: another transfer into it is under way", .0.display())]
    Busy(PathBuf),
    #[error(
        "{source_ref} is {how} on this node: a volume is sent to another node only while no pod uses it (a copy of a volume being written would be torn); stop its pod, or take a snapshot of it and restore that"
    )]
    InUse { source_ref: SourceRef, how: String },
}

impl Error {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// The one table from transfer errors to gRPC codes (the server's side).
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::BadRequest { .. } => Code::InvalidArgument,
            Error::SourceNotFound(_) => Code::NotFound,
            Error::Unimplemented { .. } => Code::Unimplemented,
            Error::Busy(_) => Code::Aborted,
            Error::InUse { .. } => Code::FailedPrecondition,
            Error::TargetExists(_) => Code::AlreadyExists,
            Error::Connect { .. } | Error::Rpc { .. } => Code::Unavailable,
            Error::Protocol { .. } | Error::DigestMismatch { .. } => Code::DataLoss,
            Error::Storage { .. }
            | Error::Io { .. }
            | Error::Trust { .. }
            | Error::Serve { .. } => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
