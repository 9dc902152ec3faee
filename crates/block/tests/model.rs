//! Property test: random sequences of aligned and unaligned writes, zero writes, write-zeroes
//! and discards over a random non-zero base, against a plain in-memory model of the bytes.

mod common;

use proptest::prelude::*;
use vsnap_block::diff::{self, DiffFile};
use vsnap_block::zero::is_zero;
use vsnap_block::{Disk, DiskOptions, Job};

const SECTORS: u64 = 96;

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, fill: u8 },
    WriteZeroes { sector: u64, sectors: u64 },
    Discard { sector: u64, sectors: u64 },
    Cut,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 0..=(SECTORS - s).min(24)));
    prop_oneof![
        4 => (range.clone(), prop_oneof![Just(0u8), 1..=255u8])
            .prop_map(|((sector, sectors), fill)| Op::Write { sector, sectors, fill }),
        2 => range.clone().prop_map(|(sector, sectors)| Op::WriteZeroes { sector, sectors }),
        2 => range.prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => Just(Op::Cut),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn disk_matches_model(
        bs_shift in 9u32..=12,
        base in proptest::collection::vec(any::<u8>(), (SECTORS * 512) as usize),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let bs = 1u64 << bs_shift;
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
                Op::Cut => {
                    let c = d.cut(false).unwrap();
                    let p = dir.path().join(format!("{}.diff", c.generation));
                    let h = d.export(c.generation, &p, None).unwrap();
                    prop_assert_eq!(h.data_len(), h.dirty_blocks * bs);
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
        d.export(c.generation, &p, None).unwrap();
        diffs.push(p);
        images.push(model.clone());
        for (i, want) in images.iter().enumerate() {
            let out = dir.path().join(format!("apply-{i}.img"));
            diff::apply(Some(&base_path), &diffs[..=i], &out, false, &Job::new()).unwrap();
            prop_assert!(&std::fs::read(&out).unwrap() == want, "apply of {} diffs differs", i + 1);
        }
        // No zero block's bytes in any diff, and the data is exactly dirty blocks x block size.
        for p in &diffs {
            let df = DiffFile::open(p).unwrap();
            prop_assert_eq!(df.header.data_len(), df.header.dirty_blocks * bs);
            let mut stored = 0u64;
            df.for_each_dirty_run(&Job::new(), |_, bytes| {
                for blk in bytes.chunks(bs as usize) {
                    assert!(!is_zero(blk), "a zero block was stored as data");
                }
                stored += bytes.len() as u64;
                Ok(())
            }).unwrap();
            prop_assert_eq!(stored, df.header.data_len());
        }
        let sq = dir.path().join("squashed.diff");
        diff::squash(&diffs, &sq, false, &Job::new()).unwrap();
        let out = dir.path().join("squashed.img");
        diff::apply(Some(&base_path), &[sq], &out, false, &Job::new()).unwrap();
        prop_assert!(std::fs::read(&out).unwrap() == model);
    }
}
