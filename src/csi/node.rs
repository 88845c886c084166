//! CSI Node service: stage, publish, unpublish, unstage, stats, expansion.
//!
//! Staging makes the volume's filesystem (or device) available at the
//! staging path; publishing bind-mounts that into the pod's target path.
//! `node.json` beside the volume is an intent log of both (written before a
//! mount, cleared after an unmount); the kernel's mount table says which of
//! its entries are live, so a record that survived a reboot is harmless.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use nix::sys::statvfs::statvfs;
use tonic::{Request, Response, Status};

use super::capability::{self, Capability, Sharing};
use super::controller::check_access;
use super::error::{Error, Result};
use super::{Shared, blocking, outcome, volume_id};
use crate::mount;
use crate::proto::csi::v1::node_server::Node;
use crate::proto::csi::v1::node_service_capability::{Rpc, Type as CapType, rpc};
use crate::proto::csi::v1::volume_usage::Unit;
use crate::proto::csi::v1::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, VolumeCondition, VolumeUsage,
};
use crate::storage::image::{self, ImageError};
use crate::storage::{
    self, AccessKind, BackendKind, FsType, NodeState, Published, Staged, Store, VolumeMeta,
};

/// The Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    shared: Arc<Shared>,
}

impl NodeService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// Validates a staging or target path from a request: required, absolute,
/// without `.`/`..` components or NUL, and not itself a symlink (which could
/// lead a mount or a removal anywhere on the host).
///
/// Symlinks among the *parents* are allowed: kubelet's root directory is a
/// symlink on some distributions, and the mount table is matched against the
/// resolved path.
pub(crate) fn checked_path(raw: &str, field: &'static str) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::missing(field));
    }
    if raw.contains('\0') {
        return Err(Error::invalid(field, "contains a NUL byte"));
    }
    let path = PathBuf::from(raw);
    if !path.is_absolute() {
        return Err(Error::invalid(
            field,
            format!("{raw:?} is not an absolute path"),
        ));
    }
    if raw.split('/').any(|c| c == "." || c == "..") {
        return Err(Error::invalid(
            field,
            format!("{raw:?} contains '.' or '..'"),
        ));
    }
    if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(Error::invalid(field, format!("{raw:?} is a symlink")));
    }
    // Normalize away duplicate and trailing slashes for comparisons.
    Ok(path.components().collect())
}

fn same_path(a: &Path, b: &Path) -> bool {
    a.components().eq(b.components())
}

