//! Snapshots, and volumes made from a snapshot or from another volume.
//!
//! A snapshot lives in the pool of its source, under `.snapshots/`, and is
//! independent of it: deleting the source leaves its snapshots whole.
//!
//! ```text
//! <pool>/.snapshots/<folder>/snapshot.json   the record, written last
//! <pool>/.snapshots/<folder>/disk.img        image: a reflink clone or sparse copy
//! <pool>/.snapshots/<folder>/data/           dir: the tree, file by file
//! <pool>/.snapshots/.del-<folder>-<n>        a snapshot being deleted
//! ```
//!
//! The same record-last rule as volumes: a snapshot folder without a record
//! was never acknowledged and only holds a copy, so opening the pool
//! removes it. A volume filled from a source carries a `.restoring` marker
//! from before its first byte of data until its record exists, so that a
//! crash in the middle leaves a folder recovery knows to remove (a volume
//! folder with data and no record is otherwise kept, since it could hold a
//! user's writes).
//!
//! Consistency: an `image` volume that is mounted is frozen (FIFREEZE) for
//! the moment of the copy, so the copy is what a crash at that instant would
//! have left; a raw block volume in use is copied only by reflink, which the
//! pool's filesystem makes atomic with respect to writes of the image. A
//! `dir` volume cannot be frozen without freezing the whole pool: each file
//! is copied as it is when its turn comes.
//!
//! Capacity: a sparse copy takes its blocks from the pool's free space at
//! once. A reflink clone takes none until the source or the clone
//! overwrites the shared blocks, so it promises what it holds. A volume
//! restored or cloned by reflink does the same: the bytes it shares at its
//! creation (`shared_bytes` in its record) are promised on top of what it
//! has not allocated. With both, a source, its snapshots and their
//! restores together never promise more than the pool can write.
//!
//! Thick images and reflinks. A reflink shares only *written* extents: xfs
//! does not share the reserved, unwritten extents of a thick image (a clone
//! has holes there), btrfs may. So:
//! - a snapshot of a thick volume holds (and promises) what the volume had
//!   written; the volume's unwritten reserve stays its own;
//! - a thick restore or clone is reserved whole once the copy is in
//!   (fallocate over its size fills every hole the copy left, and never
//!   unshares what it shares); its shared bytes are promised, as above.
//!   Unsharing them (FALLOC_FL_UNSHARE_RANGE) would be a full copy and
//!   defeat the reflink;
//! - what is shared is accounted, not reserved: Stead promises no one the
//!   room its copy-on-write needs, but a writer outside Stead can still
//!   take it. A thick volume that shares blocks with a snapshot or a copy
//!   is immune to a full pool only in its unshared blocks; one that must
//!   be immune whole should have its snapshots deleted or be restored on a
//!   pool without reflink (a sparse copy, reserved whole).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::copy::{self, CopyMethod, Frozen};
use super::kind::{AccessKind, BackendKind, FsType};
use super::meta::{self, VolumeMeta};
use super::store::{self, DEL_PREFIX, Filled, NewVolume, Pool, Store};
use super::{Error, Result, VolumeId, attach, dir, image, io_at};

/// Folder of a pool that holds its snapshots.
pub const SNAPSHOT_DIR: &str = ".snapshots";
/// Name of the snapshot record inside a snapshot folder.
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// Marker of a volume folder being filled from a source (see module doc).
pub const RESTORING_FILE: &str = ".restoring";
/// Prefix of the marker of a freeze in progress (see [`thaw_leftovers`]).
const FREEZING_PREFIX: &str = ".freezing-";

/// Where the data of a new volume comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "id")]
pub enum ContentSource {
    Snapshot(VolumeId),
    Volume(VolumeId),
}

impl std::fmt::Display for ContentSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ContentSource::Snapshot(id) => write!(f, "snapshot {id}"),
            ContentSource::Volume(id) => write!(f, "volume {id}"),
        }
    }
}

/// How a copy was made, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Reflink,
    Copy,
}

impl From<CopyMethod> for Method {
    fn from(m: CopyMethod) -> Self {
        match m {
            CopyMethod::Reflink => Method::Reflink,
            CopyMethod::Copy => Method::Copy,
        }
    }
}

