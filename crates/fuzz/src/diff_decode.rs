//! Target `diff_decode`: the snapshot diff reader of `vsnap_block`. A diff arrives from outside
//! (a file handed to `vsnap apply`, a chain given at start-up), so every byte is hostile.
//!
//! Input: one flags byte, then the file. The flags let the fuzzer past the checksums, which it
//! could never forge byte by byte, to the structure behind them:
//!
//! - bit 0: set the header's data length field to `dirty_blocks x block_size`;
//! - bit 1: recompute the header checksum;
//! - bit 2: once the header decodes, cut or zero-pad the file to the size it describes;
//! - bit 3: recompute the data chunk checksums in the chunk table;
//! - bit 4: recompute the trailer (bitmap and table checksums, magic).
//!
//! The pure path, `DiffHeader::decode`, runs on the bytes directly; the rest goes through
//! `DiffFile::open` on a temporary file (the reader has no in-memory entry point), then
//! `verify`, the run iterator and `read_stored`, each checked against the file's own bytes.

use std::path::PathBuf;
use std::sync::OnceLock;

use uuid::Uuid;
use vsnap_block::diff::{write_diff, DiffError, DiffFile, DiffHeader, HEADER_LEN, TRAILER_MAGIC};
use vsnap_block::{BlockState, Geometry, Job, Tracker};

