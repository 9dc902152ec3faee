//! Property test: random sequences of aligned and unaligned writes, zero writes, write-zeroes,
//! discards and copies (a block read and written elsewhere, so parent dedupe finds it) over a
//! random non-zero base, against a plain in-memory model of the bytes. The diffs are written in
//! a random encoding (version 1, version 2 raw or zstd, frames of a few blocks, parent dedupe
//! on or off) and must come back byte-identical through apply, squash, to-qcow2 and a chain.

mod common;

use proptest::prelude::*;
use vsnap_block::diff::{
    self, ChainRoot, Compression, DiffError, DiffFile, WriteOptions, VERSION_1,
};
use vsnap_block::zero::is_zero;
use vsnap_block::{Disk, DiskOptions, Job};

const SECTORS: u64 = 96;

/// A diff encoding: version 1, or version 2 without or with compression; frames of 1 to 5
/// blocks (so the data spans several) or the default 1 MiB (one frame); one or two threads;
/// parent dedupe on or off (version 1 holds no references either way).
fn encoding(bs: u64) -> impl Strategy<Value = WriteOptions> {
    (
        0..4u8,
        prop_oneof![Just(0u32), 1..=5u32],
        1..=2usize,
        any::<bool>(),
    )
        .prop_map(move |(kind, blocks, threads, dedupe)| {
            let mut o = WriteOptions {
                threads,
                dedupe,
                ..WriteOptions::default()
            };
            if blocks > 0 {
                o.frame_size = blocks * bs as u32;
            }
            match kind {
                0 => {
                    o.version = VERSION_1;
                    o.compression = Compression::None;
                }
                1 => o.compression = Compression::None,
                2 => o.compression = Compression::Zstd(1),
                _ => o.compression = Compression::Zstd(3),
            }
            o
        })
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        fill: u8,
    },
    WriteZeroes {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    /// Reads `sectors` at `from` and writes them at `to`: a file copied (or, with a discard of
    /// the source after, moved).
    Copy {
        from: u64,
        to: u64,
        sectors: u64,
    },
    Cut,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 0..=(SECTORS - s).min(24)));
    prop_oneof![
        4 => (range.clone(), prop_oneof![Just(0u8), 1..=255u8])
            .prop_map(|((sector, sectors), fill)| Op::Write { sector, sectors, fill }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::WriteZeroes { sector, sectors }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        // Copies aligned to 4 KiB (whole blocks for every block size) or to any sector.
        2 => (range, 0..SECTORS, any::<bool>()).prop_map(|((from, sectors), to, aligned)| {
            let align = |s: u64| if aligned { s / 8 * 8 } else { s };
            let (from, to) = (align(from), align(to));
            let sectors = sectors.min(SECTORS - from).min(SECTORS - to);
            Op::Copy { from, to, sectors }
        }),
        1 => Just(Op::Cut),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn disk_matches_model(
        (bs, encodings) in (9u32..=12).prop_flat_map(|shift| {
            let bs = 1u64 << shift;
            (Just(bs), proptest::collection::vec(encoding(bs), 42))
        }),
        base in proptest::collection::vec(any::<u8>(), (SECTORS * 512) as usize),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        // One encoding per export, and the last for the squash.
        let mut encodings = encodings.into_iter();
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.img");
        std::fs::write(&base_path, &base).unwrap();
        let mut o = DiskOptions::new(dir.path().join("state"));
        o.base = Some(base_path.clone());
        o.block_size = bs as u32;
        let d = Disk::open(&o).unwrap();
        let mut model = base.clone();
        let mut diffs = Vec::new();
        let mut images = Vec::new();
        for op in &ops {
            match *op {
                Op::Write { sector, sectors, fill } => {
                    // Vary the bytes within the write so misplaced data is caught.
                    let data: Vec<u8> = (0..sectors * 512)
                        .map(|i| if fill == 0 { 0 } else { fill.wrapping_add((i / 512) as u8) | 1 })
                        .collect();
                    d.write(sector * 512, &data).unwrap();
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].copy_from_slice(&data);
                }
                Op::WriteZeroes { sector, sectors } => {
                    d.write_zeroes(sector * 512, sectors * 512).unwrap();
                    model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
                }
                Op::Discard { sector, sectors } => {
                    d.discard(sector * 512, sectors * 512).unwrap();
                    // Only blocks the discard covers whole become zero.
                    let (s, e) = (sector * 512, (sector + sectors) * 512);
                    let first = s.div_ceil(bs);
                    let last = e / bs;
                    for b in first..last {
                        model[(b * bs) as usize..((b + 1) * bs) as usize].fill(0);
                    }
                }
                Op::Copy { from, to, sectors } => {
                    let (f, t, n) = ((from * 512) as usize, (to * 512) as usize, (sectors * 512) as usize);
                    let mut buf = vec![0u8; n];
                    d.read(f as u64, &mut buf).unwrap();
                    d.write(t as u64, &buf).unwrap();
                    model.copy_within(f..f + n, t);
                }
                Op::Cut => {
                    let c = d.cut(false).unwrap();
                    let p = dir.path().join(format!("{}.diff", c.generation));
                    let enc = encodings.next().unwrap();
                    let h = d.export_with(c.generation, &p, None, &enc).unwrap();
                    prop_assert_eq!(h.version, enc.version);
                    prop_assert_eq!(h.data_len(), h.dirty_blocks * bs);
                    let refs = DiffFile::open(&p).unwrap().data_stats().referenced_blocks;
                    prop_assert!(refs == 0 || (enc.dedupe && enc.version != VERSION_1), "{} references with {:?}", refs, enc);
                    diffs.push(p);
                    images.push(model.clone());
                }
            }
            let mut got = vec![0u8; model.len()];
            d.read(0, &mut got).unwrap();
            prop_assert!(got == model, "read differs from the model after {:?}", op);
        }
        // Final cut; every prefix of the chain reproduces the disk at its cut.
        let c = d.cut(false).unwrap();
        let p = dir.path().join(format!("{}.diff", c.generation));
        d.export_with(c.generation, &p, None, &encodings.next().unwrap()).unwrap();
        diffs.push(p);
        images.push(model.clone());
        for (i, want) in images.iter().enumerate() {
            let out = dir.path().join(format!("apply-{i}.img"));
            diff::apply(Some(&base_path), &diffs[..=i], &out, false, &Job::new()).unwrap();
            prop_assert!(&std::fs::read(&out).unwrap() == want, "apply of {} diffs differs", i + 1);
        }
        // No zero block's bytes in any diff, and the data is exactly dirty blocks x block size;
        // references resolved against the image of the cut before (or the base).
        for (i, p) in diffs.iter().enumerate() {
            let df = DiffFile::open(p).unwrap();
            prop_assert_eq!(df.header.data_len(), df.header.dirty_blocks * bs);
            let parent_img = if i == 0 { &base } else { &images[i - 1] };
            let parent = |off: u64, buf: &mut [u8]| -> Result<(), DiffError> {
                buf.copy_from_slice(&parent_img[off as usize..off as usize + buf.len()]);
                Ok(())
            };
            let mut stored = 0u64;
            df.for_each_dirty_run_in(&Job::new(), &parent, |off, bytes| {
                for blk in bytes.chunks(bs as usize) {
                    assert!(!is_zero(blk), "a zero block was stored as data");
                }
                assert!(bytes == &images[i][off as usize..off as usize + bytes.len()]);
                stored += bytes.len() as u64;
                Ok(())
            }).unwrap();
            prop_assert_eq!(stored, df.header.data_len());
        }
        let sq = dir.path().join("squashed.diff");
        let sq_enc = encodings.next().unwrap();
        let squashed = diff::squash_with(&diffs, &sq, false, &sq_enc, &Job::new());
        let (sq_enc, sq_refs) = match squashed {
            // References to the base stay references: version 1 cannot hold them.
            Err(DiffError::Options(_)) if sq_enc.version == VERSION_1 => {
                let enc = WriteOptions { version: diff::VERSION, ..sq_enc };
                diff::squash_with(&diffs, &sq, false, &enc, &Job::new()).unwrap();
                let refs = DiffFile::open(&sq).unwrap().data_stats().referenced_blocks;
                prop_assert!(refs > 0, "version 1 refused a squash without references");
                (enc, refs)
            }
            r => {
                r.unwrap();
                (sq_enc, DiffFile::open(&sq).unwrap().data_stats().referenced_blocks)
            }
        };
        let out = dir.path().join("squashed.img");
        diff::apply(Some(&base_path), std::slice::from_ref(&sq), &out, false, &Job::new()).unwrap();
        prop_assert!(std::fs::read(&out).unwrap() == model);

        // qcow2: the overlay of the squashed diff (any encoding) over the base reads as the
        // model; without references it is the one its version-1 twin gives, cluster for
        // cluster (tests/cli.rs checks such overlays with qemu-img).
        let q = dir.path().join("sq.qcow2");
        diff::qcow2::to_qcow2(&sq, &base_path, &q, false, &Job::new()).unwrap();
        prop_assert!(common::read_qcow2(&q, &base) == model, "qcow2 of {:?} differs", sq_enc);
        if sq_refs == 0 {
            let raw_sq = dir.path().join("squashed-v1.diff");
            let v1 = WriteOptions { version: VERSION_1, compression: Compression::None, ..WriteOptions::default() };
            diff::squash_with(&diffs, &raw_sq, false, &v1, &Job::new()).unwrap();
            let q1 = dir.path().join("sq-v1.qcow2");
            diff::qcow2::to_qcow2(&raw_sq, &base_path, &q1, false, &Job::new()).unwrap();
            prop_assert!(std::fs::read(&q).unwrap() == std::fs::read(&q1).unwrap(), "qcow2 of {:?} differs", sq_enc);
        }
        // The last diff as an overlay over the image of the one before, which its references
        // are read from.
        if diffs.len() > 1 {
            let (n, prev) = (diffs.len() - 1, dir.path().join(format!("apply-{}.img", diffs.len() - 2)));
            let a = dir.path().join("last.qcow2");
            diff::qcow2::to_qcow2_over(&diffs[n], &prev, ChainRoot::Foreign, &a, false, &Job::new()).unwrap();
            prop_assert!(common::read_qcow2(&a, &images[n - 1]) == model);
        }

        // A chain (what `vsnap blk --chain` opens): every diff read through its frames.
        let mut o = DiskOptions::new(dir.path().join("from-chain"));
        o.base = Some(base_path.clone());
        o.block_size = bs as u32;
        o.chain = diffs.clone();
        let c = Disk::open(&o).unwrap();
        let mut got = vec![0u8; model.len()];
        c.read(0, &mut got).unwrap();
        prop_assert!(got == model, "the chain reads differ from the model");
        // Sector by sector, backwards: reads that start inside frames, out of order.
        for s in (0..SECTORS).rev() {
            let mut sec = vec![0u8; 512];
            c.read(s * 512, &mut sec).unwrap();
            prop_assert!(sec[..] == model[(s * 512) as usize..((s + 1) * 512) as usize], "sector {}", s);
        }
    }
}