/// The record of one snapshot (`snapshot.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub version: u32,
    pub id: VolumeId,
    /// The volume it was taken of (which may be gone since).
    pub source: VolumeId,
    pub pool: String,
    pub backend: BackendKind,
    /// The source's capacity when the snapshot was taken: the smallest
    /// volume it restores into.
    pub size_bytes: u64,
    pub access: AccessKind,
    /// The filesystem the source carried, if it had been formatted.
    #[serde(default)]
    pub formatted: Option<FsType>,
    /// Seconds and nanoseconds since the epoch.
    pub created_secs: i64,
    pub created_nanos: i32,
    pub method: Method,
    /// What the copy holds on the pool's filesystem.
    pub allocated_bytes: u64,
    /// Folder name inside `.snapshots` (derived from the id).
    pub folder: String,
}

impl SnapshotMeta {
    /// What the snapshot may still take from the pool's free space.
    pub(super) fn promised(&self) -> u64 {
        match self.method {
            Method::Reflink => self.allocated_bytes,
            Method::Copy => 0,
        }
    }
}

/// The data of a volume or snapshot folder.
fn data_in(folder: &Path, backend: BackendKind) -> PathBuf {
    match backend {
        BackendKind::Dir => folder.join(dir::DATA_DIR),
        BackendKind::Image => folder.join(image::IMAGE_FILE),
    }
}

/// What a source's data occupies now.
fn allocated(store: &Store, meta: &VolumeMeta, data: &Path) -> u64 {
    match meta.backend {
        BackendKind::Image => image::allocated_bytes(data),
        BackendKind::Dir => store.dir_used(meta).unwrap_or(0),
    }
}

impl Pool {
    pub(super) fn snapshot_root(&self) -> PathBuf {
        self.root.join(SNAPSHOT_DIR)
    }

    /// Removes unfinished and interrupted snapshots, then reads every
    /// snapshot record of the pool.
    pub(super) fn recover_and_scan_snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        let root = self.snapshot_root();
        let entries = match fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_at("reading snapshots", &root)(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_at("reading snapshots", &root))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let record = if name.starts_with(DEL_PREFIX) {
                None
            } else {
                meta::read_json::<SnapshotMeta>(&path, SNAPSHOT_FILE).unwrap_or(None)
            };
            match record {
                Some(mut m) if m.id.folder_name().ok().as_deref() == Some(name.as_str()) => {
                    m.folder = name;
                    m.pool = self.name.clone();
                    found.push(m);
                }
                Some(m) => {
                    tracing::error!(pool = %self.name, path = %path.display(), snapshot.id = %m.id,
                        "snapshot record does not match its folder name; ignored");
                }
                None => {
                    // Never acknowledged (no readable record) or being
                    // deleted: only a copy, nothing of a user's own.
                    tracing::info!(pool = %self.name, path = %path.display(),
                        "removing an unfinished or interrupted snapshot");
                    if let Err(e) = fs::remove_dir_all(&path) {
                        tracing::warn!(pool = %self.name, path = %path.display(), error = %e,
                            "could not remove snapshot leftover");
                    }
                }
            }
        }
        Ok(found)
    }
}

/// Whether a volume folder without a record is a fill from a source that
/// was interrupted (see module doc).
pub(super) fn interrupted_fill(folder: &Path) -> bool {
    folder.join(RESTORING_FILE).exists()
}

/// The filesystem to freeze while a live volume is copied, or a refusal
/// when no consistent copy can be made of it.
fn freeze_point(store: &Store, meta: &VolumeMeta, reflink: bool) -> Result<Option<PathBuf>> {
    if meta.backend != BackendKind::Image {
        return Ok(None);
    }
    let staged = attach::live_staging(store, meta).map_err(|e| Error::Busy {
        id: meta.id.clone(),
        reason: format!("whether it is staged cannot be told: {e}"),
    })?;
    let Some(staged) = staged else {
        return Ok(None);
    };
    match meta.access {
        AccessKind::Mount { .. } => Ok(Some(staged)),
        AccessKind::Block if reflink => Ok(None),
        AccessKind::Block => Err(Error::Busy {
            id: meta.id.clone(),
            reason: format!(
                "it is a block volume in use (staged at {}) and pool {} cannot clone by reflink, so a copy would not be consistent; stop its pod first",
                staged.display(),
                meta.pool
            ),
        }),
    }
}

/// The marker, in the pool's snapshot folder, of a freeze of volume
/// `folder` in progress: it names the mount point, so that an agent killed
/// while the filesystem is frozen thaws it at its next start.
fn freeze_marker(pool: &Pool, folder: &str) -> PathBuf {
    pool.snapshot_root()
        .join(format!("{FREEZING_PREFIX}{folder}"))
}

/// Copies the data of live volume `meta` to `dst` (which must not exist),
/// its filesystem frozen for the moment of the copy when it is mounted.
fn copy_live(store: &Store, pool: &Pool, meta: &VolumeMeta, dst: &Path) -> Result<(Method, u64)> {
    copy_live_to(store, pool, meta, dst, false)
}

