//! Parent dedupe's index: where the parent state of a generation holds which block content, so
//! an export can store a dirty block the disk below already holds as a reference to it.
//!
//! It lives in the state directory beside the layers (see [`files`]):
//! - `base.hashes`: the hash of every block of the base image, computed once (the first export
//!   that deduplicates reads the base) and keyed by the base's identity;
//! - `<layer stem>.hashes`: a frozen layer's dirty blocks and their hashes, written as a
//!   by-product of exporting it (the export reads every dirty block anyway; a cut never
//!   hashes) or of exporting a generation above it that found none, merged when two layers
//!   fold into one;
//! - `chain-<diff id>.hashes`: the same for a diff the disk was started from.
//!
//! The parent state of generation G is the base overlaid by every layer (and chain diff) below
//! G; its map is streamed from those files, newest first, each block answered by the newest one
//! that covers it; a layer without a file is read and hashed once, its file written on the way
//! (an export searches its parent state once per window). Memory stays bounded: nothing is
//! held per device block, only the hashes an export looks for (a window of its own dirty
//! blocks at a time) and bitmaps.
//!
//! Every file is a hint, never trusted with data: a hit is verified by reading the parent block
//! and comparing bytes, so a stale, damaged or colliding entry (by chance, or crafted by the
//! guest, which chooses the bytes) costs one read, never a wrong block.

pub(crate) mod files;
pub(crate) mod search;

use crate::zero::is_zero;

/// A block's content hash: 0 for an all-zero block (never deduplicated: a zero block is free
/// already), else the CRC-32C of each half (hardware speed; tells apart almost all different
/// blocks, and a hit is verified anyway). `block` is a whole block, the device's short last
/// block zero-padded.
pub(crate) fn block_hash(block: &[u8]) -> u64 {
    if is_zero(block) {
        return 0;
    }
    let (a, b) = block.split_at(block.len() / 2);
    ((u64::from(crc32c::crc32c(a)) << 32) | u64::from(crc32c::crc32c(b))).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_hash_to_zero_and_others_never_do() {
        assert_eq!(block_hash(&[0u8; 4096]), 0);
        let mut b = vec![0u8; 4096];
        b[4095] = 1;
        let h = block_hash(&b);
        assert_ne!(h, 0);
        b[0] = 1;
        assert_ne!(block_hash(&b), h);
        assert_eq!(block_hash(&b), block_hash(&b.clone()));
    }
}
