//! Byte layout of the diff header, shared by both versions (pure; see docs/diff-format.md).

use uuid::Uuid;

use super::DiffError;
use crate::geometry::Geometry;

pub const MAGIC: &[u8; 8] = b"VSNAPDIF";
pub const TRAILER_MAGIC: &[u8; 8] = b"VSNAPEND";
/// The version vsnap writes unless told otherwise: the data as checksummed, optionally compressed
/// frames with an index (see `v2`).
pub const VERSION: u32 = 2;
/// The first version: the data stored raw, one CRC-32C per chunk (see `v1`). Still read.
pub const VERSION_1: u32 = 1;
pub const HEADER_LEN: usize = 128;
/// Raw data bytes per frame (version 2) or per checksum chunk (version 1) vsnap writes by
/// default; the last one may be shorter.
pub const FRAME_SIZE: u32 = 1 << 20;
/// The largest frame (or chunk) a reader accepts: it buffers one.
pub const MAX_FRAME_SIZE: u32 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffHeader {
    /// [`VERSION_1`] or [`VERSION`]: the layout after the bitmaps.
    pub version: u32,
    pub geometry: Geometry,
    pub generation: u64,
    pub id: Uuid,
    /// The diff this one applies on top of; nil when it applies directly to the base image.
    pub parent: Uuid,
    pub dirty_blocks: u64,
    pub zero_blocks: u64,
    pub dirty_bitmap_len: u64,
    pub zero_bitmap_len: u64,
    /// Raw data bytes per version-1 checksum chunk, or the most a version-2 frame holds.
    pub frame_size: u32,
}

impl DiffHeader {
    /// Raw bytes of the dirty blocks (a whole block each), whatever is stored for them.
    pub fn data_len(&self) -> u64 {
        self.dirty_blocks * self.geometry.bs()
    }

    /// Where the data section starts: after the header and both bitmaps.
    pub fn data_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.dirty_bitmap_len + self.zero_bitmap_len
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..20].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        // 20..24: flags, zero in both versions.
        h[24..32].copy_from_slice(&self.geometry.size.to_le_bytes());
        h[32..40].copy_from_slice(&self.generation.to_le_bytes());
        h[40..56].copy_from_slice(self.id.as_bytes());
        h[56..72].copy_from_slice(self.parent.as_bytes());
        h[72..80].copy_from_slice(&self.dirty_blocks.to_le_bytes());
        h[80..88].copy_from_slice(&self.zero_blocks.to_le_bytes());
        h[88..96].copy_from_slice(&self.dirty_bitmap_len.to_le_bytes());
        h[96..104].copy_from_slice(&self.zero_bitmap_len.to_le_bytes());
        h[104..112].copy_from_slice(&self.data_len().to_le_bytes());
        h[112..116].copy_from_slice(&self.frame_size.to_le_bytes());
        // 116..124: reserved, zero.
        let crc = crc32c::crc32c(&h[..124]);
        h[124..128].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(h: &[u8]) -> Result<Self, DiffError> {
        if h.len() < 8 || &h[0..8] != MAGIC {
            return Err(DiffError::BadMagic);
        }
        if h.len() < HEADER_LEN {
            return Err(DiffError::Length {
                expected: HEADER_LEN as u64,
                actual: h.len() as u64,
            });
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION_1 && version != VERSION {
            return Err(DiffError::Version(version));
        }
        if crc32c::crc32c(&h[..124]) != u32_at(124) {
            return Err(DiffError::Checksum("header"));
        }
        let corrupt = |m: &str| Err(DiffError::Corrupt(m.to_string()));
        if u32_at(12) as usize != HEADER_LEN {
            return corrupt("header length field");
        }
        if u32_at(20) != 0 || h[116..124].iter().any(|&b| b != 0) {
            return corrupt("unknown flags or reserved bytes set");
        }
        let geometry =
            Geometry::new(u64_at(24), u32_at(16)).map_err(|e| DiffError::Corrupt(e.to_string()))?;
        let hdr = Self {
            version,
            geometry,
            generation: u64_at(32),
            id: Uuid::from_slice(&h[40..56]).expect("16 bytes"),
            parent: Uuid::from_slice(&h[56..72]).expect("16 bytes"),
            dirty_blocks: u64_at(72),
            zero_blocks: u64_at(80),
            dirty_bitmap_len: u64_at(88),
            zero_bitmap_len: u64_at(96),
            frame_size: u32_at(112),
        };
        if hdr
            .dirty_blocks
            .checked_add(hdr.zero_blocks)
            .is_none_or(|n| n > geometry.blocks())
        {
            return corrupt("more dirty and zero blocks than the device has");
        }
        if hdr.data_len() != u64_at(104) {
            return corrupt("data length is not dirty blocks x block size");
        }
        if hdr.frame_size == 0 || !hdr.frame_size.is_multiple_of(geometry.block_size) {
            return corrupt("frame (checksum chunk) size is not a multiple of the block size");
        }
        // Readers hold one frame in memory: a file must not choose how much.
        if hdr.frame_size > MAX_FRAME_SIZE {
            return corrupt("frame (checksum chunk) size larger than 64 MiB");
        }
        // Both bitmaps are read into memory: no longer than any bitmap of this device can be.
        let max = max_bitmap_len(geometry.blocks());
        if hdr.dirty_bitmap_len > max || hdr.zero_bitmap_len > max {
            return corrupt("bitmap longer than any bitmap of this device");
        }
        Ok(hdr)
    }
}

