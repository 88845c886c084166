//! The data extents of a file: what SEEK_DATA/SEEK_HOLE (lseek(2)) report
//! as holding data. A hole reads as zeroes and is never read nor sent.
//!
//! Filesystems without their own SEEK_DATA get the kernel's generic one,
//! which reports the whole file as one extent: correct, only not sparse.
//! The unwritten (reserved) extents of a thick image are holes to xfs,
//! ext4 and btrfs, as long as no dirty page covers them.

use std::fs::File;
use std::io;
use std::ops::Range;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// The data extents of `file` in `[from, size)`, in ascending order, each
/// clipped to that range.
pub fn data_extents(file: &File, from: u64, size: u64) -> Extents<'_> {
    Extents {
        file,
        pos: from,
        size,
    }
}

/// Iterator of [`data_extents`].
#[derive(Debug)]
pub struct Extents<'a> {
    file: &'a File,
    pos: u64,
    size: u64,
}

impl Iterator for Extents<'_> {
    type Item = io::Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.size {
            return None;
        }
        let start = match rustix::fs::seek(self.file, SeekFrom::Data(self.pos)) {
            Ok(s) => s,
            // No data at or after pos: the rest is a hole.
            Err(Errno::NXIO) => {
                self.pos = self.size;
                return None;
            }
            Err(e) => {
                self.pos = self.size;
                return Some(Err(e.into()));
            }
        };
        if start >= self.size {
            self.pos = self.size;
            return None;
        }
        let end = match rustix::fs::seek(self.file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(self.size),
            Err(e) => {
                self.pos = self.size;
                return Some(Err(e.into()));
            }
        };
        // A hole at `start` cannot follow SEEK_DATA's answer unless the
        // file changed in between; stop rather than loop.
        if end <= start {
            self.pos = self.size;
            return None;
        }
        self.pos = end;
        Some(Ok(start..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_skip_holes_and_start_at_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mib = 1 << 20;
        f.set_len(64 * mib).unwrap();
        f.write_all_at(&[1u8; 4096], 8 * mib).unwrap();
        f.write_all_at(&[2u8; 8192], 40 * mib).unwrap();
        let all: Vec<_> = data_extents(&f, 0, 64 * mib)
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(
            all,
            vec![8 * mib..8 * mib + 4096, 40 * mib..40 * mib + 8192]
        );
        let later: Vec<_> = data_extents(&f, 40 * mib + 100, 64 * mib)
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(later, vec![40 * mib + 100..40 * mib + 8192]);
        assert_eq!(data_extents(&f, 41 * mib, 64 * mib).count(), 0);
    }
}
