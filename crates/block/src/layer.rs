//! A writable layer: a sparse file holding dirty blocks at their device offsets, plus the
//! tracker that says what each block is. Zero blocks are holes and are never read back (a read
//! of a punched tmpfs page would allocate it again); the caller fills them with memset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use crate::error::{BlockError, IoContext, Result};
use crate::fdcache::FdCache;
use crate::fsutil;
use crate::geometry::Geometry;
use crate::live::{self, LiveMap};
use crate::tracker::{BlockState, Tracker};
use roaring::RoaringBitmap;

const BITMAP_MAGIC: &[u8; 8] = b"VSNAPBMP";

pub struct Layer {
    /// The active layer's own fd, for the data path; `None` once frozen, when reads go through
    /// `cache` (a disk of thousands of generations must not hold an fd for each).
    pinned: RwLock<Option<Arc<File>>>,
    cache: Arc<FdCache>,
    data_path: PathBuf,
    bitmap_path: PathBuf,
    live_path: PathBuf,
    hashes_path: PathBuf,
    blocks: u64,
    tracker: RwLock<Tracker>,
    /// The active layer's live states (see `live`), updated with `tracker`, under its lock.
    live: Mutex<Option<LiveMap>>,
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

    pub fn live_path(dir: &Path, stem: &str) -> PathBuf {
        dir.join(format!("{stem}.live"))
    }

    /// The layer's dirty blocks and their content hashes (parent dedupe's index, see
    /// `crate::dedupe`), once an export of it or of a generation above it has written it.
    pub fn hashes_path(dir: &Path, stem: &str) -> PathBuf {
        dir.join(format!("{stem}.hashes"))
    }

    /// Creates an empty layer: a sparse file of the device's size and a durable empty bitmap, so
    /// that every layer a manifest names has a bitmap and a missing one is damage, not "empty".
    pub fn create(dir: &Path, stem: &str, geom: Geometry, cache: &Arc<FdCache>) -> Result<Self> {
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
        let bitmap_path = Self::bitmap_path(dir, stem);
        let _ = std::fs::remove_file(spare_path(&bitmap_path));
        write_bitmap_file(&bitmap_path, &encode_bitmaps(&Tracker::new()), false)
            .ctx(|| format!("write {}", bitmap_path.display()))?;
        let layer = Self::assemble(dir, stem, geom, Some(file), cache, Tracker::new());
        layer.start_live()?;
        Ok(layer)
    }

