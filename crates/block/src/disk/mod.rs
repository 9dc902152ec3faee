//! A disk: a read-only base image under a stack of layers, with the virtio-blk write semantics
//! (DESIGN §2.2), the snapshot cut (§2.3), export and fold, and persistence (§2.5).
//!
//! - [`open`](self::open): opening, creating and recovering the state directory;
//! - [`io`]: one request's semantics ([`Io`]) and flush;
//! - [`cut`]: cut and fold, the changes of the layer stack;
//! - [`export`]: writing a frozen generation as a diff or qcow2 overlay;
//! - [`dedupe`]: which of its blocks the disk below already holds (parent dedupe);
//! - this module: the disk itself and its reports.
//!
//! Concurrency: every request holds a read guard on the stack for its whole duration, so a cut
//! (which takes the write guard) waits for in-flight requests to drain and holds new ones back
//! while it swaps layers. Mutations additionally lock the block range they touch; requests on
//! disjoint blocks never wait for each other. Tracker locks are held only around bitmap updates.

mod cut;
mod dedupe;
mod export;
mod io;
mod open;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::Serialize;
use uuid::Uuid;

use crate::diff::{ChainRoot, DiffError};
use crate::error::{IoContext, Result};
use crate::fdcache::FdCache;
use crate::fsutil::AtomicFile;
use crate::geometry::Geometry;
use crate::job::Job;
use crate::range_lock::RangeLock;
use crate::stack::{ExportPhase, ExportState, Stack};
use crate::state::{Manifest, StateLock};
use crate::stats::{Stats, StatsSnapshot};
use crate::zero::is_zero;

pub use io::Io;

/// How to open (or create) a disk.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub state_dir: PathBuf,
    /// The read-only base image. With none, the disk starts as zeros of `size` bytes.
    pub base: Option<PathBuf>,
    /// Device size when there is no base (ignored, but checked, otherwise).
    pub size: Option<u64>,
    pub block_size: u32,
    /// Diffs to start from, oldest first, applied over the base (only when creating).
    pub chain: Vec<PathBuf>,
    /// Serve reads only; open every file read-only and leave the state directory untouched.
    pub readonly: bool,
    /// What the first diff of `chain` may lie on: the base (default), or anything the caller
    /// vouches for (`--allow-foreign-parent`).
    pub chain_root: ChainRoot,
}

impl DiskOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            base: None,
            size: None,
            block_size: crate::geometry::DEFAULT_BLOCK_SIZE,
            chain: Vec::new(),
            readonly: false,
            chain_root: ChainRoot::Base,
        }
    }
}

/// What a cut did.
#[derive(Clone, Debug, Serialize)]
pub struct CutReport {
    /// The generation that was frozen (holds exactly the writes completed before the cut).
    pub generation: u64,
    pub id: Uuid,
    /// The new active generation.
    pub active_generation: u64,
    /// Requests that were in flight when the cut began and were waited for.
    pub drained: u64,
    /// Time spent waiting for those requests.
    pub drain_us: u64,
    /// Time during which new requests were held back (drain + swap).
    pub pause_us: u64,
    pub durable: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    pub generation: u64,
    pub id: Uuid,
    pub parent: Uuid,
    pub active: bool,
    pub dirty_blocks: u64,
    pub zero_blocks: u64,
    /// Zero blocks that only exact sub-block zero detection made zero (see `Layer`); a tracker
    /// of whole-block zeroing alone would have stored these as data.
    pub sub_block_zero_blocks: u64,
    pub allocated_bytes: u64,
    pub export: ExportPhase,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_progress: Option<(u64, u64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub capacity: u64,
    pub block_size: u32,
    pub blocks: u64,
    pub readonly: bool,
    pub generation: u64,
    pub base: Option<PathBuf>,
    pub chain: Vec<PathBuf>,
    pub layers: Vec<LayerInfo>,
    /// Of the active layer.
    pub dirty_blocks: u64,
    pub zero_blocks: u64,
    pub untouched_blocks: u64,
    pub layer_allocated_bytes: u64,
    /// Frozen layer files open now (at most a fixed number, however many generations).
    pub open_layer_files: u64,
    pub stats: StatsSnapshot,
}

pub struct Disk {
    geom: Geometry,
    readonly: bool,
    dir: PathBuf,
    manifest: Manifest,
    base: Option<File>,
    stack: RwLock<Stack>,
    locks: RangeLock,
    in_flight: AtomicU64,
    flush_lock: Mutex<()>,
    cut_lock: Mutex<()>,
    /// Serialises writes of meta files and the manifest.
    meta_lock: Mutex<()>,
    files: Arc<FdCache>,
    pub stats: Stats,
    /// Held for the disk's life: no second daemon (or writing command) on this directory.
    _lock: StateLock,
}

impl Disk {
    pub fn geometry(&self) -> Geometry {
        self.geom
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn base_path(&self) -> Option<&Path> {
        self.manifest.base.as_deref()
    }

    fn save_manifest(&self, clean: bool) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let _m = self
            .meta_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut m = self.manifest.clone();
        m.clean = clean;
        m.save(&self.dir)
    }

