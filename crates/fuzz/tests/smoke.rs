//! The bounded fuzz run of every harness on the stable toolchain: 100,000 mutated inputs per
//! target (10,000 for `fuse_chain`) from a fixed seed (VSNAP_FUZZ_ITERS and VSNAP_FUZZ_SEED
//! override both; see docs/fuzzing.md). A failure (panic, hang, huge allocation) prints the
//! input and saves it for `cargo fuzz run`.

use vsnap_fuzz::runner::{run, Config, TrackingAlloc};

// Lets the runner fail an input that makes one huge allocation (see `runner::MAX_ALLOC`).
#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

const ITERS: u64 = 100_000;

fn smoke(name: &str) {
    smoke_n(name, ITERS)
}

/// A target whose inputs cost more (a session and whole-memory checks per input) runs fewer,
/// to stay at a few seconds.
fn smoke_n(name: &str, iters: u64) {
    let t = vsnap_fuzz::target(name).expect("known target");
    let cfg = Config::from_env(iters);
    let s = run(t, cfg);
    println!(
        "{name}: {} inputs in {:.1?} (seed {:#x})",
        s.inputs, s.elapsed, cfg.seed
    );
    assert_eq!(s.inputs, cfg.iters);
}

#[test]
fn fuse_decode() {
    smoke("fuse_decode");
}

#[test]
fn fuse_handle() {
    smoke("fuse_handle");
}

#[test]
fn fuse_chain() {
    smoke_n("fuse_chain", 10_000);
}

#[test]
fn diff_decode() {
    smoke("diff_decode");
}

#[test]
fn http_request() {
    smoke("http_request");
}

#[test]
fn blk_request() {
    smoke("blk_request");
}

/// The committed cargo-fuzz seeds are the ones the harnesses build (regenerate with
/// `cargo run -p vsnap-fuzz --bin vsnap-fuzz-corpus -- fuzz/corpus`).
#[test]
fn committed_corpus_is_current() {
    let dir = vsnap_fuzz::corpus::committed();
    for t in vsnap_fuzz::TARGETS {
        let on_disk = vsnap_fuzz::corpus::read(&dir, t)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(t.name).display()));
        assert!(
            on_disk == (t.seeds)(),
            "fuzz/corpus/{} is stale: regenerate it (docs/fuzzing.md)",
            t.name
        );
    }
}
