//! Attach: the node side of a volume's life — stage, publish, unpublish,
//! unstage, grow the filesystem — as a state machine over the volume's node
//! record and the kernel's truth (mounts, loop devices). Knows nothing of
//! gRPC: every refusal is a typed [`Error`] that the CSI layer maps to its
//! code in one table.
//!
//! Staging makes the volume's filesystem (or device) available at the
//! staging path; publishing bind-mounts that into the pod's target path.
//! The node record ([`record`]) is an intent log of both, written before a
//! mount and cleared after an unmount; the kernel says which of its entries
//! are live, so a record that survived a reboot is harmless. Staging and
//! target paths are confined to the kubelet directory and used through
//! handles ([`target`]).
//!
//! Callers hold the volume's lock around every call here.

pub mod record;
pub mod stats;
pub mod target;

use std::fs;
use std::path::{Path, PathBuf};

use super::image::{self, ImageError};
use super::kind::{AccessKind, Allocation, BackendKind, Capability, FsType, Sharing};
use super::meta::VolumeMeta;
use super::{Store, VolumeId};
use crate::mount;
pub use record::{Attachment, NodeState, Published, Staged};
pub use target::{Confinement, Kind, Target};

/// Why an attach step was refused or failed; each names the volume or path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] super::Error),
    /// Boxed here and below: an image error carries a command's output.
    #[error("volume {id}: {source}")]
    Image {
        id: VolumeId,
        #[source]
        source: Box<ImageError>,
    },
    #[error("volume {id}: at {}: {source}", path.display())]
    Mount {
        id: VolumeId,
        path: PathBuf,
        #[source]
        source: mount::Error,
    },
    #[error(transparent)]
    Kernel(#[from] mount::Error),
    #[error(
        "volume_capability: volume {id} was created for {created}, the request asks for {asked}"
    )]
    AccessMismatch {
        id: VolumeId,
        created: AccessKind,
        asked: AccessKind,
    },
    #[error(
        "volume_capability: mount option {option:?} cannot apply to volume {id}: it is a directory bind-mounted from its pool, which takes only ro, rw, nosuid, nodev, noexec, noatime, nodiratime, relatime and strictatime"
    )]
    BindOption { id: VolumeId, option: String },
    #[error("volume {id} is already staged at {}; unstage it there first", at.display())]
    StagedElsewhere { id: VolumeId, at: PathBuf },
    #[error("volume {id} is not staged at {}; call NodeStageVolume first", staging.display())]
    NotStaged { id: VolumeId, staging: PathBuf },
    #[error("volume {id} is still published at {}; unpublish it first", at.display())]
    StillPublished { id: VolumeId, at: PathBuf },
    #[error("volume {id} is already published at {} with readonly={readonly}", target.display())]
    PublishedWithOtherMode {
        id: VolumeId,
        target: PathBuf,
        readonly: bool,
    },
    #[error("volume {id} is SINGLE_NODE_SINGLE_WRITER and already published at {}", at.display())]
    PublishedElsewhere { id: VolumeId, at: PathBuf },
    #[error("volume {id}: no loop device is attached; stage it again")]
    NoLoopDevice { id: VolumeId },
    #[error("volume {id} is still in use on this node: {usage}; unpublish and unstage it first")]
    InUse { id: VolumeId, usage: String },
    #[error("volume {id} is neither published nor staged at {}", path.display())]
    NotAtPath { id: VolumeId, path: PathBuf },
    #[error(
        "volume {id}: {required} bytes asked but the volume has {capacity} bytes; call ControllerExpandVolume first"
    )]
    BeyondCapacity {
        id: VolumeId,
        required: u64,
        capacity: u64,
    },
    #[error("volume {id} has no filesystem yet")]
    NoFilesystem { id: VolumeId },
    #[error(
        "volume {id}: its image carries no filesystem signature although a {} filesystem was created on it; refusing to format it again (data may be recoverable)",
        had.as_str()
    )]
    SignatureLost { id: VolumeId, had: FsType },
    #[error(
        "volume {id}: its image carries a {signature:?} signature; Stead mounts only ext4 or xfs and never formats over existing data"
    )]
    ForeignSignature { id: VolumeId, signature: String },
    #[error(
        "volume {id}: growing the mounted ext4 filesystem on {} failed ({source}); online ext4 resize needs CAP_SYS_RESOURCE — unstage and stage the volume again to grow it offline, or use xfs for online expansion",
        device.display()
    )]
    Ext4OnlineGrowth {
        id: VolumeId,
        device: PathBuf,
        #[source]
        source: Box<ImageError>,
    },
    #[error("{} is still mounted after 8 unmounts", path.display())]
    StillMounted { path: PathBuf },
    #[error("{field}: {} is not under the kubelet directory {}", path.display(), kubelet.display())]
    PathOutsideKubelet {
        field: &'static str,
        path: PathBuf,
        kubelet: PathBuf,
    },
    #[error("{field}: {} is a pool or lies in pool {} of this node", path.display(), pool.display())]
    PathInPool {
        field: &'static str,
        path: PathBuf,
        pool: PathBuf,
    },
    #[error("{field}: {} is a symlink", path.display())]
    PathIsSymlink { field: &'static str, path: PathBuf },
    #[error("{field}: {} exists and is {}a directory", path.display(), if *is_dir { "" } else { "not " })]
    WrongKind {
        field: &'static str,
        path: PathBuf,
        is_dir: bool,
    },
    #[error("{what} {}: {source}", path.display())]
    PathIo {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn image_err(meta: &VolumeMeta) -> impl FnOnce(ImageError) -> Error + '_ {
    move |source| Error::Image {
        id: meta.id.clone(),
        source: Box::new(source),
    }
}

fn mount_err<'a>(meta: &'a VolumeMeta, at: &'a Path) -> impl FnOnce(mount::Error) -> Error + 'a {
    move |source| Error::Mount {
        id: meta.id.clone(),
        path: at.to_owned(),
        source,
    }
}

fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

/// Checks that a capability fits the access type the volume was created
/// with (a filesystem volume is not handed out as a raw device, nor the
/// reverse; an explicit fsType must be the one the volume has).
pub fn check_access(meta: &VolumeMeta, cap: &Capability) -> Result<()> {
    let mismatch = || Error::AccessMismatch {
        id: meta.id.clone(),
        created: meta.access,
        asked: cap.access,
    };
    match (meta.access, cap.access) {
        (AccessKind::Block, AccessKind::Block) => Ok(()),
        (AccessKind::Mount { fs_type: have }, AccessKind::Mount { fs_type: want }) => {
            // The dir backend has no filesystem of its own: fsType is moot.
            if meta.backend == BackendKind::Image && cap.explicit_fs && have != want {
                return Err(mismatch());
            }
            Ok(())
        }
        _ => Err(mismatch()),
    }
}

/// Whether the staging recorded for a volume is live.
fn staged_live(store: &Store, meta: &VolumeMeta, staged: &Staged) -> Result<bool> {
    match meta.access {
        // A raw block volume is staged by attaching its loop device.
        AccessKind::Block => {
            let img = store.data_path(meta)?;
            Ok(image::find_attached(&img)
                .map_err(image_err(meta))?
                .is_some())
        }
        AccessKind::Mount { .. } => Ok(mount::is_mounted(&staged.path)?),
    }
}

/// The loop device of an image volume; [`Error::NoLoopDevice`] when it is
/// not attached (not staged, or a reboot detached it).
fn attached_device(store: &Store, meta: &VolumeMeta) -> Result<PathBuf> {
    image::find_attached(&store.data_path(meta)?)
        .map_err(image_err(meta))?
        .ok_or_else(|| Error::NoLoopDevice {
            id: meta.id.clone(),
        })
}

/// The publications of a volume that are mounted right now.
fn live_publications(state: &NodeState) -> Result<Vec<Published>> {
    let mut live = Vec::new();
    for p in &state.published {
        if mount::is_mounted(&p.path)? {
            live.push(p.clone());
        }
    }
    Ok(live)
}

/// Where a volume is staged right now, if it is (a snapshot freezes the
/// filesystem mounted there).
pub fn live_staging(store: &Store, meta: &VolumeMeta) -> Result<Option<PathBuf>> {
    let state = store.node_state(meta)?;
    match &state.staged {
        Some(s) if staged_live(store, meta, s)? => Ok(Some(s.path.clone())),
        _ => Ok(None),
    }
}

/// How a volume is in use on this node, if it is.
pub fn live_usage(store: &Store, meta: &VolumeMeta) -> Result<Option<String>> {
    let state = store.node_state(meta)?;
    if let Some(p) = live_publications(&state)?.first() {
        return Ok(Some(format!("published at {}", p.path.display())));
    }
    if let Some(s) = &state.staged
        && staged_live(store, meta, s)?
    {
        return Ok(Some(format!("staged at {}", s.path.display())));
    }
    Ok(None)
}

/// Refuses with [`Error::InUse`] when the volume is staged or published on
/// this node (DeleteVolume's precondition).
pub fn ensure_unused(store: &Store, meta: &VolumeMeta) -> Result<()> {
    match live_usage(store, meta)? {
        Some(usage) => Err(Error::InUse {
            id: meta.id.clone(),
            usage,
        }),
        None => Ok(()),
    }
}

/// NodeStageVolume: the volume's filesystem (or loop device) at `staging`.
pub fn stage(
    store: &Store,
    paths: &Confinement,
    meta: &VolumeMeta,
    staging: &Path,
    cap: &Capability,
) -> Result<()> {
    check_access(meta, cap)?;
    // Its image is a placeholder until the data from another node is in
    // and verified (see `storage::incoming`); no PV names it before.
    if store.is_incoming(meta) {
        return Err(super::Error::Busy {
            id: meta.id.clone(),
            reason: "its data is still arriving from another node; it can be staged once its PersistentVolume exists".into(),
        }
        .into());
    }
    let bind_flags = dir_bind_flags(meta, cap)?;
    let target = paths.open(staging, "staging_target_path", true)?;
    let mut state = store.node_state(meta)?;
    if let Some(s) = &state.staged
        && staged_live(store, meta, s)?
    {
        if same_path(&s.path, staging) {
            return Ok(());
        }
        return Err(Error::StagedElsewhere {
            id: meta.id.clone(),
            at: s.path.clone(),
        });
    }
    target.ensure(Kind::Dir)?;
    state.staged = Some(Staged {
        path: staging.to_owned(),
    });
    store.save_node_state(meta, &state)?;
    let res = match (meta.backend, meta.access) {
        (BackendKind::Dir, _) => {
            if target.is_mounted()? {
                Ok(())
            } else {
                let data = store.data_path(meta)?;
                target
                    .with_resolved(|at| mount::bind(&data, at).map_err(mount_err(meta, staging)))
                    .and_then(|()| {
                        if bind_flags.is_empty() {
                            return Ok(());
                        }
                        // Through a path resolved now: the new mount's root.
                        let flagged = target.with_resolved(|at| {
                            mount::remount_bind(at, bind_flags).map_err(mount_err(meta, staging))
                        });
                        if flagged.is_err() {
                            let _ = unmount_all(&target);
                        }
                        flagged
                    })
            }
        }
        (BackendKind::Image, AccessKind::Block) => {
            let img = store.data_path(meta)?;
            keep_reserved(meta, &img);
            image::attach(&img).map(drop).map_err(image_err(meta))
        }
        (BackendKind::Image, AccessKind::Mount { fs_type }) => {
            stage_filesystem(store, meta, &target, fs_type, &cap.mount_flags)
        }
    };
    if let Err(e) = res {
        // Undo what was done, so a failed stage leaves nothing attached.
        if !target.is_mounted().unwrap_or(true) {
            if meta.backend == BackendKind::Image
                && let Ok(img) = store.data_path(meta)
                && let Ok(Some(dev)) = image::find_attached(&img)
            {
                let _ = image::detach(&dev);
            }
            state.staged = None;
            let _ = store.save_node_state(meta, &state);
        }
        return Err(e);
    }
    Ok(())
}

/// The mount options of a capability, as the flags of a `dir` volume's
/// bind mount (none for an image volume, whose filesystem mount takes
/// them). A directory has no filesystem of its own, so an option of one
/// (`discard`, `data=ordered`) is refused by name rather than dropped.
fn dir_bind_flags(meta: &VolumeMeta, cap: &Capability) -> Result<nix::mount::MsFlags> {
    if meta.backend != BackendKind::Dir {
        return Ok(nix::mount::MsFlags::empty());
    }
    mount::bind_flags(&cap.mount_flags).map_err(|option| Error::BindOption {
        id: meta.id.clone(),
        option,
    })
}

/// Reserves again the blocks of a thick image that discards from inside
/// gave back to the pool since its last stage (see `image`). A pool that
/// has no room for them any more does not stop the stage: the volume works,
/// thin where the holes are, and the log says so.
fn keep_reserved(meta: &VolumeMeta, img: &Path) {
    if meta.allocation != Allocation::Thick {
        return;
    }
    if let Err(e) = image::reserve(img) {
        tracing::warn!(volume.id = %meta.id, error = %e,
            "a thick volume's image could not be reserved whole again; writes into its holes may fail when the pool is full");
    }
}

/// Attaches an image, creates its filesystem on first use only, grows it if
/// the image grew while it was not staged, and mounts it at `staging`.
fn stage_filesystem(
    store: &Store,
    meta: &VolumeMeta,
    staging: &Target,
    wanted: FsType,
    flags: &[String],
) -> Result<()> {
    let img = store.data_path(meta)?;
    keep_reserved(meta, &img);
    let dev = image::attach(&img).map_err(image_err(meta))?;
    let signature = image::probe_signature(&dev).map_err(image_err(meta))?;
    let fs = match (signature.as_deref(), meta.formatted) {
        (None, None) => {
            image::mkfs(&dev, wanted).map_err(image_err(meta))?;
            store.mark_formatted(&meta.id, wanted)?;
            tracing::info!(volume.id = %meta.id, fs = wanted.as_str(), device = %dev.display(), "filesystem created");
            wanted
        }
        (None, Some(had)) => {
            return Err(Error::SignatureLost {
                id: meta.id.clone(),
                had,
            });
        }
        (Some(sig), _) => {
            let Some(found) = FsType::parse(sig).filter(|_| !sig.is_empty()) else {
                return Err(Error::ForeignSignature {
                    id: meta.id.clone(),
                    signature: sig.to_owned(),
                });
            };
            if meta.formatted.is_none() {
                // mkfs finished but the agent died before recording it.
                store.mark_formatted(&meta.id, found)?;
            }
            found
        }
    };
    let dev_size = image::device_size(&dev).map_err(image_err(meta))?;
    if !staging.is_mounted()? {
        if fs == FsType::Ext4 && fs_smaller_than(&dev, dev_size, meta)? {
            // Growing ext4 while unmounted needs no privilege beyond root,
            // unlike the online path (see image::grow_online).
            image::grow_ext4_offline(&dev).map_err(image_err(meta))?;
        }
        // A restore or clone of an xfs volume carries its source's UUID,
        // which xfs refuses to mount twice on one node: `nouuid` lets the
        // copy and its source be mounted side by side.
        let mut options = flags.to_vec();
        if fs == FsType::Xfs && !options.iter().any(|o| o == "nouuid") {
            options.push("nouuid".into());
        }
        staging.with_resolved(|at| {
            mount::mount_device(&dev, at, fs.as_str(), &options)
                .map_err(mount_err(meta, staging.path()))
        })?;
    }
    if fs == FsType::Xfs && fs_smaller_than(&dev, dev_size, meta)? {
        image::grow_online(&dev, staging.path(), fs).map_err(image_err(meta))?;
    }
    Ok(())
}

fn fs_smaller_than(dev: &Path, dev_size: u64, meta: &VolumeMeta) -> Result<bool> {
    Ok(image::filesystem_size(dev)
        .map_err(image_err(meta))?
        .is_some_and(|fs| fs < dev_size))
}

/// Opens a recorded path for undoing: `None` when its parent is gone, so
/// nothing can be mounted there any more.
fn open_recorded(paths: &Confinement, path: &Path, field: &'static str) -> Result<Option<Target>> {
    match paths.open(path, field, false) {
        Ok(t) => Ok(Some(t)),
        Err(Error::PathIo { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// NodeUnstageVolume: undoes [`stage`]; idempotent.
pub fn unstage(
    store: &Store,
    paths: &Confinement,
    meta: &VolumeMeta,
    staging: &Path,
) -> Result<()> {
    let mut state = store.node_state(meta)?;
    match &state.staged {
        Some(s) if same_path(&s.path, staging) => {}
        // Not staged there: nothing to undo (NodeUnstageVolume is idempotent).
        _ => return Ok(()),
    }
    if let Some(p) = live_publications(&state)?.first() {
        return Err(Error::StillPublished {
            id: meta.id.clone(),
            at: p.path.clone(),
        });
    }
    if matches!(meta.access, AccessKind::Mount { .. })
        && let Some(t) = open_recorded(paths, staging, "staging_target_path")?
    {
        unmount_all(&t)?;
    }
    if meta.backend == BackendKind::Image {
        let img = store.data_path(meta)?;
        if let Some(dev) = image::find_attached(&img).map_err(image_err(meta))? {
            image::detach(&dev).map_err(image_err(meta))?;
        }
    }
    state.staged = None;
    state.published.clear();
    store.save_node_state(meta, &state)?;
    Ok(())
}

/// Unmounts everything stacked at a path.
fn unmount_all(target: &Target) -> Result<()> {
    for _ in 0..8 {
        if !target.is_mounted()? {
            return Ok(());
        }
        target.unmount()?;
    }
    Err(Error::StillMounted {
        path: target.path().to_owned(),
    })
}

/// What NodePublishVolume asks for.
#[derive(Debug, Clone)]
pub struct Publish {
    pub staging: PathBuf,
    pub target: PathBuf,
    pub cap: Capability,
    pub readonly: bool,
}

/// NodePublishVolume: the staged volume bind-mounted at the target path.
pub fn publish(store: &Store, paths: &Confinement, meta: &VolumeMeta, req: &Publish) -> Result<()> {
    check_access(meta, &req.cap)?;
    // Applied at stage; a bind of the staging mount inherits them.
    dir_bind_flags(meta, &req.cap)?;
    let mut state = store.node_state(meta)?;
    let staged_here = match &state.staged {
        Some(s) if same_path(&s.path, &req.staging) => staged_live(store, meta, s)?,
        _ => false,
    };
    if !staged_here {
        return Err(Error::NotStaged {
            id: meta.id.clone(),
            staging: req.staging.clone(),
        });
    }
    let readonly = req.readonly || req.cap.sharing == Sharing::ReadOnly;
    let exclusive = req.cap.sharing == Sharing::Exclusive;
    let live = live_publications(&state)?;
    if let Some(p) = live.iter().find(|p| same_path(&p.path, &req.target)) {
        if p.readonly == readonly {
            return Ok(());
        }
        return Err(Error::PublishedWithOtherMode {
            id: meta.id.clone(),
            target: req.target.clone(),
            readonly: p.readonly,
        });
    }
    if let Some(other) = live.iter().find(|p| exclusive || p.exclusive) {
        return Err(Error::PublishedElsewhere {
            id: meta.id.clone(),
            at: other.path.clone(),
        });
    }
    let block = meta.access == AccessKind::Block;
    let target = paths.open(&req.target, "target_path", true)?;
    let staging = if block {
        None
    } else {
        Some(paths.open(&req.staging, "staging_target_path", false)?)
    };
    state.published.retain(|p| !same_path(&p.path, &req.target));
    state.published.push(Published {
        path: req.target.clone(),
        readonly,
        exclusive,
    });
    store.save_node_state(meta, &state)?;

    let res = (|| {
        let created = target.ensure(if block { Kind::File } else { Kind::Dir })?;
        let bound = match &staging {
            None => {
                let dev = attached_device(store, meta)?;
                target
                    .with_resolved(|at| mount::bind(&dev, at).map_err(mount_err(meta, &req.target)))
            }
            Some(staging) => staging.with_resolved(|from| {
                target
                    .with_resolved(|at| mount::bind(from, at).map_err(mount_err(meta, &req.target)))
            }),
        };
        if let Err(e) = bound {
            if created {
                let _ = target.remove();
            }
            return Err(e);
        }
        if readonly {
            // Through a handle opened now, which is the new mount's root.
            let ro = target.with_resolved(|at| {
                mount::remount_readonly(at).map_err(mount_err(meta, &req.target))
            });
            if let Err(e) = ro {
                // Never leave a writable mount where a read-only one was asked.
                let _ = unmount_all(&target);
                if created {
                    let _ = target.remove();
                }
                return Err(e);
            }
        }
        Ok(())
    })();
    if let Err(e) = res {
        state.published.retain(|p| !same_path(&p.path, &req.target));
        let _ = store.save_node_state(meta, &state);
        return Err(e);
    }
    Ok(())
}

/// NodeUnpublishVolume: undoes [`publish`]; a path Stead did not publish is
/// left alone (idempotent, and nothing of someone else's is touched).
pub fn unpublish(
    store: &Store,
    paths: &Confinement,
    meta: &VolumeMeta,
    target: &Path,
) -> Result<()> {
    // A symlink is refused by name, even where nothing was published: it
    // is never followed to unmount what it points to.
    let confined = open_recorded(paths, target, "target_path")?;
    if let Some(t) = &confined {
        t.refuse_symlink()?;
    }
    let mut state = store.node_state(meta)?;
    if !state.published.iter().any(|p| same_path(&p.path, target)) {
        return Ok(());
    }
    if let Some(t) = confined {
        unmount_all(&t)?;
        t.remove()?;
    }
    state.published.retain(|p| !same_path(&p.path, target));
    store.save_node_state(meta, &state)?;
    Ok(())
}

/// Finds which recorded path of the volume `raw` is: a publication, or the
/// staging path. [`Error::NotAtPath`] when it is neither.
pub fn recorded_path(meta: &VolumeMeta, state: &NodeState, raw: &Path) -> Result<PathBuf> {
    let path: PathBuf = raw.components().collect();
    let known = state.published.iter().any(|p| same_path(&p.path, &path))
        || state
            .staged
            .as_ref()
            .is_some_and(|s| same_path(&s.path, &path));
    if !known || !path.is_absolute() {
        return Err(Error::NotAtPath {
            id: meta.id.clone(),
            path,
        });
    }
    Ok(path)
}

/// NodeExpandVolume: refreshes the loop device and grows the filesystem of
/// a staged image volume to its capacity. Returns the capacity.
pub fn expand_filesystem(
    store: &Store,
    meta: &VolumeMeta,
    volume_path: &Path,
    required: u64,
) -> Result<u64> {
    let state = store.node_state(meta)?;
    let path = recorded_path(meta, &state, volume_path)?;
    if required > meta.capacity_bytes {
        return Err(Error::BeyondCapacity {
            id: meta.id.clone(),
            required,
            capacity: meta.capacity_bytes,
        });
    }
    if meta.backend == BackendKind::Dir {
        return Ok(meta.capacity_bytes);
    }
    let img = store.data_path(meta)?;
    let dev = attached_device(store, meta)?;
    let file_size = fs::metadata(&img)
        .map_err(|source| Error::PathIo {
            what: "inspecting",
            path: img.clone(),
            source,
        })?
        .len();
    if image::device_size(&dev).map_err(image_err(meta))? < file_size {
        image::refresh(&dev).map_err(image_err(meta))?;
    }
    let AccessKind::Mount { .. } = meta.access else {
        return Ok(meta.capacity_bytes);
    };
    let fs = meta.formatted.ok_or_else(|| Error::NoFilesystem {
        id: meta.id.clone(),
    })?;
    let dev_size = image::device_size(&dev).map_err(image_err(meta))?;
    if !fs_smaller_than(&dev, dev_size, meta)? {
        return Ok(meta.capacity_bytes);
    }
    let mountpoint = state.staged.as_ref().map_or(path, |s| s.path.clone());
    image::grow_online(&dev, &mountpoint, fs).map_err(|source| match fs {
        FsType::Ext4 => Error::Ext4OnlineGrowth {
            id: meta.id.clone(),
            device: dev.clone(),
            source: Box::new(source),
        },
        FsType::Xfs => image_err(meta)(source),
    })?;
    tracing::info!(volume.id = %meta.id, fs = fs.as_str(), bytes = dev_size, "filesystem grown online");
    Ok(meta.capacity_bytes)
}

#[cfg(test)]
mod tests {
    //! The state machine on a real `dir` pool with real bind mounts (the
    //! unit tests run as root, like CI), without gRPC.

    use super::*;
    use crate::storage::{NewVolume, PoolSpec};

    struct Node {
        _tmp: tempfile::TempDir,
        kubelet: PathBuf,
        store: Store,
        paths: Confinement,
        meta: VolumeMeta,
    }

    impl Drop for Node {
        fn drop(&mut self) {
            // Whatever a failed test left mounted goes before the tempdir.
            if let Ok(table) = mount::mount_table() {
                for m in table.iter().rev() {
                    if m.mount_point.starts_with(&self.kubelet) {
                        let _ =
                            nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
                    }
                }
            }
        }
    }

    fn node() -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let kubelet = tmp.path().join("kubelet");
        fs::create_dir_all(&kubelet).unwrap();
        let store = Store::open(&[
            PoolSpec::new("d", BackendKind::Dir, tmp.path().join("pool"))
                .with_reserve(crate::storage::Reserve::Bytes(0)),
        ])
        .unwrap();
        let (meta, _) = store
            .create(&NewVolume {
                id: VolumeId::parse("v1").unwrap(),
                pool: None,
                access: AccessKind::Mount {
                    fs_type: FsType::Ext4,
                },
                required: crate::storage::pool::MIB,
                limit: 0,
                allocation: None,
            })
            .unwrap();
        let paths = Confinement::new(&kubelet, &[tmp.path().join("pool")]);
        Node {
            _tmp: tmp,
            kubelet,
            store,
            paths,
            meta,
        }
    }

    fn cap(sharing: Sharing) -> Capability {
        Capability {
            access: AccessKind::Mount {
                fs_type: FsType::Ext4,
            },
            explicit_fs: false,
            sharing,
            mount_flags: vec![],
        }
    }

    impl Node {
        fn staging(&self) -> PathBuf {
            self.kubelet.join("plugins/staging/v1")
        }
        fn target(&self, pod: &str) -> PathBuf {
            self.kubelet.join("pods").join(pod).join("mount")
        }
        fn stage(&self) -> Result<()> {
            stage(
                &self.store,
                &self.paths,
                &self.meta,
                &self.staging(),
                &cap(Sharing::Shared),
            )
        }
        fn publish(&self, pod: &str, sharing: Sharing, readonly: bool) -> Result<()> {
            publish(
                &self.store,
                &self.paths,
                &self.meta,
                &Publish {
                    staging: self.staging(),
                    target: self.target(pod),
                    cap: cap(sharing),
                    readonly,
                },
            )
        }
        fn unpublish(&self, pod: &str) -> Result<()> {
            unpublish(&self.store, &self.paths, &self.meta, &self.target(pod))
        }
        fn unstage(&self) -> Result<()> {
            unstage(&self.store, &self.paths, &self.meta, &self.staging())
        }
    }

    #[test]
    fn a_dir_volume_goes_through_stage_publish_unpublish_unstage() {
        let n = node();
        n.stage().unwrap();
        n.stage().unwrap();
        assert!(mount::is_mounted(&n.staging()).unwrap());
        n.publish("a", Sharing::Shared, false).unwrap();
        n.publish("a", Sharing::Shared, false).unwrap();
        fs::write(n.target("a").join("token"), b"t1").unwrap();
        let data = n.store.data_path(&n.meta).unwrap();
        assert_eq!(fs::read(data.join("token")).unwrap(), b"t1");
        assert!(matches!(
            ensure_unused(&n.store, &n.meta),
            Err(Error::InUse { .. })
        ));
        assert!(matches!(n.unstage(), Err(Error::StillPublished { .. })));
        n.unpublish("a").unwrap();
        n.unpublish("a").unwrap();
        assert!(!n.target("a").exists(), "the target Stead made is removed");
        n.unstage().unwrap();
        n.unstage().unwrap();
        assert!(!mount::is_mounted(&n.staging()).unwrap());
        assert_eq!(n.store.node_state(&n.meta).unwrap(), NodeState::default());
        ensure_unused(&n.store, &n.meta).unwrap();
        assert_eq!(fs::read(data.join("token")).unwrap(), b"t1", "data kept");
    }

    #[test]
    fn publish_needs_the_stage_first() {
        let n = node();
        let e = n.publish("a", Sharing::Shared, false).unwrap_err();
        assert!(matches!(e, Error::NotStaged { .. }), "{e}");
        assert!(
            !n.target("a").exists(),
            "nothing made for a refused publish"
        );
    }

    #[test]
    fn single_writer_refuses_a_second_target_and_other_modes_are_named() {
        let n = node();
        n.stage().unwrap();
        n.publish("a", Sharing::Exclusive, false).unwrap();
        let e = n.publish("b", Sharing::Exclusive, false).unwrap_err();
        assert!(matches!(e, Error::PublishedElsewhere { .. }), "{e}");
        let e = n.publish("a", Sharing::Exclusive, true).unwrap_err();
        assert!(matches!(e, Error::PublishedWithOtherMode { .. }), "{e}");
        n.unpublish("a").unwrap();
        n.unstage().unwrap();
    }

    #[test]
    fn a_readonly_publication_refuses_writes() {
        let n = node();
        n.stage().unwrap();
        n.publish("ro", Sharing::Shared, true).unwrap();
        let e = fs::write(n.target("ro").join("x"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
        // The staging mount under it stays writable.
        fs::write(n.staging().join("y"), b"y").unwrap();
        n.unpublish("ro").unwrap();
        n.unstage().unwrap();
    }

    #[test]
    fn paths_outside_the_kubelet_dir_or_in_a_pool_are_refused_untouched() {
        let n = node();
        let outside = n._tmp.path().join("elsewhere/staging");
        let e = stage(&n.store, &n.paths, &n.meta, &outside, &cap(Sharing::Shared)).unwrap_err();
        assert!(matches!(e, Error::PathOutsideKubelet { .. }), "{e}");
        assert!(!outside.exists());
        let in_pool = n.store.volume_dir(&n.meta).unwrap().join("data/mnt");
        let e = stage(&n.store, &n.paths, &n.meta, &in_pool, &cap(Sharing::Shared)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::PathOutsideKubelet { .. } | Error::PathInPool { .. }
            ),
            "{e}"
        );
        assert_eq!(n.store.node_state(&n.meta).unwrap(), NodeState::default());
    }

    #[test]
    fn a_capability_of_another_access_type_is_refused() {
        let n = node();
        let block = Capability {
            access: AccessKind::Block,
            ..cap(Sharing::Shared)
        };
        let e = stage(&n.store, &n.paths, &n.meta, &n.staging(), &block).unwrap_err();
        assert!(matches!(e, Error::AccessMismatch { .. }), "{e}");
        assert!(e.to_string().contains("volume_capability"), "{e}");
    }

    #[test]
    fn mount_options_of_a_dir_volume_apply_to_its_binds_or_are_refused_by_name() {
        let n = node();
        let mut with = cap(Sharing::Shared);
        with.mount_flags = vec!["noexec,nosuid".into()];
        stage(&n.store, &n.paths, &n.meta, &n.staging(), &with).unwrap();
        let st = nix::sys::statvfs::statvfs(&n.staging()).unwrap();
        assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
        assert!(st.flags().contains(nix::sys::statvfs::FsFlags::ST_NOSUID));
        publish(
            &n.store,
            &n.paths,
            &n.meta,
            &Publish {
                staging: n.staging(),
                target: n.target("a"),
                cap: with.clone(),
                readonly: false,
            },
        )
        .unwrap();
        let st = nix::sys::statvfs::statvfs(&n.target("a")).unwrap();
        assert!(
            st.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC),
            "the publication inherits the staging mount's options"
        );
        fs::write(n.target("a").join("f"), b"x").unwrap();
        n.unpublish("a").unwrap();
        n.unstage().unwrap();

        let mut bad = cap(Sharing::Shared);
        bad.mount_flags = vec!["noatime".into(), "discard".into()];
        let e = stage(&n.store, &n.paths, &n.meta, &n.staging(), &bad).unwrap_err();
        assert!(matches!(e, Error::BindOption { .. }), "{e}");
        assert!(e.to_string().contains("\"discard\""), "{e}");
        assert!(!mount::is_mounted(&n.staging()).unwrap());
        assert_eq!(n.store.node_state(&n.meta).unwrap(), NodeState::default());
    }

    #[test]
    fn stats_name_a_path_that_is_neither_staged_nor_published() {
        let n = node();
        let e = stats::probe(&n.store, &n.meta, &n.target("nowhere")).unwrap_err();
        assert!(matches!(e, Error::NotAtPath { .. }), "{e}");
    }
}
