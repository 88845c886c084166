//! Enforcing the size of `dir` volumes: what a pool's filesystem can limit,
//! found when the pool is opened, and the btrfs subvolumes and qgroups that
//! do it.
//!
//! - **btrfs**: each `dir` volume's `data` is a subvolume whose qgroup
//!   limits the bytes it references to the volume's size; a write past it
//!   fails with EDQUOT inside the volume, and the qgroup's count is the
//!   volume's usage (no walk of its tree). Stead turns quotas on for the
//!   pool's filesystem (`btrfs quota enable`) when it opens the pool; that
//!   needs btrfs-progs (the `btrfs` command).
//! - **xfs** and **ext4** project quota: detected (the kernel must have XFS
//!   quota, resp. the filesystem must be mounted with `prjquota`), but Stead
//!   does not set project quotas yet, so such a pool is accounted, not
//!   enforced.
//! - anything else: accounted, not enforced.
//!
//! "Accounted" means Stead never promises more than the pool's filesystem
//! has, but nothing stops a pod from writing past its claim; the agent says
//! so when it opens the pool, in every such volume's context (`enforced:
//! false`) and in the claim's `ProvisioningSucceeded` event.
//!
//! Only volumes created on an enforcing pool are limited: a directory made
//! before (a plain folder, no subvolume) stays as it was, recorded without a
//! [`Quota`].

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, statfs};
use serde::{Deserialize, Serialize};

use super::command::{self, CommandError};
use crate::mount;

/// What limits one `dir` volume, as recorded in its `volume.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Quota {
    /// Its data is btrfs subvolume `subvolume`, limited by qgroup
    /// `0/<subvolume>`.
    BtrfsQgroup { subvolume: u64 },
}

/// What a pool's filesystem can enforce for `dir` volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// btrfs with quotas on; `sysfs` is the filesystem's qgroup folder
    /// (`/sys/fs/btrfs/<uuid>/qgroups`), when it was found.
    Btrfs { sysfs: Option<PathBuf> },
    /// Nothing enforces; why, for the log and the docs.
    None(String),
}

impl Enforcement {
    pub fn enforced(&self) -> bool {
        matches!(self, Enforcement::Btrfs { .. })
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        match self {
            Enforcement::Btrfs { .. } => {
                "enforced: a btrfs subvolume per volume, limited by its qgroup".into()
            }
            Enforcement::None(why) => format!("capacity accounted, not enforced: {why}"),
        }
    }
}

/// Why a subvolume or qgroup step failed.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("`btrfs inspect-internal rootid {}` printed {printed:?}, not a subvolume id", path.display())]
    RootId { path: PathBuf, printed: String },
    #[error("setting the mode of {}: {source}", path.display())]
    Mode {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the kernel has XFS quota (CONFIG_XFS_QUOTA): it then shows
/// `/proc/fs/xfs/xqm`.
const XFS_QUOTA_PROC: &str = "/proc/fs/xfs/xqm";

/// What the filesystem of the `dir` pool at `root` can enforce. Turns btrfs
/// quotas on when it can; never fails (a reason is an answer).
pub fn detect(root: &Path) -> Enforcement {
    let kind = match statfs(root) {
        Ok(st) => st.filesystem_type(),
        Err(e) => return Enforcement::None(format!("statfs of {} failed: {e}", root.display())),
    };
    let mounted = pool_mount(root);
    let super_options = mounted.as_ref().map(|m| m.super_options.as_str());
    if kind == BTRFS_SUPER_MAGIC {
        return detect_btrfs(root, mounted.as_ref());
    }
    let fs = if kind == XFS_SUPER_MAGIC {
        ProjectQuotaFs::Xfs {
            kernel_has_quota: Path::new(XFS_QUOTA_PROC).exists(),
        }
    } else if kind == EXT4_SUPER_MAGIC {
        ProjectQuotaFs::Ext4
    } else {
        return Enforcement::None(format!(
            "its filesystem ({}) cannot limit a directory",
            mounted.as_ref().map_or("unknown", |m| m.fs_type.as_str())
        ));
    };
    Enforcement::None(project_quota_reason(fs, super_options.unwrap_or("")))
}

/// The filesystems whose project quota could limit a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProjectQuotaFs {
    Xfs { kernel_has_quota: bool },
    Ext4,
}

