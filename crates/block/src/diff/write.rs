//! Writing a diff: header, bitmaps, the dirty data (version 2: frames, compressed or raw, and
//! references to parent-state blocks, then their index; version 1: raw data, then per-chunk
//! checksums), trailer; to a temporary file that is fsynced and renamed, so a crash never leaves
//! a file that parses.

use std::io::{BufWriter, Write};
use std::path::Path;

use uuid::Uuid;

use super::format::{DiffHeader, FRAME_SIZE, MAX_FRAME_SIZE, VERSION, VERSION_1};
use super::frame::{combine_crcs, Codec, Compression, Frame, FrameEncoder};
use super::{v1, v2, DiffError, DiffIo};
use crate::fsutil::AtomicFile;
use crate::geometry::{zero_past_end, Geometry};
use crate::job::Job;
use crate::tracker::{runs, Tracker};

/// Where the bytes of dirty blocks come from: fills `buf` with device bytes at `offset`. The
/// bytes of blocks stored as references are not needed: only a source that
/// [`reads_any_block`](BlockSource::reads_any_block) is asked for a span holding some.
pub trait BlockSource {
    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError>;
    /// True if any block may be read, not only dirty ones; nearby runs are then fetched with one
    /// read (a layer file: its holes read as zeros, without allocating, even on tmpfs).
    fn reads_any_block(&self) -> bool {
        false
    }
}

impl<F: Fn(u64, &mut [u8]) -> Result<(), DiffError>> BlockSource for F {
    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        self(offset, buf)
    }
}

/// How a diff is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// [`VERSION`], or [`VERSION_1`] for readers older than version 2 (raw data only).
    pub version: u32,
    pub compression: Compression,
    /// Raw bytes per frame (version 1: per checksum chunk): a multiple of the block size, at
    /// most [`MAX_FRAME_SIZE`]. Smaller frames make a random read cheaper (a block costs its
    /// frame) and compress a little worse.
    pub frame_size: u32,
    /// Threads compressing frames at once (1: the writing thread only).
    pub threads: usize,
    /// Parent dedupe, for exports of a disk's generation: each dirty block whose bytes the
    /// parent state (the disk below the generation) already holds is stored as a reference to
    /// that block, found through the state directory's hash index and verified byte for byte.
    /// On by default. Version 1 cannot hold references: it ignores this, as do writers that
    /// have no parent state (`squash` keeps the references its inputs make, re-pointed at the
    /// result's parent, either way).
    pub dedupe: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            version: VERSION,
            compression: Compression::DEFAULT,
            frame_size: FRAME_SIZE,
            threads: 1,
            dedupe: true,
        }
    }
}

impl WriteOptions {
    pub fn new(compression: Compression) -> Self {
        Self {
            compression,
            ..Self::default()
        }
    }

    fn check(&self, g: Geometry, data_len: u64, entries: u64) -> Result<(), DiffError> {
        let bad = |m: String| Err(DiffError::Options(m));
        match (self.version, self.compression) {
            (VERSION, _) | (VERSION_1, Compression::None) => {}
            (VERSION_1, c) => return bad(format!("version 1 stores data raw, not as {c}")),
            (v, _) => return bad(format!("no diff version {v}")),
        }
        let fs = self.frame_size;
        if fs == 0 || fs > MAX_FRAME_SIZE || !fs.is_multiple_of(g.block_size) {
            return bad(format!(
                "frame size {fs} is not a multiple of the block size {} up to {MAX_FRAME_SIZE}",
                g.block_size
            ));
        }
        if self.version == VERSION && entries > v2::MAX_FRAMES {
            return bad(format!(
                "frames of {fs} bytes: {entries}, more than {}, for {data_len} bytes",
                v2::MAX_FRAMES
            ));
        }
        if self.threads == 0 {
            return bad("no compression threads".into());
        }
        Ok(())
    }
}

