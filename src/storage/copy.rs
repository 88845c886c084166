//! Copies of files and trees, and filesystem freezes: what snapshots are
//! made of.
//!
//! A copy shares extents with its source (FICLONE) where the filesystem can
//! (xfs with reflink, btrfs), and is a sparse copy otherwise: holes stay
//! holes, so a thin 100 GiB image with 1 GiB written costs 1 GiB of space
//! and of reading, not 100.
//!
//! The source is read through handles opened beside their parent with
//! `O_NOFOLLOW` and checked against what was listed, so a tree that changes
//! under the copy (a folder swapped for a symlink to `/etc`) cannot lead it
//! outside the tree. The destination is this module's own: made private
//! (0700, 0600) and given its owner, mode and times only once its content is
//! in, and removed whole when the copy fails.
//!
//! [`Frozen`] makes the source consistent: FIFREEZE flushes a filesystem and
//! blocks its writers until thaw. Writers include this process, so the
//! frozen filesystem must not be the copy's destination: the image backend
//! freezes the volume's filesystem (mounted from the image) and clones the
//! image file, which lives on the pool's.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{
    AtFlags, CWD, Dir, FileType, Mode, OFlags, SeekFrom, StatxAttributes, StatxFlags,
    StatxTimestamp, Timespec, Timestamps, XattrFlags,
};
use rustix::io::Errno;

/// How a file's data reached its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Extents shared with the source: instant, and no space is used until
    /// one side is written.
    Reflink,
    /// Data read and written extent by extent; holes left as holes.
    Copy,
}

impl fmt::Display for CopyMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::Copy => "copy",
        })
    }
}

/// What [`copy_tree`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeCopy {
    /// Regular files copied, each inode once (further hard links are links).
    pub files: u64,
    /// Of those, the ones whose extents are shared with the source.
    pub reflinked: u64,
    /// Apparent bytes of those files (holes included).
    pub bytes: u64,
    /// `Reflink` when every file was reflinked (or there were none and the
    /// destination's filesystem can), `Copy` otherwise.
    pub method: CopyMethod,
}

/// Read/write copies move this much at a time (where copy_file_range is
/// refused, e.g. between filesystems).
const BUF_LEN: usize = 1 << 20;
/// copy_file_range moves at most this much per call, so that one call does
/// not hold the source for long.
const OFFLOAD_CHUNK: usize = 1 << 26;
/// The kernel's limits on one listxattr (XATTR_LIST_MAX) and one value
/// (XATTR_SIZE_MAX): buffers this large never come back ERANGE.
const XATTR_MAX: usize = 1 << 16;

/// Clones the regular file `src` into the new file `dst`, which gets `src`'s
/// mode: extents shared where the filesystem can, a sparse copy otherwise.
///
/// `src` is not followed if it is a symlink. `dst` must not exist; it is
/// made durable (file and folder fsynced) before this returns, and removed
/// on any error.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<CopyMethod> {
    let (file, meta) = open_regular(CWD, src, src)?;
    let out = create_private(dst)?;
    let made = Created::new(dst);
    let method = Cloner::default().fill(&file, src, &out, dst, meta.size)?;
    rustix::fs::fchmod(&out, meta.mode()).map_err(at("setting the mode of", dst))?;
    out.sync_all().map_err(at("syncing", dst))?;
    sync_parent(dst)?;
    made.keep();
    Ok(method)
}

/// Copies the folder `src` and everything under it to `dst`, which must not
/// exist: folders, files (reflinked where the filesystem can, sparse copies
/// otherwise), symlinks (as they are, never followed), hard links (as
/// links), fifos, sockets and devices, with owners, modes (setuid, setgid,
/// sticky included), access and modification times, and the extended
/// attributes of files and folders.
///
/// The copy stays on `src`'s filesystem: a mount point under it is an error
/// naming it, never a copy of another filesystem's data. When this returns
/// the copy is durable (one syncfs of `dst`'s filesystem); on error nothing
/// is left at `dst`, and the error names the path that failed.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<TreeCopy> {
    copy_tree_to(src, dst, false)
}

/// [`copy_tree`] into `dst`, an empty folder that exists already (a btrfs
/// subvolume made, and limited, for the copy): it gets `src`'s owner, mode
/// and times like a folder the copy makes. On error it is removed too.
pub fn copy_tree_into(src: &Path, dst: &Path) -> io::Result<TreeCopy> {
    let mut entries = fs::read_dir(dst).map_err(at("listing", dst))?;
    if entries.next().is_some() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("copying into {}: it is not empty", dst.display()),
        ));
    }
    copy_tree_to(src, dst, true)
}

fn copy_tree_to(src: &Path, dst: &Path, exists: bool) -> io::Result<TreeCopy> {
    let root = rustix::fs::open(
        src,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(at("opening", src))?;
    let meta = Meta::of(&root).map_err(at("inspecting", src))?;
    // A copy inside its own source would find itself and copy itself again.
    let parent = parent_of(dst);
    let parent_fd = rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(at("opening the parent of", dst))?;
    if lies_within(parent_fd, meta.id()).map_err(at("resolving the parent of", dst))? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "copying {} to {}: the destination lies inside the source",
                src.display(),
                dst.display()
            ),
        ));
    }
    if !exists {
        rustix::fs::mkdir(dst, Mode::from_raw_mode(0o700)).map_err(at("creating", dst))?;
    }
    let mut walk = Walk::new(meta.dev);
    match walk.run(root, &meta, src, dst) {
        Ok(copied) => Ok(copied),
        Err(e) => {
            if let Err(rm) = fs::remove_dir_all(dst) {
                tracing::warn!(path = %dst.display(), error = %rm, "removing a failed copy");
            }
            Err(e)
        }
    }
}

/// Whether files in the folder `dir` can share extents (FICLONE), asked of
/// the filesystem itself: two unnamed temporary files in `dir`, gone when
/// closed. An error of the probe counts as no.
pub fn supports_reflink(dir: &Path) -> bool {
    match probe_reflink(dir) {
        Ok(can) => can,
        Err(e) => {
            tracing::debug!(path = %dir.display(), error = %e, "reflink probe failed");
            false
        }
    }
}

/// A frozen filesystem: its dirty data flushed and every writer blocked,
/// so that what is copied from it is consistent. Thawed by [`Frozen::thaw`]
/// or on drop, so that an error path cannot leave it frozen.
#[derive(Debug)]
#[must_use = "the filesystem is thawed as soon as this is dropped"]
pub struct Frozen {
    /// The mount point held open; `None` once thawed.
    dir: Option<OwnedFd>,
    path: PathBuf,
}

