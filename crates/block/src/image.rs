//! Creating disk images (sparse or preallocated) and reporting their allocation.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::error::{BlockError, IoContext, Result};
use crate::fsutil::{self, AtomicFile};
use crate::geometry::zero_past_end;
use crate::job::Job;
use crate::zero::is_zero;

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

/// How an image differs from the one it was derived from, block by block.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    pub block_size: u64,
    pub blocks: u64,
    /// Blocks whose bytes differ.
    pub changed_blocks: u64,
    /// Of those, blocks now all zero: a zero state carries them, no data needed.
    pub changed_to_zero_blocks: u64,
    /// Bytes of the changed blocks that are not all zero: the data any diff must carry.
    pub min_data_bytes: u64,
}

impl Changes {
    /// Accounts one block of the new image against the same block of the old one.
    pub fn add(&mut self, old: &[u8], new: &[u8]) {
        self.blocks += 1;
        if old != new {
            self.changed_blocks += 1;
            if is_zero(new) {
                self.changed_to_zero_blocks += 1;
            } else {
                self.min_data_bytes += new.len() as u64;
            }
        }
    }
}

/// Compares `new` with `old` in blocks of `block_size`; bytes past the end of `old` (or a
/// missing `old`, for a blank base) read as zero.
pub fn compare(old: Option<&Path>, new: &Path, block_size: u64, job: &Job) -> Result<Changes> {
    if block_size == 0 || block_size > 1 << 20 {
        return Err(BlockError::Geometry(format!(
            "compare block size {block_size}"
        )));
    }
    let open = |p: &Path| File::open(p).ctx(|| format!("open {}", p.display()));
    let newf = open(new)?;
    let oldf = old.map(open).transpose()?;
    let size = newf
        .metadata()
        .ctx(|| format!("stat {}", new.display()))?
        .len();
    let old_size = match &oldf {
        Some(f) => f.metadata().ctx(|| "stat base image".to_string())?.len(),
        None => 0,
    };
    let chunk = block_size * ((4 << 20) / block_size).max(1);
    let (mut a, mut b) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut c = Changes {
        block_size,
        ..Changes::default()
    };
    job.set_total(size);
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        newf.read_exact_at(&mut b[..n], off)
            .ctx(|| format!("read {}", new.display()))?;
        let from_old = zero_past_end(old_size, off, &mut a[..n]);
        if let Some(f) = &oldf {
            f.read_exact_at(from_old, off)
                .ctx(|| "read base image".to_string())?;
        }
        for (x, y) in a[..n]
            .chunks(block_size as usize)
            .zip(b[..n].chunks(block_size as usize))
        {
            c.add(x, y);
        }
        off += n as u64;
        job.advance(n as u64)
            .map_err(|_| BlockError::Conflict("compare cancelled".into()))?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_counts_changed_blocks_and_the_data_they_need() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("old"), dir.path().join("new"));
        let bs = 4096;
        let mut a = vec![1u8; 6 * bs];
        a[5 * bs..].fill(0);
        let mut b = a.clone();
        b[10] = 2; // block 0: changed, non-zero
        b[bs..2 * bs].fill(0); // block 1: changed to zero
        b[3 * bs..4 * bs].copy_from_slice(&a[3 * bs..4 * bs]); // block 3: rewritten, same bytes
        b[5 * bs + 1] = 9; // block 5: was zero, now data
        std::fs::write(&old, &a).unwrap();
        std::fs::write(&new, &b).unwrap();
        let c = compare(Some(&old), &new, bs as u64, &Job::new()).unwrap();
        assert_eq!(
            (
                c.blocks,
                c.changed_blocks,
                c.changed_to_zero_blocks,
                c.min_data_bytes
            ),
            (6, 3, 1, 2 * bs as u64)
        );
        // Against a blank base, every non-zero block is data.
        let c = compare(None, &new, bs as u64, &Job::new()).unwrap();
        assert_eq!((c.changed_blocks, c.min_data_bytes), (5, 5 * bs as u64));
        // A shorter base reads as zero past its end.
        std::fs::write(&old, &a[..2 * bs + 100]).unwrap();
        let c = compare(Some(&old), &new, bs as u64, &Job::new()).unwrap();
        assert_eq!(c.changed_blocks, 6);
        assert!(compare(None, &new, 0, &Job::new()).is_err());
    }
}
