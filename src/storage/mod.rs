//! Pools, backends and the on-disk volume store. Knows nothing of gRPC or
//! Kubernetes.
//!
//! Layout of a pool directory:
//!
//! ```text
//! <pool>/<folder>/volume.json   the volume record (atomic writes)
//! <pool>/<folder>/node.json     staging/publication intent log
//! <pool>/<folder>/data/         dir backend: the volume's files
//! <pool>/<folder>/disk.img      image backend: the sparse image
//! <pool>/.tmp-<folder>          a volume being created (removed at start)
//! <pool>/.del-<folder>-<n>      a volume being deleted (removed at start)
//! ```
//!
//! A volume exists exactly when its folder with a `volume.json` exists: it
//! is assembled under `.tmp-` and renamed into place, and renamed away to
//! `.del-` before its contents are removed, so a crash at any instruction
//! leaves either the whole volume or none of it.

pub mod command;
pub mod dir;
pub mod id;
pub mod image;
pub mod meta;
pub mod pool;

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::statvfs::statvfs;
use nix::unistd::{AccessFlags, access};

pub use id::{IdError, VolumeId};
use image::ImageError;
use meta::Durability;
pub use meta::{AccessKind, FsType, NodeState, Published, Staged, VolumeMeta};
pub use pool::{BackendKind, PoolSpec, RangeError};

/// Folders of creates by earlier versions, assembled under a temporary name.
const TMP_PREFIX: &str = ".tmp-";
const DEL_PREFIX: &str = ".del-";

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
    #[error("volume {id}: {needed} bytes requested but pool {pool} can give {available} bytes")]
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
    #[error("volume {id}: {reason}")]
    Busy { id: VolumeId, reason: String },
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

/// A configured pool.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backend: BackendKind,
    pub root: PathBuf,
    /// Serializes capacity checks with the reservations they allow.
    alloc: Mutex<()>,
}

/// Space in a pool, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// What a new volume may still be given.
    pub available: u64,
    /// The smallest volume the pool creates for the access asked about.
    pub minimum: u64,
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
}

