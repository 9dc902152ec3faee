//! virtio-blk over vhost-user, served from the vsnap block layer.
//!
//! - [`config`]: the config space and feature bits;
//! - [`parse`]: the typed request made of a header and data lengths (pure: no memory, no disk);
//! - [`request`]: descriptor chains → parsed requests → block-layer calls (no sockets);
//! - [`cache_mode`]: the write-cache mode the guest set, kept across daemon restarts;
//! - [`backend`]: the device (features, config space, one chain at a time) that
//!   `vsnap_vhost::serve` runs in its backend shell.

pub mod backend;
pub mod cache_mode;
pub mod config;
pub mod parse;
pub mod request;

pub use backend::{BlkBackend, BlkOptions, MAX_QUEUE_SIZE};
pub use cache_mode::CacheModeFile;
pub use vsnap_vhost::{serve, ServeError, Stopper};
