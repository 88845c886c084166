//! Staging and target paths, confined: they must lie under the kubelet
//! directory and never be a pool or inside one, and what is checked is
//! what is mounted.
//!
//! A path from a request is opened once, as a handle on its parent folder
//! (`O_PATH`, symlinks among the parents followed: kubelet's root is a
//! symlink on some distributions) and its last component opened beside it
//! with `O_NOFOLLOW`. The confinement is decided on the real path of those
//! handles (`/proc/self/fd/N`), and every mount, unmount and removal goes
//! through them, so that swapping a folder for a symlink after the check
//! changes nothing: there is no window between check and use.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxAttributes, StatxFlags};

use super::Error;

/// Where staging and target paths may lie, and where they may not.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The kubelet directory as given, and resolved.
    kubelet: PathBuf,
    kubelet_real: PathBuf,
    /// Every pool's directory, resolved.
    pools: Vec<PathBuf>,
}

/// What kind of object a path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory (a staging path, a filesystem volume's target).
    Dir,
    /// A regular file (a block volume's target, bind-mounted over).
    File,
}

impl Confinement {
    /// Resolves the kubelet directory and the pools once. A kubelet
    /// directory that does not exist yet is kept as given.
    pub fn new(kubelet_dir: &Path, pools: &[PathBuf]) -> Confinement {
        let real = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| normalized(p));
        Confinement {
            kubelet: normalized(kubelet_dir),
            kubelet_real: real(kubelet_dir),
            pools: pools.iter().map(|p| real(p)).collect(),
        }
    }

    /// Opens the parent of a request's `path` (creating the missing folders
    /// of it when `create_parents`, as kubelet expects of target paths) and
    /// checks that it is confined. `field` names the request field in
    /// errors.
    pub fn open(
        &self,
        path: &Path,
        field: &'static str,
        create_parents: bool,
    ) -> Result<Target, Error> {
        let outside = || Error::PathOutsideKubelet {
            field,
            path: path.to_owned(),
            kubelet: self.kubelet.clone(),
        };
        // Lexically first, so that nothing is created outside.
        if !path.starts_with(&self.kubelet) && !path.starts_with(&self.kubelet_real) {
            return Err(outside());
        }
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(outside());
        };
        if create_parents {
            fs::create_dir_all(parent).map_err(|source| Error::PathIo {
                what: "creating the parents of",
                path: path.to_owned(),
                source,
            })?;
        }
        let dir = rustix::fs::open(
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::PathIo {
            what: "opening the parent of",
            path: path.to_owned(),
            source: e.into(),
        })?;
        let real_parent = fs::read_link(fd_path(&dir)).map_err(|source| Error::PathIo {
            what: "resolving the parent of",
            path: path.to_owned(),
            source,
        })?;
        let real = real_parent.join(name);
        if !real.starts_with(&self.kubelet_real) || real == self.kubelet_real {
            return Err(Error::PathOutsideKubelet {
                field,
                path: real,
                kubelet: self.kubelet_real.clone(),
            });
        }
        if let Some(pool) = self
            .pools
            .iter()
            .find(|p| real.starts_with(p) || p.starts_with(&real))
        {
            return Err(Error::PathInPool {
                field,
                path: real,
                pool: pool.clone(),
            });
        }
        Ok(Target {
            dir,
            name: name.to_owned(),
            shown: path.to_owned(),
            field,
        })
    }
}

/// A confined staging or target path: a handle on its parent and the name
/// in it.
#[derive(Debug)]
pub struct Target {
    dir: OwnedFd,
    name: OsString,
    /// The path as the request gave it (for messages and the record).
    shown: PathBuf,
    field: &'static str,
}

