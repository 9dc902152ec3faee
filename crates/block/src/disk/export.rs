//! Export of a frozen generation as a vsnap diff or a qcow2 overlay, in the background while the
//! guest runs (a frozen layer never changes). Exports under way are recorded in the state
//! directory, so a restart after a kill removes their temporary files.

use std::path::Path;
use std::sync::{Arc, PoisonError};

use super::Disk;
use crate::diff::{
    self, write_diff, write_diff_spec, ChainRoot, Compression, DiffError, DiffSpec, References,
    WriteOptions, VERSION,
};
use crate::error::{BlockError, IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::job::Job;
use crate::layer::Layer;
use crate::stack::{Entry, ExportState};
use crate::state::PendingExports;

impl Disk {
    pub(super) fn frozen_entry(&self, generation: u64) -> Result<(Arc<Entry>, Option<Arc<Entry>>)> {
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
        // Recorded before the temporary file exists, so a kill at any point leaves a record
        // a restart can clean up after (see `PendingExports`).
        PendingExports::add(&self.dir, generation, path)?;
        let job = Job::new();
        *st = ExportState::Running {
            path: path.to_owned(),
            job: job.clone(),
        };
        Ok(job)
    }

    /// Undoes [`Disk::start_export`] when the export cannot be run after all (its thread could
    /// not be spawned): the generation is no longer "running" and may be exported again.
    pub fn abort_export(&self, generation: u64, error: &str) {
        if let Ok((entry, _)) = self.frozen_entry(generation) {
            let mut st = entry.export_state();
            if let ExportState::Running { path, .. } = &*st {
                *st = ExportState::Failed {
                    path: path.clone(),
                    error: error.to_owned(),
                };
            }
        }
        PendingExports::remove(&self.dir, generation);
    }

    /// Writes frozen `generation` as a vsnap diff to `path` (or a qcow2 overlay over
    /// `qcow2_backing`) with the default [`WriteOptions`] (version 2, zstd level 3). The guest
    /// keeps running: a frozen layer never changes.
    pub fn run_export(
        &self,
        generation: u64,
        path: &Path,
        qcow2_backing: Option<&Path>,
        job: &Job,
    ) -> Result<diff::DiffHeader> {
        let opts = WriteOptions::default();
        self.run_export_with(generation, path, qcow2_backing, &opts, job)
    }

    /// [`Disk::run_export`], the diff written as `opts` say (a qcow2 overlay ignores them).
    /// With `opts.dedupe` (the default), dirty blocks the disk below the generation already
    /// holds are stored as references to those blocks, each verified byte for byte first.
    pub fn run_export_with(
        &self,
        generation: u64,
        path: &Path,
        qcow2_backing: Option<&Path>,
        opts: &WriteOptions,
        job: &Job,
    ) -> Result<diff::DiffHeader> {
        let (entry, _) = self.frozen_entry(generation)?;
        let r = self.export_entry(&entry, path, qcow2_backing, opts, job);
        // The temporary files are gone (committed or removed) by now.
        PendingExports::remove(&self.dir, generation);
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
            let _m = self
                .meta_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A fold may have replaced the entry meanwhile; its meta is then the folded one's.
            let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, e)) = stack.find(generation) {
                e.meta().save(&self.dir)?;
            }
        }
        r
    }

    /// Exports synchronously (start + run), with the default [`WriteOptions`].
    pub fn export(
        &self,
        generation: u64,
        path: &Path,
        qcow2_backing: Option<&Path>,
    ) -> Result<diff::DiffHeader> {
        self.export_with(generation, path, qcow2_backing, &WriteOptions::default())
    }

    /// Exports synchronously, the diff written as `opts` say.
    pub fn export_with(
        &self,
        generation: u64,
        path: &Path,
        qcow2_backing: Option<&Path>,
        opts: &WriteOptions,
    ) -> Result<diff::DiffHeader> {
        let job = self.start_export(generation, path)?;
        self.run_export_with(generation, path, qcow2_backing, opts, &job)
    }

    fn export_entry(
        &self,
        e: &Arc<Entry>,
        path: &Path,
        qcow2_backing: Option<&Path>,
        opts: &WriteOptions,
        job: &Job,
    ) -> Result<diff::DiffHeader> {
        let tracker = e.layer.tracker().clone();
        let source = LayerSource(&e.layer);
        let Some(backing) = qcow2_backing else {
            // A qcow2 overlay cannot refer to its backing file's clusters: references are for
            // vsnap diffs only.
            let refs = if opts.dedupe && opts.version == VERSION && !self.readonly {
                self.plan_references(e, job)?
            } else {
                References::new()
            };
            let refs = if refs.fits(tracker.dirty(), opts.frame_size, self.geom) {
                refs
            } else {
                tracing::warn!(
                    generation = e.generation,
                    "parent dedupe: the references would need more index entries than a diff holds; stored as data"
                );
                References::new()
            };
            let spec = DiffSpec {
                geometry: self.geom,
                generation: e.generation,
                id: e.id,
                parent: e.parent,
                tracker: &tracker,
                references: &refs,
            };
            return Ok(write_diff_spec(path, false, &spec, &source, opts, job)?);
        };
        // qcow2: through a temporary diff, which the converter streams and verifies; raw, as
        // compressing it would only cost time.
        let tmp = AtomicFile::create(path, false).ctx(|| format!("create {}", path.display()))?;
        let tmp_diff = tmp.temp_path().with_extension("vsnapdiff");
        let raw = WriteOptions {
            compression: Compression::None,
            ..*opts
        };
        let r = write_diff(
            &tmp_diff,
            true,
            self.geom,
            e.generation,
            e.id,
            e.parent,
            &tracker,
            &source,
            &raw,
            job,
        )
        .and_then(|h| {
            // A generation above the first lies on the one below, not on the base: `backing`
            // is the caller's image of that parent.
            diff::qcow2::to_qcow2_over(&tmp_diff, backing, ChainRoot::Foreign, path, false, job)
                .map(|_| h)
        });
        let _ = std::fs::remove_file(&tmp_diff);
        drop(tmp);
        Ok(r?)
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
