//! NodeGetVolumeStats: the condition and usage of a staged or published
//! volume. The part that reads the node record and the kernel runs under
//! the volume's lock ([`probe`]); what a `dir` volume's tree holds comes
//! from its qgroup where one limits it, else from the usage meter
//! afterwards ([`TreePending::finish`]), never from a walk on the caller's
//! thread.
//!
//! A thin image whose pool's filesystem has less room than the volume may
//! still write is reported abnormal, naming the pool: its next writes past
//! that fail (EIO inside the volume), and this is how kubelet and whoever
//! looks at the volume's health learn why before or after they do.

use std::path::{Path, PathBuf};

use nix::sys::statvfs::statvfs;

use super::{Error, Result, recorded_path};
use crate::mount;
use crate::storage::kind::{AccessKind, Allocation, BackendKind};
use crate::storage::meta::VolumeMeta;
use crate::storage::usage::Usage;
use crate::storage::{Store, VolumeId};
use crate::storage::{capacity, image};

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
            abnormal: starved(store, meta, &data)?,
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
                abnormal: starved(store, meta, &data)?,
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
        BackendKind::Dir if meta.quota.is_some() => {
            let capacity = meta.capacity_bytes;
            let fs_available = st.blocks_available().saturating_mul(frsize);
            // The qgroup counts bytes, not inodes (and btrfs reports no
            // inode totals): only the bytes are reported.
            Ok(Probe::Done(match store.dir_used(meta) {
                Some(used) => VolumeStats {
                    abnormal: None,
                    bytes: Some(Counts {
                        total: capacity,
                        available: capacity.saturating_sub(used).min(fs_available),
                        used,
                    }),
                    inodes: None,
                },
                None => VolumeStats::abnormal(format!(
                    "volume {}: its qgroup cannot be read (is btrfs-progs installed?)",
                    meta.id
                )),
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

/// Why a thin image may fail its next writes, if it may: its pool's
/// filesystem has less room than the volume has not allocated yet.
fn starved(store: &Store, meta: &VolumeMeta, image: &Path) -> Result<Option<String>> {
    if meta.allocation != Allocation::Thin {
        return Ok(None);
    }
    let pool = store.pool(Some(&meta.pool))?;
    let (free, _) = capacity::filesystem_space(pool)?;
    let unallocated = meta
        .capacity_bytes
        .saturating_sub(image::allocated_bytes(image));
    Ok(starved_message(meta, free, unallocated))
}

fn starved_message(meta: &VolumeMeta, pool_free: u64, unallocated: u64) -> Option<String> {
    (pool_free < unallocated).then(|| {
        format!(
            "volume {}: thin image, and the filesystem of pool {} has {pool_free} bytes free, less than the {unallocated} bytes the volume has not allocated yet: writes past that fail with I/O errors inside the volume (its filesystem may turn read-only); free space in the pool, or use allocation: thick",
            meta.id, meta.pool
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::kind::FsType;

    #[test]
    fn a_thin_image_is_abnormal_once_its_pool_cannot_hold_what_it_may_write() {
        let meta = VolumeMeta {
            version: 1,
            id: VolumeId::parse("v").unwrap(),
            pool: "image".into(),
            backend: BackendKind::Image,
            capacity_bytes: 100,
            access: AccessKind::Mount {
                fs_type: FsType::Ext4,
            },
            formatted: None,
            folder: "v".into(),
            source: None,
            allocation: Allocation::Thin,
            shared_bytes: 0,
            received: None,
            quota: None,
        };
        assert_eq!(starved_message(&meta, 60, 60), None);
        let why = starved_message(&meta, 10, 60).unwrap();
        assert!(
            why.contains("pool image") && why.contains("10 bytes free") && why.contains("60 bytes"),
            "{why}"
        );
    }
}
