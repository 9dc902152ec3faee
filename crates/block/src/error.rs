use std::io;
use std::path::PathBuf;

/// Errors of the block layer. Request errors (`OutOfRange`, `ReadOnly`, `Unaligned`) are the
/// guest's fault and map to a virtio IOERR; `Io` is the host's.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request [{offset}, +{len}) lies outside the {capacity}-byte device")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("request offset {offset} or length {len} is not a multiple of 512 bytes")]
    Unaligned { offset: u64, len: u64 },
    #[error("the device is read-only")]
    ReadOnly,
    #[error("invalid geometry: {0}")]
    Geometry(String),
    #[error("state directory {path}: {msg}")]
    State { path: PathBuf, msg: String },
    #[error("state directory {path} is in use by {holder} (one daemon or writing command per state directory)")]
    Locked { path: PathBuf, holder: String },
    #[error("base image {path} is not the one the disk was made on: {msg}")]
    BaseChanged { path: PathBuf, msg: String },
    #[error("generation {0} does not exist")]
    NoSuchGeneration(u64),
    #[error("{0}")]
    Conflict(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Diff(#[from] crate::diff::DiffError),
}

pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// Attaches a description of what was being done to an I/O error.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| BlockError::Io {
            context: context(),
            source,
        })
    }
}
