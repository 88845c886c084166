//! The volume store over all pools: the disk is the source of truth, the
//! map is a cache of every `volume.json`, loaded at start. Creates assemble
//! a volume's folder in place, record last; deletes retire the folder under
//! a `.del-` name before removing it.

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use super::kind::{AccessKind, Allocation, BackendKind, FsType};
use super::meta::{self, Durability, VolumeMeta};
use super::pool::{self, PoolSpec, RangeError, Reserve};
use super::quota::{self, Enforcement, Quota};
use super::snapshot::{self, ContentSource, SnapshotMeta};
use super::usage::UsageMeter;
use super::{Error, Result, VolumeId, copy, dir, image, io_at};

/// Folders of creates by earlier versions, assembled under a temporary name
/// (removed at start by [`super::recovery`]).
pub(super) const TMP_PREFIX: &str = ".tmp-";
/// Folders of volumes being deleted (finished at start by recovery).
pub(super) const DEL_PREFIX: &str = ".del-";

/// A configured pool.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backend: BackendKind,
    pub root: PathBuf,
    /// What of the pool's filesystem is never promised.
    pub reserve: Reserve,
    /// What limits its `dir` volumes to their size (probed at open; an
    /// `image` pool's volumes are limited by their image and this is not
    /// probed).
    pub enforcement: Enforcement,
    /// Serializes capacity checks with the reservations they allow.
    pub(super) alloc: Mutex<()>,
    /// Whether the pool's filesystem clones files by reflink (probed once).
    reflink: OnceLock<bool>,
}

impl Pool {
    /// Whether files in this pool can be cloned by reflink (FICLONE).
    pub fn reflink(&self) -> bool {
        *self
            .reflink
            .get_or_init(|| copy::supports_reflink(&self.root))
    }

    /// Whether a volume of this pool cannot hold more than its size: always
    /// for `image`, where the filesystem enforces it for `dir`.
    pub fn enforces_size(&self) -> bool {
        self.backend == BackendKind::Image || self.enforcement.enforced()
    }

    /// The qgroup folder in sysfs of a btrfs pool, if known.
    fn qgroups(&self) -> Option<&Path> {
        match &self.enforcement {
            Enforcement::Btrfs { sysfs } => sysfs.as_deref(),
            Enforcement::None(_) => None,
        }
    }
}

/// What CreateVolume asks for, validated.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub id: VolumeId,
    /// `None`: the default pool.
    pub pool: Option<String>,
    pub access: AccessKind,
    pub required: u64,
    pub limit: u64,
    /// `None`: the backend's default (thick for `image`; a `dir` volume
    /// reserves nothing and is thin).
    pub allocation: Option<Allocation>,
}

/// What filling a new volume's folder found out, for its record.
#[derive(Debug, Default)]
pub(super) struct Filled {
    pub quota: Option<Quota>,
    pub shared_bytes: u64,
}

/// The volume store over all pools.
///
/// Callers serialize operations on one volume (the CSI layer holds a lock
/// per volume id); the store itself only guards its cache and each pool's
/// capacity reservations.
#[derive(Debug)]
pub struct Store {
    pools: Vec<Pool>,
    volumes: RwLock<BTreeMap<VolumeId, VolumeMeta>>,
    /// Every `snapshot.json` of every pool.
    snapshots: RwLock<BTreeMap<VolumeId, SnapshotMeta>>,
    /// What the trees of `dir` volumes occupy, measured off the request
    /// path (stats and capacity read it; nothing here walks a tree).
    usage: UsageMeter,
    /// Told the id of each volume whose node record becomes empty: nothing
    /// is staged or published any more (see [`Freed`]).
    freed: Freed,
}

/// Who wants to know that a volume stopped being used on this node: the
/// provisioner, whose DeleteVolume of a released volume was refused while
/// kubelet still had it mounted, deletes it at once instead of at its next
/// backoff. A listener that lags misses ids (the backoff still retries).
#[derive(Debug, Clone)]
pub struct Freed(tokio::sync::broadcast::Sender<String>);

impl Freed {
    /// Ids told since this call.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.subscribe()
    }

    fn tell(&self, id: &str) {
        // No listener (no provisioner on this node) is not an error.
        let _ = self.0.send(id.to_string());
    }
}

