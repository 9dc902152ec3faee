//! The changes of the layer stack: the cut (DESIGN §2.3) and the fold. Each commits with one
//! rename of a meta file (see `state`), so after a crash at any point every generation the
//! directory lists holds exactly its own content. A cut never reads or hashes a block; a fold
//! merges the folded layers' hash lists (parent dedupe's index) without reading any.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use uuid::Uuid;

use super::{CutReport, Disk};
use crate::error::{BlockError, IoContext, Result};
use crate::fsutil;
use crate::layer::{encode_bitmaps, write_bitmap_file, Layer};
use crate::stack::{Entry, ExportState};
use crate::state::LayerMeta;
use crate::tracker::runs;

impl Disk {
    /// Makes a frozen layer durable once; it never changes afterwards.
    pub(super) fn persist_frozen(e: &Entry) -> Result<()> {
        if e.durable.load(Ordering::Acquire) {
            return Ok(());
        }
        e.layer.persist()?;
        e.layer.release_reserve();
        e.layer.remove_live();
        e.durable.store(true, Ordering::Release);
        Ok(())
    }

    /// The snapshot consistency point: holds new requests back, waits for in-flight ones, then
    /// freezes the active layer and puts a fresh one on top. The frozen generation holds exactly
    /// the writes completed before the cut. `durable` also makes it survive power loss before
    /// returning.
    pub fn cut(&self, durable: bool) -> Result<CutReport> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        let Ok(_c) = self.cut_lock.try_lock() else {
            return Err(BlockError::Conflict("another cut is running".into()));
        };
        // Everything that does not need the pause happens before it: the new layer's files,
        // and its meta, written and synced under a temporary name.
        let (next_gen, frozen_id) = {
            let s = self.stack.read().unwrap_or_else(PoisonError::into_inner);
            (s.active().generation + 1, s.active().id)
        };
        let stem = format!("layer-{next_gen:06}");
        let layer = Arc::new(Layer::create(&self.dir, &stem, self.geom, &self.files)?);
        let entry = Arc::new(Entry {
            generation: next_gen,
            id: Uuid::new_v4(),
            parent: frozen_id,
            stem,
            replaces: Vec::new(),
            layer,
            export: Mutex::new(ExportState::None),
            durable: Default::default(),
        });
        let _m = self
            .meta_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let prepared = match entry.meta().prepare(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                entry.layer.remove_files();
                return Err(e);
            }
        };

        // The pause: one rename adds the layer to the directory's stack, as the swap adds it
        // to the one in memory.
        let t0 = Instant::now();
        let drained = self.in_flight();
        let mut stack = self.stack.write().unwrap_or_else(PoisonError::into_inner);
        let drain = t0.elapsed();
        let frozen = stack.active().clone();
        if let Err(e) = prepared.install() {
            drop(stack);
            entry.layer.remove_files();
            let meta = LayerMeta::path(&self.dir, &entry.stem);
            return Err(e).ctx(|| format!("write {}", meta.display()));
        }
        stack.layers.insert(0, entry.clone());
        drop(stack);
        let pause = t0.elapsed();
        drop(_m);

        frozen.layer.unpin();
        // Until the directory is synced a power loss may forget the cut (and the new layer
        // with it), so a flush of the new layer could be lost: sync it now.
        let meta = LayerMeta::path(&self.dir, &entry.stem);
        fsutil::sync_parent(&meta).ctx(|| format!("sync {}", meta.display()))?;
        if durable {
            // The frozen layer no longer changes: persisting it after the pause is as good.
            Self::persist_frozen(&frozen)?;
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

    /// Folds frozen `generation` into the layer below it: afterwards one layer stands for both,
    /// under `generation`; reads stay identical throughout. Both must be exported first unless
    /// `force`, since their own diffs can no longer be produced afterwards.
    ///
    /// A crash-safe transaction: the lower layer's blocks the upper one does not answer for are
    /// copied into the upper layer's file (where its bitmap says "untouched", so its own content
    /// is unchanged); the folded layer is that file under a new name (a hard link) with the
    /// merged bitmap; its meta, naming the two it replaces, commits with one rename. Before the
    /// rename both layers are intact and the new files are leftovers; after it, they are.
    pub fn fold(&self, generation: u64, force: bool) -> Result<()> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        let _c = self.cut_lock.lock().unwrap_or_else(PoisonError::into_inner);
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
        let g = self.geom;
        let span = |s: u32, e: u64| {
            let (a, b) = (u64::from(s) * g.bs(), (e * g.bs()).min(g.size));
            (a, b - a)
        };
        let ut = upper.layer.tracker().clone();
        let mut merged = lower.layer.tracker().clone();
        merged.overlay(&ut);

        // 1. The lower layer's data the upper one does not cover, into the upper layer's file.
        let mut fill = lower.layer.tracker().dirty().clone();
        fill -= ut.dirty();
        fill -= ut.zero();
        let (src, dst) = (lower.layer.file()?, upper.layer.open_writable()?);
        let ctx = || format!("fold generation {generation}");
        for (s, e) in runs(&fill) {
            let (off, len) = span(s, e);
            fsutil::copy_range(&src, &dst, off, len).ctx(ctx)?;
        }
        fsutil::fdatasync(&dst).ctx(ctx)?;
        drop((src, dst));

        // 2. The folded layer's files: a second name for that data, and the merged bitmap.
        let stem = format!(
            "layer-{:06}-f{}",
            upper.generation,
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let data = Layer::data_path(&self.dir, &stem);
        std::fs::hard_link(upper.layer.data_file_path(), &data)
            .ctx(|| format!("link {}", data.display()))?;
        let bitmap = Layer::bitmap_path(&self.dir, &stem);
        let hashes = Layer::hashes_path(&self.dir, &stem);
        let undo = |e: BlockError| {
            let _ = std::fs::remove_file(&data);
            let _ = std::fs::remove_file(&bitmap);
            let _ = std::fs::remove_file(&hashes);
            e
        };
        write_bitmap_file(&bitmap, &encode_bitmaps(&merged), true)
            .ctx(|| format!("write {}", bitmap.display()))
            .map_err(undo)?;
        // Parent dedupe's index: the two layers' hash lists merged (no block is read), so the
        // folded layer's next use needs none. Only a hint: a failure costs reads later.
        if let Err(e) = self.merge_hashes(&lower, &upper, &stem) {
            tracing::warn!(generation, error = %e, "fold: cannot merge the layers' hash lists");
            let _ = std::fs::remove_file(&hashes);
        }
        let (layer, _) =
            Layer::open(&self.dir, &stem, g, None, &self.files, false).map_err(undo)?;
        let folded = Arc::new(Entry {
            generation: upper.generation,
            id: upper.id,
            parent: lower.parent,
            stem,
            replaces: vec![lower.stem.clone(), upper.stem.clone()],
            layer: Arc::new(layer),
            export: Mutex::new(upper.export_state().clone()),
            durable: true.into(),
        });

        // 3. Commit: the folded layer's meta replaces both, on disk and in memory at once.
        {
            let _m = self
                .meta_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let prepared = folded.meta().prepare(&self.dir).map_err(undo)?;
            let mut stack = self.stack.write().unwrap_or_else(PoisonError::into_inner);
            let i = stack
                .layers
                .iter()
                .position(|e| Arc::ptr_eq(e, &upper))
                .ok_or(BlockError::NoSuchGeneration(generation))
                .map_err(undo)?;
            prepared
                .install()
                .ctx(|| format!("commit the fold of generation {generation}"))
                .map_err(undo)?;
            stack.layers[i] = folded.clone();
            stack.layers.remove(i + 1);
        }
        let meta = LayerMeta::path(&self.dir, &folded.stem);
        fsutil::sync_parent(&meta).ctx(|| format!("sync {}", meta.display()))?;

        // 4. What the two layers leave is no longer listed; a crash before this removes it at
        // the next start.
        for e in [&upper, &lower] {
            e.layer.remove_files();
            let _ = std::fs::remove_file(LayerMeta::path(&self.dir, &e.stem));
        }
        Ok(())
    }
}
