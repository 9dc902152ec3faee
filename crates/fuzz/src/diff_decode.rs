//! Target `diff_decode`: the snapshot diff reader of `vsnap_block`, both format versions. A diff
//! arrives from outside (a file handed to `vsnap apply`, a chain given at start-up), so every
//! byte is hostile.
//!
//! Input: one flags byte, then the file. The flags let the fuzzer past the checksums, which it
//! could never forge byte by byte, to the structure behind them:
//!
//! - bit 0: set the header's data length field to `dirty_blocks x block_size`;
//! - bit 1: recompute the header checksum;
//! - bit 2: once the header decodes, make the size agree: version 1 cuts or zero-pads the file
//!   to the size its header describes; version 2 sets the trailer's stored length to what lies
//!   between the bitmaps and an index of the trailer's frame count;
//! - bit 3: version 1 recomputes the chunk checksums; version 2 makes every index entry start
//!   where the one before ends and recomputes its checksums (the raw one by decompressing; a
//!   reference entry's block checksums from the harness's parent state, below);
//! - bit 4: recompute the trailer (bitmap and table or index checksums, trailer checksum, magic).
//!
//! The pure path, `DiffHeader::decode`, runs on the bytes directly; the rest goes through
//! `DiffFile::open` on a temporary file (the reader has no in-memory entry point), then
//! `verify`, the run iterators and random reads, each checked against the harness's own reading
//! of the file's bytes (version 2 frames decompressed here, independently). References (parent
//! dedupe) resolve against a parent state the harness makes up, [`parent_block`]: streaming
//! checks every referenced block against its recorded checksum, random reads copy it.

use std::path::PathBuf;
use std::sync::OnceLock;

use uuid::Uuid;
use vsnap_block::diff::{
    combine_crcs, v1, v2, write_diff_spec, Codec, Compression, DiffError, DiffFile, DiffHeader,
    DiffSpec, Frame, RefProblem, References, WriteOptions, HEADER_LEN, MAX_FRAME_SIZE,
    TRAILER_MAGIC, VERSION, VERSION_1,
};
use vsnap_block::{BlockState, Geometry, Job, Tracker};

const FIX_DATA_LEN: u8 = 1;
const FIX_HEADER_CRC: u8 = 2;
const FIX_SIZE: u8 = 4;
const FIX_CHUNKS: u8 = 8;
const FIX_TRAILER: u8 = 16;
const FIX_ALL: u8 = 0x1f;
/// Files are padded up to this size at most (bigger headers stay short and fail the length
/// check, which is fine: the reader is exercised on what fits).
const MAX_FILE: u64 = 256 << 10;
/// How many dirty blocks are read back one by one.
const READ_BACK: usize = 64;
/// The most raw bytes of a reference entry whose block checksums the fix-up recomputes.
const MAX_FIXED_REFERENCE: u32 = 1 << 20;

