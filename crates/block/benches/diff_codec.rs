//! Export and apply of a 256 MiB diff, half random and half text-like bytes, raw and with zstd:
//! wall time and CPU time (user + system, all threads), so the per-core throughput holds up on a
//! loaded machine; random reads through a chain diff; and parent dedupe (a generation that copies
//! a quarter of its data from the base): the cost of the base's hash index and of an export
//! with and without it, and what it saves. `cargo bench -p vsnap-block --bench
//! diff_codec [-- ROUNDS]`; figures go to docs/benchmarks.md. Run by `cargo test --all-targets`
//! (no `--bench` argument), it does the same on 4 MiB, once, as a check that it still runs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vsnap_block::diff::{self, Compression, DiffFile, WriteOptions, VERSION_1};
use vsnap_block::{Disk, DiskOptions, Job};

/// Bytes of dirty data: 256 MiB when benchmarking, 4 MiB as a test.
fn dirty() -> u64 {
    static D: OnceLock<u64> = OnceLock::new();
    *D.get_or_init(|| {
        if std::env::args().any(|a| a == "--bench") {
            256 << 20
        } else {
            4 << 20
        }
    })
}

/// Text-like bytes: words and numbers, as logs and sources are.
fn text_like(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "the", "block", "guest", "kernel", "frame", "diff", "inode", "journal", "commit", "of",
        "write", "snapshot", "error", "info", "zero", "disk",
    ];
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 32);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(WORDS[(x % 16) as usize].as_bytes());
        if x.is_multiple_of(7) {
            v.extend_from_slice(format!(" {}", x % 100_000).as_bytes());
        }
        v.push(if x.is_multiple_of(11) { b'\n' } else { b' ' });
    }
    v.truncate(len);
    v
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// CPU time of the whole process so far (user + system, every thread).
fn cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a live rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The best (wall, CPU) of `rounds` runs of `f`.
fn best(rounds: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    (0..rounds)
        .map(|_| {
            let (w, c) = (Instant::now(), cpu());
            f();
            (w.elapsed(), cpu() - c)
        })
        .fold((Duration::MAX, Duration::MAX), |(w, c), (w2, c2)| {
            (w.min(w2), c.min(c2))
        })
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn tmpfs_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// A disk on `dir` with one frozen generation of `dirty()` bytes: random and text-like pieces
/// of `piece` bytes alternating.
fn disk(dir: &Path, piece: usize) -> (Disk, u64) {
    let mut o = DiskOptions::new(dir.join(format!("state-{piece}")));
    o.size = Some(2 * dirty());
    let d = Disk::open(&o).unwrap();
    for (i, off) in (0..dirty()).step_by(piece).enumerate() {
        let data = if i.is_multiple_of(2) {
            random_bytes(piece, off + 1)
        } else {
            text_like(piece, off + 1)
        };
        d.write(off, &data).unwrap();
    }
    let g = d.cut(false).unwrap().generation;
    (d, g)
}

fn main() {
    let rounds = match std::env::args().skip(1).find_map(|a| a.parse().ok()) {
        Some(n) => n,
        None if dirty() > 4 << 20 => 3usize,
        None => 1,
    };
    let dir = tmpfs_dir();
    println!(
        "{} MiB of dirty data on tmpfs, best of {rounds}; GB/s of raw data, wall and per CPU-second",
        dirty() >> 20
    );
    println!("| mix | encoding | threads | stored / raw | export wall | export per core | apply wall | apply per core |");
    println!("|---|---|---|---|---|---|---|---|");
    // 256 KiB pieces: every 1 MiB frame holds both kinds; 4 MiB: whole frames of each.
    for piece in [256usize << 10, 4 << 20] {
        let (d, generation) = disk(dir.path(), piece);
        let v1 = WriteOptions {
            version: VERSION_1,
            compression: Compression::None,
            ..WriteOptions::default()
        };
        let v2 = |compression, threads| WriteOptions {
            compression,
            threads,
            ..WriteOptions::default()
        };
        let variants = [
            ("v1", v1),
            ("v2", v2(Compression::None, 1)),
            ("v2", v2(Compression::Zstd(-3), 1)),
            ("v2", v2(Compression::Zstd(1), 1)),
            ("v2", v2(Compression::Zstd(3), 1)),
            ("v2", v2(Compression::Zstd(1), 2)),
            ("v2", v2(Compression::Zstd(3), 2)),
        ];
        for (version, opts) in variants {
            let (compression, threads) = (opts.compression, opts.threads);
            let p = dir.path().join("g.diff");
            let mut n = 0;
            let (ew, ec) = best(rounds, || {
                n += 1;
                let q = dir.path().join(format!("e{n}.diff"));
                d.export_with(generation, &q, None, &opts).unwrap();
                std::fs::rename(&q, &p).unwrap();
            });
            let st = DiffFile::open(&p).unwrap().data_stats();
            let out = dir.path().join("out.img");
            let (aw, ac) = best(rounds, || {
                diff::apply(None, std::slice::from_ref(&p), &out, true, &Job::new()).unwrap();
            });
            std::fs::remove_file(&out).unwrap();
            std::fs::remove_file(&p).unwrap();
            println!(
                "| {} KiB pieces | {version} {compression} | {threads} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} |",
                piece >> 10,
                st.stored_bytes as f64 / st.raw_bytes as f64,
                gbps(dirty(), ew),
                gbps(dirty(), ec),
                gbps(dirty(), aw),
                gbps(dirty(), ac),
            );
        }
        d.close().unwrap();
    }
    chain_reads(dir.path());
    dedupe(dir.path(), rounds);
}

/// Parent dedupe: a base of twice `dirty()` bytes (text and random), a generation of `dirty()`
/// bytes of which 27% are copies of base blocks (the share measured on a real guest) and the
/// rest new text and random data.
fn dedupe(dir: &Path, rounds: usize) {
    let n = dirty();
    let base: Vec<u8> = (0..2 * n)
        .step_by(1 << 20)
        .enumerate()
        .flat_map(|(i, off)| {
            if i.is_multiple_of(2) {
                random_bytes(1 << 20, off + 7)
            } else {
                text_like(1 << 20, off + 7)
            }
        })
        .collect();
    let base_path = dir.join("dedupe-base.img");
    std::fs::write(&base_path, &base).unwrap();
    let mut o = DiskOptions::new(dir.join("dedupe-state"));
    o.base = Some(base_path.clone());
    let d = Disk::open(&o).unwrap();
    let copied = (n * 27 / 100) & !4095;
    d.write(0, &base[n as usize..(n + copied) as usize])
        .unwrap();
    for (i, off) in (copied..n).step_by(256 << 10).enumerate() {
        let len = (256 << 10).min(n - off) as usize;
        let data = if i.is_multiple_of(2) {
            random_bytes(len, off + 3)
        } else {
            text_like(len, off + 3)
        };
        d.write(off, &data).unwrap();
    }
    let g = d.cut(false).unwrap().generation;
    let p = dir.join("dedupe.diff");
    let export = |opts: &WriteOptions| {
        let q = dir.join("dedupe-tmp.diff");
        d.export_with(g, &q, None, opts).unwrap();
        std::fs::rename(&q, &p).unwrap();
    };
    let state = dir.join("dedupe-state");
    println!();
    println!(
        "Parent dedupe: {} MiB dirty, 27% copied from a {} MiB base; zstd:3; best of {rounds}",
        n >> 20,
        (2 * n) >> 20
    );
    println!("| export | stored / raw | referenced | wall | per core |");
    println!("|---|---|---|---|---|");
    let row = |what: &str, (w, c): (Duration, Duration)| {
        let st = DiffFile::open(&p).unwrap().data_stats();
        println!(
            "| {what} | {:.3} | {:.1}% | {:.2} GB/s | {:.2} GB/s |",
            st.stored_bytes as f64 / st.raw_bytes as f64,
            100.0 * st.referenced_blocks as f64 * 4096.0 / st.raw_bytes as f64,
            gbps(n, w),
            gbps(n, c)
        );
    };
    let off = WriteOptions {
        dedupe: false,
        ..WriteOptions::default()
    };
    row("no dedupe", best(rounds, || export(&off)));
    let on = WriteOptions::default();
    // The first export hashes the base (and the generation's own blocks).
    row("dedupe, first (builds the index)", best(1, || export(&on)));
    row("dedupe, index built", best(rounds, || export(&on)));
    let (bw, bc) = best(rounds, || {
        std::fs::remove_file(state.join("base.hashes")).unwrap();
        export(&on);
    });
    let (ew, ec) = best(rounds, || export(&on));
    // Timing noise can exceed a small base's build: then the difference says nothing.
    let (bw, bc) = (bw.saturating_sub(ew), bc.saturating_sub(ec));
    let rate = if bc > Duration::from_millis(1) {
        format!("{:.2} GB/s per core", gbps(2 * n, bc))
    } else {
        "too short to time".into()
    };
    println!(
        "Base index build: {:.3} s wall, {:.3} s CPU for {} MiB ({rate}); {} bytes on disk",
        bw.as_secs_f64(),
        bc.as_secs_f64(),
        (2 * n) >> 20,
        std::fs::metadata(state.join("base.hashes")).unwrap().len()
    );
    // Apply (the base copied, then the diff): with references, and without.
    let out = dir.join("dedupe-out.img");
    let apply = |what: &str| {
        let (w, c) = best(rounds, || {
            diff::apply(
                Some(&base_path),
                std::slice::from_ref(&p),
                &out,
                true,
                &Job::new(),
            )
            .unwrap();
        });
        println!(
            "Apply {what}: {:.2} s wall, {:.2} s CPU",
            w.as_secs_f64(),
            c.as_secs_f64()
        );
    };
    apply("with references");
    export(&off);
    apply("without");
    d.close().unwrap();
}

/// Random 4 KiB reads of a disk whose only data is a chain diff: a read decodes its frame
/// (unless one of the last few decoded holds it), so the frame size sets the cost.
fn chain_reads(dir: &Path) {
    let reads: u64 = if dirty() > 4 << 20 { 4000 } else { 100 };
    let src = dir.join("chain-source");
    std::fs::create_dir(&src).unwrap();
    let (d, generation) = disk(&src, 256 << 10);
    println!();
    println!("Random 4 KiB reads through a disk on a one-diff chain ({reads} reads, best of 3)");
    println!("| encoding | frame size | µs per read, wall | µs per read, CPU |");
    println!("|---|---|---|---|");
    for (compression, frame_size) in [
        (Compression::None, 1u32 << 20),
        (Compression::Zstd(3), 1 << 20),
        (Compression::Zstd(3), 256 << 10),
        (Compression::Zstd(3), 64 << 10),
    ] {
        let p = dir.join(format!("chain-{compression}-{frame_size}.diff"));
        let opts = WriteOptions {
            compression,
            frame_size,
            ..WriteOptions::default()
        };
        d.export_with(generation, &p, None, &opts).unwrap();
        let mut o = DiskOptions::new(dir.join(format!("chain-state-{compression}-{frame_size}")));
        o.size = Some(2 * dirty());
        o.chain = vec![p];
        let c = Disk::open(&o).unwrap();
        let mut buf = vec![0u8; 4096];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let (w, cpu) = best(3, || {
            for _ in 0..reads {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.read((x % (dirty() / 4096)) * 4096, &mut buf).unwrap();
            }
        });
        let per = |t: Duration| t.as_secs_f64() * 1e6 / reads as f64;
        println!(
            "| {compression} | {} KiB | {:.1} | {:.1} |",
            frame_size >> 10,
            per(w),
            per(cpu)
        );
    }
}