impl Frozen {
    /// Freezes the filesystem mounted at `mount_point` (FIFREEZE). A
    /// filesystem frozen already, by anyone, is `ResourceBusy`.
    ///
    /// Any folder would do for the kernel, which freezes the whole
    /// filesystem holding it; only a mount point is taken, so that a
    /// volume's folder given by mistake does not freeze its pool's (or the
    /// node's root) filesystem.
    pub fn freeze(mount_point: &Path) -> io::Result<Frozen> {
        let dir = rustix::fs::open(
            mount_point,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(at("opening", mount_point))?;
        let meta = Meta::of(&dir).map_err(at("inspecting", mount_point))?;
        if meta.mount_root == Some(false) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "freezing {}: not a mount point (the kernel would freeze the whole filesystem holding it)",
                    mount_point.display()
                ),
            ));
        }
        freeze_ioctl::freeze(dir.as_fd()).map_err(at("freezing", mount_point))?;
        tracing::debug!(path = %mount_point.display(), "filesystem frozen");
        Ok(Frozen {
            dir: Some(dir),
            path: mount_point.to_owned(),
        })
    }

    /// The mount point that was frozen.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Thaws the filesystem (FITHAW), reporting the kernel's answer.
    pub fn thaw(mut self) -> io::Result<()> {
        self.thaw_now()
    }

    fn thaw_now(&mut self) -> io::Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        freeze_ioctl::thaw(dir.as_fd()).map_err(at("thawing", &self.path))?;
        tracing::debug!(path = %self.path.display(), "filesystem thawed");
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw_now() {
            tracing::error!(path = %self.path.display(), error = %e, "filesystem left frozen");
        }
    }
}

/// Thaws the filesystem mounted at `mount_point` if it is frozen: what a
/// process killed between FIFREEZE and FITHAW left. `Ok(false)` when it was
/// not frozen.
pub fn thaw_if_frozen(mount_point: &Path) -> io::Result<bool> {
    let dir = rustix::fs::open(
        mount_point,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(at("opening", mount_point))?;
    match freeze_ioctl::thaw(dir.as_fd()) {
        Ok(()) => Ok(true),
        // The kernel's answer for a filesystem that is not frozen.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(at("thawing", mount_point)(e)),
    }
}

/// FIFREEZE and FITHAW, which neither rustix nor nix wraps: the one place
/// of the crate that needs `unsafe`.
mod freeze_ioctl {
    #![allow(unsafe_code)]

    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    // linux/fs.h: FIFREEZE _IOWR('X', 119, int), FITHAW _IOWR('X', 120, int).
    nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

    pub(super) fn freeze(dir: BorrowedFd<'_>) -> io::Result<()> {
        let mut unused: libc::c_int = 0;
        // SAFETY: `dir` is an open descriptor borrowed for the whole call,
        // and the argument points to a live int (the kernel does not read
        // it for FIFREEZE).
        unsafe { fifreeze(dir.as_raw_fd(), &mut unused) }?;
        Ok(())
    }

    pub(super) fn thaw(dir: BorrowedFd<'_>) -> io::Result<()> {
        let mut unused: libc::c_int = 0;
        // SAFETY: as for `freeze`.
        unsafe { fithaw(dir.as_raw_fd(), &mut unused) }?;
        Ok(())
    }
}

/// The error `e` of `what` on `path`, with the path in the message and the
/// kind kept for callers that match on it.
fn at<'a, E: Into<io::Error>>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> io::Error + 'a {
    move |e| {
        let e = e.into();
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    }
}

/// The error `e` of moving data from `src` to `dst`, naming both: either
/// side may be the cause (a bad block in one, a full disk under the other).
fn between<'a, E: Into<io::Error>>(
    what: &'static str,
    src: &'a Path,
    dst: &'a Path,
) -> impl FnOnce(E) -> io::Error + 'a {
    move |e| {
        let e = e.into();
        io::Error::new(
            e.kind(),
            format!("{what} {} to {}: {e}", src.display(), dst.display()),
        )
    }
}

/// What this module needs of an inode, from statx: its fields have the same
/// types on every architecture.
#[derive(Debug, Clone, Copy)]
struct Meta {
    dev: u64,
    ino: u64,
    kind: FileType,
    /// Permission bits with setuid, setgid and sticky.
    perm: u32,
    nlink: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    size: u64,
    atime: StatxTimestamp,
    mtime: StatxTimestamp,
    /// Whether it is the root of a mount; `None` where the kernel does not
    /// say (before Linux 5.8).
    mount_root: Option<bool>,
}

impl Meta {
    fn of(fd: impl AsFd) -> io::Result<Meta> {
        Meta::at(fd, "", AtFlags::EMPTY_PATH)
    }

    /// The entry `name` of the folder `dir`, not followed if a symlink.
    fn entry(dir: impl AsFd, name: &OsStr) -> io::Result<Meta> {
        Meta::at(dir, name, AtFlags::SYMLINK_NOFOLLOW)
    }

    fn at(dir: impl AsFd, name: impl rustix::path::Arg, flags: AtFlags) -> io::Result<Meta> {
        let st = rustix::fs::statx(
            dir,
            name,
            flags | AtFlags::NO_AUTOMOUNT,
            StatxFlags::BASIC_STATS,
        )?;
        Ok(Meta {
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            kind: FileType::from_raw_mode(st.stx_mode.into()),
            perm: u32::from(st.stx_mode) & 0o7777,
            nlink: st.stx_nlink,
            uid: st.stx_uid,
            gid: st.stx_gid,
            rdev: rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor),
            size: st.stx_size,
            atime: st.stx_atime,
            mtime: st.stx_mtime,
            mount_root: st
                .stx_attributes_mask
                .contains(StatxAttributes::MOUNT_ROOT)
                .then(|| st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)),
        })
    }

    fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    fn mode(&self) -> Mode {
        Mode::from_raw_mode(self.perm)
    }

    fn times(&self) -> Timestamps {
        let ts = |t: StatxTimestamp| Timespec {
            tv_sec: t.tv_sec,
            tv_nsec: t.tv_nsec.into(),
        };
        Timestamps {
            last_access: ts(self.atime),
            last_modification: ts(self.mtime),
        }
    }

    /// Checks that `fd`, opened after `self` was read from its folder, is
    /// the same inode: the tree did not change in between.
    fn same_as(&self, fd: impl AsFd, path: &Path) -> io::Result<()> {
        let now = Meta::of(fd).map_err(at("inspecting", path))?;
        self.same_inode(&now, path)
    }

    fn same_inode(&self, now: &Meta, path: &Path) -> io::Result<()> {
        if now.id() == self.id() && now.kind == self.kind {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{} changed while it was being copied",
            path.display()
        )))
    }
}

