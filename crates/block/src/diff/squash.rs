//! N chained diffs → one: newest state wins per block, superseded data is dropped.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::apply::open_chain;
use super::{write_diff, DiffError, DiffFile, DiffHeader, WriteOptions};
use crate::job::Job;
use crate::tracker::{BlockState, Tracker};

/// [`squash_with`] the default options (version 2, zstd level 3).
pub fn squash(
    diffs: &[PathBuf],
    out: &Path,
    overwrite: bool,
    job: &Job,
) -> Result<DiffHeader, DiffError> {
    squash_with(diffs, out, overwrite, &WriteOptions::default(), job)
}

/// Squashes `diffs` (oldest first, either version) into `out`, written as `opts` say.
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
    let newest_holder = |block: u64| -> Option<&DiffFile> {
        diffs
            .iter()
            .rev()
            .find(|d| d.state(block) != BlockState::Untouched)
    };
    let bs = g.bs();
    let source = |offset: u64, buf: &mut [u8]| -> Result<(), DiffError> {
        // Split the run where the holding diff changes; each piece is one contiguous read.
        let mut pos = 0usize;
        while pos < buf.len() {
            let dev = offset + pos as u64;
            let holder = newest_holder(dev / bs)
                .ok_or_else(|| DiffError::Corrupt(format!("no diff holds block {}", dev / bs)))?;
            let mut end = pos + (bs - dev % bs).min((buf.len() - pos) as u64) as usize;
            while end < buf.len()
                && newest_holder((offset + end as u64) / bs).map(|d| d.path())
                    == Some(holder.path())
            {
                end = (end + bs as usize).min(buf.len());
            }
            holder.read_stored(dev, &mut buf[pos..end])?;
            pos = end;
        }
        Ok(())
    };
    let (first, last) = (&diffs[0], &diffs[diffs.len() - 1]);
    write_diff(
        out,
        overwrite,
        g,
        last.header.generation,
        Uuid::new_v4(),
        first.header.parent,
        &merged,
        &source,
        opts,
        job,
    )
}
