use crate::error::{BlockError, Result};
use serde::{Deserialize, Serialize};

pub const SECTOR: u64 = 512;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// The largest block size: one block must fit a qcow2 cluster (2 MiB) and a reasonable buffer.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Device size and tracking block size. The last block may be shorter than `block_size` when the
/// size is not a multiple of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub block_size: u32,
    pub size: u64,
}

impl Geometry {
    pub fn new(size: u64, block_size: u32) -> Result<Self> {
        if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(BlockError::Geometry(format!(
                "block size {block_size} must be a power of two from 512 to {MAX_BLOCK_SIZE}"
            )));
        }
        if !size.is_multiple_of(SECTOR) {
            return Err(BlockError::Geometry(format!(
                "device size {size} is not a multiple of 512"
            )));
        }
        let g = Self { block_size, size };
        if g.blocks() > 1 << 32 {
            return Err(BlockError::Geometry(format!(
                "{size} bytes is more than 2^32 blocks of {block_size}: use a larger block size"
            )));
        }
        Ok(g)
    }

    pub fn bs(&self) -> u64 {
        u64::from(self.block_size)
    }

    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.bs())
    }

    /// Device byte range of block `b`, clipped to the device end.
    pub fn block_span(&self, b: u64) -> (u64, u64) {
        let s = b * self.bs();
        (s, (s + self.bs()).min(self.size))
    }

    /// Block index as stored in bitmaps (`Geometry::new` guarantees it fits).
    pub fn idx(b: u64) -> u32 {
        b as u32
    }

    /// Checks that `[offset, offset + len)` lies within the device.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                capacity: self.size,
            }),
        }
    }
}

/// A read of `buf` at `offset` from something `end` bytes long (the device, or an image of
/// another size) reads zeros past `end`: fills the part of `buf` at or past `end` with zeros and
/// returns the part before it, which is what remains to be read (empty when `offset >= end`).
pub(crate) fn zero_past_end(end: u64, offset: u64, buf: &mut [u8]) -> &mut [u8] {
    let inside = end.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[inside..].fill(0);
    &mut buf[..inside]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bytes_past_the_end_are_zeroed() {
        // (offset, length, bytes left to read): inside, straddling, ending exactly at the end,
        // starting exactly at it, past it, and empty reads inside and past.
        for (offset, len, inside) in [
            (0, 10, 10),
            (95, 10, 5),
            (90, 10, 10),
            (100, 10, 0),
            (150, 10, 0),
            (u64::MAX, 10, 0),
            (50, 0, 0),
            (200, 0, 0),
        ] {
            let mut buf = vec![7u8; len];
            let rest = zero_past_end(100, offset, &mut buf);
            assert_eq!(rest.len(), inside, "offset {offset} len {len}");
            assert!(rest.iter().all(|&b| b == 7), "bytes before the end touched");
            assert!(
                buf[inside..].iter().all(|&b| b == 0),
                "bytes past the end kept"
            );
        }
    }

    #[test]
    fn validation() {
        assert!(Geometry::new(1 << 20, 4096).is_ok());
        assert!(Geometry::new(1 << 20, 3000).is_err());
        assert!(Geometry::new(1 << 20, 256).is_err());
        assert!(Geometry::new(1000, 4096).is_err());
        assert!(Geometry::new(16 << 40, 4096).is_ok());
        assert!(Geometry::new((16 << 40) + 4096, 4096).is_err());
        let g = Geometry::new(4096 * 2 + 512, 4096).unwrap();
        assert_eq!(g.blocks(), 3);
        assert_eq!(g.block_span(2), (8192, 8704));
        assert!(g.check_range(8704, 0).is_ok());
        assert!(g.check_range(8192, 1024).is_err());
        assert!(g.check_range(u64::MAX, 2).is_err());
    }
}