impl Default for Freed {
    fn default() -> Self {
        Self(tokio::sync::broadcast::channel(1024).0)
    }
}

impl Store {
    /// Opens the pools: creates missing directories, finishes interrupted
    /// creations and deletions, and loads every volume record.
    pub fn open(specs: &[PoolSpec]) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::PoolUnusable {
                pool: String::new(),
                path: PathBuf::new(),
                reason: "no pool configured".into(),
            });
        }
        let mut pools: Vec<Pool> = Vec::with_capacity(specs.len());
        let mut volumes = BTreeMap::new();
        let mut snapshots = BTreeMap::new();
        for spec in specs {
            if pools.iter().any(|p| p.name == spec.name) {
                return Err(Error::PoolUnusable {
                    pool: spec.name.clone(),
                    path: spec.path.clone(),
                    reason: "configured twice".into(),
                });
            }
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&spec.path)
                .map_err(io_at("creating pool directory", &spec.path))?;
            let enforcement = match spec.backend {
                BackendKind::Dir => {
                    let found = quota::detect(&spec.path);
                    tracing::info!(pool = %spec.name, path = %spec.path.display(),
                        "dir pool: {}", found.describe());
                    found
                }
                BackendKind::Image => {
                    Enforcement::None("image volumes are limited by their image".into())
                }
            };
            let pool = Pool {
                name: spec.name.clone(),
                backend: spec.backend,
                root: spec.path.clone(),
                reserve: spec.reserve,
                enforcement,
                alloc: Mutex::new(()),
                reflink: OnceLock::new(),
            };
            for meta in pool.recover_and_scan()? {
                if let Some(other) = volumes.get(&meta.id) {
                    let other: &VolumeMeta = other;
                    tracing::error!(volume.id = %meta.id, pool = %pool.name, other.pool = %other.pool,
                        "volume found in two pools; serving the first");
                    continue;
                }
                volumes.insert(meta.id.clone(), meta);
            }
            snapshot::thaw_leftovers(&pool);
            for snap in pool.recover_and_scan_snapshots()? {
                if let Some(other) = snapshots.get(&snap.id) {
                    let other: &SnapshotMeta = other;
                    tracing::error!(snapshot.id = %snap.id, pool = %pool.name, other.pool = %other.pool,
                        "snapshot found in two pools; serving the first");
                    continue;
                }
                snapshots.insert(snap.id.clone(), snap);
            }
            pools.push(pool);
        }
        let usage = UsageMeter::start();
        // Measure every directory volume once, in the background, so that
        // capacity stops counting what they hold twice soon after start.
        // Those a qgroup counts need no walk.
        for meta in volumes
            .values()
            .filter(|m| m.backend == BackendKind::Dir && m.quota.is_none())
        {
            if let Some(pool) = pools.iter().find(|p| p.name == meta.pool) {
                usage.refresh(&meta.id, pool.root.join(&meta.folder).join(dir::DATA_DIR));
            }
        }
        Ok(Self {
            pools,
            volumes: RwLock::new(volumes),
            snapshots: RwLock::new(snapshots),
            usage,
            freed: Freed::default(),
        })
    }

    /// See [`Freed`].
    pub fn freed(&self) -> &Freed {
        &self.freed
    }

    /// Tells [`Freed`]'s listeners that volume `id` is used no more here.
    pub(super) fn tell_freed(&self, id: &str) {
        self.freed.tell(id);
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The named pool, or the default (first) one for `None`.
    pub fn pool(&self, name: Option<&str>) -> Result<&Pool> {
        match name {
            None => Ok(&self.pools[0]),
            Some(n) => self
                .pools
                .iter()
                .find(|p| p.name == n)
                .ok_or_else(|| Error::UnknownPool {
                    pool: n.to_owned(),
                    known: self
                        .pools
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }

    /// The record of a volume, if it exists.
    pub fn get(&self, id: &VolumeId) -> Option<VolumeMeta> {
        self.read_cache().get(id).cloned()
    }

    /// The record of a volume, or `NotFound`.
    pub fn require(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.get(id).ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// Up to `max` volumes (0: all) with ids strictly after `after`, in id
    /// order, and whether more follow.
    pub fn list(&self, after: Option<&VolumeId>, max: usize) -> (Vec<VolumeMeta>, bool) {
        use std::ops::Bound;
        let cache = self.read_cache();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = cache
            .range((lower, Bound::Unbounded))
            .map(|(_, m)| m.clone());
        if max == 0 {
            return (it.collect(), false);
        }
        let page: Vec<_> = it.by_ref().take(max).collect();
        let more = it.next().is_some();
        (page, more)
    }

    pub fn len(&self) -> usize {
        self.read_cache().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The folder of a volume.
    pub fn volume_dir(&self, meta: &VolumeMeta) -> Result<PathBuf> {
        Ok(self.pool(Some(&meta.pool))?.root.join(&meta.folder))
    }

    /// The data of a volume: its directory (dir) or image file (image).
    pub fn data_path(&self, meta: &VolumeMeta) -> Result<PathBuf> {
        let dir = self.volume_dir(meta)?;
        Ok(match meta.backend {
            BackendKind::Dir => dir.join(dir::DATA_DIR),
            BackendKind::Image => dir.join(image::IMAGE_FILE),
        })
    }

    /// Creates a volume, or returns the existing one when it is compatible
    /// with the request (CreateVolume is idempotent by name). The bool tells
    /// whether it was created now.
    pub fn create(&self, req: &NewVolume) -> Result<(VolumeMeta, bool)> {
        self.create_from(req, None)
    }

    /// [`Store::create`], the new volume filled from a snapshot or another
    /// volume when `source` names one: in the source's pool, at least its
    /// size, with its filesystem. The caller holds the lock of a source
    /// volume.
    pub fn create_from(
        &self,
        req: &NewVolume,
        source: Option<&ContentSource>,
    ) -> Result<(VolumeMeta, bool)> {
        let plan = source.map(|s| self.plan_from_source(req, s)).transpose()?;
        let pool = self.pool(
            plan.as_ref()
                .map_or(req.pool.as_deref(), |p| Some(p.pool.as_str())),
        )?;
        let access = req.access;
        let required = plan.as_ref().map_or(req.required, |p| p.required);
        let allocation = allocation_for(req, pool)?;
        if let Some(existing) = self.get(&req.id) {
            // Only an allocation the request names can conflict: a retry
            // without one (the default) finds a volume made by an earlier
            // version (thin) as it is, rather than refused.
            check_compatible(
                &existing,
                pool,
                &NewVolume {
                    required,
                    ..req.clone()
                },
            )?;
            if existing.source.as_ref() != source {
                return Err(Error::Conflict {
                    id: req.id.clone(),
                    existing: describe_source(existing.source.as_ref()),
                    requested: describe_source(source),
                });
            }
            return Ok((existing, false));
        }
        if matches!(access, AccessKind::Block) && !pool.backend.supports_block() {
            return Err(Error::Unsupported {
                id: req.id.clone(),
                pool: pool.name.clone(),
                backend: pool.backend,
                what: "block volumes",
            });
        }
        let minimum = pool::minimum_size(pool.backend, Some(access));
        let size =
            pool::plan_size(required, req.limit, minimum).map_err(|source| Error::Range {
                id: req.id.clone(),
                source,
            })?;
        let folder = req.id.folder_name()?;
        let mut meta = VolumeMeta {
            version: meta::FORMAT_VERSION,
            id: req.id.clone(),
            pool: pool.name.clone(),
            backend: pool.backend,
            capacity_bytes: size,
            access,
            formatted: plan.as_ref().and_then(|p| p.formatted),
            folder,
            source: source.cloned(),
            allocation,
            shared_bytes: 0,
            received: None,
            quota: None,
        };

        let _reservation = pool.alloc.lock().unwrap_or_else(PoisonError::into_inner);
        let available = self.available(pool)?;
        if size > available {
            return Err(Error::Exhausted {
                id: req.id.clone(),
                pool: pool.name.clone(),
                needed: size,
                available,
            });
        }
        let at = pool.root.join(&meta.folder);
        assemble(&at, &mut meta, |folder, meta| match source {
            None => fill_empty(pool, folder, meta),
            Some(s) => self.fill_from_source(pool, folder, meta, s),
        })?;
        if source.is_some() {
            snapshot::filled(&at);
        }
        if meta.backend == BackendKind::Dir && meta.quota.is_none() {
            if source.is_some() {
                self.usage.refresh(&meta.id, at.join(dir::DATA_DIR));
            } else {
                // A new directory holds nothing: known without a walk.
                self.usage.set_empty(&meta.id);
            }
        }
        self.write_cache().insert(meta.id.clone(), meta.clone());
        Ok((meta, true))
    }

    /// Deletes a volume and its data. `Ok(false)` when it did not exist.
    /// The caller has made sure it is neither staged nor published.
    pub fn delete(&self, id: &VolumeId) -> Result<bool> {
        let Some(meta) = self.get(id) else {
            return Ok(false);
        };
        let pool = self.pool(Some(&meta.pool))?;
        let dir = pool.root.join(&meta.folder);
        if meta.backend == BackendKind::Image {
            let img = dir.join(image::IMAGE_FILE);
            if let Some(dev) = image::find_attached(&img).map_err(|source| Error::Image {
                id: id.clone(),
                source,
            })? {
                image::detach(&dev).map_err(|e| Error::Busy {
                    id: id.clone(),
                    reason: format!("its loop device {} cannot be detached: {e}", dev.display()),
                })?;
            }
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let graveyard = pool
            .root
            .join(format!("{DEL_PREFIX}{}-{nanos}", meta.folder));
        fs::rename(&dir, &graveyard).map_err(io_at("retiring volume folder", &dir))?;
        meta::sync_dir(&pool.root).map_err(io_at("syncing pool directory", &pool.root))?;
        self.write_cache().remove(id);
        self.usage.forget(id);
        if meta.quota.is_some() {
            // At once, where removing its files one by one takes as long as
            // they are many; what fails here the removal below still does.
            let data = graveyard.join(dir::DATA_DIR);
            if let Err(e) = quota::delete_subvolume(&data) {
                tracing::warn!(volume.id = %id, path = %data.display(), error = %e,
                    "deleting the subvolume failed; removing its files instead");
            }
        }
        fs::remove_dir_all(&graveyard).map_err(io_at("removing volume data", &graveyard))?;
        Ok(true)
    }

    /// Grows a volume to satisfy `[required, limit]`; a volume already large
    /// enough is returned unchanged. Grows the image file (and its loop
    /// device, if attached); the filesystem is grown by the node.
    pub fn expand(&self, id: &VolumeId, required: u64, limit: u64) -> Result<VolumeMeta> {
        let mut meta = self.require(id)?;
        if meta.capacity_bytes >= required {
            if limit != 0 && meta.capacity_bytes > limit {
                return Err(Error::Range {
                    id: id.clone(),
                    source: RangeError::Unsatisfiable {
                        required,
                        limit,
                        minimum: meta.capacity_bytes,
                    },
                });
            }
            return Ok(meta);
        }
        let pool = self.pool(Some(&meta.pool))?;
        let minimum = pool::minimum_size(meta.backend, Some(meta.access));
        let size = pool::plan_size(required, limit, minimum).map_err(|source| Error::Range {
            id: id.clone(),
            source,
        })?;
        let _reservation = pool.alloc.lock().unwrap_or_else(PoisonError::into_inner);
        let available = self.available(pool)?;
        let growth = size - meta.capacity_bytes;
        if growth > available {
            return Err(Error::Exhausted {
                id: id.clone(),
                pool: pool.name.clone(),
                needed: growth,
                available,
            });
        }
        let dir = pool.root.join(&meta.folder);
        if let Some(q) = meta.quota {
            let data = dir.join(dir::DATA_DIR);
            quota::set_limit(&data, size).map_err(|e| Error::Quota {
                id: id.clone(),
                quota: q,
                reason: e.to_string(),
            })?;
        }
        if meta.backend == BackendKind::Image {
            let img = dir.join(image::IMAGE_FILE);
            let image_err = |source| Error::Image {
                id: id.clone(),
                source,
            };
            image::grow_file(&img, size, meta.allocation).map_err(image_err)?;
            if let Some(dev) = image::find_attached(&img).map_err(image_err)? {
                image::refresh(&dev).map_err(image_err)?;
            }
        }
        meta.capacity_bytes = size;
        self.save(&meta)?;
        Ok(meta)
    }

    /// Records that an image volume now carries a filesystem.
    pub fn mark_formatted(&self, id: &VolumeId, fs: FsType) -> Result<VolumeMeta> {
        let mut meta = self.require(id)?;
        meta.formatted = Some(fs);
        self.save(&meta)?;
        Ok(meta)
    }

    pub(super) fn save(&self, meta: &VolumeMeta) -> Result<()> {
        let dir = self.volume_dir(meta)?;
        meta::write_json(&dir, meta::VOLUME_FILE, meta, Durability::Disk)
            .map_err(io_at("writing volume record", &dir))?;
        self.write_cache().insert(meta.id.clone(), meta.clone());
        Ok(())
    }
    /// The meter of `dir` volumes' trees.
    pub fn usage(&self) -> &UsageMeter {
        &self.usage
    }

    /// What a `dir` volume occupies: its qgroup's count where one limits
    /// it, else the meter's last walk of its tree; `None` when neither is
    /// known.
    pub fn dir_used(&self, meta: &VolumeMeta) -> Option<u64> {
        match meta.quota {
            Some(q) => {
                let pool = self.pool(Some(&meta.pool)).ok()?;
                let data = pool.root.join(&meta.folder).join(dir::DATA_DIR);
                quota::used_bytes(pool.qgroups(), &data, q)
            }
            None => self.usage.cached(&meta.id).map(|u| u.bytes),
        }
    }

    pub(super) fn read_cache(&self) -> RwLockReadGuard<'_, BTreeMap<VolumeId, VolumeMeta>> {
        self.volumes.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_cache(&self) -> RwLockWriteGuard<'_, BTreeMap<VolumeId, VolumeMeta>> {
        self.volumes.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn read_snapshots(&self) -> RwLockReadGuard<'_, BTreeMap<VolumeId, SnapshotMeta>> {
        self.snapshots
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write_snapshots(&self) -> RwLockWriteGuard<'_, BTreeMap<VolumeId, SnapshotMeta>> {
        self.snapshots
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// What [`assemble`] reports when the volume's folder is already there.
const FOLDER_EXISTS: &str =
    "volume folder exists but holds no volume record (inspect it, then remove it)";

/// Builds the folder of a new volume, durably, in the order that makes an
/// interruption harmless: folder, data, then the record, written last and
/// fsynced with the folder and the pool directory. A folder without a
/// readable record is therefore a create that was never acknowledged;
/// [`Pool::recover_and_scan`] removes it when its data is untouched.
///
/// On ext4 and xfs the first fsync commits the journal with every step
/// before it, so the later ones find nothing left to write: one commit per
/// volume, where assembling under a temporary name and renaming it into
/// place costs two.
fn assemble(
    folder: &Path,
    meta: &mut VolumeMeta,
    data: impl FnOnce(&Path, &VolumeMeta) -> Result<Filled>,
) -> Result<()> {
    match DirBuilder::new().mode(0o700).create(folder) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(io_at(FOLDER_EXISTS, folder)(e));
        }
        Err(e) => return Err(io_at("creating volume folder", folder)(e)),
    }
    // From here the folder is ours: a failure takes it away again.
    let filled = data(folder, meta).and_then(|filled| {
        meta.quota = filled.quota;
        meta.shared_bytes = filled.shared_bytes;
        record(folder, meta)
    });
    if filled.is_err() {
        let _ = fs::remove_dir_all(folder);
    }
    filled
}

/// The data of a new empty volume.
fn fill_empty(pool: &Pool, folder: &Path, meta: &VolumeMeta) -> Result<Filled> {
    let data = folder.join(dir::DATA_DIR);
    match meta.backend {
        BackendKind::Dir if pool.enforcement.enforced() => {
            return Ok(Filled {
                quota: Some(limited_data_dir(pool, &data, meta)?),
                shared_bytes: 0,
            });
        }
        BackendKind::Dir => {
            dir::create_data_dir(&data).map_err(io_at("creating data directory", &data))?;
        }
        BackendKind::Image => {
            image::create_file(
                &folder.join(image::IMAGE_FILE),
                meta.capacity_bytes,
                meta.allocation,
            )
            .map_err(|source| Error::Image {
                id: meta.id.clone(),
                source,
            })?;
        }
    }
    Ok(Filled::default())
}

/// The data directory of a `dir` volume on an enforcing pool: a subvolume
/// limited to the volume's size.
pub(super) fn limited_data_dir(pool: &Pool, data: &Path, meta: &VolumeMeta) -> Result<Quota> {
    quota::create_subvolume(data, meta.capacity_bytes).map_err(|e| Error::PoolUnusable {
        pool: pool.name.clone(),
        path: data.to_owned(),
        reason: format!(
            "volume {}: its subvolume could not be made and limited to {} bytes: {e}",
            meta.id, meta.capacity_bytes
        ),
    })
}

/// The allocation of a new volume: what the request asks, else the
/// backend's default. A directory reserves nothing, so asking it for thick
/// is refused by name rather than granted in words.
fn allocation_for(req: &NewVolume, pool: &Pool) -> Result<Allocation> {
    match (pool.backend, req.allocation) {
        (BackendKind::Image, asked) => Ok(asked.unwrap_or(Allocation::Thick)),
        (BackendKind::Dir, Some(Allocation::Thick)) => Err(Error::Unsupported {
            id: req.id.clone(),
            pool: pool.name.clone(),
            backend: pool.backend,
            what: "allocation: thick (a directory reserves no blocks; use an image pool, or allocation: thin)",
        }),
        (BackendKind::Dir, _) => Ok(Allocation::Thin),
    }
}

/// The durable record of a volume folder whose data is in place.
fn record(folder: &Path, meta: &VolumeMeta) -> Result<()> {
    meta::create_json_durable(folder, meta::VOLUME_FILE, meta)
        .map_err(io_at("writing volume record", folder))?;
    let pool = folder.parent().unwrap_or(Path::new("/"));
    meta::sync_dir(pool).map_err(io_at("syncing pool directory", pool))
}

fn describe_source(source: Option<&ContentSource>) -> String {
    source.map_or_else(
        || "no content source".to_owned(),
        |s| format!("content from {s}"),
    )
}

fn check_compatible(existing: &VolumeMeta, pool: &Pool, req: &NewVolume) -> Result<()> {
    let conflict = |existing: String, requested: String| Error::Conflict {
        id: req.id.clone(),
        existing,
        requested,
    };
    if existing.pool != pool.name {
        return Err(conflict(
            format!("pool {}", existing.pool),
            format!("pool {}", pool.name),
        ));
    }
    if existing.access != req.access {
        return Err(conflict(
            existing.access.to_string(),
            req.access.to_string(),
        ));
    }
    if let Some(asked) = req.allocation
        && asked != existing.allocation
    {
        return Err(conflict(
            format!("allocation {}", existing.allocation),
            format!("allocation {asked}"),
        ));
    }
    if !pool::fits(existing.capacity_bytes, req.required, req.limit) {
        return Err(conflict(
            format!("capacity {} bytes", existing.capacity_bytes),
            format!(
                "required_bytes {} and limit_bytes {}",
                req.required, req.limit
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Store {
        Store::open(&[PoolSpec::new("p", BackendKind::Dir, dir.join("pool"))
            .with_reserve(crate::storage::Reserve::Bytes(0))])
        .unwrap()
    }

    fn new_volume(id: &str, required: u64) -> NewVolume {
        NewVolume {
            id: VolumeId::parse(id).unwrap(),
            pool: None,
            access: AccessKind::Mount {
                fs_type: FsType::Ext4,
            },
            required,
            limit: 0,
            allocation: None,
        }
    }

    #[test]
    fn create_is_idempotent_and_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let (a, created) = s.create(&new_volume("v1", pool::MIB)).unwrap();
        assert!(created);
        let (b, created) = s.create(&new_volume("v1", pool::MIB)).unwrap();
        assert!(!created);
        assert_eq!(a, b);
        assert!(matches!(
            s.create(&new_volume("v1", 2 * pool::MIB)),
            Err(Error::Conflict { .. })
        ));
        drop(s);
        let s = store(tmp.path());
        assert_eq!(s.get(&a.id), Some(a));
    }

    #[test]
    fn leftovers_are_removed_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.create(&new_volume("v1", pool::MIB)).unwrap();
        drop(s);
        let root = tmp.path().join("pool");
        fs::create_dir(root.join(".tmp-v2")).unwrap();
        fs::create_dir(root.join(".del-v3-1")).unwrap();
        let s = store(tmp.path());
        assert_eq!(s.len(), 1);
        assert!(!root.join(".tmp-v2").exists());
        assert!(!root.join(".del-v3-1").exists());
    }

    #[test]
    fn unfinished_creates_are_removed_but_folders_with_data_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        s.create(&new_volume("v1", pool::MIB)).unwrap();
        drop(s);
        let root = tmp.path().join("pool");
        // Interrupted before the record: folder and empty data only.
        fs::create_dir_all(root.join("v2/data")).unwrap();
        // Interrupted before the record's fsync: an empty record.
        fs::create_dir_all(root.join("v3/data")).unwrap();
        fs::write(root.join("v3/volume.json"), b"").unwrap();
        // Interrupted before the record's data reached the disk (xfs).
        fs::create_dir_all(root.join("v6/data")).unwrap();
        fs::write(root.join("v6/volume.json"), [0u8; 230]).unwrap();
        // Data without a record, and data beside a damaged record: kept.
        fs::create_dir_all(root.join("v4/data")).unwrap();
        fs::write(root.join("v4/data/precious"), b"x").unwrap();
        fs::create_dir_all(root.join("v5/data")).unwrap();
        fs::write(root.join("v5/volume.json"), b"{garbage").unwrap();
        // A thick image, reserved and never written, before its record:
        // removed; one with a byte written: kept.
        for v in ["v7", "v8"] {
            fs::create_dir_all(root.join(v)).unwrap();
            image::create_file(
                &root.join(v).join(image::IMAGE_FILE),
                pool::MIB,
                Allocation::Thick,
            )
            .unwrap();
        }
        std::os::unix::fs::FileExt::write_at(
            &fs::OpenOptions::new()
                .write(true)
                .open(root.join("v8").join(image::IMAGE_FILE))
                .unwrap(),
            b"x",
            0,
        )
        .unwrap();

        let s = store(tmp.path());
        assert_eq!(s.len(), 1);
        assert!(!root.join("v2").exists());
        assert!(!root.join("v3").exists());
        assert!(!root.join("v6").exists());
        assert!(!root.join("v7").exists());
        assert!(root.join("v8").join(image::IMAGE_FILE).exists());
        assert!(root.join("v4/data/precious").exists());
        assert!(root.join("v5/volume.json").exists());
        // The create of an unfinished volume can run again.
        s.create(&new_volume("v2", pool::MIB)).unwrap();
        // A folder that is in the way is named, not overwritten.
        let err = s.create(&new_volume("v4", pool::MIB)).unwrap_err();
        assert!(err.to_string().contains("no volume record"), "{err}");
        assert!(root.join("v4/data/precious").exists());
    }

    #[test]
    fn delete_removes_folder_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let (m, _) = s.create(&new_volume("v1", pool::MIB)).unwrap();
        let dir = s.volume_dir(&m).unwrap();
        assert!(s.delete(&m.id).unwrap());
        assert!(!dir.exists());
        assert!(!s.delete(&m.id).unwrap());
        assert_eq!(fs::read_dir(tmp.path().join("pool")).unwrap().count(), 0);
    }

    #[test]
    fn pagination_walks_ids_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        for i in 0..5 {
            s.create(&new_volume(&format!("v{i}"), pool::MIB)).unwrap();
        }
        let (page, more) = s.list(None, 2);
        assert_eq!(page.len(), 2);
        assert!(more);
        let (page, more) = s.list(Some(&page[1].id), 10);
        assert_eq!(page.len(), 3);
        assert!(!more);
    }

    #[test]
    fn never_over_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let pool = s.pool(None).unwrap();
        let avail = s.capacity(pool, None).unwrap().available;
        let too_big = new_volume("big", avail + pool::GIB);
        let err = s.create(&too_big).unwrap_err();
        assert!(matches!(err, Error::Exhausted { .. }));
        // People read it in the claim's event: sizes in their units, and
        // the exact bytes.
        let text = err.to_string();
        let asked = crate::provisioner::quantity::human((avail + pool::GIB) as i64);
        for part in [asked.as_str(), "free", &pool.name] {
            assert!(text.contains(part), "{part} in {text}");
        }
        // The exact bytes the pool had: what it was asked against, give or
        // take what other tests wrote to the same filesystem meanwhile.
        let Error::Exhausted { available, .. } = err else {
            unreachable!("checked above")
        };
        assert!(
            text.contains(&format!("vs {available} bytes")),
            "{available} in {text}"
        );
        assert!(
            available.abs_diff(avail) < pool::GIB,
            "{available} vs {avail}"
        );
        assert!(s.is_empty());
    }
}
