//! virtio-fs for vsnap: a FUSE passthrough server over vhost-user whose inodes are held by hard
//! links in a private workdir instead of open fds.
//!
//! - [`abi`]: the FUSE wire structs;
//! - [`request`]: decoding a request (pure);
//! - [`sys`]: every system call, in thin wrappers; the [`sys::Name`] type that the name check
//!   alone can build;
//! - [`guest_io`]: READ and WRITE data moved by the kernel between files and guest memory;
//! - [`inode_store`]: the inodes the guest holds (workdir links, fd fallbacks);
//! - [`inode_table`]: their compact table (fixed-size records, node ids with generations);
//! - [`passthrough`]: the file system operations on the shared directory (no path leaves it);
//! - [`sandbox`]: the process confinement (namespaces, `pivot_root`, capabilities, seccomp);
//! - [`server`]: FUSE dispatch: INIT negotiation, one request in, one reply out;
//! - [`device`]: the vhost-user backend (hiprio + request queues).

pub mod abi;
pub mod device;
pub mod guest_io;
pub mod inode_store;
pub mod inode_table;
pub mod passthrough;
pub mod request;
pub mod sandbox;
pub mod server;
pub mod sys;