/// Why a filesystem with project quota does not enforce here, from what the
/// kernel has and the filesystem's mount (its super options).
fn project_quota_reason(fs: ProjectQuotaFs, super_options: &str) -> String {
    let prjquota = super_options
        .split(',')
        .any(|o| matches!(o, "prjquota" | "pquota" | "pqnoenforce"));
    match fs {
        ProjectQuotaFs::Xfs {
            kernel_has_quota: false,
        } => format!(
            "xfs project quota needs a kernel with XFS quota (CONFIG_XFS_QUOTA), and this one has none ({XFS_QUOTA_PROC} is missing)"
        ),
        ProjectQuotaFs::Xfs { .. } if !prjquota => {
            "the xfs filesystem is mounted without project quota (mount it with -o prjquota)".into()
        }
        ProjectQuotaFs::Ext4 if !prjquota => {
            "the ext4 filesystem is mounted without project quota (it needs the quota and project features, a kernel with CONFIG_QUOTA and QFMT_V2, and -o prjquota)".into()
        }
        ProjectQuotaFs::Xfs { .. } | ProjectQuotaFs::Ext4 => {
            "the filesystem has project quota, but Stead does not set project quotas yet".into()
        }
    }
}

/// The mount that holds `root` (the deepest mount point above it).
fn pool_mount(root: &Path) -> Option<mount::MountInfo> {
    let real = fs::canonicalize(root).ok()?;
    mount::mount_table()
        .ok()?
        .into_iter()
        .filter(|m| real.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

fn detect_btrfs(root: &Path, mounted: Option<&mount::MountInfo>) -> Enforcement {
    let root_s = root.to_string_lossy();
    if let Err(e) = command::run("btrfs", &["--version"]) {
        return Enforcement::None(format!(
            "the pool is on btrfs, but the btrfs command (btrfs-progs) cannot run: {e}"
        ));
    }
    // Idempotent: enabling quotas that are on already succeeds.
    if let Err(e) = command::run("btrfs", &["quota", "enable", &root_s]) {
        return Enforcement::None(format!(
            "the pool is on btrfs, but its quotas cannot be turned on: {e}"
        ));
    }
    Enforcement::Btrfs {
        sysfs: mounted.and_then(btrfs_sysfs),
    }
}

/// `/sys/fs/btrfs/<uuid>/qgroups` of the filesystem mounted from the
/// device of `m`: the one whose `devices/` names that device.
fn btrfs_sysfs(m: &mount::MountInfo) -> Option<PathBuf> {
    let dev = fs::canonicalize(&m.source).ok()?;
    let name = dev.file_name()?;
    fs::read_dir("/sys/fs/btrfs")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("devices").join(name).exists())
        .map(|p| p.join("qgroups"))
        .filter(|p| p.is_dir())
}

/// Makes `path` (which must not exist) a btrfs subvolume referencing at most
/// `limit` bytes, mode 0777 like any `dir` volume's data.
pub fn create_subvolume(path: &Path, limit: u64) -> Result<Quota, QuotaError> {
    let path_s = path.to_string_lossy();
    command::run("btrfs", &["subvolume", "create", &path_s])?;
    let made = (|| {
        let printed = command::run("btrfs", &["inspect-internal", "rootid", &path_s])?;
        let subvolume = printed
            .trim()
            .parse::<u64>()
            .map_err(|_| QuotaError::RootId {
                path: path.to_owned(),
                printed: printed.trim().to_owned(),
            })?;
        set_limit(path, limit)?;
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).map_err(
            |source| QuotaError::Mode {
                path: path.to_owned(),
                source,
            },
        )?;
        Ok(Quota::BtrfsQgroup { subvolume })
    })();
    if made.is_err() {
        let _ = delete_subvolume(path);
    }
    made
}

/// Sets the limit of the subvolume at `path` (a new volume, an expansion).
pub fn set_limit(path: &Path, limit: u64) -> Result<(), QuotaError> {
    command::run(
        "btrfs",
        &[
            "qgroup",
            "limit",
            &limit.to_string(),
            &path.to_string_lossy(),
        ],
    )?;
    Ok(())
}

/// Deletes the subvolume at `path` at once (its blocks are freed by the
/// filesystem's cleaner in the background). Its qgroup stays behind as a
/// "stale" one, which the kernel keeps until its last block is gone.
pub fn delete_subvolume(path: &Path) -> Result<(), QuotaError> {
    command::run("btrfs", &["subvolume", "delete", &path.to_string_lossy()])?;
    Ok(())
}