/// The dirty blocks a diff stores as references: copies of parent-state blocks (the disk
/// exactly as it is below the diff), each with the CRC-32C of its bytes (a whole block,
/// zero-padded past the device end). Kept as runs of consecutive blocks copying consecutive
/// parent blocks, one index entry per run (split at the frame size); 4 bytes a block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct References {
    runs: Vec<RefRun>,
    crcs: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RefRun {
    block: u64,
    len: u64,
    source: u64,
    /// Index of the run's first checksum in `crcs`.
    crc: usize,
}

impl References {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds dirty block `block` as a copy of parent block `source`, whose bytes have CRC-32C
    /// `crc`. Blocks are added in ascending order; a block that continues the last run (the
    /// next block, copying the next parent block) joins it.
    ///
    /// # Panics
    /// If `block` is not above every block added before.
    pub fn push(&mut self, block: u64, source: u64, crc: u32) {
        if let Some(last) = self.runs.last_mut() {
            assert!(
                block >= last.block + last.len,
                "references are added in ascending block order"
            );
            if block == last.block + last.len && last.source.checked_add(last.len) == Some(source) {
                last.len += 1;
                self.crcs.push(crc);
                return;
            }
        }
        self.runs.push(RefRun {
            block,
            len: 1,
            source,
            crc: self.crcs.len(),
        });
        self.crcs.push(crc);
    }

    /// Blocks stored as references.
    pub fn blocks(&self) -> u64 {
        self.crcs.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The runs, as (first block, parent block it copies, the blocks' checksums).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64, &[u32])> + '_ {
        self.runs
            .iter()
            .map(|r| (r.block, r.source, &self.crcs[r.crc..r.crc + r.len as usize]))
    }

    /// Each run lies inside the dirty set and names parent blocks of the device.
    fn check(&self, dirty: &roaring::RoaringBitmap, blocks: u64) -> Result<(), DiffError> {
        for r in &self.runs {
            let end = r.block + r.len;
            let in_dirty = end <= blocks
                && dirty.contains_range(Geometry::idx(r.block)..=Geometry::idx(end - 1));
            if !in_dirty || r.source.checked_add(r.len).is_none_or(|e| e > blocks) {
                return Err(DiffError::Options(format!(
                    "a reference of blocks {}..{end} to {}.. is not of dirty blocks of the device",
                    r.block, r.source
                )));
            }
        }
        Ok(())
    }

    /// True when a version-2 diff of `dirty` with these references in frames of `frame_size`
    /// bytes stays within the index entries a reader accepts.
    pub(crate) fn fits(
        &self,
        dirty: &roaring::RoaringBitmap,
        frame_size: u32,
        g: Geometry,
    ) -> bool {
        let per_frame = (u64::from(frame_size) / g.bs()).max(1);
        self.entries(dirty, per_frame) <= v2::MAX_FRAMES
    }

    /// Index entries a version-2 diff of `dirty` with these references takes in frames of
    /// `per_frame` blocks: each run its own entries, the data between runs (in rank order) cut
    /// into frames afresh.
    fn entries(&self, dirty: &roaring::RoaringBitmap, per_frame: u64) -> u64 {
        let (mut n, mut next_rank) = (0, 0);
        for r in &self.runs {
            let rank = dirty.rank(Geometry::idx(r.block)) - 1;
            n += (rank - next_rank).div_ceil(per_frame) + r.len.div_ceil(per_frame);
            next_rank = rank + r.len;
        }
        n + (dirty.len() - next_rank).div_ceil(per_frame)
    }
}

/// What a diff holds: its identity and place in the chain, the blocks' states, and which dirty
/// blocks are references.
#[derive(Clone, Copy, Debug)]
pub struct DiffSpec<'a> {
    pub geometry: Geometry,
    pub generation: u64,
    pub id: Uuid,
    /// The diff it applies on top of (nil: the base image); references name blocks of the disk
    /// that diff leaves.
    pub parent: Uuid,
    pub tracker: &'a Tracker,
    pub references: &'a References,
}

/// Dirty runs merged into spans read at once: runs closer than `MAX_GAP` blocks join a span of
/// at most `MAX_SPAN` bytes. Each span lists its runs.
const MAX_GAP: u64 = 16;
const MAX_SPAN: u64 = 1 << 20;

/// `(first block, end block, runs inside)`
type Span = (u64, u64, Vec<(u64, u64)>);

fn spans(dirty: &roaring::RoaringBitmap, bs: u64, merge: bool) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::new();
    for (s, e) in runs(dirty) {
        let s = u64::from(s);
        match out.last_mut() {
            Some(last) if merge && s - last.1 <= MAX_GAP && (e - last.0) * bs <= MAX_SPAN => {
                last.1 = e;
                last.2.push((s, e));
            }
            _ => out.push((s, e, vec![(s, e)])),
        }
    }
    out
}

