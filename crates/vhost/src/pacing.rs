//! How a queue worker paces itself between the driver's requests: how long it keeps looking at
//! an empty ring before it sleeps, and whether it signals each completion the driver asked for
//! as it makes it or once for the whole batch. Pure logic: the shell feeds it what it saw.
//!
//! Why either matters: a sleeping thread pays a wake-up (a context switch; tens of µs when its
//! CPU has gone idle, as a VM's halted vCPU does), and so does a driver waiting for its
//! interrupt. Signalling once per batch makes the driver wait for the whole batch and then the
//! worker sleep while the driver refills, so on an idle machine every turn pays two wake-ups.
//! Signalling as completions are made lets the driver refill while the worker goes on, and a
//! short look before sleeping catches the refill; but on a busy machine each early signal makes
//! the woken driver preempt the worker, and a look steals CPU from someone else.
//!
//! - **Look** (adaptive polling, QEMU's `poll-max-ns` rule, with a back-off): the window starts
//!   at zero and grows (×2, from [`LOOK_MIN`] to the operator's maximum, [`LOOK_MAX`] by
//!   default) while the worker's sleeps are short, so a look could have caught what woke it; a
//!   long sleep (the queue idles) or a run of looks of the widest window that found nothing
//!   closes it. Each run of fruitless looks doubles how many wake-ups pass before the window
//!   may open again (up to [`COOLDOWN_MAX`]); a look that finds work resets that. The CPU a look can waste is so bounded: at most [`MISSES`] windows per
//!   back-off, and back-offs grow while looks keep failing. A look spins between glances
//!   without yielding (a yield would hand the CPU to a CPU-bound thread for a whole time
//!   slice); a gap between two glances longer than [`CONTENDED`] means the thread was
//!   preempted, so others want this CPU and a look only competes with them (the driver among
//!   them): the window closes at once, with the same back-off. So does a look that finds the
//!   next request only after the worker was preempted during its round (the shell counts the
//!   thread's involuntary switches, one read per round): the driver it woke ran in its stead on
//!   this CPU, and the request could not have come any sooner.
//! - **Early signals wait for low water**: a completion signals early only once the ring holds
//!   no more than half the chains its round began with ([`low_water`]). Until then the driver
//!   that went to sleep has left the worker plenty to do, and waking it for each completion
//!   only buys more wake-ups: it wakes, takes the one or two completions there are, refills
//!   them, and sleeps again. At low water the signal still comes early enough for the driver to
//!   wake and refill while the worker serves the other half. Measured on a 2-vCPU VM (4k READ,
//!   16 in flight, quiet): an early signal for every completion asked for cost 0.31 interrupts
//!   per request and 225k/s; waiting for low water 0.06-0.09 and 290-335k/s, WRITE 184k to 245k/s.
//! - **Early signals** are on by default; a round during which the worker was preempted
//!   (involuntary context switches of its thread) turns them off for a number of rounds that
//!   doubles while trial rounds keep being preempted (from [`BATCH_MIN`] to [`BATCH_MAX`]), and
//!   resets after a clean one.

use std::time::Duration;

/// The first window a look opens with.
pub const LOOK_MIN: Duration = Duration::from_micros(4);
/// The longest look (QEMU's default `poll-max-ns` is 32 µs).
pub const LOOK_MAX: Duration = Duration::from_micros(32);
/// A sleep shorter than this is one a look might have caught: it includes the wake-up, which
/// on an idle vCPU can take longer than the request took to arrive (KVM's halt-polling bound).
pub const SHORT_SLEEP: Duration = Duration::from_micros(200);
/// A gap this long between two glances of a look means the thread was preempted: the CPU is
/// contended.
pub const CONTENDED: Duration = Duration::from_micros(10);
/// Fruitless looks in a row that close the window.
pub const MISSES: u32 = 2;
/// The longest back-off, in wake-ups.
pub const COOLDOWN_MAX: u32 = 1024;
/// Rounds of batched signalling after a preempted round, at first and at most.
pub const BATCH_MIN: u32 = 64;
pub const BATCH_MAX: u32 = 4096;

