//! Bind mounts, filesystem mounts and unmounts through nix, and the kernel's
//! mount table (`/proc/self/mountinfo`) as the truth about what is mounted.
//! Knows nothing of gRPC or Kubernetes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Errors of mount operations; each names the paths involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mounting {source_path} on {}: {errno}", target.display())]
    Mount {
        source_path: String,
        target: PathBuf,
        errno: Errno,
    },
    #[error("unmounting {}: {errno}", target.display())]
    Unmount { target: PathBuf, errno: Errno },
    #[error("reading the mount table: {0}")]
    Table(#[source] io::Error),
    #[error("mount option {0:?} contains a NUL byte")]
    BadOption(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One line of `/proc/self/mountinfo` (the fields Stead uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the mounted filesystem's device.
    pub device: String,
    /// The directory of that filesystem shown at the mount point.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
    /// The filesystem's own options (e.g. `prjquota`), shared by all its
    /// mounts.
    pub super_options: String,
}

impl MountInfo {
    pub fn is_readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Parses the text of a mountinfo file; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountInfo> {
    // id parent major:minor root mount_point options [optional…] - fstype source super_options
    let (head, tail) = line.split_once(" - ")?;
    let mut h = head.split(' ');
    let id = h.next()?.parse().ok()?;
    let parent = h.next()?.parse().ok()?;
    let device = h.next()?.to_owned();
    let root = PathBuf::from(unescape(h.next()?));
    let mount_point = PathBuf::from(unescape(h.next()?));
    let options = h.next()?.to_owned();
    let mut t = tail.split(' ');
    let fs_type = t.next()?.to_owned();
    let source = unescape(t.next().unwrap_or(""));
    let super_options = t.next().unwrap_or("").to_owned();
    Some(MountInfo {
        id,
        parent,
        device,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current mount table of this process's mount namespace.
pub fn mount_table() -> Result<Vec<MountInfo>> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(Error::Table)
}

/// The topmost mount at exactly `path` (after resolving symlinks in its
/// parents), if any. A path that does not exist is not mounted.
pub fn mount_at(path: &Path) -> Result<Option<MountInfo>> {
    let Ok(real) = path.canonicalize() else {
        return Ok(None);
    };
    Ok(mount_table()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == real))
}

/// Whether something is mounted at `path` (after following symlinks).
///
/// Asked of statx(2) (`STATX_ATTR_MOUNT_ROOT`, Linux 5.8+): one syscall,
/// however many mounts the node carries. Reading `/proc/self/mountinfo`
/// instead costs time in proportion to the mount table, which on a node
/// with hundreds of volumes is most of an RPC. Kernels that do not report
/// the attribute fall back to the mount table.
pub fn is_mounted(path: &Path) -> Result<bool> {
    use rustix::fs::{AtFlags, CWD, StatxAttributes, StatxFlags, statx};
    use rustix::io::Errno as RErrno;
    match statx(CWD, path, AtFlags::NO_AUTOMOUNT, StatxFlags::empty()) {
        Ok(st) if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
            Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT))
        }
        // A path that does not exist is not mounted.
        Err(RErrno::NOENT | RErrno::NOTDIR) => Ok(false),
        _ => Ok(mount_at(path)?.is_some()),
    }
}

/// Bind-mounts `source` on `target`.
///
/// The kernel ignores MS_RDONLY on the initial bind; a read-only bind needs
/// a second, remounting call on the new mount ([`remount_readonly`]).
pub fn bind(source: &Path, target: &Path) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|errno| Error::Mount {
        source_path: source.display().to_string(),
        target: target.to_owned(),
        errno,
    })
}

/// Makes the bind mount whose root is `target` read-only (mount(2),
/// "Creating a bind mount"). `target` must reach the new mount itself: a
/// path resolved after the bind, not a handle opened before it.
pub fn remount_readonly(target: &Path) -> Result<()> {
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|errno| Error::Mount {
        source_path: "(read-only remount)".into(),
        target: target.to_owned(),
        errno,
    })
}

/// Mounts the filesystem of type `fs_type` on `device` at `target`, with
/// CSI `mount_flags` (each may hold several comma-separated options).
pub fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    mount_flags: &[String],
) -> Result<()> {
    let (flags, data) = split_options(mount_flags)?;
    let data = (!data.is_empty()).then_some(data);
    mount(Some(device), target, Some(fs_type), flags, data.as_deref()).map_err(|errno| {
        Error::Mount {
            source_path: device.display().to_string(),
            target: target.to_owned(),
            errno,
        }
    })
}