/// The volume store over all pools: the disk is the source of truth, the
/// map is a cache of every `volume.json`, loaded at start.
///
/// Callers serialize operations on one volume (the CSI layer holds a lock
/// per volume id); the store itself only guards its cache and each pool's
/// capacity reservations.
#[derive(Debug)]
pub struct Store {
    pools: Vec<Pool>,
    volumes: RwLock<BTreeMap<VolumeId, VolumeMeta>>,
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
            let pool = Pool {
                name: spec.name.clone(),
                backend: spec.backend,
                root: spec.path.clone(),
                alloc: Mutex::new(()),
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
            pools.push(pool);
        }
        Ok(Self {
            pools,
            volumes: RwLock::new(volumes),
        })
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
        let pool = self.pool(req.pool.as_deref())?;
        if let Some(existing) = self.get(&req.id) {
            check_compatible(&existing, pool, req)?;
            return Ok((existing, false));
        }
        if matches!(req.access, AccessKind::Block) && !pool.backend.supports_block() {
            return Err(Error::Unsupported {
                id: req.id.clone(),
                pool: pool.name.clone(),
                backend: pool.backend,
                what: "block volumes",
            });
        }
        let minimum = pool::minimum_size(pool.backend, Some(req.access));
        let size =
            pool::plan_size(req.required, req.limit, minimum).map_err(|source| Error::Range {
                id: req.id.clone(),
                source,
            })?;
        let folder = req.id.folder_name()?;
        let meta = VolumeMeta {
            version: meta::FORMAT_VERSION,
            id: req.id.clone(),
            pool: pool.name.clone(),
            backend: pool.backend,
            capacity_bytes: size,
            access: req.access,
            formatted: None,
            folder,
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
        assemble(&pool.root.join(&meta.folder), &meta)?;
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
        if meta.backend == BackendKind::Image {
            let img = dir.join(image::IMAGE_FILE);
            let image_err = |source| Error::Image {
                id: id.clone(),
                source,
            };
            image::grow_file(&img, size).map_err(image_err)?;
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

    fn save(&self, meta: &VolumeMeta) -> Result<()> {
        let dir = self.volume_dir(meta)?;
        meta::write_json(&dir, meta::VOLUME_FILE, meta, Durability::Disk)
            .map_err(io_at("writing volume record", &dir))?;
        self.write_cache().insert(meta.id.clone(), meta.clone());
        Ok(())
    }

    /// The node-side record of a volume.
    ///
    /// The record is not fsynced (see [`NodeState`]), so a power loss may
    /// leave it torn. Such a record is read as empty only when the kernel
    /// shows nothing of the volume in use: no loop device on its image, no
    /// mount of its data directory. Otherwise the volume is refused, naming
    /// the file, rather than risk treating a mounted volume as idle.
    pub fn node_state(&self, meta: &VolumeMeta) -> Result<NodeState> {
        let dir = self.volume_dir(meta)?;
        match meta::read_json(&dir, meta::NODE_FILE) {
            Ok(state) => Ok(state.unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let file = dir.join(meta::NODE_FILE);
                if let Some(usage) = self.kernel_usage(meta)? {
                    return Err(Error::Busy {
                        id: meta.id.clone(),
                        reason: format!(
                            "its node record {} is unreadable ({e}) while {usage}; repair or remove the record after checking the mounts",
                            file.display()
                        ),
                    });
                }
                tracing::warn!(volume.id = %meta.id, file = %file.display(), error = %e,
                    "node record unreadable (torn by a power loss?) and nothing of the volume is mounted or attached; treating it as neither staged nor published");
                Ok(NodeState::default())
            }
            Err(e) => Err(io_at("reading node record", &dir)(e)),
        }
    }

    /// What the kernel shows of a volume in use, independent of any record:
    /// a loop device on its image, or a mount whose root is its data folder.
    fn kernel_usage(&self, meta: &VolumeMeta) -> Result<Option<String>> {
        let data = self.data_path(meta)?;
        if meta.backend == BackendKind::Image {
            let dev = image::find_attached(&data).map_err(|source| Error::Image {
                id: meta.id.clone(),
                source,
            })?;
            return Ok(dev.map(|d| format!("its image is attached to {}", d.display())));
        }
        let st = match nix::sys::stat::stat(&data) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(io_at("inspecting data directory", &data)(e.into())),
        };
        let device = format!(
            "{}:{}",
            nix::sys::stat::major(st.st_dev),
            nix::sys::stat::minor(st.st_dev)
        );
        let suffix = Path::new(&meta.folder).join(dir::DATA_DIR);
        let table = crate::mount::mount_table().map_err(|e| Error::Io {
            what: "reading the mount table",
            path: "/proc/self/mountinfo".into(),
            source: io::Error::other(e),
        })?;
        Ok(table
            .iter()
            .find(|m| m.device == device && m.root.ends_with(&suffix))
            .map(|m| format!("its data is mounted at {}", m.mount_point.display())))
    }

    /// Replaces the node-side record of a volume (atomically, not fsynced:
    /// see [`NodeState`]).
    pub fn save_node_state(&self, meta: &VolumeMeta, state: &NodeState) -> Result<()> {
        let dir = self.volume_dir(meta)?;
        meta::write_json(&dir, meta::NODE_FILE, state, Durability::Process)
            .map_err(io_at("writing node record", &dir))
    }

    /// Capacity of a pool for volumes of the given access.
    pub fn capacity(&self, pool: &Pool, access: Option<AccessKind>) -> Result<PoolCapacity> {
        Ok(PoolCapacity {
            available: self.available(pool)?,
            minimum: pool::minimum_size(pool.backend, access),
        })
    }

    /// Free space of the pool's filesystem minus what existing volumes were
    /// promised and have not yet used. For `image` volumes "used" is what the
    /// sparse file has allocated; for `dir` volumes nothing is counted as
    /// used (measuring it means walking the tree), which errs on the side of
    /// never over-committing.
    fn available(&self, pool: &Pool) -> Result<u64> {
        let st = statvfs(&pool.root).map_err(|e| Error::Io {
            what: "statvfs of pool",
            path: pool.root.clone(),
            source: e.into(),
        })?;
        let free = st.blocks_available().saturating_mul(st.fragment_size());
        let promised: u64 = self
            .read_cache()
            .values()
            .filter(|m| m.pool == pool.name)
            .map(|m| match m.backend {
                BackendKind::Dir => m.capacity_bytes,
                BackendKind::Image => {
                    let img = pool.root.join(&m.folder).join(image::IMAGE_FILE);
                    m.capacity_bytes
                        .saturating_sub(image::allocated_bytes(&img).min(m.capacity_bytes))
                }
            })
            .sum();
        Ok(free.saturating_sub(promised))
    }

    /// Checks that every pool is usable: a writable directory whose
    /// filesystem answers statvfs.
    pub fn probe(&self) -> Result<()> {
        for pool in &self.pools {
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

    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<VolumeId, VolumeMeta>> {
        self.volumes.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<VolumeId, VolumeMeta>> {
        self.volumes.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Pool {
    /// Removes leftovers of interrupted creations and deletions, then reads
    /// every volume record in the pool.
    fn recover_and_scan(&self) -> Result<Vec<VolumeMeta>> {
        let mut found = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(io_at("reading pool", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io_at("reading pool", &self.root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with(TMP_PREFIX) || name.starts_with(DEL_PREFIX) {
                tracing::info!(pool = %self.name, path = %path.display(),
                    "removing leftover of an interrupted create or delete");
                if let Err(e) = remove_leftover(&path) {
                    tracing::warn!(pool = %self.name, path = %path.display(), error = %e,
                        "could not remove leftover");
                }
                continue;
            }
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match meta::read_json::<VolumeMeta>(&path, meta::VOLUME_FILE) {
                Ok(Some(mut m)) => {
                    if m.id.folder_name().ok().as_deref() != Some(name.as_str()) {
                        tracing::error!(pool = %self.name, path = %path.display(), volume.id = %m.id,
                            "volume record does not match its folder name; ignored");
                        continue;
                    }
                    m.folder = name;
                    m.pool = self.name.clone();
                    if m.backend != self.backend {
                        tracing::error!(pool = %self.name, volume.id = %m.id, volume.backend = %m.backend,
                            "volume backend differs from the pool's; ignored");
                        continue;
                    }
                    found.push(m);
                }
                Ok(None) | Err(_) if record_missing_or_empty(&path) && data_untouched(&path) => {
                    // A create interrupted before its record was on disk:
                    // never acknowledged, nothing written to it.
                    tracing::info!(pool = %self.name, path = %path.display(),
                        "removing the folder of an unfinished create (no record, no data)");
                    if let Err(e) = remove_leftover(&path) {
                        tracing::warn!(pool = %self.name, path = %path.display(), error = %e,
                            "could not remove leftover");
                    }
                }
                Ok(None) => {
                    tracing::error!(pool = %self.name, path = %path.display(),
                        "folder with data but without volume.json in pool; kept and ignored");
                }
                Err(e) => {
                    tracing::error!(pool = %self.name, path = %path.display(), error = %e,
                        "unreadable volume record beside data; kept and ignored");
                }
            }
        }
        Ok(found)
    }
}

/// Removes a `.tmp-`/`.del-` leftover, first detaching a loop device an
/// interrupted delete may have left on its image.
fn remove_leftover(path: &Path) -> io::Result<()> {
    let img = path.join(image::IMAGE_FILE);
    if img.exists()
        && let Ok(Some(dev)) = image::find_attached(&img)
    {
        image::detach(&dev).map_err(io::Error::other)?;
    }
    fs::remove_dir_all(path)
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
fn assemble(folder: &Path, meta: &VolumeMeta) -> Result<()> {
    match DirBuilder::new().mode(0o700).create(folder) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(io_at(FOLDER_EXISTS, folder)(e));
        }
        Err(e) => return Err(io_at("creating volume folder", folder)(e)),
    }
    // From here the folder is ours: a failure takes it away again.
    let filled = fill(folder, meta);
    if filled.is_err() {
        let _ = fs::remove_dir_all(folder);
    }
    filled
}

/// The data, then the durable record, of a volume folder just created.
fn fill(folder: &Path, meta: &VolumeMeta) -> Result<()> {
    match meta.backend {
        BackendKind::Dir => {
            let data = folder.join(dir::DATA_DIR);
            dir::create_data_dir(&data).map_err(io_at("creating data directory", &data))?;
        }
        BackendKind::Image => {
            image::create_file(&folder.join(image::IMAGE_FILE), meta.capacity_bytes).map_err(
                |source| Error::Image {
                    id: meta.id.clone(),
                    source,
                },
            )?;
        }
    }
    meta::create_json_durable(folder, meta::VOLUME_FILE, meta)
        .map_err(io_at("writing volume record", folder))?;
    let pool = folder.parent().unwrap_or(Path::new("/"));
    meta::sync_dir(pool).map_err(io_at("syncing pool directory", pool))
}

/// Whether a volume folder has no record or an empty one, as opposed to a
/// damaged record. A crash before the record's fsync leaves it missing,
/// empty, or (xfs) its size with zeros in place of the bytes.
fn record_missing_or_empty(folder: &Path) -> bool {
    let record = folder.join(meta::VOLUME_FILE);
    match fs::symlink_metadata(&record) {
        Ok(m) if !m.is_file() => false,
        Ok(m) if m.len() == 0 => true,
        // A record is a few hundred bytes; anything large is not a torn one.
        Ok(m) if m.len() <= 64 * 1024 => {
            fs::read(&record).is_ok_and(|bytes| bytes.iter().all(|&b| b == 0))
        }
        Ok(_) => false,
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Whether a volume folder's data was never written: an empty `data`
/// directory, or an image file with no block allocated.
fn data_untouched(folder: &Path) -> bool {
    let data = folder.join(dir::DATA_DIR);
    if let Ok(mut entries) = fs::read_dir(&data) {
        return entries.next().is_none();
    }
    let img = folder.join(image::IMAGE_FILE);
    match fs::symlink_metadata(&img) {
        Ok(m) => m.is_file() && image::allocated_bytes(&img) == 0,
        // Neither data nor image: the create stopped before making either.
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
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
            describe_access(existing.access),
            describe_access(req.access),
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

/// Human wording of an access kind for messages.
pub fn describe_access(a: AccessKind) -> String {
    match a {
        AccessKind::Block => "block access".into(),
        AccessKind::Mount { fs_type } => format!("mount access with fsType {}", fs_type.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Store {
        Store::open(&[PoolSpec {
            name: "p".into(),
            backend: BackendKind::Dir,
            path: dir.join("pool"),
        }])
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

        let s = store(tmp.path());
        assert_eq!(s.len(), 1);
        assert!(!root.join("v2").exists());
        assert!(!root.join("v3").exists());
        assert!(!root.join("v6").exists());
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
        assert!(matches!(s.create(&too_big), Err(Error::Exhausted { .. })));
        assert!(s.is_empty());
    }
}