/// Opens `name` in `dir` as the regular file it must be, without following
/// a symlink and without blocking should it have become a fifo.
fn open_regular(dir: impl AsFd, name: &Path, shown: &Path) -> io::Result<(File, Meta)> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(&dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        // What O_NOFOLLOW answers for a symlink, said plainly.
        Err(Errno::LOOP)
            if Meta::entry(&dir, name.as_os_str()).is_ok_and(|m| m.kind == FileType::Symlink) =>
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is a symlink, which is not followed", shown.display()),
            ));
        }
        Err(e) => return Err(at("opening", shown)(e)),
    };
    let meta = Meta::of(&fd).map_err(at("inspecting", shown))?;
    if meta.kind != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", shown.display()),
        ));
    }
    Ok((File::from(fd), meta))
}

/// Creates the new file `path`, private until its copy is complete.
fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(at("creating", path))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Makes the name of the new file `path` durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = parent_of(path);
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(at("syncing the folder", parent))
}

/// Whether the folder `dir` is the inode `ancestor` or lies below it,
/// walking `..` up to the root: inode numbers, which symlinks and bind
/// mounts cannot disguise.
fn lies_within(dir: OwnedFd, ancestor: (u64, u64)) -> io::Result<bool> {
    let mut here = dir;
    let mut id = Meta::of(&here)?.id();
    loop {
        if id == ancestor {
            return Ok(true);
        }
        let up = rustix::fs::openat(
            &here,
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let up_id = Meta::of(&up)?.id();
        if up_id == id {
            return Ok(false);
        }
        here = up;
        id = up_id;
    }
}

/// A file this module created, removed again unless kept.
struct Created<'a> {
    path: &'a Path,
    kept: bool,
}

impl<'a> Created<'a> {
    fn new(path: &'a Path) -> Created<'a> {
        Created { path, kept: false }
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Created<'_> {
    fn drop(&mut self) {
        if !self.kept
            && let Err(e) = fs::remove_file(self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "removing a failed copy");
        }
    }
}

/// Fills new files with the data of others, remembering across the files
/// of a tree what the filesystems refused.
struct Cloner {
    /// FICLONE is still worth trying: cleared once the filesystem says it
    /// cannot share extents at all.
    reflink: bool,
    /// copy_file_range is still worth trying: cleared once refused (between
    /// filesystems of different types, for one).
    offload: bool,
    /// For read/write copies; allocated on first use.
    buf: Vec<u8>,
}

impl Default for Cloner {
    fn default() -> Self {
        Cloner {
            reflink: true,
            offload: true,
            buf: Vec::new(),
        }
    }
}

impl Cloner {
    /// Gives the new, empty file `dst` the `len` bytes of `src`.
    fn fill(
        &mut self,
        src: &File,
        src_path: &Path,
        dst: &File,
        dst_path: &Path,
        len: u64,
    ) -> io::Result<CopyMethod> {
        if self.reflink {
            match rustix::fs::ioctl_ficlone(dst, src) {
                Ok(()) => return Ok(CopyMethod::Reflink),
                // This filesystem (or this pair) cannot share extents at all.
                Err(Errno::OPNOTSUPP | Errno::NOTTY | Errno::XDEV | Errno::NOSYS) => {
                    self.reflink = false;
                }
                // This file cannot (btrfs nodatacow, xfs realtime, DAX).
                Err(Errno::INVAL) => {}
                Err(e) => return Err(between("cloning", src_path, dst_path)(e)),
            }
            // Whatever a refused clone may have left goes before the copy.
            dst.set_len(0).map_err(at("truncating", dst_path))?;
        }
        self.copy_sparse(src, src_path, dst, dst_path, len)?;
        Ok(CopyMethod::Copy)
    }

    /// Copies the data extents of `src` (SEEK_DATA/SEEK_HOLE) to the same
    /// offsets of `dst` and sets its length, so that holes stay holes.
    fn copy_sparse(
        &mut self,
        src: &File,
        src_path: &Path,
        dst: &File,
        dst_path: &Path,
        len: u64,
    ) -> io::Result<()> {
        let mut pos = 0;
        while pos < len {
            let start = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
                Ok(start) => start,
                // Nothing but a hole after `pos`.
                Err(Errno::NXIO) => break,
                Err(e) => return Err(at("finding data in", src_path)(e)),
            };
            if start >= len {
                break;
            }
            let end = rustix::fs::seek(src, SeekFrom::Hole(start))
                .map_err(at("finding holes in", src_path))?
                .min(len);
            self.copy_range(src, src_path, dst, dst_path, start, end)?;
            pos = end;
        }
        dst.set_len(len)
            .map_err(at("setting the length of", dst_path))
    }

    /// Copies bytes `start..end` of `src` to the same offsets of `dst`, by
    /// copy_file_range while the kernel takes it, by read and write after.
    fn copy_range(
        &mut self,
        src: &File,
        src_path: &Path,
        dst: &File,
        dst_path: &Path,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let mut off = start;
        while off < end {
            let want = usize::try_from(end - off).unwrap_or(usize::MAX);
            if self.offload {
                let (mut off_in, mut off_out) = (off, off);
                let want = want.min(OFFLOAD_CHUNK);
                match rustix::fs::copy_file_range(
                    src,
                    Some(&mut off_in),
                    dst,
                    Some(&mut off_out),
                    want,
                ) {
                    // The source ended early: the rest is a hole in the copy.
                    Ok(0) => return Ok(()),
                    Ok(n) => off += n as u64,
                    Err(Errno::INTR) => {}
                    Err(Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => {
                        self.offload = false;
                    }
                    Err(e) => return Err(between("copying", src_path, dst_path)(e)),
                }
                continue;
            }
            if self.buf.is_empty() {
                self.buf = vec![0; BUF_LEN];
            }
            let want = want.min(self.buf.len());
            let n = match src.read_at(&mut self.buf[..want], off) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(at("reading", src_path)(e)),
            };
            dst.write_all_at(&self.buf[..n], off)
                .map_err(at("writing", dst_path))?;
            off += n as u64;
        }
        Ok(())
    }
}

