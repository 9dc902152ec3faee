//! Byte layout of the diff header and trailer (pure; see docs/diff-format.md).

use uuid::Uuid;

use super::DiffError;
use crate::geometry::Geometry;

pub const MAGIC: &[u8; 8] = b"VSNAPDIF";
pub const TRAILER_MAGIC: &[u8; 8] = b"VSNAPEND";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 128;
pub const TRAILER_LEN: u64 = 16;
/// Data is checksummed in chunks of this many bytes (the last chunk may be shorter).
pub const CHUNK_SIZE: u32 = 1 << 20;
/// The largest chunk a reader accepts (it buffers one).
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiffHeader {
    pub geometry: Geometry,
    pub generation: u64,
    pub id: Uuid,
    /// The diff this one applies on top of; nil when it applies directly to the base image.
    pub parent: Uuid,
    pub dirty_blocks: u64,
    pub zero_blocks: u64,
    pub dirty_bitmap_len: u64,
    pub zero_bitmap_len: u64,
    pub chunk_size: u32,
}

impl DiffHeader {
    pub fn data_len(&self) -> u64 {
        self.dirty_blocks * self.geometry.bs()
    }

    pub fn chunks(&self) -> u64 {
        self.data_len().div_ceil(u64::from(self.chunk_size))
    }

    pub fn data_offset(&self) -> u64 {
        HEADER_LEN as u64 + self.dirty_bitmap_len + self.zero_bitmap_len
    }

    pub fn chunk_table_offset(&self) -> u64 {
        self.data_offset() + self.data_len()
    }

    /// Exact size of a well-formed file with this header.
    pub fn file_len(&self) -> u64 {
        self.chunk_table_offset() + 4 * self.chunks() + TRAILER_LEN
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..20].copy_from_slice(&self.geometry.block_size.to_le_bytes());
        // 20..24: flags, zero in version 1.
        h[24..32].copy_from_slice(&self.geometry.size.to_le_bytes());
        h[32..40].copy_from_slice(&self.generation.to_le_bytes());
        h[40..56].copy_from_slice(self.id.as_bytes());
        h[56..72].copy_from_slice(self.parent.as_bytes());
        h[72..80].copy_from_slice(&self.dirty_blocks.to_le_bytes());
        h[80..88].copy_from_slice(&self.zero_blocks.to_le_bytes());
        h[88..96].copy_from_slice(&self.dirty_bitmap_len.to_le_bytes());
        h[96..104].copy_from_slice(&self.zero_bitmap_len.to_le_bytes());
        h[104..112].copy_from_slice(&self.data_len().to_le_bytes());
        h[112..116].copy_from_slice(&self.chunk_size.to_le_bytes());
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
        if version != VERSION {
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
            geometry,
            generation: u64_at(32),
            id: Uuid::from_slice(&h[40..56]).expect("16 bytes"),
            parent: Uuid::from_slice(&h[56..72]).expect("16 bytes"),
            dirty_blocks: u64_at(72),
            zero_blocks: u64_at(80),
            dirty_bitmap_len: u64_at(88),
            zero_bitmap_len: u64_at(96),
            chunk_size: u32_at(112),
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
        if hdr.chunk_size == 0 || !hdr.chunk_size.is_multiple_of(geometry.block_size) {
            return corrupt("checksum chunk size is not a multiple of the block size");
        }
        // Readers hold one chunk in memory: a file must not choose how much.
        if hdr.chunk_size > MAX_CHUNK_SIZE {
            return corrupt("checksum chunk size larger than 64 MiB");
        }
        if hdr.dirty_bitmap_len > 1 << 40 || hdr.zero_bitmap_len > 1 << 40 {
            return corrupt("bitmap length");
        }
        Ok(hdr)
    }
}

/// Trailer: crc32c of both bitmaps, crc32c of the chunk table, magic.
pub fn encode_trailer(bitmaps_crc: u32, table_crc: u32) -> [u8; TRAILER_LEN as usize] {
    let mut t = [0u8; TRAILER_LEN as usize];
    t[0..4].copy_from_slice(&bitmaps_crc.to_le_bytes());
    t[4..8].copy_from_slice(&table_crc.to_le_bytes());
    t[8..16].copy_from_slice(TRAILER_MAGIC);
    t
}

/// (bitmaps crc, chunk table crc)
pub fn decode_trailer(t: &[u8]) -> Result<(u32, u32), DiffError> {
    if t.len() != TRAILER_LEN as usize || &t[8..16] != TRAILER_MAGIC {
        return Err(DiffError::Corrupt(
            "trailer magic missing (truncated?)".into(),
        ));
    }
    Ok((
        u32::from_le_bytes(t[0..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(t[4..8].try_into().expect("4 bytes")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DiffHeader {
        DiffHeader {
            geometry: Geometry::new(1 << 30, 4096).unwrap(),
            generation: 3,
            id: Uuid::new_v4(),
            parent: Uuid::nil(),
            dirty_blocks: 10,
            zero_blocks: 5,
            dirty_bitmap_len: 30,
            zero_bitmap_len: 20,
            chunk_size: CHUNK_SIZE,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(DiffHeader::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.data_len(), 10 * 4096);
        assert_eq!(h.file_len(), 128 + 50 + 40960 + 4 + 16);
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
        let mut v2 = bytes;
        v2[8] = 2;
        assert!(matches!(
            DiffHeader::decode(&v2),
            Err(DiffError::Version(2))
        ));
    }
}
