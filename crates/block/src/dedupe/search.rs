//! The hashes an export looks for in its parent state, and the first parent block found for
//! each. Sized by the export's own dirty blocks (a window of them), never by the device.

/// No parent block found yet.
const NONE: u64 = u64::MAX;

pub(crate) struct Wanted {
    /// Distinct non-zero hashes looked for, ascending.
    keys: Vec<u64>,
    /// The first parent block offered with each hash, or `NONE`.
    found: Vec<u64>,
    /// One bit per bucket of `64 - shift` hash bits, set where a key falls: most parent blocks
    /// are dismissed with one bit test, before any search.
    filter: Vec<u64>,
    shift: u32,
    missing: usize,
}

impl Wanted {
    /// Looks for `hashes` (zero, an all-zero block, is never looked for).
    pub fn new(hashes: impl IntoIterator<Item = u64>) -> Self {
        let mut keys: Vec<u64> = hashes.into_iter().filter(|&h| h != 0).collect();
        keys.sort_unstable();
        keys.dedup();
        // About 8 bits a key: one parent block in eight passes the filter by chance at most.
        let bits = (keys.len() as u64 * 8).next_power_of_two().max(64);
        let shift = 64 - bits.trailing_zeros();
        let mut filter = vec![0u64; (bits / 64) as usize];
        for &k in &keys {
            let i = (k >> shift) as usize;
            filter[i / 64] |= 1 << (i % 64);
        }
        Self {
            found: vec![NONE; keys.len()],
            missing: keys.len(),
            keys,
            filter,
            shift,
        }
    }

    /// True once every hash has a parent block: the search can stop.
    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    /// Cheap pre-test: false means no key has `hash`.
    pub fn may_want(&self, hash: u64) -> bool {
        let i = (hash >> self.shift) as usize;
        hash != 0 && self.filter[i / 64] & (1 << (i % 64)) != 0
    }

    /// Parent block `block` holds content hashing to `hash`: a candidate if none is known yet.
    pub fn offer(&mut self, block: u64, hash: u64) {
        if !self.may_want(hash) {
            return;
        }
        if let Ok(i) = self.keys.binary_search(&hash) {
            if self.found[i] == NONE {
                self.found[i] = block;
                self.missing -= 1;
            }
        }
    }

    /// The parent block found for `hash`, if any.
    pub fn candidate(&self, hash: u64) -> Option<u64> {
        if !self.may_want(hash) {
            return None;
        }
        let i = self.keys.binary_search(&hash).ok()?;
        (self.found[i] != NONE).then_some(self.found[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_offer_of_each_hash_wins_and_zero_is_never_wanted() {
        let mut w = Wanted::new([5, 9, 5, 0, 1 << 63]);
        assert!(!w.complete());
        assert!(!w.may_want(0));
        w.offer(100, 0);
        w.offer(7, 9);
        w.offer(8, 9);
        w.offer(3, 12345);
        assert_eq!(w.candidate(9), Some(7));
        assert_eq!(w.candidate(5), None);
        assert_eq!(w.candidate(12345), None);
        w.offer(1, 5);
        w.offer(2, 1 << 63);
        assert!(w.complete());
        assert_eq!((w.candidate(5), w.candidate(1 << 63)), (Some(1), Some(2)));
        // Nothing wanted: everything is dismissed.
        let w = Wanted::new([0]);
        assert!(w.complete() && !w.may_want(42));
    }
}