    pub fn info(&self) -> DiskInfo {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        let layers: Vec<LayerInfo> = stack
            .layers
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let t = e.layer.tracker();
                let st = e.export_state().clone();
                let export = st.phase();
                let (path, progress, error) = match st {
                    ExportState::None => (None, None, None),
                    ExportState::Running { path, job } => (Some(path), Some(job.progress()), None),
                    ExportState::Done { path } => (Some(path), None, None),
                    ExportState::Failed { path, error } => (Some(path), None, Some(error)),
                };
                LayerInfo {
                    generation: e.generation,
                    id: e.id,
                    parent: e.parent,
                    active: i == 0,
                    dirty_blocks: t.dirty_count(),
                    zero_blocks: t.zero_count(),
                    sub_block_zero_blocks: e.layer.sub_block_zero_count(&t),
                    allocated_bytes: e.layer.allocated_bytes(),
                    export,
                    export_path: path,
                    export_progress: progress,
                    export_error: error,
                }
            })
            .collect();
        let active = &layers[0];
        DiskInfo {
            capacity: self.geom.size,
            block_size: self.geom.block_size,
            blocks: self.geom.blocks(),
            readonly: self.readonly,
            generation: active.generation,
            base: self.manifest.base.clone(),
            chain: self.manifest.chain.clone(),
            dirty_blocks: active.dirty_blocks,
            zero_blocks: active.zero_blocks,
            untouched_blocks: self.geom.blocks() - active.dirty_blocks - active.zero_blocks,
            layer_allocated_bytes: active.allocated_bytes,
            open_layer_files: self.files.usage().0 as u64,
            layers,
            stats: self.stats.snapshot(),
        }
    }

    /// Writes the whole disk as the guest sees it to a sparse raw image at `out`.
    pub fn materialize(&self, out: &Path, overwrite: bool, job: &Job) -> Result<()> {
        let dst = AtomicFile::create(out, overwrite).ctx(|| format!("create {}", out.display()))?;
        let ctx = || format!("write {}", out.display());
        dst.file().set_len(self.geom.size).ctx(ctx)?;
        job.set_total(self.geom.size);
        let chunk = 1u64 << 20;
        let mut buf = vec![0u8; chunk as usize];
        let mut off = 0;
        while off < self.geom.size {
            let n = chunk.min(self.geom.size - off) as usize;
            self.read(off, &mut buf[..n])?;
            if !is_zero(&buf[..n]) {
                std::os::unix::fs::FileExt::write_all_at(dst.file(), &buf[..n], off).ctx(ctx)?;
            }
            off += n as u64;
            job.advance(n as u64).map_err(|_| DiffError::Cancelled)?;
        }
        dst.commit().ctx(ctx)
    }

    /// Flushes and marks the state directory cleanly closed.
    pub fn close(&self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.flush()?;
        self.save_manifest(true)
    }
}