/// The path through which the kernel reaches what a handle designates.
fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Target {
    /// The path as the request named it.
    pub fn path(&self) -> &Path {
        &self.shown
    }

    /// Opens what is at the path now, never through a symlink; `None` when
    /// nothing is there. Opened after a mount, it is the mount's root.
    fn open_leaf(&self) -> Result<Option<(OwnedFd, FileType)>, Error> {
        let fd = match rustix::fs::openat(
            &self.dir,
            self.name.as_os_str(),
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.io("opening", e.into())),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.io("inspecting", e.into()))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        if kind == FileType::Symlink {
            return Err(Error::PathIsSymlink {
                field: self.field,
                path: self.shown.clone(),
            });
        }
        Ok(Some((fd, kind)))
    }

    /// Refuses a path that is a symlink now ([`Error::PathIsSymlink`]).
    pub fn refuse_symlink(&self) -> Result<(), Error> {
        self.open_leaf().map(drop)
    }

    fn io(&self, what: &'static str, source: io::Error) -> Error {
        Error::PathIo {
            what,
            path: self.shown.clone(),
            source,
        }
    }

    /// Makes sure the path exists as `kind`, creating it (mode 0750 for a
    /// folder, an empty file for a block target). Whether it was created.
    pub fn ensure(&self, kind: Kind) -> Result<bool, Error> {
        let made = match kind {
            Kind::Dir => rustix::fs::mkdirat(&self.dir, self.name.as_os_str(), Mode::from(0o750))
                .map(|()| true),
            Kind::File => rustix::fs::openat(
                &self.dir,
                self.name.as_os_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from(0o640),
            )
            .map(|_| true),
        };
        match made {
            Ok(created) => Ok(created),
            Err(rustix::io::Errno::EXIST) => {
                let Some((_, found)) = self.open_leaf()? else {
                    return Err(self.io("creating", io::ErrorKind::NotFound.into()));
                };
                let is_dir = found == FileType::Directory;
                if is_dir != (kind == Kind::Dir) {
                    return Err(Error::WrongKind {
                        field: self.field,
                        path: self.shown.clone(),
                        is_dir,
                    });
                }
                Ok(false)
            }
            Err(e) => Err(self.io("creating", e.into())),
        }
    }

    /// Whether something is mounted at the path (asked of the handle, not
    /// of the name: statx with AT_EMPTY_PATH).
    pub fn is_mounted(&self) -> Result<bool, Error> {
        let Some((fd, _)) = self.open_leaf()? else {
            return Ok(false);
        };
        let st = rustix::fs::statx(
            &fd,
            "",
            AtFlags::EMPTY_PATH | AtFlags::NO_AUTOMOUNT,
            StatxFlags::empty(),
        )
        .map_err(|e| self.io("inspecting", e.into()))?;
        if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) {
            return Ok(st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT));
        }
        // Kernels before 5.8 do not report the attribute.
        let real = fs::read_link(fd_path(&fd)).map_err(|e| self.io("resolving", e))?;
        Ok(crate::mount::mount_at(&real)?.is_some())
    }

    /// Runs `f` with a path that reaches exactly what is at the path now
    /// (`/proc/self/fd/N` of a handle opened without following a symlink).
    pub fn with_resolved<T>(&self, f: impl FnOnce(&Path) -> Result<T, Error>) -> Result<T, Error> {
        let Some((fd, _)) = self.open_leaf()? else {
            return Err(self.io("opening", io::ErrorKind::NotFound.into()));
        };
        f(&fd_path(&fd.as_fd()))
    }

    /// Unmounts the topmost mount at the path. Through the parent's handle
    /// (`/proc/self/fd/N/<name>`, the leaf not followed), so that no handle
    /// on the mount itself keeps it busy and no swapped parent redirects it.
    pub fn unmount(&self) -> Result<(), Error> {
        self.refuse_symlink()?;
        let at = fd_path(&self.dir).join(&self.name);
        crate::mount::unmount(&at).map_err(|source| Error::PathIo {
            what: "unmounting",
            path: self.shown.clone(),
            source: io::Error::other(source),
        })
    }

    /// Removes the path if it is an empty folder or a file, never anything
    /// recursively; a missing path is removed already.
    pub fn remove(&self) -> Result<(), Error> {
        let Some((_, kind)) = self.open_leaf()? else {
            return Ok(());
        };
        let flags = if kind == FileType::Directory {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rustix::fs::unlinkat(&self.dir, self.name.as_os_str(), flags) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(self.io("removing", e.into())),
        }
    }
}

