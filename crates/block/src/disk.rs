//! A disk: a read-only base image under a stack of layers, with the virtio-blk write semantics
//! (DESIGN §2.2), the snapshot cut (§2.3), export and fold, and persistence (§2.5).
//!
//! Concurrency: every request holds a read guard on the stack for its whole duration, so a cut
//! (which takes the write guard) waits for in-flight requests to drain and holds new ones back
//! while it swaps layers. Mutations additionally lock the block range they touch; requests on
//! disjoint blocks never wait for each other. Tracker locks are held only around bitmap updates.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use crate::diff::{self, check_chain, write_diff, DiffError, DiffFile};
use crate::error::{BlockError, IoContext, Result};
use crate::fsutil::{self, AtomicFile};
use crate::geometry::{Geometry, SECTOR};
use crate::job::Job;
use crate::layer::Layer;
use crate::range_lock::RangeLock;
use crate::stack::{Entry, ExportState, Src, Stack};
use crate::state::{LayerMeta, Manifest};
use crate::stats::{Stats, StatsSnapshot};
use crate::tracker::{runs, BlockState};
use crate::zero::is_zero;

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
        }
    }
}

enum Op<'a> {
    Data(&'a [u8]),
    Zeroes,
    Discard,
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
    pub export: String,
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
    pub stats: StatsSnapshot,
}

pub struct Disk {
    geom: Geometry,
    readonly: bool,
    dir: PathBuf,
    base_path: Option<PathBuf>,
    chain_paths: Vec<PathBuf>,
    base: Option<File>,
    stack: RwLock<Stack>,
    locks: RangeLock,
    in_flight: AtomicU64,
    flush_lock: Mutex<()>,
    cut_lock: Mutex<()>,
    /// Serialises manifest writes and multi-step stack edits (fold).
    manifest_lock: Mutex<bool>,
    pub stats: Stats,
}

