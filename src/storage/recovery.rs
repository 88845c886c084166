//! Crash recovery: what an agent killed at any instruction leaves in a
//! pool, and how opening the pool finishes or undoes it. The disk is the
//! source of truth: a folder without a readable record is an unfinished
//! create (removed only when its data is untouched), `.del-` folders are
//! deletes to finish, and a folder with data is never removed for lack of
//! a record.

use std::fs;
use std::io;
use std::path::Path;

use super::meta::{self, VolumeMeta};
use super::store::{DEL_PREFIX, Pool, TMP_PREFIX};
use super::{Result, dir, image, io_at, snapshot};

impl Pool {
    /// Removes leftovers of interrupted creations and deletions, then reads
    /// every volume record in the pool.
    pub(super) fn recover_and_scan(&self) -> Result<Vec<VolumeMeta>> {
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
            if name == snapshot::SNAPSHOT_DIR || !entry.file_type().is_ok_and(|t| t.is_dir()) {
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
                Ok(None) | Err(_)
                    if record_missing_or_empty(&path) && snapshot::interrupted_fill(&path) =>
                {
                    // A fill from a snapshot or volume that never finished:
                    // a copy nobody was told of.
                    tracing::info!(pool = %self.name, path = %path.display(),
                        "removing the folder of an unfinished restore or clone");
                    if let Err(e) = remove_leftover(&path) {
                        tracing::warn!(pool = %self.name, path = %path.display(), error = %e,
                            "could not remove leftover");
                    }
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
/// directory, or an image file without data (a sparse file with no block,
/// or a thick one whose blocks are reserved and unwritten).
fn data_untouched(folder: &Path) -> bool {
    let data = folder.join(dir::DATA_DIR);
    if let Ok(mut entries) = fs::read_dir(&data) {
        return entries.next().is_none();
    }
    let img = folder.join(image::IMAGE_FILE);
    match fs::symlink_metadata(&img) {
        Ok(m) => m.is_file() && !image::holds_data(&img),
        // Neither data nor image: the create stopped before making either.
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}
