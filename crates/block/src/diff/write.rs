//! Writing a diff: header, bitmaps, packed dirty data with per-chunk checksums, trailer; to a
//! temporary file that is fsynced and renamed, so a crash never leaves a file that parses.

use std::io::{BufWriter, Write};
use std::path::Path;

use uuid::Uuid;

use super::format::{encode_trailer, DiffHeader, CHUNK_SIZE};
use super::{DiffError, DiffIo};
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
    job: &Job,
) -> Result<DiffHeader, DiffError> {
    let (dirty, zero) = (tracker.dirty(), tracker.zero());
    let header = DiffHeader {
        geometry,
        generation,
        id,
        parent,
        dirty_blocks: dirty.len(),
        zero_blocks: zero.len(),
        dirty_bitmap_len: dirty.serialized_size() as u64,
        zero_bitmap_len: zero.serialized_size() as u64,
        chunk_size: CHUNK_SIZE,
    };
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
    // whose size is not a multiple of the block size is zero-padded).
    let bs = geometry.bs();
    let chunk = CHUNK_SIZE as usize;
    let mut buf = vec![0u8; chunk];
    let mut fill = 0usize;
    let mut table = Vec::with_capacity(header.chunks() as usize * 4);
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
                let n = (end - b).min(((chunk - fill) as u64) / bs);
                let dev = b * bs;
                let dev_end = ((b + n) * bs).min(geometry.size);
                let dst = &mut buf[fill..fill + (n * bs) as usize];
                let valid = (dev_end - dev) as usize;
                if merged {
                    let o = (dev - span_start * bs) as usize;
                    dst[..valid].copy_from_slice(&span_buf[o..o + valid]);
                } else {
                    source.read_blocks(dev, &mut dst[..valid])?;
                }
                dst[valid..].fill(0);
                fill += (n * bs) as usize;
                b += n;
                if fill == chunk {
                    table.extend_from_slice(&crc32c::crc32c(&buf).to_le_bytes());
                    w.write_all(&buf).dctx(ctx)?;
                    job.advance(chunk as u64)?;
                    fill = 0;
                }
            }
        }
    }
    if fill > 0 {
        table.extend_from_slice(&crc32c::crc32c(&buf[..fill]).to_le_bytes());
        w.write_all(&buf[..fill]).dctx(ctx)?;
        job.advance(fill as u64)?;
    }
    w.write_all(&table).dctx(ctx)?;
    w.write_all(&encode_trailer(
        crc32c::crc32c(&bitmaps),
        crc32c::crc32c(&table),
    ))
    .dctx(ctx)?;
    w.flush().dctx(ctx)?;
    drop(w);
    out.commit().dctx(ctx)?;
    Ok(header)
}
