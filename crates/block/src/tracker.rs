//! The per-layer block state machine: which blocks this layer stores data for (dirty), which it
//! says read as zero whatever lies below (zero), and which it never touched (everything else).
//!
//! One roaring bitmap per non-default state, kept disjoint: setting a range in one state removes
//! it from the other. Range operations cost O(runs), not O(blocks).

use roaring::RoaringBitmap;
use serde::Serialize;

/// The state of one block in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockState {
    /// Never touched by this layer: reads fall through to the layers below.
    Untouched,
    /// This layer stores the block's bytes.
    Dirty,
    /// Reads as zero in this layer, whatever lies below; no bytes stored.
    Zero,
}

/// Block states of one layer. Block indices are `u32`, which bounds a device at 2^32 blocks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tracker {
    dirty: RoaringBitmap,
    zero: RoaringBitmap,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a tracker from exported bitmaps; `None` if they overlap (a block in two states).
    pub fn from_bitmaps(dirty: RoaringBitmap, zero: RoaringBitmap) -> Option<Self> {
        dirty.is_disjoint(&zero).then_some(Self { dirty, zero })
    }

    /// Puts blocks `[start, end)` into `state`. Empty and inverted ranges change nothing.
    pub fn set_range(&mut self, start: u32, end: u32, state: BlockState) {
        if start >= end {
            return;
        }
        let r = start..end;
        match state {
            BlockState::Untouched => {
                self.dirty.remove_range(r.clone());
                self.zero.remove_range(r);
            }
            BlockState::Dirty => {
                self.zero.remove_range(r.clone());
                self.dirty.insert_range(r);
            }
            BlockState::Zero => {
                self.dirty.remove_range(r.clone());
                self.zero.insert_range(r);
            }
        }
    }

    pub fn state(&self, block: u32) -> BlockState {
        if self.dirty.contains(block) {
            BlockState::Dirty
        } else if self.zero.contains(block) {
            BlockState::Zero
        } else {
            BlockState::Untouched
        }
    }

    /// True iff every block of `[start, end)` is in `state`. An empty range is vacuously true,
    /// an inverted one false.
    pub fn all_in(&self, start: u32, end: u32, state: BlockState) -> bool {
        if start > end {
            return false;
        }
        let r = start..end;
        match state {
            BlockState::Dirty => self.dirty.contains_range(r),
            BlockState::Zero => self.zero.contains_range(r),
            BlockState::Untouched => {
                self.dirty.range_cardinality(r.clone()) == 0 && self.zero.range_cardinality(r) == 0
            }
        }
    }

    /// True iff every block of `[start, end)` is dirty or zero (this layer answers for all of it).
    pub fn all_present(&self, start: u32, end: u32) -> bool {
        if start > end {
            return false;
        }
        let r = start..end;
        // Sound only because the bitmaps are disjoint.
        self.dirty.range_cardinality(r.clone()) + self.zero.range_cardinality(r)
            == u64::from(end - start)
    }

    pub fn dirty(&self) -> &RoaringBitmap {
        &self.dirty
    }

    pub fn zero(&self) -> &RoaringBitmap {
        &self.zero
    }

    /// Clones of the dirty and zero bitmaps, detached from the tracker.
    pub fn export(&self) -> (RoaringBitmap, RoaringBitmap) {
        (self.dirty.clone(), self.zero.clone())
    }

    pub fn dirty_count(&self) -> u64 {
        self.dirty.len()
    }

    pub fn zero_count(&self) -> u64 {
        self.zero.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty() && self.zero.is_empty()
    }

    /// Overlays `upper` on this tracker: every block `upper` answers for takes its state.
    pub fn overlay(&mut self, upper: &Tracker) {
        self.zero -= &upper.dirty;
        self.dirty -= &upper.zero;
        self.dirty |= &upper.dirty;
        self.zero |= &upper.zero;
    }
}

/// Maximal runs `[start, end)` of a bitmap, in ascending order, in O(runs).
pub fn runs(bitmap: &RoaringBitmap) -> impl Iterator<Item = (u32, u64)> + '_ {
    let mut it = bitmap.iter();
    std::iter::from_fn(move || {
        it.next_range()
            .map(|r| (*r.start(), u64::from(*r.end()) + 1))
    })
}

