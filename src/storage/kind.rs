//! The kinds every part of storage speaks of: which backend a pool uses,
//! which filesystem a volume carries, how it is consumed and shared. They
//! sit here, below both the records (`meta`) and the pools (`pool`), so
//! that neither has to import the other.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which backend a pool uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A directory per volume, bind-mounted.
    Dir,
    /// A sparse file per volume on a loop device, with a filesystem.
    Image,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Dir => "dir",
            BackendKind::Image => "image",
        }
    }

    /// Whether volumes of this backend can be consumed as raw block devices.
    pub fn supports_block(self) -> bool {
        matches!(self, BackendKind::Image)
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A filesystem Stead can create on an `image` volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// The default when a capability names no fsType.
    pub const DEFAULT: FsType = FsType::Ext4;

    /// Parses a CSI `fs_type`; the empty string means the default.
    pub fn parse(raw: &str) -> Option<FsType> {
        match raw {
            "" | "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// Whether an `image` volume's blocks are reserved on the pool's
/// filesystem when it is made (and when it grows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Every block reserved (fallocate): a full pool filesystem cannot fail
    /// a write inside the volume. The default for new image volumes.
    Thick,
    /// A sparse file: blocks are taken as the volume's filesystem writes
    /// them, so a pool filled by others fails those writes (EIO inside).
    Thin,
}

impl Allocation {
    /// What records written before Stead knew of allocations mean: every
    /// image was a sparse file then.
    pub fn legacy() -> Allocation {
        Allocation::Thin
    }

    /// Parses the StorageClass parameter `allocation`.
    pub fn parse(raw: &str) -> Option<Allocation> {
        match raw {
            "thick" => Some(Allocation::Thick),
            "thin" => Some(Allocation::Thin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Allocation::Thick => "thick",
            Allocation::Thin => "thin",
        }
    }
}

impl fmt::Display for Allocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a volume is consumed, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AccessKind {
    /// A filesystem mounted into the pod.
    Mount { fs_type: FsType },
    /// The raw block device (image backend only).
    Block,
}

impl fmt::Display for AccessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessKind::Block => f.write_str("block access"),
            AccessKind::Mount { fs_type } => {
                write!(f, "mount access with fsType {}", fs_type.as_str())
            }
        }
    }
}

/// How a single-node volume may be shared between targets on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// SINGLE_NODE_WRITER / SINGLE_NODE_MULTI_WRITER: any number of targets.
    Shared,
    /// SINGLE_NODE_READER_ONLY: any number of targets, all read-only.
    ReadOnly,
    /// SINGLE_NODE_SINGLE_WRITER: one target at a time.
    Exclusive,
}

/// What a consumer asks of a volume: its access, how it is shared and the
/// mount flags (a validated CSI volume capability).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: AccessKind,
    /// Whether the fsType was named explicitly (as opposed to defaulted).
    pub explicit_fs: bool,
    pub sharing: Sharing,
    pub mount_flags: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_type_parsing() {
        assert_eq!(FsType::parse(""), Some(FsType::Ext4));
        assert_eq!(FsType::parse("xfs"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("btrfs"), None);
    }

    #[test]
    fn allocation_parsing() {
        assert_eq!(Allocation::parse("thick"), Some(Allocation::Thick));
        assert_eq!(Allocation::parse("thin"), Some(Allocation::Thin));
        assert_eq!(Allocation::parse("Thick"), None);
        assert_eq!(Allocation::parse(""), None);
    }
}
