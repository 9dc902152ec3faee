//! The block-layer cases of DESIGN §7, against a real state directory on the host's file system.

mod common;

use common::*;
use vsnap_block::diff::{self, DiffFile};
use vsnap_block::{BlockError, Disk, ExportPhase, Job};

const SIZE: usize = 64 * BS as usize;

fn state_of(d: &Disk, gen_layer_active: bool) -> (u64, u64) {
    let i = d.info();
    let l = if gen_layer_active {
        &i.layers[0]
    } else {
        &i.layers[1]
    };
    (l.dirty_blocks, l.zero_blocks)
}

#[test]
fn untouched_reads_fall_through_to_base() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    assert_bytes(&read_all(&d), &f.base_bytes);
    assert_eq!(d.info().untouched_blocks, 64);
}

#[test]
fn all_zero_write_becomes_zero_and_exports_no_data() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &vec![0u8; BS as usize]).unwrap();
    assert_eq!(state_of(&d, true), (0, 1));
    assert!(
        read(&d, 0, BS as usize).iter().all(|&b| b == 0),
        "zero over non-zero base reads zero"
    );
    let c = d.cut(false).unwrap();
    let h = d.export(c.generation, &f.path("g1.diff"), None).unwrap();
    assert_eq!((h.dirty_blocks, h.zero_blocks, h.data_len()), (0, 1, 0));
}

#[test]
fn mixed_write_splits_into_zero_and_dirty() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    let mut data = vec![0u8; 2 * BS as usize];
    data[BS as usize..].fill(0xab);
    d.write(0, &data).unwrap();
    let i = d.info();
    assert_eq!(
        (i.dirty_blocks, i.zero_blocks, i.untouched_blocks),
        (1, 1, 62)
    );
    assert_eq!(read(&d, 0, 2 * BS as usize), data);
    assert_eq!(
        read(&d, 2 * BS as u64, BS as usize),
        f.base_bytes[2 * BS as usize..3 * BS as usize]
    );
}

#[test]
fn write_then_zero_write_then_write() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    let bs = BS as usize;
    d.write(0, &vec![7u8; bs]).unwrap();
    assert_eq!(state_of(&d, true), (1, 0));
    d.write_zeroes(0, BS as u64).unwrap();
    assert_eq!(state_of(&d, true), (0, 1));
    d.write(0, &vec![9u8; bs]).unwrap();
    assert_eq!(state_of(&d, true), (1, 0));
    assert_eq!(read(&d, 0, bs), vec![9u8; bs]);
}

#[test]
fn unaligned_write_zeroes_over_untouched_keeps_base_bytes() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    // 512 bytes into block 1 up to 1536 bytes into block 3.
    let (off, len) = (BS as u64 + 512, 2 * BS as u64 + 1024);
    d.write_zeroes(off, len).unwrap();
    let mut want = f.base_bytes.clone();
    want[off as usize..(off + len) as usize].fill(0);
    assert_bytes(&read_all(&d), &want);
    // Blocks 1 and 3 hold base bytes beside the zeros: dirty; block 2 is zero.
    let i = d.info();
    assert_eq!((i.dirty_blocks, i.zero_blocks), (2, 1));
}

#[test]
fn unaligned_discard_leaves_partial_blocks_and_zeroes_interior() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    let bs = BS as usize;
    d.write(0, &vec![5u8; 4 * bs]).unwrap();
    d.discard(512, 3 * BS as u64).unwrap();
    let got = read(&d, 0, 4 * bs);
    assert_eq!(&got[..bs], &vec![5u8; bs][..], "head block unchanged");
    assert!(got[bs..3 * bs].iter().all(|&b| b == 0), "interior zero");
    assert_eq!(&got[3 * bs..], &vec![5u8; bs][..], "tail block unchanged");
    assert_eq!(state_of(&d, true), (2, 2));
}

#[test]
fn partial_writes_patch_only_their_bytes() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    let mut want = f.base_bytes.clone();
    for (off, len, v) in [
        (512u64, 1024usize, 1u8),
        (3 * 4096 - 512, 1536, 2),
        (10 * 4096 + 1024, 512, 0),
    ] {
        d.write(off, &vec![v; len]).unwrap();
        want[off as usize..off as usize + len].fill(v);
        assert_bytes(&read_all(&d), &want);
    }
    // Partial zero-write into a zero block changes nothing; completing a zero block makes it zero.
    d.write_zeroes(20 * 4096, 4096).unwrap();
    d.write(20 * 4096 + 512, &[0u8; 512]).unwrap();
    assert_eq!(d.info().layers[0].zero_blocks, 1);
    d.write(30 * 4096, &vec![3u8; 4096]).unwrap();
    d.write_zeroes(30 * 4096, 2048).unwrap();
    d.write(30 * 4096 + 2048, &[0u8; 2048]).unwrap();
    assert_eq!(
        d.info().layers[0].zero_blocks,
        2,
        "a dirty block zeroed piecewise becomes zero"
    );
}

