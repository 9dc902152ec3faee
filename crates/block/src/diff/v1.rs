//! Version 1 after the bitmaps: the raw data, a table of CRC-32C per `frame_size` chunk, and a
//! 16-byte trailer (pure; see docs/diff-format.md).

use super::format::{DiffHeader, TRAILER_MAGIC};
use super::frame::{Codec, Frame};
use super::DiffError;

pub const TRAILER_LEN: u64 = 16;

pub fn chunks(h: &DiffHeader) -> u64 {
    h.data_len().div_ceil(u64::from(h.frame_size))
}

pub fn chunk_table_offset(h: &DiffHeader) -> u64 {
    h.data_offset() + h.data_len()
}

/// Exact size of a well-formed version-1 file with this header.
pub fn file_len(h: &DiffHeader) -> u64 {
    chunk_table_offset(h) + 4 * chunks(h) + TRAILER_LEN
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
        return Err(DiffError::NoTrailer);
    }
    Ok((
        u32::from_le_bytes(t[0..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(t[4..8].try_into().expect("4 bytes")),
    ))
}

/// The chunks as raw frames (each checksum serves as both of a frame's).
pub fn frames(h: &DiffHeader, table: &[u8]) -> Vec<Frame> {
    let chunk = u64::from(h.frame_size);
    table
        .chunks_exact(4)
        .enumerate()
        .map(|(i, c)| {
            let crc = u32::from_le_bytes(c.try_into().expect("4 bytes"));
            let off = i as u64 * chunk;
            // Every chunk but the last is `chunk` long; `frame_size` fits in a u32.
            let len = chunk.min(h.data_len() - off) as u32;
            Frame {
                raw_offset: off,
                raw_len: len,
                stored_offset: h.data_offset() + off,
                stored_len: len,
                codec: Codec::Stored,
                stored_crc: crc,
                raw_crc: crc,
                reference: None,
            }
        })
        .collect()
}
