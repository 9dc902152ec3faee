//! The blk device driven over its vhost-user socket by a frontend, as a VMM would: every request
//! type, odd descriptor layouts, indirect tables, EVENT_IDX on and off, several queues, bad input,
//! config space, reconnects.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Dev, WAIT};
use vsnap_blk::request::{S_IOERR, S_OK, S_UNSUPP};
use vsnap_blk::BlkOptions;
use vsnap_block::{Disk, DiskOptions};
use vsnap_frontend::blk::{self, place, segments, Bufs, Layout, Placed};
use vsnap_frontend::{Frontend, Setup, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

const SIZE: u64 = 8 << 20;

/// A blank 8 MiB disk (made read-only after creation with `readonly`) on `queues` queues.
fn start(readonly: bool, queues: u16) -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.size = Some(SIZE);
    if readonly {
        Disk::open(&o).unwrap().close().unwrap();
        o.readonly = true;
    }
    let disk = Arc::new(Disk::open(&o).unwrap());
    Dev::serve_disk(
        dir,
        disk,
        BlkOptions {
            num_queues: queues,
            queue_size: 256,
            serial: "vsnap-test-serial-0123456789".into(),
            logical_block_size: 512,
            ..BlkOptions::default()
        },
    )
}

/// Submits one request on queue `q` and waits for it: (status, used length, device-written data).
#[allow(clippy::too_many_arguments)]
fn run(
    fe: &mut Frontend,
    q: usize,
    typ: u32,
    sector: u64,
    out: &[u8],
    in_len: u32,
    layout: Layout,
    indirect: bool,
) -> (u8, u32, Vec<u8>) {
    let bufs = Bufs::new(&fe.mem, out.len().max(in_len as usize).max(1) as u32);
    let p = place(
        &mut fe.queues[q],
        &fe.mem,
        bufs,
        typ,
        sector,
        out,
        in_len,
        layout,
        indirect,
    )
    .unwrap();
    fe.queues[q].publish(&fe.mem);
    let done = fe.queues[q].wait_used(&fe.mem, 1, WAIT);
    assert_eq!(done.len(), 1, "request not completed");
    assert_eq!(done[0].0, p.head);
    (p.status(&fe.mem), done[0].1, p.data(&fe.mem))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn every_request_type_in_every_layout() {
    let dev = start(false, 1);
    for event_idx in [true, false] {
        let mut fe = dev.frontend(&Setup {
            event_idx,
            ..Setup::default()
        });
        for layout in [Layout::Simple, Layout::Split, Layout::Merged] {
            for indirect in [false, true] {
                let data = pattern(8192 + 512, layout as u8 + indirect as u8 * 3);
                let (st, len, _) = run(&mut fe, 0, blk::T_OUT, 8, &data, 0, layout, indirect);
                assert_eq!((st, len), (S_OK, 1), "{layout:?} indirect={indirect}");
                let (st, len, got) = run(
                    &mut fe,
                    0,
                    blk::T_IN,
                    8,
                    &[],
                    data.len() as u32,
                    layout,
                    indirect,
                );
                assert_eq!((st, len), (S_OK, data.len() as u32 + 1));
                assert!(
                    got == data,
                    "read back differs: {layout:?} indirect={indirect}"
                );
                let (st, len, id) = run(&mut fe, 0, blk::T_GET_ID, 0, &[], 20, layout, indirect);
                assert_eq!((st, len), (S_OK, 21));
                assert_eq!(&id, b"vsnap-test-serial-01");
                let (st, _, _) = run(&mut fe, 0, blk::T_FLUSH, 0, &[], 0, layout, indirect);
                assert_eq!(st, S_OK);
                // Two write-zeroes segments (one unaligned) and a discard.
                let wz = segments(&[(9, 2, 0), (16, 1, 1)]);
                assert_eq!(
                    run(&mut fe, 0, blk::T_WRITE_ZEROES, 0, &wz, 0, layout, indirect).0,
                    S_OK
                );
                let (_, _, got) = run(
                    &mut fe,
                    0,
                    blk::T_IN,
                    8,
                    &[],
                    data.len() as u32,
                    layout,
                    indirect,
                );
                let mut want = data.clone();
                want[512..1536].fill(0);
                want[4096..4608].fill(0);
                assert!(got == want, "write-zeroes result differs");
                let dis = segments(&[(8, 16, 0)]);
                assert_eq!(
                    run(&mut fe, 0, blk::T_DISCARD, 0, &dis, 0, layout, indirect).0,
                    S_OK
                );
                let (_, _, got) = run(&mut fe, 0, blk::T_IN, 8, &[], 8192, layout, indirect);
                assert!(got.iter().all(|&b| b == 0), "discarded blocks read zero");
            }
        }
        drop(fe);
    }
    let info = dev.disk.info();
    assert!(info.stats.discards > 0 && info.stats.write_zeroes > 0 && info.stats.flushes > 0);
}

#[test]
fn config_space_and_features() {
    let dev = start(false, 4);
    let mut fe = dev.frontend(&Setup {
        num_queues: 4,
        ..Setup::default()
    });
    assert_eq!(fe.queue_num, 4);
    let c = fe.get_config(0, 96).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), SIZE / 512);
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
    for o in [8usize, 12, 36, 40, 44, 48, 52] {
        assert!(u32_at(o) > 0, "zero limit at {o}");
    }
    assert!(
        u32_at(40) > 1 && u32_at(52) > 1,
        "multi-segment discard and write-zeroes"
    );
    // Frontends ask for their own struct's size, which may exceed ours.
    assert_eq!(fe.get_config(0, 256).unwrap().len(), 256);
    assert_eq!(
        fe.get_config(32, 1).unwrap(),
        vec![1],
        "writeback on by default"
    );
    fe.set_config(32, &[0]).unwrap();
    assert_eq!(fe.get_config(32, 1).unwrap(), vec![0]);
    let f = fe.offered_features;
    for bit in [1u32, 2, 6, 9, 10, 11, 12, 13, 14, 28, 29, 30, 32] {
        assert!(f & (1 << bit) != 0, "feature bit {bit} not offered");
    }
    assert_eq!(f & (1 << 5), 0, "RO not offered on a writable disk");
}

