//! What vsnap's vhost-user devices (blk, fs) share:
//!
//! - [`shell`]: the one `VhostUserBackend` every device runs in: memory, EVENT_IDX, worker
//!   threads, exit events, connection state, in-flight accounting; a [`Device`] adds only its
//!   features, config space and what to do with one chain;
//! - [`server`]: the listening loop with reconnects and clean shutdown;
//! - [`listen`]: the listening socket, never taken over from a live daemon; `--fd` and systemd
//!   socket activation;
//! - [`chain`]: a descriptor chain split into device-readable and device-writable segments, and
//!   copies between them and host buffers, without assuming any layout;
//! - [`queue`]: reading the available ring; a corrupt one stops its queue;
//! - [`pacing`]: when a queue worker looks at an empty ring before sleeping, and when it
//!   signals completions;
//! - [`faults`]: guest-caused faults, counted by kind and logged once each;
//! - [`inflight`]: the vhost-user inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`);
//! - [`interpose`]: answers the inflight messages the framework cannot, and forwards the rest.

pub mod chain;
pub mod faults;
pub mod inflight;
pub mod interpose;
pub mod listen;
pub mod pacing;
pub mod queue;
pub mod server;
pub mod shell;

pub use chain::{gather, scatter, Seg, SegList, Segments};
pub use faults::Faults;
pub use server::{serve, serve_listener, ServeError, Stopper};
pub use shell::{Completion, Device, Shell};
