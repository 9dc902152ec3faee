//! Opening a diff (either version) with strict validation, and reading its blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::cache::FrameCache;
use super::format::{DiffHeader, HEADER_LEN, VERSION_1};
use super::frame::{decode_frame, Codec, Frame};
use super::{v1, v2, DiffError, DiffIo};
use crate::geometry::Geometry;
use crate::job::Job;
use crate::tracker::{runs, BlockState, Tracker};

/// An open, structurally validated diff. Data checksums are checked by [`DiffFile::verify`],
/// while streaming with [`DiffFile::for_each_dirty_run`], and for every compressed frame
/// [`DiffFile::read_stored`] decodes.
pub struct DiffFile {
    file: File,
    path: PathBuf,
    pub header: DiffHeader,
    tracker: Tracker,
    /// The data section as frames, in raw order (a version-1 chunk is a raw frame).
    frames: Vec<Frame>,
    file_len: u64,
    cache: FrameCache,
}

/// What the data section costs, as `vsnap diff inspect` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataStats {
    /// Raw bytes of the dirty blocks.
    pub raw_bytes: u64,
    /// Bytes the data section takes in the file.
    pub stored_bytes: u64,
    pub frames: u64,
    /// Frames stored compressed (the others are raw).
    pub zstd_frames: u64,
}

impl DiffFile {
    pub fn open(path: &Path) -> Result<Self, DiffError> {
        let file = File::open(path).dctx(|| format!("open {}", path.display()))?;
        let actual = file
            .metadata()
            .dctx(|| format!("stat {}", path.display()))?
            .len();
        let read = |off: u64, len: u64| -> Result<Vec<u8>, DiffError> {
            let mut v = vec![0u8; len as usize];
            file.read_exact_at(&mut v, off)
                .dctx(|| format!("read {}", path.display()))?;
            Ok(v)
        };
        let mut hbuf = [0u8; HEADER_LEN];
        let n = read_full(&file, &mut hbuf, 0).dctx(|| format!("read {}", path.display()))?;
        let header = DiffHeader::decode(&hbuf[..n])?;
        // Every length is checked against the file before anything is allocated from it.
        let (frames, bitmaps_crc) = if header.version == VERSION_1 {
            // The chunk table becomes frames in memory: as bounded as a version-2 index.
            if v1::chunks(&header) > v2::MAX_FRAMES {
                return Err(DiffError::Corrupt(format!(
                    "{} checksum chunks (at most {})",
                    v1::chunks(&header),
                    v2::MAX_FRAMES
                )));
            }
            let expected = v1::file_len(&header);
            if expected != actual {
                return Err(DiffError::Length { expected, actual });
            }
            let table = read(v1::chunk_table_offset(&header), 4 * v1::chunks(&header))?;
            let (bitmaps_crc, table_crc) =
                v1::decode_trailer(&read(actual - v1::TRAILER_LEN, v1::TRAILER_LEN)?)?;
            if crc32c::crc32c(&table) != table_crc {
                return Err(DiffError::Checksum("chunk checksum table"));
            }
            (v1::frames(&header, &table), bitmaps_crc)
        } else {
            if actual < header.data_offset() + v2::TRAILER_LEN {
                return Err(DiffError::NoTrailer);
            }
            let t = v2::Trailer::decode(&read(actual - v2::TRAILER_LEN, v2::TRAILER_LEN)?)?;
            let expected = t.file_len(&header)?;
            if expected != actual {
                return Err(DiffError::Length { expected, actual });
            }
            (read_index(&file, path, &header, &t)?, t.bitmaps_crc)
        };
        let bitmaps = read(
            HEADER_LEN as u64,
            header.dirty_bitmap_len + header.zero_bitmap_len,
        )?;
        if crc32c::crc32c(&bitmaps) != bitmaps_crc {
            return Err(DiffError::Checksum("bitmaps"));
        }
        let tracker = parse_bitmaps(&header, &bitmaps)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            header,
            tracker,
            frames,
            file_len: actual,
            cache: FrameCache::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.header.geometry
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn state(&self, block: u64) -> BlockState {
        self.tracker.state(Geometry::idx(block))
    }

    /// The data section's frames, in order.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    pub fn data_stats(&self) -> DataStats {
        DataStats {
            raw_bytes: self.header.data_len(),
            stored_bytes: self.frames.iter().map(|f| u64::from(f.stored_len)).sum(),
            frames: self.frames.len() as u64,
            zstd_frames: self
                .frames
                .iter()
                .filter(|f| f.codec == Codec::Zstd)
                .count() as u64,
        }
    }

