//! The `image` backend: a file per volume, attached to a loop device
//! (direct I/O where the kernel allows), carrying an ext4 or xfs filesystem
//! created on first stage.
//!
//! A *thick* image (the default) has every block reserved on the pool's
//! filesystem by fallocate(2) when it is made and when it grows. On xfs,
//! ext4 and btrfs that is a metadata operation: the blocks are marked
//! allocated and unwritten, nothing is written, and they read as zeroes
//! until the volume writes them (docs/BENCHMARKS.md has its cost). A write
//! into the volume then never needs a block of the pool, so a pool filled
//! by others cannot fail it. A *thin* image is a sparse file: its blocks
//! are taken as they are written, and a full pool fails those writes (the
//! loop device returns EIO to the filesystem inside).
//!
//! A discard from inside a thick volume (fstrim, the `discard` mount
//! option, BLKDISCARD on a block volume) punches holes in its image, as the
//! loop driver turns discards into FALLOC_FL_PUNCH_HOLE; those blocks go
//! back to the pool and are reserved again at the volume's next stage
//! ([`reserve`]). Disabling discards on the loop device instead is not an
//! option: the limit written to its `queue/discard_max_bytes` outlives the
//! attachment and cannot be raised again on current kernels, so it would
//! stay with whatever file the device carries next.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

use super::command::{self, CommandError};
use super::kind::{Allocation, FsType};

/// Name of the image file inside a volume folder.
pub const IMAGE_FILE: &str = "disk.img";

/// Errors of loop devices and filesystems.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("losetup printed no device for {0}")]
    NoDevice(PathBuf),
    #[error("loop device {0}: unexpected size in sysfs: {1:?}")]
    BadSize(PathBuf, String),
    #[error(
        "image {}: the pool's filesystem has no room left to reserve its {size} bytes (fallocate: ENOSPC)",
        path.display()
    )]
    NoSpace { path: PathBuf, size: u64 },
    #[error(
        "image {}: the pool's filesystem cannot reserve blocks (fallocate: {errno}); use allocation: thin on this pool",
        path.display()
    )]
    CannotReserve { path: PathBuf, errno: Errno },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates the image file of `size` bytes at `path` (must not exist),
/// reserved whole when `allocation` is thick, sparse otherwise.
pub fn create_file(path: &Path, size: u64, allocation: Allocation) -> Result<(), ImageError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(size).map_err(io_err(path))?;
    if allocation == Allocation::Thick {
        reserve_open(&f, path, size)?;
    }
    f.sync_all().map_err(io_err(path))
}

/// Grows the image file to `size` bytes (never shrinks); a thick image has
/// all of it reserved afterwards, holes of a copy or of discards included.
/// A reservation that fails leaves the file at its old size.
pub fn grow_file(path: &Path, size: u64, allocation: Allocation) -> Result<(), ImageError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let current = f.metadata().map_err(io_err(path))?.len();
    let grown = size > current;
    if grown {
        f.set_len(size).map_err(io_err(path))?;
    }
    if allocation == Allocation::Thick
        && let Err(e) = reserve_open(&f, path, size.max(current))
    {
        if grown {
            let _ = f.set_len(current);
        }
        return Err(e);
    }
    if grown || allocation == Allocation::Thick {
        f.sync_all().map_err(io_err(path))?;
    }
    Ok(())
}

/// Reserves every block of the thick image at `path` that is not allocated
/// (holes left by a sparse copy, or punched by discards); a metadata
/// operation when nothing is missing.
pub fn reserve(path: &Path) -> Result<(), ImageError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let size = f.metadata().map_err(io_err(path))?.len();
    reserve_open(&f, path, size)?;
    f.sync_all().map_err(io_err(path))
}

/// fallocate(2) mode 0 over `[0, size)`: allocates what is not, marks it
/// unwritten (it reads as zeroes), keeps what is, writes nothing.
fn reserve_open(f: &File, path: &Path, size: u64) -> Result<(), ImageError> {
    if size == 0 {
        return Ok(());
    }
    rustix::fs::fallocate(f, FallocateFlags::empty(), 0, size).map_err(|errno| match errno {
        Errno::NOSPC | Errno::DQUOT => ImageError::NoSpace {
            path: path.to_owned(),
            size,
        },
        Errno::OPNOTSUPP | Errno::NOSYS => ImageError::CannotReserve {
            path: path.to_owned(),
            errno,
        },
        e => ImageError::Io {
            path: path.to_owned(),
            source: e.into(),
        },
    })
}

