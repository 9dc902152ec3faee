//! Exports to object storage (`"path": "s3://..."`): the diff is written to a local file in the
//! daemon's upload directory, then uploaded (multipart: the object appears only when whole),
//! then the local file is removed. A failed upload keeps the local file, so nothing the export
//! made is lost, and the export can be run again. The generation's export status shows the
//! whole: the URL, running through both phases, the upload's progress, its error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use vsnap_block::{ExportPhase, LayerInfo};
use vsnap_remote::Object;

#[derive(Clone, Debug)]
struct Upload {
    url: String,
    phase: ExportPhase,
    /// Bytes sent and the file's size, once the upload phase began.
    progress: Option<(u64, u64)>,
    error: Option<String>,
}

/// The uploads of this daemon, by generation.
#[derive(Default)]
pub struct Uploads {
    by_generation: Mutex<HashMap<u64, Upload>>,
}

impl Uploads {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<u64, Upload>) -> R) -> R {
        f(&mut self
            .by_generation
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether an upload of `generation` is under way.
    pub fn running(&self, generation: u64) -> bool {
        self.with(|m| {
            m.get(&generation)
                .is_some_and(|u| u.phase == ExportPhase::Running)
        })
    }

    pub fn begin(&self, generation: u64, url: String) {
        self.with(|m| {
            m.insert(
                generation,
                Upload {
                    url,
                    phase: ExportPhase::Running,
                    progress: None,
                    error: None,
                },
            )
        });
    }

    fn update(&self, generation: u64, f: impl FnOnce(&mut Upload)) {
        self.with(|m| m.get_mut(&generation).map(f));
    }

    /// Runs the upload phase of an export whose diff is at `local`; the local file goes once
    /// the object is complete.
    pub fn upload(&self, generation: u64, local: &Path, to: &Object) {
        let total = std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
        self.update(generation, |u| u.progress = Some((0, total)));
        let r = to.upload(local, &mut |sent| {
            self.update(generation, |u| u.progress = Some((sent, total)))
        });
        match r {
            Ok(_) => {
                if let Err(e) = std::fs::remove_file(local) {
                    tracing::warn!(path = %local.display(), error = %e, "removing an uploaded diff");
                }
                tracing::info!(generation, url = %to.url(), bytes = total, "upload done");
                self.update(generation, |u| u.phase = ExportPhase::Done);
            }
            Err(e) => self.fail(
                generation,
                format!("{e} (the diff is kept at {})", local.display()),
            ),
        }
    }

    pub fn fail(&self, generation: u64, error: String) {
        tracing::warn!(generation, error, "export to object storage failed");
        self.update(generation, |u| {
            u.phase = ExportPhase::Failed;
            u.error = Some(error);
        });
    }

    /// The layer as the API reports it: an export to a URL shows the URL and, past the local
    /// phase, the upload's state.
    pub fn overlay(&self, mut l: LayerInfo) -> LayerInfo {
        let Some(u) = self.with(|m| m.get(&l.generation).cloned()) else {
            return l;
        };
        l.export_path = Some(PathBuf::from(&u.url));
        // While the local file is written (or if that failed) the disk's state stands; once
        // it is written, the upload's.
        if l.export == ExportPhase::Done {
            l.export = u.phase;
            l.export_progress = u.progress;
            l.export_error = u.error;
        }
        l
    }
}