    /// Reads device bytes `[offset, offset + buf.len())`, all inside consecutive dirty blocks of
    /// this diff (consecutive dirty blocks are consecutive in the raw data, so one call serves a
    /// run). A compressed frame is decoded whole, checked and kept for the next reads; raw bytes
    /// are read in place, as version 1 always did, and checked by [`DiffFile::verify`].
    pub fn read_stored(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        let bs = self.header.geometry.bs();
        let block = offset / bs;
        let rank = self.tracker.dirty().rank(Geometry::idx(block));
        if rank == 0 || !self.tracker.dirty().contains(Geometry::idx(block)) {
            return Err(DiffError::Corrupt(format!(
                "block {block} is not stored in this diff"
            )));
        }
        let mut pos = (rank - 1) * bs + offset % bs;
        if pos + buf.len() as u64 > self.header.data_len() {
            return Err(DiffError::Corrupt(format!(
                "a read of {} bytes at block {block} runs past the stored data",
                buf.len()
            )));
        }
        let mut i = self.frames.partition_point(|f| f.raw_end() <= pos);
        let mut done = 0usize;
        while done < buf.len() {
            let f = &self.frames[i];
            let within = (pos - f.raw_offset) as usize;
            let n = (f.raw_len as usize - within).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match f.codec {
                Codec::Stored => self
                    .file
                    .read_exact_at(dst, f.stored_offset + within as u64)
                    .dctx(|| format!("read {}", self.path.display()))?,
                Codec::Zstd => {
                    let raw = match self.cache.get(i) {
                        Some(r) => r,
                        None => {
                            let r = self.decode(i)?;
                            self.cache.put(i, r.clone());
                            r
                        }
                    };
                    dst.copy_from_slice(&raw[within..within + n]);
                }
            }
            done += n;
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }

    /// Frame `i`'s raw bytes, read, checked and decompressed.
    fn decode(&self, i: usize) -> Result<Arc<[u8]>, DiffError> {
        let f = &self.frames[i];
        let mut stored = vec![0u8; f.stored_len as usize];
        self.read_frame(f, &mut stored)?;
        let mut raw = vec![0u8; f.raw_len as usize];
        decode_frame(i, f, &stored, &mut raw)?;
        Ok(raw.into())
    }

    fn read_frame(&self, f: &Frame, stored: &mut [u8]) -> Result<(), DiffError> {
        self.file
            .read_exact_at(stored, f.stored_offset)
            .dctx(|| format!("read {}", self.path.display()))
    }

    /// Streams the data section in order, checking every frame's checksums (and decompressing
    /// it), and hands each run of consecutive dirty blocks to `f` as (device offset, bytes
    /// clipped to the device end).
    pub fn for_each_dirty_run(
        &self,
        job: &Job,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), DiffError>,
    ) -> Result<(), DiffError> {
        let g = self.header.geometry;
        let bs = g.bs();
        let max = |len: fn(&Frame) -> u32| {
            self.frames
                .iter()
                .map(|f| len(f) as usize)
                .max()
                .unwrap_or(0)
        };
        let mut stored = vec![0u8; max(|f| f.stored_len)];
        let zstd = self.frames.iter().any(|f| f.codec == Codec::Zstd);
        let mut scratch = vec![0u8; if zstd { max(|f| f.raw_len) } else { 0 }];
        let mut runs = runs(self.tracker.dirty()).peekable();
        // The current run, as (next block to hand out, end).
        let mut cur: Option<(u64, u64)> = None;
        for (i, frame) in self.frames.iter().enumerate() {
            let s = &mut stored[..frame.stored_len as usize];
            self.read_frame(frame, s)?;
            let data = decode_frame(i, frame, s, &mut scratch)?;
            let mut left = u64::from(frame.raw_len) / bs;
            let mut pos = 0usize;
            while left > 0 {
                let (start, end) = match cur {
                    Some(r) if r.0 < r.1 => r,
                    _ => {
                        let (s, e) = runs.next().ok_or_else(|| {
                            DiffError::Corrupt("more data than dirty blocks".into())
                        })?;
                        (u64::from(s), e)
                    }
                };
                let n = (end - start).min(left);
                let dev = start * bs;
                let dev_end = ((start + n) * bs).min(g.size);
                f(dev, &data[pos..pos + (dev_end - dev) as usize])?;
                pos += (n * bs) as usize;
                left -= n;
                cur = Some((start + n, end));
            }
            job.advance(u64::from(frame.raw_len))?;
        }
        Ok(())
    }

