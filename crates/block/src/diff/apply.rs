//! base + diffs → a raw image byte-identical to the disk at the last diff's cut.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{DiffError, DiffFile, DiffIo};
use crate::fsutil::{self, AtomicFile};
use crate::geometry::Geometry;
use crate::job::Job;
use crate::tracker::runs;

/// What the first diff of a chain may lie on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChainRoot {
    /// The base image: the first diff's parent must be nil (it was cut from a disk on the base).
    #[default]
    Base,
    /// Whatever the caller vouches for (`--allow-foreign-parent`): an image that already holds the
    /// first diff's parent, such as one materialised from it.
    Foreign,
}

/// Checks that the first diff lies on the base (unless `root` is [`ChainRoot::Foreign`]): a chain
/// missing its first diffs would otherwise apply to a disk that lacks them.
pub fn check_root(diffs: &[DiffFile], root: ChainRoot) -> Result<(), DiffError> {
    match diffs.first() {
        Some(d) if root == ChainRoot::Base && !d.header.parent.is_nil() => {
            Err(DiffError::ForeignParent {
                path: d.path().display().to_string(),
                parent: d.header.parent.to_string(),
            })
        }
        _ => Ok(()),
    }
}

/// Checks that diffs share one geometry and that each one's parent is the one before it.
pub fn check_chain(diffs: &[DiffFile]) -> Result<Geometry, DiffError> {
    let first = diffs
        .first()
        .ok_or_else(|| DiffError::Corrupt("no diff given".into()))?;
    let g = first.geometry();
    for (i, pair) in diffs.windows(2).enumerate() {
        let (prev, d) = (&pair[0], &pair[1]);
        for (what, want, got) in [
            (
                "block size",
                u64::from(g.block_size),
                u64::from(d.geometry().block_size),
            ),
            ("device size", g.size, d.geometry().size),
        ] {
            if want != got {
                return Err(DiffError::Mismatch {
                    what,
                    expected: format!("{want} (as in {})", first.path().display()),
                    found: format!("{got} in {}", d.path().display()),
                });
            }
        }
        if d.header.parent != prev.header.id {
            return Err(DiffError::Chain {
                index: i + 1,
                path: d.path().display().to_string(),
                expected: prev.header.id.to_string(),
                found: d.header.parent.to_string(),
            });
        }
    }
    Ok(g)
}

pub fn open_chain(paths: &[PathBuf]) -> Result<(Vec<DiffFile>, Geometry), DiffError> {
    let diffs = paths
        .iter()
        .map(|p| DiffFile::open(p))
        .collect::<Result<Vec<_>, _>>()?;
    let g = check_chain(&diffs)?;
    Ok((diffs, g))
}

/// Writes `base` (or zeros when `None`) with `diffs` applied in order to `out`, a sparse raw
/// image. `out` appears only when complete. The first diff must lie on the base
/// ([`ChainRoot::Base`]); see [`apply_to`].
pub fn apply(
    base: Option<&Path>,
    diffs: &[PathBuf],
    out: &Path,
    overwrite: bool,
    job: &Job,
) -> Result<Geometry, DiffError> {
    apply_to(base, diffs, out, overwrite, ChainRoot::Base, job)
}

/// [`apply`], with the first diff's parent checked as `root` says.
pub fn apply_to(
    base: Option<&Path>,
    diffs: &[PathBuf],
    out: &Path,
    overwrite: bool,
    root: ChainRoot,
    job: &Job,
) -> Result<Geometry, DiffError> {
    let (diffs, g) = open_chain(diffs)?;
    check_root(&diffs, root)?;
    let dst = AtomicFile::create(out, overwrite).dctx(|| format!("create {}", out.display()))?;
    let ctx = || format!("write {}", out.display());
    dst.file().set_len(g.size).dctx(ctx)?;
    job.set_total(diffs.iter().map(|d| d.header.data_len()).sum());
    if let Some(base) = base {
        let src = File::open(base).dctx(|| format!("open {}", base.display()))?;
        let len = src
            .metadata()
            .dctx(|| format!("stat {}", base.display()))?
            .len();
        if len != g.size {
            return Err(DiffError::Mismatch {
                what: "base image size",
                expected: format!("{} (the diffs' device size)", g.size),
                found: format!("{len} in {}", base.display()),
            });
        }
        fsutil::copy_data_extents(&src, dst.file(), len).dctx(ctx)?;
    }
    for d in &diffs {
        for (s, e) in runs(d.tracker().zero()) {
            let (start, end) = (u64::from(s) * g.bs(), (e * g.bs()).min(g.size));
            fsutil::punch_or_zero(dst.file(), start, end - start).dctx(ctx)?;
        }
        d.for_each_dirty_run(job, |off, bytes| {
            dst.file().write_all_at(bytes, off).dctx(ctx)
        })?;
    }
    dst.commit().dctx(ctx)?;
    Ok(g)
}