/// The longest Roaring serialization of a set of indices below `blocks`: a header, and per
/// 2^16 indices a descriptor, an offset and the largest container (a run container of
/// alternating runs, 4 bytes per run, outweighs a 8 KiB bitmap container).
pub(crate) fn max_bitmap_len(blocks: u64) -> u64 {
    let containers = blocks.div_ceil(1 << 16);
    16 + containers.div_ceil(8) + containers * (4 + 4 + 2 + 4 * (1 << 15))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DiffHeader {
        DiffHeader {
            version: VERSION,
            geometry: Geometry::new(1 << 30, 4096).unwrap(),
            generation: 3,
            id: Uuid::new_v4(),
            parent: Uuid::nil(),
            dirty_blocks: 10,
            zero_blocks: 5,
            dirty_bitmap_len: 30,
            zero_bitmap_len: 20,
            frame_size: FRAME_SIZE,
        }
    }

    #[test]
    fn header_round_trips() {
        for version in [VERSION_1, VERSION] {
            let h = DiffHeader {
                version,
                ..sample()
            };
            assert_eq!(DiffHeader::decode(&h.encode()).unwrap(), h);
            assert_eq!(h.data_len(), 10 * 4096);
            assert_eq!(h.data_offset(), 128 + 50);
        }
    }

    #[test]
    fn bitmap_bound_holds_the_worst_bitmaps() {
        use roaring::RoaringBitmap;
        for blocks in [1u64, 100, 65536, 65537, 300_000] {
            let alternating: RoaringBitmap = (0..blocks as u32).step_by(2).collect();
            let mut optimized = alternating.clone();
            optimized.optimize();
            let full: RoaringBitmap = (0..blocks as u32).collect();
            for b in [alternating, optimized, full] {
                assert!(b.serialized_size() as u64 <= max_bitmap_len(blocks));
            }
        }
    }

    #[test]
    fn header_damage_is_named() {
        let bytes = sample().encode();
        assert!(matches!(
            DiffHeader::decode(b"VSNAPDIX"),
            Err(DiffError::BadMagic)
        ));
        assert!(matches!(
            DiffHeader::decode(&bytes[..100]),
            Err(DiffError::Length { .. })
        ));
        for i in 8..HEADER_LEN {
            let mut b = bytes;
            b[i] ^= 0x10;
            assert!(DiffHeader::decode(&b).is_err(), "flip at {i} accepted");
        }
        let mut v3 = bytes;
        v3[8] = 3;
        assert!(matches!(
            DiffHeader::decode(&v3),
            Err(DiffError::Version(3))
        ));
    }
}
