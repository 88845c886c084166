//! What a pool can still promise: the free space of its filesystem, less
//! the pool's reserve (what kubelet needs free to evict nobody, see
//! [`pool::Reserve`]), less what existing volumes and snapshots were
//! promised and have not taken yet.

use std::collections::BTreeMap;

use nix::sys::statvfs::statvfs;
use nix::unistd::{AccessFlags, access};

use super::attach::Attachment;
use super::kind::{AccessKind, BackendKind};
use super::meta::VolumeMeta;
use super::store::{Pool, Store};
use super::{Error, Result, image, pool};

/// Space in a pool, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// What a new volume may still be given.
    pub available: u64,
    /// The smallest volume the pool creates for the access asked about.
    pub minimum: u64,
}

/// What a pool holds now, in bytes and volumes (the agent's metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    pub pool: String,
    pub backend: BackendKind,
    /// The size of the pool's filesystem.
    pub size: u64,
    /// What its filesystem has available (see [`filesystem_space`]).
    pub free: u64,
    /// What a new volume may still be given (GetCapacity's answer).
    pub available: u64,
    /// The sizes of its volumes, summed: what they were promised.
    pub promised: u64,
    /// What its volumes occupy on the filesystem (see [`Store::promised`]).
    pub used: u64,
    /// Its volumes by what their node records say, every state present.
    pub volumes: BTreeMap<Attachment, u64>,
}

impl Store {
    /// What each pool holds now. Blocking (statvfs, a stat or two per
    /// volume); a pool whose filesystem does not answer is left out.
    pub fn stats(&self) -> Vec<PoolStats> {
        self.pools()
            .iter()
            .filter_map(|pool| {
                let (free, size) = filesystem_space(pool).ok()?;
                let mut stats = PoolStats {
                    pool: pool.name.clone(),
                    backend: pool.backend,
                    size,
                    free,
                    available: self.available(pool).ok()?,
                    promised: 0,
                    used: 0,
                    volumes: Attachment::ALL.iter().map(|&a| (a, 0)).collect(),
                };
                for m in self.read_cache().values().filter(|m| m.pool == pool.name) {
                    stats.promised += m.capacity_bytes;
                    stats.used += self.occupied(pool, m);
                    *stats.volumes.entry(self.attachment(m)).or_default() += 1;
                }
                Some(stats)
            })
            .collect()
    }

    /// Capacity of a pool for volumes of the given access.
    pub fn capacity(&self, pool: &Pool, access: Option<AccessKind>) -> Result<PoolCapacity> {
        Ok(PoolCapacity {
            available: self.available(pool)?,
            minimum: pool::minimum_size(pool.backend, access),
        })
    }

    /// Free space of the pool's filesystem, less its reserve, less what
    /// existing volumes were promised and have not yet taken (see
    /// [`Store::promised`]).
    pub(super) fn available(&self, pool: &Pool) -> Result<u64> {
        let (free, size) = filesystem_space(pool)?;
        Ok(free
            .saturating_sub(pool.reserve.bytes(size))
            .saturating_sub(self.promised(pool) + self.snapshots_promised(pool)))
    }

    /// What the volumes of a pool may still take from its free space: each
    /// one's capacity less what it already occupies, since that is gone
    /// from the filesystem's free space already (counting it again made a
    /// pool of `dir` volumes refuse claims it had room for), plus what it
    /// holds without owning (see below).
    ///
    /// `image`: what the file has allocated. A thick image has allocated
    /// its whole size at create, so it promises nothing more: its blocks
    /// are counted once, by the filesystem. `dir`: its qgroup's count where
    /// one limits it, else the last measurement of its tree by the usage
    /// meter (a volume not measured yet counts whole, which never
    /// over-commits). Data removed from a directory since its last
    /// measurement is promised too little by that much until the next one
    /// (the meter refreshes at every stats call, and at start).
    ///
    /// A volume filled by reflink holds blocks it shares with its source
    /// (`shared_bytes`): they count as allocated, yet its first overwrite
    /// of each takes a new one from the pool. They are promised on top, as
    /// a reflink snapshot promises what it holds, for the volume's life
    /// (which over-promises once it has overwritten them, never under).
    fn promised(&self, pool: &Pool) -> u64 {
        self.read_cache()
            .values()
            .filter(|m| m.pool == pool.name)
            .map(|m| {
                outstanding(m.capacity_bytes, self.occupied(pool, m)).saturating_add(m.shared_bytes)
            })
            .sum()
    }

