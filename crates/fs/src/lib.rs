//! virtio-fs for vsnap (in progress): a FUSE passthrough over a host directory whose inodes are
//! kept alive by hard links in a private workdir instead of open file descriptors.
//!
//! Done: [`inode_store`], the inode table with its workdir. To come: FUSE wire structs and
//! dispatch, the passthrough operations, the vhost-user backend (see issue 5).

pub mod inode_store;