/// The harness's parent state: device byte `off` below every diff it reads.
fn parent_byte(off: u64) -> u8 {
    (off.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8 | 1
}

/// Whole parent block `b` of a device of `g` (zero past the device end, as a diff pads it).
fn parent_block(g: Geometry, b: u64) -> Vec<u8> {
    (b * g.bs()..(b + 1) * g.bs())
        .map(|o| if o < g.size { parent_byte(o) } else { 0 })
        .collect()
}

fn read_parent(off: u64, buf: &mut [u8]) -> Result<(), DiffError> {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = parent_byte(off + i as u64);
    }
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Applies the fix-ups `flags` asks for.
fn fix_up(flags: u8, f: &mut Vec<u8>) {
    if f.len() < HEADER_LEN {
        return;
    }
    if flags & FIX_DATA_LEN != 0 {
        if let Some(n) = u64_at(f, 72).checked_mul(u64::from(u32_at(f, 16))) {
            put64(f, 104, n);
        }
    }
    if flags & FIX_HEADER_CRC != 0 {
        let crc = crc32c::crc32c(&f[..124]);
        put32(f, 124, crc);
    }
    let Ok(h) = DiffHeader::decode(&f[..HEADER_LEN]) else {
        return;
    };
    if h.version == VERSION_1 {
        fix_up_v1(flags, &h, f);
    } else {
        fix_up_v2(flags, &h, f);
    }
}

fn fix_up_v1(flags: u8, h: &DiffHeader, f: &mut Vec<u8>) {
    let len = v1::file_len(h);
    if flags & FIX_SIZE != 0 && len <= MAX_FILE {
        f.resize(len as usize, 0);
    }
    if f.len() as u64 != len {
        return;
    }
    let (data, table) = (h.data_offset() as usize, v1::chunk_table_offset(h) as usize);
    if flags & FIX_CHUNKS != 0 {
        let chunk = h.frame_size as usize;
        for i in 0..v1::chunks(h) as usize {
            let start = data + i * chunk;
            let end = (start + chunk).min(table);
            let crc = crc32c::crc32c(&f[start..end]);
            put32(f, table + 4 * i, crc);
        }
    }
    if flags & FIX_TRAILER != 0 {
        let t = f.len() - v1::TRAILER_LEN as usize;
        let bitmaps = crc32c::crc32c(&f[HEADER_LEN..data]);
        let chunks = crc32c::crc32c(&f[table..t]);
        put32(f, t, bitmaps);
        put32(f, t + 4, chunks);
        f[t + 8..].copy_from_slice(TRAILER_MAGIC);
    }
}

fn fix_up_v2(flags: u8, h: &DiffHeader, f: &mut [u8]) {
    let data = h.data_offset();
    let tl = v2::TRAILER_LEN;
    let len = f.len() as u64;
    if len < data + tl {
        return;
    }
    let t = (len - tl) as usize;
    let frames = u64_at(f, t + 8);
    // Where the index starts if the trailer's frame count is right.
    let Some(index) = frames
        .checked_mul(v2::ENTRY_LEN)
        .and_then(|n| (len - tl).checked_sub(n))
        .filter(|&i| i >= data)
    else {
        return;
    };
    if flags & FIX_SIZE != 0 {
        put64(f, t, index - data);
    }
    let Some(stored_end) = data.checked_add(u64_at(f, t)) else {
        return;
    };
    if flags & FIX_CHUNKS != 0 && stored_end == index {
        let (mut raw, mut stored) = (0u64, data);
        for i in 0..frames as usize {
            let e = index as usize + i * v2::ENTRY_LEN as usize;
            put64(f, e + 8, raw);
            put64(f, e + 16, stored);
            let (raw_len, stored_len) = (u32_at(f, e + 4), u32_at(f, e + 24));
            raw += u64::from(raw_len);
            stored += u64::from(stored_len);
            if stored > stored_end {
                break;
            }
            let at = (stored - u64::from(stored_len)) as usize..stored as usize;
            if f[e] == v2::KIND_REFERENCE {
                fix_reference(h, f, e, at);
                continue;
            }
            let bytes = &f[at];
            let stored_crc = crc32c::crc32c(bytes);
            let raw_crc = match Codec::from_byte(f[e + 1]) {
                Some(Codec::Zstd) => decompress(bytes, raw_len).map(|r| crc32c::crc32c(&r)),
                _ => Some(stored_crc),
            };
            put32(f, e + 28, stored_crc);
            if let Some(c) = raw_crc {
                put32(f, e + 32, c);
            }
        }
    }
    if flags & FIX_TRAILER != 0 && stored_end <= index {
        let bitmaps = crc32c::crc32c(&f[HEADER_LEN..data as usize]);
        let ix = crc32c::crc32c(&f[index as usize..t]);
        put32(f, t + 16, bitmaps);
        put32(f, t + 20, ix);
        put32(f, t + 24, 0);
        let crc = crc32c::crc32c(&f[t..t + 28]);
        put32(f, t + 28, crc);
        f[t + 32..].copy_from_slice(TRAILER_MAGIC);
    }
}

/// Makes the reference entry at index offset `e` (stored bytes `at`) agree with the harness's
/// parent state: each block's checksum, then the entry's two.
fn fix_reference(h: &DiffHeader, f: &mut [u8], e: usize, at: std::ops::Range<usize>) {
    let (g, bs) = (h.geometry, h.geometry.bs());
    let raw_len = u32_at(f, e + 4);
    let source = u64_at(f, e + 40);
    let blocks = u64::from(raw_len) / bs;
    let fits = source
        .checked_add(blocks)
        .is_some_and(|end| end <= g.blocks());
    if raw_len <= MAX_FIXED_REFERENCE && fits && at.len() as u64 == 4 * blocks {
        for j in 0..blocks {
            let crc = crc32c::crc32c(&parent_block(g, source + j));
            put32(f, at.start + 4 * j as usize, crc);
        }
    }
    let list: Vec<u32> = f[at.clone()]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let stored_crc = crc32c::crc32c(&f[at]);
    put32(f, e + 28, stored_crc);
    put32(f, e + 32, combine_crcs(list, bs));
}

/// The harness's own reading of a zstd frame, with the reader's rules: exactly one zstd frame
/// that declares `raw_len` bytes and holds them.
fn decompress(stored: &[u8], raw_len: u32) -> Option<Vec<u8>> {
    // The reader refuses bigger frames before decoding them; the harness must not allocate.
    if raw_len > MAX_FRAME_SIZE {
        return None;
    }
    let one_frame = zstd::zstd_safe::find_frame_compressed_size(stored).ok() == Some(stored.len());
    let declared = zstd::zstd_safe::get_frame_content_size(stored)
        .ok()
        .flatten();
    if !stored.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || !one_frame
        || declared != Some(u64::from(raw_len))
    {
        return None;
    }
    let raw = zstd::bulk::decompress(stored, raw_len as usize).ok()?;
    (raw.len() == raw_len as usize).then_some(raw)
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
    assert_eq!(f.len() as u64, d.file_len());
    if h.version == VERSION_1 {
        assert_eq!(f.len() as u64, v1::file_len(&h));
    }
    check_frames(&d);
    check_contents(&d, &f);
}

/// The frames tile the raw data and the stored bytes, in order, inside the file.
fn check_frames(d: &DiffFile) {
    let h = &d.header;
    let (mut raw, mut stored) = (0u64, h.data_offset());
    let bs = h.geometry.bs();
    for fr in d.frames() {
        assert_eq!((fr.raw_offset, fr.stored_offset), (raw, stored));
        assert!(fr.raw_len > 0 && fr.raw_len <= h.frame_size);
        assert!(u64::from(fr.raw_len).is_multiple_of(bs));
        let blocks = u64::from(fr.raw_len) / bs;
        match fr.reference {
            // A reference stores a checksum a block, and names blocks of the device.
            Some(source) => {
                assert_eq!(h.version, VERSION);
                assert_eq!(
                    (fr.codec, u64::from(fr.stored_len)),
                    (Codec::Stored, 4 * blocks)
                );
                assert!(
                    source + blocks <= h.geometry.blocks(),
                    "a dangling reference opened"
                );
            }
            None if fr.codec == Codec::Stored => {
                assert_eq!((fr.stored_len, fr.stored_crc), (fr.raw_len, fr.raw_crc));
            }
            None => {}
        }
        raw += u64::from(fr.raw_len);
        stored += u64::from(fr.stored_len);
    }
    assert_eq!(raw, h.data_len());
    assert!(stored <= d.file_len());
    let st = d.data_stats();
    assert_eq!(st.stored_bytes, stored - h.data_offset());
    assert_eq!(st.frames as usize, d.frames().len());
    let refs = d.frames().iter().filter(|f| f.reference.is_some());
    assert_eq!(
        st.referenced_blocks,
        refs.map(|f| u64::from(f.raw_len) / bs).sum::<u64>()
    );
}

/// What the reader must make of a frame.
enum Expect {
    /// These raw bytes.
    Bytes(Vec<u8>),
    /// A frame error: the stored bytes do not check.
    BadFrame,
    /// A reference whose parent blocks are not the ones it recorded.
    Mismatch,
}

/// A frame's raw bytes as the harness reads them. `checked`: as streaming does, every checksum
/// verified; else as random reads do (raw frames and references in place, unchecked, as
/// version 1 always was; compressed frames decoded and checked).
fn expect(f: &[u8], h: &DiffHeader, fr: &Frame, checked: bool) -> Expect {
    let s = &f[fr.stored_offset as usize..(fr.stored_offset + u64::from(fr.stored_len)) as usize];
    let crc_ok = crc32c::crc32c(s) == fr.stored_crc;
    if let Some(source) = fr.reference {
        let g = h.geometry;
        let blocks: Vec<Vec<u8>> = (0..u64::from(fr.raw_len) / g.bs())
            .map(|j| parent_block(g, source + j))
            .collect();
        if !checked {
            return Expect::Bytes(blocks.concat());
        }
        let list: Vec<u32> = s
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if !crc_ok || combine_crcs(list.iter().copied(), g.bs()) != fr.raw_crc {
            return Expect::BadFrame;
        }
        if blocks
            .iter()
            .zip(&list)
            .any(|(b, &c)| crc32c::crc32c(b) != c)
        {
            return Expect::Mismatch;
        }
        return Expect::Bytes(blocks.concat());
    }
    let bytes = match fr.codec {
        Codec::Stored => (crc_ok || !checked).then(|| s.to_vec()),
        Codec::Zstd if crc_ok => {
            decompress(s, fr.raw_len).filter(|r| crc32c::crc32c(r) == fr.raw_crc)
        }
        Codec::Zstd => None,
    };
    bytes.map_or(Expect::BadFrame, Expect::Bytes)
}

/// Everything the reader hands out agrees with the harness's reading of the file's bytes.
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
    let frames = d.frames();
    // Dirty block number `rank` (0-based) is raw byte rank * bs, in the frame covering it.
    let frame_of = |rank: u64| frames.partition_point(|fr| fr.raw_end() <= rank * bs);
    let unchecked: Vec<Expect> = frames.iter().map(|fr| expect(f, h, fr, false)).collect();
    for (rank, b) in t.dirty().iter().take(READ_BACK).enumerate() {
        let (b, rank) = (u64::from(b), rank as u64);
        assert_eq!(d.state(b), BlockState::Dirty);
        let (s, e) = g.block_span(b);
        let mut buf = vec![0u8; (e - s) as usize];
        let i = frame_of(rank);
        let r = d.read_resolved(s, &mut buf, &read_parent);
        match &unchecked[i] {
            Expect::Bytes(raw) => {
                r.unwrap_or_else(|e| panic!("read of dirty block {b}: {e}"));
                let at = (rank * bs - frames[i].raw_offset) as usize;
                assert_eq!(buf, raw[at..at + buf.len()], "block {b} read back wrong");
            }
            _ => assert!(
                matches!(r, Err(DiffError::Frame { frame, .. }) if frame == i),
                "block {b} of a bad frame read as {r:?}"
            ),
        }
        // Without a parent, a reference is refused as such; data reads as with one.
        let mut again = vec![0u8; buf.len()];
        match (d.read_stored(s, &mut again), frames[i].reference) {
            (
                Err(DiffError::Reference {
                    problem: RefProblem::NoParent(_),
                    ..
                }),
                Some(_),
            ) => {}
            (Ok(()), None) => assert_eq!(again, buf),
            (Err(DiffError::Frame { .. }), None) => {}
            (r, kind) => panic!("read_stored of block {b} ({kind:?}): {r:?}"),
        }
        match d.reference_at(b) {
            Ok(Some((source, _))) => {
                let fr = &frames[i];
                let j = (rank * bs - fr.raw_offset) / bs;
                assert_eq!(Some(source - j), fr.reference);
            }
            Ok(None) => assert!(frames[i].reference.is_none()),
            Err(e) => assert!(
                frames[i].reference.is_some() && matches!(e, DiffError::Frame { .. }),
                "{e}"
            ),
        }
    }
    if let Some(z) = t.zero().min() {
        let mut buf = vec![0u8; 1];
        assert!(d.read_stored(u64::from(z) * bs, &mut buf).is_err());
    }
    // Streaming: checked frames, runs in order, covering exactly the dirty blocks, up to the
    // first bad frame or reference.
    let checked: Vec<Expect> = frames.iter().map(|fr| expect(f, h, fr, true)).collect();
    let first_bad = checked.iter().position(|e| !matches!(e, Expect::Bytes(_)));
    let mut next_rank = 0u64;
    let mut last_end = 0u64;
    let r = d.for_each_dirty_run_in(&Job::new(), &read_parent, |off, bytes| {
        assert!(off >= last_end, "runs out of order or overlapping");
        assert!(off.is_multiple_of(bs) && off + bytes.len() as u64 <= g.size);
        let mut o = 0usize;
        while o < bytes.len() {
            let b = (off + o as u64) / bs;
            assert!(
                t.dirty().contains(b as u32),
                "run covers a block that is not dirty"
            );
            let i = frame_of(next_rank);
            assert!(first_bad.is_none_or(|bad| i < bad), "data of a bad frame");
            let Expect::Bytes(raw) = &checked[i] else {
                panic!("bytes of a bad frame")
            };
            let at = (next_rank * bs - frames[i].raw_offset) as usize;
            let (s, e) = g.block_span(b);
            let n = (e - s) as usize;
            assert_eq!(&bytes[o..o + n], &raw[at..at + n], "run bytes of block {b}");
            o += n;
            next_rank += 1;
        }
        last_end = off + bytes.len() as u64;
        Ok(())
    });
    match (r, first_bad.map(|i| (i, &checked[i]))) {
        (Ok(()), None) => assert_eq!(next_rank, h.dirty_blocks, "runs missed dirty blocks"),
        (Err(DiffError::Frame { frame, .. }), Some((bad, Expect::BadFrame))) => {
            assert_eq!(frame, bad)
        }
        (
            Err(DiffError::Reference {
                frame,
                problem: RefProblem::Mismatch { .. },
                ..
            }),
            Some((bad, Expect::Mismatch)),
        ) => assert_eq!(frame, bad),
        (r, bad) => panic!(
            "streaming ended with {r:?}; the first bad frame is {:?}",
            bad.map(|b| b.0)
        ),
    }
    // Without a parent: the same, stopping at the first reference too.
    let stop = frames
        .iter()
        .zip(&checked)
        .position(|(fr, e)| fr.reference.is_some() || !matches!(e, Expect::Bytes(_)));
    let r = d.for_each_dirty_run(&Job::new(), |_, _| Ok(()));
    match (r, stop) {
        (Ok(()), None) => {}
        (Err(DiffError::Frame { frame, .. }), Some(i))
        | (Err(DiffError::Reference { frame, .. }), Some(i)) => assert_eq!(frame, i),
        (r, stop) => {
            panic!("streaming without a parent ended with {r:?}; expected a stop at {stop:?}")
        }
    }
}