#[test]
fn bad_requests_are_refused() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    assert!(matches!(
        d.write(SIZE as u64, &[1u8; 512]),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.discard(SIZE as u64 - 512, 1024),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.read(u64::MAX - 511, &mut [0u8; 512]),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        d.write(100, &[1u8; 512]),
        Err(BlockError::Unaligned { .. })
    ));
    assert!(matches!(
        d.write(0, &[1u8; 100]),
        Err(BlockError::Unaligned { .. })
    ));
    // Zero length is fine and changes nothing.
    d.write(0, &[]).unwrap();
    d.write_zeroes(SIZE as u64, 0).unwrap();
    assert!(d.info().layers[0].dirty_blocks == 0 && d.info().layers[0].zero_blocks == 0);
    drop(d);
    let mut o = f.opts();
    o.readonly = true;
    let ro = Disk::open(&o).unwrap();
    assert!(matches!(
        ro.write(0, &[1u8; 512]),
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(ro.write_zeroes(0, 512), Err(BlockError::ReadOnly)));
    assert!(matches!(ro.discard(0, 4096), Err(BlockError::ReadOnly)));
    assert_bytes(&read_all(&ro), &f.base_bytes);
}

#[test]
fn discard_and_zero_writes_free_layer_space() {
    let f = Fixture::new(1 << 22);
    let d = f.disk();
    d.write(0, &pattern(1 << 22, 9)).unwrap();
    d.flush().unwrap();
    let layer = f.path("state/layer-000001.data");
    let full = allocated(&layer);
    assert!(full >= 1 << 22);
    d.discard(0, 1 << 21).unwrap();
    let after_discard = allocated(&layer);
    assert!(
        after_discard <= full - (1 << 21),
        "{after_discard} vs {full}"
    );
    d.write_zeroes(1 << 21, 1 << 20).unwrap();
    d.write(3 << 20, &vec![0u8; 1 << 20]).unwrap();
    assert!(allocated(&layer) <= after_discard - (2 << 20));
    assert_eq!(d.info().stats.reclaimed_bytes, 4 << 20);
}

#[test]
fn cut_freezes_exactly_the_completed_writes() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &vec![1u8; 4096]).unwrap();
    d.write_zeroes(4096, 4096).unwrap();
    let before = read_all(&d);
    let c = d.cut(true).unwrap();
    assert_eq!((c.generation, c.active_generation, c.drained), (1, 2, 0));
    // A fresh layer: everything untouched in it, reads unchanged.
    assert_eq!(d.info().untouched_blocks, 64);
    assert_bytes(&read_all(&d), &before);
    d.write(0, &vec![2u8; 4096]).unwrap();
    d.write(8192, &vec![3u8; 4096]).unwrap();
    let after = read_all(&d);
    d.export(1, &f.path("g1.diff"), None).unwrap();
    diff::apply(
        Some(&f.base),
        &[f.path("g1.diff")],
        &f.path("g1.img"),
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(f.path("g1.img")).unwrap(), &before);
    d.cut(false).unwrap();
    d.export(2, &f.path("g2.diff"), None).unwrap();
    let chain = [f.path("g1.diff"), f.path("g2.diff")];
    diff::apply(Some(&f.base), &chain, &f.path("g2.img"), false, &Job::new()).unwrap();
    assert_bytes(&std::fs::read(f.path("g2.img")).unwrap(), &after);
    // Squash gives the same disk.
    diff::squash(&chain, &f.path("sq.diff"), false, &Job::new()).unwrap();
    diff::apply(
        Some(&f.base),
        &[f.path("sq.diff")],
        &f.path("sq.img"),
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(f.path("sq.img")).unwrap(), &after);
    let sq = DiffFile::open(&f.path("sq.diff")).unwrap();
    assert_eq!(
        (sq.header.dirty_blocks, sq.header.zero_blocks),
        (2, 1),
        "superseded data dropped"
    );
}