    /// What a volume of `pool` occupies on its filesystem now (see
    /// [`Store::promised`]).
    fn occupied(&self, pool: &Pool, m: &VolumeMeta) -> u64 {
        match m.backend {
            BackendKind::Dir => self.dir_used(m).unwrap_or(0),
            BackendKind::Image => {
                image::allocated_bytes(&pool.root.join(&m.folder).join(image::IMAGE_FILE))
            }
        }
    }

    /// Checks that every pool is usable: a writable directory whose
    /// filesystem answers statvfs.
    pub fn probe(&self) -> Result<()> {
        for pool in self.pools() {
            let unusable = |reason: String| Error::PoolUnusable {
                pool: pool.name.clone(),
                path: pool.root.clone(),
                reason,
            };
            if !pool.root.is_dir() {
                return Err(unusable("not a directory (or missing)".into()));
            }
            access(&pool.root, AccessFlags::W_OK | AccessFlags::X_OK)
                .map_err(|e| unusable(format!("not writable: {e}")))?;
            statvfs(&pool.root).map_err(|e| unusable(format!("statvfs failed: {e}")))?;
        }
        Ok(())
    }
}

/// The available bytes and the size of a pool's filesystem: what kubelet
/// compares with its thresholds (available, not free, which counts the
/// blocks reserved for root).
pub fn filesystem_space(pool: &Pool) -> Result<(u64, u64)> {
    let st = statvfs(&pool.root).map_err(|e| Error::Io {
        what: "statvfs of pool",
        path: pool.root.clone(),
        source: e.into(),
    })?;
    Ok((
        st.blocks_available().saturating_mul(st.fragment_size()),
        st.blocks().saturating_mul(st.fragment_size()),
    ))
}