/// Whether a completion made while `pending` chains are still available, in a round that began
/// with `began`, is one to signal early: the ring has run down to half of what the round began
/// with (see the module's note).
pub fn low_water(began: u16, pending: u16) -> bool {
    pending <= began / 2
}

/// One queue worker's pacing state. Only the worker's thread touches it.
#[derive(Debug)]
pub struct Pacing {
    /// The longest window (the operator's `--poll-max-us`); zero: never look.
    max: Duration,
    window: Duration,
    misses: u32,
    /// Wake-ups to pass before the window may open again.
    cooldown: u32,
    /// The next back-off.
    penalty: u32,
    /// Rounds left with early signals off.
    batch_left: u32,
    /// The next batching period.
    batch_period: u32,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing::new(LOOK_MAX)
    }
}

impl Pacing {
    /// Pacing whose looks last at most `max`.
    pub fn new(max: Duration) -> Self {
        Pacing {
            max,
            window: Duration::ZERO,
            misses: 0,
            cooldown: 0,
            penalty: 1,
            batch_left: 0,
            batch_period: BATCH_MIN,
        }
    }

    /// How long to look at the empty ring before sleeping.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The worker woke (a kick) after sleeping `slept`, counted from when its last look began.
    pub fn woke(&mut self, slept: Duration) {
        if slept >= SHORT_SLEEP {
            // The queue was idle: no look would have caught this. Close without penalty.
            self.window = Duration::ZERO;
            self.misses = 0;
            return;
        }
        if self.cooldown > 0 {
            self.cooldown -= 1;
            return;
        }
        if slept > self.window {
            self.window = (self.window * 2).clamp(LOOK_MIN.min(self.max), self.max);
        }
    }

    /// A look found new requests: looking pays.
    pub fn found(&mut self) {
        self.misses = 0;
        self.penalty = 1;
    }

    /// A look of the whole window found nothing; the worker goes to sleep. While the window is
    /// still growing a miss only says it is not yet wide enough (the next short sleep widens
    /// it); misses of the widest window count towards closing it.
    pub fn missed(&mut self) {
        if self.window < self.max {
            return;
        }
        self.misses += 1;
        if self.misses >= MISSES {
            self.misses = 0;
            self.close();
        }
    }

    /// A look was cut short because other threads wanted the CPU: close the window and back
    /// off, as after a run of misses.
    pub fn contended(&mut self) {
        self.misses = 0;
        self.close();
    }

    fn close(&mut self) {
        self.window = Duration::ZERO;
        self.cooldown = self.penalty;
        self.penalty = (self.penalty * 2).min(COOLDOWN_MAX);
    }

    /// Whether this round signals each completion the driver asked for as it is made.
    pub fn early_signals(&self) -> bool {
        self.batch_left == 0
    }