/// Device size, block size, and block ranges in a state.
type Shape = (u64, u32, &'static [(u32, u32, BlockState)]);

const SHAPES: &[Shape] = &[
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

/// Seed data: fills a buffer with the device bytes at an offset.
type Fill<'a> = dyn Fn(u64, &mut [u8]) -> Result<(), DiffError> + 'a;

/// Writes shape `i` as `opts` say with the data `fill` gives.
fn seed_file(dir: &std::path::Path, i: usize, opts: &WriteOptions, fill: &Fill<'_>) -> Vec<u8> {
    seed_file_refs(dir, i, opts, fill, &[])
}

/// [`seed_file`], the dirty blocks `refs` lists as `(block, parent block)` stored as
/// references to the harness's parent state.
fn seed_file_refs(
    dir: &std::path::Path,
    i: usize,
    opts: &WriteOptions,
    fill: &Fill<'_>,
    refs: &[(u64, u64)],
) -> Vec<u8> {
    let (size, bs, ranges) = SHAPES[i];
    let g = Geometry::new(size, bs).expect("seed geometry");
    let mut t = Tracker::new();
    for &(s, e, st) in ranges {
        t.set_range(s, e, st);
    }
    let mut references = References::new();
    for &(b, source) in refs {
        references.push(b, source, crc32c::crc32c(&parent_block(g, source)));
    }
    let p = dir.join(format!(
        "{i}-{}-{}-{}.vsnap",
        opts.version,
        opts.compression,
        refs.len()
    ));
    let parent = if i.is_multiple_of(2) {
        Uuid::nil()
    } else {
        Uuid::from_u128(0x1234)
    };
    let spec = DiffSpec {
        geometry: g,
        generation: i as u64 + 1,
        id: Uuid::from_u128(i as u128 + 1),
        parent,
        tracker: &t,
        references: &references,
    };
    write_diff_spec(&p, false, &spec, &fill, opts, &Job::new()).expect("write seed diff");
    std::fs::read(&p).expect("read seed diff")
}

/// Real diffs, written by `write_diff`, of a few shapes: version 1 (the seeds from before
/// version 2, unchanged), then version 2 raw and zstd-compressed in frames of two blocks, some
/// of them noise that stays raw.
pub fn seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().expect("seed dir");
    let mut out = Vec::new();
    let periodic = |off: u64, buf: &mut [u8]| -> Result<(), DiffError> {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = ((off + j as u64) % 251) as u8 | 1;
        }
        Ok(())
    };
    let v1 = WriteOptions {
        version: VERSION_1,
        compression: Compression::None,
        ..WriteOptions::default()
    };
    for i in 0..SHAPES.len() {
        let file = seed_file(dir.path(), i, &v1, &periodic);
        out.push([&[0u8][..], &file].concat());
        out.push([&[FIX_ALL][..], &file].concat());
    }
    // Checksum chunks smaller than a megabyte: the chunk table has several entries.
    let mut small_chunks = out[0][1..].to_vec();
    small_chunks[112..116].copy_from_slice(&1024u32.to_le_bytes());
    out.push([&[FIX_ALL][..], &small_chunks].concat());

    // Every third block noise (xorshift of its offset), the rest periodic.
    let mixed = |off: u64, buf: &mut [u8]| -> Result<(), DiffError> {
        periodic(off, buf)?;
        for (j, b) in buf.iter_mut().enumerate() {
            let at = off + j as u64;
            if (at / 512) % 3 == 1 {
                let mut x = at.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 32) as u8;
            }
        }
        Ok(())
    };
    for (i, &(_, bs, _)) in SHAPES.iter().enumerate() {
        let raw = WriteOptions::new(Compression::None);
        let zstd = WriteOptions {
            frame_size: 2 * bs,
            ..WriteOptions::new(Compression::Zstd(3))
        };
        debug_assert_eq!(zstd.version, VERSION);
        out.push([&[0u8][..], &seed_file(dir.path(), i, &raw, &mixed)].concat());
        out.push([&[FIX_ALL][..], &seed_file(dir.path(), i, &zstd, &mixed)].concat());
    }
    // References to the parent state (parent dedupe): runs, single blocks, a block copying
    // itself, the short last block; with data frames around them, raw and compressed.
    let with_refs: [(usize, &[(u64, u64)]); 3] = [
        (0, &[(1, 40), (2, 41), (127, 127)]),
        (1, &[(3, 3)]),
        (
            4,
            &[
                (7, 100),
                (64, 0),
                (65, 1),
                (66, 2),
                (67, 3),
                (68, 4),
                (69, 5),
            ],
        ),
    ];
    for (i, refs) in with_refs {
        let bs = SHAPES[i].1;
        let raw = WriteOptions::new(Compression::None);
        let zstd = WriteOptions {
            frame_size: 2 * bs,
            ..WriteOptions::new(Compression::Zstd(3))
        };
        out.push(
            [
                &[0u8][..],
                &seed_file_refs(dir.path(), i, &raw, &mixed, refs),
            ]
            .concat(),
        );
        out.push(
            [
                &[FIX_ALL][..],
                &seed_file_refs(dir.path(), i, &zstd, &mixed, refs),
            ]
            .concat(),
        );
    }
    out
}

