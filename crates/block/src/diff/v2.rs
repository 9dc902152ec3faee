//! Version 2 after the bitmaps: the frames' stored bytes back to back, a frame index of 64-byte
//! entries, and a 40-byte trailer that says how long both are (pure; see docs/diff-format.md).
//! The index is at the end so a writer can stream frames whose sizes it learns as it goes, and a
//! reader finds it from the file's last bytes, then reads one frame per block it wants.

use super::format::{DiffHeader, TRAILER_MAGIC};
use super::frame::{Codec, Frame};
use super::{DiffError, RefProblem};

pub const ENTRY_LEN: u64 = 64;
pub const TRAILER_LEN: u64 = 40;
/// The most frames a reader accepts: it holds the index in memory (40 bytes a frame), so a
/// file must not choose how much. 16 Mi frames of the default 1 MiB are 16 TiB of data.
pub const MAX_FRAMES: u64 = 1 << 24;

/// Entry kind: the frame's bytes are in this file.
pub const KIND_DATA: u8 = 0;
/// Entry kind of parent dedupe: the frame's blocks are copies of blocks of the diff's parent
/// state (the disk exactly as it is below the diff), consecutive from the block the entry names
/// on; what it stores is each block's CRC-32C (docs/diff-format.md).
pub const KIND_REFERENCE: u8 = 1;
/// Bytes a reference entry stores per block: the block's CRC-32C.
pub const REF_CRC_LEN: u64 = 4;

/// The trailer: what a reader needs to find the index from the end of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Bytes of the frame section (the stored bytes of all frames).
    pub stored_len: u64,
    pub frames: u64,
    pub bitmaps_crc: u32,
    pub index_crc: u32,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut t = [0u8; TRAILER_LEN as usize];
        t[0..8].copy_from_slice(&self.stored_len.to_le_bytes());
        t[8..16].copy_from_slice(&self.frames.to_le_bytes());
        t[16..20].copy_from_slice(&self.bitmaps_crc.to_le_bytes());
        t[20..24].copy_from_slice(&self.index_crc.to_le_bytes());
        // 24..28: reserved, zero.
        let crc = crc32c::crc32c(&t[..28]);
        t[28..32].copy_from_slice(&crc.to_le_bytes());
        t[32..40].copy_from_slice(TRAILER_MAGIC);
        t
    }

    pub fn decode(t: &[u8]) -> Result<Self, DiffError> {
        if t.len() != TRAILER_LEN as usize || &t[32..40] != TRAILER_MAGIC {
            return Err(DiffError::NoTrailer);
        }
        if crc32c::crc32c(&t[..28]) != u32_at(t, 28) {
            return Err(DiffError::Checksum("trailer"));
        }
        if u32_at(t, 24) != 0 {
            return Err(DiffError::Corrupt("trailer reserved bytes set".into()));
        }
        Ok(Self {
            stored_len: u64_at(t, 0),
            frames: u64_at(t, 8),
            bitmaps_crc: u32_at(t, 16),
            index_crc: u32_at(t, 20),
        })
    }

    /// The exact file length this trailer describes after `h`'s bitmaps, or an error when the
    /// counts are impossible for `h` (checked before anything is allocated from them).
    pub fn file_len(&self, h: &DiffHeader) -> Result<u64, DiffError> {
        let bad = |m: String| Err(DiffError::Index(m));
        let blocks = h.dirty_blocks;
        // Every frame holds at least one block; no data means no frames.
        if self.frames > blocks || self.frames > MAX_FRAMES || (blocks > 0) != (self.frames > 0) {
            return bad(format!(
                "{} frames for {blocks} dirty blocks (at most {MAX_FRAMES} frames)",
                self.frames
            ));
        }
        let min_frames = h.data_len().div_ceil(u64::from(h.frame_size));
        if self.frames < min_frames {
            return bad(format!(
                "{} frames cannot hold {} bytes in frames of at most {}",
                self.frames,
                h.data_len(),
                h.frame_size
            ));
        }
        h.data_offset()
            .checked_add(self.stored_len)
            .and_then(|n| n.checked_add(self.frames * ENTRY_LEN + TRAILER_LEN))
            .map_or_else(|| bad("stored length overflows".into()), Ok)
    }
}

