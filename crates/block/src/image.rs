//! Creating disk images (sparse or preallocated) and reporting their allocation.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::error::{BlockError, IoContext, Result};
use crate::fsutil::{self, AtomicFile};
use crate::job::Job;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prealloc {
    /// Sparse: capacity set, nothing allocated.
    Off,
    /// `fallocate`: blocks reserved, no data written.
    Falloc,
    /// Every byte written as zero.
    Full,
}

const STEP: u64 = 64 << 20;

/// Creates a raw image of `size` bytes at `path`. The file appears only when complete: an error
/// or a cancel through `job` leaves nothing at `path`.
pub fn create(
    path: &Path,
    size: u64,
    prealloc: Prealloc,
    overwrite: bool,
    job: &Job,
) -> Result<()> {
    let out = AtomicFile::create(path, overwrite).ctx(|| format!("create {}", path.display()))?;
    let f = out.file();
    let ctx = || format!("write {}", path.display());
    f.set_len(size).ctx(ctx)?;
    job.set_total(if prealloc == Prealloc::Off { 0 } else { size });
    match prealloc {
        Prealloc::Off => {}
        Prealloc::Falloc => {
            let mut off = 0;
            while off < size {
                let n = STEP.min(size - off);
                fallocate(f, off, n).ctx(ctx)?;
                off += n;
                job.advance(n).map_err(|_| cancelled(path))?;
            }
        }
        Prealloc::Full => {
            let zeros = vec![0u8; (8 << 20).min(size) as usize];
            let mut off = 0;
            while off < size {
                let n = (zeros.len() as u64).min(size - off);
                f.write_all_at(&zeros[..n as usize], off).ctx(ctx)?;
                off += n;
                job.advance(n).map_err(|_| cancelled(path))?;
            }
        }
    }
    job.check().map_err(|_| cancelled(path))?;
    out.commit().ctx(ctx)
}

fn cancelled(path: &Path) -> BlockError {
    BlockError::Conflict(format!("creation of {} cancelled", path.display()))
}

fn fallocate(f: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, off as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    pub format: &'static str,
    /// Virtual size (what a guest sees).
    pub capacity: u64,
    /// Bytes the file occupies on the host's file system.
    pub allocated: u64,
    pub file_size: u64,
}

pub fn info(path: &Path) -> Result<ImageInfo> {
    let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let file_size = f
        .metadata()
        .ctx(|| format!("stat {}", path.display()))?
        .len();
    let allocated = fsutil::allocated_bytes(&f).ctx(|| format!("stat {}", path.display()))?;
    let (format, capacity) = match crate::diff::qcow2::probe_format(path)? {
        ("qcow2", size) => ("qcow2", size),
        _ => match crate::diff::DiffFile::open(path) {
            Ok(d) => ("vsnap-diff", d.geometry().size),
            Err(_) => ("raw", file_size),
        },
    };
    Ok(ImageInfo {
        format,
        capacity,
        allocated,
        file_size,
    })
}
