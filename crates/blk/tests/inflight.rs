//! Inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) through the project's frontend,
//! reconnecting as QEMU and cloud-hypervisor do: requests the guest queued while no daemon ran,
//! and requests a dead daemon took and never completed, all complete exactly once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{place_writes, wait_until, Dev, WAIT};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vsnap_frontend::blk::Placed;
use vsnap_frontend::{Frontend, Resume, Setup};
use vsnap_vhost::inflight::{Info, Region};

const LEN: u32 = 4096;

fn tracked(dev: &Dev) -> Frontend {
    let fe = dev.frontend(&Setup {
        inflight: true,
        mem_size: 16 << 20,
        ..Setup::default()
    });
    assert!(fe
        .protocol_features
        .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    assert!(fe.inflight.is_some(), "GET_INFLIGHT_FD gave a region");
    // The queue's first drain (after the recovery that initialises the region) interrupts.
    wait_until("the queue started", || fe.queues[0].call.read().is_ok());
    fe
}

/// The region as a process other than the daemon sees it (the VMM keeps the fd).
fn region(fe: &Frontend) -> Region {
    let (info, file) = fe.inflight.as_ref().unwrap();
    Region::open(
        file.try_clone().unwrap(),
        Info {
            mmap_size: info.mmap_size,
            mmap_offset: info.mmap_offset,
            num_queues: info.num_queues,
            queue_size: info.queue_size,
        },
    )
    .unwrap()
}

/// Waits for `placed` to complete, each exactly once, with status OK, and nothing else after.
fn all_complete_once(fe: &mut Frontend, placed: &[Placed]) {
    let got = fe.queues[0].wait_used(&fe.mem, placed.len(), WAIT);
    let heads: HashSet<u16> = got.iter().map(|&(h, _)| h).collect();
    assert_eq!(got.len(), placed.len(), "completions: {got:?}");
    assert_eq!(heads, placed.iter().map(|p| p.head).collect());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        fe.queues[0].poll_used(&fe.mem).is_empty(),
        "completed twice"
    );
    for p in placed {
        assert_eq!(p.status(&fe.mem), 0, "status of head {}", p.head);
    }
}

fn disk_holds(dev: &Dev, n: usize, seed: u8) {
    let want: Vec<u8> = (0..LEN).map(|i| (i as u8).wrapping_add(seed) | 1).collect();
    for i in 0..n {
        let mut buf = vec![0u8; LEN as usize];
        dev.disk.read(i as u64 * u64::from(LEN), &mut buf).unwrap();
        assert!(buf == want, "block {i} does not hold its write");
    }
}

/// The guest queues requests while its daemon is away (the kick went nowhere). QEMU resumes
/// the queue from the used index; cloud-hypervisor from the available index, which without
/// the region would skip every one of them and hang the guest.
#[test]
fn what_the_guest_queued_while_no_daemon_ran_completes_after_either_vmm_reconnects() {
    for resume in [Resume::UsedIndex, Resume::AvailIndex] {
        let dev = Dev::start(1);
        let mut fe = tracked(&dev);
        let warm = place_writes(&mut fe, 0, 4, LEN, 9);
        fe.queues[0].publish(&fe.mem);
        all_complete_once(&mut fe, &warm);

        fe.disconnect();
        wait_until("the daemon saw the frontend go", || !dev.connected());
        let placed = place_writes(&mut fe, 0, 8, LEN, 3);
        fe.queues[0].publish_silently(&fe.mem);
        fe.reconnect(&dev.sock, resume).unwrap();
        all_complete_once(&mut fe, &placed);
        disk_holds(&dev, 8, 3);
    }
}

/// A daemon took three requests and died before completing them: the region says so. The
/// next daemon runs them again, then the rest, each once, whatever base the VMM sends.
#[test]
fn requests_a_dead_daemon_took_are_resubmitted_oldest_first() {
    for resume in [Resume::UsedIndex, Resume::AvailIndex] {
        let dev = Dev::start(1);
        let mut fe = tracked(&dev);
        fe.disconnect();
        wait_until("the daemon saw the frontend go", || !dev.connected());
        let placed = place_writes(&mut fe, 0, 6, LEN, 5);
        fe.queues[0].publish_silently(&fe.mem);
        {
            let r = region(&fe);
            let q = r.queue(0).unwrap();
            for (k, p) in placed.iter().take(3).enumerate() {
                q.mark(p.head, 100 + k as u64).unwrap();
            }
        }
        fe.reconnect(&dev.sock, resume).unwrap();
        all_complete_once(&mut fe, &placed);
        disk_holds(&dev, 6, 5);
    }
}

/// A region another backend wrote out of ring order cannot be replayed from the ring: the
/// daemon says so (a counted fault), resumes after those requests, and serves on.
#[test]
fn a_region_written_out_of_order_is_reported_and_the_daemon_serves_on() {
    let dev = Dev::start(1);
    let mut fe = tracked(&dev);
    fe.disconnect();
    wait_until("the daemon saw the frontend go", || !dev.connected());
    let placed = place_writes(&mut fe, 0, 4, LEN, 7);
    fe.queues[0].publish_silently(&fe.mem);
    region(&fe)
        .queue(0)
        .unwrap()
        .mark(placed[2].head, 1)
        .unwrap();
    fe.reconnect(&dev.sock, Resume::AvailIndex).unwrap();
    // Resumed after the one request in flight: positions 1..4 run, position 0 is lost.
    let got = fe.queues[0].wait_used(&fe.mem, 3, WAIT);
    assert_eq!(got.len(), 3, "{got:?}");
    let faults = dev.backend.faults.snapshot();
    assert!(
        faults.iter().any(|(what, _)| what.contains("out of order")),
        "{faults:?}"
    );
    let more = place_writes(&mut fe, 0, 2, LEN, 8);
    fe.queues[0].publish(&fe.mem);
    let got = fe.queues[0].wait_used(&fe.mem, 2, WAIT);
    assert_eq!(
        got.iter().map(|&(h, _)| h).collect::<HashSet<_>>(),
        more.iter().map(|p| p.head).collect()
    );
}

/// A frontend that does not negotiate the feature gets no region and loses nothing.
#[test]
fn without_the_feature_nothing_changes() {
    let dev = Dev::start(1);
    let mut fe = dev.frontend(&Setup::default());
    assert!(fe.inflight.is_none());
    let placed = place_writes(&mut fe, 0, 4, LEN, 2);
    fe.queues[0].publish(&fe.mem);
    all_complete_once(&mut fe, &placed);
}
