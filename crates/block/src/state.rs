//! The state directory: a manifest naming the base image, the diff chain below the layers and the
//! layers themselves, written atomically; plus each layer's data and bitmap files.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{BlockError, IoContext, Result};
use crate::fsutil;
use crate::geometry::Geometry;

pub const MANIFEST: &str = "vsnap-state.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub geometry: Geometry,
    pub base: Option<PathBuf>,
    /// Diffs between the base and the first layer, oldest first.
    pub chain: Vec<PathBuf>,
    /// Layers, oldest first; the last one is the active (writable) layer.
    pub layers: Vec<LayerMeta>,
    /// False while a daemon has the disk open; found false at open means it did not close cleanly.
    pub clean: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerMeta {
    pub generation: u64,
    pub id: Uuid,
    /// The layer (or chain diff) below; nil when it lies directly on the base.
    pub parent: Uuid,
    /// File name stem of the layer's `.data` and `.bitmap` files.
    pub stem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported: Option<PathBuf>,
}

impl Manifest {
    pub fn new(geometry: Geometry, base: Option<PathBuf>, chain: Vec<PathBuf>) -> Self {
        Self {
            format: FORMAT,
            geometry,
            base,
            chain,
            layers: Vec::new(),
            clean: true,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST)
    }

    /// `Ok(None)` when the directory holds no disk yet.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("read {}", path.display())),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| BlockError::State {
            path: path.clone(),
            msg: format!("unreadable manifest: {e}"),
        })?;
        let bad = |msg: &str| BlockError::State {
            path: path.clone(),
            msg: msg.into(),
        };
        if m.format != FORMAT {
            return Err(bad(&format!("unsupported state format {}", m.format)));
        }
        Geometry::new(m.geometry.size, m.geometry.block_size).map_err(|e| bad(&e.to_string()))?;
        if m.layers.is_empty() {
            return Err(bad("no layers"));
        }
        if m.layers
            .iter()
            .any(|l| l.stem.contains('/') || l.stem.starts_with('.'))
        {
            return Err(bad("layer file stem is not a plain name"));
        }
        Ok(Some(m))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        fsutil::write_atomic(&path, &bytes).ctx(|| format!("write {}", path.display()))
    }
}
