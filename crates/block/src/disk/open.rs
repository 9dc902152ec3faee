//! Opening a disk: the lock, the manifest and its checks (base identity, chain), the layer
//! stack from the meta files, recovery after a crash, and the removal of leftovers.

use std::fs::File;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use uuid::Uuid;

use super::{Disk, DiskOptions};
use crate::diff::{check_chain, check_root, read_chain, DiffFile, ImageParent, ParentState};
use crate::error::{BlockError, IoContext, Result};
use crate::fdcache::{FdCache, DEFAULT_CAPACITY};
use crate::geometry::Geometry;
use crate::job::Job;
use crate::layer::{self, Layer};
use crate::range_lock::RangeLock;
use crate::stack::{Entry, ExportState, Stack};
use crate::state::{BaseIdentity, LayerMeta, Manifest, PendingExports, StateLock, LOCK, MANIFEST};
use crate::stats::Stats;
use crate::tracker::runs;

impl Disk {
    /// Opens the disk in `opts.state_dir`, creating it when the directory holds none.
    pub fn open(opts: &DiskOptions) -> Result<Self> {
        let dir = &opts.state_dir;
        if !opts.readonly {
            std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        }
        let lock = StateLock::acquire(dir, !opts.readonly)?;
        let state_err = |msg: String| BlockError::State {
            path: dir.clone(),
            msg,
        };
        let files = Arc::new(FdCache::new(DEFAULT_CAPACITY));
        let (mut manifest, created) = match Manifest::load(dir)? {
            Some(m) => {
                if opts.base.is_some() && opts.base != m.base {
                    return Err(state_err(format!(
                        "holds a disk over base {:?}, not {:?}",
                        m.base, opts.base
                    )));
                }
                if let Some(size) = opts.size.filter(|&s| s != m.geometry.size) {
                    return Err(state_err(format!(
                        "holds a {}-byte disk, not {size}",
                        m.geometry.size
                    )));
                }
                (m, false)
            }
            None if opts.readonly => return Err(state_err("holds no disk".into())),
            None => (Self::create(opts, &files)?, true),
        };
        let g = manifest.geometry;
        let base = Self::open_base(&mut manifest, g)?;
        let chain = manifest
            .chain
            .iter()
            .map(|p| DiffFile::open(p))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if !created {
            Self::check_chain_fits(dir, &chain, g)?;
        }
        if !opts.readonly {
            manifest.upgrade(dir)?;
        }
        // The oldest layer lies on the newest chain diff (or the base): a chain diff replaced
        // under its path would otherwise be served under layers cut from something else.
        let bottom = chain.last().map_or(Uuid::nil(), |d| d.header.id);
        let (metas, replaced) = if manifest.layers.is_empty() {
            LayerMeta::load_stack(dir, bottom)?
        } else {
            // A format-1 manifest opened read-only.
            (manifest.layers.clone(), Vec::new())
        };
        if metas[0].parent != bottom {
            return Err(state_err(format!(
                "the oldest layer lies on {}, but the chain ends in {bottom}",
                metas[0].parent
            )));
        }
        let active_stem = &metas.last().expect("load_stack returns layers").stem;
        let clean = manifest.clean;
        let mut layers = Vec::new();
        let mut from_live = 0;
        for meta in metas.iter().rev() {
            let pin = (&meta.stem == active_stem).then_some(!opts.readonly);
            let (layer, live) = Layer::open(dir, &meta.stem, g, pin, &files, !clean)?;
            from_live += u64::from(live);
            layers.push(Arc::new(Entry {
                generation: meta.generation,
                id: meta.id,
                parent: meta.parent,
                stem: meta.stem.clone(),
                replaces: meta.replaces.clone(),
                layer: Arc::new(layer),
                export: Mutex::new(match &meta.exported {
                    Some(p) => ExportState::Done { path: p.clone() },
                    None => ExportState::None,
                }),
                durable: Default::default(),
            }));
        }
        let disk = Self {
            geom: g,
            readonly: opts.readonly,
            dir: dir.clone(),
            manifest,
            base,
            stack: RwLock::new(Stack {
                layers,
                chain: chain.into_iter().rev().map(Arc::new).collect(),
            }),
            locks: RangeLock::default(),
            in_flight: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            cut_lock: Mutex::new(()),
            meta_lock: Mutex::new(()),
            files,
            stats: Stats::default(),
            _lock: lock,
        };
        if !clean {
            disk.recover(from_live)?;
        }
        if !opts.readonly {
            disk.settle()?;
            disk.remove_leftovers(&replaced);
            let (exports, bytes) = PendingExports::clean_up(dir);
            if exports > 0 {
                tracing::warn!(
                    exports,
                    bytes,
                    "removed the temporary files of interrupted exports"
                );
            }
            disk.save_manifest(false)?;
        }
        Ok(disk)
    }

