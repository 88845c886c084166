//! The CSI layer's error, and the one place where errors become gRPC codes.

use tonic::{Code, Status};

use crate::mount;
use crate::storage::image::ImageError;
use crate::storage::{self, RangeError, attach};

/// Everything a CSI RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    /// A snapshot or content source that does not exist.
    #[error("{0}")]
    NotFound(String),
    #[error("{0} is not supported by Stead")]
    Unimplemented(&'static str),
    #[error(transparent)]
    Storage(#[from] storage::Error),
    /// Boxed: the attach errors carry several paths, and every Result of
    /// this layer would otherwise be as large as the largest of them.
    #[error(transparent)]
    Attach(Box<attach::Error>),
    #[error(transparent)]
    Mount(#[from] mount::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn missing(field: &'static str) -> Self {
        Error::invalid(field, "is required")
    }

    /// The gRPC code of this error, per the CSI spec's error tables.
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::NotFound(_) => Code::NotFound,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Storage(e) => storage_code(e),
            Error::Attach(e) => attach_code(e),
            Error::Mount(e) => mount_code(e),
            Error::Internal(_) => Code::Internal,
        }
    }
}

fn storage_code(e: &storage::Error) -> Code {
    use storage::Error as S;
    match e {
        S::Id(_) | S::UnknownPool { .. } | S::Unsupported { .. } | S::Source { .. } => {
            Code::InvalidArgument
        }
        S::Range { source, .. } => match source {
            RangeError::Negative { .. } | RangeError::LimitBelowRequired { .. } => {
                Code::InvalidArgument
            }
            RangeError::Unsatisfiable { .. } => Code::OutOfRange,
        },
        S::NotFound(_) | S::SourceNotFound(_) => Code::NotFound,
        S::SmallerThanSource { .. } => Code::OutOfRange,
        S::Conflict { .. } => Code::AlreadyExists,
        S::Exhausted { .. } => Code::ResourceExhausted,
        // A full pool found by fallocate is what Exhausted says by
        // accounting: nothing was created, another node may have room.
        S::Image {
            source: ImageError::NoSpace { .. },
            ..
        } => Code::ResourceExhausted,
        S::Image {
            source: ImageError::CannotReserve { .. },
            ..
        }
        | S::Busy { .. }
        | S::Incoming { .. }
        | S::PoolUnusable { .. } => Code::FailedPrecondition,
        S::Io { .. } | S::Image { .. } | S::Quota { .. } => Code::Internal,
    }
}

fn mount_code(e: &mount::Error) -> Code {
    match e {
        mount::Error::BadOption(_) => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

/// CSI spec, NodeStageVolume / NodePublishVolume / NodeExpandVolume /
/// NodeGetVolumeStats error tables, and DeleteVolume's "volume in use".
fn attach_code(e: &attach::Error) -> Code {
    use attach::Error as A;
    match e {
        A::Storage(s) => storage_code(s),
        A::Mount { source, .. } | A::Kernel(source) => mount_code(source),
        A::AccessMismatch { .. }
        | A::PathOutsideKubelet { .. }
        | A::PathInPool { .. }
        | A::PathIsSymlink { .. }
        | A::WrongKind { .. }
        | A::BindOption { .. } => Code::InvalidArgument,
        A::StagedElsewhere { .. }
        | A::NotStaged { .. }
        | A::StillPublished { .. }
        | A::PublishedElsewhere { .. }
        | A::NoLoopDevice { .. }
        | A::InUse { .. }
        | A::NoFilesystem { .. }
        | A::SignatureLost { .. }
        | A::ForeignSignature { .. }
        | A::Ext4OnlineGrowth { .. } => Code::FailedPrecondition,
        A::PublishedWithOtherMode { .. } => Code::AlreadyExists,
        A::NotAtPath { .. } => Code::NotFound,
        A::BeyondCapacity { .. } => Code::OutOfRange,
        A::Image { .. } | A::StillMounted { .. } | A::PathIo { .. } => Code::Internal,
    }
}

impl From<attach::Error> for Error {
    fn from(e: attach::Error) -> Self {
        Error::Attach(Box::new(e))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
