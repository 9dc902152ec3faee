//! Writes each target's seeds to `DIR/<target>/seed-NNN` (the cargo-fuzz corpus; the committed
//! one is `fuzz/corpus`, kept current by a test). Stale seed files are removed; other files,
//! which libFuzzer adds, are left alone.
//!
//! `cargo run -p vsnap-fuzz --bin vsnap-fuzz-corpus -- fuzz/corpus`

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: vsnap-fuzz-corpus DIR");
        std::process::exit(2);
    };
    for t in vsnap_fuzz::TARGETS {
        let n = vsnap_fuzz::corpus::write(&dir, t)?;
        println!("{}: {n} seeds", t.name);
    }
    Ok(())
}
