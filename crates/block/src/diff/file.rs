//! Opening a diff (either version) with strict validation, and reading its blocks: data from
//! its frames, references from the parent state the caller supplies.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use roaring::RoaringBitmap;

use super::cache::FrameCache;
use super::chain::ParentState;
use super::format::{DiffHeader, HEADER_LEN, VERSION_1};
use super::frame::{combine_crcs, decode_frame, Codec, Frame, FrameProblem};
use super::{v1, v2, DiffError, DiffIo, RefProblem};
use crate::geometry::{zero_past_end, Geometry};
use crate::job::Job;
use crate::tracker::{runs, BlockState, Tracker};

/// An open, structurally validated diff. Data checksums are checked by [`DiffFile::verify`],
/// while streaming with [`DiffFile::for_each_piece`] (and the run iterators over it), and for
/// every compressed frame a random read decodes. References (blocks stored as copies of
/// parent-state blocks) are resolved by the readers given a [`ParentState`], each block checked
/// against its recorded checksum when streamed.
pub struct DiffFile {
    file: File,
    path: PathBuf,
    pub header: DiffHeader,
    tracker: Tracker,
    /// The data section as frames, in raw order (a version-1 chunk is a raw frame).
    frames: Vec<Frame>,
    /// Some frame is a reference: reading needs the parent state.
    references: bool,
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
    /// Frames stored compressed (the others are raw or references).
    pub zstd_frames: u64,
    /// Dirty blocks stored as references to parent-state blocks (parent dedupe): their bytes
    /// are not in the file, only a 4-byte checksum each.
    pub referenced_blocks: u64,
    /// Index entries that are references.
    pub reference_frames: u64,
}

impl DataStats {
    /// Raw bytes per stored byte (1 when nothing is stored).
    pub fn compression_ratio(&self) -> f64 {
        if self.stored_bytes == 0 {
            1.0
        } else {
            self.raw_bytes as f64 / self.stored_bytes as f64
        }
    }
}