/// `path` without `.` components, duplicate or trailing slashes.
fn normalized(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Confinement) {
        let tmp = tempfile::tempdir().unwrap();
        let kubelet = tmp.path().join("kubelet");
        let pool = tmp.path().join("kubelet/pools/p");
        fs::create_dir_all(&pool).unwrap();
        let c = Confinement::new(&kubelet, &[pool]);
        (tmp, c)
    }

    #[test]
    fn paths_outside_the_kubelet_dir_are_refused_before_anything_is_made() {
        let (tmp, c) = setup();
        let outside = tmp.path().join("elsewhere/target");
        let e = c.open(&outside, "target_path", true).unwrap_err();
        assert!(matches!(e, Error::PathOutsideKubelet { .. }), "{e}");
        assert!(!tmp.path().join("elsewhere").exists());
        assert!(e.to_string().contains("target_path"), "{e}");
    }

    #[test]
    fn a_pool_or_a_path_inside_one_is_refused() {
        let (tmp, c) = setup();
        for p in [
            "kubelet/pools/p",
            "kubelet/pools/p/vol/data",
            "kubelet/pools",
        ] {
            let e = c
                .open(&tmp.path().join(p), "staging_target_path", true)
                .unwrap_err();
            assert!(matches!(e, Error::PathInPool { .. }), "{p}: {e}");
        }
    }

    #[test]
    fn a_symlinked_parent_leading_out_is_refused() {
        let (tmp, c) = setup();
        fs::create_dir_all(tmp.path().join("outside")).unwrap();
        fs::create_dir_all(tmp.path().join("kubelet/pods")).unwrap();
        std::os::unix::fs::symlink(
            tmp.path().join("outside"),
            tmp.path().join("kubelet/pods/x"),
        )
        .unwrap();
        let e = c
            .open(
                &tmp.path().join("kubelet/pods/x/mount"),
                "target_path",
                false,
            )
            .unwrap_err();
        assert!(matches!(e, Error::PathOutsideKubelet { .. }), "{e}");
    }

    #[test]
    fn a_leaf_swapped_for_a_symlink_after_the_check_is_never_followed() {
        let (tmp, c) = setup();
        let target = tmp.path().join("kubelet/pods/a/mount");
        let t = c.open(&target, "target_path", true).unwrap();
        // Between the check and the use, the leaf becomes a symlink to /etc.
        std::os::unix::fs::symlink("/etc", &target).unwrap();
        let e = t.ensure(Kind::Dir).unwrap_err();
        assert!(matches!(e, Error::PathIsSymlink { .. }), "{e}");
        assert!(matches!(
            t.with_resolved(|_| Ok(())).unwrap_err(),
            Error::PathIsSymlink { .. }
        ));
        assert!(matches!(
            t.remove().unwrap_err(),
            Error::PathIsSymlink { .. }
        ));
        assert!(Path::new("/etc/passwd").exists());
    }

    #[test]
    fn a_parent_swapped_after_the_check_does_not_redirect_the_use() {
        let (tmp, c) = setup();
        let parent = tmp.path().join("kubelet/pods/b");
        let target = parent.join("mount");
        let t = c.open(&target, "target_path", true).unwrap();
        // The parent is moved away and replaced by a symlink out: the
        // handle still designates the folder that was checked.
        fs::create_dir_all(tmp.path().join("outside")).unwrap();
        fs::rename(&parent, tmp.path().join("kubelet/pods/moved")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), &parent).unwrap();
        assert!(t.ensure(Kind::Dir).unwrap());
        assert!(tmp.path().join("kubelet/pods/moved/mount").is_dir());
        assert!(!tmp.path().join("outside/mount").exists());
    }

    #[test]
    fn ensure_is_idempotent_and_names_a_wrong_kind() {
        let (tmp, c) = setup();
        let target = tmp.path().join("kubelet/pods/c/dev");
        let t = c.open(&target, "target_path", true).unwrap();
        assert!(t.ensure(Kind::File).unwrap());
        assert!(!t.ensure(Kind::File).unwrap());
        let e = t.ensure(Kind::Dir).unwrap_err();
        assert!(matches!(e, Error::WrongKind { is_dir: false, .. }), "{e}");
        t.remove().unwrap();
        t.remove().unwrap();
        assert!(!target.exists());
        assert!(!t.is_mounted().unwrap());
    }
}
