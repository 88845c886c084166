//! What a transfer can send: the data file of a volume or of a snapshot,
//! found through the storage layer, opened once and read from that open
//! file to the end (a delete that renames or unlinks it meanwhile does not
//! change what is read).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::proto::transfer::v1 as pb;
use crate::storage::{BackendKind, Store, VolumeId};

use super::Error;

/// A source named by a Pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceRef {
    Volume(VolumeId),
    Snapshot(VolumeId),
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceRef::Volume(id) => write!(f, "volume {id}"),
            SourceRef::Snapshot(id) => write!(f, "snapshot {id}"),
        }
    }
}

impl SourceRef {
    /// Parses the `source` field of a request; the error names the field.
    pub fn from_proto(source: Option<&pb::Source>) -> Result<Self, Error> {
        let bad = |field: &'static str, reason: String| Error::BadRequest { field, reason };
        match source.and_then(|s| s.kind.as_ref()) {
            None => Err(bad(
                "source",
                "names neither a volume nor a snapshot".into(),
            )),
            Some(pb::source::Kind::VolumeId(id)) => VolumeId::parse(id)
                .map(SourceRef::Volume)
                .map_err(|e| bad("source.volume_id", e.to_string())),
            Some(pb::source::Kind::SnapshotId(id)) => VolumeId::parse(id)
                .map(SourceRef::Snapshot)
                .map_err(|e| bad("source.snapshot_id", e.to_string())),
        }
    }

    /// The `source` field of a request naming this source.
    pub fn to_proto(&self) -> pb::Source {
        let kind = match self {
            SourceRef::Volume(id) => pb::source::Kind::VolumeId(id.as_str().to_owned()),
            SourceRef::Snapshot(id) => pb::source::Kind::SnapshotId(id.as_str().to_owned()),
        };
        pb::Source { kind: Some(kind) }
    }
}

/// Where the data of a source is on this node.
pub trait Sources: Send + Sync + 'static {
    /// The data file of `source`, or why it cannot be sent.
    fn locate(&self, source: &SourceRef) -> Result<PathBuf, Error>;
}

impl Sources for Store {
    fn locate(&self, source: &SourceRef) -> Result<PathBuf, Error> {
        let (backend, pool, path) = match source {
            SourceRef::Volume(id) => {
                let meta = self
                    .get(id)
                    .ok_or_else(|| Error::SourceNotFound(source.clone()))?;
                // A volume still receiving its own data holds a placeholder:
                // not what anyone asks for.
                if self.is_incoming(&meta) {
                    return Err(Error::SourceNotFound(source.clone()));
                }
                // Checked when the stream opens; what keeps it unused until
                // the stream ends is the caller's (a move deletes the claim
                // first, and kubelet starts no pod on a claim being deleted).
                let usage = crate::storage::attach::live_usage(self, &meta).map_err(|e| {
                    Error::Storage {
                        source_ref: source.clone(),
                        reason: format!("whether it is in use cannot be told: {e}"),
                    }
                })?;
                if let Some(how) = usage {
                    return Err(Error::InUse {
                        source_ref: source.clone(),
                        how,
                    });
                }
                let path = self.data_path(&meta).map_err(|e| Error::Storage {
                    source_ref: source.clone(),
                    reason: e.to_string(),
                })?;
                (meta.backend, meta.pool, path)
            }
            SourceRef::Snapshot(id) => {
                let meta = self
                    .snapshot(id)
                    .ok_or_else(|| Error::SourceNotFound(source.clone()))?;
                let path = self.snapshot_data_path(&meta).map_err(|e| Error::Storage {
                    source_ref: source.clone(),
                    reason: e.to_string(),
                })?;
                (meta.backend, meta.pool, path)
            }
        };
        if backend != BackendKind::Image {
            return Err(Error::Unimplemented {
                source_ref: source.clone(),
                pool,
                backend,
            });
        }
        Ok(path)
    }
}

/// A source opened for a Pull.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
    pub generation: String,
}

/// Opens the data file of a source.
pub fn open(path: &Path) -> Result<Opened, Error> {
    let file = File::open(path).map_err(Error::io("opening the source", path))?;
    let generation = generation(&file, path)?;
    let size = file
        .metadata()
        .map_err(Error::io("reading the source's size", path))?
        .len();
    Ok(Opened {
        file,
        path: path.to_owned(),
        size,
        generation,
    })
}

/// Names this version of the file: its identity, size and change time (any
/// write or truncate moves the change time), so that a resume against a
/// file that changed since is told apart.
pub fn generation(file: &File, path: &Path) -> Result<String, Error> {
    let m = file
        .metadata()
        .map_err(Error::io("reading the source's metadata", path))?;
    Ok(format!(
        "{:x}:{:x}:{}:{}.{:09}",
        m.dev(),
        m.ino(),
        m.len(),
        m.ctime(),
        m.ctime_nsec()
    ))
}