/// A piece of the dirty data, as [`DiffFile::for_each_piece`] streams it: consecutive dirty
/// blocks, either stored here or copies of consecutive parent-state blocks.
#[derive(Clone, Copy, Debug)]
pub enum Piece<'a> {
    /// The blocks' bytes, clipped to the device end.
    Data(&'a [u8]),
    /// The blocks are copies of parent blocks `source ..`; `crcs` holds each one's CRC-32C (of
    /// a whole block, zero-padded past the device end), one per block. `frame` names the index
    /// entry in errors.
    Reference {
        frame: usize,
        source: u64,
        crcs: &'a [u32],
    },
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
            references: frames.iter().any(|f| f.reference.is_some()),
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
        let refs = || self.frames.iter().filter(|f| f.reference.is_some());
        DataStats {
            raw_bytes: self.header.data_len(),
            stored_bytes: self.frames.iter().map(|f| u64::from(f.stored_len)).sum(),
            frames: self.frames.len() as u64,
            zstd_frames: self
                .frames
                .iter()
                .filter(|f| f.codec == Codec::Zstd)
                .count() as u64,
            referenced_blocks: refs().map(|f| u64::from(f.raw_len)).sum::<u64>()
                / self.header.geometry.bs(),
            reference_frames: refs().count() as u64,
        }
    }

    /// True when some dirty blocks are references: reading them needs the parent state.
    pub fn has_references(&self) -> bool {
        self.references
    }

    /// Reads device bytes `[offset, offset + buf.len())`, all inside consecutive dirty blocks of
    /// this diff (consecutive dirty blocks are consecutive in the raw data, so one call serves a
    /// run), when none of them is a reference (see [`DiffFile::read_resolved`]). A compressed
    /// frame is decoded whole, checked and kept for the next reads; raw bytes are read in
    /// place, as version 1 always did, and checked by [`DiffFile::verify`].
    pub fn read_stored(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        let mut reference = None;
        self.read_or_redirect(offset, buf, &mut |_, source| {
            reference.get_or_insert(source);
        })?;
        match reference {
            None => Ok(()),
            Some(source) => Err(self.no_parent(offset, source)),
        }
    }

    /// [`DiffFile::read_stored`], with the bytes of references read from `parent` (in place,
    /// unchecked, as raw frames are: [`DiffFile::verify_in`] checks them).
    pub fn read_resolved(
        &self,
        offset: u64,
        buf: &mut [u8],
        parent: &dyn ParentState,
    ) -> Result<(), DiffError> {
        let mut redirects = Vec::new();
        self.read_or_redirect(offset, buf, &mut |r, source| redirects.push((r, source)))?;
        let size = self.header.geometry.size;
        for (r, source) in redirects {
            parent.read_parent(source, zero_past_end(size, source, &mut buf[r]))?;
        }
        Ok(())
    }

    /// The reading under both: data bytes into `buf`; for bytes of references, `redirect` is
    /// told which part of `buf` they are and the parent-state device offset they copy (which
    /// may run past the device end of a short last block: those bytes read as zero).
    pub(crate) fn read_or_redirect(
        &self,
        offset: u64,
        buf: &mut [u8],
        redirect: &mut dyn FnMut(Range<usize>, u64),
    ) -> Result<(), DiffError> {
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
            match (f.reference, f.codec) {
                // Consecutive blocks of one entry copy consecutive parent blocks.
                (Some(source), _) => redirect(done..done + n, source * bs + within as u64),
                (None, Codec::Stored) => self
                    .file
                    .read_exact_at(dst, f.stored_offset + within as u64)
                    .dctx(|| format!("read {}", self.path.display()))?,
                (None, Codec::Zstd) => {
                    let raw = self.cached(i, || self.decode(i))?;
                    dst.copy_from_slice(&raw[within..within + n]);
                }
            }
            done += n;
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }

    /// If dirty `block` is a reference: the parent block it copies and that block's CRC-32C.
    pub fn reference_at(&self, block: u64) -> Result<Option<(u64, u32)>, DiffError> {
        Ok(self.reference_entry(block)?.map(|(_, s, c)| (s, c)))
    }

    /// [`DiffFile::reference_at`], with the index entry that holds it.
    pub(crate) fn reference_entry(
        &self,
        block: u64,
    ) -> Result<Option<(usize, u64, u32)>, DiffError> {
        let bs = self.header.geometry.bs();
        let dirty = self.tracker.dirty();
        if !dirty.contains(Geometry::idx(block)) {
            return Err(DiffError::Corrupt(format!(
                "block {block} is not stored in this diff"
            )));
        }
        let pos = (dirty.rank(Geometry::idx(block)) - 1) * bs;
        let i = self.frames.partition_point(|f| f.raw_end() <= pos);
        let f = &self.frames[i];
        let Some(source) = f.reference else {
            return Ok(None);
        };
        let j = ((pos - f.raw_offset) / bs) as usize;
        let list = self.cached(i, || self.read_list(i))?;
        let crc = u32::from_le_bytes(list[4 * j..4 * j + 4].try_into().expect("4 bytes"));
        Ok(Some((i, source + j as u64, crc)))
    }

    fn cached(
        &self,
        i: usize,
        load: impl FnOnce() -> Result<Arc<[u8]>, DiffError>,
    ) -> Result<Arc<[u8]>, DiffError> {
        if let Some(r) = self.cache.get(i) {
            return Ok(r);
        }
        let r = load()?;
        self.cache.put(i, r.clone());
        Ok(r)
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

    /// Reference entry `i`'s block checksums (its stored bytes), read and checked.
    fn read_list(&self, i: usize) -> Result<Arc<[u8]>, DiffError> {
        let f = &self.frames[i];
        let mut stored = vec![0u8; f.stored_len as usize];
        self.read_frame(f, &mut stored)?;
        let mut crcs = Vec::new();
        decode_list(i, f, &stored, self.header.geometry.bs(), &mut crcs)?;
        Ok(stored.into())
    }

    fn read_frame(&self, f: &Frame, stored: &mut [u8]) -> Result<(), DiffError> {
        self.file
            .read_exact_at(stored, f.stored_offset)
            .dctx(|| format!("read {}", self.path.display()))
    }

    fn no_parent(&self, offset: u64, source: u64) -> DiffError {
        let bs = self.header.geometry.bs();
        let rank = self.tracker.dirty().rank(Geometry::idx(offset / bs)) - 1;
        DiffError::Reference {
            frame: self.frames.partition_point(|f| f.raw_end() <= rank * bs),
            first: source / bs,
            end: source / bs + 1,
            problem: self.no_parent_problem(),
        }
    }

    fn no_parent_problem(&self) -> RefProblem {
        RefProblem::NoParent(format!(
            "{} stores them as copies of the disk below it, and this reader has none",
            self.path.display()
        ))
    }

    /// Streams the data section in order, checking every frame's checksums (decompressing it,
    /// and for a reference, that its block checksums add up), and hands each run of consecutive
    /// dirty blocks that one entry covers to `f`, as (device offset, piece).
    pub fn for_each_piece(
        &self,
        job: &Job,
        mut f: impl FnMut(u64, Piece<'_>) -> Result<(), DiffError>,
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
        let mut crcs = Vec::new();
        let mut runs = runs(self.tracker.dirty()).peekable();
        // The current run, as (next block to hand out, end).
        let mut cur: Option<(u64, u64)> = None;
        for (i, frame) in self.frames.iter().enumerate() {
            let s = &mut stored[..frame.stored_len as usize];
            self.read_frame(frame, s)?;
            let data = match frame.reference {
                None => decode_frame(i, frame, s, &mut scratch)?,
                Some(_) => {
                    decode_list(i, frame, s, bs, &mut crcs)?;
                    &[]
                }
            };
            let mut left = u64::from(frame.raw_len) / bs;
            // Blocks of this frame handed out so far.
            let mut pos = 0u64;
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
                let piece = match frame.reference {
                    None => {
                        let dev_end = ((start + n) * bs).min(g.size);
                        let at = (pos * bs) as usize;
                        Piece::Data(&data[at..at + (dev_end - dev) as usize])
                    }
                    Some(source) => Piece::Reference {
                        frame: i,
                        source: source + pos,
                        crcs: &crcs[pos as usize..(pos + n) as usize],
                    },
                };
                f(dev, piece)?;
                pos += n;
                left -= n;
                cur = Some((start + n, end));
            }
            job.advance(u64::from(frame.raw_len))?;
        }
        Ok(())
    }

    /// Streams the dirty blocks in order as (device offset, bytes clipped to the device end),
    /// every frame checked; a reference is refused (this reader has no parent state: see
    /// [`DiffFile::for_each_dirty_run_in`]).
    pub fn for_each_dirty_run(
        &self,
        job: &Job,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), DiffError>,
    ) -> Result<(), DiffError> {
        self.for_each_piece(job, |dev, piece| match piece {
            Piece::Data(bytes) => f(dev, bytes),
            Piece::Reference {
                frame,
                source,
                crcs,
            } => Err(DiffError::Reference {
                frame,
                first: source,
                end: source + crcs.len() as u64,
                problem: self.no_parent_problem(),
            }),
        })
    }

    /// Streams the dirty blocks in order as (device offset, bytes clipped to the device end),
    /// the bytes of references read from `parent` and checked block by block against the
    /// checksums the diff recorded (a parent that is not the one the diff was cut on is refused).
    pub fn for_each_dirty_run_in(
        &self,
        job: &Job,
        parent: &dyn ParentState,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), DiffError>,
    ) -> Result<(), DiffError> {
        let g = self.header.geometry;
        let mut buf = Vec::new();
        self.for_each_piece(job, |dev, piece| match piece {
            Piece::Data(bytes) => f(dev, bytes),
            Piece::Reference {
                frame,
                source,
                crcs,
            } => {
                buf.resize(crcs.len() * g.bs() as usize, 0);
                read_parent_blocks(parent, g, source, &mut buf)?;
                check_blocks(frame, source, crcs, &buf, g.bs())?;
                let len = (buf.len() as u64).min(g.size - dev) as usize;
                f(dev, &buf[..len])
            }
        })
    }

    /// Checks every data frame against its checksums, and every reference's recorded block
    /// checksums against its own (what the diff alone can tell).
    pub fn verify(&self, job: &Job) -> Result<(), DiffError> {
        self.for_each_piece(job, |_, _| Ok(()))
    }

    /// [`DiffFile::verify`], and every referenced block read from `parent` and checked.
    pub fn verify_in(&self, job: &Job, parent: &dyn ParentState) -> Result<(), DiffError> {
        self.for_each_dirty_run_in(job, parent, |_, _| Ok(()))
    }
}

