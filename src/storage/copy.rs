//! Copies of files: what snapshots are made of.
//!
//! A copy shares extents with its source (FICLONE) where the filesystem can
//! (xfs with reflink, btrfs), and is a sparse copy otherwise: holes stay
//! holes, so a thin 100 GiB image with 1 GiB written costs 1 GiB of space
//! and of reading, not 100.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, SeekFrom, StatxFlags};
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

/// Read/write copies move this much at a time (where copy_file_range is
/// refused, e.g. between filesystems).
const BUF_LEN: usize = 1 << 20;
/// copy_file_range moves at most this much per call, so that one call does
/// not hold the source for long.
const OFFLOAD_CHUNK: usize = 1 << 26;
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
    kind: FileType,
    /// Permission bits with setuid, setgid and sticky.
    perm: u32,
    size: u64,
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
            kind: FileType::from_raw_mode(st.stx_mode.into()),
            perm: u32::from(st.stx_mode) & 0o7777,
            size: st.stx_size,
        })
    }

    fn mode(&self) -> Mode {
        Mode::from_raw_mode(self.perm)
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
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

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

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
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
    fn supports_reflink_on_xfs_but_not_on_ext4_and_leaves_no_files() {
        let (xfs, ext4) = (Scratch::xfs(), Scratch::ext4());
        assert!(supports_reflink(xfs.path()));
        assert!(!supports_reflink(ext4.path()));
        assert_eq!(fs::read_dir(xfs.path()).unwrap().count(), 0);
        // lost+found only.
        assert_eq!(fs::read_dir(ext4.path()).unwrap().count(), 1);
        assert!(!supports_reflink(&xfs.path().join("missing")));
    }
}