/// Writes the diff of `tracker` (data read from `source`) to `path`, which must not exist
/// unless `overwrite`. Returns the header written.
#[allow(clippy::too_many_arguments)]
pub fn write_diff(
    path: &Path,
    overwrite: bool,
    geometry: Geometry,
    generation: u64,
    id: Uuid,
    parent: Uuid,
    tracker: &Tracker,
    source: &dyn BlockSource,
    opts: &WriteOptions,
    job: &Job,
) -> Result<DiffHeader, DiffError> {
    let spec = DiffSpec {
        geometry,
        generation,
        id,
        parent,
        tracker,
        references: &References::new(),
    };
    write_diff_spec(path, overwrite, &spec, source, opts, job)
}

/// Writes the diff `spec` describes (data of the blocks that are not references read from
/// `source`) to `path`, which must not exist unless `overwrite`. Returns the header written.
pub fn write_diff_spec(
    path: &Path,
    overwrite: bool,
    spec: &DiffSpec<'_>,
    source: &dyn BlockSource,
    opts: &WriteOptions,
    job: &Job,
) -> Result<DiffHeader, DiffError> {
    let (geometry, refs) = (spec.geometry, spec.references);
    let (dirty, zero) = (spec.tracker.dirty(), spec.tracker.zero());
    let header = DiffHeader {
        version: opts.version,
        geometry,
        generation: spec.generation,
        id: spec.id,
        parent: spec.parent,
        dirty_blocks: dirty.len(),
        zero_blocks: zero.len(),
        dirty_bitmap_len: dirty.serialized_size() as u64,
        zero_bitmap_len: zero.serialized_size() as u64,
        frame_size: opts.frame_size,
    };
    let bs = geometry.bs();
    if !refs.is_empty() && opts.version == VERSION_1 {
        return Err(DiffError::Options(
            "version 1 cannot hold references to parent blocks".into(),
        ));
    }
    refs.check(dirty, geometry.blocks())?;
    let per_frame = (u64::from(opts.frame_size) / bs).max(1);
    opts.check(geometry, header.data_len(), refs.entries(dirty, per_frame))?;
    job.set_total(header.data_len());
    let out = AtomicFile::create(path, overwrite).dctx(|| format!("create {}", path.display()))?;
    let ctx = || format!("write {}", path.display());
    let mut w = BufWriter::with_capacity(1 << 20, &out);
    w.write_all(&header.encode()).dctx(ctx)?;
    let mut bitmaps =
        Vec::with_capacity((header.dirty_bitmap_len + header.zero_bitmap_len) as usize);
    dirty.serialize_into(&mut bitmaps).dctx(ctx)?;
    zero.serialize_into(&mut bitmaps).dctx(ctx)?;
    w.write_all(&bitmaps).dctx(ctx)?;

    // Data: dirty blocks in ascending order, a whole block each (the last block of a device
    // whose size is not a multiple of the block size is zero-padded), cut into frames; a run of
    // references ends the frame being filled and takes entries of its own.
    let mut sink = FrameSink::new(&header, opts)?;
    let mut refs = refs.runs().peekable();
    let mut span_buf = Vec::new();
    for (span_start, span_end, span_runs) in spans(dirty, bs, source.reads_any_block()) {
        let merged = span_runs.len() > 1;
        // Read at the first data block it holds: a span of references alone is never read.
        let mut span_read = false;
        for (start, end) in span_runs {
            let mut b = start;
            while b < end {
                if let Some(&(rb, source, crcs)) = refs.peek().filter(|r| r.0 == b) {
                    // `check` keeps a run inside one run of dirty blocks.
                    sink.reference(source, crcs, &mut w, job, &ctx)?;
                    b = rb + crcs.len() as u64;
                    refs.next();
                    continue;
                }
                let seg_end = refs.peek().map_or(end, |r| r.0.min(end));
                if merged && !span_read {
                    let (a, z) = (span_start * bs, (span_end * bs).min(geometry.size));
                    span_buf.resize((z - a) as usize, 0);
                    source.read_blocks(a, &mut span_buf)?;
                    span_read = true;
                }
                while b < seg_end {
                    let room = sink.room();
                    let n = (seg_end - b).min(room.len() as u64 / bs);
                    let dev = b * bs;
                    let dst = zero_past_end(geometry.size, dev, &mut room[..(n * bs) as usize]);
                    if merged {
                        let o = (dev - span_start * bs) as usize;
                        dst.copy_from_slice(&span_buf[o..o + dst.len()]);
                    } else {
                        source.read_blocks(dev, dst)?;
                    }
                    b += n;
                    sink.filled((n * bs) as usize, &mut w, job, &ctx)?;
                }
            }
        }
    }
    sink.finish(&mut w, crc32c::crc32c(&bitmaps), job, &ctx)?;
    w.flush().dctx(ctx)?;
    drop(w);
    out.commit().dctx(ctx)?;
    Ok(header)
}