/// What a volume of `capacity` bytes that occupies `used` may still write.
fn outstanding(capacity: u64, used: u64) -> u64 {
    capacity - used.min(capacity)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::storage::kind::FsType;
    use crate::storage::{NewVolume, PoolSpec, VolumeId, dir};

    /// A store of one pool without reserve in `tmp`.
    fn one_pool(tmp: &tempfile::TempDir, name: &str, backend: BackendKind) -> Store {
        Store::open(&[PoolSpec::new(name, backend, tmp.path().join("pool"))
            .with_reserve(crate::storage::Reserve::Bytes(0))])
        .unwrap()
    }

    fn volume(id: &str, access: AccessKind, mib: u64) -> NewVolume {
        NewVolume {
            id: VolumeId::parse(id).unwrap(),
            pool: None,
            access,
            required: mib * pool::MIB,
            limit: 0,
            allocation: None,
        }
    }

    const EXT4: AccessKind = AccessKind::Mount {
        fs_type: FsType::Ext4,
    };

    #[test]
    fn a_volume_promises_what_it_has_not_written_yet() {
        assert_eq!(outstanding(100, 0), 100);
        assert_eq!(outstanding(100, 30), 70);
        // A volume past its size (dir volumes are not enforced) promises 0.
        assert_eq!(outstanding(100, 130), 0);
    }

    #[tokio::test]
    async fn what_a_dir_volume_holds_is_not_counted_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let store = one_pool(&tmp, "p", BackendKind::Dir);
        let (meta, _) = store.create(&volume("v", EXT4, 64)).unwrap();
        let pool = store.pool(None).unwrap();
        assert_eq!(store.promised(pool), 64 * pool::MIB);
        let data = store.volume_dir(&meta).unwrap().join(dir::DATA_DIR);
        let f = data.join("f");
        std::fs::write(&f, vec![7u8; 8 * pool::MIB as usize]).unwrap();
        std::fs::File::open(&f).unwrap().sync_all().unwrap();
        // Forget the "empty" of the create, so that the next measure walks.
        store.usage().forget(&meta.id);
        let used = store.usage().measure(&meta.id, data, Duration::ZERO).await;
        assert!(used.bytes >= 8 * pool::MIB, "{used:?}");
        assert_eq!(store.promised(pool), 64 * pool::MIB - used.bytes);
    }

    #[test]
    fn pool_stats_sum_the_volumes_sizes_and_count_them_by_their_node_record() {
        use crate::storage::attach::{NodeState, Staged};
        let tmp = tempfile::tempdir().unwrap();
        let store = one_pool(&tmp, "p", BackendKind::Dir);
        let (a, _) = store.create(&volume("a", EXT4, 16)).unwrap();
        store.create(&volume("b", EXT4, 32)).unwrap();
        let staged = NodeState {
            staged: Some(Staged {
                path: tmp.path().join("staging"),
            }),
            published: vec![],
        };
        store.save_node_state(&a, &staged).unwrap();

        let stats = store.stats();
        assert_eq!(stats.len(), 1);
        let s = &stats[0];
        assert_eq!((s.pool.as_str(), s.backend), ("p", BackendKind::Dir));
        assert_eq!(s.promised, 48 * pool::MIB);
        // The pool lies on the machine's disk, whose free space moves.
        assert!(
            s.size > 0 && s.free <= s.size && s.available <= s.free,
            "{s:?}"
        );
        let counts: Vec<(&str, u64)> = s.volumes.iter().map(|(a, n)| (a.as_str(), *n)).collect();
        assert_eq!(
            counts,
            [("idle", 1), ("staged", 1), ("published", 0), ("unknown", 0)]
        );
    }

    #[test]
    fn a_thick_image_promises_nothing_more_and_a_thin_one_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let store = one_pool(&tmp, "i", BackendKind::Image);
        let new = |id: &str, allocation| NewVolume {
            allocation,
            ..volume(id, AccessKind::Block, 8)
        };
        let pool = store.pool(None).unwrap();
        let (thick, _) = store.create(&new("thick", None)).unwrap();
        assert_eq!(
            thick.allocation,
            crate::storage::Allocation::Thick,
            "the default"
        );
        assert_eq!(
            store.promised(pool),
            0,
            "its blocks are the filesystem's count"
        );
        store
            .create(&new("thin", Some(crate::storage::Allocation::Thin)))
            .unwrap();
        assert_eq!(store.promised(pool), 8 * pool::MIB);
        // Asking again for the same volume with another allocation is a
        // conflict, not the old volume.
        let e = store
            .create(&new("thin", Some(crate::storage::Allocation::Thick)))
            .unwrap_err();
        assert!(matches!(e, Error::Conflict { .. }), "{e}");
        // Without one, the volume is found as it is (a retry after an
        // upgrade finds a thin volume of the version before).
        let (again, created) = store.create(&new("thin", None)).unwrap();
        assert!(!created);
        assert_eq!(again.allocation, crate::storage::Allocation::Thin);
    }

    #[test]
    fn a_dir_pool_refuses_thick_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&[PoolSpec::new(
            "d",
            BackendKind::Dir,
            tmp.path().join("pool"),
        )])
        .unwrap();
        let e = store
            .create(&NewVolume {
                id: VolumeId::parse("v").unwrap(),
                pool: None,
                access: AccessKind::Mount {
                    fs_type: FsType::Ext4,
                },
                required: pool::MIB,
                limit: 0,
                allocation: Some(crate::storage::Allocation::Thick),
            })
            .unwrap_err();
        assert!(e.to_string().contains("allocation: thick"), "{e}");
        assert!(store.is_empty());
    }
}
