//! The stack a read walks: the active layer, then frozen layers newest first, then diffs the disk
//! was started from, then the base image. Resolving a byte range yields runs served from one
//! source each, so a request turns into as few reads as possible.

use std::sync::{Arc, Mutex, PoisonError};

use uuid::Uuid;

use crate::diff::DiffFile;
use crate::geometry::Geometry;
use crate::job::Job;
use crate::layer::Layer;
use crate::state::LayerMeta;
use crate::tracker::BlockState;

/// Where a generation's export stands.
#[derive(Clone, Debug)]
pub enum ExportState {
    None,
    Running {
        path: std::path::PathBuf,
        job: Job,
    },
    Done {
        path: std::path::PathBuf,
    },
    Failed {
        path: std::path::PathBuf,
        error: String,
    },
}

/// Where a generation's export stands, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportPhase {
    None,
    Running,
    Done,
    Failed,
}

impl ExportState {
    pub fn phase(&self) -> ExportPhase {
        match self {
            ExportState::None => ExportPhase::None,
            ExportState::Running { .. } => ExportPhase::Running,
            ExportState::Done { .. } => ExportPhase::Done,
            ExportState::Failed { .. } => ExportPhase::Failed,
        }
    }
}

/// One layer of the stack and what the manifest says of it.
pub struct Entry {
    pub generation: u64,
    pub id: Uuid,
    pub parent: Uuid,
    pub stem: String,
    /// A folded layer: the stems of the layers it replaced (kept in its meta).
    pub replaces: Vec<String>,
    pub layer: Arc<Layer>,
    pub export: Mutex<ExportState>,
    /// Set once a frozen layer has been made durable (data and bitmap): it never changes
    /// again, so later flushes skip it.
    pub durable: std::sync::atomic::AtomicBool,
}

impl Entry {
    pub fn meta(&self) -> LayerMeta {
        LayerMeta {
            generation: self.generation,
            id: self.id,
            parent: self.parent,
            stem: self.stem.clone(),
            exported: match &*self.export_state() {
                ExportState::Done { path } => Some(path.clone()),
                _ => None,
            },
            replaces: self.replaces.clone(),
        }
    }

    pub fn export_state(&self) -> std::sync::MutexGuard<'_, ExportState> {
        self.export.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn is_exported(&self) -> bool {
        matches!(*self.export_state(), ExportState::Done { .. })
    }
}

pub struct Stack {
    /// Newest first: `layers[0]` is the active layer.
    pub layers: Vec<Arc<Entry>>,
    /// The diffs the disk was started from, newest first.
    pub chain: Vec<Arc<DiffFile>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Layer(usize),
    Chain(usize),
    Zero,
    Base,
}

impl Stack {
    pub fn active(&self) -> &Arc<Entry> {
        &self.layers[0]
    }

    /// Splits device bytes `[offset, end)` into runs `(start, end, source)`, skipping the first
    /// `skip` layers (1 = read what lies below the active layer).
    pub fn resolve(&self, g: Geometry, offset: u64, end: u64, skip: usize) -> Vec<(u64, u64, Src)> {
        let trackers: Vec<_> = self.layers[skip..]
            .iter()
            .map(|e| e.layer.tracker())
            .collect();
        let mut out: Vec<(u64, u64, Src)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / g.bs();
            let idx = Geometry::idx(b);
            let stop = g.block_span(b).1.min(end);
            let mut src = None;
            for (i, t) in trackers.iter().enumerate() {
                match t.state(idx) {
                    BlockState::Dirty => src = Some(Src::Layer(i + skip)),
                    BlockState::Zero => src = Some(Src::Zero),
                    BlockState::Untouched => continue,
                }
                break;
            }
            let src = src.unwrap_or_else(|| {
                for (i, d) in self.chain.iter().enumerate() {
                    match d.state(b) {
                        BlockState::Dirty => return Src::Chain(i),
                        BlockState::Zero => return Src::Zero,
                        BlockState::Untouched => {}
                    }
                }
                Src::Base
            });
            match out.last_mut() {
                Some(last) if last.2 == src && last.1 == pos => last.1 = stop,
                _ => out.push((pos, stop, src)),
            }
            pos = stop;
        }
        out
    }

    pub fn find(&self, generation: u64) -> Option<(usize, &Arc<Entry>)> {
        self.layers
            .iter()
            .enumerate()
            .find(|(_, e)| e.generation == generation)
    }
}