/// cloud-hypervisor reads `size_of::<VirtioBlockConfig>()` = 60 bytes at offset 0 once, when
/// the device is created and before any ring is sized, keeps it, overrides `num_queues`, and
/// writes only the writeback byte. `seg_max` must fit the ring the VMM will set (the daemon's
/// queue size, 256 here), and a VMM may still set a larger ring.
#[test]
fn the_config_space_as_cloud_hypervisor_reads_it() {
    let dev = start(false, 2);
    let mut fe = dev.frontend(&Setup {
        num_queues: 2,
        queue_size: 1024,
        ..Setup::default()
    });
    let c = fe.get_config(0, 60).unwrap();
    assert_eq!(c.len(), 60);
    assert_eq!(c, fe.get_config(0, 96).unwrap()[..60]);
    let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), SIZE / 512);
    assert_eq!(u32_at(12), 256 - 2, "seg_max from the ring the VMM sets");
    assert_eq!(u32_at(20), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    assert_eq!(c[32], 1, "writeback");
    // CH's write_config: one byte at the writeback offset.
    fe.set_config(32, &[0]).unwrap();
    assert_eq!(fe.get_config(0, 60).unwrap()[32], 0);
    // The larger ring works.
    let (st, _, _) = run(
        &mut fe,
        1,
        blk::T_OUT,
        0,
        &[7u8; 4096],
        0,
        Layout::Simple,
        false,
    );
    assert_eq!(st, 0);
}

#[test]
fn multiqueue_requests_run_on_all_queues() {
    let dev = start(false, 4);
    let mut fe = dev.frontend(&Setup {
        num_queues: 4,
        ..Setup::default()
    });
    // 32 writes per queue, all published before any is awaited.
    let mut placed: Vec<Vec<(Placed, u64)>> = vec![Vec::new(); 4];
    for (q, list) in placed.iter_mut().enumerate() {
        for k in 0..32u64 {
            let sector = (q as u64 * 32 + k) * 8;
            let bufs = Bufs::new(&fe.mem, 4096);
            let p = place(
                &mut fe.queues[q],
                &fe.mem,
                bufs,
                blk::T_OUT,
                sector,
                &pattern(4096, (q * 32 + k as usize) as u8),
                0,
                Layout::Simple,
                false,
            )
            .unwrap();
            list.push((p, sector));
        }
    }
    for q in 0..4 {
        fe.queues[q].publish(&fe.mem);
    }
    for (q, list) in placed.iter().enumerate() {
        let done = fe.queues[q].wait_used(&fe.mem, 32, WAIT);
        assert_eq!(done.len(), 32, "queue {q}");
        for (p, _) in list {
            assert_eq!(p.status(&fe.mem), S_OK);
        }
    }
    for q in 0..4usize {
        for k in 0..32usize {
            let mut buf = vec![0u8; 4096];
            dev.disk
                .read(((q * 32 + k) * 4096) as u64, &mut buf)
                .unwrap();
            assert!(buf == pattern(4096, (q * 32 + k) as u8));
        }
    }
}