pub const DICT: &[&[u8]] = &[
    b"VSNAPDIF",
    b"VSNAPEND",
    &[0x3a, 0x30, 0, 0],
    &[0x3b, 0x30, 0, 0],
    &[0, 2, 0, 0],
    &[0, 0x10, 0, 0],
    // Version 2, the zstd frame magic, index entry kinds and codecs (a reference: kind 1,
    // codec 0).
    &[2, 0, 0, 0],
    &[0x28, 0xb5, 0x2f, 0xfd],
    &[0, 1, 0, 0],
    &[1, 0, 0, 0],
];

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(s: &[u8]) -> (DiffFile, Vec<u8>) {
        let mut f = s[1..].to_vec();
        fix_up(s[0], &mut f);
        let p = scratch_file();
        std::fs::write(&p, &f).unwrap();
        (DiffFile::open(&p).unwrap(), f)
    }

    #[test]
    fn seeds_open_and_verify() {
        let seeds = seeds();
        let mut versions = [0, 0];
        let (mut zstd_frames, mut referenced) = (0, 0);
        for s in &seeds {
            let (d, _) = opened(s);
            d.verify(&Job::new()).unwrap();
            d.verify_in(&Job::new(), &read_parent).unwrap();
            versions[(d.header.version - 1) as usize] += 1;
            zstd_frames += d.data_stats().zstd_frames;
            referenced += d.data_stats().referenced_blocks;
            diff_decode(s);
        }
        assert_eq!(versions, [11, 16]);
        assert!(zstd_frames > 0);
        assert_eq!(referenced, 2 * (3 + 1 + 7));
    }

    #[test]
    fn fix_ups_repair_what_they_cover() {
        let seeds = seeds();
        // Version 1: damage a data byte; verify fails until the chunk table and trailer are
        // recomputed.
        let (d, mut f) = opened(&seeds[0]);
        f[d.header.data_offset() as usize] ^= 0xff;
        let p = scratch_file();
        std::fs::write(&p, &f).unwrap();
        let e = DiffFile::open(&p).unwrap().verify(&Job::new()).unwrap_err();
        assert!(matches!(e, DiffError::Frame { frame: 0, .. }), "{e}");
        fix_up(FIX_CHUNKS | FIX_TRAILER, &mut f);
        std::fs::write(&p, &f).unwrap();
        DiffFile::open(&p).unwrap().verify(&Job::new()).unwrap();

        // Version 2: grow a compressed frame by a byte; open fails until sizes, entries and
        // trailer are fixed, and then the damaged frame is what verify names.
        let s = seeds
            .iter()
            .find(|s| opened(s).0.data_stats().zstd_frames > 1)
            .expect("a seed with compressed frames");
        let (d, f) = opened(s);
        let fr = *d
            .frames()
            .iter()
            .find(|fr| fr.codec == Codec::Zstd)
            .unwrap();
        let i = d.frames().iter().position(|x| *x == fr).unwrap();
        let at = (fr.stored_offset + u64::from(fr.stored_len)) as usize;
        let mut g = [&f[..at], &[0u8][..], &f[at..]].concat();
        let ix = g.len() - v2::TRAILER_LEN as usize - d.frames().len() * v2::ENTRY_LEN as usize;
        let e = ix + i * v2::ENTRY_LEN as usize;
        put32(&mut g, e + 24, fr.stored_len + 1);
        std::fs::write(&p, &g).unwrap();
        assert!(DiffFile::open(&p).is_err());
        fix_up(FIX_SIZE | FIX_CHUNKS | FIX_TRAILER, &mut g);
        std::fs::write(&p, &g).unwrap();
        let e = DiffFile::open(&p).unwrap().verify(&Job::new()).unwrap_err();
        assert!(
            matches!(e, DiffError::Frame { frame, .. } if frame == i),
            "{e}"
        );
    }

    #[test]
    fn references_resolve_against_the_harness_parent_and_damage_is_named() {
        let seeds = seeds();
        let s = seeds
            .iter()
            .find(|s| {
                let d = opened(s).0;
                d.data_stats().referenced_blocks > 1 && d.data_stats().zstd_frames == 0
            })
            .expect("a raw seed with references");
        let (d, f) = opened(s);
        let i = d
            .frames()
            .iter()
            .position(|fr| fr.reference.is_some())
            .unwrap();
        let fr = d.frames()[i];
        // A recorded block checksum changed, the entry's own made to agree: the diff alone
        // cannot tell, the parent can.
        let mut g = f.clone();
        let at = fr.stored_offset as usize;
        g[at] ^= 1;
        let p = scratch_file();
        std::fs::write(&p, &g).unwrap();
        assert!(matches!(
            DiffFile::open(&p).unwrap().verify(&Job::new()),
            Err(DiffError::Frame { .. })
        ));
        let mut fixed = g.clone();
        fix_up(FIX_TRAILER, &mut fixed);
        let ix = fixed.len() - v2::TRAILER_LEN as usize - d.frames().len() * v2::ENTRY_LEN as usize;
        let e = ix + i * v2::ENTRY_LEN as usize;
        let list: Vec<u32> = fixed[at..at + fr.stored_len as usize]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let stored_crc = crc32c::crc32c(&fixed[at..at + fr.stored_len as usize]);
        put32(&mut fixed, e + 28, stored_crc);
        put32(&mut fixed, e + 32, combine_crcs(list, d.geometry().bs()));
        fix_up(FIX_TRAILER, &mut fixed);
        std::fs::write(&p, &fixed).unwrap();
        let damaged = DiffFile::open(&p).unwrap();
        damaged.verify(&Job::new()).unwrap();
        let r = damaged.verify_in(&Job::new(), &read_parent);
        assert!(
            matches!(r, Err(DiffError::Reference { frame, problem: RefProblem::Mismatch { .. }, .. }) if frame == i),
            "{r:?}"
        );
        diff_decode(&[&[0u8][..], &fixed].concat());
        // The chunk fix-up makes it agree with the parent again.
        let mut again = fixed.clone();
        fix_up(FIX_CHUNKS | FIX_TRAILER, &mut again);
        std::fs::write(&p, &again).unwrap();
        DiffFile::open(&p)
            .unwrap()
            .verify_in(&Job::new(), &read_parent)
            .unwrap();
    }
}