#[test]
fn cut_while_writers_run_splits_on_completion() {
    let f = Fixture::new(SIZE);
    let d = std::sync::Arc::new(f.disk());
    // Each writer owns blocks and writes increasing values into them; after the cut, the frozen
    // generation holds for each block a value at least as new as the last write completed
    // before the cut, and no value written after the cut started.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let completed: Vec<_> = (0..4)
        .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)))
        .collect();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (d, stop, done) = (d.clone(), stop.clone(), completed[t as usize].clone());
            std::thread::spawn(move || {
                let mut v = 1u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut buf = vec![0u8; 4096];
                    buf[..8].copy_from_slice(&v.to_le_bytes());
                    buf[8] = 1;
                    d.write(t * 4096, &buf).unwrap();
                    done.store(v, std::sync::atomic::Ordering::SeqCst);
                    v += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // On a loaded machine a writer may not have run yet: the floor must be a real write.
    while completed
        .iter()
        .any(|c| c.load(std::sync::atomic::Ordering::SeqCst) == 0)
    {
        std::thread::yield_now();
    }
    let floor: Vec<u64> = completed
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    let c = d.cut(false).unwrap();
    let ceil: Vec<u64> = completed
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    threads.into_iter().for_each(|t| t.join().unwrap());
    d.export(c.generation, &f.path("g.diff"), None).unwrap();
    diff::apply(
        Some(&f.base),
        &[f.path("g.diff")],
        &f.path("g.img"),
        false,
        &Job::new(),
    )
    .unwrap();
    let img = std::fs::read(f.path("g.img")).unwrap();
    for t in 0..4usize {
        let v = u64::from_le_bytes(img[t * 4096..t * 4096 + 8].try_into().unwrap());
        assert!(
            v >= floor[t] && v <= ceil[t] + 1,
            "block {t}: {v} not in [{}, {}]",
            floor[t],
            ceil[t] + 1
        );
    }
    // Everything after the cut is in the active generation, nothing of it in the frozen one.
    let now = read_all(&d);
    for t in 0..4usize {
        let v = u64::from_le_bytes(now[t * 4096..t * 4096 + 8].try_into().unwrap());
        assert!(v > ceil[t]);
    }
}

#[test]
fn restart_resumes_the_same_disk() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &vec![4u8; 4096]).unwrap();
    d.write_zeroes(4096, 4096).unwrap();
    d.cut(false).unwrap();
    d.write(8192, &vec![6u8; 1024]).unwrap();
    let want = read_all(&d);
    d.close().unwrap();
    drop(d);
    let d = f.disk();
    assert_bytes(&read_all(&d), &want);
    assert_eq!(d.info().layers.len(), 2);
    // A wrong base is refused.
    let mut o = f.opts();
    o.base = Some(f.path("other.img"));
    assert!(Disk::open(&o).is_err());
}

#[test]
fn a_process_crash_keeps_every_completed_write() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &vec![4u8; 4096]).unwrap();
    d.write_zeroes(4096, 4096).unwrap();
    d.flush().unwrap();
    // Unflushed: a new block, an overwrite of a zero block, a zero write over data; and a cut.
    d.write(8192, &vec![6u8; 4096]).unwrap();
    d.write(4096, &vec![7u8; 4096]).unwrap();
    d.cut(false).unwrap();
    d.write_zeroes(0, 4096).unwrap();
    d.write(12288, &vec![8u8; 1024]).unwrap();
    let want = read_all(&d);
    drop(d); // the process dies: no flush, no close; the page cache stays
    let d = f.disk();
    assert_bytes(&read_all(&d), &want);
    assert_eq!(d.info().layers.len(), 2);
    // And what recovery found is durable now: it survives the next crash too.
    drop(d);
    assert_bytes(&read_all(&f.disk()), &want);
}

/// Makes the live states look written under another boot, as after a power loss.
fn reboot(f: &Fixture) {
    for e in std::fs::read_dir(f.path("state")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "live") {
            write_file_at(&p, &[0xee; 16], 24);
        }
    }
}

#[test]
fn after_a_reboot_the_last_flushed_state_is_served() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &vec![4u8; 4096]).unwrap();
    d.write_zeroes(4096, 4096).unwrap();
    d.flush().unwrap();
    let flushed = read_all(&d);
    // Unflushed: a new block, an overwrite of a zero block. Then "power loss".
    d.write(8192, &vec![6u8; 4096]).unwrap();
    d.write(4096, &vec![7u8; 4096]).unwrap();
    drop(d);
    reboot(&f);
    let d = f.disk();
    assert_bytes(&read_all(&d), &flushed);
    assert_eq!(
        allocated(&f.path("state/layer-000001.data")),
        4096,
        "stale bytes punched"
    );
}