/// Held by every request: keeps the stack stable and counts the request as in flight.
struct Ticket<'a> {
    stack: RwLockReadGuard<'a, Stack>,
    in_flight: &'a AtomicU64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Disk {
    /// Opens the disk in `opts.state_dir`, creating it when the directory holds none.
    pub fn open(opts: &DiskOptions) -> Result<Self> {
        let dir = &opts.state_dir;
        if !opts.readonly {
            std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        }
        let state_err = |msg: String| BlockError::State {
            path: dir.clone(),
            msg,
        };
        let (manifest, created) = match Manifest::load(dir)? {
            Some(m) => {
                if opts.base.is_some() && opts.base != m.base {
                    return Err(state_err(format!(
                        "holds a disk over base {:?}, not {:?}",
                        m.base, opts.base
                    )));
                }
                (m, false)
            }
            None if opts.readonly => return Err(state_err("holds no disk".into())),
            None => (Self::fresh_manifest(opts)?, true),
        };
        let g = manifest.geometry;
        if !created {
            if let Some(size) = opts.size.filter(|&s| s != g.size) {
                return Err(state_err(format!(
                    "holds a {}-byte disk, not {size}",
                    g.size
                )));
            }
        }
        let base = match &manifest.base {
            Some(p) => Some(File::open(p).ctx(|| format!("open base image {}", p.display()))?),
            None => None,
        };
        let chain = manifest
            .chain
            .iter()
            .map(|p| DiffFile::open(p))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if !chain.is_empty() {
            check_chain(&chain)?;
            if chain[0].geometry() != g {
                return Err(state_err(
                    "diff chain geometry differs from the disk's".into(),
                ));
            }
            if created {
                for d in &chain {
                    d.verify(&Job::new())?;
                }
            }
        }
        let writable = !opts.readonly;
        let mut layers = Vec::new();
        for meta in manifest.layers.iter().rev() {
            // Frozen layers are written too: fold copies the layer above into them.
            let layer = Layer::open(dir, &meta.stem, g, writable)?;
            layers.push(Arc::new(Entry {
                generation: meta.generation,
                id: meta.id,
                parent: meta.parent,
                stem: meta.stem.clone(),
                layer: Arc::new(layer),
                export: Mutex::new(match &meta.exported {
                    Some(p) => ExportState::Done { path: p.clone() },
                    None => ExportState::None,
                }),
            }));
        }
        let disk = Self {
            geom: g,
            readonly: opts.readonly,
            dir: dir.clone(),
            base_path: manifest.base.clone(),
            chain_paths: manifest.chain.clone(),
            base,
            stack: RwLock::new(Stack {
                layers,
                chain: chain.into_iter().rev().map(Arc::new).collect(),
            }),
            locks: RangeLock::default(),
            in_flight: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            cut_lock: Mutex::new(()),
            manifest_lock: Mutex::new(false),
            stats: Stats::default(),
        };
        if !manifest.clean {
            disk.recover()?;
        }
        if writable {
            disk.remove_strays();
            disk.save_manifest(false)?;
        }
        Ok(disk)
    }

    fn fresh_manifest(opts: &DiskOptions) -> Result<Manifest> {
        let size = match (&opts.base, opts.size) {
            (Some(b), size) => {
                let len = std::fs::metadata(b)
                    .ctx(|| format!("stat base image {}", b.display()))?
                    .len();
                if let Some(s) = size.filter(|&s| s != len) {
                    return Err(BlockError::Geometry(format!(
                        "--size {s} differs from the base image's {len} bytes"
                    )));
                }
                len
            }
            (None, Some(s)) => s,
            (None, None) => {
                return Err(BlockError::Geometry(
                    "a disk needs a base image or a size".into(),
                ))
            }
        };
        let g = Geometry::new(size, opts.block_size)?;
        let base = match &opts.base {
            Some(b) => Some(std::fs::canonicalize(b).ctx(|| format!("resolve {}", b.display()))?),
            None => None,
        };
        let chain = opts
            .chain
            .iter()
            .map(|p| std::fs::canonicalize(p).ctx(|| format!("resolve {}", p.display())))
            .collect::<Result<Vec<_>>>()?;
        let parent = match chain.last() {
            Some(p) => DiffFile::open(p)?.header.id,
            None => Uuid::nil(),
        };
        let mut m = Manifest::new(g, base, chain);
        let first_gen = match m.chain.last() {
            Some(p) => DiffFile::open(p)?.header.generation + 1,
            None => 1,
        };
        let meta = LayerMeta {
            generation: first_gen,
            id: Uuid::new_v4(),
            parent,
            stem: format!("layer-{first_gen:06}"),
            exported: None,
        };
        Layer::create(&opts.state_dir, &meta.stem, g)?;
        m.layers.push(meta);
        Ok(m)
    }

    /// After a crash, the bitmaps describe the disk as of the last flush. Blocks written since
    /// were never flushed, which virtio allows to be lost; serving the last flushed state keeps
    /// every block either old or new, never torn between layers. Their leftover bytes in the
    /// layer files are punched so the files again match the bitmaps exactly.
    fn recover(&self) -> Result<()> {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        let mut dropped = 0u64;
        for e in &stack.layers {
            let before = e.layer.allocated_bytes();
            if !self.readonly {
                let mut stale = roaring::RoaringBitmap::new();
                stale.insert_range(0..=Geometry::idx(self.geom.blocks() - 1));
                stale -= e.layer.tracker().dirty();
                for (s, end) in runs(&stale) {
                    let (a, b) = (
                        u64::from(s) * self.geom.bs(),
                        (end * self.geom.bs()).min(self.geom.size),
                    );
                    e.layer.punch(a, b - a)?;
                }
                dropped += before.saturating_sub(e.layer.allocated_bytes());
            }
        }
        tracing::warn!(
            state_dir = %self.dir.display(),
            dropped_bytes = dropped,
            "the disk was not closed cleanly: serving it as of its last flush; writes the guest had not flushed are dropped"
        );
        Ok(())
    }

    /// Removes layer files the manifest does not name (a crash between creating and recording).
    fn remove_strays(&self) {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        let known: Vec<&str> = stack.layers.iter().map(|e| e.stem.as_str()).collect();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let stem = name
                .strip_suffix(".data")
                .or_else(|| name.strip_suffix(".bitmap"));
            if let Some(stem) = stem.filter(|s| s.starts_with("layer-")) {
                if !known.contains(&stem) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }

    fn save_manifest(&self, clean: bool) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let _m = self
            .manifest_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        self.write_manifest(&stack, clean)
    }

    fn write_manifest(&self, stack: &Stack, clean: bool) -> Result<()> {
        let mut m = Manifest::new(self.geom, self.base_path.clone(), self.chain_paths.clone());
        m.layers = stack.layers.iter().rev().map(|e| e.meta()).collect();
        m.clean = clean;
        m.save(&self.dir)
    }

    pub fn geometry(&self) -> Geometry {
        self.geom
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn enter(&self) -> Ticket<'_> {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ticket {
            stack,
            in_flight: &self.in_flight,
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(BlockError::Unaligned { offset, len });
        }
        self.geom.check_range(offset, len)
    }

    /// Starts a request: until the returned [`Io`] is dropped, a cut waits for it, so every
    /// operation made through it lands in one generation.
    pub fn io(&self) -> Io<'_> {
        Io {
            disk: self,
            ticket: self.enter(),
        }
    }

    /// Reads device bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io().read(offset, buf)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.io().write(offset, data)
    }

    /// Makes `[offset, offset + len)` read as zero (exactly: partial blocks keep their other bytes).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.io().write_zeroes(offset, len)
    }

    /// Discards the blocks `[offset, offset + len)` covers whole; partial blocks are left as they
    /// are (the spec lets a discard round inward).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.io().discard(offset, len)
    }

    /// Reads `buf` at `offset` from the stack, skipping its first `skip` layers.
    fn read_from(&self, stack: &Stack, offset: u64, buf: &mut [u8], skip: usize) -> Result<()> {
        let end = offset + buf.len() as u64;
        for (s, e, src) in stack.resolve(self.geom, offset, end, skip) {
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Src::Layer(i) => stack.layers[i].layer.read_stored(s, dst)?,
                Src::Chain(i) => stack.chain[i].read_stored(s, dst)?,
                Src::Zero => dst.fill(0),
                Src::Base => match &self.base {
                    Some(f) => fsutil::read_at_or_zero(f, dst, s)
                        .ctx(|| format!("read base {:?}", self.base_path))?,
                    None => dst.fill(0),
                },
            }
        }
        Ok(())
    }

    fn mutate(&self, stack: &Stack, offset: u64, len: u64, op: Op<'_>) -> Result<()> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.geom.bs();
        let end = offset + len;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let _range = self.locks.lock(first, last + 1);
        let active = &stack.active().layer;
        let data_at = |s: u64, e: u64| match op {
            Op::Data(d) => Some(&d[(s - offset) as usize..(e - offset) as usize]),
            _ => None,
        };
        let mut b = first;
        while b <= last {
            let (bs_, be) = self.geom.block_span(b);
            let (s, e) = (offset.max(bs_), end.min(be));
            if s != bs_ || e != be {
                if !matches!(op, Op::Discard) {
                    self.patch_block(stack, b, s, e, data_at(s, e))?;
                }
                b += 1;
                continue;
            }
            // A run of whole blocks of one kind: one pwrite or one punch for all of it.
            let zero = |blk: u64| {
                let (s, e) = self.geom.block_span(blk);
                data_at(s, e).is_none_or(is_zero)
            };
            let kind = zero(b);
            let mut run_end = b + 1;
            while run_end <= last && self.geom.block_span(run_end).1 <= end && zero(run_end) == kind
            {
                run_end += 1;
            }
            let (rs, re) = (bs_, self.geom.block_span(run_end - 1).1);
            if kind {
                self.zero_blocks(active, b, run_end, rs, re)?;
            } else {
                active.write_stored(rs, data_at(rs, re).expect("data op"))?;
                active.set_range(b, run_end, BlockState::Dirty);
            }
            b = run_end;
        }
        Ok(())
    }

    fn zero_blocks(&self, active: &Layer, b: u64, b_end: u64, s: u64, e: u64) -> Result<()> {
        let was_dirty = active
            .tracker()
            .dirty()
            .range_cardinality(Geometry::idx(b)..Geometry::idx(b_end - 1) + 1);
        active.punch(s, e - s)?;
        active.set_range(b, b_end, BlockState::Zero);
        Stats::add(&self.stats.reclaimed_bytes, was_dirty * self.geom.bs());
        Ok(())
    }

    /// Read-modify-write of block `b`, replacing bytes `[s, e)` with `patch` (zeros if `None`).
    /// The range lock is held, so nothing else changes this block meanwhile.
    fn patch_block(
        &self,
        stack: &Stack,
        b: u64,
        s: u64,
        e: u64,
        patch: Option<&[u8]>,
    ) -> Result<()> {
        let active = &stack.active().layer;
        let (bs_, be) = self.geom.block_span(b);
        let patch_zero = patch.is_none_or(is_zero);
        let fill = |block: &mut [u8]| {
            let dst = &mut block[(s - bs_) as usize..(e - bs_) as usize];
            match patch {
                Some(p) => dst.copy_from_slice(p),
                None => dst.fill(0),
            }
        };
        let mut block = vec![0u8; (be - bs_) as usize];
        match active.state(b) {
            BlockState::Zero if patch_zero => {
                active.mark_sub_block_zero(b);
                return Ok(());
            }
            BlockState::Zero => {
                fill(&mut block);
                active.write_stored(bs_, &block)?;
                active.set_range(b, b + 1, BlockState::Dirty);
                return Ok(());
            }
            // Non-zero bytes into a stored block: it stays non-zero, patch in place.
            BlockState::Dirty if !patch_zero => {
                active.write_stored(s, patch.expect("non-zero patch"))?;
                active.set_range(b, b + 1, BlockState::Dirty);
                return Ok(());
            }
            BlockState::Dirty => active.read_stored(bs_, &mut block)?,
            BlockState::Untouched => self.read_from(stack, bs_, &mut block, 1)?,
        }
        fill(&mut block);
        if is_zero(&block) {
            self.zero_blocks(active, b, b + 1, bs_, be)?;
            active.mark_sub_block_zero(b);
            Ok(())
        } else {
            active.write_stored(bs_, &block)?;
            active.set_range(b, b + 1, BlockState::Dirty);
            Ok(())
        }
    }

    /// Makes every completed write durable: layer data first, then the bitmaps that describe
    /// it, then the manifest.
    pub fn flush(&self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let t = self.enter();
        let _f = self
            .flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for e in &t.stack.layers {
            e.layer.persist()?;
        }
        drop(t);
        let mut dirty_manifest = self
            .manifest_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *dirty_manifest {
            let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
            self.write_manifest(&stack, false)?;
            *dirty_manifest = false;
        }
        drop(dirty_manifest);
        Stats::add(&self.stats.flushes, 1);
        Ok(())
    }

    /// The snapshot consistency point: holds new requests back, waits for in-flight ones, then
    /// freezes the active layer and puts a fresh one on top. The frozen generation holds exactly
    /// the writes completed before the cut. `durable` also fsyncs it before resuming.
    pub fn cut(&self, durable: bool) -> Result<CutReport> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        let Ok(_c) = self.cut_lock.try_lock() else {
            return Err(BlockError::Conflict("another cut is running".into()));
        };
        // Everything that does not need the pause happens before it.
        let (next_gen, frozen_id) = {
            let s = self.stack.read().unwrap_or_else(PoisonError::into_inner);
            (s.active().generation + 1, s.active().id)
        };
        let stem = format!("layer-{next_gen:06}");
        let layer = Arc::new(Layer::create(&self.dir, &stem, self.geom)?);
        let entry = Arc::new(Entry {
            generation: next_gen,
            id: Uuid::new_v4(),
            parent: frozen_id,
            stem,
            layer,
            export: Mutex::new(ExportState::None),
        });

        let t0 = Instant::now();
        let drained = self.in_flight();
        let mut stack = self.stack.write().unwrap_or_else(PoisonError::into_inner);
        let drain = t0.elapsed();
        let frozen = stack.active().clone();
        if durable {
            if let Err(e) = frozen.layer.persist() {
                drop(stack);
                entry.layer.remove_files();
                return Err(e);
            }
        }
        stack.layers.insert(0, entry);
        drop(stack);
        let pause = t0.elapsed();

        if durable {
            self.save_manifest(false)?;
        } else {
            *self
                .manifest_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = true;
        }
        Ok(CutReport {
            generation: frozen.generation,
            id: frozen.id,
            active_generation: next_gen,
            drained,
            drain_us: drain.as_micros() as u64,
            pause_us: pause.as_micros() as u64,
            durable,
        })
    }

    fn frozen_entry(&self, generation: u64) -> Result<(Arc<Entry>, Option<Arc<Entry>>)> {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        match stack.find(generation) {
            Some((0, _)) => Err(BlockError::Conflict(format!(
                "generation {generation} is the active layer: cut first"
            ))),
            Some((i, e)) => Ok((e.clone(), stack.layers.get(i + 1).cloned())),
            None => Err(BlockError::NoSuchGeneration(generation)),
        }
    }

    /// Registers an export of frozen `generation` to `path` and returns its job; the caller runs
    /// [`Disk::run_export`] (in the background, typically) with it.
    pub fn start_export(&self, generation: u64, path: &Path) -> Result<Job> {
        let (entry, _) = self.frozen_entry(generation)?;
        let mut st = entry.export_state();
        if let ExportState::Running { .. } = &*st {
            return Err(BlockError::Conflict(format!(
                "generation {generation} is being exported already"
            )));
        }
        if path.exists() {
            return Err(BlockError::Conflict(format!(
                "{} already exists",
                path.display()
            )));
        }
        let job = Job::new();
        *st = ExportState::Running {
            path: path.to_owned(),
            job: job.clone(),
        };
        Ok(job)
    }

    /// Writes frozen `generation` as a vsnap diff to `path` (or a qcow2 overlay over
    /// `qcow2_backing`). The guest keeps running: a frozen layer never changes.
    pub fn run_export(
        &self,
        generation: u64,
        path: &Path,
        qcow2_backing: Option<&Path>,
        job: &Job,
    ) -> Result<diff::DiffHeader> {
        let (entry, _) = self.frozen_entry(generation)?;
        let r = self.export_entry(&entry, path, qcow2_backing, job);
        *entry.export_state() = match &r {
            Ok(_) => ExportState::Done {
                path: path.to_owned(),
            },
            Err(e) => ExportState::Failed {
                path: path.to_owned(),
                error: e.to_string(),
            },
        };
        if r.is_ok() {
            self.save_manifest(false)?;
        }
        r
    }

    /// Exports synchronously (start + run).
    pub fn export(
        &self,
        generation: u64,
        path: &Path,
        qcow2_backing: Option<&Path>,
    ) -> Result<diff::DiffHeader> {
        let job = self.start_export(generation, path)?;
        self.run_export(generation, path, qcow2_backing, &job)
    }

    fn export_entry(
        &self,
        e: &Entry,
        path: &Path,
        qcow2_backing: Option<&Path>,
        job: &Job,
    ) -> Result<diff::DiffHeader> {
        let tracker = e.layer.tracker().clone();
        let source = LayerSource(&e.layer);
        let Some(backing) = qcow2_backing else {
            return Ok(write_diff(
                path,
                false,
                self.geom,
                e.generation,
                e.id,
                e.parent,
                &tracker,
                &source,
                job,
            )?);
        };
        // qcow2: through a temporary diff, which the converter streams and verifies.
        let tmp = AtomicFile::create(path, false).ctx(|| format!("create {}", path.display()))?;
        let tmp_diff = tmp.temp_path().with_extension("vsnapdiff");
        let r = write_diff(
            &tmp_diff,
            true,
            self.geom,
            e.generation,
            e.id,
            e.parent,
            &tracker,
            &source,
            job,
        )
        .and_then(|h| diff::qcow2::to_qcow2(&tmp_diff, backing, path, false, job).map(|_| h));
        let _ = std::fs::remove_file(&tmp_diff);
        drop(tmp);
        Ok(r?)
    }

    /// Folds frozen `generation` into the layer below it, which then stands for that generation;
    /// reads stay identical throughout. Both must be exported first unless `force`, since their
    /// own diffs can no longer be produced afterwards.
    pub fn fold(&self, generation: u64, force: bool) -> Result<()> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        let _m = self.cut_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (upper, lower) = self.frozen_entry(generation)?;
        let lower = lower.ok_or_else(|| {
            BlockError::Conflict(format!(
                "generation {generation} lies directly on the base image: nothing to fold it into"
            ))
        })?;
        for e in [&upper, &lower] {
            if matches!(*e.export_state(), ExportState::Running { .. }) {
                return Err(BlockError::Conflict(format!(
                    "generation {} is being exported",
                    e.generation
                )));
            }
            if !force && !e.is_exported() {
                return Err(BlockError::Conflict(format!(
                    "generation {} has not been exported (force to fold anyway)",
                    e.generation
                )));
            }
        }
        // Copy the upper layer's blocks into the lower one. Reads of those blocks are still
        // served by the upper layer, which sits above, so the lower one may change underneath.
        let (g, ut) = (self.geom, upper.layer.tracker().clone());
        for (s, e) in runs(ut.dirty()) {
            let (a, b) = (u64::from(s) * g.bs(), (e * g.bs()).min(g.size));
            fsutil::copy_range(upper.layer.file(), lower.layer.file(), a, b - a)
                .ctx(|| format!("fold generation {generation}"))?;
        }
        for (s, e) in runs(ut.zero()) {
            let (a, b) = (u64::from(s) * g.bs(), (e * g.bs()).min(g.size));
            lower.layer.punch(a, b - a)?;
        }
        let mut merged = lower.layer.tracker().clone();
        merged.overlay(&ut);
        lower.layer.set_tracker(merged);
        lower.layer.persist()?;
        let folded = Arc::new(Entry {
            generation: upper.generation,
            id: upper.id,
            parent: lower.parent,
            stem: lower.stem.clone(),
            layer: lower.layer.clone(),
            export: Mutex::new(upper.export_state().clone()),
        });
        {
            let mut stack = self.stack.write().unwrap_or_else(PoisonError::into_inner);
            let i = stack
                .layers
                .iter()
                .position(|e| Arc::ptr_eq(e, &upper))
                .ok_or(BlockError::NoSuchGeneration(generation))?;
            stack.layers[i] = folded;
            stack.layers.remove(i + 1);
        }
        self.save_manifest(false)?;
        upper.layer.remove_files();
        Ok(())
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
                let (export, path, progress, error) = match st {
                    ExportState::None => ("none", None, None, None),
                    ExportState::Running { path, job } => {
                        ("running", Some(path), Some(job.progress()), None)
                    }
                    ExportState::Done { path } => ("done", Some(path), None, None),
                    ExportState::Failed { path, error } => {
                        ("failed", Some(path), None, Some(error))
                    }
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
                    export: export.into(),
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
            base: self.base_path.clone(),
            chain: self.chain_paths.clone(),
            dirty_blocks: active.dirty_blocks,
            zero_blocks: active.zero_blocks,
            untouched_blocks: self.geom.blocks() - active.dirty_blocks - active.zero_blocks,
            layer_allocated_bytes: active.allocated_bytes,
            layers,
            stats: self.stats.snapshot(),
        }
    }

    /// Cancels a running export of `generation`.
    pub fn cancel_export(&self, generation: u64) -> Result<()> {
        let (e, _) = self.frozen_entry(generation)?;
        let st = e.export_state().clone();
        match st {
            ExportState::Running { job, .. } => {
                job.cancel();
                Ok(())
            }
            _ => Err(BlockError::Conflict(format!(
                "generation {generation} has no export running"
            ))),
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

/// A frozen layer as the source of an export: any block may be read (holes read as zeros).
struct LayerSource<'a>(&'a Layer);

impl diff::BlockSource for LayerSource<'_> {
    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), DiffError> {
        self.0
            .read_stored(offset, buf)
            .map_err(|err| DiffError::Corrupt(err.to_string()))
    }
    fn reads_any_block(&self) -> bool {
        true
    }
}

/// One request's access to the disk (see [`Disk::io`]).
pub struct Io<'a> {
    disk: &'a Disk,
    ticket: Ticket<'a>,
}

impl Io<'_> {
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let d = self.disk;
        d.check(offset, buf.len() as u64)?;
        d.read_from(&self.ticket.stack, offset, buf, 0)?;
        Stats::add(&d.stats.reads, 1);
        Stats::add(&d.stats.read_bytes, buf.len() as u64);
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let s = &self.disk.stats;
        self.mutate(
            offset,
            data.len() as u64,
            Op::Data(data),
            (&s.writes, &s.written_bytes),
        )
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let s = &self.disk.stats;
        self.mutate(offset, len, Op::Zeroes, (&s.write_zeroes, &s.zeroed_bytes))
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let s = &self.disk.stats;
        self.mutate(offset, len, Op::Discard, (&s.discards, &s.discarded_bytes))
    }

    fn mutate(
        &self,
        offset: u64,
        len: u64,
        op: Op<'_>,
        (count, bytes): (&AtomicU64, &AtomicU64),
    ) -> Result<()> {
        self.disk.mutate(&self.ticket.stack, offset, len, op)?;
        Stats::add(count, 1);
        Stats::add(bytes, len);
        Ok(())
    }
}
