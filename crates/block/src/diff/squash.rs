//! N chained diffs → one: newest state wins per block, superseded data is dropped. References
//! are followed down the chain: to data a diff holds (which the result then stores), or past the
//! first diff into the chain's parent, which is the result's parent too, so they stay
//! references there.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::apply::open_chain;
use super::{
    write_diff_spec, DiffError, DiffFile, DiffHeader, DiffSpec, RefProblem, References,
    WriteOptions,
};
use crate::geometry::zero_past_end;
use crate::job::Job;
use crate::tracker::{runs, BlockState, Tracker};

/// [`squash_with`] the default options (version 2, zstd level 3).
pub fn squash(
    diffs: &[PathBuf],
    out: &Path,
    overwrite: bool,
    job: &Job,
) -> Result<DiffHeader, DiffError> {
    squash_with(diffs, out, overwrite, &WriteOptions::default(), job)
}

/// Squashes `diffs` (oldest first, either version) into `out`, written as `opts` say. Blocks
/// that copy blocks of the first diff's parent stay references (a version-1 `out` cannot hold
/// them, and is refused if there are any).
pub fn squash_with(
    diffs: &[PathBuf],
    out: &Path,
    overwrite: bool,
    opts: &WriteOptions,
    job: &Job,
) -> Result<DiffHeader, DiffError> {
    let (diffs, g) = open_chain(diffs)?;
    // Data is read back at random below (raw frames unchecked), so check every input first.
    for d in &diffs {
        d.verify(&Job::new())?;
    }
    let mut merged = Tracker::new();
    for d in &diffs {
        merged.overlay(d.tracker());
    }
    let mut refs = References::new();
    for (s, e) in runs(merged.dirty()) {
        for b in u64::from(s)..e {
            if let Origin::Parent { source, crc } = origin(&diffs, b)? {
                refs.push(b, source, crc);
            }
        }
    }
    let bs = g.bs();
    let source = |offset: u64, buf: &mut [u8]| -> Result<(), DiffError> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let dev = offset + pos as u64;
            let b = dev / bs;
            let len = (g.block_span(b).1 - dev) as usize;
            match origin(&diffs, b)? {
                // Straight from the newest diff holding it: one read for the blocks after it
                // that the same diff holds.
                Origin::Data {
                    diff, via: None, ..
                } => {
                    let mut end = pos + len;
                    while end < buf.len() {
                        let next = (offset + end as u64) / bs;
                        match origin(&diffs, next)? {
                            Origin::Data {
                                diff: d, via: None, ..
                            } if d == diff => end += (g.block_span(next).1 - next * bs) as usize,
                            _ => break,
                        }
                    }
                    diffs[diff].read_stored(dev, &mut buf[pos..end])?;
                    pos = end;
                    continue;
                }
                // Through references: a whole block, checked against the recorded checksum.
                Origin::Data {
                    diff,
                    block: from,
                    via: Some(via),
                } => {
                    let mut tmp = vec![0u8; bs as usize];
                    diffs[diff]
                        .read_stored(from * bs, zero_past_end(g.size, from * bs, &mut tmp))?;
                    via.check(&tmp)?;
                    buf[pos..pos + len].copy_from_slice(&tmp[..len]);
                }
                Origin::Zero { via } => {
                    via.check(&vec![0u8; bs as usize])?;
                    buf[pos..pos + len].fill(0);
                }
                Origin::Parent { .. } => {
                    return Err(DiffError::Corrupt(format!(
                        "block {b} is a reference, not data"
                    )))
                }
            }
            pos += len;
        }
        Ok(())
    };
    let (first, last) = (&diffs[0], &diffs[diffs.len() - 1]);
    let spec = DiffSpec {
        geometry: g,
        generation: last.header.generation,
        id: Uuid::new_v4(),
        parent: first.header.parent,
        tracker: &merged,
        references: &refs,
    };
    write_diff_spec(out, overwrite, &spec, &source, opts, job)
}

/// Where the bytes of a block of the squashed chain are.
enum Origin {
    /// In `diff`'s data at `block`, reached through reference `via` if any.
    Data {
        diff: usize,
        block: u64,
        via: Option<Via>,
    },
    /// A reference led to a block a diff zeroes.
    Zero { via: Via },
    /// A reference led past the first diff: block `source` of the chain's parent.
    Parent { source: u64, crc: u32 },
}

/// The first reference followed to a block: its entry, the parent block it names and the
/// checksum it recorded for it.
#[derive(Clone, Copy)]
struct Via {
    frame: usize,
    source: u64,
    crc: u32,
}

impl Via {
    /// The bytes the reference led to (a whole block) must be the ones it recorded.
    fn check(&self, block: &[u8]) -> Result<(), DiffError> {
        if crc32c::crc32c(block) == self.crc {
            return Ok(());
        }
        Err(DiffError::Reference {
            frame: self.frame,
            first: self.source,
            end: self.source + 1,
            problem: RefProblem::Mismatch { block: self.source },
        })
    }
}

/// Follows dirty `block` of the squashed chain from the newest diff answering for it, through
/// references (each to the diffs below the one holding it), to where its bytes are.
fn origin(diffs: &[DiffFile], block: u64) -> Result<Origin, DiffError> {
    let (mut b, mut below, mut via) = (block, diffs.len(), None::<Via>);
    loop {
        let holder = (0..below)
            .rev()
            .find(|&j| diffs[j].state(b) != BlockState::Untouched);
        let (j, via_) = match (holder, via) {
            (Some(j), _) => (j, via),
            (None, Some(v)) => {
                return Ok(Origin::Parent {
                    source: b,
                    crc: v.crc,
                })
            }
            (None, None) => return Err(DiffError::Corrupt(format!("no diff holds block {b}"))),
        };
        if diffs[j].state(b) == BlockState::Zero {
            return match via_ {
                Some(via) => Ok(Origin::Zero { via }),
                None => Err(DiffError::Corrupt(format!("block {b} is zero, not data"))),
            };
        }
        match diffs[j].reference_entry(b)? {
            None => {
                return Ok(Origin::Data {
                    diff: j,
                    block: b,
                    via: via_,
                })
            }
            Some((frame, source, crc)) => {
                let next = Via { frame, source, crc };
                // A copy of a copy records the same bytes.
                if let Some(v) = via_.filter(|v| v.crc != crc) {
                    return Err(DiffError::Reference {
                        frame: v.frame,
                        first: v.source,
                        end: v.source + 1,
                        problem: RefProblem::Mismatch { block: v.source },
                    });
                }
                via = via_.or(Some(next));
                (b, below) = (source, j);
            }
        }
    }
}