    /// Checks every data frame against its checksums.
    pub fn verify(&self, job: &Job) -> Result<(), DiffError> {
        self.for_each_dirty_run(job, |_, _| Ok(()))
    }
}

/// Reads and checks a version-2 frame index: its checksum first (streamed, nothing held), then
/// each entry against the one before. Memory grows only with entries actually read.
fn read_index(
    file: &File,
    path: &Path,
    h: &DiffHeader,
    t: &v2::Trailer,
) -> Result<Vec<Frame>, DiffError> {
    const PIECE: u64 = 1024 * v2::ENTRY_LEN;
    let start = h.data_offset() + t.stored_len;
    let len = t.frames * v2::ENTRY_LEN;
    let mut buf = vec![0u8; len.min(PIECE) as usize];
    let mut each_piece = |g: &mut dyn FnMut(&[u8]) -> Result<(), DiffError>| {
        let mut off = 0;
        while off < len {
            let b = &mut buf[..(len - off).min(PIECE) as usize];
            file.read_exact_at(b, start + off)
                .dctx(|| format!("read {}", path.display()))?;
            g(b)?;
            off += b.len() as u64;
        }
        Ok::<_, DiffError>(())
    };
    let mut crc = 0u32;
    each_piece(&mut |b| {
        crc = crc32c::crc32c_append(crc, b);
        Ok(())
    })?;
    if crc != t.index_crc {
        return Err(DiffError::Checksum("frame index"));
    }
    let mut frames = Vec::with_capacity(t.frames.min(1024) as usize);
    let mut r = v2::IndexReader::new(h, t);
    each_piece(&mut |b| {
        for e in b.chunks_exact(v2::ENTRY_LEN as usize) {
            frames.push(r.entry(e)?);
        }
        Ok(())
    })?;
    r.finish()?;
    Ok(frames)
}

fn parse_bitmaps(h: &DiffHeader, bitmaps: &[u8]) -> Result<Tracker, DiffError> {
    let (d, z) = bitmaps.split_at(h.dirty_bitmap_len as usize);
    let parse = |b: &[u8], what: &str| {
        let bm = RoaringBitmap::deserialize_from(b)
            .map_err(|e| DiffError::Corrupt(format!("{what} bitmap: {e}")))?;
        if bm.serialized_size() != b.len() {
            return Err(DiffError::Corrupt(format!(
                "{what} bitmap has trailing bytes"
            )));
        }
        Ok(bm)
    };
    let (dirty, zero) = (parse(d, "dirty")?, parse(z, "zero")?);
    if dirty.len() != h.dirty_blocks || zero.len() != h.zero_blocks {
        return Err(DiffError::Corrupt(
            "bitmap counts disagree with the header".into(),
        ));
    }
    let blocks = h.geometry.blocks();
    if [dirty.max(), zero.max()]
        .into_iter()
        .flatten()
        .any(|m| u64::from(m) >= blocks)
    {
        return Err(DiffError::Corrupt(
            "bitmap names blocks past the device end".into(),
        ));
    }
    Tracker::from_bitmaps(dirty, zero)
        .ok_or_else(|| DiffError::Corrupt("a block is both dirty and zero".into()))
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}
