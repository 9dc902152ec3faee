//! The vsnap diff: one layer's dirty and zero bitmaps plus the dirty blocks' bytes, in a
//! self-describing, checksummed file (docs/diff-format.md), and the tools over it. Version 2
//! stores the bytes as independently compressed frames with an index, so one block is read by
//! decoding one frame; version 1 (raw bytes, per-chunk checksums) is still read everywhere.
//! A version-2 diff may store dirty blocks its parent state already holds as references to
//! them (parent dedupe): every reader resolves those against the disk below the diff.

mod apply;
mod cache;
mod chain;
mod file;
mod format;
mod frame;
pub mod qcow2;
mod squash;
pub mod v1;
pub mod v2;
mod write;

pub use apply::{apply, apply_to, check_chain, check_root, ChainRoot};
pub use chain::{read_chain, ImageParent, ParentState};
pub use file::{DataStats, DiffFile, Piece};
pub use format::{
    DiffHeader, FRAME_SIZE, HEADER_LEN, MAGIC, MAX_FRAME_SIZE, TRAILER_MAGIC, VERSION, VERSION_1,
};
pub use frame::{combine_crcs, Codec, Compression, Frame, FrameProblem};
pub use squash::{squash, squash_with};
pub use write::{write_diff, write_diff_spec, BlockSource, DiffSpec, References, WriteOptions};

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("not a vsnap diff (bad magic)")]
    BadMagic,
    #[error("unsupported diff version {0} (this build reads versions {VERSION_1} and {VERSION})")]
    Version(u32),
    #[error("truncated or overlong: the diff describes {expected} bytes, the file has {actual}")]
    Length { expected: u64, actual: u64 },
    #[error("checksum mismatch in the {0}")]
    Checksum(&'static str),
    #[error("trailer magic missing (truncated?)")]
    NoTrailer,
    #[error("frame index: {0}")]
    Index(String),
    #[error("frame {frame} (raw data offset {raw_offset}): {problem}")]
    Frame {
        frame: usize,
        raw_offset: u64,
        problem: FrameProblem,
    },
    #[error("{0}: this build does not read it")]
    Unsupported(String),
    /// A reference entry (parent dedupe) that cannot be resolved: see [`RefProblem`].
    #[error("frame {frame} refers to parent blocks {first}..{end}: {problem}")]
    Reference {
        frame: usize,
        first: u64,
        end: u64,
        problem: RefProblem,
    },
    #[error("invalid write options: {0}")]
    Options(String),
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("{what} mismatch: expected {expected}, found {found}")]
    Mismatch {
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("chain out of order: diff #{index} ({path}) has parent {found}, but the diff before it is {expected}")]
    Chain {
        index: usize,
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path} applies on top of diff {parent}, not on the base image: give the chain from its first diff (or allow a foreign parent if the base already holds that diff)")]
    ForeignParent { path: String, parent: String },
    #[error("cancelled")]
    Cancelled,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// Why a reference to parent-state blocks is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefProblem {
    /// A dangling reference: it names blocks the device does not have.
    #[error("outside the {blocks}-block device")]
    OutsideDevice { blocks: u64 },
    /// The parent block does not hold the bytes the diff recorded for it: the disk below is not
    /// the one the diff was cut on (another base, or a chain in another order).
    #[error("parent block {block} does not hold the bytes this diff recorded: the disk below is not the one this diff was cut on")]
    Mismatch { block: u64 },
    /// The reader has no parent state to read the blocks from.
    #[error("{0}")]
    NoParent(String),
}

impl From<crate::job::Cancelled> for DiffError {
    fn from(_: crate::job::Cancelled) -> Self {
        DiffError::Cancelled
    }
}

pub(crate) trait DiffIo<T> {
    fn dctx(self, context: impl FnOnce() -> String) -> Result<T, DiffError>;
}

impl<T> DiffIo<T> for io::Result<T> {
    fn dctx(self, context: impl FnOnce() -> String) -> Result<T, DiffError> {
        self.map_err(|source| DiffError::Io {
            context: context(),
            source,
        })
    }
}
