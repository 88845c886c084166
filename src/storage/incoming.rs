//! A volume whose data arrives from another node (a cross-node restore or
//! clone, pulled by `transfer::receiver`): CreateVolume makes it empty, as
//! any volume; it is then marked, the data is written beside its image and
//! verified, and only then does the pulled file become its image.
//!
//! ```text
//! <pool>/<folder>/volume.json     the record (made empty; `received` once settled)
//! <pool>/<folder>/disk.img        the image: an empty placeholder until settled
//! <pool>/<folder>/.incoming       the marker: data is arriving; the volume is
//!                                 neither staged nor sent on meanwhile
//! <pool>/<folder>/incoming.img    the pulled data, verified (the receiver's
//!                                 target; its staging and checkpoint beside it)
//! ```
//!
//! Order, so that an agent killed at any instruction resumes rather than
//! guesses: the marker is made durable before anything of the volume
//! changes; [`Store::begin_incoming`] then gives the placeholder's blocks
//! back (it is empty: checked) so that the pool does not hold the volume
//! twice while its copy arrives. [`Store::settle_incoming`] checks the pulled
//! file (its size, its filesystem against the volume's), records `received`
//! and the filesystem in the record, renames the pulled file over the
//! placeholder, grows it to the volume's size (reserved whole when thick),
//! and removes the marker last. A record with `received` set is a settled
//! volume; a marker without it is a pull still to finish (or to roll back
//! by deleting the volume, which takes the folder and all of it).
//!
//! Only an `image` volume can receive data: a `dir` volume's tree is copied
//! file by file on its own node, and no transfer of trees exists.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::kind::{AccessKind, BackendKind, FsType};
use super::meta::{self, VolumeMeta};
use super::store::Store;
use super::{Error, Result, VolumeId, attach, image, io_at};

/// Marker of a volume whose data is arriving (see module doc).
pub const INCOMING_FILE: &str = ".incoming";
/// The pulled image, verified, before it becomes the volume's image.
pub const INCOMING_IMAGE: &str = "incoming.img";

/// Where a volume's arrival stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// Pull the data into this file (which a pull that broke may have begun).
    Pull(PathBuf),
    /// The data is there (or its settling began): settle it.
    Arrived(PathBuf),
    /// Settled earlier: the volume holds the data it received.
    Settled,
}

/// Whether the volume in `folder` is waiting for its data.
pub(super) fn pending(folder: &Path) -> bool {
    folder.join(INCOMING_FILE).exists()
}

fn refuse(id: &VolumeId, reason: String) -> Error {
    Error::Incoming {
        id: id.clone(),
        reason,
    }
}

impl Store {
    /// Prepares volume `id` (just made by CreateVolume, empty) to receive
    /// its data from another node, or tells how far an earlier call got.
    /// The caller holds the volume's lock.
    pub fn begin_incoming(&self, id: &VolumeId) -> Result<Arrival> {
        let meta = self.require(id)?;
        let folder = self.volume_dir(&meta)?;
        let target = folder.join(INCOMING_IMAGE);
        if meta.received.is_some() {
            if !pending(&folder) {
                return Ok(Arrival::Settled);
            }
            return Ok(Arrival::Arrived(target));
        }
        if pending(&folder) {
            return Ok(if target.exists() {
                Arrival::Arrived(target)
            } else {
                Arrival::Pull(target)
            });
        }
        if meta.backend != BackendKind::Image {
            return Err(Error::Unsupported {
                id: id.clone(),
                pool: meta.pool.clone(),
                backend: meta.backend,
                what: "receiving data from another node (only image volumes can be transferred; a dir volume is restored on the node that holds its source)",
            });
        }
        // Data is received only into a new, empty volume: nothing of a
        // user's is ever replaced.
        let img = folder.join(image::IMAGE_FILE);
        if meta.formatted.is_some() || meta.source.is_some() || image::holds_data(&img) {
            return Err(refuse(
                id,
                "it holds data of its own; data from another node is received only into a new empty volume".into(),
            ));
        }
        let staged = attach::live_staging(self, &meta).map_err(|e| Error::Busy {
            id: id.clone(),
            reason: format!("whether it is staged cannot be told: {e}"),
        })?;
        if let Some(at) = staged {
            return Err(Error::Busy {
                id: id.clone(),
                reason: format!(
                    "it is staged at {}; data from another node is received only into a volume no pod uses",
                    at.display()
                ),
            });
        }
        let marker = folder.join(INCOMING_FILE);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .and_then(|f| f.sync_all())
            .and_then(|()| meta::sync_dir(&folder))
            .map_err(io_at("marking the volume as receiving its data", &folder))?;
        // The empty placeholder's blocks go back to the pool while the copy
        // is written beside it (its size is still promised to the volume).
        OpenOptions::new()
            .write(true)
            .open(&img)
            .and_then(|f| {
                f.set_len(0)?;
                f.set_len(meta.capacity_bytes)?;
                f.sync_all()
            })
            .map_err(io_at("emptying the placeholder image", &img))?;
        Ok(Arrival::Pull(target))
    }