/// One step of a tree copy. Steps are taken from a stack, not by
/// recursion, so that depth costs memory and one handle per level, never
/// the thread's stack.
enum Step {
    /// Copy the entry of the source folder `parent` at `src` to `dst`.
    Copy {
        parent: Rc<OwnedFd>,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Give a copied folder its owner, mode, attributes and times, once
    /// its entries (which change its mtime) are in.
    Seal {
        dir: Rc<OwnedFd>,
        meta: Meta,
        src: PathBuf,
        dst: PathBuf,
    },
}

struct Walk {
    /// The source's filesystem, which the copy does not leave.
    dev: u64,
    steps: Vec<Step>,
    /// The copy of each multiply-linked inode met so far.
    links: HashMap<u64, PathBuf>,
    cloner: Cloner,
    xattrs: Xattrs,
    files: u64,
    reflinked: u64,
    bytes: u64,
}

impl Walk {
    fn new(dev: u64) -> Walk {
        Walk {
            dev,
            steps: Vec::new(),
            links: HashMap::new(),
            cloner: Cloner::default(),
            xattrs: Xattrs::default(),
            files: 0,
            reflinked: 0,
            bytes: 0,
        }
    }

    fn run(&mut self, root: OwnedFd, meta: &Meta, src: &Path, dst: &Path) -> io::Result<TreeCopy> {
        let root = Rc::new(root);
        self.list(&root, src, dst)?;
        while let Some(step) = self.steps.pop() {
            match step {
                Step::Copy { parent, src, dst } => self.copy(&parent, &src, &dst)?,
                Step::Seal {
                    dir,
                    meta,
                    src,
                    dst,
                } => self.seal(&dir, &meta, &src, &dst)?,
            }
        }
        let method = if self.files > 0 {
            if self.reflinked == self.files {
                CopyMethod::Reflink
            } else {
                CopyMethod::Copy
            }
        } else if supports_reflink(dst) {
            CopyMethod::Reflink
        } else {
            CopyMethod::Copy
        };
        self.seal(&root, meta, src, dst)?;
        let out = rustix::fs::open(
            dst,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(at("opening", dst))?;
        rustix::fs::syncfs(&out).map_err(at("syncing the filesystem of", dst))?;
        Ok(TreeCopy {
            files: self.files,
            reflinked: self.reflinked,
            bytes: self.bytes,
            method,
        })
    }

    /// Queues the entries of the source folder `dir`, in name order.
    fn list(&mut self, dir: &Rc<OwnedFd>, src: &Path, dst: &Path) -> io::Result<()> {
        let mut names = Vec::new();
        for entry in Dir::read_from(dir.as_fd()).map_err(at("listing", src))? {
            let entry = entry.map_err(at("listing", src))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from(OsStr::from_bytes(name)));
            }
        }
        names.sort_unstable();
        // Last pushed, first copied.
        for name in names.into_iter().rev() {
            self.steps.push(Step::Copy {
                parent: Rc::clone(dir),
                src: src.join(&name),
                dst: dst.join(&name),
            });
        }
        Ok(())
    }

    fn copy(&mut self, parent: &Rc<OwnedFd>, src: &Path, dst: &Path) -> io::Result<()> {
        let name = src.file_name().unwrap_or_default();
        let meta = Meta::entry(parent.as_fd(), name).map_err(at("inspecting", src))?;
        // A different device is another filesystem; a mount root on the same
        // device is a bind mount, which would copy data from elsewhere.
        if meta.dev != self.dev || meta.mount_root == Some(true) {
            return Err(io::Error::new(
                io::ErrorKind::CrossesDevices,
                format!(
                    "{} is a mount point: a copy does not cross into another filesystem",
                    src.display()
                ),
            ));
        }
        if meta.kind != FileType::Directory
            && meta.nlink > 1
            && let Some(first) = self.links.get(&meta.ino)
        {
            return rustix::fs::linkat(CWD, first, CWD, dst, AtFlags::empty())
                .map_err(at("linking", dst));
        }
        match meta.kind {
            FileType::Directory => {
                let dir = rustix::fs::openat(
                    parent.as_fd(),
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(at("opening", src))?;
                meta.same_as(&dir, src)?;
                rustix::fs::mkdir(dst, Mode::from_raw_mode(0o700)).map_err(at("creating", dst))?;
                let dir = Rc::new(dir);
                self.steps.push(Step::Seal {
                    dir: Rc::clone(&dir),
                    meta,
                    src: src.to_owned(),
                    dst: dst.to_owned(),
                });
                self.list(&dir, src, dst)?;
            }
            FileType::RegularFile => {
                let (file, now) = open_regular(parent.as_fd(), Path::new(name), src)?;
                meta.same_inode(&now, src)?;
                let out = create_private(dst)?;
                let method = self.cloner.fill(&file, src, &out, dst, meta.size)?;
                self.restore(out.as_fd(), file.as_fd(), &meta, src, dst)?;
                self.files += 1;
                self.bytes += meta.size;
                if method == CopyMethod::Reflink {
                    self.reflinked += 1;
                }
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(parent.as_fd(), name, Vec::new())
                    .map_err(at("reading the symlink", src))?;
                rustix::fs::symlinkat(target.as_c_str(), CWD, dst).map_err(at("creating", dst))?;
                // A symlink's mode is always 0777 on Linux; its owner and
                // times are its own.
                std::os::unix::fs::lchown(dst, Some(meta.uid), Some(meta.gid))
                    .map_err(at("setting the owner of", dst))?;
                rustix::fs::utimensat(CWD, dst, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(at("setting the times of", dst))?;
            }
            FileType::Fifo
            | FileType::Socket
            | FileType::CharacterDevice
            | FileType::BlockDevice => {
                rustix::fs::mknodat(CWD, dst, meta.kind, Mode::empty(), meta.rdev)
                    .map_err(at("creating", dst))?;
                std::os::unix::fs::lchown(dst, Some(meta.uid), Some(meta.gid))
                    .map_err(at("setting the owner of", dst))?;
                rustix::fs::chmodat(CWD, dst, meta.mode(), AtFlags::empty())
                    .map_err(at("setting the mode of", dst))?;
                rustix::fs::utimensat(CWD, dst, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(at("setting the times of", dst))?;
            }
            FileType::Unknown => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is of an unknown file type", src.display()),
                ));
            }
        }
        if meta.kind != FileType::Directory && meta.nlink > 1 {
            self.links.insert(meta.ino, dst.to_owned());
        }
        Ok(())
    }

