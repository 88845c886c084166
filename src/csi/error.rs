//! The CSI layer's error, and the one place where errors become gRPC codes.

use tonic::{Code, Status};

use crate::mount;
use crate::storage::{self, RangeError};

/// Everything a CSI RPC can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0} is not supported by Stead")]
    Unimplemented(&'static str),
    #[error(transparent)]
    Storage(#[from] storage::Error),
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
        use storage::Error as S;
        match self {
            Error::Invalid { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Storage(e) => match e {
                S::Id(_) | S::UnknownPool { .. } | S::Unsupported { .. } => Code::InvalidArgument,
                S::Range { source, .. } => match source {
                    RangeError::Negative { .. } | RangeError::LimitBelowRequired { .. } => {
                        Code::InvalidArgument
                    }
                    RangeError::Unsatisfiable { .. } => Code::OutOfRange,
                },
                S::NotFound(_) => Code::NotFound,
                S::Conflict { .. } => Code::AlreadyExists,
                S::Exhausted { .. } => Code::ResourceExhausted,
                S::Busy { .. } | S::PoolUnusable { .. } => Code::FailedPrecondition,
                S::Io { .. } | S::Image { .. } => Code::Internal,
            },
            Error::Mount(mount::Error::BadOption(_)) => Code::InvalidArgument,
            Error::Mount(_) | Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
