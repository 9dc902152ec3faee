//! Scratch directories for the harnesses: one per kind and process, named
//! `vsnap-fuzz-<kind>.pid<pid>`. They live as long as the process (the harnesses keep them in
//! statics, which are never dropped), so each new one first removes those of processes that
//! are gone.

use std::path::{Path, PathBuf};

const PREFIX: &str = "vsnap-fuzz-";

/// Where the scratch directories go: `VSNAP_FUZZ_TMPDIR`, else `/dev/shm` (tmpfs: the guest's
/// fsyncs and the share's restores cost no disk I/O), else the temporary directory.
pub fn base() -> PathBuf {
    if let Some(d) = std::env::var_os("VSNAP_FUZZ_TMPDIR") {
        return d.into();
    }
    let shm = Path::new("/dev/shm");
    let writable = tempfile::Builder::new()
        .prefix("vsnap-fuzz-probe-")
        .tempdir_in(shm)
        .is_ok();
    if writable {
        return shm.to_owned();
    }
    std::env::temp_dir()
}

/// A fresh, empty directory for `kind` in [`base`].
pub fn dir(kind: &str) -> PathBuf {
    let base = base();
    sweep(&base);
    let d = base.join(format!("{PREFIX}{kind}.pid{}", std::process::id()));
    // Left by an earlier use of this pid.
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap_or_else(|e| panic!("scratch dir {}: {e}", d.display()));
    d
}

/// Removes the scratch directories of processes that no longer run.
fn sweep(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.starts_with(PREFIX))
            .and_then(|n| n.rsplit_once(".pid"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            // Another sweeper may race us to it; either way it goes.
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_processes_dirs_are_swept_live_ones_kept() {
        let base = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22: this pid cannot be running.
        let dead = base.path().join(format!("{PREFIX}x.pid{}", 1u32 << 23));
        let live = base
            .path()
            .join(format!("{PREFIX}x.pid{}", std::process::id()));
        let other = base.path().join(format!("{PREFIX}fuse_handle-1-2.bin"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::create_dir(&live).unwrap();
        std::fs::write(&other, b"").unwrap();
        sweep(base.path());
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }
}