    fn seal(&mut self, dir: &OwnedFd, meta: &Meta, src: &Path, dst: &Path) -> io::Result<()> {
        let out = rustix::fs::open(
            dst,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(at("opening", dst))?;
        self.restore(out.as_fd(), dir.as_fd(), meta, src, dst)
    }

    /// Gives the copy `out` of `from` its owner, then its mode (chown
    /// clears setuid and setgid), then its extended attributes (chown
    /// clears file capabilities), then its times (everything before
    /// changes them).
    fn restore(
        &mut self,
        out: BorrowedFd<'_>,
        from: BorrowedFd<'_>,
        meta: &Meta,
        src: &Path,
        dst: &Path,
    ) -> io::Result<()> {
        std::os::unix::fs::fchown(out, Some(meta.uid), Some(meta.gid))
            .map_err(at("setting the owner of", dst))?;
        rustix::fs::fchmod(out, meta.mode()).map_err(at("setting the mode of", dst))?;
        self.xattrs.copy(from, out, src, dst)?;
        rustix::fs::futimens(out, &meta.times()).map_err(at("setting the times of", dst))
    }
}

/// Buffers for copying extended attributes, sized to the kernel's limits.
#[derive(Default)]
struct Xattrs {
    names: Vec<u8>,
    value: Vec<u8>,
}

impl Xattrs {
    /// Copies every extended attribute of `from` to `out`. A filesystem
    /// without them (on either side) is not an error; the attribute is
    /// simply not there to copy, or has nowhere to go.
    fn copy(
        &mut self,
        from: BorrowedFd<'_>,
        out: BorrowedFd<'_>,
        src: &Path,
        dst: &Path,
    ) -> io::Result<()> {
        if self.names.is_empty() {
            self.names = vec![0; XATTR_MAX];
            self.value = vec![0; XATTR_MAX];
        }
        let listed = match rustix::fs::flistxattr(from, &mut self.names[..]) {
            Ok(n) => n,
            Err(Errno::OPNOTSUPP) => return Ok(()),
            Err(e) => return Err(at("listing the extended attributes of", src)(e)),
        };
        for name in self.names[..listed].split(|b| *b == 0) {
            if name.is_empty() {
                continue;
            }
            let name = OsStr::from_bytes(name);
            let len = match rustix::fs::fgetxattr(from, name, &mut self.value[..]) {
                Ok(len) => len,
                // Removed since it was listed.
                Err(Errno::NODATA) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!(
                            "reading extended attribute {} of {}: {e}",
                            name.display(),
                            src.display()
                        ),
                    ));
                }
            };
            match rustix::fs::fsetxattr(out, name, &self.value[..len], XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::OPNOTSUPP) => {
                    tracing::debug!(path = %dst.display(), xattr = %name.display(),
                        "extended attribute not supported by the destination");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!(
                            "setting extended attribute {} of {}: {e}",
                            name.display(),
                            dst.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn probe_reflink(dir: &Path) -> io::Result<bool> {
    match temp_file(dir).and_then(|a| Ok((a, temp_file(dir)?))) {
        Ok((a, b)) => clones(&a, &b),
        // O_TMPFILE refused (an older kernel or an exotic filesystem):
        // named files, removed on the way out.
        Err(Errno::OPNOTSUPP | Errno::ISDIR) => probe_reflink_named(dir),
        Err(e) => Err(e.into()),
    }
}

fn probe_reflink_named(dir: &Path) -> io::Result<bool> {
    let name = |n| dir.join(format!(".stead-reflink-probe-{}-{n}", std::process::id()));
    let (pa, pb) = (name("a"), name("b"));
    let a = create_private(&pa)?;
    let _a = Created::new(&pa);
    let b = create_private(&pb)?;
    let _b = Created::new(&pb);
    clones(&a, &b)
}

/// Whether `b` can be made a clone of `a` (which gets a block of data
/// first: some filesystems accept empty clones they could not make).
fn clones(a: &File, b: &File) -> io::Result<bool> {
    a.write_all_at(&[0x5a; 4096], 0)?;
    match rustix::fs::ioctl_ficlone(b, a) {
        Ok(()) => Ok(true),
        Err(Errno::OPNOTSUPP | Errno::NOTTY | Errno::XDEV | Errno::NOSYS | Errno::INVAL) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// An unnamed file in `dir`, gone when closed.
fn temp_file(dir: &Path) -> rustix::io::Result<File> {
    let fd = rustix::fs::open(
        dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    //! On real filesystems: an xfs with reflink and an ext4 on loop devices
    //! (the unit tests run as root, like CI), unmounted whatever happens.

    use super::*;
    use crate::storage::command;
    use nix::mount::{MntFlags, MsFlags};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    const MIB: u64 = 1 << 20;

    /// A mount, lazily unmounted (and its loop device detached) on drop, so
    /// that a failing test leaves nothing mounted.
    struct Mounted {
        at: PathBuf,
        loop_dev: Option<String>,
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.at, MntFlags::MNT_DETACH);
            if let Some(dev) = &self.loop_dev {
                let _ = command::run("losetup", &["--detach", dev]);
            }
        }
    }

    impl Mounted {
        fn tmpfs(at: &Path) -> Mounted {
            fs::create_dir_all(at).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                at,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=1m"),
            )
            .unwrap();
            Mounted {
                at: at.to_owned(),
                loop_dev: None,
            }
        }
    }

    /// A small filesystem of its own in a temporary folder.
    struct Scratch {
        // Unmounted before the folder holding its image is removed.
        mount: Mounted,
        _tmp: tempfile::TempDir,
    }

    impl Scratch {
        /// mkfs.xfs (xfsprogs ≥ 5.19) refuses filesystems under 300 MiB.
        fn xfs() -> Scratch {
            Scratch::make("xfs", 300 * MIB, &["mkfs.xfs", "-q", "-m", "reflink=1"])
        }

        /// 256-byte inodes: nanosecond times (mke2fs gives small
        /// filesystems 128-byte ones on some versions).
        fn ext4() -> Scratch {
            Scratch::make(
                "ext4",
                64 * MIB,
                &[
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-I",
                    "256",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                ],
            )
        }

        fn make(fs_type: &str, size: u64, mkfs: &[&str]) -> Scratch {
            let tmp = tempfile::tempdir().unwrap();
            let image = tmp.path().join("fs.img");
            File::create(&image).unwrap().set_len(size).unwrap();
            let image_s = image.to_str().unwrap();
            let mut args = mkfs[1..].to_vec();
            args.push(image_s);
            command::run(mkfs[0], &args).unwrap();
            let at = tmp.path().join("mnt");
            fs::create_dir(&at).unwrap();
            let dev = command::run("losetup", &["--find", "--show", image_s]).unwrap();
            let mount = Mounted {
                at,
                loop_dev: Some(dev.trim().to_owned()),
            };
            nix::mount::mount(
                Some(dev.trim()),
                &mount.at,
                Some(fs_type),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            Scratch { mount, _tmp: tmp }
        }

        fn path(&self) -> &Path {
            &self.mount.at
        }
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    /// A recognisable block: no two offsets look alike.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// The data extents of `path`, as SEEK_DATA/SEEK_HOLE see them.
    fn extents(path: &Path) -> Vec<(u64, u64)> {
        let f = File::open(path).unwrap();
        let len = f.metadata().unwrap().len();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < len {
            let Ok(start) = rustix::fs::seek(&f, SeekFrom::Data(pos)) else {
                break;
            };
            let end = rustix::fs::seek(&f, SeekFrom::Hole(start)).unwrap();
            out.push((start, end));
            pos = end;
        }
        out
    }

    fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) {
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: atime.0,
                tv_nsec: atime.1,
            },
            last_modification: Timespec {
                tv_sec: mtime.0,
                tv_nsec: mtime.1,
            },
        };
        rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn chown(path: &Path) {
        std::os::unix::fs::lchown(path, Some(1234), Some(5678)).unwrap();
    }

    const DATA_ATIME: (i64, i64) = (1_600_000_000, 123_456_789);
    const DATA_MTIME: (i64, i64) = (1_500_000_000, 987_654_321);

    /// A tree with one of everything `copy_tree` promises to keep; returns
    /// its regular files' (count, apparent bytes).
    fn populate(root: &Path) -> (u64, u64) {
        fs::create_dir(root).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        let data = root.join("data.txt");
        fs::write(&data, b"hello, snapshot\n").unwrap();
        chmod(&data, 0o640);
        rustix::fs::setxattr(&data, "user.stead", b"kept", XattrFlags::empty()).unwrap();
        let suid = root.join("suid");
        fs::write(&suid, b"#!/bin/sh\n").unwrap();
        chown(&suid);
        chmod(&suid, 0o4755);

        let sgid = root.join("sgid");
        fs::create_dir(&sgid).unwrap();
        chown(&sgid);
        chmod(&sgid, 0o2775);
        let sticky = root.join("sticky");
        let deep = sticky.join("a/b/c");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("deep.txt"), b"deep").unwrap();
        fs::create_dir(sticky.join("empty-dir")).unwrap();

        std::os::unix::fs::symlink("data.txt", root.join("link")).unwrap();
        let dangling = root.join("dangling");
        std::os::unix::fs::symlink("no/such/target", &dangling).unwrap();
        chown(&dangling);
        set_times(&dangling, (1_400_000_000, 5), (1_300_000_000, 7));

        fs::write(root.join("hard1"), b"one inode, two names").unwrap();
        fs::hard_link(root.join("hard1"), sgid.join("hard2")).unwrap();

        let fifo = root.join("fifo");
        rustix::fs::mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o640), 0).unwrap();
        chown(&fifo);
        let null = root.join("null");
        let dev = rustix::fs::makedev(1, 3);
        rustix::fs::mknodat(
            CWD,
            &null,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            dev,
        )
        .unwrap();
        let sock = root.join("sock");
        rustix::fs::mknodat(CWD, &sock, FileType::Socket, Mode::from_raw_mode(0o755), 0).unwrap();

        let sparse = root.join("sparse");
        write_at(&sparse, 0, &pattern(MIB as usize, 1));
        write_at(&sparse, 32 * MIB, &pattern(4096, 2));
        let sparse_len = 40 * MIB;
        File::options()
            .write(true)
            .open(&sparse)
            .unwrap()
            .set_len(sparse_len)
            .unwrap();

        // Last, as entries change their folders' times.
        set_times(&data, DATA_ATIME, DATA_MTIME);
        set_times(&deep, (1_000_000_000, 1), (1_100_000_000, 2));
        chmod(&sticky, 0o1777);
        chown(root);
        chmod(root, 0o750);
        let files = [
            "empty",
            "data.txt",
            "suid",
            "hard1",
            "sparse",
            "sticky/a/b/c/deep.txt",
        ];
        let bytes = files
            .iter()
            .map(|f| fs::metadata(root.join(f)).unwrap().len())
            .sum();
        (files.len() as u64, bytes)
    }

