//! Range locks over block indices: two requests that touch a common block run one after the
//! other, requests on disjoint blocks never wait for each other. Held ranges are few (bounded
//! by the queues' depth), so a list scan beats a tree.

use std::sync::{Condvar, Mutex, PoisonError};

#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// Holds `[start, end)` until dropped.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(PoisonError::into_inner);
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .lock
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlapping_ranges_wait_disjoint_do_not() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(10, 20);
        // Disjoint (touching) ranges are granted at once.
        drop(lock.lock(0, 10));
        drop(lock.lock(20, 30));
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (lock, got) = (lock.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = lock.lock(15, 16);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!got.load(Ordering::SeqCst), "overlapping range must wait");
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
