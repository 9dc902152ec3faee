//! What vsnap's vhost-user devices (blk, fs) share:
//!
//! - [`chain`]: a descriptor chain split into device-readable and device-writable segments, and
//!   copies between them and host buffers, without assuming any layout;
//! - [`faults`]: guest-caused faults, counted by kind and logged once each;
//! - [`queue`]: draining a virtqueue, EVENT_IDX included;
//! - [`server`]: the listening loop with reconnects and clean shutdown.

pub mod chain;
pub mod faults;
pub mod queue;
pub mod server;

pub use chain::{gather, scatter, Seg, Segments};
pub use faults::Faults;
pub use server::{serve, serve_listener, Device, ServeError, Stopper};