pub fn encode_entry(f: &Frame) -> [u8; ENTRY_LEN as usize] {
    let mut e = [0u8; ENTRY_LEN as usize];
    e[0] = match f.reference {
        Some(_) => KIND_REFERENCE,
        None => KIND_DATA,
    };
    e[1] = f.codec.byte();
    // 2..4: flags, zero.
    e[4..8].copy_from_slice(&f.raw_len.to_le_bytes());
    e[8..16].copy_from_slice(&f.raw_offset.to_le_bytes());
    e[16..24].copy_from_slice(&f.stored_offset.to_le_bytes());
    e[24..28].copy_from_slice(&f.stored_len.to_le_bytes());
    e[28..32].copy_from_slice(&f.stored_crc.to_le_bytes());
    e[32..36].copy_from_slice(&f.raw_crc.to_le_bytes());
    // 36..40: reserved, zero. 40..48: a reference's first parent block; 48..64 reserved, zero.
    if let Some(source) = f.reference {
        e[40..48].copy_from_slice(&source.to_le_bytes());
    }
    e
}

/// Decodes index entries in order, each checked against the one before: frames tile the raw
/// data and the frame section exactly, in order, each within the header's frame size; a
/// reference names parent blocks inside the device.
pub struct IndexReader {
    bs: u64,
    blocks: u64,
    frame_size: u32,
    next_raw: u64,
    next_stored: u64,
    raw_end: u64,
    stored_end: u64,
    index: usize,
}

impl IndexReader {
    pub fn new(h: &DiffHeader, t: &Trailer) -> Self {
        Self {
            bs: h.geometry.bs(),
            blocks: h.geometry.blocks(),
            frame_size: h.frame_size,
            next_raw: 0,
            next_stored: h.data_offset(),
            raw_end: h.data_len(),
            stored_end: h.data_offset() + t.stored_len,
            index: 0,
        }
    }

    pub fn entry(&mut self, e: &[u8]) -> Result<Frame, DiffError> {
        let i = self.index;
        let bad = |m: String| Err(DiffError::Index(format!("entry {i}: {m}")));
        let reference = match e[0] {
            KIND_DATA => false,
            KIND_REFERENCE => true,
            k => return Err(DiffError::Unsupported(format!("frame {i} has kind {k}"))),
        };
        let Some(codec) = Codec::from_byte(e[1]) else {
            return Err(DiffError::Unsupported(format!(
                "frame {i} has codec {}",
                e[1]
            )));
        };
        let nonzero = |r: std::ops::Range<usize>| e[r].iter().any(|&b| b != 0);
        if nonzero(2..4) || nonzero(36..40) || (!reference && nonzero(40..64)) {
            return bad("unknown flags or reserved bytes set".into());
        }
        // Room for references of another shape (say, to a named generation): refused as such.
        if reference && nonzero(48..64) {
            return Err(DiffError::Unsupported(format!(
                "frame {i} refers to parent blocks with fields"
            )));
        }
        let f = Frame {
            raw_len: u32_at(e, 4),
            raw_offset: u64_at(e, 8),
            stored_offset: u64_at(e, 16),
            stored_len: u32_at(e, 24),
            stored_crc: u32_at(e, 28),
            raw_crc: u32_at(e, 32),
            codec,
            reference: reference.then(|| u64_at(e, 40)),
        };
        if f.raw_offset != self.next_raw || f.stored_offset != self.next_stored {
            return bad(format!(
                "starts at raw {} / file {}, not where the frame before ends ({} / {})",
                f.raw_offset, f.stored_offset, self.next_raw, self.next_stored
            ));
        }
        if f.raw_len == 0
            || f.raw_len > self.frame_size
            || !u64::from(f.raw_len).is_multiple_of(self.bs)
        {
            return bad(format!(
                "{} raw bytes: not a whole number of blocks up to the frame size {}",
                f.raw_len, self.frame_size
            ));
        }
        let blocks = u64::from(f.raw_len) / self.bs;
        let stored_ok = match (f.reference, codec) {
            (Some(_), Codec::Stored) => u64::from(f.stored_len) == REF_CRC_LEN * blocks,
            (Some(_), Codec::Zstd) => false,
            (None, Codec::Stored) => f.stored_len == f.raw_len && f.stored_crc == f.raw_crc,
            (None, Codec::Zstd) => {
                f.stored_len > 0
                    && f.stored_len as usize <= zstd::zstd_safe::compress_bound(f.raw_len as usize)
            }
        };
        if !stored_ok {
            let what = if reference { " (a reference)" } else { "" };
            return bad(format!(
                "{} stored bytes for {} raw bytes {codec:?}{what}",
                f.stored_len, f.raw_len
            ));
        }
        if let Some(first) = f.reference {
            if first
                .checked_add(blocks)
                .is_none_or(|end| end > self.blocks)
            {
                return Err(DiffError::Reference {
                    frame: i,
                    first,
                    end: first.saturating_add(blocks),
                    problem: RefProblem::OutsideDevice {
                        blocks: self.blocks,
                    },
                });
            }
        }
        self.next_raw = f.raw_end();
        self.next_stored += u64::from(f.stored_len);
        if self.next_raw > self.raw_end || self.next_stored > self.stored_end {
            return bad("runs past the end of the data".into());
        }
        self.index += 1;
        Ok(f)
    }