fn image_err(meta: &VolumeMeta) -> impl FnOnce(ImageError) -> Error + '_ {
    move |source| {
        Error::Storage(storage::Error::Image {
            id: meta.id.clone(),
            source,
        })
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

/// Describes how a volume is in use on this node, if it is.
pub(crate) fn live_usage(store: &Store, meta: &VolumeMeta) -> Result<Option<String>> {
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

fn stage(store: &Store, meta: &VolumeMeta, staging: &Path, cap: &Capability) -> Result<()> {
    check_access(meta, cap)?;
    let mut state = store.node_state(meta)?;
    if let Some(s) = &state.staged
        && staged_live(store, meta, s)?
    {
        if same_path(&s.path, staging) {
            return Ok(());
        }
        return Err(Error::FailedPrecondition(format!(
            "volume {} is already staged at {}; unstage it there first",
            meta.id,
            s.path.display()
        )));
    }
    if !staging.is_dir() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(staging)
            .map_err(|e| {
                Error::Internal(format!("creating staging path {}: {e}", staging.display()))
            })?;
    }
    state.staged = Some(Staged {
        path: staging.to_owned(),
    });
    store.save_node_state(meta, &state)?;
    let res = match (meta.backend, meta.access) {
        (BackendKind::Dir, _) => {
            if !mount::is_mounted(staging)? {
                mount::bind(&store.data_path(meta)?, staging, false)?;
            }
            Ok(())
        }
        (BackendKind::Image, AccessKind::Block) => image::attach(&store.data_path(meta)?)
            .map(drop)
            .map_err(image_err(meta)),
        (BackendKind::Image, AccessKind::Mount { fs_type }) => {
            stage_filesystem(store, meta, staging, fs_type, &cap.mount_flags)
        }
    };
    if let Err(e) = res {
        // Undo what was done, so a failed stage leaves nothing attached.
        let mounted = mount::is_mounted(staging).unwrap_or(true);
        if !mounted {
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

/// Attaches an image, creates its filesystem on first use only, grows it if
/// the image grew while it was not staged, and mounts it at `staging`.
fn stage_filesystem(
    store: &Store,
    meta: &VolumeMeta,
    staging: &Path,
    wanted: FsType,
    flags: &[String],
) -> Result<()> {
    let img = store.data_path(meta)?;
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
            return Err(Error::FailedPrecondition(format!(
                "volume {}: its image carries no filesystem signature although a {} filesystem was created on it; refusing to format it again (data may be recoverable)",
                meta.id,
                had.as_str()
            )));
        }
        (Some(sig), _) => {
            let Some(found) = FsType::parse(sig).filter(|_| !sig.is_empty()) else {
                return Err(Error::FailedPrecondition(format!(
                    "volume {}: its image carries a {sig:?} signature; Stead mounts only ext4 or xfs and never formats over existing data",
                    meta.id
                )));
            };
            if meta.formatted.is_none() {
                // mkfs finished but the agent died before recording it.
                store.mark_formatted(&meta.id, found)?;
            }
            found
        }
    };
    let dev_size = image::device_size(&dev).map_err(image_err(meta))?;
    if !mount::is_mounted(staging)? {
        if fs == FsType::Ext4 && fs_smaller_than(&dev, dev_size, meta)? {
            // Growing ext4 while unmounted needs no privilege beyond root,
            // unlike the online path (see image::grow_online).
            image::grow_ext4_offline(&dev).map_err(image_err(meta))?;
        }
        mount::mount_device(&dev, staging, fs.as_str(), flags)?;
    }
    if fs == FsType::Xfs && fs_smaller_than(&dev, dev_size, meta)? {
        image::grow_online(&dev, staging, fs).map_err(image_err(meta))?;
    }
    Ok(())
}

fn fs_smaller_than(dev: &Path, dev_size: u64, meta: &VolumeMeta) -> Result<bool> {
    Ok(image::filesystem_size(dev)
        .map_err(image_err(meta))?
        .is_some_and(|fs| fs < dev_size))
}

fn unstage(store: &Store, meta: &VolumeMeta, staging: &Path) -> Result<()> {
    let mut state = store.node_state(meta)?;
    match &state.staged {
        Some(s) if same_path(&s.path, staging) => {}
        // Not staged there: nothing to undo (NodeUnstageVolume is idempotent).
        _ => return Ok(()),
    }
    if let Some(p) = live_publications(&state)?.first() {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is still published at {}; unpublish it first",
            meta.id,
            p.path.display()
        )));
    }
    if matches!(meta.access, AccessKind::Mount { .. }) {
        unmount_all(staging)?;
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

/// Unmounts everything stacked at `path`.
fn unmount_all(path: &Path) -> Result<()> {
    for _ in 0..8 {
        if !mount::is_mounted(path)? {
            return Ok(());
        }
        mount::unmount(path)?;
    }
    Err(Error::Internal(format!(
        "{} is still mounted after 8 unmounts",
        path.display()
    )))
}

struct PublishRequest {
    staging: PathBuf,
    target: PathBuf,
    cap: Capability,
    readonly: bool,
}

fn publish(store: &Store, meta: &VolumeMeta, req: &PublishRequest) -> Result<()> {
    check_access(meta, &req.cap)?;
    let mut state = store.node_state(meta)?;
    let staged_here = match &state.staged {
        Some(s) if same_path(&s.path, &req.staging) => staged_live(store, meta, s)?,
        _ => false,
    };
    if !staged_here {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is not staged at {}; call NodeStageVolume first",
            meta.id,
            req.staging.display()
        )));
    }
    let readonly = req.readonly || req.cap.sharing == Sharing::ReadOnly;
    let exclusive = req.cap.sharing == Sharing::Exclusive;
    let live = live_publications(&state)?;
    if let Some(p) = live.iter().find(|p| same_path(&p.path, &req.target)) {
        if p.readonly == readonly {
            return Ok(());
        }
        return Err(Error::AlreadyExists(format!(
            "volume {} is already published at {} with readonly={}",
            meta.id,
            req.target.display(),
            p.readonly
        )));
    }
    if let Some(other) = live.iter().find(|p| exclusive || p.exclusive) {
        return Err(Error::FailedPrecondition(format!(
            "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {}",
            meta.id,
            other.path.display()
        )));
    }
    state.published.retain(|p| !same_path(&p.path, &req.target));
    state.published.push(Published {
        path: req.target.clone(),
        readonly,
        exclusive,
    });
    store.save_node_state(meta, &state)?;

    let block = meta.access == AccessKind::Block;
    let res = (|| {
        let created = create_target(&req.target, block)?;
        let source = if block {
            let img = store.data_path(meta)?;
            image::find_attached(&img)
                .map_err(image_err(meta))?
                .ok_or_else(|| {
                    Error::FailedPrecondition(format!(
                        "volume {}: no loop device is attached; stage it again",
                        meta.id
                    ))
                })?
        } else {
            req.staging.clone()
        };
        if let Err(e) = mount::bind(&source, &req.target, readonly) {
            if created {
                let _ = remove_target(&req.target);
            }
            return Err(e.into());
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

/// Creates the target path (a directory, or a file for a block device);
/// whether it was created now.
fn create_target(target: &Path, block: bool) -> Result<bool> {
    let fail =
        |e: io::Error| Error::Internal(format!("creating target path {}: {e}", target.display()));
    if let Some(parent) = target.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(parent)
            .map_err(fail)?;
    }
    let res = if block {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map(drop)
    } else {
        DirBuilder::new().mode(0o750).create(target)
    };
    match res {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let is_dir = target.is_dir();
            if is_dir == block {
                return Err(Error::invalid(
                    "target_path",
                    format!(
                        "{} exists and is {}a directory",
                        target.display(),
                        if is_dir { "" } else { "not " }
                    ),
                ));
            }
            Ok(false)
        }
        Err(e) => Err(fail(e)),
    }
}

/// Removes a target path Stead created: an empty directory or a plain file,
/// never anything recursively.
fn remove_target(target: &Path) -> io::Result<()> {
    let res = match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => fs::remove_dir(target),
        Ok(_) => fs::remove_file(target),
        Err(e) => Err(e),
    };
    match res {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn unpublish(store: &Store, meta: &VolumeMeta, target: &Path) -> Result<()> {
    let mut state = store.node_state(meta)?;
    if !state.published.iter().any(|p| same_path(&p.path, target)) {
        // Not published there by Stead: nothing to undo, and nothing that
        // belongs to someone else is touched.
        return Ok(());
    }
    unmount_all(target)?;
    remove_target(target)
        .map_err(|e| Error::Internal(format!("removing target path {}: {e}", target.display())))?;
    state.published.retain(|p| !same_path(&p.path, target));
    store.save_node_state(meta, &state)?;
    Ok(())
}

/// Finds which recorded path of the volume `path` is: a publication, or
/// the staging path. `NotFound` when it is neither.
fn recorded_path(meta: &VolumeMeta, state: &NodeState, raw: &str) -> Result<PathBuf> {
    let path: PathBuf = Path::new(raw).components().collect();
    let known = state.published.iter().any(|p| same_path(&p.path, &path))
        || state
            .staged
            .as_ref()
            .is_some_and(|s| same_path(&s.path, &path));
    if !known || !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(Error::NotFound(format!(
            "volume {} is neither published nor staged at {raw}",
            meta.id
        )));
    }
    Ok(path)
}

fn stats(store: &Store, meta: &VolumeMeta, raw_path: &str) -> Result<NodeGetVolumeStatsResponse> {
    let state = store.node_state(meta)?;
    let path = recorded_path(meta, &state, raw_path)?;
    let abnormal = |message: String| NodeGetVolumeStatsResponse {
        usage: Vec::new(),
        volume_condition: Some(VolumeCondition {
            abnormal: true,
            message,
        }),
    };
    let data = store.data_path(meta)?;
    if !data.exists() {
        return Ok(abnormal(format!(
            "volume {}: its backing data {} is missing",
            meta.id,
            data.display()
        )));
    }
    let is_staging = state
        .staged
        .as_ref()
        .is_some_and(|s| same_path(&s.path, &path));
    let live = if meta.access == AccessKind::Block && is_staging {
        image::find_attached(&data)
            .map_err(image_err(meta))?
            .is_some()
    } else {
        mount::is_mounted(&path)?
    };
    if !live {
        return Ok(abnormal(format!(
            "volume {}: nothing is mounted at {} any more",
            meta.id,
            path.display()
        )));
    }
    let healthy = Some(VolumeCondition {
        abnormal: false,
        message: "volume is attached and mounted".into(),
    });
    let bytes = |total: u64, available: u64, used: u64| VolumeUsage {
        total: clamp(total),
        available: clamp(available),
        used: clamp(used),
        unit: Unit::Bytes as i32,
    };
    if meta.access == AccessKind::Block {
        return Ok(NodeGetVolumeStatsResponse {
            usage: vec![bytes(meta.capacity_bytes, 0, 0)],
            volume_condition: healthy,
        });
    }
    let st =
        statvfs(&path).map_err(|e| Error::Internal(format!("statvfs {}: {e}", path.display())))?;
    let frsize = st.fragment_size();
    let inodes_total = st.files();
    let inodes_free = st.files_available();
    let (usage_bytes, inodes_used) = match meta.backend {
        BackendKind::Image => {
            let total = st.blocks() * frsize;
            let avail = st.blocks_available() * frsize;
            let used = total.saturating_sub(st.blocks_free() * frsize);
            (
                bytes(total, avail, used),
                inodes_total.saturating_sub(st.files_free()),
            )
        }
        // A directory shares the pool's filesystem: report the volume's own
        // capacity and what its tree occupies.
        BackendKind::Dir => {
            let (used, count) = tree_usage(&data);
            let fs_avail = st.blocks_available() * frsize;
            let avail = meta.capacity_bytes.saturating_sub(used).min(fs_avail);
            (bytes(meta.capacity_bytes, avail, used), count)
        }
    };
    Ok(NodeGetVolumeStatsResponse {
        usage: vec![
            usage_bytes,
            VolumeUsage {
                total: clamp(inodes_total),
                available: clamp(inodes_free),
                used: clamp(inodes_used),
                unit: Unit::Inodes as i32,
            },
        ],
        volume_condition: healthy,
    })
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Allocated bytes and entry count of a directory tree, without following
/// symlinks or crossing into other filesystems.
fn tree_usage(root: &Path) -> (u64, u64) {
    let Ok(top) = fs::symlink_metadata(root) else {
        return (0, 0);
    };
    let dev = top.dev();
    let (mut bytes, mut count) = (0u64, 0u64);
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(m) = entry.metadata() else { continue };
            bytes += m.blocks() * 512;
            count += 1;
            if m.is_dir() && m.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    (bytes, count)
}

fn expand(store: &Store, meta: &VolumeMeta, raw_path: &str, required: u64) -> Result<u64> {
    let state = store.node_state(meta)?;
    let path = recorded_path(meta, &state, raw_path)?;
    if required > meta.capacity_bytes {
        return Err(Error::OutOfRange(format!(
            "volume {}: {required} bytes asked but the volume has {} bytes; call ControllerExpandVolume first",
            meta.id, meta.capacity_bytes
        )));
    }
    if meta.backend == BackendKind::Dir {
        return Ok(meta.capacity_bytes);
    }
    let img = store.data_path(meta)?;
    let dev = image::find_attached(&img)
        .map_err(image_err(meta))?
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {} is not staged (no loop device attached)",
                meta.id
            ))
        })?;
    let file_size = fs::metadata(&img)
        .map_err(|e| Error::Internal(format!("stat {}: {e}", img.display())))?
        .len();
    if image::device_size(&dev).map_err(image_err(meta))? < file_size {
        image::refresh(&dev).map_err(image_err(meta))?;
    }
    let AccessKind::Mount { .. } = meta.access else {
        return Ok(meta.capacity_bytes);
    };
    let fs = meta.formatted.ok_or_else(|| {
        Error::FailedPrecondition(format!("volume {} has no filesystem yet", meta.id))
    })?;
    let dev_size = image::device_size(&dev).map_err(image_err(meta))?;
    if !fs_smaller_than(&dev, dev_size, meta)? {
        return Ok(meta.capacity_bytes);
    }
    let mountpoint = state
        .staged
        .as_ref()
        .map_or(path.clone(), |s| s.path.clone());
    image::grow_online(&dev, &mountpoint, fs).map_err(|e| match fs {
        FsType::Ext4 => Error::FailedPrecondition(format!(
            "volume {}: growing the mounted ext4 filesystem on {} failed ({e}); online ext4 resize needs CAP_SYS_RESOURCE — unstage and stage the volume again to grow it offline, or use xfs for online expansion",
            meta.id,
            dev.display()
        )),
        FsType::Xfs => image_err(meta)(e),
    })?;
    tracing::info!(volume.id = %meta.id, fs = fs.as_str(), bytes = dev_size, "filesystem grown online");
    Ok(meta.capacity_bytes)
}

