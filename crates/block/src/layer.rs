//! A writable layer: a sparse file holding dirty blocks at their device offsets, plus the
//! tracker that says what each block is. Zero blocks are holes and are never read back (a read
//! of a punched tmpfs page would allocate it again); the caller fills them with memset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};

use crate::error::{BlockError, IoContext, Result};
use crate::fsutil;
use crate::geometry::Geometry;
use crate::tracker::{BlockState, Tracker};
use roaring::RoaringBitmap;

const BITMAP_MAGIC: &[u8; 8] = b"VSNAPBMP";

pub struct Layer {
    file: File,
    data_path: PathBuf,
    bitmap_path: PathBuf,
    tracker: RwLock<Tracker>,
    /// Bumped on every tracker change; compared with `persisted` to skip idle flushes.
    changes: AtomicU64,
    persisted: Mutex<u64>,
    /// Zero blocks that only vsnap's read-modify-write of a partial request made zero: a scheme
    /// tracking zeros for whole blocks alone would have stored them as data. Accounting for the
    /// diff-economy figures; in memory, since this layer was opened.
    sub_block_zero: Mutex<RoaringBitmap>,
    has_sub_block_zero: AtomicBool,
}

impl Layer {
    pub fn data_path(dir: &Path, stem: &str) -> PathBuf {
        dir.join(format!("{stem}.data"))
    }

    pub fn bitmap_path(dir: &Path, stem: &str) -> PathBuf {
        dir.join(format!("{stem}.bitmap"))
    }

    /// Creates an empty layer (a sparse file of the device's size).
    pub fn create(dir: &Path, stem: &str, geom: Geometry) -> Result<Self> {
        let data_path = Self::data_path(dir, stem);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .ctx(|| format!("create layer {}", data_path.display()))?;
        file.set_len(geom.size)
            .ctx(|| format!("size layer {}", data_path.display()))?;
        let _ = std::fs::remove_file(Self::bitmap_path(dir, stem));
        Ok(Self::assemble(dir, stem, file, Tracker::new()))
    }

    /// Opens a layer with the bitmaps of its last persist (none yet: empty).
    pub fn open(dir: &Path, stem: &str, geom: Geometry, writable: bool) -> Result<Self> {
        let data_path = Self::data_path(dir, stem);
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&data_path)
            .ctx(|| format!("open layer {}", data_path.display()))?;
        let bitmap_path = Self::bitmap_path(dir, stem);
        let tracker = match std::fs::read(&bitmap_path) {
            Ok(bytes) => decode_bitmaps(&bytes).map_err(|msg| BlockError::State {
                path: bitmap_path.clone(),
                msg,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Tracker::new(),
            Err(e) => return Err(e).ctx(|| format!("read {}", bitmap_path.display())),
        };
        if tracker
            .dirty()
            .max()
            .is_some_and(|m| u64::from(m) >= geom.blocks())
            || tracker
                .zero()
                .max()
                .is_some_and(|m| u64::from(m) >= geom.blocks())
        {
            return Err(BlockError::State {
                path: bitmap_path,
                msg: "bitmap names blocks past the device end".into(),
            });
        }
        Ok(Self::assemble(dir, stem, file, tracker))
    }

    fn assemble(dir: &Path, stem: &str, file: File, tracker: Tracker) -> Self {
        Self {
            file,
            data_path: Self::data_path(dir, stem),
            bitmap_path: Self::bitmap_path(dir, stem),
            tracker: RwLock::new(tracker),
            changes: AtomicU64::new(0),
            persisted: Mutex::new(0),
            sub_block_zero: Mutex::new(RoaringBitmap::new()),
            has_sub_block_zero: AtomicBool::new(false),
        }
    }

    pub fn tracker(&self) -> RwLockReadGuard<'_, Tracker> {
        self.tracker.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn state(&self, block: u64) -> BlockState {
        self.tracker().state(Geometry::idx(block))
    }

    /// Sets blocks `[start, end)` to `state`. Call after the data (or hole) is in the file, so
    /// a concurrent reader that sees the new state also sees the new bytes.
    pub fn set_range(&self, start: u64, end: u64, state: BlockState) {
        let mut t = self.tracker.write().unwrap_or_else(PoisonError::into_inner);
        t.set_range(Geometry::idx(start), Geometry::idx(end), state);
        self.changes.fetch_add(1, Ordering::Release);
        if self.has_sub_block_zero.load(Ordering::Relaxed) {
            self.sub_block_zero
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove_range(Geometry::idx(start)..Geometry::idx(end));
        }
    }

    /// Records that a partial (sub-block) request left `block` zero; a later whole-block
    /// `set_range` over it clears the record.
    pub fn mark_sub_block_zero(&self, block: u64) {
        self.sub_block_zero
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(Geometry::idx(block));
        self.has_sub_block_zero.store(true, Ordering::Relaxed);
    }

    /// Zero blocks a whole-block-only zero tracker would have stored as data.
    /// `t` is this layer's tracker, as the caller already holds it.
    pub fn sub_block_zero_count(&self, t: &Tracker) -> u64 {
        let m = self
            .sub_block_zero
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        m.intersection_len(t.zero())
    }

    /// Replaces the whole tracker (used by fold and recovery).
    pub fn set_tracker(&self, tracker: Tracker) {
        *self.tracker.write().unwrap_or_else(PoisonError::into_inner) = tracker;
        self.changes.fetch_add(1, Ordering::Release);
    }

    pub fn read_stored(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .ctx(|| format!("read {}", self.data_path.display()))
    }

    pub fn write_stored(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .ctx(|| format!("write {}", self.data_path.display()))
    }

    /// Deallocates device bytes `[offset, offset + len)`. Zero blocks are never read back, so a
    /// file system that cannot punch only costs space, not correctness.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        match fsutil::punch_hole(&self.file, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r.ctx(|| format!("punch {}", self.data_path.display())),
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn allocated_bytes(&self) -> u64 {
        fsutil::allocated_bytes(&self.file).unwrap_or(0)
    }

    /// Makes the data durable, then the bitmaps that describe it (never the reverse: bitmaps that
    /// name data not yet on disk would read back holes after a crash). Skips work when nothing
    /// changed since the last persist.
    pub fn persist(&self) -> Result<()> {
        let mut persisted = self
            .persisted
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (snapshot, seen) = {
            let t = self.tracker();
            (t.clone(), self.changes.load(Ordering::Acquire))
        };
        fsutil::fdatasync(&self.file).ctx(|| format!("fsync {}", self.data_path.display()))?;
        if seen == *persisted && self.bitmap_path.exists() {
            return Ok(());
        }
        fsutil::write_atomic(&self.bitmap_path, &encode_bitmaps(&snapshot))
            .ctx(|| format!("write {}", self.bitmap_path.display()))?;
        *persisted = seen;
        Ok(())
    }

    /// Removes the layer's files (after a fold or when a cut is undone).
    pub fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.data_path);
        let _ = std::fs::remove_file(&self.bitmap_path);
    }
}