const FIX_DATA_LEN: u8 = 1;
const FIX_HEADER_CRC: u8 = 2;
const FIX_SIZE: u8 = 4;
const FIX_CHUNKS: u8 = 8;
const FIX_TRAILER: u8 = 16;
const FIX_ALL: u8 = 0x1f;
const TRAILER: usize = 16;
/// Files are padded up to this size at most (bigger headers stay short and fail the length
/// check, which is fine: the reader is exercised on what fits).
const MAX_FILE: u64 = 256 << 10;
/// How many dirty blocks are read back one by one.
const READ_BACK: usize = 64;

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Applies the fix-ups `flags` asks for.
fn fix_up(flags: u8, f: &mut Vec<u8>) {
    if f.len() < HEADER_LEN {
        return;
    }
    if flags & FIX_DATA_LEN != 0 {
        if let Some(n) = u64_at(f, 72).checked_mul(u64::from(u32_at(f, 16))) {
            f[104..112].copy_from_slice(&n.to_le_bytes());
        }
    }
    if flags & FIX_HEADER_CRC != 0 {
        let crc = crc32c::crc32c(&f[..124]);
        f[124..128].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(h) = DiffHeader::decode(&f[..HEADER_LEN]) else {
        return;
    };
    let len = h.file_len();
    if flags & FIX_SIZE != 0 && len <= MAX_FILE {
        f.resize(len as usize, 0);
    }
    if f.len() as u64 != len {
        return;
    }
    let (data, table) = (h.data_offset() as usize, h.chunk_table_offset() as usize);
    if flags & FIX_CHUNKS != 0 {
        let chunk = h.chunk_size as usize;
        for i in 0..h.chunks() as usize {
            let start = data + i * chunk;
            let end = (start + chunk).min(table);
            let crc = crc32c::crc32c(&f[start..end]);
            f[table + 4 * i..table + 4 * i + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    if flags & FIX_TRAILER != 0 {
        let t = f.len() - TRAILER;
        let bitmaps = crc32c::crc32c(&f[HEADER_LEN..data]);
        let chunks = crc32c::crc32c(&f[table..t]);
        f[t..t + 4].copy_from_slice(&bitmaps.to_le_bytes());
        f[t + 4..t + 8].copy_from_slice(&chunks.to_le_bytes());
        f[t + 8..].copy_from_slice(TRAILER_MAGIC);
    }
}

/// A scratch file per thread (the reader only opens paths).
fn scratch_file() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| crate::scratch::dir("diff"));
    let id = format!("{:?}", std::thread::current().id());
    let id: String = id.chars().filter(char::is_ascii_digit).collect();
    dir.join(format!("input-{id}.vsnap"))
}

/// The harness.
pub fn diff_decode(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut f = rest.to_vec();
    fix_up(flags, &mut f);

    // The pure header decoder: only the first 128 bytes matter, and what it accepts it would
    // write back byte for byte.
    let head = DiffHeader::decode(&f);
    let short = DiffHeader::decode(&f[..f.len().min(HEADER_LEN)]);
    assert_eq!(
        head.as_ref().ok(),
        short.as_ref().ok(),
        "the header decoder reads past 128 bytes"
    );
    if let Ok(h) = &head {
        assert_eq!(
            h.encode()[..],
            f[..HEADER_LEN],
            "decode is not encode's inverse"
        );
    }

    let path = scratch_file();
    std::fs::write(&path, &f).expect("write scratch diff");
    let opened = DiffFile::open(&path);
    let d = match opened {
        Ok(d) => d,
        // The length is checked before any read past the header, so reads cannot fail.
        Err(DiffError::Io { context, source }) => panic!("{context}: {source}"),
        Err(_) => return,
    };
    let h = head.expect("an opened diff has a valid header");
    assert_eq!(d.header, h);
    assert_eq!(f.len() as u64, h.file_len());
    check_contents(&d, &f);
}

/// Everything the reader hands out agrees with the file's bytes.
fn check_contents(d: &DiffFile, f: &[u8]) {
    let h = &d.header;
    let g = d.geometry();
    let (bs, blocks) = (g.bs(), g.blocks());
    let t = d.tracker();
    assert_eq!(t.dirty().len(), h.dirty_blocks);
    assert_eq!(t.zero().len(), h.zero_blocks);
    assert!(t.dirty().is_disjoint(t.zero()));
    for m in [t.dirty().max(), t.zero().max()].into_iter().flatten() {
        assert!(u64::from(m) < blocks, "block {m} past the device end");
    }
    // Dirty block number `rank` (0-based) is stored at data_offset + rank * bs.
    let stored = |rank: u64, block: u64| {
        let (s, e) = g.block_span(block);
        let at = (h.data_offset() + rank * bs) as usize;
        &f[at..at + (e - s) as usize]
    };
    for (rank, b) in t.dirty().iter().take(READ_BACK).enumerate() {
        let b = u64::from(b);
        assert_eq!(d.state(b), BlockState::Dirty);
        let (s, e) = g.block_span(b);
        let mut buf = vec![0u8; (e - s) as usize];
        d.read_stored(s, &mut buf).expect("read a dirty block");
        assert_eq!(buf, stored(rank as u64, b), "block {b} read back wrong");
    }
    if let Some(z) = t.zero().min() {
        let mut buf = vec![0u8; 1];
        assert!(d.read_stored(u64::from(z) * bs, &mut buf).is_err());
    }
    // Streaming: checksummed runs, in order, covering exactly the dirty blocks.
    let mut next_rank = 0u64;
    let mut last_end = 0u64;
    let r = d.for_each_dirty_run(&Job::new(), |off, bytes| {
        assert!(off >= last_end, "runs out of order or overlapping");
        assert!(off.is_multiple_of(bs) && off + bytes.len() as u64 <= g.size);
        let mut o = 0usize;
        while o < bytes.len() {
            let b = (off + o as u64) / bs;
            assert!(
                t.dirty().contains(b as u32),
                "run covers a block that is not dirty"
            );
            let want = stored(next_rank, b);
            assert_eq!(&bytes[o..o + want.len()], want, "run bytes of block {b}");
            o += want.len();
            next_rank += 1;
        }
        last_end = off + bytes.len() as u64;
        Ok(())
    });
    match r {
        Ok(()) => assert_eq!(next_rank, h.dirty_blocks, "runs missed dirty blocks"),
        Err(DiffError::Checksum(_) | DiffError::Corrupt(_)) => {}
        Err(e) => panic!("streaming a diff failed with {e}"),
    }
}

/// Device size, block size, and block ranges in a state.
type Shape = (u64, u32, &'static [(u32, u32, BlockState)]);

/// Real diffs, written by `write_diff`, of a few shapes.
pub fn seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("seed dir");
    let mut out = Vec::new();
    let shapes: &[Shape] = &[
        // 64 KiB of 512-byte blocks: dirty runs, a zero run, the last block.
        (
            64 << 10,
            512,
            &[
                (0, 3, BlockState::Dirty),
                (5, 9, BlockState::Zero),
                (10, 11, BlockState::Dirty),
                (127, 128, BlockState::Dirty),
            ],
        ),
        // A size that is not a multiple of the block size: the last block is short.
        (
            3 * 4096 + 512,
            4096,
            &[(0, 1, BlockState::Zero), (3, 4, BlockState::Dirty)],
        ),
        // Nothing changed.
        (1 << 20, 4096, &[]),
        // Only zeros.
        (1 << 20, 4096, &[(0, 256, BlockState::Zero)]),
        // Alternating blocks: many runs, a bitmap that is not a run container.
        (
            64 << 10,
            512,
            &[
                (1, 2, BlockState::Dirty),
                (3, 4, BlockState::Dirty),
                (5, 6, BlockState::Zero),
                (7, 8, BlockState::Dirty),
                (9, 10, BlockState::Zero),
                (64, 70, BlockState::Dirty),
            ],
        ),
    ];
    for (i, (size, bs, ranges)) in shapes.iter().enumerate() {
        let g = Geometry::new(*size, *bs).expect("seed geometry");
        let mut t = Tracker::new();
        for &(s, e, st) in *ranges {
            t.set_range(s, e, st);
        }
        let p = dir.path().join(format!("{i}.vsnap"));
        let fill = |off: u64, buf: &mut [u8]| -> Result<(), DiffError> {
            for (j, b) in buf.iter_mut().enumerate() {
                *b = ((off + j as u64) % 251) as u8 | 1;
            }
            Ok(())
        };
        let parent = if i % 2 == 0 {
            Uuid::nil()
        } else {
            Uuid::from_u128(0x1234)
        };
        write_diff(
            &p,
            false,
            g,
            i as u64 + 1,
            Uuid::from_u128(i as u128 + 1),
            parent,
            &t,
            &fill,
            &Job::new(),
        )
        .expect("write seed diff");
        let file = std::fs::read(&p).expect("read seed diff");
        out.push([&[0u8][..], &file].concat());
        out.push([&[FIX_ALL][..], &file].concat());
    }
    // Checksum chunks smaller than a megabyte: the chunk table has several entries.
    let mut small_chunks = out[0][1..].to_vec();
    small_chunks[112..116].copy_from_slice(&1024u32.to_le_bytes());
    out.push([&[FIX_ALL][..], &small_chunks].concat());
    out
}

pub const DICT: &[&[u8]] = &[
    b"VSNAPDIF",
    b"VSNAPEND",
    &[0x3a, 0x30, 0, 0],
    &[0x3b, 0x30, 0, 0],
    &[0, 2, 0, 0],
    &[0, 0x10, 0, 0],
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_open_and_verify() {
        for s in seeds() {
            let mut f = s[1..].to_vec();
            fix_up(s[0], &mut f);
            let p = scratch_file();
            std::fs::write(&p, &f).unwrap();
            let d = DiffFile::open(&p).unwrap();
            d.verify(&Job::new()).unwrap();
            diff_decode(&s);
        }
    }

    #[test]
    fn fix_ups_repair_what_they_cover() {
        let s = &seeds()[0];
        let mut f = s[1..].to_vec();
        // Damage a data byte: verify fails until the chunk table and trailer are recomputed.
        let data = DiffHeader::decode(&f).unwrap().data_offset() as usize;
        f[data] ^= 0xff;
        let p = scratch_file();
        std::fs::write(&p, &f).unwrap();
        let d = DiffFile::open(&p).unwrap();
        assert!(matches!(
            d.verify(&Job::new()),
            Err(DiffError::Checksum("data"))
        ));
        fix_up(FIX_CHUNKS | FIX_TRAILER, &mut f);
        std::fs::write(&p, &f).unwrap();
        DiffFile::open(&p).unwrap().verify(&Job::new()).unwrap();
    }
}