/// Whether the image holds any written data. Reserved but never written
/// blocks (a thick image's unwritten extents) are holes to SEEK_DATA on
/// xfs, ext4 and btrfs, as long as no dirty page covers them; an error
/// counts as data, so that nothing is removed on a doubt.
pub fn holds_data(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return true;
    };
    !matches!(
        rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0)),
        Err(Errno::NXIO)
    )
}

/// Bytes actually allocated to the image file on the pool's filesystem.
pub fn allocated_bytes(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// The loop device currently backed by `file`, if any.
pub fn find_attached(file: &Path) -> Result<Option<PathBuf>, ImageError> {
    let file_s = file.to_string_lossy();
    let out = command::run(
        "losetup",
        &["--noheadings", "--output", "NAME", "--associated", &file_s],
    )?;
    Ok(out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(PathBuf::from))
}

/// Attaches `file` to a loop device, or returns the one it is already on.
///
/// Direct I/O keeps the page cache from holding every block twice (once for
/// the image file, once for the filesystem on the loop device); kernels or
/// pool filesystems that refuse it get a buffered loop device instead.
pub fn attach(file: &Path) -> Result<PathBuf, ImageError> {
    if let Some(dev) = find_attached(file)? {
        return Ok(dev);
    }
    let file_s = file.to_string_lossy();
    let mut last = None;
    // `losetup --find` can lose a race for a free device against another
    // attach; it is retried a few times before giving up.
    for attempt in 0..4 {
        let args: &[&str] = if attempt % 2 == 0 {
            &["--find", "--show", "--direct-io=on", &file_s]
        } else {
            &["--find", "--show", &file_s]
        };
        match command::run("losetup", args) {
            Ok(out) => {
                let dev = out.trim();
                if dev.is_empty() {
                    return Err(ImageError::NoDevice(file.to_owned()));
                }
                return Ok(PathBuf::from(dev));
            }
            Err(e) => {
                // A half-made attachment may exist; reuse it if so.
                if let Some(dev) = find_attached(file)? {
                    return Ok(dev);
                }
                last = Some(e);
            }
        }
    }
    Err(last.map_or_else(|| ImageError::NoDevice(file.to_owned()), ImageError::from))
}

/// Detaches a loop device.
pub fn detach(dev: &Path) -> Result<(), ImageError> {
    command::run("losetup", &["--detach", &dev.to_string_lossy()])?;
    Ok(())
}

/// Makes the loop device pick up a grown backing file.
pub fn refresh(dev: &Path) -> Result<(), ImageError> {
    command::run("losetup", &["--set-capacity", &dev.to_string_lossy()])?;
    Ok(())
}

/// Size of a block device in bytes, from sysfs.
pub fn device_size(dev: &Path) -> Result<u64, ImageError> {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sys = PathBuf::from(format!("/sys/class/block/{name}/size"));
    let raw = fs::read_to_string(&sys).map_err(io_err(&sys))?;
    raw.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|_| ImageError::BadSize(dev.to_owned(), raw))
}

