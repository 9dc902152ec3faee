//! The blk daemon's lifecycle under load: stopping finishes what it took before closing the
//! socket, a stopped queue reports a base that covers every chain it took, a live socket is not
//! taken over, the connection state follows the frontend, and what the guest chose that a VMM
//! does not resend survives a reconnect.

mod common;

use std::time::{Duration, Instant};

use common::{place_writes, wait_until, Dev, WAIT};
use vsnap_blk::request::S_OK;
use vsnap_blk::{serve, ServeError, Stopper};
use vsnap_vhost::listen::ListenError;

const QUEUES: u16 = 4;

/// Collects completions on every queue until none arrive for `quiet`.
fn settle(fe: &mut vsnap_frontend::Frontend, quiet: Duration) -> Vec<Vec<(u16, u32)>> {
    let mut all = vec![Vec::new(); fe.queues.len()];
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        for (q, got) in all.iter_mut().enumerate() {
            let new = fe.queues[q].poll_used(&fe.mem);
            if !new.is_empty() {
                last = Instant::now();
            }
            got.extend(new);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    all
}

#[test]
fn a_stop_under_load_finishes_what_it_took_then_closes_within_two_seconds() {
    let mut dev = Dev::start(QUEUES);
    let mut fe = dev.connect_with(usize::from(QUEUES), 96 << 20);
    let mut placed = Vec::new();
    for q in 0..usize::from(QUEUES) {
        placed.push(place_writes(&mut fe, q, 128, 128 << 10, q as u8));
        fe.queues[q].publish(&fe.mem);
    }
    // Stop once the device is busy.
    wait_until("some requests complete", || {
        !fe.queues[0].poll_used(&fe.mem).is_empty()
    });
    let t0 = Instant::now();
    dev.stopper.stop();
    let stopped = t0.elapsed();
    // Stop returns once the socket is closed: from then on the rings must not change.
    let used_at_close: Vec<u16> = (0..usize::from(QUEUES))
        .map(|q| fe.queues[q].poll_used(&fe.mem).len() as u16)
        .collect();
    dev.stop().unwrap();
    let returned = t0.elapsed();
    let late = settle(&mut fe, Duration::from_millis(200));
    eprintln!("stop took {stopped:?}, serve returned after {returned:?}");
    assert!(
        returned < Duration::from_secs(2),
        "serve took {returned:?} to return"
    );
    for (q, l) in late.iter().enumerate() {
        assert!(
            l.is_empty(),
            "queue {q}: {} completions after the socket closed",
            l.len()
        );
    }
    // Every completed write has its status; the load was cut short, not run to its end.
    let completed: usize = used_at_close.iter().map(|&n| usize::from(n)).sum();
    assert!(completed > 0);
    eprintln!(
        "{completed} of {} writes completed before the stop",
        128 * QUEUES
    );
    for q in placed.iter() {
        for p in q {
            let st = p.status(&fe.mem);
            assert!(st == S_OK || st == 0xff, "status {st:#x}");
        }
    }
}

#[test]
fn a_queue_stopped_under_load_reports_a_base_covering_every_chain_it_took() {
    let dev = Dev::start(QUEUES);
    // 200 writes of 256 KiB (50 MiB, within the 64 MiB disk): far more than the device can
    // finish between its first completion and the stop, however fast the machine.
    let mut fe = dev.connect_with(1, 128 << 20);
    place_writes(&mut fe, 0, 200, 256 << 10, 3);
    fe.queues[0].publish(&fe.mem);
    wait_until("some requests complete", || {
        !fe.queues[0].poll_used(&fe.mem).is_empty()
    });
    let base = fe.stop_queue(0).unwrap();
    // Whatever the device took before answering, it completed before answering.
    fe.queues[0].poll_used(&fe.mem);
    let completed = 200 - fe.queues[0].in_flight();
    let late = settle(&mut fe, Duration::from_millis(200));
    assert!(
        late[0].is_empty(),
        "{} completions after GET_VRING_BASE",
        late[0].len()
    );
    assert!(completed < 200, "the load was not cut short");
    assert_eq!(
        base as usize, completed,
        "base {base}, {completed} completed"
    );
}

#[test]
fn a_second_daemon_on_a_live_socket_is_refused_and_the_first_keeps_serving() {
    let dev = Dev::start(1);
    let other = Dev::start(1);
    let r = serve(other.backend.clone(), &dev.sock, &Stopper::new());
    assert!(
        matches!(r, Err(ServeError::Listen(ListenError::InUse(_)))),
        "{r:?}"
    );
    assert!(dev.sock.exists());
    wait_until("the probe connection is gone", || !dev.connected());
    let mut fe = dev.connect(1);
    let p = place_writes(&mut fe, 0, 1, 4096, 9);
    fe.queues[0].publish(&fe.mem);
    assert_eq!(fe.queues[0].wait_used(&fe.mem, 1, WAIT).len(), 1);
    assert_eq!(p[0].status(&fe.mem), S_OK);
}

#[test]
fn a_stale_socket_is_replaced() {
    let mut dev = Dev::start(1);
    dev.stop().unwrap();
    // A daemon killed with -9 leaves its socket file behind.
    let stale = std::os::unix::net::UnixListener::bind(&dev.sock).unwrap();
    drop(stale);
    assert!(dev.sock.exists());
    let again = Stopper::new();
    let t = {
        let (b, s, st) = (dev.backend.clone(), dev.sock.clone(), again.clone());
        std::thread::spawn(move || serve(b, &s, &st))
    };
    wait_until("the new daemon listens", || {
        std::os::unix::net::UnixStream::connect(&dev.sock).is_ok()
    });
    again.stop();
    t.join().unwrap().unwrap();
    assert!(!dev.sock.exists(), "the socket file is removed on exit");
}

#[test]
fn connected_follows_the_frontend() {
    let dev = Dev::start(1);
    assert!(!dev.connected());
    for _ in 0..3 {
        let fe = dev.connect(1);
        assert!(dev.connected());
        drop(fe);
        wait_until("the device sees the frontend gone", || !dev.connected());
    }
}

#[test]
fn write_through_survives_a_reconnect() {
    let dev = Dev::start(1);
    let mut fe = dev.connect(1);
    assert_eq!(
        fe.get_config(32, 1).unwrap(),
        vec![1],
        "write-back by default"
    );
    fe.set_config(32, &[0]).unwrap();
    drop(fe);
    wait_until("the device sees the frontend gone", || !dev.connected());
    // A reconnecting VMM does not send the cache mode again.
    let mut fe = dev.connect(1);
    assert_eq!(fe.get_config(32, 1).unwrap(), vec![0]);
    assert!(!dev.backend.writeback());
}

/// A restarted daemon serves the guest in the cache mode it set: the VMM will not set it again.
#[test]
fn write_through_survives_a_daemon_restart() {
    use std::sync::Arc;
    use vsnap_blk::{BlkBackend, BlkOptions, CacheModeFile};
    use vsnap_block::{Disk, DiskOptions};

    let dir = tempfile::tempdir().unwrap();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.size = Some(1 << 20);
    let mode = CacheModeFile::new(dir.path().join("cache-mode"));
    let start = || {
        let disk = Arc::new(Disk::open(&o).unwrap());
        let opts = BlkOptions {
            num_queues: 1,
            queue_size: 64,
            serial: "s".into(),
            logical_block_size: 512,
            ..BlkOptions::default()
        };
        let b = BlkBackend::new(disk.clone(), opts)
            .with_cache_mode_file(mode.clone())
            .unwrap();
        (disk, b)
    };
    let (disk, b) = start();
    assert!(b.writeback());
    vsnap_vhost::Device::set_config(&b, 32, &[0]).unwrap();
    drop(b);
    Arc::try_unwrap(disk).ok().unwrap().close().unwrap();
    let (_disk, b) = start();
    assert!(
        !b.writeback(),
        "the restarted daemon went back to write-back"
    );
    assert_eq!(vsnap_vhost::Device::get_config(&b, 32, 1), vec![0]);
}

/// A queue that starts interrupts the guest once, EVENT_IDX or not: a daemon killed after
/// publishing completions but before signalling them left the guest waiting for an interrupt,
/// and the next daemon (resuming from the used index) has nothing to complete that would send
/// one.
#[test]
fn a_started_queue_interrupts_the_guest_once() {
    let dev = Dev::start(2);
    let fe = dev.connect(2);
    for q in &fe.queues {
        wait_until("the queue interrupts the guest", || q.call.read().is_ok());
    }
}

/// SeaBIOS negotiates first, without FLUSH or CONFIG_WCE; Linux then acks both. The guest
/// must end up write-back until it chooses otherwise, and what it chooses must survive a VMM
/// that re-acks the same features (a reconnect) and firmware negotiating in between (a reboot).
#[test]
fn the_cache_mode_follows_the_driver_that_can_choose_it() {
    use vsnap_vhost::Device;
    const FLUSH: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;
    const WCE: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
    const VERSION_1: u64 = 1 << 32;
    let dev = Dev::start(1);
    let b = &dev.backend;
    let (firmware, linux) = (VERSION_1, VERSION_1 | FLUSH | WCE);
    b.acked_features(firmware);
    assert!(
        !b.writeback(),
        "a driver that cannot flush is served write-through"
    );
    b.acked_features(linux);
    assert!(b.writeback(), "firmware's negotiation must not stick");
    b.set_config(32, &[0]).unwrap();
    for features in [linux, firmware, linux] {
        b.acked_features(features);
    }
    assert!(!b.writeback(), "the guest chose write-through");
    b.set_config(32, &[1]).unwrap();
    b.acked_features(firmware);
    assert!(
        !b.writeback(),
        "without FLUSH, write-through whatever was chosen"
    );
    b.acked_features(linux);
    assert!(b.writeback());
}
