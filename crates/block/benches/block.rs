//! Block-layer benchmarks: `make bench`. Figures go to docs/benchmarks.md.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vsnap_block::diff::{self, Compression, WriteOptions};
use vsnap_block::tracker::{BlockState, Tracker};
use vsnap_block::zero::is_zero;
use vsnap_block::{Disk, DiskOptions, Job};

fn zero_check(c: &mut Criterion) {
    let mut g = c.benchmark_group("zero_check");
    for size in [512usize, 4096, 65536, 1 << 20] {
        let buf = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("all_zero", size), &buf, |b, buf| {
            b.iter(|| is_zero(black_box(buf)))
        });
    }
    // Non-zero data is rejected by the sampled bytes at once.
    let data = vec![0x5au8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("data_4096", |b| b.iter(|| is_zero(black_box(&data))));
    g.finish();
}

/// A 1 M-block tracker with fragmented runs: every 3rd block dirty, every 7th zero, plus long runs.
fn fragmented() -> Tracker {
    let mut t = Tracker::new();
    for b in (0..1_000_000u32).step_by(3) {
        t.set_range(b, b + 1, BlockState::Dirty);
    }
    for b in (0..1_000_000u32).step_by(7) {
        t.set_range(b, b + 1, BlockState::Zero);
    }
    t.set_range(200_000, 400_000, BlockState::Dirty);
    t.set_range(600_000, 650_000, BlockState::Zero);
    t
}

fn tracker(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker_1M_blocks");
    let t = fragmented();
    g.bench_function("set_range_32_blocks", |b| {
        let mut t = t.clone();
        let mut i = 0u32;
        b.iter(|| {
            let s = (i * 7919) % 999_000;
            t.set_range(
                s,
                s + 32,
                if i.is_multiple_of(2) {
                    BlockState::Dirty
                } else {
                    BlockState::Zero
                },
            );
            i = i.wrapping_add(1);
        })
    });
    g.bench_function("state_lookup", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(7919);
            black_box(t.state(i % 1_000_000))
        })
    });
    g.bench_function("all_present_256_blocks", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(7919);
            let s = i % 999_000;
            black_box(t.all_present(s, s + 256))
        })
    });
    g.bench_function("export_clone", |b| b.iter(|| black_box(t.export())));
    g.finish();
}

fn tmpfs_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn export_apply(c: &mut Criterion) {
    const SIZE: u64 = 256 << 20;
    let dir = tmpfs_dir();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.size = Some(SIZE);
    let d = Disk::open(&o).unwrap();
    // Half the disk dirty in 64 KiB runs, a quarter zero.
    let data = vec![0xa5u8; 64 << 10];
    for off in (0..SIZE).step_by(128 << 10) {
        d.write(off, &data).unwrap();
    }
    d.write_zeroes(0, SIZE / 4).unwrap();
    let cut = d.cut(false).unwrap();
    let dirty_bytes = d.info().layers[1].dirty_blocks * 4096;
    let mut g = c.benchmark_group("diff_tmpfs");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Bytes(dirty_bytes));
    // Raw frames: the figures stay comparable with version 1 (constant data would compress to
    // nothing); benches/diff_codec.rs measures compression.
    let raw = WriteOptions::new(Compression::None);
    let mut n = 0;
    g.bench_function("export", |b| {
        b.iter(|| {
            n += 1;
            let p = dir.path().join(format!("e{n}.diff"));
            let h = d.export_with(cut.generation, &p, None, &raw).unwrap();
            std::fs::remove_file(&p).unwrap();
            h
        })
    });
    let p = dir.path().join("g.diff");
    d.export_with(cut.generation, &p, None, &raw).unwrap();
    g.bench_function("apply", |b| {
        b.iter(|| {
            let out = dir.path().join("out.img");
            diff::apply(None, std::slice::from_ref(&p), &out, true, &Job::new()).unwrap();
        })
    });
    g.finish();
}

/// The data path's cost per 4 KiB write: strided over 1 GiB (a state change in the tracker and
/// the live mapping while the stride meets untouched blocks), and an overwrite (no change).
fn write_4k(c: &mut Criterion) {
    const SIZE: u64 = 1 << 30;
    let dir = tmpfs_dir();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.size = Some(SIZE);
    let d = Disk::open(&o).unwrap();
    let data = vec![0x5au8; 4096];
    let mut g = c.benchmark_group("write_4k_tmpfs");
    g.throughput(Throughput::Bytes(4096));
    // A stride through the disk: each write meets an untouched block until it wraps.
    let mut off = 0u64;
    g.bench_function("stride", |b| {
        b.iter(|| {
            d.write(off, &data).unwrap();
            off = (off + 4096 * 257) % SIZE;
        })
    });
    g.bench_function("overwrite", |b| b.iter(|| d.write(0, &data).unwrap()));
    g.finish();
}

criterion_group!(benches, zero_check, tracker, export_apply, write_4k);
criterion_main!(benches);
