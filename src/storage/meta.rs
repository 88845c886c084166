//! Per-volume metadata kept beside the data, and how records are written so
//! that an agent killed at any instruction leaves a readable one:
//!
//! - a new volume's record is created in its still-private folder and
//!   fsynced with it ([`create_json_durable`]): no temporary file, no rename;
//! - a later change of it (expansion, `formatted`) replaces it whole: a
//!   temporary file renamed over it, file and folder fsynced
//!   ([`write_atomic`] with [`Durability::Disk`]);
//! - the node record (`node.json`, see `attach::record`) is overwritten in
//!   place by one write of at most a page, not fsynced ([`write_json`] with
//!   [`Durability::Process`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::id::VolumeId;
use super::kind::{AccessKind, Allocation, BackendKind, FsType};
use super::quota::Quota;
use super::snapshot::ContentSource;

/// Name of the volume record inside a volume folder.
pub const VOLUME_FILE: &str = "volume.json";
/// Bumped when the on-disk format changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;

/// The record of one volume (`volume.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub version: u32,
    pub id: VolumeId,
    pub pool: String,
    pub backend: BackendKind,
    pub capacity_bytes: u64,
    pub access: AccessKind,
    /// Set once a filesystem was created on an image volume; from then on the
    /// volume is never formatted again, whatever a probe says.
    #[serde(default)]
    pub formatted: Option<FsType>,
    /// Folder name inside the pool (derived from the id).
    pub folder: String,
    /// The snapshot or volume it was filled from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ContentSource>,
    /// Whether its blocks were reserved (image volumes; a directory is
    /// always `thin`). Records from before this field are sparse images:
    /// reading them as thick would promise their holes to nobody.
    #[serde(default = "Allocation::legacy")]
    pub allocation: Allocation,
    /// Bytes its data shared by reflink with its source when it was filled
    /// (0 for a sparse copy or an empty volume): blocks it holds without
    /// owning them, which its first overwrite takes from the pool.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shared_bytes: u64,
    /// What the volume received from another node (the source, its node
    /// and digest), once that data became its image (see `incoming`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<String>,
    /// What limits a `dir` volume to its size, if anything does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How far a write must have reached when it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk: survives a power loss (fsync of the file and its directory).
    Disk,
    /// In the page cache: survives the agent being killed, not a power loss.
    /// For records of kernel state that a power loss wipes as well (mounts,
    /// loop devices), where two fsyncs per RPC buy nothing.
    Process,
}

/// Writes `bytes` to `dir/name` atomically: a temporary file in the same
/// directory, rename over the old file. A reader sees the old content or the
/// new one, never a mix. With [`Durability::Disk`] the file and the
/// directory are fsynced, so that holds after a crash of the machine too.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    durability: Durability,
) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durability == Durability::Disk {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, dir.join(name))?;
    if durability == Durability::Disk {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Flushes a directory's entries (a rename or create inside it) to disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Serializes `value` as pretty JSON into `dir/name`, atomically.
///
/// With [`Durability::Process`] a record of at most a page is overwritten in
/// place by a single write(2) from offset 0, padded with spaces (which JSON
/// ignores) to the old length. One write to one page of a regular file is
/// all or nothing even if the agent is killed, and it avoids what a rename
/// over an existing file costs on ext4 (`auto_da_alloc` starts writeback of
/// the new file at every rename). Larger records go through
/// [`write_atomic`].
pub fn write_json<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
    durability: Durability,
) -> io::Result<()> {
    let bytes = json_line(value)?;
    if durability == Durability::Process && overwrite_in_place(&dir.join(name), &bytes)? {
        return Ok(());
    }
    write_atomic(dir, name, &bytes, durability)
}

/// The largest record [`write_json`] overwrites in place: one page.
const IN_PLACE_MAX: usize = 4096;

/// Overwrites `path` (created if missing) from offset 0 with one write of
/// `bytes`, space-padded to the old length. `false` when that cannot be
/// done in one page (record or old file too large) or the write came short
/// (a full disk): the caller replaces the file whole.
fn overwrite_in_place(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    if bytes.len() > IN_PLACE_MAX {
        return Ok(false);
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let old = usize::try_from(f.metadata()?.len()).unwrap_or(usize::MAX);
    if old > IN_PLACE_MAX {
        return Ok(false);
    }
    let mut buf = bytes.to_vec();
    buf.resize(buf.len().max(old), b' ');
    Ok(f.write_at(&buf, 0)? == buf.len())
}

/// Writes `value` as pretty JSON into a new file `dir/name` and fsyncs the
/// file and `dir`, with no temporary file: for a folder nobody reads yet (a
/// volume folder whose record is written last; see `assemble`), where the
/// rename of [`write_atomic`] would only cost a second journal commit.
pub fn create_json_durable<T: Serialize>(dir: &Path, name: &str, value: &T) -> io::Result<()> {
    let bytes = json_line(value)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.join(name))?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    sync_dir(dir)
}

/// `value` as pretty JSON with a final newline.
fn json_line<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Reads `dir/name` as JSON; `Ok(None)` when the file does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> io::Result<Option<T>> {
    match fs::read(dir.join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "x.json", b"one", Durability::Disk).unwrap();
        write_atomic(dir.path(), "x.json", b"two", Durability::Process).unwrap();
        assert_eq!(fs::read(dir.path().join("x.json")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_record_from_before_allocations_reads_as_a_thin_unenforced_volume() {
        let old = r#"{"version":1,"id":"v","pool":"p","backend":"image","capacity_bytes":4096,
            "access":{"kind":"mount","fs_type":"ext4"},"formatted":"ext4","folder":"v"}"#;
        let m: VolumeMeta = serde_json::from_str(old).unwrap();
        assert_eq!(m.allocation, Allocation::Thin);
        assert_eq!(m.shared_bytes, 0);
        assert_eq!(m.quota, None);
    }
}