/// The filesystem (or other signature) on a device, as blkid names it;
/// `None` when the device carries no known signature.
pub fn probe_signature(dev: &Path) -> Result<Option<String>, ImageError> {
    match command::run(
        "blkid",
        &["-p", "-s", "TYPE", "-o", "value", &dev.to_string_lossy()],
    ) {
        Ok(out) => Ok(Some(out.trim().to_owned()).filter(|s| !s.is_empty())),
        // blkid exits 2 when it finds nothing to report.
        Err(e) if e.code() == Some(2) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Creates a filesystem on a device that carries none.
pub fn mkfs(dev: &Path, fs: FsType) -> Result<(), ImageError> {
    let dev_s = dev.to_string_lossy();
    match fs {
        // No reserved blocks (a volume belongs to one workload), lazy init so
        // formatting a large sparse image stays fast and sparse, no discard
        // (it would only punch holes already there). 4 KiB blocks (and, for
        // xfs, sectors) whatever the size: the loop device's logical sector
        // size follows its file's direct-I/O alignment, which is 512 bytes
        // for a new sparse image but 4 KiB once it has blocks on an xfs pool,
        // and a filesystem made with smaller units would not mount on the
        // next attach (nor would its snapshots and clones).
        FsType::Ext4 => command::run(
            "mkfs.ext4",
            &[
                "-F",
                "-q",
                "-b",
                "4096",
                "-m",
                "0",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                &dev_s,
            ],
        )?,
        FsType::Xfs => command::run("mkfs.xfs", &["-f", "-q", "-K", "-s", "size=4096", &dev_s])?,
    };
    Ok(())
}

/// Size in bytes of the filesystem on `dev`, read from its superblock;
/// `None` if the superblock is not one Stead creates.
pub fn filesystem_size(dev: &Path) -> Result<Option<u64>, ImageError> {
    let mut f = File::open(dev).map_err(io_err(dev))?;
    let mut head = [0u8; 2048];
    f.seek(SeekFrom::Start(0)).map_err(io_err(dev))?;
    f.read_exact(&mut head).map_err(io_err(dev))?;
    Ok(superblock_size(&head))
}

/// Parses an ext2/3/4 or xfs superblock from the first 2 KiB of a device.
fn superblock_size(head: &[u8; 2048]) -> Option<u64> {
    let le32 = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    // xfs: "XFSB" at 0, then big-endian sb_blocksize (u32) and sb_dblocks (u64).
    if &head[0..4] == b"XFSB" {
        let bs = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let mut d = [0u8; 8];
        d.copy_from_slice(&head[8..16]);
        // A corrupt superblock may hold any numbers: a product that does
        // not fit is no size at all, never a panic or a wrapped value.
        return u64::from(bs).checked_mul(u64::from_be_bytes(d));
    }
    // ext*: superblock at 1024, magic 0xEF53 at +0x38, blocks_count_lo at
    // +0x04, log_block_size at +0x18, blocks_count_hi at +0x150 when the
    // 64bit incompat feature (0x80 at +0x60) is set.
    let sb = 1024;
    if u16::from_le_bytes([head[sb + 0x38], head[sb + 0x39]]) == 0xEF53 {
        let lo = u64::from(le32(sb + 0x04));
        let log = le32(sb + 0x18);
        let hi = if le32(sb + 0x60) & 0x80 != 0 {
            u64::from(le32(sb + 0x150))
        } else {
            0
        };
        let bs = 1024u64.checked_shl(log)?;
        return ((hi << 32) | lo).checked_mul(bs);
    }
    None
}

/// Grows an *unmounted* ext4 filesystem to fill its device.
pub fn grow_ext4_offline(dev: &Path) -> Result<(), ImageError> {
    let dev_s = dev.to_string_lossy();
    // resize2fs insists on a freshly checked filesystem when offline.
    // e2fsck exits 1 when it corrected something, which is fine here.
    match command::run("e2fsck", &["-f", "-p", &dev_s]) {
        Ok(_) => {}
        Err(e) if e.code() == Some(1) => {}
        Err(e) => return Err(e.into()),
    }
    // A freshly attached loop device is briefly opened by udev probes;
    // resize2fs then fails to open it ("Invalid argument"). Retried.
    let mut attempt = 0;
    loop {
        match command::run("resize2fs", &[&dev_s]) {
            Ok(_) => return Ok(()),
            Err(e) if attempt < 5 => {
                tracing::debug!(device = %dev.display(), error = %e, "resize2fs failed; retrying");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(100 * attempt));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Grows a *mounted* filesystem to fill its device.
///
/// xfs grows online through any of its mount points. ext4 grows online
/// through resize2fs on the device, which needs CAP_SYS_RESOURCE in the
/// kernel's online-resize path; without it this fails with "Permission
/// denied" and the caller reports how to grow offline instead.
pub fn grow_online(dev: &Path, mountpoint: &Path, fs: FsType) -> Result<(), ImageError> {
    match fs {
        FsType::Xfs => command::run("xfs_growfs", &[&mountpoint.to_string_lossy()])?,
        FsType::Ext4 => command::run("resize2fs", &[&dev.to_string_lossy()])?,
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xfs_superblock() {
        let mut head = [0u8; 2048];
        head[0..4].copy_from_slice(b"XFSB");
        head[4..8].copy_from_slice(&4096u32.to_be_bytes());
        head[8..16].copy_from_slice(&1000u64.to_be_bytes());
        assert_eq!(superblock_size(&head), Some(4096 * 1000));
    }

    #[test]
    fn parses_ext4_superblock() {
        let mut head = [0u8; 2048];
        let sb = 1024;
        head[sb + 0x38..sb + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        head[sb + 0x04..sb + 0x08].copy_from_slice(&16384u32.to_le_bytes());
        head[sb + 0x18..sb + 0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(superblock_size(&head), Some(16384 * 4096));
        assert_eq!(superblock_size(&[0u8; 2048]), None);
    }

    #[test]
    fn corrupt_superblocks_give_no_size_instead_of_overflowing() {
        let mut xfs = [0u8; 2048];
        xfs[0..4].copy_from_slice(b"XFSB");
        xfs[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        xfs[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(superblock_size(&xfs), None);

        let mut ext = [0u8; 2048];
        let sb = 1024;
        ext[sb + 0x38..sb + 0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        ext[sb + 0x04..sb + 0x08].copy_from_slice(&u32::MAX.to_le_bytes());
        ext[sb + 0x60..sb + 0x64].copy_from_slice(&0x80u32.to_le_bytes());
        ext[sb + 0x150..sb + 0x154].copy_from_slice(&u32::MAX.to_le_bytes());
        // log_block_size 20: 1 GiB blocks times 2^64-1 blocks.
        ext[sb + 0x18..sb + 0x1c].copy_from_slice(&20u32.to_le_bytes());
        assert_eq!(superblock_size(&ext), None);
        // log_block_size past 63: the shift itself is refused.
        ext[sb + 0x18..sb + 0x1c].copy_from_slice(&70u32.to_le_bytes());
        assert_eq!(superblock_size(&ext), None);
    }

    #[test]
    fn a_thick_image_has_every_block_and_no_data_a_thin_one_neither() {
        let tmp = tempfile::tempdir().unwrap();
        let thick = tmp.path().join("thick.img");
        let thin = tmp.path().join("thin.img");
        let size = 8 << 20;
        create_file(&thick, size, Allocation::Thick).unwrap();
        create_file(&thin, size, Allocation::Thin).unwrap();
        assert_eq!(fs::metadata(&thick).unwrap().len(), size);
        assert!(allocated_bytes(&thick) >= size, "every block reserved");
        assert_eq!(allocated_bytes(&thin), 0, "sparse");
        // Reserved is not written: nothing to read but zeroes, no data.
        assert!(!holds_data(&thick));
        assert!(!holds_data(&thin));
        assert!(fs::read(&thick).unwrap().iter().all(|&b| b == 0));
        std::os::unix::fs::FileExt::write_at(
            &OpenOptions::new().write(true).open(&thin).unwrap(),
            b"x",
            4096,
        )
        .unwrap();
        assert!(holds_data(&thin));
    }

    #[test]
    fn growing_a_thick_image_reserves_the_new_range_and_refills_holes() {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("disk.img");
        create_file(&img, 4 << 20, Allocation::Thick).unwrap();
        grow_file(&img, 12 << 20, Allocation::Thick).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len(), 12 << 20);
        assert!(allocated_bytes(&img) >= 12 << 20);
        // A discard from inside punches a hole: the next reserve fills it.
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        rustix::fs::fallocate(
            &f,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            0,
            4 << 20,
        )
        .unwrap();
        assert!(allocated_bytes(&img) < 12 << 20);
        reserve(&img).unwrap();
        assert!(allocated_bytes(&img) >= 12 << 20);
        // A thin image grows sparse.
        let thin = tmp.path().join("thin.img");
        create_file(&thin, 4 << 20, Allocation::Thin).unwrap();
        grow_file(&thin, 12 << 20, Allocation::Thin).unwrap();
        assert_eq!(allocated_bytes(&thin), 0);
    }
}