/// Cuts the data into frames, encodes them (on up to `threads` threads at once) and writes
/// them in order, keeping the index (version 1: the checksum table) for the end.
struct FrameSink {
    version: u32,
    bs: u64,
    /// Blocks per reference entry at most: the header's frame size.
    ref_blocks: usize,
    /// Raw bytes per frame: the option, or the whole data when it is smaller.
    frame_size: usize,
    /// One encoder and one frame buffer per thread: buffers `..full` hold frames waiting to be
    /// encoded, buffer `full` is being filled (`fill` bytes so far).
    encoders: Vec<FrameEncoder>,
    bufs: Vec<Vec<u8>>,
    full: usize,
    fill: usize,
    table: Vec<u8>,
    frames: u64,
    raw: u64,
    stored_offset: u64,
    data_offset: u64,
}

impl FrameSink {
    fn new(h: &DiffHeader, opts: &WriteOptions) -> Result<Self, DiffError> {
        let frame_size = (opts.frame_size as usize).min(h.data_len() as usize);
        // Threads only help when there is compressing to do, and frames to share.
        let frames = h.data_len().div_ceil(u64::from(opts.frame_size)).max(1);
        let threads = match opts.compression {
            Compression::None => 1,
            Compression::Zstd(_) => opts.threads.min(frames as usize),
        };
        let encoders = (0..threads)
            .map(|_| FrameEncoder::new(opts.compression, frame_size))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            version: opts.version,
            bs: h.geometry.bs(),
            ref_blocks: (opts.frame_size as usize / h.geometry.block_size as usize).max(1),
            frame_size,
            encoders,
            bufs: (0..threads).map(|_| vec![0u8; frame_size]).collect(),
            full: 0,
            fill: 0,
            table: Vec::new(),
            frames: 0,
            raw: 0,
            stored_offset: h.data_offset(),
            data_offset: h.data_offset(),
        })
    }

    /// The unfilled part of the frame being filled.
    fn room(&mut self) -> &mut [u8] {
        &mut self.bufs[self.full][self.fill..]
    }

    /// `n` more bytes of the current frame are filled; a full frame is queued, and once every
    /// buffer is full, all are encoded and written.
    fn filled(
        &mut self,
        n: usize,
        w: &mut impl Write,
        job: &Job,
        ctx: &dyn Fn() -> String,
    ) -> Result<(), DiffError> {
        self.fill += n;
        if self.fill < self.frame_size {
            return Ok(());
        }
        self.full += 1;
        self.fill = 0;
        if self.full < self.bufs.len() {
            return Ok(());
        }
        self.flush(w, job, ctx)
    }

    /// Encodes and writes the queued frames and the partial one.
    fn flush(
        &mut self,
        w: &mut impl Write,
        job: &Job,
        ctx: &dyn Fn() -> String,
    ) -> Result<(), DiffError> {
        let mut lens = vec![self.frame_size; self.full];
        if self.fill > 0 {
            lens.push(self.fill);
        }
        // The writing thread compresses the first frame, one spawned thread each other one.
        let mut jobs = self.encoders.iter_mut().zip(&self.bufs).zip(&lens);
        let ((e0, b0), &len0) = jobs.next().expect("flush has a frame");
        let compressed: Vec<Result<Option<usize>, DiffError>> = std::thread::scope(|s| {
            let others: Vec<_> = jobs
                .map(|((e, b), &len)| s.spawn(move || e.compress(&b[..len])))
                .collect();
            let first = e0.compress(&b0[..len0]);
            std::iter::once(first)
                .chain(
                    others
                        .into_iter()
                        .map(|h| h.join().expect("a frame encoder panicked")),
                )
                .collect()
        });
        for (i, n) in compressed.into_iter().enumerate() {
            let n = n?;
            let raw = &self.bufs[i][..lens[i]];
            let raw_crc = crc32c::crc32c(raw);
            if self.version == VERSION_1 {
                w.write_all(raw).dctx(ctx)?;
                self.table.extend_from_slice(&raw_crc.to_le_bytes());
            } else {
                let (codec, bytes, stored_crc) = match n {
                    Some(n) => {
                        let z = self.encoders[i].output(n);
                        (Codec::Zstd, z, crc32c::crc32c(z))
                    }
                    None => (Codec::Stored, raw, raw_crc),
                };
                let f = Frame {
                    raw_offset: self.raw,
                    raw_len: raw.len() as u32,
                    stored_offset: self.stored_offset,
                    stored_len: bytes.len() as u32,
                    codec,
                    stored_crc,
                    raw_crc,
                    reference: None,
                };
                w.write_all(bytes).dctx(ctx)?;
                self.table.extend_from_slice(&v2::encode_entry(&f));
                self.stored_offset += bytes.len() as u64;
            }
            self.raw += raw.len() as u64;
            self.frames += 1;
            job.advance(raw.len() as u64)?;
        }
        self.full = 0;
        self.fill = 0;
        Ok(())
    }

    /// Writes consecutive dirty blocks copying parent blocks `source ..` with checksums `crcs`
    /// as reference entries (at most a frame's worth of blocks each), after the data before them.
    fn reference(
        &mut self,
        source: u64,
        crcs: &[u32],
        w: &mut impl Write,
        job: &Job,
        ctx: &dyn Fn() -> String,
    ) -> Result<(), DiffError> {
        if self.full > 0 || self.fill > 0 {
            self.flush(w, job, ctx)?;
        }
        let mut source = source;
        let mut list = Vec::new();
        for part in crcs.chunks(self.ref_blocks) {
            list.clear();
            list.extend(part.iter().flat_map(|c| c.to_le_bytes()));
            let raw_len = part.len() as u64 * self.bs;
            let f = Frame {
                raw_offset: self.raw,
                raw_len: raw_len as u32,
                stored_offset: self.stored_offset,
                stored_len: list.len() as u32,
                codec: Codec::Stored,
                stored_crc: crc32c::crc32c(&list),
                raw_crc: combine_crcs(part.iter().copied(), self.bs),
                reference: Some(source),
            };
            w.write_all(&list).dctx(ctx)?;
            self.table.extend_from_slice(&v2::encode_entry(&f));
            self.stored_offset += list.len() as u64;
            self.raw += raw_len;
            self.frames += 1;
            source += part.len() as u64;
            job.advance(raw_len)?;
        }
        Ok(())
    }

    fn finish(
        mut self,
        w: &mut impl Write,
        bitmaps_crc: u32,
        job: &Job,
        ctx: &dyn Fn() -> String,
    ) -> Result<(), DiffError> {
        if self.full > 0 || self.fill > 0 {
            self.flush(w, job, ctx)?;
        }
        w.write_all(&self.table).dctx(ctx)?;
        let table_crc = crc32c::crc32c(&self.table);
        let trailer = match self.version {
            VERSION_1 => v1::encode_trailer(bitmaps_crc, table_crc).to_vec(),
            _ => v2::Trailer {
                stored_len: self.stored_offset - self.data_offset,
                frames: self.frames,
                bitmaps_crc,
                index_crc: table_crc,
            }
            .encode()
            .to_vec(),
        };
        w.write_all(&trailer).dctx(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::DiffFile;
    use crate::tracker::BlockState;

    #[test]
    fn references_coalesce_and_take_the_entries_counted() {
        let mut r = References::new();
        for (b, s) in [(2, 10), (3, 11), (4, 12), (5, 40), (9, 41), (10, 42)] {
            r.push(b, s, b as u32);
        }
        let runs: Vec<(u64, u64, usize)> = r.runs().map(|(b, s, c)| (b, s, c.len())).collect();
        assert_eq!(runs, [(2, 10, 3), (5, 40, 1), (9, 41, 2)]);
        assert_eq!(r.blocks(), 6);

        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::new(64 * 4096, 4096).unwrap();
        let mut t = Tracker::new();
        t.set_range(0, 12, BlockState::Dirty);
        t.set_range(20, 23, BlockState::Dirty);
        let fill = |off: u64, buf: &mut [u8]| -> Result<(), DiffError> {
            buf.fill((off / 4096) as u8 | 1);
            Ok(())
        };
        let spec = DiffSpec {
            geometry: g,
            generation: 1,
            id: Uuid::from_u128(1),
            parent: Uuid::nil(),
            tracker: &t,
            references: &r,
        };
        for frame_blocks in [1u32, 2, 3, 16] {
            let opts = WriteOptions {
                frame_size: frame_blocks * 4096,
                ..WriteOptions::new(Compression::None)
            };
            let p = dir.path().join(format!("{frame_blocks}.diff"));
            write_diff_spec(&p, false, &spec, &fill, &opts, &Job::new()).unwrap();
            let d = DiffFile::open(&p).unwrap();
            assert_eq!(
                d.frames().len() as u64,
                r.entries(t.dirty(), u64::from(frame_blocks))
            );
            assert_eq!(d.data_stats().referenced_blocks, 6);
            assert_eq!(d.reference_at(10).unwrap().map(|x| x.0), Some(42));
            assert_eq!(d.reference_at(1).unwrap(), None);
        }
        // Outside the dirty blocks, or naming blocks past the device: refused.
        for (b, s) in [(12, 0), (0, 63), (0, u64::MAX)] {
            let mut bad = References::new();
            bad.push(b, s, 0);
            bad.push(b + 1, s.wrapping_add(1), 0);
            let spec = DiffSpec {
                references: &bad,
                ..spec
            };
            let p = dir.path().join("bad.diff");
            let opts = WriteOptions::new(Compression::None);
            let e = write_diff_spec(&p, true, &spec, &fill, &opts, &Job::new()).unwrap_err();
            assert!(matches!(e, DiffError::Options(_)), "{e}");
            assert!(!p.exists());
        }
    }
}