/// Whether `path` is the root of a btrfs subvolume (its inode is 256, the
/// first of every subvolume).
pub fn is_subvolume(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(st) = statfs(path) else { return false };
    st.filesystem_type() == BTRFS_SUPER_MAGIC
        && fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.ino() == 256)
}

/// The bytes a volume references, from its qgroup: sysfs when the pool's
/// filesystem was found there, `btrfs qgroup show` otherwise. `None` when
/// neither answers.
pub fn used_bytes(sysfs: Option<&Path>, data: &Path, quota: Quota) -> Option<u64> {
    let Quota::BtrfsQgroup { subvolume } = quota;
    if let Some(dir) = sysfs {
        let file = dir.join(format!("0_{subvolume}")).join("referenced");
        if let Ok(raw) = fs::read_to_string(&file)
            && let Ok(n) = raw.trim().parse()
        {
            return Some(n);
        }
    }
    let out = command::run(
        "btrfs",
        &["qgroup", "show", "--raw", "-f", &data.to_string_lossy()],
    )
    .ok()?;
    parse_qgroup_referenced(&out, subvolume)
}

/// The referenced bytes of qgroup `0/<subvolume>` in the output of
/// `btrfs qgroup show --raw`.
fn parse_qgroup_referenced(out: &str, subvolume: u64) -> Option<u64> {
    let id = format!("0/{subvolume}");
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&id.as_str()))
        .and_then(|cols| cols.get(1)?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfs_without_kernel_quota_is_not_enforced_and_says_why() {
        let why = project_quota_reason(
            ProjectQuotaFs::Xfs {
                kernel_has_quota: false,
            },
            "rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota",
        );
        assert!(why.contains("CONFIG_XFS_QUOTA"), "{why}");
        let why = project_quota_reason(
            ProjectQuotaFs::Xfs {
                kernel_has_quota: true,
            },
            "rw,attr2,inode64,noquota",
        );
        assert!(why.contains("without project quota"), "{why}");
        let why = project_quota_reason(ProjectQuotaFs::Ext4, "rw,relatime");
        assert!(why.contains("prjquota"), "{why}");
        let why = project_quota_reason(ProjectQuotaFs::Ext4, "rw,relatime,prjquota");
        assert!(why.contains("does not set project quotas yet"), "{why}");
    }

    /// This machine's kernel has no XFS quota: the detection on a real xfs
    /// says so (and a kernel with it would say why else it does not
    /// enforce). Needs root (a loop mount), like the rest of the suite.
    #[test]
    fn detection_on_a_real_xfs_finds_nothing_to_enforce_with() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("xfs.img");
        fs::File::create(&img).unwrap().set_len(320 << 20).unwrap();
        command::run("mkfs.xfs", &["-q", "-f", &img.to_string_lossy()]).unwrap();
        let mnt = tmp.path().join("m");
        fs::create_dir(&mnt).unwrap();
        command::run(
            "mount",
            &["-o", "loop", &img.to_string_lossy(), &mnt.to_string_lossy()],
        )
        .unwrap();
        let pool = mnt.join("pool");
        fs::create_dir(&pool).unwrap();
        let found = detect(&pool);
        let _ = command::run("umount", &[&mnt.to_string_lossy()]);
        assert!(!found.enforced(), "{found:?}");
        let text = found.describe();
        assert!(
            text.starts_with("capacity accounted, not enforced"),
            "{text}"
        );
        if !Path::new(XFS_QUOTA_PROC).exists() {
            assert!(text.contains("CONFIG_XFS_QUOTA"), "{text}");
        }
    }

    #[test]
    fn a_plain_folder_is_not_a_subvolume() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(!is_subvolume(tmp.path()));
        assert_eq!(
            detect(tmp.path()).enforced(),
            statfs(tmp.path()).unwrap().filesystem_type() == BTRFS_SUPER_MAGIC
        );
    }

    #[test]
    fn qgroup_show_output_is_read_by_id() {
        let out = "\
Qgroupid    Referenced    Exclusive   Path
--------    ----------    ---------   ----
0/5              16384        16384   <toplevel>
0/256         10469376     10469376   pool/v/data
0/2560              12           12   other
";
        assert_eq!(parse_qgroup_referenced(out, 256), Some(10469376));
        assert_eq!(parse_qgroup_referenced(out, 2560), Some(12));
        assert_eq!(parse_qgroup_referenced(out, 25), None);
    }
}
