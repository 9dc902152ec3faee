//! Parent dedupe at export (see `crate::dedupe`): which dirty blocks of a frozen generation the
//! disk below it already holds, found through the index in the state directory and verified
//! byte for byte, and the index's upkeep when layers fold.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use roaring::RoaringBitmap;
use uuid::Uuid;

use super::Disk;
use crate::dedupe::block_hash;
use crate::dedupe::files::{self, Kind, Opened, Status, Writer};
use crate::dedupe::search::Wanted;
use crate::diff::{read_chain, DiffError, DiffFile, References};
use crate::error::{BlockError, IoContext, Result};
use crate::fsutil;
use crate::geometry::{zero_past_end, Geometry};
use crate::job::Job;
use crate::stack::Entry;
use crate::state::BaseIdentity;
use crate::tracker::{runs, Tracker};

/// Dirty blocks of an export looked for at once: bounds the search's memory (some 40 bytes a
/// block) whatever the generation's size; a bigger one streams the parent's index again per
/// window.
const WINDOW: usize = 1 << 20;
/// Bytes read at once while hashing and verifying.
const READ: u64 = 1 << 20;
/// Records of a streamed index file between checks for a cancel.
const CANCEL_EVERY: u64 = 1 << 16;

/// The base image's hashes, beside the layers.
pub(crate) const BASE_HASHES: &str = "base.hashes";

/// The hashes of a diff the disk was started from.
pub(crate) fn chain_hashes(id: Uuid) -> String {
    format!("chain-{}.hashes", id.simple())
}

/// What the base's hash file is keyed by: its identity (size and fingerprint).
fn base_key(id: &BaseIdentity) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&id.size.to_le_bytes());
    k[8..12].copy_from_slice(&crc32c::crc32c(id.fingerprint.as_bytes()).to_le_bytes());
    k[12..].copy_from_slice(&(id.fingerprint.len() as u32).to_le_bytes());
    k
}

/// Hashes whole blocks of `set` (read with `read`, the short last block zero-padded) and hands
/// each `(block, hash)` to `f`, in order.
fn hash_blocks(
    g: Geometry,
    set: &RoaringBitmap,
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    job: &Job,
    f: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let bs = g.bs();
    let per = (READ / bs).max(1);
    let mut buf = vec![0u8; (per * bs) as usize];
    for (s, e) in runs(set) {
        let mut b = u64::from(s);
        while b < e {
            job.check().map_err(DiffError::from)?;
            let n = (e - b).min(per);
            let chunk = &mut buf[..(n * bs) as usize];
            read(b * bs, zero_past_end(g.size, b * bs, chunk))?;
            for (j, blk) in chunk.chunks(bs as usize).enumerate() {
                f(b + j as u64, block_hash(blk))?;
            }
            b += n;
        }
    }
    Ok(())
}