/// Decodes a reference entry's stored bytes (`stored`, read from the file) into `out`: its
/// stored checksum, then that the blocks' checksums combine to the entry's raw checksum.
fn decode_list(
    index: usize,
    f: &Frame,
    stored: &[u8],
    bs: u64,
    out: &mut Vec<u32>,
) -> Result<(), DiffError> {
    let bad = |problem| DiffError::Frame {
        frame: index,
        raw_offset: f.raw_offset,
        problem,
    };
    if crc32c::crc32c(stored) != f.stored_crc {
        return Err(bad(FrameProblem::StoredChecksum));
    }
    out.clear();
    out.extend(
        stored
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
    );
    if combine_crcs(out.iter().copied(), bs) != f.raw_crc {
        return Err(bad(FrameProblem::BlockChecksums));
    }
    Ok(())
}

/// Reads whole blocks `first ..` of `parent` into `buf` (a multiple of the block size); what
/// lies past the device end reads as zero, as a diff pads its last block.
pub(crate) fn read_parent_blocks(
    parent: &dyn ParentState,
    g: Geometry,
    first: u64,
    buf: &mut [u8],
) -> Result<(), DiffError> {
    let off = first * g.bs();
    parent.read_parent(off, zero_past_end(g.size, off, buf))
}

/// Checks whole blocks `bytes`, read as parent blocks `source ..` for reference entry `frame`,
/// against the checksums the diff recorded for them.
pub(crate) fn check_blocks(
    frame: usize,
    source: u64,
    crcs: &[u32],
    bytes: &[u8],
    bs: u64,
) -> Result<(), DiffError> {
    for (j, (b, &crc)) in bytes.chunks(bs as usize).zip(crcs).enumerate() {
        if crc32c::crc32c(b) != crc {
            return Err(DiffError::Reference {
                frame,
                first: source,
                end: source + crcs.len() as u64,
                problem: RefProblem::Mismatch {
                    block: source + j as u64,
                },
            });
        }
    }
    Ok(())
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
