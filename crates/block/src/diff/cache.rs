//! The few most recently decoded frames of one diff, for random reads (a chain diff serving a
//! guest): one block read decodes its whole frame, and the reads after it usually want the
//! blocks next to it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Decoded bytes the cache keeps, at least one frame whatever its size.
const BUDGET: usize = 8 << 20;

#[derive(Default)]
pub struct FrameCache {
    /// (frame index, raw bytes), most recent first.
    frames: Mutex<VecDeque<(usize, Arc<[u8]>)>>,
}

impl FrameCache {
    pub fn get(&self, frame: usize) -> Option<Arc<[u8]>> {
        let mut q = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        let i = q.iter().position(|(f, _)| *f == frame)?;
        let e = q.remove(i).expect("position is in range");
        let bytes = e.1.clone();
        q.push_front(e);
        Some(bytes)
    }

    /// Keeps `bytes` of `frame`, dropping the least recently used frames over the budget.
    pub fn put(&self, frame: usize, bytes: Arc<[u8]>) {
        let mut q = self.frames.lock().unwrap_or_else(PoisonError::into_inner);
        // Two readers may decode the same frame at once; keep one copy.
        q.retain(|(f, _)| *f != frame);
        q.push_front((frame, bytes));
        let mut total = 0;
        let keep = q
            .iter()
            .take_while(|(_, b)| {
                total += b.len();
                total <= BUDGET
            })
            .count()
            .max(1);
        q.truncate(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_recent_frames_within_the_budget() {
        let c = FrameCache::default();
        let mb = |v: u8| -> Arc<[u8]> { vec![v; 1 << 20].into() };
        for f in 0..8 {
            c.put(f, mb(f as u8));
        }
        assert_eq!(c.get(0).unwrap()[0], 0);
        // Frame 0 is now the most recent: the 9th and 10th frames push out 1 and 2.
        c.put(8, mb(8));
        c.put(9, mb(9));
        assert!(c.get(1).is_none() && c.get(2).is_none());
        assert!(c.get(0).is_some() && c.get(9).is_some());
        // A frame larger than the budget is still kept, alone.
        c.put(10, vec![1u8; BUDGET + 1].into());
        assert!(c.get(10).is_some() && c.get(9).is_none());
    }
}