#[test]
fn bad_requests_get_the_right_status_and_the_device_keeps_serving() {
    let dev = start(false, 1);
    let mut fe = dev.frontend(&Setup::default());
    let ok = |fe: &mut Frontend| {
        let (st, _, _) = run(fe, 0, blk::T_IN, 0, &[], 512, Layout::Simple, false);
        assert_eq!(st, S_OK, "device stopped serving");
    };
    let cap = SIZE / 512;
    // (what, type, sector, device-readable payload, device-writable length, expected status)
    type Case = (&'static str, u32, u64, Vec<u8>, u32, u8);
    let cases: Vec<Case> = vec![
        (
            "IN not a multiple of 512",
            blk::T_IN,
            0,
            vec![],
            100,
            S_IOERR,
        ),
        (
            "OUT not a multiple of 512",
            blk::T_OUT,
            0,
            vec![1; 700],
            0,
            S_IOERR,
        ),
        (
            "IN past capacity",
            blk::T_IN,
            cap - 1,
            vec![],
            1024,
            S_IOERR,
        ),
        (
            "OUT past capacity",
            blk::T_OUT,
            cap,
            vec![1; 512],
            0,
            S_IOERR,
        ),
        (
            "sector overflow",
            blk::T_IN,
            u64::MAX / 256,
            vec![],
            512,
            S_IOERR,
        ),
        ("unknown type", 99, 0, vec![], 512, S_UNSUPP),
        ("SECURE_ERASE", 14, 0, segments(&[(0, 8, 0)]), 0, S_UNSUPP),
        (
            "unknown segment flags",
            blk::T_WRITE_ZEROES,
            0,
            segments(&[(0, 8, 4)]),
            0,
            S_UNSUPP,
        ),
        (
            "unmap on discard",
            blk::T_DISCARD,
            0,
            segments(&[(0, 8, 1)]),
            0,
            S_UNSUPP,
        ),
        (
            "discard past capacity",
            blk::T_DISCARD,
            0,
            segments(&[(cap - 4, 8, 0)]),
            0,
            S_IOERR,
        ),
        (
            "discard payload not 16-byte segments",
            blk::T_DISCARD,
            0,
            vec![0; 20],
            0,
            S_IOERR,
        ),
        (
            "too many segments",
            blk::T_DISCARD,
            0,
            segments(&vec![(0, 1, 0); 300]),
            0,
            S_IOERR,
        ),
        (
            "segment above max sectors",
            blk::T_WRITE_ZEROES,
            0,
            segments(&[(0, u32::MAX, 0)]),
            0,
            S_IOERR,
        ),
        (
            "GET_ID buffer too short",
            blk::T_GET_ID,
            0,
            vec![],
            8,
            S_IOERR,
        ),
    ];
    for (what, typ, sector, out, in_len, want) in cases {
        let (st, len, _) = run(&mut fe, 0, typ, sector, &out, in_len, Layout::Simple, false);
        assert_eq!((st, len), (want, 1), "{what}");
        ok(&mut fe);
    }
    let mem_end = fe.mem.size();
    let q = &mut fe.queues[0];
    let hdr = fe.mem.alloc(16, 16);
    let status = fe.mem.alloc(1, 1);
    let mut h = [0u8; 16];
    h[0] = blk::T_IN as u8;
    fe.mem.write(hdr, &h);
    // Data descriptor outside guest memory: IOERR, status still written.
    let head = q
        .add_raw(
            &fe.mem,
            &[
                (hdr, 16, VIRTQ_DESC_F_NEXT, 1),
                (
                    mem_end + 4096,
                    512,
                    VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                    2,
                ),
                (status, 1, VIRTQ_DESC_F_WRITE, 0),
            ],
        )
        .unwrap();
    q.publish(&fe.mem);
    let done = q.wait_used(&fe.mem, 1, WAIT);
    assert_eq!(done, vec![(head, 1)]);
    assert_eq!(fe.mem.read_vec(status, 1)[0], S_IOERR);
    // No device-writable descriptor: nowhere to put a status, completed with length 0.
    let head = q.add_raw(&fe.mem, &[(hdr, 16, 0, 0)]).unwrap();
    q.publish(&fe.mem);
    assert_eq!(q.wait_used(&fe.mem, 1, WAIT), vec![(head, 0)]);
    // Status byte outside guest memory: length 0.
    let head = q
        .add_raw(
            &fe.mem,
            &[
                (hdr, 16, VIRTQ_DESC_F_NEXT, 1),
                (mem_end - 1 + 8192, 1, VIRTQ_DESC_F_WRITE, 0),
            ],
        )
        .unwrap();
    q.publish(&fe.mem);
    assert_eq!(q.wait_used(&fe.mem, 1, WAIT), vec![(head, 0)]);
    // Header shorter than 16 bytes.
    let head = q
        .add_raw(
            &fe.mem,
            &[
                (hdr, 8, VIRTQ_DESC_F_NEXT, 1),
                (status, 1, VIRTQ_DESC_F_WRITE, 0),
            ],
        )
        .unwrap();
    q.publish(&fe.mem);
    assert_eq!(q.wait_used(&fe.mem, 1, WAIT), vec![(head, 1)]);
    assert_eq!(fe.mem.read_vec(status, 1)[0], S_IOERR);
    // Readable descriptor after a writable one.
    let head = q
        .add_raw(
            &fe.mem,
            &[
                (hdr, 16, VIRTQ_DESC_F_NEXT, 1),
                (status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2),
                (hdr, 16, 0, 0),
            ],
        )
        .unwrap();
    q.publish(&fe.mem);
    let done = q.wait_used(&fe.mem, 1, WAIT);
    assert_eq!(done.len(), 1, "completed {head}");
    // A descriptor loop: the queue cuts the chain; the device must not hang or crash.
    let head = q
        .add_raw(
            &fe.mem,
            &[
                (hdr, 16, VIRTQ_DESC_F_NEXT, 1),
                (status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0),
            ],
        )
        .unwrap();
    q.publish(&fe.mem);
    assert_eq!(
        q.wait_used(&fe.mem, 1, WAIT).len(),
        1,
        "looping chain {head} completed"
    );
    ok(&mut fe);
    let faults = dev.backend.faults.snapshot();
    assert!(faults.len() >= 10, "faults counted by kind: {faults:?}");
}

#[test]
fn read_only_disk_refuses_writes() {
    let dev = start(true, 1);
    let mut fe = dev.frontend(&Setup::default());
    assert!(fe.offered_features & (1 << 5) != 0, "RO offered");
    assert_eq!(
        run(
            &mut fe,
            0,
            blk::T_OUT,
            0,
            &[1; 512],
            0,
            Layout::Simple,
            false
        )
        .0,
        S_IOERR
    );
    assert_eq!(
        run(
            &mut fe,
            0,
            blk::T_WRITE_ZEROES,
            0,
            &segments(&[(0, 1, 0)]),
            0,
            Layout::Simple,
            false
        )
        .0,
        S_IOERR
    );
    assert_eq!(
        run(
            &mut fe,
            0,
            blk::T_DISCARD,
            0,
            &segments(&[(0, 8, 0)]),
            0,
            Layout::Simple,
            false
        )
        .0,
        S_IOERR
    );
    assert_eq!(
        run(&mut fe, 0, blk::T_IN, 0, &[], 512, Layout::Simple, false).0,
        S_OK
    );
    assert_eq!(
        run(&mut fe, 0, blk::T_FLUSH, 0, &[], 0, Layout::Simple, false).0,
        S_OK
    );
}

#[test]
fn reconnect_keeps_the_disk() {
    let dev = start(false, 2);
    let data = pattern(4096, 77);
    {
        let mut fe = dev.frontend(&Setup {
            num_queues: 2,
            ..Setup::default()
        });
        assert_eq!(
            run(&mut fe, 1, blk::T_OUT, 64, &data, 0, Layout::Simple, false).0,
            S_OK
        );
        fe.stop_queue(1).unwrap();
    }
    for _ in 0..2 {
        let mut fe = dev.frontend(&Setup {
            num_queues: 2,
            ..Setup::default()
        });
        let (st, _, got) = run(&mut fe, 0, blk::T_IN, 64, &[], 4096, Layout::Simple, false);
        assert_eq!(st, S_OK);
        assert!(got == data, "data lost across reconnect");
    }
}

#[test]
fn a_corrupt_avail_index_stops_the_queue_not_the_daemon() {
    let dev = start(false, 2);
    let data = pattern(4096, 5);
    {
        let mut fe = dev.frontend(&Setup {
            num_queues: 2,
            ..Setup::default()
        });
        // More chains announced than the queue holds: no driver could have written this.
        let q = &fe.queues[0];
        q.publish_avail_idx(&fe.mem, q.next_avail().wrapping_add(q.size + 7));
        std::thread::sleep(Duration::from_millis(100));
        // Kicked again, the stopped queue is not looked at: one fault, logged once.
        q.publish_avail_idx(&fe.mem, q.next_avail().wrapping_add(q.size + 9));
        std::thread::sleep(Duration::from_millis(100));
        let corrupt: Vec<_> = dev
            .backend
            .faults
            .snapshot()
            .into_iter()
            .filter(|(k, _)| k.contains("available index"))
            .collect();
        assert_eq!(corrupt.len(), 1, "{corrupt:?}");
        assert_eq!(corrupt[0].1, 1, "{corrupt:?}");
        // The other queue still serves, and so does the next frontend.
        assert_eq!(
            run(&mut fe, 1, blk::T_OUT, 8, &data, 0, Layout::Simple, false).0,
            S_OK
        );
    }
    let mut fe = dev.frontend(&Setup {
        num_queues: 2,
        ..Setup::default()
    });
    let (st, _, got) = run(&mut fe, 0, blk::T_IN, 8, &[], 4096, Layout::Simple, false);
    assert_eq!(st, S_OK);
    assert!(got == data);
}
