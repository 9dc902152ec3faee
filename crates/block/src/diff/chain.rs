//! The parent state a diff's references are resolved against: the disk exactly as it is below
//! the diff. Every reader has it by construction: `apply` in its output image before the diff,
//! a chain in the diffs (and base) below, `to-qcow2` in the image of the parent.

use std::fs::File;
use std::ops::{Deref, Range};
use std::path::Path;

use super::{DiffError, DiffFile, DiffIo};
use crate::fsutil;
use crate::geometry::zero_past_end;
use crate::tracker::BlockState;

/// The disk below a diff, read by device offset.
pub trait ParentState {
    /// Fills `buf` with the parent state's device bytes at `offset` (inside the device).
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError>;
}

impl<F: Fn(u64, &mut [u8]) -> Result<(), DiffError>> ParentState for F {
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        self(offset, buf)
    }
}

/// A raw image of the parent state (bytes past its end read as zero).
pub struct ImageParent<'a> {
    file: &'a File,
    path: &'a Path,
}

impl<'a> ImageParent<'a> {
    pub fn new(file: &'a File, path: &'a Path) -> Self {
        Self { file, path }
    }
}

impl ParentState for ImageParent<'_> {
    fn read_parent(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiffError> {
        fsutil::read_at_or_zero(self.file, buf, offset)
            .dctx(|| format!("read {}", self.path.display()))
    }
}

/// Reads device bytes `[offset, offset + buf.len())` of the disk `diffs` make over `base`:
/// `diffs` newest first, each one's references resolved against the diffs after it in the slice
/// and then `base`. Iterative, so a reference to a reference to … costs no stack depth.
pub fn read_chain<D: Deref<Target = DiffFile>>(
    diffs: &[D],
    base: &dyn ParentState,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), DiffError> {
    let Some(first) = diffs.first() else {
        return base.read_parent(offset, buf);
    };
    let g = first.geometry();
    let bs = g.bs();
    // Which of `diffs[level..]` answers for `block`, and how.
    let answer = |level: usize, block: u64| {
        diffs[level..]
            .iter()
            .enumerate()
            .find_map(|(i, d)| match d.state(block) {
                BlockState::Untouched => None,
                s => Some((level + i, s)),
            })
    };
    // (first diff to look in, device offset, bytes of `buf`)
    let mut work: Vec<(usize, u64, Range<usize>)> = vec![(0, offset, 0..buf.len())];
    let mut redirects: Vec<(Range<usize>, u64)> = Vec::new();
    while let Some((level, off, range)) = work.pop() {
        let end = off + range.len() as u64;
        let mut pos = off;
        while pos < end {
            let src = answer(level, pos / bs);
            let mut run_end = g.block_span(pos / bs).1.min(end);
            while run_end < end && answer(level, run_end / bs) == src {
                run_end = g.block_span(run_end / bs).1.min(end);
            }
            let dst = range.start + (pos - off) as usize..range.start + (run_end - off) as usize;
            match src {
                None => base.read_parent(pos, &mut buf[dst])?,
                Some((_, BlockState::Zero)) => buf[dst].fill(0),
                Some((i, _)) => {
                    redirects.clear();
                    diffs[i].read_or_redirect(pos, &mut buf[dst.clone()], &mut |r, source| {
                        redirects.push((r, source))
                    })?;
                    for (r, source) in redirects.drain(..) {
                        let r = dst.start + r.start..dst.start + r.end;
                        // A reference to the device's short last block: past its end, zeros.
                        let inside = zero_past_end(g.size, source, &mut buf[r.clone()]).len();
                        if inside > 0 {
                            work.push((i + 1, source, r.start..r.start + inside));
                        }
                    }
                }
            }
            pos = run_end;
        }
    }
    Ok(())
}
