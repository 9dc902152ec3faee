//! One request's semantics (DESIGN §2.2): reads through the stack, writes, zero writes and
//! discards into the active layer with exact sub-block handling, and flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLockReadGuard};

use super::Disk;
use crate::diff::{read_chain, DiffError, DiffIo};
use crate::error::{BlockError, Result};
use crate::fsutil;
use crate::geometry::{zero_past_end, Geometry, SECTOR};
use crate::layer::Layer;
use crate::stack::{Entry, Src, Stack};
use crate::stats::Stats;
use crate::tracker::BlockState;
use crate::zero::is_zero;

enum Op<'a> {
    Data(&'a [u8]),
    Zeroes,
    Discard,
}

/// One request's access to the disk (see [`Disk::io`]). It holds the stack for its whole life,
/// so a cut waits for it and every operation made through it lands in one generation.
pub struct Io<'a> {
    disk: &'a Disk,
    stack: RwLockReadGuard<'a, Stack>,
}

impl Drop for Io<'_> {
    fn drop(&mut self) {
        self.disk.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Disk {
    /// Starts a request: until the returned [`Io`] is dropped, a cut waits for it, so every
    /// operation made through it lands in one generation.
    pub fn io(&self) -> Io<'_> {
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Io { disk: self, stack }
    }

    /// Reads device bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io().read(offset, buf)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.io().write(offset, data)
    }

    /// Makes `[offset, offset + len)` read as zero (exactly: partial blocks keep their other bytes).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.io().write_zeroes(offset, len)
    }

    /// Discards the blocks `[offset, offset + len)` covers whole; partial blocks are left as they
    /// are (the spec lets a discard round inward).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.io().discard(offset, len)
    }

    /// Makes every completed write durable: the active layer's data first, then the bitmaps that
    /// describe it; frozen layers once each.
    pub fn flush(&self) -> Result<()> {
        if self.readonly {
            return Ok(());
        }
        let io = self.io();
        let _f = self
            .flush_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        io.stack.active().layer.persist()?;
        for e in &io.stack.layers[1..] {
            Self::persist_frozen(e)?;
        }
        drop(io);
        Stats::add(&self.stats.flushes, 1);
        Ok(())
    }

    /// Reads `buf` at `offset` from `stack`, skipping its first `skip` layers. The diffs the
    /// disk was started from resolve their references against the diffs and base below them.
    fn read_stack(&self, stack: &Stack, offset: u64, buf: &mut [u8], skip: usize) -> Result<()> {
        let end = offset + buf.len() as u64;
        for (s, e, src) in stack.resolve(self.geom, offset, end, skip) {
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Src::Layer(i) => stack.layers[i].layer.read_stored(s, dst)?,
                // The run is dirty in that diff: without references its stored bytes are the
                // answer, with no walk down the chain.
                Src::Chain(i) if !stack.chain[i].has_references() => {
                    stack.chain[i].read_stored(s, dst)?
                }
                Src::Chain(i) => read_chain(
                    &stack.chain[i..],
                    &|o, b: &mut [u8]| self.read_base(o, b),
                    s,
                    dst,
                )?,
                Src::Zero => dst.fill(0),
                Src::Base => self.read_base(s, dst)?,
            }
        }
        Ok(())
    }

    pub(super) fn read_base(
        &self,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), DiffError> {
        match &self.base {
            Some(f) => fsutil::read_at_or_zero(f, buf, offset)
                .dctx(|| format!("read base {:?}", self.base_path())),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Reads device bytes at `offset` as they are below frozen `entry`: its parent state, the
    /// disk its diff applies on. Bytes past the device end read as zero.
    pub(super) fn read_parent_of(
        &self,
        entry: &Arc<Entry>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let inside = zero_past_end(self.geom.size, offset, buf);
        // Taken per call, like a guest request takes it (a call reads at most what one request
        // does: a run of candidates, see `Search::verify`), not per window of an export: a cut
        // waiting for the write guard holds new requests back, so a guard kept across a
        // window's reads would stall the guest for all of them.
        let stack = self.stack.read().unwrap_or_else(PoisonError::into_inner);
        let i = stack
            .layers
            .iter()
            .position(|e| Arc::ptr_eq(e, entry))
            .ok_or(BlockError::NoSuchGeneration(entry.generation))?;
        self.read_stack(&stack, offset, inside, i + 1)
    }
}

impl Io<'_> {
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.read_below(offset, buf, 0)?;
        let s = &self.disk.stats;
        Stats::add(&s.reads, 1);
        Stats::add(&s.read_bytes, buf.len() as u64);
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let s = &self.disk.stats;
        let len = data.len() as u64;
        self.counted(offset, len, Op::Data(data), (&s.writes, &s.written_bytes))
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let s = &self.disk.stats;
        self.counted(offset, len, Op::Zeroes, (&s.write_zeroes, &s.zeroed_bytes))
    }

    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let s = &self.disk.stats;
        self.counted(offset, len, Op::Discard, (&s.discards, &s.discarded_bytes))
    }

    fn geom(&self) -> Geometry {
        self.disk.geom
    }

    fn active(&self) -> &Layer {
        &self.stack.active().layer
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR) {
            return Err(BlockError::Unaligned { offset, len });
        }
        self.geom().check_range(offset, len)
    }

    fn counted(
        &self,
        offset: u64,
        len: u64,
        op: Op<'_>,
        (count, bytes): (&AtomicU64, &AtomicU64),
    ) -> Result<()> {
        self.mutate(offset, len, op)?;
        Stats::add(count, 1);
        Stats::add(bytes, len);
        Ok(())
    }

    /// Reads `buf` at `offset` from the stack, skipping its first `skip` layers.
    fn read_below(&self, offset: u64, buf: &mut [u8], skip: usize) -> Result<()> {
        self.disk.read_stack(&self.stack, offset, buf, skip)
    }

    fn mutate(&self, offset: u64, len: u64, op: Op<'_>) -> Result<()> {
        if self.disk.readonly {
            return Err(BlockError::ReadOnly);
        }
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let g = self.geom();
        let bs = g.bs();
        let end = offset + len;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let _range = self.disk.locks.lock(first, last + 1);
        let active = self.active();
        let data_at = |s: u64, e: u64| match op {
            Op::Data(d) => Some(&d[(s - offset) as usize..(e - offset) as usize]),
            _ => None,
        };
        let mut b = first;
        while b <= last {
            let (bs_, be) = g.block_span(b);
            let (s, e) = (offset.max(bs_), end.min(be));
            if s != bs_ || e != be {
                if !matches!(op, Op::Discard) {
                    self.patch_block(b, s, e, data_at(s, e))?;
                }
                b += 1;
                continue;
            }
            // A run of whole blocks of one kind: one pwrite or one punch for all of it.
            let zero = |blk: u64| {
                let (s, e) = g.block_span(blk);
                data_at(s, e).is_none_or(is_zero)
            };
            let kind = zero(b);
            let mut run_end = b + 1;
            while run_end <= last && g.block_span(run_end).1 <= end && zero(run_end) == kind {
                run_end += 1;
            }
            let (rs, re) = (bs_, g.block_span(run_end - 1).1);
            if kind {
                self.zero_blocks(b, run_end, rs, re)?;
            } else {
                active.write_stored(rs, data_at(rs, re).expect("data op"))?;
                active.set_range(b, run_end, BlockState::Dirty);
            }
            b = run_end;
        }
        Ok(())
    }

    fn zero_blocks(&self, b: u64, b_end: u64, s: u64, e: u64) -> Result<()> {
        let active = self.active();
        let was_dirty = active
            .tracker()
            .dirty()
            .range_cardinality(Geometry::idx(b)..Geometry::idx(b_end - 1) + 1);
        active.punch(s, e - s)?;
        active.set_range(b, b_end, BlockState::Zero);
        Stats::add(
            &self.disk.stats.reclaimed_bytes,
            was_dirty * self.geom().bs(),
        );
        Ok(())
    }

    /// Read-modify-write of block `b`, replacing bytes `[s, e)` with `patch` (zeros if `None`).
    /// The range lock is held, so nothing else changes this block meanwhile.
    fn patch_block(&self, b: u64, s: u64, e: u64, patch: Option<&[u8]>) -> Result<()> {
        let active = self.active();
        let (bs_, be) = self.geom().block_span(b);
        let patch_zero = patch.is_none_or(is_zero);
        let fill = |block: &mut [u8]| {
            let dst = &mut block[(s - bs_) as usize..(e - bs_) as usize];
            match patch {
                Some(p) => dst.copy_from_slice(p),
                None => dst.fill(0),
            }
        };
        let mut block = vec![0u8; (be - bs_) as usize];
        match active.state(b) {
            BlockState::Zero if patch_zero => {
                active.mark_sub_block_zero(b);
                return Ok(());
            }
            BlockState::Zero => {
                fill(&mut block);
                active.write_stored(bs_, &block)?;
                active.set_range(b, b + 1, BlockState::Dirty);
                return Ok(());
            }
            // Non-zero bytes into a stored block: it stays non-zero, patch in place.
            BlockState::Dirty if !patch_zero => {
                active.write_stored(s, patch.expect("non-zero patch"))?;
                active.set_range(b, b + 1, BlockState::Dirty);
                return Ok(());
            }
            BlockState::Dirty => active.read_stored(bs_, &mut block)?,
            BlockState::Untouched => self.read_below(bs_, &mut block, 1)?,
        }
        fill(&mut block);
        if is_zero(&block) {
            self.zero_blocks(b, b + 1, bs_, be)?;
            active.mark_sub_block_zero(b);
        } else {
            active.write_stored(bs_, &block)?;
            active.set_range(b, b + 1, BlockState::Dirty);
        }
        Ok(())
    }
}
