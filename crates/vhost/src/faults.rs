//! Guest-caused faults: a guest can send garbage at any rate, so each kind is logged once and
//! counted after that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Guest-caused faults, counted by kind and logged once each.
#[derive(Default)]
pub struct Faults {
    seen: Mutex<HashMap<&'static str, u64>>,
    pub total: AtomicU64,
}

impl Faults {
    pub fn record(&self, what: &'static str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let n = seen.entry(what).or_insert(0);
        *n += 1;
        if *n == 1 {
            tracing::warn!(
                fault = what,
                "bad request from the guest (further ones of this kind are counted, not logged)"
            );
        }
    }

    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = seen.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        v.sort();
        v
    }
}