fn capabilities() -> NodeGetCapabilitiesResponse {
    let cap = |t: rpc::Type| NodeServiceCapability {
        r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })),
    };
    NodeGetCapabilitiesResponse {
        capabilities: vec![
            cap(rpc::Type::StageUnstageVolume),
            cap(rpc::Type::GetVolumeStats),
            cap(rpc::Type::ExpandVolume),
            cap(rpc::Type::VolumeCondition),
            cap(rpc::Type::SingleNodeMultiWriter),
        ],
    }
}

fn required_cap(cap: Option<&crate::proto::csi::v1::VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::missing("volume_capability"))?;
    capability::parse(cap, "volume_capability")
}

impl NodeService {
    async fn do_stage(&self, req: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
        let cap = required_cap(req.volume_capability.as_ref())?;
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            stage(&s.store, &meta, &staging, &cap)
        })
        .await?;
        Ok(NodeStageVolumeResponse {})
    }

    async fn do_unstage(&self, req: NodeUnstageVolumeRequest) -> Result<NodeUnstageVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            unstage(&s.store, &meta, &staging)
        })
        .await?;
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn do_publish(&self, req: NodePublishVolumeRequest) -> Result<NodePublishVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let target = checked_path(&req.target_path, "target_path")?;
        let cap = required_cap(req.volume_capability.as_ref())?;
        // Stead advertises STAGE_UNSTAGE_VOLUME, so the CO always stages first.
        let staging = checked_path(&req.staging_target_path, "staging_target_path")?;
        if same_path(&staging, &target) {
            return Err(Error::invalid(
                "target_path",
                "must differ from staging_target_path",
            ));
        }
        let publish_req = PublishRequest {
            staging,
            target,
            cap,
            readonly: req.readonly,
        };
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            publish(&s.store, &meta, &publish_req)
        })
        .await?;
        Ok(NodePublishVolumeResponse {})
    }

    async fn do_unpublish(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        let target = checked_path(&req.target_path, "target_path")?;
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            unpublish(&s.store, &meta, &target)
        })
        .await?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn do_stats(&self, req: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        let id = volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(Error::missing("volume_path"));
        }
        let s = self.shared.clone();
        blocking(move || {
            let meta = s.store.require(&id)?;
            stats(&s.store, &meta, &req.volume_path)
        })
        .await
    }

    async fn do_expand(&self, req: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse> {
        let id = volume_id(&req.volume_id)?;
        if req.volume_path.is_empty() {
            return Err(Error::missing("volume_path"));
        }
        let required = match &req.capacity_range {
            Some(r) => {
                storage::pool::check_range(r.required_bytes, r.limit_bytes)
                    .map_err(|e| Error::invalid("capacity_range", e.to_string()))?
                    .0
            }
            None => 0,
        };
        let _guard = self.shared.locks.lock(&id).await;
        let s = self.shared.clone();
        let capacity = blocking(move || {
            let meta = s.store.require(&id)?;
            expand(&s.store, &meta, &req.volume_path, required)
        })
        .await?;
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: clamp(capacity),
        })
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome("NodeStageVolume", &id, self.do_stage(req).await, false)
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome("NodeUnstageVolume", &id, self.do_unstage(req).await, false)
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome("NodePublishVolume", &id, self.do_publish(req).await, false)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome(
            "NodeUnpublishVolume",
            &id,
            self.do_unpublish(req).await,
            false,
        )
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome("NodeGetVolumeStats", &id, self.do_stats(req).await, true)
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let id = req.volume_id.clone();
        outcome("NodeExpandVolume", &id, self.do_expand(req).await, false)
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.shared.node_id.clone(),
            max_volumes_per_node: self.shared.max_volumes_per_node,
            accessible_topology: Some(capability::node_topology(&self.shared.node_id)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(checked_path("", "target_path").is_err());
        assert!(checked_path("relative/x", "target_path").is_err());
        assert!(checked_path("/a/../etc", "target_path").is_err());
        assert!(checked_path("/a/./b", "target_path").is_err());
        assert!(checked_path("/a\0b", "target_path").is_err());
        assert_eq!(
            checked_path("/a//b/", "target_path").unwrap(),
            PathBuf::from("/a/b")
        );
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let e = checked_path(link.to_str().unwrap(), "target_path").unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
    }
}
