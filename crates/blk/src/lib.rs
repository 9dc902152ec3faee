//! virtio-blk over vhost-user, served from the vsnap block layer.
//!
//! - [`config`]: the config space and feature bits;
//! - [`request`]: descriptor chains → requests → block-layer calls (pure, no sockets);
//! - [`backend`]: the `VhostUserBackend` (one worker per queue);
//! - [`server`]: the listening loop with reconnects and clean shutdown.

pub mod backend;
pub mod config;
pub mod request;
pub mod server;

pub use backend::{BlkBackend, BlkOptions};
pub use server::{serve, ServeError, Stopper};
