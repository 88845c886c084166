//! The content digest of a transfer: BLAKE3 over the logical content of a
//! file, defined so that holes cost nothing to hash and the answer does not
//! depend on how either filesystem lays the file out.
//!
//! The content is cut into blocks of [`BLOCK`] bytes (the last one short).
//! The digest hashes a domain tag, the logical size and the block size,
//! then, for every block that holds a byte other than zero, in ascending
//! order, its index (u64, little endian) and its bytes. An all-zero block,
//! whether a hole or written zeroes, is left out; since every block's length
//! follows from the size, the hashed string determines the content, and two
//! files agree exactly when their bytes do. The sender feeds what it reads
//! of its extents, the receiver what it reads back of its own.

/// Block size of the digest.
pub const BLOCK: u64 = 64 * 1024;

const DOMAIN: &[u8] = b"stead.transfer.v1 content digest";

/// A digest being computed; fed data at ascending offsets.
#[derive(Debug)]
pub struct ContentDigest {
    hasher: blake3::Hasher,
    size: u64,
    /// Index of the block in `buf`, and whether `buf` holds any of it.
    current: u64,
    filled: bool,
    buf: Vec<u8>,
    /// End of the last data fed: data must not go back before it.
    end: u64,
}

/// Data fed out of order or past the size: a bug of the caller, reported
/// rather than hashed wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "digest fed {len} bytes at offset {offset}, after data up to {end} of a {size}-byte content"
)]
pub struct OutOfOrder {
    pub offset: u64,
    pub len: u64,
    pub end: u64,
    pub size: u64,
}

impl ContentDigest {
    /// A digest of a content of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(DOMAIN);
        hasher.update(&size.to_le_bytes());
        hasher.update(&BLOCK.to_le_bytes());
        ContentDigest {
            hasher,
            size,
            current: 0,
            filled: false,
            buf: vec![0; BLOCK as usize],
            end: 0,
        }
    }

    /// Feeds `data` found at `offset`; what lies between fed pieces is zero.
    pub fn update(&mut self, offset: u64, data: &[u8]) -> Result<(), OutOfOrder> {
        let len = data.len() as u64;
        if offset < self.end || offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(OutOfOrder {
                offset,
                len,
                end: self.end,
                size: self.size,
            });
        }
        self.end = offset + len;
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos / BLOCK;
            let within = (pos % BLOCK) as usize;
            if index != self.current {
                self.flush();
                self.current = index;
            }
            let n = rest.len().min(BLOCK as usize - within);
            let (piece, tail) = rest.split_at(n);
            if within == 0 && n == self.block_len(index) {
                // A whole block: hashed where it lies, without a copy.
                if !is_zero(piece) {
                    self.hasher.update(&index.to_le_bytes());
                    self.hasher.update(piece);
                }
                self.current = index + 1;
            } else {
                self.buf[within..within + n].copy_from_slice(piece);
                self.filled = true;
            }
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// The digest of the whole content.
    pub fn finish(mut self) -> [u8; 32] {
        self.flush();
        *self.hasher.finalize().as_bytes()
    }

    fn block_len(&self, index: u64) -> usize {
        (self.size - index * BLOCK).min(BLOCK) as usize
    }

    fn flush(&mut self) {
        if !self.filled {
            return;
        }
        let len = self.block_len(self.current);
        if !is_zero(&self.buf[..len]) {
            self.hasher.update(&self.current.to_le_bytes());
            self.hasher.update(&self.buf[..len]);
        }
        self.buf.fill(0);
        self.filled = false;
    }
}

/// Whether every byte is zero; ORs 64-byte groups so that the compiler can
/// use vector instructions, and stops at the first group that is not.
fn is_zero(data: &[u8]) -> bool {
    let mut groups = data.chunks_exact(64);
    let whole = groups
        .by_ref()
        .all(|g| g.iter().fold(0u8, |acc, &b| acc | b) == 0);
    whole && groups.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(size: u64, pieces: &[(u64, &[u8])]) -> [u8; 32] {
        let mut d = ContentDigest::new(size);
        for (off, data) in pieces {
            d.update(*off, data).unwrap();
        }
        d.finish()
    }

    #[test]
    fn layout_does_not_change_the_digest() {
        let size = 5 * BLOCK + 123;
        let data: Vec<u8> = (0..3 * BLOCK + 77).map(|i| (i % 251) as u8 + 1).collect();
        let at = BLOCK / 2;
        let whole = digest_of(size, &[(at, &data)]);
        // The same bytes in other pieces, and with explicit zeroes around.
        let (a, b) = data.split_at(1000);
        assert_eq!(whole, digest_of(size, &[(at, a), (at + 1000, b)]));
        let zeroes = vec![0u8; at as usize];
        assert_eq!(whole, digest_of(size, &[(0, &zeroes), (at, &data)]));
        let tail_zeroes = vec![0u8; (size - at - data.len() as u64) as usize];
        assert_eq!(
            whole,
            digest_of(size, &[(at, &data), (at + data.len() as u64, &tail_zeroes)])
        );
    }

    #[test]
    fn content_size_and_position_matter() {
        let one = [7u8; 10];
        let base = digest_of(4 * BLOCK, &[(BLOCK, &one)]);
        assert_ne!(base, digest_of(4 * BLOCK, &[(BLOCK + 1, &one)]));
        assert_ne!(base, digest_of(4 * BLOCK + 1, &[(BLOCK, &one)]));
        assert_ne!(base, digest_of(4 * BLOCK, &[(BLOCK, &[7u8; 9])]));
        assert_ne!(base, digest_of(4 * BLOCK, &[]));
    }

    #[test]
    fn out_of_order_and_oversize_are_refused() {
        let mut d = ContentDigest::new(100);
        d.update(50, &[1; 10]).unwrap();
        assert!(d.update(40, &[1; 5]).is_err());
        assert!(d.update(95, &[1; 10]).is_err());
        assert!(d.update(u64::MAX, &[1]).is_err());
    }
}