    /// Asserts that `dst` is a faithful copy of `src`, entry by entry.
    fn assert_same_tree(src: &Path, dst: &Path) {
        let (s, d) = (
            fs::symlink_metadata(src).unwrap(),
            fs::symlink_metadata(dst).unwrap(),
        );
        let shown = dst.display();
        assert_eq!(s.file_type(), d.file_type(), "{shown}: type");
        assert_eq!(s.mode(), d.mode(), "{shown}: mode {:o}", d.mode());
        assert_eq!((s.uid(), s.gid()), (d.uid(), d.gid()), "{shown}: owner");
        assert_eq!(
            (s.mtime(), s.mtime_nsec()),
            (d.mtime(), d.mtime_nsec()),
            "{shown}: mtime"
        );
        assert_eq!(s.rdev(), d.rdev(), "{shown}: rdev");
        let ft = s.file_type();
        if ft.is_dir() {
            let names = |p: &Path| {
                let mut v: Vec<_> = fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                v.sort();
                v
            };
            let (sn, dn) = (names(src), names(dst));
            assert_eq!(sn, dn, "{shown}: entries");
            for n in sn {
                assert_same_tree(&src.join(&n), &dst.join(&n));
            }
        } else if ft.is_symlink() {
            assert_eq!(fs::read_link(src).unwrap(), fs::read_link(dst).unwrap());
        } else if ft.is_file() {
            assert_eq!(s.len(), d.len(), "{shown}: length");
            assert!(
                d.blocks() <= s.blocks() + 64,
                "{shown}: {} blocks for the source's {}",
                d.blocks(),
                s.blocks()
            );
            assert!(
                fs::read(src).unwrap() == fs::read(dst).unwrap(),
                "{shown}: content"
            );
        }
    }

