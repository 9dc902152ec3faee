//! virtio-blk over vhost-user, served from the vsnap block layer.
//!
//! - [`config`]: the config space and feature bits;
//! - [`request`]: descriptor chains → requests → block-layer calls (pure, no sockets);
//! - [`cache_mode`]: the write-cache mode the guest set, kept across daemon restarts;
//! - [`backend`]: the device (features, config space, one chain at a time) that
//!   `vsnap_vhost::serve` runs in its backend shell.

pub mod backend;
pub mod cache_mode;
pub mod config;
pub mod request;

pub use backend::{BlkBackend, BlkOptions};
pub use cache_mode::CacheModeFile;
pub use vsnap_vhost::{serve, ServeError, Stopper};
