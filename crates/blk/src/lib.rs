//! virtio-blk over vhost-user, served from the vsnap block layer.
//!
//! - [`config`]: the config space and feature bits;
//! - [`request`]: descriptor chains → requests → block-layer calls (pure, no sockets);
//! - [`backend`]: the `VhostUserBackend` (one worker per queue), served by `vsnap_vhost::serve`.

pub mod backend;
pub mod config;
pub mod request;

pub use backend::{BlkBackend, BlkOptions};
pub use vsnap_vhost::{serve, ServeError, Stopper};
