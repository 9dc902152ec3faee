//! base + diffs → a raw image byte-identical to the disk at the last diff's cut. Before a diff
//! is applied the output image is exactly its parent state, so references read it; the parent
//! blocks the diff itself overwrites are spooled first.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use super::chain::ImageParent;
use super::file::read_parent_blocks;
use super::{DiffError, DiffFile, DiffIo, ParentState};
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
        apply_one(d, dst.file(), out, job)?;
    }
    dst.commit().dctx(ctx)?;
    Ok(g)
}

/// Applies `d` to `dst` (at `out`), which holds exactly `d`'s parent state.
fn apply_one(d: &DiffFile, dst: &File, out: &Path, job: &Job) -> Result<(), DiffError> {
    let g = d.geometry();
    let bs = g.bs();
    let ctx = || format!("write {}", out.display());
    let image = ImageParent::new(dst, out);
    // Parent blocks that references copy and that `d` itself changes: read before anything is.
    let spool = Spool::new(d, &image, out)?;
    for (s, e) in runs(d.tracker().zero()) {
        let (start, end) = (u64::from(s) * bs, (e * bs).min(g.size));
        fsutil::punch_or_zero(dst, start, end - start).dctx(ctx)?;
    }
    let parent = Spooled {
        spool: &spool,
        image: &image,
        bs,
    };
    d.for_each_dirty_run_in(job, &parent, |off, bytes| {
        dst.write_all_at(bytes, off).dctx(ctx)
    })
}

/// The parent blocks a diff's references copy and the diff itself overwrites or zeroes, saved in
/// a temporary file beside the output (removed when dropped) before the diff is applied. Memory:
/// one bitmap of those blocks; block `s` is at `(rank(s) - 1) × block size` in the file.
struct Spool {
    blocks: RoaringBitmap,
    file: Option<AtomicFile>,
}

impl Spool {
    fn new(d: &DiffFile, parent: &ImageParent<'_>, out: &Path) -> Result<Self, DiffError> {
        let g = d.geometry();
        let bs = g.bs();
        let mut changed = d.tracker().dirty().clone();
        changed |= d.tracker().zero();
        let mut blocks = RoaringBitmap::new();
        for f in d.frames() {
            if let Some(source) = f.reference {
                let n = u64::from(f.raw_len) / bs;
                let mut r = RoaringBitmap::new();
                r.insert_range(Geometry::idx(source)..=Geometry::idx(source + n - 1));
                r &= &changed;
                blocks |= r;
            }
        }
        if blocks.is_empty() {
            return Ok(Self { blocks, file: None });
        }
        let path = out.with_file_name(format!(
            "{}.spool",
            out.file_name().unwrap_or_default().to_string_lossy()
        ));
        let f = AtomicFile::create(&path, true).dctx(|| format!("create {}", path.display()))?;
        let mut buf = vec![0u8; (1 << 20).max(bs as usize)];
        let mut slot = 0u64;
        for (s, e) in runs(&blocks) {
            let mut b = u64::from(s);
            while b < e {
                let n = (e - b).min(buf.len() as u64 / bs);
                let chunk = &mut buf[..(n * bs) as usize];
                read_parent_blocks(parent, g, b, chunk)?;
                f.file()
                    .write_all_at(chunk, slot * bs)
                    .dctx(|| format!("write {}", f.temp_path().display()))?;
                slot += n;
                b += n;
            }
        }
        Ok(Self {
            blocks,
            file: Some(f),
        })
    }
}

/// The parent state a diff's references read while it is applied: the spooled blocks from the
/// spool, the others from the output image (which the diff leaves as they are).
struct Spooled<'a> {
    spool: &'a Spool,
    image: &'a ImageParent<'a>,
    bs: u64,
}

impl ParentState for Spooled<'_> {
    /// `offset` is a block's (references name whole blocks); `buf` may end inside the device's
    /// short last block.
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        let bs = self.bs;
        debug_assert!(offset.is_multiple_of(bs), "a reference starts at a block");
        let (first, n) = (offset / bs, (buf.len() as u64).div_ceil(bs));
        let len = buf.len();
        let at = |j: u64| ((j * bs) as usize).min(len);
        let spooled = |j: u64| self.spool.blocks.contains(Geometry::idx(first + j));
        let mut j = 0;
        while j < n {
            let mut k = j + 1;
            while k < n && spooled(k) == spooled(j) {
                k += 1;
            }
            let (s, e) = (at(j), at(k));
            match &self.spool.file {
                Some(f) if spooled(j) => {
                    let slot = self.spool.blocks.rank(Geometry::idx(first + j)) - 1;
                    f.file()
                        .read_exact_at(&mut buf[s..e], slot * bs)
                        .dctx(|| format!("read {}", f.temp_path().display()))?;
                }
                _ => self.image.read_parent(offset + j * bs, &mut buf[s..e])?,
            }
            j = k;
        }
        Ok(())
    }
}