/// A cancel ends the export; anything else is the hint's loss only.
fn hint_lost(r: Result<()>, what: &dyn Fn() -> String) -> Result<()> {
    match r {
        Err(BlockError::Diff(DiffError::Cancelled)) => Err(DiffError::Cancelled.into()),
        Err(e) => {
            tracing::warn!(error = %e, "parent dedupe: {}", what());
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

/// Hashes the blocks of `set` (read with `read`), hands each `(block, hash)` to `offer`, and
/// writes them as the hash list at `path` under `key`. True when the list is in place; a list
/// that cannot be written is only a hint lost (said so), the hashing goes on without it.
fn list(
    g: Geometry,
    path: &Path,
    key: [u8; 16],
    set: &RoaringBitmap,
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    job: &Job,
    offer: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<bool> {
    let lost = |e: BlockError| {
        tracing::warn!(path = %path.display(), error = %e, "parent dedupe: cannot write a hash list");
    };
    let mut w = Writer::create(path, Kind::List, g, key).map_err(lost).ok();
    hash_blocks(g, set, read, job, &mut |b, h| {
        offer(b, h)?;
        if let Some(Err(e)) = w.as_mut().map(|w| w.push(b, h)) {
            lost(e);
            w = None;
        }
        Ok(())
    })?;
    Ok(w.is_some_and(|w| w.commit().map_err(lost).is_ok()))
}

impl Disk {
    /// Removes the hash list just written for `e` when a fold has taken `e` out of the stack
    /// meanwhile (and with it the files under its stem, maybe before the list was there). If
    /// `e` is still listed here, its fold has not committed, and will remove the list with the
    /// layer's other files.
    fn drop_list_if_folded(&self, e: &Arc<Entry>) {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        if !stack.layers.iter().any(|x| Arc::ptr_eq(x, e)) {
            let _ = std::fs::remove_file(e.layer.hashes_file_path());
        }
    }

    /// The dirty blocks of frozen `entry` to store as references: those whose bytes its parent
    /// state holds, each checked against the parent block it names. Writes the generation's
    /// own hash list on the way (every later export looks there), and those of the sources
    /// below that have none.
    pub(super) fn plan_references(&self, entry: &Arc<Entry>, job: &Job) -> Result<References> {
        let t0 = Instant::now();
        let p = self.plan_references_in(entry, job, WINDOW)?;
        tracing::info!(
            generation = entry.generation,
            dirty_blocks = entry.layer.tracker().dirty_count(),
            candidates = p.candidates,
            parent_blocks_hashed = p.hashed,
            referenced_blocks = p.refs.blocks(),
            ms = t0.elapsed().as_millis() as u64,
            "parent dedupe"
        );
        Ok(p.refs)
    }

    /// [`Disk::plan_references`], `window` dirty blocks looked for at a time.
    fn plan_references_in(&self, entry: &Arc<Entry>, job: &Job, window_len: usize) -> Result<Plan> {
        let (below, chain) = {
            let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
            let i = stack
                .layers
                .iter()
                .position(|e| Arc::ptr_eq(e, entry))
                .ok_or(BlockError::NoSuchGeneration(entry.generation))?;
            (stack.layers[i + 1..].to_vec(), stack.chain.clone())
        };
        let g = self.geom;
        let dirty = entry.layer.tracker().dirty().clone();
        let own = entry.layer.hashes_file_path().to_owned();
        let key = *entry.id.as_bytes();
        let valid = files::read(&own, Kind::List, g, &key, &mut |_, _| Ok(()))?;
        if valid != Status::Valid {
            let mut w = Writer::create(&own, Kind::List, g, key)?;
            let read = |off: u64, buf: &mut [u8]| entry.layer.read_stored(off, buf);
            hash_blocks(g, &dirty, &read, job, &mut |b, h| w.push(b, h))?;
            w.commit()?;
        }
        let mut search = Search {
            disk: self,
            entry,
            unlisted: vec![false; below.len() + chain.len()],
            below,
            chain,
            prev: None,
            candidates: 0,
            hashed: 0,
        };
        let mut refs = References::new();
        let mut window = Vec::with_capacity(window_len.min(dirty.len() as usize));
        let status = files::read(&own, Kind::List, g, &key, &mut |b, h| {
            // Only the layer's own dirty blocks, whatever the file says.
            if dirty.contains(Geometry::idx(b)) {
                window.push((b, h));
            }
            if window.len() == window_len {
                search.window(&window, &mut refs, job)?;
                window.clear();
            }
            Ok(())
        })?;
        search.window(&window, &mut refs, job)?;
        if let Status::Damaged(m) = status {
            tracing::warn!(generation = entry.generation, problem = %m, "parent dedupe: the generation's hash list changed during its export");
        }
        Ok(Plan {
            refs,
            candidates: search.candidates,
            hashed: search.hashed,
        })
    }

    /// Writes the hash list of the layer folding `upper` into `lower` (to `stem`'s path, before
    /// the fold commits): `upper`'s entries, and `lower`'s for the blocks `upper` leaves to it.
    /// Nothing when either has no valid list (a later export reads instead).
    pub(super) fn merge_hashes(&self, lower: &Entry, upper: &Entry, stem: &str) -> Result<()> {
        let g = self.geom;
        let open =
            |e: &Entry| files::open(e.layer.hashes_file_path(), Kind::List, g, e.id.as_bytes());
        let (Opened::Reader(mut lo), Opened::Reader(mut up)) = (open(lower), open(upper)) else {
            return Ok(());
        };
        let ut: Tracker = upper.layer.tracker().clone();
        let path = crate::layer::Layer::hashes_path(&self.dir, stem);
        // The folded layer keeps the upper one's id.
        let mut w = Writer::create(&path, Kind::List, g, *upper.id.as_bytes())?;
        let answers = |b: u64| {
            let i = Geometry::idx(b);
            ut.dirty().contains(i) || ut.zero().contains(i)
        };
        let mut next_lo = || loop {
            match lo.next_record() {
                Some((b, _)) if answers(b) => continue,
                r => return r,
            }
        };
        let (mut a, mut b) = (next_lo(), up.next_record());
        loop {
            match (a, b) {
                (Some(x), Some(y)) if x.0 < y.0 => {
                    w.push(x.0, x.1)?;
                    a = next_lo();
                }
                (_, Some(y)) => {
                    w.push(y.0, y.1)?;
                    b = up.next_record();
                }
                (Some(x), None) => {
                    w.push(x.0, x.1)?;
                    a = next_lo();
                }
                (None, None) => break,
            }
        }
        if lo.status() == Status::Valid && up.status() == Status::Valid {
            w.commit()?;
        }
        Ok(())
    }
}

/// What [`Disk::plan_references_in`] found, and what it cost.
struct Plan {
    refs: References,
    /// Parent blocks the index named as copies (each read and compared).
    candidates: u64,
    /// Blocks of layers and chain diffs read and hashed for want of a hash list.
    hashed: u64,
}

/// One export's search of its parent state.
struct Search<'a> {
    disk: &'a Disk,
    entry: &'a Arc<Entry>,
    /// The layers below the generation, newest first.
    below: Vec<Arc<Entry>>,
    /// The diffs the disk was started from, newest first.
    chain: Vec<Arc<DiffFile>>,
    /// By source (`below`, then `chain`): it had no list and none could be made (its blocks
    /// unreadable, or the list unwritable). Left out of the later windows, which would only
    /// read it all again: its copies are lost to them, never its place in the stack.
    unlisted: Vec<bool>,
    /// The last block made a reference and the parent block it names.
    prev: Option<(u64, u64)>,
    candidates: u64,
    hashed: u64,
}

impl Search<'_> {
    fn geom(&self) -> Geometry {
        self.disk.geom
    }

    /// Finds and verifies parent copies of the dirty blocks `window` lists (ascending, with
    /// their hashes).
    fn window(&mut self, window: &[(u64, u64)], refs: &mut References, job: &Job) -> Result<()> {
        if window.is_empty() {
            return Ok(());
        }
        let mut wanted = Wanted::new(window.iter().map(|w| w.1));
        self.search(&mut wanted, job)?;
        self.verify(window, &wanted, refs, job)
    }

    /// Offers `wanted` every block of the parent state with its hash, newest source first,
    /// each block answered by the newest source that covers it; stops once all are found.
    ///
    /// A source without a valid hash list is read and hashed once, its list written on the way
    /// (all its dirty blocks, not only those it answers for here), so that the export's later
    /// windows stream that list like any other instead of reading the source again.
    fn search(&mut self, wanted: &mut Wanted, job: &Job) -> Result<()> {
        let g = self.geom();
        let mut covered = RoaringBitmap::new();
        for (i, e) in self.below.iter().enumerate() {
            if wanted.complete() {
                return Ok(());
            }
            let t: Tracker = e.layer.tracker().clone();
            let mut fresh = t.dirty().clone();
            fresh -= &covered;
            covered |= t.dirty();
            covered |= t.zero();
            if self.unlisted[i] {
                continue;
            }
            let path = e.layer.hashes_file_path();
            let mut offer = |b: u64, h: u64| {
                if wanted.may_want(h) && fresh.contains(Geometry::idx(b)) {
                    wanted.offer(b, h);
                }
                Ok(())
            };
            let key = *e.id.as_bytes();
            let st = files::read(path, Kind::List, g, &key, &mut offer)?;
            if st == Status::Valid {
                continue;
            }
            if let Status::Damaged(m) = &st {
                tracing::warn!(path = %path.display(), problem = %m, "parent dedupe: a damaged hash list, rebuilt");
            }
            // Written where the layer's own export writes it. A frozen layer's dirty blocks
            // never change (a fold of it only fills blocks its bitmap leaves untouched, and
            // makes a new layer under a new stem), so the list cannot disagree with them,
            // whoever writes it first; a fold merges it if it is there in time, and proceeds
            // without it if not. Only a fold that removed the layer's files before the list
            // was in place leaves it behind: removed below.
            let read = |off: u64, buf: &mut [u8]| e.layer.read_stored(off, buf);
            let r = list(g, path, key, t.dirty(), &read, job, &mut offer);
            self.hashed += t.dirty().len();
            match r {
                Ok(true) => self.disk.drop_list_if_folded(e),
                Ok(false) => self.unlisted[i] = true,
                Err(err) => {
                    self.unlisted[i] = true;
                    hint_lost(Err(err), &|| {
                        format!("generation {} unreadable", e.generation)
                    })?;
                }
            }
        }
        let layers = self.below.len();
        for (i, d) in self.chain.iter().enumerate() {
            if wanted.complete() {
                return Ok(());
            }
            let mut fresh = d.tracker().dirty().clone();
            fresh -= &covered;
            covered |= d.tracker().dirty();
            covered |= d.tracker().zero();
            if self.unlisted[layers + i] {
                continue;
            }
            let path = self.disk.dir.join(chain_hashes(d.header.id));
            let key = *d.header.id.as_bytes();
            let mut offer = |b: u64, h: u64| {
                if wanted.may_want(h) && fresh.contains(Geometry::idx(b)) {
                    wanted.offer(b, h);
                }
                Ok(())
            };
            let st = files::read(&path, Kind::List, g, &key, &mut offer)?;
            if st == Status::Valid {
                continue;
            }
            if let Status::Damaged(m) = &st {
                tracing::warn!(path = %path.display(), problem = %m, "parent dedupe: a damaged hash list, rebuilt");
            }
            // A chain diff never changes: its list is made once, of all its blocks.
            let read = |off: u64, buf: &mut [u8]| -> Result<()> {
                let base = |o: u64, b: &mut [u8]| self.disk.read_base(o, b);
                Ok(read_chain(&self.chain[i..], &base, off, buf)?)
            };
            let listed = list(g, &path, key, d.tracker().dirty(), &read, job, &mut offer)?;
            self.hashed += d.tracker().dirty().len();
            self.unlisted[layers + i] = !listed;
        }
        if !wanted.complete() {
            self.search_base(wanted, &covered, job)?;
        }
        Ok(())
    }

    /// The base's blocks no layer or chain diff covers, from its hash array (built by reading
    /// the base when there is none, or it is not this base's).
    fn search_base(&self, wanted: &mut Wanted, covered: &RoaringBitmap, job: &Job) -> Result<()> {
        let (Some(base), Some(id)) = (&self.disk.base, &self.disk.manifest.base_identity) else {
            return Ok(());
        };
        let g = self.geom();
        let path = self.disk.dir.join(BASE_HASHES);
        let key = base_key(id);
        let mut offer = |p: u64, h: u64| {
            if p.is_multiple_of(CANCEL_EVERY) {
                job.check().map_err(DiffError::from)?;
            }
            if wanted.may_want(h) && !covered.contains(Geometry::idx(p)) {
                wanted.offer(p, h);
            }
            Ok(())
        };
        let st = files::read(&path, Kind::Base, g, &key, &mut offer)?;
        if st == Status::Valid {
            return Ok(());
        }
        if let Status::Damaged(m) = &st {
            tracing::warn!(path = %path.display(), problem = %m, "parent dedupe: the base's hash array is damaged or stale, rebuilt");
        }
        let t0 = Instant::now();
        let r = build_base(base, g, &path, key, job, &mut offer);
        if let Err(BlockError::Diff(DiffError::Cancelled)) = r {
            return r;
        }
        hint_lost(r, &|| format!("cannot build {}", path.display()))?;
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            blocks = g.blocks(),
            "parent dedupe: hashed the base image"
        );
        Ok(())
    }

    /// Checks each candidate by reading both blocks, and adds the copies to `refs`.
    fn verify(
        &mut self,
        window: &[(u64, u64)],
        wanted: &Wanted,
        refs: &mut References,
        job: &Job,
    ) -> Result<()> {
        let g = self.geom();
        let bs = g.bs() as usize;
        let per = (READ as usize / bs).max(1);
        let (mut own, mut parent) = (vec![0u8; per * bs], vec![0u8; per * bs]);
        let mut i = 0;
        while i < window.len() {
            job.check().map_err(DiffError::from)?;
            let (b, h) = window[i];
            let Some(c) = wanted.candidate(h) else {
                self.prev = None;
                i += 1;
                continue;
            };
            self.candidates += 1;
            // The block after a copy most often copies the parent block after that one (a
            // copied file): tried first when the index names another block with these bytes.
            if let Some((pb, ps)) = self.prev {
                if pb + 1 == b && ps + 1 != c && ps + 1 < g.blocks() {
                    self.read(b, ps + 1, &mut own[..bs], &mut parent[..bs])?;
                    if own[..bs] == parent[..bs] {
                        refs.push(b, ps + 1, crc32c::crc32c(&own[..bs]));
                        self.prev = Some((b, ps + 1));
                        i += 1;
                        continue;
                    }
                }
            }
            // Consecutive blocks whose candidates are consecutive: one read of each side.
            let mut k = 1;
            while i + k < window.len()
                && k < per
                && window[i + k].0 == b + k as u64
                && wanted.candidate(window[i + k].1) == Some(c + k as u64)
            {
                k += 1;
            }
            self.read(b, c, &mut own[..k * bs], &mut parent[..k * bs])?;
            for j in 0..k {
                let (x, y) = (&own[j * bs..(j + 1) * bs], &parent[j * bs..(j + 1) * bs]);
                if x == y {
                    let (b, c) = (b + j as u64, c + j as u64);
                    refs.push(b, c, crc32c::crc32c(x));
                    self.prev = Some((b, c));
                } else {
                    self.prev = None;
                }
            }
            self.candidates += k as u64 - 1;
            i += k;
        }
        Ok(())
    }

    /// Whole blocks `b ..` of the generation into `own` and parent blocks `c ..` into `parent`,
    /// both zero-padded past the device end.
    fn read(&self, b: u64, c: u64, own: &mut [u8], parent: &mut [u8]) -> Result<()> {
        let g = self.geom();
        let own = zero_past_end(g.size, b * g.bs(), own);
        self.entry.layer.read_stored(b * g.bs(), own)?;
        self.disk.read_parent_of(self.entry, c * g.bs(), parent)
    }
}

/// Writes the base image's hash array to `path` (holes hash as zero without being read) and
/// hands each `(block, hash)` to `f`.
fn build_base(
    base: &File,
    g: Geometry,
    path: &Path,
    key: [u8; 16],
    job: &Job,
    f: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let bs = g.bs();
    let mut w = Writer::create(path, Kind::Base, g, key)?;
    let ctx = || format!("read base image for {}", path.display());
    let mut buf = vec![0u8; ((4 * READ) / bs).max(1) as usize * bs as usize];
    let mut next = 0u64;
    let mut push = |w: &mut Writer, b: u64, h: u64| {
        w.push_base(h)?;
        f(b, h)
    };
    while next < g.blocks() {
        let (start, end) = match fsutil::next_data(base, next * bs, g.size).ctx(ctx)? {
            Some((s, e)) => ((s / bs).max(next), e.div_ceil(bs)),
            None => (g.blocks(), g.blocks()),
        };
        for b in next..start {
            push(&mut w, b, 0)?;
        }
        let mut b = start;
        while b < end {
            job.check().map_err(DiffError::from)?;
            let n = (end - b).min(buf.len() as u64 / bs);
            let chunk = &mut buf[..(n * bs) as usize];
            fsutil::read_at_or_zero(base, zero_past_end(g.size, b * bs, chunk), b * bs).ctx(ctx)?;
            for (j, blk) in chunk.chunks(bs as usize).enumerate() {
                push(&mut w, b + j as u64, block_hash(blk))?;
            }
            b += n;
        }
        next = end.max(start);
    }
    w.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    const BS: u64 = 4096;

    /// A disk over a base of distinct blocks whose generation 1 copies base blocks 0..8 to
    /// 100..108 and writes new data at 200..216.
    fn disk(dir: &std::path::Path) -> (Disk, Vec<u8>) {
        let size = 1 << 20;
        let base: Vec<u8> = (0..size as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 11) as u8 | 1)
            .collect();
        std::fs::write(dir.join("base.img"), &base).unwrap();
        let mut o = DiskOptions::new(dir.join("state"));
        o.base = Some(dir.join("base.img"));
        let d = Disk::open(&o).unwrap();
        d.write(100 * BS, &base[..(8 * BS) as usize]).unwrap();
        let new: Vec<u8> = (0..16 * BS).map(|i| (i % 253) as u8 | 2).collect();
        d.write(200 * BS, &new).unwrap();
        d.cut(false).unwrap();
        (d, base)
    }

    fn plan_of(d: &Disk, generation: u64, window: usize) -> Plan {
        let (e, _) = d.frozen_entry(generation).unwrap();
        d.plan_references_in(&e, &Job::new(), window).unwrap()
    }

    fn plan(d: &Disk, window: usize) -> (References, u64) {
        let p = plan_of(d, 1, window);
        (p.refs, p.candidates)
    }

    fn runs_of(refs: &References) -> Vec<(u64, u64, usize)> {
        refs.runs().map(|(b, s, c)| (b, s, c.len())).collect()
    }

    /// [`disk`], and generation 2 over it: generation 1's new blocks 200..216 copied to 30..46.
    fn two_generations(dir: &std::path::Path) -> Disk {
        let (d, _) = disk(dir);
        let mut buf = vec![0u8; (16 * BS) as usize];
        d.read(200 * BS, &mut buf).unwrap();
        d.write(30 * BS, &buf).unwrap();
        d.cut(false).unwrap();
        d
    }

    #[test]
    fn copies_are_found_in_any_window_size() {
        let dir = tempfile::tempdir().unwrap();
        let (d, _) = disk(dir.path());
        for window in [1, 3, 7, WINDOW] {
            let (refs, _) = plan(&d, window);
            assert_eq!(runs_of(&refs), [(100, 0, 8)], "window {window}");
        }
    }

    #[test]
    fn a_layer_without_a_list_is_read_once_per_export_whatever_its_windows() {
        let dir = tempfile::tempdir().unwrap();
        let d = two_generations(dir.path());
        let (g1, _) = d.frozen_entry(1).unwrap();
        let g1_blocks = g1.layer.tracker().dirty_count();
        let list = g1.layer.hashes_file_path().to_owned();
        assert!(!list.exists(), "generation 1 was never exported");
        // Generation 2's 16 blocks one window each: generation 1 (24 blocks) is searched 16
        // times, read for the first only.
        let p = plan_of(&d, 2, 1);
        assert_eq!(runs_of(&p.refs), [(30, 200, 16)]);
        assert_eq!(p.hashed, g1_blocks, "generation 1 read more than once");
        assert!(list.exists(), "generation 1's list kept");
        // The next export streams it, in any window size.
        for window in [1, 5, WINDOW] {
            let p = plan_of(&d, 2, window);
            assert_eq!(runs_of(&p.refs), [(30, 200, 16)], "window {window}");
            assert_eq!(p.hashed, 0, "window {window}");
        }
        // It is the list generation 1's own export writes: every dirty block, hashed alike.
        let written = std::fs::read(&list).unwrap();
        std::fs::remove_file(&list).unwrap();
        plan_of(&d, 1, WINDOW);
        assert!(std::fs::read(&list).unwrap() == written);
    }

    #[test]
    fn a_list_of_a_layer_folded_meanwhile_is_not_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let d = two_generations(dir.path());
        let mut buf = vec![0u8; BS as usize];
        d.read(0, &mut buf).unwrap();
        d.write(250 * BS, &buf).unwrap();
        d.cut(false).unwrap();
        // Generation 3's export lists generations 2 and 1; generation 2 then folds into 1.
        plan_of(&d, 3, WINDOW);
        let (g2, _) = d.frozen_entry(2).unwrap();
        let stale = g2.layer.hashes_file_path().to_owned();
        let written = std::fs::read(&stale).unwrap();
        d.fold(2, true).unwrap();
        assert!(!stale.exists());
        // As if the export's list had been committed after the fold removed the layer's files.
        std::fs::write(&stale, &written).unwrap();
        d.drop_list_if_folded(&g2);
        assert!(
            !stale.exists(),
            "the list of a layer no longer in the stack kept"
        );
        // A layer still in the stack keeps its list.
        let (g3, _) = d.frozen_entry(3).unwrap();
        assert!(g3.layer.hashes_file_path().exists());
        d.drop_list_if_folded(&g3);
        assert!(g3.layer.hashes_file_path().exists());
    }

    #[test]
    fn lying_or_colliding_index_entries_never_make_a_wrong_reference() {
        let dir = tempfile::tempdir().unwrap();
        let (d, base) = disk(dir.path());
        assert_eq!(plan(&d, WINDOW).0.blocks(), 8);
        let g = d.geometry();
        let hash_of = |b: &[u8]| block_hash(b);
        // The base's array rewritten, valid in form: every block claims the bytes of one of
        // the new data blocks (none of which the base holds), and the copied blocks' true
        // places claim other bytes.
        let new: Vec<u8> = (0..16 * BS).map(|i| (i % 253) as u8 | 2).collect();
        let key = base_key(d.manifest.base_identity.as_ref().unwrap());
        let path = d.dir.join(BASE_HASHES);
        let mut w = Writer::create(&path, Kind::Base, g, key).unwrap();
        for p in 0..g.blocks() {
            let i = (p % 16) as usize * BS as usize;
            w.push_base(hash_of(&new[i..i + BS as usize])).unwrap();
        }
        w.commit().unwrap();
        let (refs, candidates) = plan(&d, WINDOW);
        assert!(candidates >= 16, "the lies were offered ({candidates})");
        assert_eq!(refs.blocks(), 0, "a reference to bytes that differ");
        // Every base block claiming one and the same hash, which the copies have: one
        // candidate for all, right for one copy only.
        let mut w = Writer::create(&path, Kind::Base, g, key).unwrap();
        let one = hash_of(&base[..BS as usize]);
        for _ in 0..g.blocks() {
            w.push_base(one).unwrap();
        }
        w.commit().unwrap();
        let refs = plan_of(&d, 1, WINDOW).refs;
        for (b, s, crcs) in refs.runs() {
            for (j, &crc) in crcs.iter().enumerate() {
                let (b, s) = (b + j as u64, s + j as u64);
                let at = (s * BS) as usize;
                assert_eq!(b - 100, s, "block {b} refers to {s}");
                assert_eq!(crc, crc32c::crc32c(&base[at..at + BS as usize]));
            }
        }
        assert!(refs.blocks() >= 1);
    }
}
