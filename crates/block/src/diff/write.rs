//! Writing a diff: header, bitmaps, the dirty data (version 2: frames, compressed or raw, then
//! their index; version 1: raw data, then per-chunk checksums), trailer; to a temporary file that
//! is fsynced and renamed, so a crash never leaves a file that parses.

use std::io::{BufWriter, Write};
use std::path::Path;

use uuid::Uuid;

use super::format::{DiffHeader, FRAME_SIZE, MAX_FRAME_SIZE, VERSION, VERSION_1};
use super::frame::{Codec, Compression, Frame, FrameEncoder};
use super::{v1, v2, DiffError, DiffIo};
use crate::fsutil::AtomicFile;
use crate::geometry::Geometry;
use crate::job::Job;
use crate::tracker::{runs, Tracker};

/// Where the bytes of dirty blocks come from: fills `buf` with device bytes at `offset`.
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
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            version: VERSION,
            compression: Compression::DEFAULT,
            frame_size: FRAME_SIZE,
            threads: 1,
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

    fn check(&self, g: Geometry, data_len: u64) -> Result<(), DiffError> {
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
        if self.version == VERSION && data_len.div_ceil(u64::from(fs)) > v2::MAX_FRAMES {
            return bad(format!(
                "frames of {fs} bytes: more than {} for {data_len} bytes",
                v2::MAX_FRAMES
            ));
        }
        if self.threads == 0 {
            return bad("no compression threads".into());
        }
        Ok(())
    }
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
    let (dirty, zero) = (tracker.dirty(), tracker.zero());
    let header = DiffHeader {
        version: opts.version,
        geometry,
        generation,
        id,
        parent,
        dirty_blocks: dirty.len(),
        zero_blocks: zero.len(),
        dirty_bitmap_len: dirty.serialized_size() as u64,
        zero_bitmap_len: zero.serialized_size() as u64,
        frame_size: opts.frame_size,
    };
    opts.check(geometry, header.data_len())?;
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
    // whose size is not a multiple of the block size is zero-padded), cut into frames.
    let bs = geometry.bs();
    let mut sink = FrameSink::new(&header, opts)?;
    let mut span_buf = Vec::new();
    for (span_start, span_end, span_runs) in spans(dirty, bs, source.reads_any_block()) {
        let merged = span_runs.len() > 1;
        if merged {
            let (a, b) = (span_start * bs, (span_end * bs).min(geometry.size));
            span_buf.resize((b - a) as usize, 0);
            source.read_blocks(a, &mut span_buf)?;
        }
        for (start, end) in span_runs {
            let mut b = start;
            while b < end {
                let room = sink.room();
                let n = (end - b).min(room.len() as u64 / bs);
                let dev = b * bs;
                let dev_end = ((b + n) * bs).min(geometry.size);
                let dst = &mut room[..(n * bs) as usize];
                let valid = (dev_end - dev) as usize;
                if merged {
                    let o = (dev - span_start * bs) as usize;
                    dst[..valid].copy_from_slice(&span_buf[o..o + valid]);
                } else {
                    source.read_blocks(dev, &mut dst[..valid])?;
                }
                dst[valid..].fill(0);
                b += n;
                sink.filled((n * bs) as usize, &mut w, job, &ctx)?;
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