    /// Makes the verified pulled file of volume `id` its image: `received`
    /// says what it was (for the record and the log). Idempotent; the
    /// caller holds the volume's lock.
    pub fn settle_incoming(&self, id: &VolumeId, received: &str) -> Result<VolumeMeta> {
        let mut meta = self.require(id)?;
        let folder = self.volume_dir(&meta)?;
        let pulled = folder.join(INCOMING_IMAGE);
        let img = folder.join(image::IMAGE_FILE);
        if meta.received.is_none() {
            if !pending(&folder) {
                return Err(refuse(id, "no data is arriving into it".into()));
            }
            let size = fs::metadata(&pulled)
                .map_err(io_at("reading the received image", &pulled))?
                .len();
            if size > meta.capacity_bytes {
                return Err(refuse(
                    id,
                    format!(
                        "the received data holds {size} bytes, more than the volume's {} bytes; a restore is never smaller than its source",
                        meta.capacity_bytes
                    ),
                ));
            }
            meta.formatted = filesystem_of(&meta, &pulled)?;
            meta.received = Some(received.to_owned());
            self.save(&meta)?;
        }
        if pulled.exists() {
            fs::rename(&pulled, &img).map_err(io_at("installing the received image", &img))?;
            meta::sync_dir(&folder).map_err(io_at("syncing the volume folder", &folder))?;
        }
        image::grow_file(&img, meta.capacity_bytes, meta.allocation).map_err(|source| {
            Error::Image {
                id: id.clone(),
                source,
            }
        })?;
        match fs::remove_file(folder.join(INCOMING_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at("removing the incoming marker of", &folder)(e)),
        }
        meta::sync_dir(&folder).map_err(io_at("syncing the volume folder", &folder))?;
        Ok(meta)
    }

    /// Whether volume `meta` is still waiting for its data (not to be
    /// staged, nor sent to another node).
    pub fn is_incoming(&self, meta: &VolumeMeta) -> bool {
        self.volume_dir(meta).is_ok_and(|f| pending(&f))
    }
}

/// The filesystem the received image carries, checked against the volume
/// (the same rules as a restore on one node: a filesystem volume gets its
/// source's filesystem, of the type it asks for; a block volume takes any
/// data).
fn filesystem_of(meta: &VolumeMeta, pulled: &Path) -> Result<Option<FsType>> {
    let AccessKind::Mount { fs_type: asked } = meta.access else {
        return Ok(None);
    };
    let id = &meta.id;
    let signature = image::probe_signature(pulled).map_err(|source| Error::Image {
        id: id.clone(),
        source,
    })?;
    match signature {
        None if has_data(pulled) => Err(refuse(
            id,
            "the received data carries no filesystem (the source is a block volume, or was never formatted but written); restore it with volumeMode: Block".into(),
        )),
        // Never formatted: formatted at its first stage, as a new volume.
        None => Ok(None),
        Some(sig) => match FsType::parse(&sig) {
            Some(found) if found == asked => Ok(Some(found)),
            Some(found) => Err(refuse(
                id,
                format!(
                    "the received data carries {}, the volume asks for {}; restore it with a class of csi.storage.k8s.io/fstype: {}",
                    found.as_str(),
                    asked.as_str(),
                    found.as_str()
                ),
            )),
            None => Err(refuse(
                id,
                format!(
                    "the received data carries a {sig:?} signature, not a filesystem Stead mounts (ext4, xfs)"
                ),
            )),
        },
    }
}

