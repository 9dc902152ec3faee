//! The seed corpus on disk: `<dir>/<target>/seed-NNN`, one file per seed.

use std::io;
use std::path::{Path, PathBuf};

use crate::Target;

/// The committed cargo-fuzz corpus (`fuzz/corpus` at the repository root).
pub fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn seed_name(i: usize) -> String {
    format!("seed-{i:03}")
}

/// Writes `t`'s seeds under `dir/<name>/`, removing stale `seed-*` files. Returns the count.
pub fn write(dir: &Path, t: &Target) -> io::Result<usize> {
    let d = dir.join(t.name);
    std::fs::create_dir_all(&d)?;
    for e in std::fs::read_dir(&d)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with("seed-") {
            std::fs::remove_file(e.path())?;
        }
    }
    let seeds = (t.seeds)();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(d.join(seed_name(i)), s)?;
    }
    Ok(seeds.len())
}

/// The `seed-*` files of `dir/<name>/`, in order.
pub fn read(dir: &Path, t: &Target) -> io::Result<Vec<Vec<u8>>> {
    let d = dir.join(t.name);
    let mut names: Vec<_> = std::fs::read_dir(&d)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seed-"))
        .collect();
    names.sort();
    names.iter().map(|n| std::fs::read(d.join(n))).collect()
}