    /// What only the copy can show: links, atimes, attributes, sparseness.
    fn assert_copy_details(dst: &Path) {
        let data = fs::metadata(dst.join("data.txt")).unwrap();
        assert_eq!((data.atime(), data.atime_nsec()), DATA_ATIME);
        assert_eq!((data.mtime(), data.mtime_nsec()), DATA_MTIME);
        let hard1 = fs::metadata(dst.join("hard1")).unwrap();
        let hard2 = fs::metadata(dst.join("sgid/hard2")).unwrap();
        assert_eq!(hard1.ino(), hard2.ino());
        assert_eq!(hard1.nlink(), 2);
        let mut value = [0u8; 16];
        let n = rustix::fs::getxattr(dst.join("data.txt"), "user.stead", &mut value[..]).unwrap();
        assert_eq!(&value[..n], b"kept");
        assert_eq!(
            extents(&dst.join("sparse")),
            [(0, MIB), (32 * MIB, 32 * MIB + 4096)]
        );
        assert_eq!(
            fs::read_link(dst.join("dangling")).unwrap(),
            Path::new("no/such/target")
        );
        assert_eq!(
            fs::metadata(dst.join("suid")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            fs::metadata(dst.join("sticky")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(
            fs::metadata(dst.join("sgid")).unwrap().mode() & 0o7777,
            0o2775
        );
        assert!(
            fs::symlink_metadata(dst.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
    }

    #[test]
    fn copy_method_displays_as_its_name() {
        assert_eq!(CopyMethod::Reflink.to_string(), "reflink");
        assert_eq!(CopyMethod::Copy.to_string(), "copy");
    }

    #[test]
    fn clone_file_on_xfs_reflinks_the_same_content() {
        let fs_ = Scratch::xfs();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("dst"));
        let content = pattern(3 * MIB as usize, 7);
        fs::write(&src, &content).unwrap();
        chmod(&src, 0o640);
        assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Reflink);
        assert_eq!(fs::read(&dst).unwrap(), content);
        assert_eq!(fs::metadata(&dst).unwrap().mode() & 0o7777, 0o640);
        // Shared extents, separate files: writing the clone leaves the source.
        write_at(&dst, 0, b"changed");
        assert_eq!(fs::read(&src).unwrap(), content);
    }

    #[test]
    fn clone_file_on_ext4_copies_the_same_content() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("dst"));
        let content = pattern(3 * MIB as usize + 17, 9);
        fs::write(&src, &content).unwrap();
        chmod(&src, 0o4750);
        assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Copy);
        assert_eq!(fs::read(&dst).unwrap(), content);
        assert_eq!(fs::metadata(&dst).unwrap().mode() & 0o7777, 0o4750);
    }

