//! The queue worker's pacing (signalling completions early, looking at the empty ring before
//! it sleeps, backing off from both) must never lose a wake-up in either direction. The driver
//! here trusts EVENT_IDX as Linux does: it kicks only when the device's available event lies in
//! what it added, and after re-arming its used event it sleeps until interrupted, never looking
//! at the used ring on its own. It refills after pauses of every length around the worker's
//! look window, with the machine idle and with a CPU-bound thread competing, so every branch of
//! the pacing is taken: a lost kick leaves it waiting with requests queued, a lost interrupt
//! leaves it waiting with completions in the ring, and either fails the test.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Dev;
use vsnap_frontend::blk::{place, Bufs, Layout, Placed, T_OUT};
use vsnap_frontend::Rng;

const DEPTH: usize = 16;
const LEN: u32 = 4096;
/// Far longer than any pause below: a wait this long is a lost notification.
const HANG: Duration = Duration::from_secs(5);

/// A pause before the driver refills: none, a few µs, around the look window, well past it.
fn pause(rng: &mut Rng) {
    let us = [0, 0, 3, 10, 25, 40, 80, 250, 1500][(rng.next() % 9) as usize];
    let until = Instant::now() + Duration::from_micros(us);
    if us < 100 {
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    } else {
        std::thread::sleep(until - Instant::now());
    }
}

fn run(dev: &Dev, requests: usize, seed: u64) {
    let mut fe = dev.connect(1);
    let mut rng = Rng(seed);
    let mut free: Vec<Bufs> = (0..DEPTH).map(|_| Bufs::new(&fe.mem, LEN)).collect();
    let mut inflight: Vec<Placed> = Vec::new();
    let data: Vec<u8> = (0..LEN).map(|i| i as u8 | 1).collect();
    let (mut sent, mut done) = (0usize, 0usize);
    while done < requests {
        // Refill some or all of the free slots, then publish once.
        let want = 1 + (rng.next() as usize % DEPTH);
        let mut added = 0;
        while added < want && sent < requests {
            let Some(bufs) = free.pop() else { break };
            let sector = (rng.next() % 16_000) * 8;
            let p = place(
                &mut fe.queues[0],
                &fe.mem,
                bufs,
                T_OUT,
                sector,
                &data,
                0,
                Layout::Simple,
                false,
            )
            .expect("a free ring slot per free buffer");
            inflight.push(p);
            added += 1;
            sent += 1;
        }
        if added > 0 {
            fe.queues[0].publish(&fe.mem);
        }
        let got = match fe.queues[0].wait_interrupt(&fe.mem, HANG) {
            Ok(got) => got,
            Err(found) if found.is_empty() => panic!(
                "no completion for {HANG:?} with {} requests queued: a lost kick",
                inflight.len()
            ),
            Err(found) => panic!(
                "{} completions in the used ring and no interrupt for {HANG:?}: a lost signal",
                found.len()
            ),
        };
        for (head, _) in got {
            let i = inflight
                .iter()
                .position(|p| p.head == head)
                .expect("a completion for a request in flight");
            let p = inflight.swap_remove(i);
            assert_eq!(p.status(&fe.mem), 0, "write status");
            free.push(p.bufs);
            done += 1;
        }
        pause(&mut rng);
    }
    assert!(inflight.is_empty());
}

#[test]
fn a_driver_trusting_event_idx_loses_no_kick_and_no_interrupt_idle_or_contended() {
    let dev = Dev::start(1);
    run(&dev, 4000, 0x9e37_79b9_7f4a_7c15);
    // The same with every CPU contended: the worker gets preempted, which turns early signals
    // off for a while, and its looks compete for the CPU.
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    run(&dev, 4000, 0xd1b5_4a32_d192_ed03);
    stop.store(true, Ordering::Relaxed);
    spinners.into_iter().for_each(|t| t.join().unwrap());
}
