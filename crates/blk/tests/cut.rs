//! Snapshot cuts through the vhost-user path: I/O of every type on several queues, cut, more I/O
//! (overwriting the same blocks) while the frozen generation is exported; each generation holds
//! exactly the writes completed before its cut.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Dev;
use vsnap_blk::request::S_OK;
use vsnap_blk::BlkOptions;
use vsnap_block::{diff, Disk, DiskOptions, Job};
use vsnap_frontend::blk::{self, place, segments, Bufs, Layout, Placed};
use vsnap_frontend::{Frontend, Setup};

const SIZE: u64 = 8 << 20;
const QUEUES: usize = 4;

fn read_all(d: &Disk) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    d.read(0, &mut v).unwrap();
    v
}

/// One round of I/O on every queue: writes, write-zeroes (one unaligned), a discard and a flush,
/// all published before any is awaited. `round` changes the bytes written.
fn round(fe: &mut Frontend, round: u8) {
    let mut placed: Vec<Vec<Placed>> = vec![Vec::new(); QUEUES];
    for (q, list) in placed.iter_mut().enumerate() {
        let base = q as u64 * 256; // sectors: each queue owns 128 KiB
        let mem = &fe.mem;
        let queue = &mut fe.queues[q];
        let data: Vec<u8> = (0..16384u32)
            .map(|i| (i as u8).wrapping_add(round * 17 + q as u8) | 1)
            .collect();
        let mut put = |typ, sector, out: &[u8], in_len| {
            let p = place(
                queue,
                mem,
                Bufs::new(mem, 16384),
                typ,
                sector,
                out,
                in_len,
                Layout::Simple,
                false,
            )
            .unwrap();
            list.push(p);
        };
        put(blk::T_OUT, base, &data, 0);
        put(blk::T_OUT, base + 40, &data[..4096], 0);
        put(
            blk::T_WRITE_ZEROES,
            0,
            &segments(&[(base + 9 + u64::from(round), 3, 0), (base + 64, 8, 1)]),
            0,
        );
        put(
            blk::T_DISCARD,
            0,
            &segments(&[(base + 80 + 8 * u64::from(round), 16, 0)]),
            0,
        );
        put(blk::T_FLUSH, 0, &[], 0);
        queue.publish(mem);
    }
    for (q, list) in placed.iter().enumerate() {
        let done = fe.queues[q].wait_used(&fe.mem, list.len(), Duration::from_secs(10));
        assert_eq!(done.len(), list.len(), "queue {q}");
        for p in list {
            assert_eq!(p.status(&fe.mem), S_OK);
        }
    }
}

#[test]
fn generations_hold_exactly_the_writes_completed_before_their_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.size = Some(SIZE);
    let disk = Arc::new(Disk::open(&o).unwrap());
    let mut dev = Dev::serve_disk(
        dir,
        disk.clone(),
        BlkOptions {
            num_queues: QUEUES as u16,
            queue_size: 256,
            serial: "s".into(),
            logical_block_size: 512,
            ..BlkOptions::default()
        },
    );
    let mut fe = dev.frontend(&Setup {
        num_queues: QUEUES,
        ..Setup::default()
    });
    let dir = &dev.dir;

    let mut images = Vec::new();
    let mut diffs = Vec::new();
    for r in 0..3u8 {
        round(&mut fe, r);
        images.push(read_all(&disk));
        let c = disk.cut(r % 2 == 0).unwrap();
        // Export while the next round's I/O runs (the frozen layer does not change).
        let path = dir.path().join(format!("g{}.diff", c.generation));
        let job = disk.start_export(c.generation, &path).unwrap();
        let exporter = {
            let (d, p) = (disk.clone(), path.clone());
            std::thread::spawn(move || d.run_export(c.generation, &p, None, &job).unwrap())
        };
        round(&mut fe, r + 10);
        exporter.join().unwrap();
        diffs.push(path);
    }
    for (i, want) in images.iter().enumerate() {
        let out = dir.path().join(format!("apply{i}.img"));
        diff::apply(None, &diffs[..=i], &out, false, &Job::new()).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == *want,
            "generation {} differs from the disk at its cut",
            i + 1
        );
    }
    // The last round is in the active layer only.
    let now = read_all(&disk);
    assert!(now != *images.last().unwrap());
    let info = disk.info();
    assert!(info.stats.discards >= 24 && info.stats.write_zeroes >= 24 && info.stats.flushes >= 24);
    drop(fe);
    dev.stop().unwrap();
}