/// [`copy_live`], into an empty folder made for it when `into` (see
/// [`copy_data_to`]).
fn copy_live_to(
    store: &Store,
    pool: &Pool,
    meta: &VolumeMeta,
    dst: &Path,
    into: bool,
) -> Result<(Method, u64)> {
    let src = store.data_path(meta)?;
    let Some(mp) = freeze_point(store, meta, pool.reflink())? else {
        return copy_data_to(meta.backend, &src, dst, into);
    };
    let marker = freeze_marker(pool, &meta.folder);
    fs::create_dir_all(pool.snapshot_root())
        .and_then(|()| fs::write(&marker, mp.as_os_str().as_encoded_bytes()))
        .map_err(io_at("recording a freeze at", &marker))?;
    let frozen = Frozen::freeze(&mp).map_err(io_at("freezing the filesystem at", &mp));
    let copied = frozen.and_then(|f| {
        let copied = copy_data_to(meta.backend, &src, dst, into);
        f.thaw().map_err(io_at("thawing the filesystem at", &mp))?;
        copied
    });
    // Only once thawed: a marker left by a crash makes the next start thaw.
    let _ = fs::remove_file(&marker);
    copied
}

/// Thaws what an agent killed during a snapshot left frozen (see
/// [`freeze_marker`]); at start, before anything is served.
pub(super) fn thaw_leftovers(pool: &Pool) {
    let Ok(entries) = fs::read_dir(pool.snapshot_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(FREEZING_PREFIX) {
            continue;
        }
        let marker = entry.path();
        let Ok(raw) = fs::read(&marker) else {
            continue;
        };
        let mp = PathBuf::from(String::from_utf8_lossy(&raw).into_owned());
        match copy::thaw_if_frozen(&mp) {
            Ok(true) => tracing::warn!(pool = %pool.name, path = %mp.display(),
                "thawed a filesystem an interrupted snapshot left frozen"),
            Ok(false) => {}
            // Unmounted since (a reboot): nothing is frozen any more.
            Err(e) => tracing::info!(pool = %pool.name, path = %mp.display(), error = %e,
                "could not look at a filesystem an interrupted snapshot froze"),
        }
        let _ = fs::remove_file(&marker);
    }
}

/// Copies a volume's or snapshot's data; returns how, and what it holds.
/// `into`: `dst` is an empty folder made for the copy (a limited
/// subvolume) rather than a name that must not exist.
fn copy_data_to(backend: BackendKind, src: &Path, dst: &Path, into: bool) -> Result<(Method, u64)> {
    match backend {
        BackendKind::Image => {
            let m = copy::clone_file(src, dst).map_err(io_at("copying image", src))?;
            Ok((m.into(), image::allocated_bytes(dst)))
        }
        BackendKind::Dir => {
            let t = if into {
                copy::copy_tree_into(src, dst)
            } else {
                copy::copy_tree(src, dst)
            }
            .map_err(io_at("copying tree", src))?;
            Ok((t.method.into(), t.bytes))
        }
    }
}

fn now() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        i32::try_from(d.subsec_nanos()).unwrap_or(0),
    )
}

impl Store {
    /// The data of a snapshot: its image file (image) or tree (dir).
    pub fn snapshot_data_path(&self, meta: &SnapshotMeta) -> Result<PathBuf> {
        let pool = self.pool(Some(&meta.pool))?;
        Ok(data_in(
            &pool.snapshot_root().join(&meta.folder),
            meta.backend,
        ))
    }

    /// The record of a snapshot, if it exists.
    pub fn snapshot(&self, id: &VolumeId) -> Option<SnapshotMeta> {
        self.read_snapshots().get(id).cloned()
    }

