//! virtio-fs for vsnap: a FUSE passthrough server over vhost-user whose inodes are held by hard
//! links in a private workdir instead of open fds.
//!
//! - [`abi`]: the FUSE wire structs;
//! - [`request`]: decoding a request (pure);
//! - [`inode_store`]: the inode table (workdir links, fd fallbacks);
//! - [`passthrough`]: the file system operations on the shared directory (the sandbox lives here);
//! - [`server`]: FUSE dispatch: INIT negotiation, one request in, one reply out;
//! - [`device`]: the vhost-user backend (hiprio + request queues).

pub mod abi;
pub mod device;
pub mod inode_store;
pub mod passthrough;
pub mod request;
pub mod server;
mod sys;
