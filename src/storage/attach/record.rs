//! The node-side record of a volume (`node.json`): where it is staged and
//! published on this node.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::kind::BackendKind;
use crate::storage::meta::{self, Durability, VolumeMeta};
use crate::storage::{Error, Result, Store, dir, image, io_at};

/// Name of the node-side record inside a volume folder.
pub const NODE_FILE: &str = "node.json";

/// Where a volume is staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub path: PathBuf,
}

/// One publication of a volume at a target path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub path: PathBuf,
    pub readonly: bool,
    /// Published with SINGLE_NODE_SINGLE_WRITER: no other target may exist.
    #[serde(default)]
    pub exclusive: bool,
}

/// The node-side record: an intent log of mounts. Every entry is written
/// *before* its mount is made and removed *after* it is undone, so the
/// record is always a superset of what is mounted; the kernel decides what
/// of it is live (after a reboot, nothing is).
///
/// It is overwritten in place and not fsynced ([`Durability::Process`]): a
/// power loss that tears it also takes every mount and loop device it
/// describes, and an unreadable record is trusted as empty only once the
/// kernel confirms that nothing of the volume is mounted or attached (see
/// [`Store::node_state`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    #[serde(default)]
    pub staged: Option<Staged>,
    #[serde(default)]
    pub published: Vec<Published>,
}

/// What a volume's node record says of it, for the metrics: the intent
/// log as written (see [`NodeState`]), not checked against the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attachment {
    /// Neither staged nor published.
    Idle,
    /// Staged, and published nowhere.
    Staged,
    /// Published at one target path or more.
    Published,
    /// Its record cannot be read.
    Unknown,
}

impl Attachment {
    pub const ALL: [Attachment; 4] = [
        Attachment::Idle,
        Attachment::Staged,
        Attachment::Published,
        Attachment::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Attachment::Idle => "idle",
            Attachment::Staged => "staged",
            Attachment::Published => "published",
            Attachment::Unknown => "unknown",
        }
    }
}

impl Store {
    /// What a volume's node record says, read as written: no kernel check
    /// and no log line, since a scrape may read it while an RPC rewrites it.
    pub fn attachment(&self, meta: &VolumeMeta) -> Attachment {
        let Ok(dir) = self.volume_dir(meta) else {
            return Attachment::Unknown;
        };
        match meta::read_json::<NodeState>(&dir, NODE_FILE) {
            Ok(Some(s)) if !s.published.is_empty() => Attachment::Published,
            Ok(Some(s)) if s.staged.is_some() => Attachment::Staged,
            Ok(_) => Attachment::Idle,
            Err(_) => Attachment::Unknown,
        }
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
        match meta::read_json(&dir, NODE_FILE) {
            Ok(state) => Ok(state.unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let file = dir.join(NODE_FILE);
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
        meta::write_json(&dir, NODE_FILE, state, Durability::Process)
            .map_err(io_at("writing node record", &dir))?;
        if state.staged.is_none() && state.published.is_empty() {
            self.tell_freed(meta.id.as_str());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::meta::{read_json, write_json};
    use std::fs;

    #[test]
    fn in_place_records_shrink_and_grow_and_stay_valid_json() {
        let dir = tempfile::tempdir().unwrap();
        let long = NodeState {
            staged: Some(Staged {
                path: "/var/lib/kubelet/a/very/long/staging/path".into(),
            }),
            published: vec![Published {
                path: "/p".into(),
                readonly: false,
                exclusive: false,
            }],
        };
        let short = NodeState::default();
        for st in [&long, &short, &long, &short] {
            write_json(dir.path(), NODE_FILE, st, Durability::Process).unwrap();
            assert_eq!(read_json(dir.path(), NODE_FILE).unwrap().as_ref(), Some(st));
        }
        // Shrinking pads with spaces instead of truncating: one write.
        let len = fs::metadata(dir.path().join(NODE_FILE)).unwrap().len();
        assert!(len as usize > serde_json::to_vec_pretty(&short).unwrap().len() + 1);
        // A record larger than a page is replaced by a rename.
        let big = NodeState {
            staged: None,
            published: (0..100)
                .map(|i| Published {
                    path: format!("/var/lib/kubelet/pods/{i:040}/volumes/x").into(),
                    readonly: false,
                    exclusive: false,
                })
                .collect(),
        };
        write_json(dir.path(), NODE_FILE, &big, Durability::Process).unwrap();
        assert_eq!(read_json(dir.path(), NODE_FILE).unwrap(), Some(big));
        write_json(dir.path(), NODE_FILE, &short, Durability::Process).unwrap();
        assert_eq!(read_json(dir.path(), NODE_FILE).unwrap(), Some(short));
    }

    #[test]
    fn node_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_json::<NodeState>(dir.path(), NODE_FILE).unwrap(), None);
        let st = NodeState {
            staged: Some(Staged {
                path: "/var/lib/kubelet/x".into(),
            }),
            published: vec![Published {
                path: "/p".into(),
                readonly: true,
                exclusive: false,
            }],
        };
        write_json(dir.path(), NODE_FILE, &st, Durability::Process).unwrap();
        assert_eq!(read_json(dir.path(), NODE_FILE).unwrap(), Some(st));
    }
}
