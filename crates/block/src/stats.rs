use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Request counters of a disk, bumped on the data path (relaxed atomics, no lock).
        #[derive(Default, Debug)]
        pub struct Stats { $(pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Stats`].
        #[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
        pub struct StatsSnapshot { $(pub $name: u64,)* }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

// `reclaimed_bytes`: bytes of dirty blocks turned into holes by discards and zero writes.
counters!(
    reads,
    read_bytes,
    writes,
    written_bytes,
    write_zeroes,
    zeroed_bytes,
    discards,
    discarded_bytes,
    flushes,
    reclaimed_bytes,
);

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}