    /// Opens a layer with the bitmaps of its last persist. A missing bitmap file is an error:
    /// `create` writes one, so its absence means the state directory was damaged, and serving
    /// the layer as empty would silently show the layers below instead of its data.
    /// `pin`: keep an fd open (the active layer; `writable` then opens it for writing).
    /// `trust_live`: after a crash, take the live states when they were written on this boot
    /// (the page cache they live in survived); the second value says whether they were.
    pub fn open(
        dir: &Path,
        stem: &str,
        geom: Geometry,
        pin: Option<bool>,
        cache: &Arc<FdCache>,
        trust_live: bool,
    ) -> Result<(Self, bool)> {
        let data_path = Self::data_path(dir, stem);
        let ctx = || format!("open layer {}", data_path.display());
        let file = match pin {
            Some(writable) => Some(
                OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(&data_path)
                    .ctx(ctx)?,
            ),
            None => {
                std::fs::metadata(&data_path).ctx(ctx)?;
                None
            }
        };
        let bitmap_path = Self::bitmap_path(dir, stem);
        let live_path = Self::live_path(dir, stem);
        let from_live = if trust_live {
            live::load(&live_path, geom.blocks()).ctx(|| format!("read {}", live_path.display()))?
        } else {
            None
        };
        let was_live = from_live.is_some();
        let tracker = match from_live {
            Some(t) => t,
            None => read_bitmap_file(&bitmap_path)?,
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
        let layer = Self::assemble(dir, stem, geom, file, cache, tracker);
        if was_live {
            // Newer than the bitmap: the next persist must write it.
            layer.changes.store(1, Ordering::Release);
        }
        Ok((layer, was_live))
    }

    fn assemble(
        dir: &Path,
        stem: &str,
        geom: Geometry,
        file: Option<File>,
        cache: &Arc<FdCache>,
        tracker: Tracker,
    ) -> Self {
        Self {
            pinned: RwLock::new(file.map(Arc::new)),
            cache: cache.clone(),
            data_path: Self::data_path(dir, stem),
            bitmap_path: Self::bitmap_path(dir, stem),
            live_path: Self::live_path(dir, stem),
            hashes_path: Self::hashes_path(dir, stem),
            blocks: geom.blocks(),
            tracker: RwLock::new(tracker),
            live: Mutex::new(None),
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
        let (s, e) = (Geometry::idx(start), Geometry::idx(end));
        // Rewrites of blocks already in `state` (the common overwrite) change nothing, so the next
        // flush has no bitmap to write: it cannot fail for want of space on a full file system.
        if self.tracker().all_in(s, e, state) {
            self.clear_sub_block_zero(start, end);
            return;
        }
        let mut t = self.tracker.write().unwrap_or_else(PoisonError::into_inner);
        t.set_range(s, e, state);
        // Before the request completes, where a crash of the process cannot lose it.
        if let Some(m) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_mut()
        {
            m.set(start, end, state);
        }
        self.changes.fetch_add(1, Ordering::Release);
        drop(t);
        self.clear_sub_block_zero(start, end);
    }

    fn clear_sub_block_zero(&self, start: u64, end: u64) {
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

    /// The data file: the pinned fd of the active layer, or a cached read-only one.
    pub fn file(&self) -> Result<Arc<File>> {
        if let Some(f) = &*self.pinned.read().unwrap_or_else(PoisonError::into_inner) {
            return Ok(f.clone());
        }
        self.cache
            .get(&self.data_path)
            .ctx(|| format!("open layer {}", self.data_path.display()))
    }

    /// A writable fd of its own, for the rare writes to a frozen layer (recovery, fold).
    pub fn open_writable(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.data_path)
            .ctx(|| format!("open layer {}", self.data_path.display()))
    }

    /// Called when the layer is frozen: it gives up its own fd and its live mapping (the live
    /// file keeps its final states until the bitmap is durable).
    pub fn unpin(&self) {
        *self.pinned.write().unwrap_or_else(PoisonError::into_inner) = None;
        *self.live.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Starts recording the live states (the active layer): the live file is rewritten from the
    /// tracker under this boot's id and mapped.
    pub fn start_live(&self) -> Result<()> {
        let t = self.tracker.write().unwrap_or_else(PoisonError::into_inner);
        let m = LiveMap::create(&self.live_path, self.blocks, &t)
            .ctx(|| format!("create {}", self.live_path.display()))?;
        *self.live.lock().unwrap_or_else(PoisonError::into_inner) = Some(m);
        Ok(())
    }

    /// Removes the live file of a frozen layer whose bitmap is durable (it says no more).
    pub fn remove_live(&self) {
        *self.live.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let _ = std::fs::remove_file(&self.live_path);
    }

    pub fn data_file_path(&self) -> &Path {
        &self.data_path
    }

    pub fn hashes_file_path(&self) -> &Path {
        &self.hashes_path
    }

    pub fn read_stored(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file()?
            .read_exact_at(buf, offset)
            .ctx(|| format!("read {}", self.data_path.display()))
    }

    /// Writes through the pinned fd: only the active layer takes writes.
    pub fn write_stored(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.pinned_file()?
            .write_all_at(buf, offset)
            .ctx(|| format!("write {}", self.data_path.display()))
    }

    fn pinned_file(&self) -> Result<Arc<File>> {
        self.pinned
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| BlockError::State {
                path: self.data_path.clone(),
                msg: "a frozen layer is written to".into(),
            })
    }

    /// Deallocates device bytes `[offset, offset + len)` of the active layer. Zero blocks are
    /// never read back, so a file system that cannot punch only costs space, not correctness.
    pub fn punch(&self, offset: u64, len: u64) -> Result<()> {
        punch(&*self.pinned_file()?, &self.data_path, offset, len)
    }

    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.data_path).map_or(0, |m| m.blocks() * 512)
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
        fsutil::fdatasync(&*self.file()?).ctx(|| format!("fsync {}", self.data_path.display()))?;
        if seen == *persisted && self.bitmap_path.exists() {
            return Ok(());
        }
        write_bitmap_file(&self.bitmap_path, &encode_bitmaps(&snapshot), true)
            .ctx(|| format!("write {}", self.bitmap_path.display()))?;
        *persisted = seen;
        Ok(())
    }

