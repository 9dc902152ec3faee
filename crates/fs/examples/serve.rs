//! The fs device alone, for profiling it without the rest of the daemon:
//! `serve SOCKET SHARED_DIR WORKDIR [THREAD_POOL_SIZE]` serves the share as `vsnap fs
//! --sandbox none --seccomp none` would (cache auto, workdir store), until killed.

use std::path::PathBuf;
use std::sync::Arc;

use vsnap_fs::device::{FsBackend, FsOptions};
use vsnap_fs::passthrough::{FsConfig, Passthrough};
use vsnap_fs::server::Server;
use vsnap_vhost::{serve, Stopper};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, sock, share, workdir, rest @ ..] = args.as_slice() else {
        eprintln!("usage: serve SOCKET SHARED_DIR WORKDIR [THREAD_POOL_SIZE]");
        std::process::exit(2);
    };
    let thread_pool_size = rest.first().map_or(0, |n| n.parse().expect("a number"));
    let fs = Passthrough::new(
        &PathBuf::from(share),
        &PathBuf::from(workdir),
        FsConfig::default(),
    )
    .expect("serve the share");
    let backend = FsBackend::new(
        Arc::new(Server::new(fs)),
        FsOptions {
            thread_pool_size,
            ..FsOptions::default()
        },
    )
    .expect("backend");
    serve(Arc::new(backend), &PathBuf::from(sock), &Stopper::new()).expect("serve");
}
