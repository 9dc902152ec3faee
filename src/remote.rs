//! Diff arguments that may name object storage (`s3://`, `gs://`, `az://`): an input is read
//! through a local copy in a cache directory (downloaded once per object version), an output is
//! written locally and uploaded whole. Plain paths pass through untouched.

use std::path::{Path, PathBuf};

use anyhow::Context;
use vsnap_remote::{local_copy, Location};

use crate::progress;

/// Where copies of remote diffs are kept: `$VSNAP_CACHE_DIR`, else `$XDG_CACHE_HOME/vsnap`, else
/// `~/.cache/vsnap`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VSNAP_CACHE_DIR") {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("vsnap")
}

fn location(arg: &Path) -> anyhow::Result<Location> {
    let s = arg
        .to_str()
        .with_context(|| format!("{}: not UTF-8", arg.display()))?;
    Ok(Location::parse(s)?)
}

/// A local file holding the diff `arg` names, fetched into `cache` if it is remote.
pub fn input(arg: &Path, cache: &Path) -> anyhow::Result<PathBuf> {
    let loc = location(arg)?;
    if let Location::Local(p) = loc {
        return Ok(p);
    }
    let bar = progress::bytes(&format!("fetching {}", arg.display()), 0);
    let p = local_copy(&loc, cache, &mut |n| bar.set_position(n))
        .with_context(|| format!("fetching {}", arg.display()))?;
    bar.finish_and_clear();
    Ok(p)
}

/// Every diff of a chain as a local file.
pub fn inputs(args: &[PathBuf], cache: &Path) -> anyhow::Result<Vec<PathBuf>> {
    args.iter().map(|a| input(a, cache)).collect()
}

/// Where a command writes a diff: the path itself, or a local file uploaded by [`Output::finish`].
pub struct Output {
    target: Location,
    local: PathBuf,
}

impl Output {
    pub fn new(arg: &Path) -> anyhow::Result<Self> {
        let target = location(arg)?;
        let local = match &target {
            Location::Local(p) => p.clone(),
            Location::Object(_) => {
                let dir = cache_dir().join("uploads");
                std::fs::create_dir_all(&dir)?;
                // A leftover of an earlier process with this pid is no output of ours.
                let local = dir.join(format!("out-{}.diff", std::process::id()));
                let _ = std::fs::remove_file(&local);
                local
            }
        };
        Ok(Output { target, local })
    }

    /// The local file to write.
    pub fn path(&self) -> &Path {
        &self.local
    }

    /// Uploads the written file if the target is remote (multipart: the object appears only
    /// when complete), then removes the local copy.
    pub fn finish(self) -> anyhow::Result<()> {
        let Location::Object(o) = &self.target else {
            return Ok(());
        };
        let len = std::fs::metadata(&self.local)?.len();
        let bar = progress::bytes(&format!("uploading {}", o.url()), len);
        o.upload(&self.local, &mut |n| bar.set_position(n))
            .with_context(|| format!("uploading to {}", o.url()))?;
        bar.finish_and_clear();
        std::fs::remove_file(&self.local)?;
        Ok(())
    }
}

/// `vsnap diff list URL|DIR`: the diffs stored there, with their sizes.
pub fn list(arg: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    Ok(match location(arg)? {
        Location::Object(o) => o.list()?.into_iter().map(|m| (m.name, m.size)).collect(),
        Location::Local(dir) => {
            let mut v = Vec::new();
            for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
                let e = e?;
                if e.file_type()?.is_file() {
                    v.push((
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata()?.len(),
                    ));
                }
            }
            v.sort();
            v
        }
    })
}