    /// A round ended; `preempted`: the worker's thread was preempted during it.
    pub fn round(&mut self, preempted: bool) {
        if self.batch_left > 0 {
            self.batch_left -= 1;
        } else if preempted {
            self.batch_left = self.batch_period;
            self.batch_period = (self.batch_period * 2).min(BATCH_MAX);
        } else {
            self.batch_period = BATCH_MIN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_micros(50);

    #[test]
    fn early_signals_wait_until_half_the_round_is_served() {
        assert!(!low_water(16, 16));
        assert!(!low_water(16, 9));
        assert!(low_water(16, 8));
        assert!(low_water(16, 0));
        // More came meanwhile: the driver is refilling, it needs no interrupt to.
        assert!(!low_water(16, 40));
        assert!(!low_water(3, 2));
        assert!(low_water(3, 1));
        assert!(low_water(2, 1));
    }

    #[test]
    fn the_window_opens_while_sleeps_are_short_and_closes_when_the_queue_idles() {
        let mut p = Pacing::default();
        assert_eq!(p.window(), Duration::ZERO);
        p.woke(SHORT);
        assert_eq!(p.window(), LOOK_MIN);
        for _ in 0..10 {
            p.woke(SHORT);
        }
        assert_eq!(p.window(), LOOK_MAX);
        p.woke(SHORT_SLEEP);
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn the_window_never_exceeds_the_operators_maximum_and_zero_turns_looking_off() {
        let mut p = Pacing::new(Duration::from_micros(10));
        for _ in 0..10 {
            p.woke(SHORT);
        }
        assert_eq!(p.window(), Duration::from_micros(10));
        let mut off = Pacing::new(Duration::ZERO);
        for _ in 0..10 {
            off.woke(SHORT);
        }
        assert_eq!(off.window(), Duration::ZERO);
    }

    #[test]
    fn a_sleep_inside_the_window_does_not_grow_it() {
        let mut p = Pacing::default();
        p.woke(SHORT);
        p.woke(SHORT);
        let w = p.window();
        p.woke(w / 2);
        assert_eq!(p.window(), w);
    }

    #[test]
    fn fruitless_looks_back_off_longer_each_time_and_a_hit_forgives() {
        let mut p = Pacing::default();
        let mut closed_for = Vec::new();
        let widen = |p: &mut Pacing| {
            while p.window() < LOOK_MAX {
                p.woke(SHORT);
            }
        };
        for _ in 0..4 {
            widen(&mut p);
            for _ in 0..MISSES {
                p.missed();
            }
            assert!(p.window().is_zero());
            let mut n = 0;
            while p.window().is_zero() {
                p.woke(SHORT);
                n += 1;
            }
            closed_for.push(n);
            widen(&mut p);
            for _ in 0..MISSES {
                p.missed();
            }
        }
        assert!(closed_for.windows(2).all(|w| w[1] > w[0]), "{closed_for:?}");
        p.found();
        assert_eq!(p.penalty, 1);
    }

    #[test]
    fn misses_while_the_window_grows_widen_it_instead_of_closing_it() {
        // Requests come 25 µs after the ring empties: the narrow first windows miss, and the
        // window must still reach the width that catches them.
        let mut p = Pacing::default();
        for _ in 0..10 {
            if p.window() >= Duration::from_micros(25) {
                break;
            }
            p.missed();
            p.woke(Duration::from_micros(25));
        }
        assert!(p.window() >= Duration::from_micros(25), "{:?}", p.window());
    }

    #[test]
    fn wasted_looking_is_bounded_when_requests_come_just_too_late() {
        // Requests come 40 µs after the ring empties: every look misses, every sleep is short.
        let mut p = Pacing::default();
        let mut wasted = Duration::ZERO;
        for _ in 0..100_000 {
            wasted += p.window();
            if !p.window().is_zero() {
                p.missed();
            }
            p.woke(Duration::from_micros(40));
        }
        // Under 1 µs per request on average (the worst case without back-off: 32 µs).
        assert!(wasted < Duration::from_millis(100), "{wasted:?}");
    }

    #[test]
    fn a_contended_look_closes_the_window_at_once_and_backs_off() {
        let mut p = Pacing::default();
        p.woke(SHORT);
        assert!(!p.window().is_zero());
        p.contended();
        assert!(p.window().is_zero());
        p.woke(SHORT);
        assert!(p.window().is_zero(), "backing off");
        p.woke(SHORT);
        assert!(!p.window().is_zero());
    }

    #[test]
    fn a_preempted_round_batches_for_longer_each_time_and_a_clean_one_resets() {
        let mut p = Pacing::default();
        assert!(p.early_signals());
        p.round(true);
        assert!(!p.early_signals());
        for _ in 0..BATCH_MIN {
            p.round(true);
        }
        assert!(p.early_signals());
        p.round(true);
        let mut n = 0;
        while !p.early_signals() {
            p.round(false);
            n += 1;
        }
        assert_eq!(n, 2 * BATCH_MIN);
        p.round(false);
        p.round(true);
        let mut n = 0;
        while !p.early_signals() {
            p.round(false);
            n += 1;
        }
        assert_eq!(n, BATCH_MIN);
    }
}
