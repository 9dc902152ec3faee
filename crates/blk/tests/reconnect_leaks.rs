//! 200 frontends connect, start I/O on every queue and vanish without waiting for it: the
//! daemon's fd count and RSS stay flat, it reports the frontend gone each time, and it keeps
//! serving. Alone in its file: fds and RSS are counted for the whole test process.

mod common;

use std::time::Instant;

use common::{place_writes, wait_until, Dev, WAIT};
use vsnap_blk::request::S_OK;
use vsnap_frontend::procstat;

const CYCLES: usize = 200;
const WARMUP: usize = 20;
const QUEUES: u16 = 4;

#[test]
fn two_hundred_reconnects_with_io_in_flight_leak_nothing() {
    let dev = Dev::start(QUEUES);
    let pid = std::process::id();
    let mut base = None;
    let t0 = Instant::now();
    // Counted while a frontend is connected and set up: then the daemon is in a steady state
    // (between connections it is building the next connection's threads and fds).
    let count = || {
        (
            procstat::open_fds(pid).unwrap(),
            procstat::rss_kib(pid).unwrap(),
        )
    };
    for cycle in 0..CYCLES {
        let mut fe = dev.connect(usize::from(QUEUES));
        if cycle == WARMUP {
            base = Some(count());
        }
        for q in 0..usize::from(QUEUES) {
            place_writes(&mut fe, q, 8, 4096, cycle as u8);
            fe.queues[q].publish(&fe.mem);
        }
        if cycle % 50 == 49 {
            // Now and then, wait for the I/O: the device still completes everything.
            for q in 0..usize::from(QUEUES) {
                assert_eq!(fe.queues[q].wait_used(&fe.mem, 8, WAIT).len(), 8);
            }
        }
        drop(fe);
        wait_until("the device sees the frontend gone", || !dev.connected());
    }
    let mut fe = dev.connect(usize::from(QUEUES));
    let (fds0, rss0) = base.unwrap();
    let (fds1, rss1) = count();
    eprintln!(
        "{CYCLES} cycles in {:.1?}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB",
        t0.elapsed()
    );
    assert_eq!(fds1, fds0, "fds leaked over {} cycles", CYCLES - WARMUP);
    assert!(
        rss1 < rss0 + 4096,
        "RSS grew from {rss0} to {rss1} KiB over {} cycles",
        CYCLES - WARMUP
    );
    // And this frontend is served.
    let p = place_writes(&mut fe, 0, 1, 4096, 1);
    fe.queues[0].publish(&fe.mem);
    assert_eq!(fe.queues[0].wait_used(&fe.mem, 1, WAIT).len(), 1);
    assert_eq!(p[0].status(&fe.mem), S_OK);
}