    /// After the last entry: the frames covered everything.
    pub fn finish(&self) -> Result<(), DiffError> {
        if self.next_raw != self.raw_end || self.next_stored != self.stored_end {
            return Err(DiffError::Index(format!(
                "the frames cover {} of {} raw bytes and {} of {} stored bytes",
                self.next_raw, self.raw_end, self.next_stored, self.stored_end
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;
    use uuid::Uuid;

    fn header(dirty_blocks: u64) -> DiffHeader {
        DiffHeader {
            version: super::super::VERSION,
            geometry: Geometry::new(1 << 30, 4096).unwrap(),
            generation: 1,
            id: Uuid::from_u128(1),
            parent: Uuid::nil(),
            dirty_blocks,
            zero_blocks: 0,
            dirty_bitmap_len: 10,
            zero_bitmap_len: 10,
            frame_size: 8192,
        }
    }

    fn frame(raw_offset: u64, raw_len: u32, stored_offset: u64, stored_len: u32) -> Frame {
        Frame {
            raw_offset,
            raw_len,
            stored_offset,
            stored_len,
            codec: Codec::Zstd,
            stored_crc: 1,
            raw_crc: 2,
            reference: None,
        }
    }

    fn reference(raw_offset: u64, blocks: u32, stored_offset: u64, source: u64) -> Frame {
        Frame {
            codec: Codec::Stored,
            stored_len: 4 * blocks,
            reference: Some(source),
            ..frame(raw_offset, blocks * 4096, stored_offset, 0)
        }
    }

    #[test]
    fn trailer_round_trips_and_damage_is_named() {
        let t = Trailer {
            stored_len: 1234,
            frames: 2,
            bitmaps_crc: 5,
            index_crc: 6,
        };
        let b = t.encode();
        assert_eq!(Trailer::decode(&b).unwrap(), t);
        assert_eq!(t.file_len(&header(3)).unwrap(), 148 + 1234 + 128 + 40);
        for i in 0..32 {
            let mut d = b;
            d[i] ^= 4;
            assert!(Trailer::decode(&d).is_err(), "flip at {i} accepted");
        }
        assert!(matches!(
            Trailer::decode(&b[..39]),
            Err(DiffError::NoTrailer)
        ));
        for frames in [0, 1, 4, MAX_FRAMES + 1] {
            let t = Trailer { frames, ..t };
            assert!(t.file_len(&header(3)).is_err(), "{frames} frames accepted");
        }
        let huge = Trailer {
            stored_len: u64::MAX - 10,
            ..t
        };
        assert!(huge.file_len(&header(3)).is_err());
    }

    #[test]
    fn the_index_must_tile_the_data() {
        let h = header(3);
        let t = Trailer {
            stored_len: 300,
            frames: 2,
            bitmaps_crc: 0,
            index_crc: 0,
        };
        let d = h.data_offset();
        let good = [frame(0, 8192, d, 200), frame(8192, 4096, d + 200, 100)];
        let mut r = IndexReader::new(&h, &t);
        for f in &good {
            assert_eq!(&r.entry(&encode_entry(f)).unwrap(), f);
        }
        r.finish().unwrap();

        let cases: &[(&str, [Frame; 2])] = &[
            ("gap in raw", [good[0], frame(12288, 4096, d + 200, 100)]),
            ("gap in file", [good[0], frame(8192, 4096, d + 201, 99)]),
            (
                "too long",
                [frame(0, 12288, d, 200), frame(12288, 0, d + 200, 100)],
            ),
            ("partial block", [frame(0, 8000, d, 200), good[1]]),
            ("past the end", [good[0], frame(8192, 8192, d + 200, 100)]),
            ("short", [good[0], frame(8192, 4096, d + 200, 99)]),
        ];
        for (what, frames) in cases {
            let mut r = IndexReader::new(&h, &t);
            let ok = frames
                .iter()
                .try_for_each(|f| r.entry(&encode_entry(f)).map(|_| ()))
                .and_then(|_| r.finish());
            assert!(matches!(ok, Err(DiffError::Index(_))), "{what}: {ok:?}");
        }
        // Kinds and codecs this build does not know are refused as such.
        let mut e = encode_entry(&good[0]);
        e[0] = 2;
        let r = IndexReader::new(&h, &t).entry(&e);
        assert!(matches!(r, Err(DiffError::Unsupported(_))), "{r:?}");
        let mut e = encode_entry(&good[0]);
        e[1] = 9;
        let r = IndexReader::new(&h, &t).entry(&e);
        assert!(matches!(r, Err(DiffError::Unsupported(_))), "{r:?}");
        let mut e = encode_entry(&good[0]);
        e[50] = 1;
        let r = IndexReader::new(&h, &t).entry(&e);
        assert!(matches!(r, Err(DiffError::Index(_))), "{r:?}");
        // A data entry turned into a reference stores the wrong amount.
        let mut e = encode_entry(&good[0]);
        e[0] = KIND_REFERENCE;
        let r = IndexReader::new(&h, &t).entry(&e);
        assert!(matches!(r, Err(DiffError::Index(_))), "{r:?}");
        // A stored frame holds exactly its raw bytes.
        let stored = Frame {
            codec: Codec::Stored,
            ..frame(0, 8192, d, 8000)
        };
        let r = IndexReader::new(&h, &t).entry(&encode_entry(&stored));
        assert!(matches!(r, Err(DiffError::Index(_))), "{r:?}");
    }

    #[test]
    fn references_tile_like_frames_and_stay_inside_the_device() {
        let h = header(3);
        let blocks = h.geometry.blocks();
        let t = Trailer {
            stored_len: 200 + 4,
            frames: 2,
            bitmaps_crc: 0,
            index_crc: 0,
        };
        let d = h.data_offset();
        let good = [
            frame(0, 8192, d, 200),
            reference(8192, 1, d + 200, blocks - 1),
        ];
        let mut r = IndexReader::new(&h, &t);
        for f in &good {
            assert_eq!(&r.entry(&encode_entry(f)).unwrap(), f);
        }
        r.finish().unwrap();
        assert_eq!(encode_entry(&good[1])[0], KIND_REFERENCE);

        let second = |f: Frame| {
            let mut r = IndexReader::new(&h, &t);
            r.entry(&encode_entry(&good[0])).unwrap();
            r.entry(&encode_entry(&f))
        };
        // Past the device end, or wrapping around: a dangling reference, typed.
        for source in [blocks, u64::MAX] {
            let e = second(reference(8192, 1, d + 200, source));
            assert!(
                matches!(
                    e,
                    Err(DiffError::Reference {
                        frame: 1,
                        problem: RefProblem::OutsideDevice { .. },
                        ..
                    })
                ),
                "{e:?}"
            );
        }
        // Compressed, or storing other than one checksum a block.
        let zstd = Frame {
            codec: Codec::Zstd,
            ..good[1]
        };
        assert!(matches!(second(zstd), Err(DiffError::Index(_))));
        let long = Frame {
            stored_len: 8,
            ..good[1]
        };
        assert!(matches!(second(long), Err(DiffError::Index(_))));
        // Fields this build does not know (a named generation, say) are refused as such.
        let mut e = encode_entry(&good[1]);
        e[48] = 1;
        let mut r = IndexReader::new(&h, &t);
        r.entry(&encode_entry(&good[0])).unwrap();
        assert!(matches!(r.entry(&e), Err(DiffError::Unsupported(_))));
    }
}
