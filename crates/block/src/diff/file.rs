//! Opening a diff with strict validation, and reading its blocks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use super::format::{decode_trailer, DiffHeader, HEADER_LEN, TRAILER_LEN};
use super::{DiffError, DiffIo};
use crate::geometry::Geometry;
use crate::job::Job;
use crate::tracker::{runs, BlockState, Tracker};

/// An open, structurally validated diff. Data checksums are checked by [`DiffFile::verify`] or
/// while streaming with [`DiffFile::for_each_dirty_run`].
pub struct DiffFile {
    file: File,
    path: PathBuf,
    pub header: DiffHeader,
    tracker: Tracker,
    chunk_crcs: Vec<u32>,
}

impl DiffFile {
    pub fn open(path: &Path) -> Result<Self, DiffError> {
        let file = File::open(path).dctx(|| format!("open {}", path.display()))?;
        let actual = file
            .metadata()
            .dctx(|| format!("stat {}", path.display()))?
            .len();
        let mut hbuf = [0u8; HEADER_LEN];
        let n = read_full(&file, &mut hbuf, 0).dctx(|| format!("read {}", path.display()))?;
        let header = DiffHeader::decode(&hbuf[..n])?;
        if header.file_len() != actual {
            return Err(DiffError::Length {
                expected: header.file_len(),
                actual,
            });
        }
        let read = |off: u64, len: u64| -> Result<Vec<u8>, DiffError> {
            let mut v = vec![0u8; len as usize];
            file.read_exact_at(&mut v, off)
                .dctx(|| format!("read {}", path.display()))?;
            Ok(v)
        };
        let bitmaps = read(
            HEADER_LEN as u64,
            header.dirty_bitmap_len + header.zero_bitmap_len,
        )?;
        let table = read(header.chunk_table_offset(), 4 * header.chunks())?;
        let (bitmaps_crc, table_crc) =
            decode_trailer(&read(header.file_len() - TRAILER_LEN, TRAILER_LEN)?)?;
        if crc32c::crc32c(&bitmaps) != bitmaps_crc {
            return Err(DiffError::Checksum("bitmaps"));
        }
        if crc32c::crc32c(&table) != table_crc {
            return Err(DiffError::Checksum("chunk checksum table"));
        }
        let (d, z) = bitmaps.split_at(header.dirty_bitmap_len as usize);
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
        if dirty.len() != header.dirty_blocks || zero.len() != header.zero_blocks {
            return Err(DiffError::Corrupt(
                "bitmap counts disagree with the header".into(),
            ));
        }
        let blocks = header.geometry.blocks();
        if [dirty.max(), zero.max()]
            .into_iter()
            .flatten()
            .any(|m| u64::from(m) >= blocks)
        {
            return Err(DiffError::Corrupt(
                "bitmap names blocks past the device end".into(),
            ));
        }
        let tracker = Tracker::from_bitmaps(dirty, zero)
            .ok_or_else(|| DiffError::Corrupt("a block is both dirty and zero".into()))?;
        let chunk_crcs = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Self {
            file,
            path: path.to_owned(),
            header,
            tracker,
            chunk_crcs,
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

    /// Reads device bytes `[offset, offset + buf.len())`, all inside dirty blocks of this diff.
    /// Consecutive dirty blocks are consecutive in the data section, so one read serves a run.
    pub fn read_stored(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        let bs = self.header.geometry.bs();
        let block = offset / bs;
        let rank = self.tracker.dirty().rank(Geometry::idx(block));
        if rank == 0 || !self.tracker.dirty().contains(Geometry::idx(block)) {
            return Err(DiffError::Corrupt(format!(
                "block {block} is not stored in this diff"
            )));
        }
        let pos = self.header.data_offset() + (rank - 1) * bs + offset % bs;
        self.file
            .read_exact_at(buf, pos)
            .dctx(|| format!("read {}", self.path.display()))
    }

    /// Streams the data section in order, checking every chunk's checksum, and hands each run of
    /// consecutive dirty blocks to `f` as (device offset, bytes clipped to the device end).
    pub fn for_each_dirty_run(
        &self,
        job: &Job,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), DiffError>,
    ) -> Result<(), DiffError> {
        let g = self.header.geometry;
        let bs = g.bs();
        let chunk = u64::from(self.header.chunk_size);
        let blocks_per_chunk = chunk / bs;
        let mut buf = vec![0u8; chunk.min(self.header.data_len()) as usize];
        let mut runs = runs(self.tracker.dirty()).peekable();
        // The current run, as (next block to hand out, end).
        let mut cur: Option<(u64, u64)> = None;
        for (i, &want) in self.chunk_crcs.iter().enumerate() {
            let off = i as u64 * chunk;
            let len = chunk.min(self.header.data_len() - off);
            let data = &mut buf[..len as usize];
            self.file
                .read_exact_at(data, self.header.data_offset() + off)
                .dctx(|| format!("read {}", self.path.display()))?;
            if crc32c::crc32c(data) != want {
                return Err(DiffError::Checksum("data"));
            }
            let mut left = len / bs;
            let mut pos = 0usize;
            debug_assert!(left <= blocks_per_chunk);
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
            job.advance(len)?;
        }
        Ok(())
    }

    /// Checks every data chunk against its checksum.
    pub fn verify(&self, job: &Job) -> Result<(), DiffError> {
        self.for_each_dirty_run(job, |_, _| Ok(()))
    }
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