/// Whether a file holds written data; a file that cannot be read counts
/// as holding some, so that nothing is formatted on a doubt.
fn has_data(path: &Path) -> bool {
    File::open(path).is_err() || image::holds_data(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::storage::kind::Allocation;
    use crate::storage::{NewVolume, PoolSpec, Reserve, pool};

    fn store(dir: &Path) -> Store {
        Store::open(&[
            PoolSpec::new("img", BackendKind::Image, dir.join("img"))
                .with_reserve(Reserve::Bytes(0)),
            PoolSpec::new("dir", BackendKind::Dir, dir.join("dir")).with_reserve(Reserve::Bytes(0)),
        ])
        .unwrap()
    }

    fn volume(s: &Store, id: &str, pool: &str, access: AccessKind) -> VolumeMeta {
        s.create(&NewVolume {
            id: VolumeId::parse(id).unwrap(),
            pool: Some(pool.into()),
            access,
            required: 8 * pool::MIB,
            limit: 0,
            allocation: Some(Allocation::Thin).filter(|_| pool == "dir"),
        })
        .unwrap()
        .0
    }

    #[test]
    fn a_block_volume_receives_its_data_beside_its_image_and_settles_once() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let m = volume(&s, "pvc-1", "img", AccessKind::Block);
        let Arrival::Pull(target) = s.begin_incoming(&m.id).unwrap() else {
            panic!("a new volume is pulled into");
        };
        assert_eq!(target.file_name().unwrap(), INCOMING_IMAGE);
        assert!(s.is_incoming(&m), "marked");
        assert_eq!(
            s.begin_incoming(&m.id).unwrap(),
            Arrival::Pull(target.clone())
        );
        // What the receiver installs once verified: 4 MiB with data at 1 MiB.
        let f = File::create(&target).unwrap();
        f.set_len(4 * pool::MIB).unwrap();
        f.write_all_at(b"token", pool::MIB).unwrap();
        drop(f);
        assert_eq!(
            s.begin_incoming(&m.id).unwrap(),
            Arrival::Arrived(target.clone())
        );

        let settled = s.settle_incoming(&m.id, "snapshot s1 of node-a").unwrap();
        assert_eq!(settled.received.as_deref(), Some("snapshot s1 of node-a"));
        let img = s.data_path(&settled).unwrap();
        let mut buf = [0u8; 5];
        File::open(&img)
            .unwrap()
            .read_exact_at(&mut buf, pool::MIB)
            .unwrap();
        assert_eq!(&buf, b"token");
        assert_eq!(
            fs::metadata(&img).unwrap().len(),
            settled.capacity_bytes,
            "grown to the volume's size"
        );
        assert!(!target.exists() && !s.is_incoming(&settled));
        assert_eq!(s.begin_incoming(&m.id).unwrap(), Arrival::Settled);
        s.settle_incoming(&m.id, "again").unwrap();
        drop(s);
        let s = store(tmp.path());
        assert_eq!(
            s.get(&m.id).unwrap().received.as_deref(),
            Some("snapshot s1 of node-a")
        );
        assert_eq!(s.begin_incoming(&m.id).unwrap(), Arrival::Settled);
    }

    #[test]
    fn a_filesystem_volume_takes_its_sources_filesystem_and_refuses_another() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let ext4 = AccessKind::Mount {
            fs_type: FsType::Ext4,
        };
        let xfs = AccessKind::Mount {
            fs_type: FsType::Xfs,
        };
        for (id, access, ok) in [("pvc-e", ext4, true), ("pvc-x", xfs, false)] {
            let m = volume(&s, id, "img", access);
            let Arrival::Pull(target) = s.begin_incoming(&m.id).unwrap() else {
                panic!("pulled into");
            };
            File::create(&target)
                .unwrap()
                .set_len(8 * pool::MIB)
                .unwrap();
            let out = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&target)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let r = s.settle_incoming(&m.id, "volume v of node-a");
            if ok {
                assert_eq!(r.unwrap().formatted, Some(FsType::Ext4));
            } else {
                let e = r.unwrap_err().to_string();
                assert!(
                    e.contains("carries ext4") && e.contains("asks for xfs"),
                    "{e}"
                );
                assert!(s.is_incoming(&m), "nothing settled");
            }
        }
        // Data without a filesystem is not formatted over.
        let m = volume(&s, "pvc-raw", "img", ext4);
        let Arrival::Pull(target) = s.begin_incoming(&m.id).unwrap() else {
            panic!("pulled into");
        };
        fs::write(&target, b"raw bytes of a block volume").unwrap();
        let e = s.settle_incoming(&m.id, "x").unwrap_err().to_string();
        assert!(e.contains("volumeMode: Block"), "{e}");
    }

    #[test]
    fn a_pull_under_way_survives_a_restart_of_the_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let m = volume(&s, "pvc-r", "img", AccessKind::Block);
        let Arrival::Pull(target) = s.begin_incoming(&m.id).unwrap() else {
            panic!("pulled into");
        };
        // What a receiver killed mid-way leaves beside the target.
        let folder = target.parent().unwrap().to_owned();
        fs::write(folder.join(".transfer-incoming.img.part"), b"half").unwrap();
        fs::write(folder.join(".transfer-incoming.img.json"), b"{}").unwrap();
        drop(s);
        let s = store(tmp.path());
        assert!(s.get(&m.id).is_some(), "a volume with its record is kept");
        assert_eq!(s.begin_incoming(&m.id).unwrap(), Arrival::Pull(target));
        assert!(
            folder.join(".transfer-incoming.img.part").exists(),
            "the staging is kept for the resume"
        );
    }

    #[test]
    fn only_a_new_empty_image_volume_receives_data() {
        let tmp = tempfile::tempdir().unwrap();
        let s = store(tmp.path());
        let d = volume(
            &s,
            "pvc-d",
            "dir",
            AccessKind::Mount {
                fs_type: FsType::Ext4,
            },
        );
        let e = s.begin_incoming(&d.id).unwrap_err().to_string();
        assert!(e.contains("only image volumes can be transferred"), "{e}");
        let m = volume(&s, "pvc-used", "img", AccessKind::Block);
        let img = s.data_path(&m).unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(b"mine", 0)
            .unwrap();
        let e = s.begin_incoming(&m.id).unwrap_err().to_string();
        assert!(e.contains("holds data of its own"), "{e}");
        assert!(!s.is_incoming(&m));
        let e = s.settle_incoming(&m.id, "x").unwrap_err().to_string();
        assert!(e.contains("no data is arriving"), "{e}");
    }
}