#[cfg(test)]
mod tests {
    use super::BlockState::*;
    use super::*;

    #[test]
    fn transitions() {
        let mut t = Tracker::new();
        t.set_range(0, 1, Dirty);
        assert_eq!(t.state(0), Dirty);
        t.set_range(0, 1, Zero);
        assert_eq!(t.state(0), Zero);
        assert!(!t.dirty().contains(0));
        t.set_range(0, 1, Dirty);
        assert_eq!(t.state(0), Dirty);
        assert!(!t.zero().contains(0));
        t.set_range(0, 1, Dirty);
        assert_eq!((t.dirty_count(), t.zero_count()), (1, 0));
        t.set_range(0, 1, Untouched);
        assert_eq!(t.state(0), Untouched);
        assert!(t.is_empty());
    }

    #[test]
    fn partial_overlap_moves_only_the_overlap() {
        let mut t = Tracker::new();
        t.set_range(0, 10, Dirty);
        t.set_range(3, 7, Zero);
        for b in 0..10 {
            let want = if (3..7).contains(&b) { Zero } else { Dirty };
            assert_eq!(t.state(b), want, "block {b}");
        }
        assert_eq!((t.dirty_count(), t.zero_count()), (6, 4));
    }

    #[test]
    fn empty_and_inverted_ranges_are_noops() {
        let mut t = Tracker::new();
        t.set_range(5, 5, Dirty);
        t.set_range(7, 3, Zero);
        assert!(t.is_empty());
    }

    #[test]
    fn range_queries() {
        let mut t = Tracker::new();
        t.set_range(0, 5, Dirty);
        t.set_range(5, 10, Zero);
        assert!(t.all_in(0, 5, Dirty));
        assert!(t.all_in(5, 10, Zero));
        assert!(!t.all_in(0, 5, Zero));
        assert!(!t.all_in(0, 6, Dirty), "a gap in dirty must fail");
        assert!(t.all_in(3, 3, Dirty));
        assert!(!t.all_in(7, 5, Zero));
        assert!(t.all_in(10, 20, Untouched));
        assert!(!t.all_in(9, 20, Untouched));
        assert!(t.all_present(0, 10));
        assert!(!t.all_present(0, 11));
        assert!(t.all_present(3, 3));
        assert!(!t.all_present(4, 2));
    }

    #[test]
    fn export_returns_clones() {
        let mut t = Tracker::new();
        t.set_range(2, 4, Dirty);
        let (mut d, mut z) = t.export();
        d.insert(100);
        z.insert(200);
        assert_eq!(t.state(100), Untouched);
        assert_eq!(t.state(200), Untouched);
        assert_eq!(t.dirty_count(), 2);
    }

    #[test]
    fn from_bitmaps_refuses_overlap() {
        let d: RoaringBitmap = (0..4).collect();
        let z: RoaringBitmap = (3..6).collect();
        assert!(Tracker::from_bitmaps(d.clone(), z).is_none());
        let z: RoaringBitmap = (4..6).collect();
        assert!(Tracker::from_bitmaps(d, z).is_some());
    }

    #[test]
    fn overlay_newest_wins() {
        let mut lower = Tracker::new();
        lower.set_range(0, 10, Dirty);
        lower.set_range(10, 20, Zero);
        let mut upper = Tracker::new();
        upper.set_range(5, 15, Zero);
        upper.set_range(18, 25, Dirty);
        lower.overlay(&upper);
        let want = |b: u32| match b {
            0..=4 => Dirty,
            5..=14 => Zero,
            15..=17 => Zero,
            18..=24 => Dirty,
            _ => Untouched,
        };
        for b in 0..30 {
            assert_eq!(lower.state(b), want(b), "block {b}");
        }
    }

    #[test]
    fn runs_are_maximal() {
        let b: RoaringBitmap = [1u32, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(runs(&b).collect::<Vec<_>>(), vec![(1, 4), (7, 8), (9, 11)]);
        let full: RoaringBitmap = (u32::MAX - 1..=u32::MAX).collect();
        assert_eq!(
            runs(&full).collect::<Vec<_>>(),
            vec![(u32::MAX - 1, 1 << 32)]
        );
    }
}
