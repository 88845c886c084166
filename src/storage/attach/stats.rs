//! NodeGetVolumeStats: the condition and usage of a staged or published
//! volume. The part that reads the node record and the kernel runs under
//! the volume's lock ([`probe`]); what a `dir` volume's tree holds comes
//! from the usage meter afterwards ([`TreePending::finish`]), never from a
//! walk on the caller's thread.

use std::path::{Path, PathBuf};

use nix::sys::statvfs::statvfs;

use super::{Error, Result, recorded_path};
use crate::mount;
use crate::storage::image;
use crate::storage::kind::{AccessKind, BackendKind};
use crate::storage::meta::VolumeMeta;
use crate::storage::usage::Usage;
use crate::storage::{Store, VolumeId};

/// Total, available and used, of bytes or of inodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub available: u64,
    pub used: u64,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    /// `Some(why)` when the volume is not healthy.
    pub abnormal: Option<String>,
    pub bytes: Option<Counts>,
    pub inodes: Option<Counts>,
}

impl VolumeStats {
    fn abnormal(why: String) -> Self {
        VolumeStats {
            abnormal: Some(why),
            bytes: None,
            inodes: None,
        }
    }
}

/// The outcome of [`probe`].
#[derive(Debug)]
pub enum Probe {
    Done(VolumeStats),
    /// A `dir` volume: complete with what its tree holds.
    Tree(TreePending),
}

/// The stats of a `dir` volume, waiting for its tree's usage.
#[derive(Debug)]
pub struct TreePending {
    pub id: VolumeId,
    /// The volume's data folder, to measure.
    pub data: PathBuf,
    capacity: u64,
    fs_available: u64,
    inodes_total: u64,
    inodes_free: u64,
}

impl TreePending {
    /// A directory shares its pool's filesystem: it reports its own
    /// capacity, what its tree occupies, and what is left of either.
    pub fn finish(self, usage: Usage) -> VolumeStats {
        VolumeStats {
            abnormal: None,
            bytes: Some(Counts {
                total: self.capacity,
                available: self
                    .capacity
                    .saturating_sub(usage.bytes)
                    .min(self.fs_available),
                used: usage.bytes,
            }),
            inodes: Some(Counts {
                total: self.inodes_total,
                available: self.inodes_free,
                used: usage.inodes,
            }),
        }
    }
}

/// Checks that `volume_path` is a live staging or publication of the
/// volume and reads its filesystem's counters.
pub fn probe(store: &Store, meta: &VolumeMeta, volume_path: &Path) -> Result<Probe> {
    let state = store.node_state(meta)?;
    let path = recorded_path(meta, &state, volume_path)?;
    let data = store.data_path(meta)?;
    if !data.exists() {
        return Ok(Probe::Done(VolumeStats::abnormal(format!(
            "volume {}: its backing data {} is missing",
            meta.id,
            data.display()
        ))));
    }
    let is_staging = state
        .staged
        .as_ref()
        .is_some_and(|s| super::same_path(&s.path, &path));
    let live = if meta.access == AccessKind::Block && is_staging {
        image::find_attached(&data)
            .map_err(|source| Error::Image {
                id: meta.id.clone(),
                source: Box::new(source),
            })?
            .is_some()
    } else {
        mount::is_mounted(&path)?
    };
    if !live {
        return Ok(Probe::Done(VolumeStats::abnormal(format!(
            "volume {}: nothing is mounted at {} any more",
            meta.id,
            path.display()
        ))));
    }
    if meta.access == AccessKind::Block {
        return Ok(Probe::Done(VolumeStats {
            abnormal: None,
            bytes: Some(Counts {
                total: meta.capacity_bytes,
                available: 0,
                used: 0,
            }),
            inodes: None,
        }));
    }
    let st = statvfs(&path).map_err(|e| Error::PathIo {
        what: "statvfs of",
        path: path.clone(),
        source: e.into(),
    })?;
    let frsize = st.fragment_size();
    let inodes_total = st.files();
    let inodes_free = st.files_available();
    match meta.backend {
        BackendKind::Image => {
            let total = st.blocks().saturating_mul(frsize);
            let free = st.blocks_free().saturating_mul(frsize);
            Ok(Probe::Done(VolumeStats {
                abnormal: None,
                bytes: Some(Counts {
                    total,
                    available: st.blocks_available().saturating_mul(frsize),
                    used: total.saturating_sub(free),
                }),
                inodes: Some(Counts {
                    total: inodes_total,
                    available: inodes_free,
                    used: inodes_total.saturating_sub(st.files_free()),
                }),
            }))
        }
        BackendKind::Dir => Ok(Probe::Tree(TreePending {
            id: meta.id.clone(),
            data,
            capacity: meta.capacity_bytes,
            fs_available: st.blocks_available().saturating_mul(frsize),
            inodes_total,
            inodes_free,
        })),
    }
}