    /// Opens the base and checks it is the image the disk was made on.
    fn open_base(manifest: &mut Manifest, g: Geometry) -> Result<Option<File>> {
        let Some(p) = manifest.base.clone() else {
            return Ok(None);
        };
        let f = File::open(&p).ctx(|| format!("open base image {}", p.display()))?;
        let now = BaseIdentity::of(&p)?;
        let changed = |msg: String| BlockError::BaseChanged {
            path: p.clone(),
            msg,
        };
        match &manifest.base_identity {
            Some(was) if was.size != now.size => {
                return Err(changed(format!(
                    "it has {} bytes, the disk was made on {}",
                    now.size, was.size
                )))
            }
            Some(was) if *was != now => {
                return Err(changed(format!(
                    "its content changed (fingerprint {}, the disk was made on {})",
                    now.fingerprint, was.fingerprint
                )))
            }
            Some(_) => {}
            // A state directory from before identities were recorded: trust this base now, and
            // check it from here on.
            None if now.size == g.size => manifest.base_identity = Some(now),
            None => {
                return Err(changed(format!(
                    "it has {} bytes, the disk {}",
                    now.size, g.size
                )))
            }
        }
        Ok(Some(f))
    }

    fn check_chain_fits(dir: &std::path::Path, chain: &[DiffFile], g: Geometry) -> Result<()> {
        if chain.is_empty() {
            return Ok(());
        }
        check_chain(chain)?;
        if chain[0].geometry() != g {
            return Err(BlockError::State {
                path: dir.to_owned(),
                msg: "diff chain geometry differs from the disk's".into(),
            });
        }
        Ok(())
    }

    /// Makes a new disk in `opts.state_dir`: its first layer, then the manifest.
    fn create(opts: &DiskOptions, files: &Arc<FdCache>) -> Result<Manifest> {
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
        let (parent, first_gen) = match chain.last() {
            Some(p) => {
                let h = DiffFile::open(p)?.header;
                (h.id, h.generation + 1)
            }
            None => (Uuid::nil(), 1),
        };
        // Everything is checked before anything is written.
        let diffs = chain
            .iter()
            .map(|p| DiffFile::open(p))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::check_chain_fits(&opts.state_dir, &diffs, g)?;
        check_root(&diffs, opts.chain_root)?;
        // Every frame, and every reference read from the diffs and base below it and checked:
        // once, here, as raw frames are (reads later are in place).
        let base_file = match &base {
            Some(b) => Some(File::open(b).ctx(|| format!("open base image {}", b.display()))?),
            None => None,
        };
        let read_base = |off: u64, buf: &mut [u8]| match (&base_file, &base) {
            (Some(f), Some(p)) => ImageParent::new(f, p).read_parent(off, buf),
            _ => {
                buf.fill(0);
                Ok(())
            }
        };
        for (i, d) in diffs.iter().enumerate() {
            let below: Vec<&DiffFile> = diffs[..i].iter().rev().collect();
            let parent = |off: u64, buf: &mut [u8]| read_chain(&below, &read_base, off, buf);
            d.verify_in(&Job::new(), &parent)?;
        }
        let mut m = Manifest::new(g, base, chain);
        m.base_identity = match &m.base {
            Some(b) => Some(BaseIdentity::of(b)?),
            None => None,
        };
        let meta = LayerMeta {
            generation: first_gen,
            id: Uuid::new_v4(),
            parent,
            stem: format!("layer-{first_gen:06}"),
            exported: None,
            replaces: Vec::new(),
        };
        Layer::create(&opts.state_dir, &meta.stem, g, files)?;
        meta.save(&opts.state_dir)?;
        // Last: a directory without a manifest holds no disk, whatever else is in it.
        m.save(&opts.state_dir)?;
        Ok(m)
    }