    /// Gives back the space reserved for future bitmap writes (a frozen layer, once persisted,
    /// never writes its bitmap again).
    pub fn release_reserve(&self) {
        let _ = std::fs::remove_file(spare_path(&self.bitmap_path));
    }

    /// Removes the layer's files (after a fold or when a cut is undone).
    pub fn remove_files(&self) {
        self.cache.forget(&self.data_path);
        let _ = std::fs::remove_file(&self.data_path);
        let _ = std::fs::remove_file(&self.bitmap_path);
        let _ = std::fs::remove_file(&self.hashes_path);
        self.release_reserve();
        self.remove_live();
    }
}

/// The tracker a bitmap file holds. A missing file is an error: `create` writes one, so its
/// absence means the state directory was damaged.
fn read_bitmap_file(path: &Path) -> Result<Tracker> {
    match std::fs::read(path) {
        Ok(bytes) => decode_bitmaps(&bytes).map_err(|msg| BlockError::State {
            path: path.to_owned(),
            msg,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlockError::State {
            path: path.to_owned(),
            msg: "the layer's bitmap file is missing: its block states are unknown".into(),
        }),
        Err(e) => Err(e).ctx(|| format!("read {}", path.display())),
    }
}

/// Punches `[offset, offset + len)` of `file` (at `path`), tolerating file systems that cannot.
pub fn punch(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    match fsutil::punch_hole(file, offset, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        r => r.ctx(|| format!("punch {}", path.display())),
    }
}

/// Where the next bitmap of `bitmap` is written: a file kept allocated ahead of time.
pub fn spare_path(bitmap: &Path) -> PathBuf {
    let mut p = bitmap.as_os_str().to_owned();
    p.push(".spare");
    PathBuf::from(p)
}

/// Space kept for the next bitmap write: twice this one, at least 64 KiB.
fn reserve_for(len: usize) -> u64 {
    (2 * len as u64).max(64 << 10)
}

/// Replaces `path` with `bytes` atomically and durably, writing into the spare file allocated by
/// the previous call, so that a full file system does not fail a flush for want of room for the
/// bitmap (the data already has its blocks). The rename frees the old bitmap, whose space then
/// holds the next spare. `sync_dir: false` leaves the rename's durability to a later sync of the
/// directory (a cut syncs it once for all the files it makes).
pub fn write_bitmap_file(path: &Path, bytes: &[u8], sync_dir: bool) -> io::Result<()> {
    let spare = spare_path(path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&spare)?;
    f.write_all_at(bytes, 0)?;
    f.set_len(bytes.len() as u64)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&spare, path)?;
    if sync_dir {
        fsutil::sync_parent(path)?;
    }
    // Best effort: without room for a reserve, the next bitmap write allocates as it goes.
    let reserved = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&spare)
        .and_then(|f| fsutil::reserve(&f, 0, reserve_for(bytes.len())));
    if let Err(e) = reserved {
        tracing::debug!(path = %spare.display(), error = %e, "cannot reserve space for the next bitmap");
    }
    Ok(())
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