/// Serialises a bitmap pair: magic, crc32c of the rest, then length-prefixed roaring bitmaps.
pub fn encode_bitmaps(t: &Tracker) -> Vec<u8> {
    let mut body = Vec::new();
    for b in [t.dirty(), t.zero()] {
        body.extend_from_slice(&(b.serialized_size() as u64).to_le_bytes());
        b.serialize_into(&mut body).expect("write to Vec");
    }
    let mut out = BITMAP_MAGIC.to_vec();
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode_bitmaps(bytes: &[u8]) -> std::result::Result<Tracker, String> {
    if bytes.len() < 12 || &bytes[..8] != BITMAP_MAGIC {
        return Err("not a vsnap bitmap file".into());
    }
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let mut body = &bytes[12..];
    if crc32c::crc32c(body) != crc {
        return Err("bitmap checksum mismatch".into());
    }
    let mut take = || -> std::result::Result<RoaringBitmap, String> {
        if body.len() < 8 {
            return Err("bitmap file truncated".into());
        }
        let len = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
        let rest = &body[8..];
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= rest.len())
            .ok_or("bitmap file truncated")?;
        let b = RoaringBitmap::deserialize_from(&rest[..len]).map_err(|e| e.to_string())?;
        body = &rest[len..];
        Ok(b)
    };
    let dirty = take()?;
    let zero = take()?;
    Tracker::from_bitmaps(dirty, zero).ok_or_else(|| "dirty and zero bitmaps overlap".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_round_trip_and_reject_damage() {
        let mut t = Tracker::new();
        t.set_range(3, 9, BlockState::Dirty);
        t.set_range(20, 1000, BlockState::Zero);
        let bytes = encode_bitmaps(&t);
        assert_eq!(decode_bitmaps(&bytes).unwrap(), t);
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(decode_bitmaps(&bad).unwrap_err().contains("checksum"));
        assert!(decode_bitmaps(&bytes[..bytes.len() - 3]).is_err());
        assert!(decode_bitmaps(b"nonsense").is_err());
    }
}