    /// After a crash. On the same boot the live states are the truth (every write the guest saw
    /// complete is in them and in the page cache); after a reboot the bitmaps of the last flush
    /// are, and blocks written since, which virtio allows to be lost, are dropped: every block
    /// reads old or new, never torn between layers. Either way, bytes of blocks the states do
    /// not call dirty (writes in flight at the crash, or dropped) are punched, so the files
    /// match their states exactly.
    fn recover(&self, from_live: u64) -> Result<()> {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        let mut dropped = 0u64;
        if !self.readonly {
            for e in &stack.layers {
                let before = e.layer.allocated_bytes();
                let mut stale = roaring::RoaringBitmap::new();
                stale.insert_range(0..=Geometry::idx(self.geom.blocks() - 1));
                stale -= e.layer.tracker().dirty();
                let f = e.layer.open_writable()?;
                for (s, end) in runs(&stale) {
                    let (a, b) = (
                        u64::from(s) * self.geom.bs(),
                        (end * self.geom.bs()).min(self.geom.size),
                    );
                    layer::punch(&f, e.layer.data_file_path(), a, b - a)?;
                }
                dropped += before.saturating_sub(e.layer.allocated_bytes());
            }
        }
        let layers = stack.layers.len() as u64;
        if from_live == layers {
            tracing::warn!(
                state_dir = %self.dir.display(),
                "the disk was not closed cleanly: recovered every completed write from the live block states"
            );
        } else {
            tracing::warn!(
                state_dir = %self.dir.display(),
                dropped_bytes = dropped,
                live_layers = from_live,
                layers,
                "the disk was not closed cleanly, and not on this boot: serving it as of its last flush; writes the guest had not flushed are dropped"
            );
        }
        Ok(())
    }

    /// Makes what open found durable (recovered states included) before anything new is
    /// written: every layer persisted once, frozen ones marked so and their live files gone,
    /// and the active layer recording live states again.
    fn settle(&self) -> Result<()> {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        if !self.manifest.clean {
            stack.active().layer.persist()?;
        }
        for e in &stack.layers[1..] {
            if self.manifest.clean {
                e.durable.store(true, std::sync::atomic::Ordering::Release);
                e.layer.remove_live();
            } else {
                Self::persist_frozen(e)?;
            }
        }
        stack.active().layer.start_live()
    }

    /// Removes what no layer of the stack owns: files of layers a fold replaced, of a cut or
    /// fold that never committed, and temporary files of interrupted meta and bitmap writes.
    fn remove_leftovers(&self, replaced: &[String]) {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        let known: Vec<&str> = stack.layers.iter().map(|e| e.stem.as_str()).collect();
        let chain_ids: Vec<String> = stack
            .chain
            .iter()
            .map(|d| d.header.id.simple().to_string())
            .collect();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut removed = 0;
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name == MANIFEST || name == LOCK {
                continue;
            }
            let ours = if name.starts_with('.') {
                // AtomicFile temporaries of the manifest, metas, bitmaps and hash files.
                name.contains(".vsnap-partial-")
            } else if let Some(id) = name
                .strip_prefix("chain-")
                .and_then(|n| n.strip_suffix(".hashes"))
            {
                // The hash list of a diff not in the chain (the chain never changes: damage).
                !chain_ids.contains(&id.to_string())
            } else {
                let stem = [
                    ".data",
                    ".bitmap",
                    ".bitmap.spare",
                    ".meta",
                    ".live",
                    ".hashes",
                ]
                .iter()
                .find_map(|sfx| name.strip_suffix(sfx));
                stem.is_some_and(|s| s.starts_with("layer-") && !known.contains(&s))
            };
            if ours && std::fs::remove_file(f.path()).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                files = removed,
                folded_away = replaced.len(),
                "removed leftover layer files"
            );
        }
    }
}