#[test]
fn fold_keeps_reads_identical() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &vec![1u8; 8192]).unwrap();
    d.cut(false).unwrap();
    d.write_zeroes(4096, 8192).unwrap();
    d.write(5 * 4096, &vec![2u8; 4096]).unwrap();
    d.cut(false).unwrap();
    d.write(0, &vec![3u8; 512]).unwrap();
    let want = read_all(&d);
    assert!(d.fold(2, false).is_err(), "not exported yet");
    assert!(d.fold(1, true).is_err(), "generation 1 lies on the base");
    d.export(1, &f.path("1.diff"), None).unwrap();
    d.export(2, &f.path("2.diff"), None).unwrap();
    d.fold(2, false).unwrap();
    assert_bytes(&read_all(&d), &want);
    let gens: Vec<u64> = d.info().layers.iter().map(|l| l.generation).collect();
    assert_eq!(gens, vec![3, 2]);
    d.close().unwrap();
    drop(d);
    assert_bytes(&read_all(&f.disk()), &want);
}

#[test]
fn start_from_a_diff_chain() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(4096, &vec![8u8; 4096]).unwrap();
    d.write_zeroes(0, 4096).unwrap();
    d.cut(false).unwrap();
    d.export(1, &f.path("1.diff"), None).unwrap();
    let want = read_all(&d);
    drop(d);
    let mut o = f.opts();
    o.state_dir = f.path("state2");
    o.chain = vec![f.path("1.diff")];
    let d2 = Disk::open(&o).unwrap();
    assert_bytes(&read_all(&d2), &want);
    d2.write(8192, &vec![9u8; 4096]).unwrap();
    let c = d2.cut(false).unwrap();
    assert_eq!(c.generation, 2);
    d2.export(2, &f.path("2.diff"), None).unwrap();
    let chain = [f.path("1.diff"), f.path("2.diff")];
    diff::apply(
        Some(&f.base),
        &chain,
        &f.path("out.img"),
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(f.path("out.img")).unwrap(), &read_all(&d2));
    assert_eq!(
        d2.info().layers[1].parent,
        DiffFile::open(&f.path("1.diff")).unwrap().header.id
    );
}

#[test]
fn device_size_not_a_multiple_of_the_block_size() {
    let f = Fixture::new(10 * 4096 + 1536);
    let d = f.disk();
    let size = d.geometry().size;
    d.write(size - 1024, &[0xeeu8; 1024]).unwrap();
    d.write_zeroes(size - 1536, 512).unwrap();
    let want = read_all(&d);
    d.cut(false).unwrap();
    d.export(1, &f.path("1.diff"), None).unwrap();
    diff::apply(
        Some(&f.base),
        &[f.path("1.diff")],
        &f.path("o.img"),
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(f.path("o.img")).unwrap(), &want);
}

#[test]
fn cancelled_export_leaves_nothing_and_can_be_retried() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &pattern(32 * 4096, 3)).unwrap();
    let c = d.cut(false).unwrap();
    let p = f.path("g.diff");
    let job = d.start_export(c.generation, &p).unwrap();
    d.cancel_export(c.generation).unwrap();
    assert!(d.run_export(c.generation, &p, None, &job).is_err());
    assert!(!p.exists(), "a cancelled export leaves no file");
    assert_eq!(
        std::fs::read_dir(f.dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".g.diff"))
            .count(),
        0
    );
    let info = d.info();
    assert_eq!(info.layers[1].export, ExportPhase::Failed);
    assert!(info.layers[1]
        .export_error
        .as_deref()
        .unwrap()
        .contains("cancelled"));
    d.export(c.generation, &p, None).unwrap();
    assert_eq!(d.info().layers[1].export, ExportPhase::Done);
}

#[test]
fn zeros_made_by_partial_requests_are_counted_until_a_whole_block_write() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    let bs = BS as u64;
    let sub = |d: &Disk| d.info().layers[0].sub_block_zero_blocks;
    // Block 0 zeroed in two halves: zero, but only because of read-modify-write.
    d.write_zeroes(0, bs / 2).unwrap();
    d.write(bs / 2, &vec![0u8; BS as usize / 2]).unwrap();
    // Block 1 zeroed whole: a whole-block tracker gets that one too.
    d.write_zeroes(bs, bs).unwrap();
    // Block 2: a partial zero write into a block that is already zero.
    d.discard(2 * bs, bs).unwrap();
    d.write_zeroes(2 * bs + 512, 512).unwrap();
    assert_eq!(state_of(&d, true), (0, 3));
    assert_eq!(sub(&d), 2, "blocks 0 and 2");
    // A whole-block write over block 0 ends its sub-block record; a dirty block is not counted.
    d.write(0, &vec![0u8; BS as usize]).unwrap();
    d.write(2 * bs, &vec![7u8; 512]).unwrap();
    assert_eq!(sub(&d), 0);
}