/// Splits mount options into the flags mount(2) takes and the
/// filesystem-specific data string.
pub fn split_options(options: &[String]) -> Result<(MsFlags, String)> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options {
        if opt.contains('\0') {
            return Err(Error::BadOption(opt.clone()));
        }
        for o in opt.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match o {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" | "defaults" => {}
                "noatime" => flags |= MsFlags::MS_NOATIME,
                "nodiratime" => flags |= MsFlags::MS_NODIRATIME,
                "relatime" => flags |= MsFlags::MS_RELATIME,
                "strictatime" => flags |= MsFlags::MS_STRICTATIME,
                "lazytime" => flags |= MsFlags::MS_LAZYTIME,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
                "dirsync" => flags |= MsFlags::MS_DIRSYNC,
                other => data.push(other),
            }
        }
    }
    Ok((flags, data.join(",")))
}

/// The mount(2) flags of bind-mount options: those a bind mount can carry
/// for itself (per mount point). Anything else belongs to a filesystem's
/// own mount (`discard`, `data=…`, and `sync`, `dirsync`, `lazytime`,
/// which change the superblock, i.e. the whole pool), and is returned as
/// the error, by name.
pub fn bind_flags(options: &[String]) -> Result<MsFlags, String> {
    let mut flags = MsFlags::empty();
    for o in options
        .iter()
        .flat_map(|opt| opt.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        flags |= match o {
            "rw" | "defaults" => MsFlags::empty(),
            "ro" => MsFlags::MS_RDONLY,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            other => return Err(other.to_owned()),
        };
    }
    Ok(flags)
}

/// Applies per-mount-point `flags` to the bind mount whose root is
/// `target` (a path resolved after the bind, as for [`remount_readonly`]),
/// keeping the flags it inherited from its source mount (a remount sets
/// them all at once, and dropping `nosuid` a source had is not ours to do).
pub fn remount_bind(target: &Path, flags: MsFlags) -> Result<()> {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let mut inherited = MsFlags::empty();
    if let Ok(st) = statvfs(target) {
        let f = st.flags();
        for (fs, ms) in [
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if f.contains(fs) {
                inherited |= ms;
            }
        }
    }
    let atime = MsFlags::MS_NOATIME | MsFlags::MS_RELATIME | MsFlags::MS_STRICTATIME;
    if flags.intersects(atime) {
        inherited.remove(atime);
    }
    let all = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | inherited | flags;
    mount(None::<&str>, target, None::<&str>, all, None::<&str>).map_err(|errno| Error::Mount {
        source_path: "(bind remount with mount options)".into(),
        target: target.to_owned(),
        errno,
    })
}

/// Unmounts `target`. Not being mounted is not an error: unmounting is
/// idempotent. A symlink at `target` is not followed.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(Error::Unmount {
            target: target.to_owned(),
            errno,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:35 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
301 22 252:0 /srv/pool/pvc-1/data /var/lib/kubelet/pods/x/volumes/my\\040vol ro,relatime shared:1 - ext4 /dev/vda rw
302 22 7:3 / /staging/pvc-2 rw,relatime - xfs /dev/loop3 rw,attr2
";

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 4);
        let bind = &t[2];
        assert_eq!(bind.device, "252:0");
        assert_eq!(bind.root, PathBuf::from("/srv/pool/pvc-1/data"));
        assert_eq!(
            bind.mount_point,
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/my vol")
        );
        assert!(bind.is_readonly());
        assert_eq!(t[3].fs_type, "xfs");
        assert_eq!(t[3].source, "/dev/loop3");
        assert_eq!(t[3].super_options, "rw,attr2");
        assert!(!t[3].is_readonly());
    }

    #[test]
    fn statx_agrees_with_the_mount_table() {
        for path in ["/", "/proc", "/proc/self", "/nonexistent-stead-path"] {
            let table = mount_at(Path::new(path)).unwrap().is_some();
            assert_eq!(is_mounted(Path::new(path)).unwrap(), table, "{path}");
        }
    }

    #[test]
    fn skips_garbage_lines() {
        assert!(parse_mountinfo("nonsense\n\n1 2 3\n").is_empty());
    }

    #[test]
    fn bind_options_are_per_mount_flags_and_others_are_named() {
        let f = bind_flags(&["noatime,nosuid".into(), "ro".into(), "rw".into()]).unwrap();
        assert_eq!(
            f,
            MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_RDONLY
        );
        assert_eq!(bind_flags(&[]).unwrap(), MsFlags::empty());
        assert_eq!(
            bind_flags(&["noexec".into(), "discard".into()]),
            Err("discard".to_string())
        );
        assert_eq!(bind_flags(&["sync".into()]), Err("sync".to_string()));
    }

    #[test]
    fn splits_flags_from_data() {
        let (f, d) =
            split_options(&["ro,noatime".into(), "discard".into(), "data=ordered".into()]).unwrap();
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
        assert_eq!(d, "discard,data=ordered");
        assert!(split_options(&["a\0b".into()]).is_err());
    }
}
