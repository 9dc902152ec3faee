//! vsnap's block layer: a read-only base image under a stack of tracked layers, exact
//! zero/discard semantics, snapshot cuts, and the diff format with its tools.
//!
//! Nothing here knows about virtio or sockets; the virtio-blk device drives [`Disk`].

mod dedupe;
pub mod diff;
mod disk;
mod error;
mod fdcache;
pub mod fsutil;
mod geometry;
pub mod image;
mod job;
mod layer;
mod live;
mod range_lock;
mod stack;
mod state;
mod stats;
pub mod tracker;
pub mod zero;

pub use disk::{CutReport, Disk, DiskInfo, DiskOptions, Io, LayerInfo};
pub use error::{BlockError, Result};
pub use geometry::{Geometry, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, SECTOR};
pub use job::{Cancelled, Job};
pub use stack::ExportPhase;
pub use state::{BaseIdentity, LayerMeta, Manifest};
pub use stats::{Stats, StatsSnapshot};
pub use tracker::{BlockState, Tracker};