    #[test]
    fn clone_file_on_ext4_keeps_holes() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("dst"));
        write_at(&src, 0, &pattern(MIB as usize, 1));
        write_at(&src, 101 * MIB, &pattern(MIB as usize, 2));
        // And a hole at the end: the length is the source's, not its data's.
        File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_len(110 * MIB)
            .unwrap();
        assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Copy);
        let (s, d) = (fs::metadata(&src).unwrap(), fs::metadata(&dst).unwrap());
        assert_eq!(d.len(), 110 * MIB);
        assert!(
            d.blocks().abs_diff(s.blocks()) <= 64,
            "{} blocks for the source's {}",
            d.blocks(),
            s.blocks()
        );
        assert_eq!(extents(&dst), [(0, MIB), (101 * MIB, 102 * MIB)]);
        assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap());
    }

    #[test]
    fn clone_file_of_a_1gib_sparse_file_writes_only_its_data() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("dst"));
        let offsets = [0, 256 * MIB, 700 * MIB, 1024 * MIB - 64 * 1024];
        for (i, off) in offsets.iter().enumerate() {
            write_at(&src, *off, &pattern(64 * 1024, i as u8));
        }
        assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Copy);
        let d = fs::metadata(&dst).unwrap();
        assert_eq!(d.len(), 1024 * MIB);
        // 256 KiB of data, and room for the extent tree: far from 1 GiB.
        assert!(d.blocks() * 512 < MIB, "{} blocks allocated", d.blocks());
        assert_eq!(extents(&dst), extents(&src));
        let out = File::open(&dst).unwrap();
        for (i, off) in offsets.iter().enumerate() {
            let mut got = vec![0; 64 * 1024];
            out.read_exact_at(&mut got, *off).unwrap();
            assert!(got == pattern(64 * 1024, i as u8), "data at {off}");
        }
    }

    #[test]
    fn clone_file_across_filesystems_copies_sparsely() {
        let (xfs, ext4) = (Scratch::xfs(), Scratch::ext4());
        let (src, dst) = (xfs.path().join("src"), ext4.path().join("dst"));
        write_at(&src, 0, &pattern(MIB as usize, 3));
        write_at(&src, 40 * MIB, &pattern(MIB as usize, 4));
        assert_eq!(clone_file(&src, &dst).unwrap(), CopyMethod::Copy);
        assert_eq!(extents(&dst), [(0, MIB), (40 * MIB, 41 * MIB)]);
        assert!(fs::read(&src).unwrap() == fs::read(&dst).unwrap());
    }

    #[test]
    fn clone_file_onto_an_existing_file_fails_and_leaves_it() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("dst"));
        fs::write(&src, b"new").unwrap();
        fs::write(&dst, b"precious").unwrap();
        let err = clone_file(&src, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            err.to_string().contains(&dst.display().to_string()),
            "{err}"
        );
        assert_eq!(fs::read(&dst).unwrap(), b"precious");
    }

    #[test]
    fn clone_file_refuses_folders_and_symlinks_and_creates_nothing() {
        let fs_ = Scratch::ext4();
        let (dir, link, dst) = (
            fs_.path().join("dir"),
            fs_.path().join("link"),
            fs_.path().join("dst"),
        );
        fs::create_dir(&dir).unwrap();
        fs::write(fs_.path().join("file"), b"x").unwrap();
        std::os::unix::fs::symlink("file", &link).unwrap();
        let err = clone_file(&dir, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(
            err.to_string().contains(&dir.display().to_string()),
            "{err}"
        );
        let err = clone_file(&link, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(
            err.to_string().contains(&link.display().to_string()),
            "{err}"
        );
        assert!(!dst.exists());
    }

    #[test]
    fn copy_tree_on_xfs_keeps_everything_and_reflinks() {
        let fs_ = Scratch::xfs();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("copy"));
        let (files, bytes) = populate(&src);
        let copied = copy_tree(&src, &dst).unwrap();
        assert_eq!(
            copied,
            TreeCopy {
                files,
                reflinked: files,
                bytes,
                method: CopyMethod::Reflink
            }
        );
        assert_copy_details(&dst);
        assert_same_tree(&src, &dst);
    }

    #[test]
    fn copy_tree_on_ext4_keeps_everything_and_copies() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("copy"));
        let (files, bytes) = populate(&src);
        let copied = copy_tree(&src, &dst).unwrap();
        assert_eq!(
            copied,
            TreeCopy {
                files,
                reflinked: 0,
                bytes,
                method: CopyMethod::Copy
            }
        );
        assert_copy_details(&dst);
        assert_same_tree(&src, &dst);
    }

    #[test]
    fn copy_tree_of_an_empty_folder_reports_what_its_filesystem_can() {
        let (xfs, ext4) = (Scratch::xfs(), Scratch::ext4());
        for (fs_, method) in [(&xfs, CopyMethod::Reflink), (&ext4, CopyMethod::Copy)] {
            let (src, dst) = (fs_.path().join("src"), fs_.path().join("copy"));
            fs::create_dir(&src).unwrap();
            set_times(&src, (1_000_000_000, 0), (1_000_000_000, 0));
            let copied = copy_tree(&src, &dst).unwrap();
            assert_eq!(copied.method, method);
            assert_eq!((copied.files, copied.bytes), (0, 0));
            // The probe left nothing behind, nor touched the folder's times.
            assert_eq!(fs::read_dir(&dst).unwrap().count(), 0);
            assert_same_tree(&src, &dst);
        }
    }

    #[test]
    fn copy_tree_refuses_to_cross_a_mount_point_and_leaves_nothing() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("copy"));
        populate(&src);
        let inner = src.join("sticky/a/mnt");
        let _tmpfs = Mounted::tmpfs(&inner);
        fs::write(inner.join("elsewhere"), b"another filesystem").unwrap();
        let err = copy_tree(&src, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::CrossesDevices, "{err}");
        assert!(
            err.to_string().contains(&inner.display().to_string()),
            "{err}"
        );
        assert!(!dst.exists());
    }

    #[test]
    fn copy_tree_refuses_a_bind_mount_from_its_own_filesystem() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("copy"));
        populate(&src);
        let other = fs_.path().join("other-volume");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("secret"), b"not this tree's").unwrap();
        let inner = src.join("sgid/bound");
        fs::create_dir(&inner).unwrap();
        nix::mount::mount(
            Some(&other),
            &inner,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        let _bind = Mounted {
            at: inner.clone(),
            loop_dev: None,
        };
        let err = copy_tree(&src, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::CrossesDevices, "{err}");
        assert!(
            err.to_string().contains(&inner.display().to_string()),
            "{err}"
        );
        assert!(!dst.exists());
    }

    #[test]
    fn copy_tree_onto_an_existing_destination_fails_and_leaves_it() {
        let fs_ = Scratch::ext4();
        let (src, dst) = (fs_.path().join("src"), fs_.path().join("copy"));
        populate(&src);
        fs::create_dir(&dst).unwrap();
        fs::write(dst.join("precious"), b"keep").unwrap();
        let err = copy_tree(&src, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(
            err.to_string().contains(&dst.display().to_string()),
            "{err}"
        );
        assert_eq!(fs::read(dst.join("precious")).unwrap(), b"keep");
    }

    #[test]
    fn copy_tree_into_its_own_source_is_refused() {
        let fs_ = Scratch::ext4();
        let src = fs_.path().join("src");
        populate(&src);
        let dst = src.join("sticky/a/copy");
        let err = copy_tree(&src, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(
            err.to_string().contains(&dst.display().to_string()),
            "{err}"
        );
        assert!(!dst.exists());
    }

    #[test]
    fn clone_file_that_runs_out_of_space_removes_its_copy() {
        let (xfs, ext4) = (Scratch::xfs(), Scratch::ext4());
        let big = xfs.path().join("big");
        write_at(&big, 0, &pattern(70 * MIB as usize, 5));
        let dst = ext4.path().join("big");
        let err = clone_file(&big, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert!(
            err.to_string().contains(&dst.display().to_string()),
            "{err}"
        );
        assert!(!dst.exists());
    }

    #[test]
    fn copy_tree_that_runs_out_of_space_leaves_nothing() {
        let (xfs, ext4) = (Scratch::xfs(), Scratch::ext4());
        let tree = xfs.path().join("tree");
        populate(&tree);
        write_at(&tree.join("zz-big"), 0, &pattern(70 * MIB as usize, 5));
        let dst = ext4.path().join("tree");
        let err = copy_tree(&tree, &dst).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert!(
            err.to_string()
                .contains(&dst.join("zz-big").display().to_string()),
            "{err}"
        );
        assert!(!dst.exists());
    }

    #[test]
    fn supports_reflink_on_xfs_but_not_on_ext4_and_leaves_no_files() {
        let (xfs, ext4) = (Scratch::xfs(), Scratch::ext4());
        assert!(supports_reflink(xfs.path()));
        assert!(!supports_reflink(ext4.path()));
        assert_eq!(fs::read_dir(xfs.path()).unwrap().count(), 0);
        // lost+found only.
        assert_eq!(fs::read_dir(ext4.path()).unwrap().count(), 1);
        assert!(!supports_reflink(&xfs.path().join("missing")));
    }

    /// Writes and fsyncs a file on `dir`'s filesystem: returns only if that
    /// filesystem is not frozen.
    fn write_durably(dir: &Path) {
        let f = File::create(dir.join("after-thaw")).unwrap();
        f.write_all_at(b"thawed", 0).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn freezing_twice_is_busy_and_thaw_lets_writes_through() {
        let fs_ = Scratch::xfs();
        let frozen = Frozen::freeze(fs_.path()).unwrap();
        assert_eq!(frozen.path(), fs_.path());
        let err = Frozen::freeze(fs_.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        assert!(
            err.to_string().contains(&fs_.path().display().to_string()),
            "{err}"
        );
        frozen.thaw().unwrap();
        write_durably(fs_.path());
    }

    #[test]
    fn dropping_a_freeze_thaws() {
        let fs_ = Scratch::xfs();
        drop(Frozen::freeze(fs_.path()).unwrap());
        write_durably(fs_.path());
        // And it can be frozen again.
        Frozen::freeze(fs_.path()).unwrap().thaw().unwrap();
    }

    #[test]
    fn freezing_a_folder_that_is_not_a_mount_point_is_refused() {
        let fs_ = Scratch::xfs();
        let folder = fs_.path().join("volume");
        fs::create_dir(&folder).unwrap();
        let err = Frozen::freeze(&folder).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        assert!(
            err.to_string().contains(&folder.display().to_string()),
            "{err}"
        );
        // Nothing was frozen: the filesystem takes writes.
        write_durably(fs_.path());
    }

    #[test]
    fn freezing_a_missing_path_names_it() {
        let missing = Path::new("/nonexistent/stead-freeze");
        let err = Frozen::freeze(missing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains("/nonexistent/stead-freeze"),
            "{err}"
        );
    }
}
