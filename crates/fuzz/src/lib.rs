//! Fuzz harnesses for every parser of outside input in vsnap, one function per target, each
//! `fn(&[u8])` that panics only when the code under test breaks a property. The same functions
//! serve two drivers (docs/fuzzing.md):
//!
//! - cargo-fuzz / libFuzzer (`fuzz/` at the repository root, nightly, run by hand);
//! - [`runner`]: a bounded, seeded, deterministic run on the stable toolchain, part of
//!   `cargo test` (`tests/smoke.rs`), mutating a seed corpus of valid messages built here.
//!
//! Targets: [`fuse_decode`], [`fuse_handle`], [`fuse_chain`], [`diff_decode`],
//! [`http_request`], [`blk_request`]; [`TARGETS`] lists them with their seeds.

pub mod blk_request;
pub mod corpus;
pub mod diff_decode;
pub mod fuse_chain;
pub mod fuse_decode;
pub mod fuse_handle;
pub mod http_request;
pub mod mutate;
pub mod runner;
mod scratch;
mod sys;

pub use blk_request::blk_request;
pub use diff_decode::diff_decode;
pub use fuse_chain::fuse_chain;
pub use fuse_decode::fuse_decode;
pub use fuse_handle::fuse_handle;
pub use http_request::http_request;

/// A harness with what the stable runner needs to drive it.
#[derive(Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Valid inputs to mutate (also written to `fuzz/corpus/<name>/`).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator splices in.
    pub dict: &'static [&'static [u8]],
    /// Inputs are cut to this length.
    pub max_len: usize,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "fuse_decode",
        run: fuse_decode,
        seeds: fuse_decode::seeds,
        dict: fuse_decode::DICT,
        max_len: 4096,
    },
    Target {
        name: "fuse_handle",
        run: fuse_handle,
        seeds: fuse_handle::seeds,
        dict: fuse_handle::DICT,
        max_len: 4096,
    },
    Target {
        name: "fuse_chain",
        run: fuse_chain,
        seeds: fuse_chain::seeds,
        dict: fuse_chain::DICT,
        max_len: 8 << 10,
    },
    Target {
        name: "diff_decode",
        run: diff_decode,
        seeds: diff_decode::seeds,
        dict: diff_decode::DICT,
        max_len: 64 << 10,
    },
    Target {
        name: "http_request",
        run: http_request,
        seeds: http_request::seeds,
        dict: http_request::DICT,
        max_len: 80 << 10,
    },
    Target {
        name: "blk_request",
        run: blk_request,
        seeds: blk_request::seeds,
        dict: blk_request::DICT,
        max_len: 8 << 10,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