    /// Snapshots in id order after `after`, optionally only those of one
    /// source, at most `max` (0: all), and whether more follow.
    pub fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        after: Option<&VolumeId>,
        max: usize,
    ) -> (Vec<SnapshotMeta>, bool) {
        use std::ops::Bound;
        let cache = self.read_snapshots();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = cache
            .range((lower, Bound::Unbounded))
            .map(|(_, m)| m)
            .filter(|m| source.is_none_or(|s| &m.source == s))
            .cloned();
        if max == 0 {
            return (it.collect(), false);
        }
        let page: Vec<_> = it.by_ref().take(max).collect();
        let more = it.next().is_some();
        (page, more)
    }

    /// Takes snapshot `id` of volume `source`, or returns the existing one
    /// when it is of the same source (CreateSnapshot is idempotent by name).
    /// The bool tells whether it was taken now. The caller holds the
    /// source's volume lock.
    pub fn create_snapshot(
        &self,
        id: &VolumeId,
        source: &VolumeId,
    ) -> Result<(SnapshotMeta, bool)> {
        if let Some(existing) = self.snapshot(id) {
            if &existing.source != source {
                return Err(Error::Conflict {
                    id: id.clone(),
                    existing: format!("a snapshot of volume {}", existing.source),
                    requested: format!("a snapshot of volume {source}"),
                });
            }
            return Ok((existing, false));
        }
        let src = self.require(source)?;
        let pool = self.pool(Some(&src.pool))?;
        let root = pool.snapshot_root();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_at("creating snapshot directory", &root))?;
        let folder_name = id.folder_name()?;
        let folder = root.join(&folder_name);

        let _reservation = pool.alloc.lock().unwrap_or_else(PoisonError::into_inner);
        let src_data = self.data_path(&src)?;
        let needed = allocated(self, &src, &src_data);
        let available = self.available(pool)?;
        if needed > available {
            return Err(Error::Exhausted {
                id: id.clone(),
                pool: pool.name.clone(),
                needed,
                available,
            });
        }
        match DirBuilder::new().mode(0o700).create(&folder) {
            Ok(()) => {}
            // Only a crash since this pool was opened leaves one: a copy
            // without a record, never acknowledged.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_dir_all(&folder)
                    .map_err(io_at("removing unfinished snapshot", &folder))?;
                DirBuilder::new()
                    .mode(0o700)
                    .create(&folder)
                    .map_err(io_at("creating snapshot folder", &folder))?;
            }
            Err(e) => return Err(io_at("creating snapshot folder", &folder)(e)),
        }
        let taken = (|| {
            let (method, allocated_bytes) =
                copy_live(self, pool, &src, &data_in(&folder, src.backend))?;
            let (created_secs, created_nanos) = now();
            let snap = SnapshotMeta {
                version: meta::FORMAT_VERSION,
                id: id.clone(),
                source: source.clone(),
                pool: pool.name.clone(),
                backend: src.backend,
                size_bytes: src.capacity_bytes,
                access: src.access,
                formatted: src.formatted,
                created_secs,
                created_nanos,
                method,
                allocated_bytes,
                folder: folder_name.clone(),
            };
            meta::create_json_durable(&folder, SNAPSHOT_FILE, &snap)
                .map_err(io_at("writing snapshot record", &folder))?;
            meta::sync_dir(&root).map_err(io_at("syncing snapshot directory", &root))?;
            Ok(snap)
        })();
        let snap = match taken {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        self.write_snapshots().insert(id.clone(), snap.clone());
        Ok((snap, true))
    }

    /// Deletes a snapshot. `Ok(false)` when it did not exist. Volumes
    /// restored from it are independent copies and stay.
    pub fn delete_snapshot(&self, id: &VolumeId) -> Result<bool> {
        let Some(snap) = self.snapshot(id) else {
            return Ok(false);
        };
        let pool = self.pool(Some(&snap.pool))?;
        let root = pool.snapshot_root();
        let folder = root.join(&snap.folder);
        let (secs, nanos) = now();
        let graveyard = root.join(format!("{DEL_PREFIX}{}-{secs}{nanos:09}", snap.folder));
        fs::rename(&folder, &graveyard).map_err(io_at("retiring snapshot folder", &folder))?;
        meta::sync_dir(&root).map_err(io_at("syncing snapshot directory", &root))?;
        self.write_snapshots().remove(id);
        fs::remove_dir_all(&graveyard).map_err(io_at("removing snapshot data", &graveyard))?;
        Ok(true)
    }

    /// What the snapshots of a pool may still take from its free space.
    pub(super) fn snapshots_promised(&self, pool: &Pool) -> u64 {
        self.read_snapshots()
            .values()
            .filter(|s| s.pool == pool.name)
            .map(SnapshotMeta::promised)
            .sum()
    }

    /// The pool, size and filesystem a volume filled from `source` must
    /// have, checked against the request.
    pub(super) fn plan_from_source(
        &self,
        req: &NewVolume,
        source: &ContentSource,
    ) -> Result<SourcePlan> {
        let (pool, backend, size, access, formatted) = match source {
            ContentSource::Snapshot(s) => {
                let snap = self
                    .snapshot(s)
                    .ok_or_else(|| Error::SourceNotFound(source.clone()))?;
                (
                    snap.pool,
                    snap.backend,
                    snap.size_bytes,
                    snap.access,
                    snap.formatted,
                )
            }
            ContentSource::Volume(v) => {
                let m = self
                    .get(v)
                    .ok_or_else(|| Error::SourceNotFound(source.clone()))?;
                (m.pool, m.backend, m.capacity_bytes, m.access, m.formatted)
            }
        };
        let refuse = |reason: String| Error::Source {
            id: req.id.clone(),
            from: source.clone(),
            reason,
        };
        if let Some(asked) = &req.pool
            && asked != &pool
        {
            return Err(refuse(format!(
                "it lies in pool {pool}, the request names pool {asked}; a copy stays in the pool of its source"
            )));
        }
        let compatible = match (access, req.access) {
            (AccessKind::Block, AccessKind::Block) => true,
            // A directory has no filesystem of its own.
            (AccessKind::Mount { .. }, AccessKind::Mount { .. }) if backend == BackendKind::Dir => {
                true
            }
            (AccessKind::Mount { fs_type }, AccessKind::Mount { fs_type: asked }) => {
                formatted.is_none() || fs_type == asked
            }
            _ => false,
        };
        if !compatible {
            return Err(refuse(format!(
                "it was made for {access}, the request asks for {}",
                req.access
            )));
        }
        // A copy is never smaller than its source. A range that only asks
        // for less (required_bytes below the source's size, and no limit or
        // one at least that size) is met by the source's size, as any create
        // is met by the next size the backend can hold: CSI's CapacityRange
        // is "at least" required_bytes and "not bigger than" limit_bytes.
        // Kubernetes asks that way: a clone's claim need only request what
        // its source's claim requested, and the source's volume may be
        // larger than that (rounded up to its filesystem's floor). Only a
        // limit below the source's size leaves no size to choose.
        if req.limit != 0 && req.limit < size {
            return Err(Error::SmallerThanSource {
                id: req.id.clone(),
                from: source.clone(),
                size,
                limit: req.limit,
            });
        }
        Ok(SourcePlan {
            pool,
            required: req.required.max(size),
            formatted,
        })
    }

    /// Fills the folder of a new volume from its source: marker first, the
    /// copy, then (by the caller) the record. What a reflink copy shares
    /// with its source is returned, to be promised (see module doc).
    pub(super) fn fill_from_source(
        &self,
        pool: &Pool,
        folder: &Path,
        meta: &VolumeMeta,
        source: &ContentSource,
    ) -> Result<Filled> {
        let marker = folder.join(RESTORING_FILE);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .and_then(|f| f.sync_all())
            .and_then(|()| meta::sync_dir(folder))
            .map_err(io_at("marking volume folder as being filled", folder))?;
        let dst = data_in(folder, meta.backend);
        // On a pool that enforces sizes the copy goes into a subvolume
        // limited to the new volume's size, made first.
        let quota = if meta.backend == BackendKind::Dir && pool.enforcement.enforced() {
            Some(store::limited_data_dir(pool, &dst, meta)?)
        } else {
            None
        };
        let into = quota.is_some();
        let (method, held) = match source {
            ContentSource::Snapshot(s) => {
                let snap = self
                    .snapshot(s)
                    .ok_or_else(|| Error::SourceNotFound(source.clone()))?;
                let pool = self.pool(Some(&snap.pool))?;
                let src = data_in(&pool.snapshot_root().join(&snap.folder), snap.backend);
                copy_data_to(snap.backend, &src, &dst, into)?
            }
            ContentSource::Volume(v) => {
                let src = self.require(v)?;
                let pool = self.pool(Some(&src.pool))?;
                copy_live_to(self, pool, &src, &dst, into)?
            }
        };
        if meta.backend == BackendKind::Image {
            // Larger than the source: grown like an expansion (the
            // filesystem follows at the next stage); thick: every block
            // the copy left a hole reserved now.
            image::grow_file(&dst, meta.capacity_bytes, meta.allocation).map_err(|source| {
                Error::Image {
                    id: meta.id.clone(),
                    source,
                }
            })?;
        }
        Ok(Filled {
            quota,
            shared_bytes: if method == Method::Reflink { held } else { 0 },
        })
    }
}

/// Removes the marker of a filled volume whose record is written; a marker
/// left by a crash after that is harmless (the record wins).
pub(super) fn filled(folder: &Path) {
    let _ = fs::remove_file(folder.join(RESTORING_FILE));
}

/// What a volume filled from a source will be.
#[derive(Debug)]
pub(super) struct SourcePlan {
    pub pool: String,
    pub required: u64,
    pub formatted: Option<FsType>,
}
