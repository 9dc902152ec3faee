//! The control API's request and response bodies (docs/api.md, docs/openapi.yaml).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What the device around the disk reports (the blk device fills this in).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub kind: String,
    pub socket: PathBuf,
    pub queues: u16,
    pub connected: bool,
    pub serial: String,
    /// Bad guest requests, by kind.
    pub faults: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CutRequest {
    /// Make the frozen layer and its bitmaps durable (fsync) before the cut returns; the guest
    /// resumes first (a frozen layer no longer changes).
    #[serde(default)]
    pub durable: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    #[default]
    Vsnap,
    Qcow2,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// Absolute path of the file to create; it must not exist.
    pub path: PathBuf,
    #[serde(default)]
    pub format: ExportFormat,
    /// qcow2 only: the image the overlay's unallocated clusters read from (the parent).
    #[serde(default)]
    pub backing: Option<PathBuf>,
    /// vsnap format only: `none` or `zstd[:LEVEL]` (default `zstd:3`).
    #[serde(default)]
    pub compression: vsnap_block::diff::Compression,
    /// vsnap format only: raw bytes per frame, a multiple of the block size (default 1 MiB).
    /// Smaller frames make the random reads of a chain cheaper.
    #[serde(default)]
    pub frame_size: Option<u32>,
    /// vsnap format only: store blocks the parent state already holds as references to them
    /// (default true; docs/diff-format.md).
    #[serde(default)]
    pub dedupe: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FoldRequest {
    /// Fold even if the generations were not exported.
    #[serde(default)]
    pub force: bool,
}

/// State of an export job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportStatus {
    pub generation: u64,
    pub state: vsnap_block::ExportPhase,
    pub path: Option<PathBuf>,
    pub done_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub error: Option<String>,
    /// What the finished diff costs (vsnap format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub figures: Option<DiffFigures>,
}

/// The storage figures of an exported diff (`vsnap diff inspect` reports the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiffFigures {
    /// Bytes of the dirty blocks, uncompressed.
    pub raw_bytes: u64,
    /// Bytes the data takes in the file (compressed frames and reference checksums).
    pub stored_bytes: u64,
    /// Dirty blocks stored as references to the parent state (parent dedupe).
    pub referenced_blocks: u64,
    /// raw_bytes / stored_bytes (1 when nothing is stored).
    pub compression_ratio: f64,
}

impl From<vsnap_block::diff::DataStats> for DiffFigures {
    fn from(s: vsnap_block::diff::DataStats) -> Self {
        DiffFigures {
            raw_bytes: s.raw_bytes,
            stored_bytes: s.stored_bytes,
            referenced_blocks: s.referenced_blocks,
            compression_ratio: s.compression_ratio(),
        }
    }
}
