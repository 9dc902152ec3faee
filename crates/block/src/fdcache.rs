//! Open files of frozen layers, at most a few at a time: a disk may hold thousands of
//! generations, and one fd each would run into the process's fd limit (and take the fds a VMM
//! connection needs). The active layer keeps its own fd; frozen ones are opened on demand and
//! the least recently used is closed when the cache is full.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// Frozen layer files held open at most (reads of recent generations rarely miss).
pub const DEFAULT_CAPACITY: usize = 64;

#[derive(Debug)]
pub struct FdCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tick: u64,
    open: HashMap<PathBuf, (Arc<File>, u64)>,
    opens: u64,
}

impl FdCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    /// A read-only handle on `path`, opened if it is not cached. A handle given out stays valid
    /// after its eviction (the fd closes when the last user drops it).
    pub fn get(&self, path: &Path) -> io::Result<Arc<File>> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        g.tick += 1;
        let tick = g.tick;
        if let Some((f, used)) = g.open.get_mut(path) {
            *used = tick;
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(path)?);
        g.opens += 1;
        if g.open.len() >= self.capacity {
            // O(capacity), and only on a miss.
            if let Some(victim) = g
                .open
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(p, _)| p.clone())
            {
                g.open.remove(&victim);
            }
        }
        g.open.insert(path.to_owned(), (f.clone(), tick));
        Ok(f)
    }

    /// Drops the cached handle of `path` (its file is being removed or replaced).
    pub fn forget(&self, path: &Path) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .remove(path);
    }

    /// (files open now, opens so far)
    pub fn usage(&self) -> (usize, u64) {
        let g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (g.open.len(), g.opens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_capacity_and_evicts_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..5)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, [i as u8]).unwrap();
                p
            })
            .collect();
        let c = FdCache::new(3);
        for p in &paths[..3] {
            c.get(p).unwrap();
        }
        c.get(&paths[0]).unwrap(); // 0 is now the most recent; 1 the least
        let held = c.get(&paths[3]).unwrap(); // evicts 1
        assert_eq!(c.usage(), (3, 4));
        c.get(&paths[0]).unwrap();
        c.get(&paths[2]).unwrap();
        assert_eq!(c.usage().1, 4, "0 and 2 were still cached");
        c.get(&paths[1]).unwrap();
        assert_eq!(c.usage(), (3, 5), "1 had been evicted");
        // An evicted handle still reads.
        for p in &paths[4..] {
            c.get(p).unwrap();
        }
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&*held, &mut b, 0).unwrap();
        assert_eq!(b, [3]);
        c.forget(&paths[4]);
        assert_eq!(c.usage().0, 2);
    }
}
