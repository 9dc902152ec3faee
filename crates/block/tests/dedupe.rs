//! Parent dedupe end to end: a workload that copies blocks (from the base, from an earlier
//! generation, moved, rewritten unchanged) is exported with references, which every reader
//! resolves byte-identically; dangling references and wrong parents are refused with typed
//! errors; the index files in the state directory survive damage and crashes without harm.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{assert_bytes, pattern, read_all, read_qcow2, Fixture, BS};
use vsnap_block::diff::{
    self, ChainRoot, Compression, DiffError, DiffFile, FrameProblem, RefProblem, WriteOptions,
};
use vsnap_block::{BlockError, Disk, DiskOptions, Job};

const SIZE: usize = 8 << 20;
const B: u64 = BS as u64;

fn copy(d: &Disk, from: u64, to: u64, len: usize) {
    let mut buf = vec![0u8; len];
    d.read(from, &mut buf).unwrap();
    d.write(to, &buf).unwrap();
}

fn opts(compression: Compression, dedupe: bool) -> WriteOptions {
    WriteOptions {
        dedupe,
        frame_size: 64 << 10,
        ..WriteOptions::new(compression)
    }
}

/// Two generations over the base: (generation 1) 1 MiB of the base copied elsewhere, 512 KiB
/// of new data; (generation 2) 256 KiB of generation 1's new data copied, 128 KiB of the base
/// moved (copied, the original discarded), 64 KiB rewritten with the bytes it had, and new
/// data. Returns the disk and its image at each cut.
fn workload(f: &Fixture) -> (Disk, Vec<Vec<u8>>) {
    let d = f.disk();
    let mut images = Vec::new();
    copy(&d, 0, 4 << 20, 1 << 20);
    d.write(6 << 20, &pattern(512 << 10, 0x44)).unwrap();
    d.cut(false).unwrap();
    images.push(read_all(&d));
    copy(&d, 6 << 20, 7 << 20, 256 << 10);
    copy(&d, 2 << 20, 3 << 20, 128 << 10);
    d.discard(2 << 20, 128 << 10).unwrap();
    copy(&d, 5 << 20, 5 << 20, 64 << 10);
    d.write((7 << 20) + (512 << 10), &pattern(64 << 10, 0x55))
        .unwrap();
    d.cut(false).unwrap();
    images.push(read_all(&d));
    (d, images)
}

/// The blocks each generation of [`workload`] copies from its parent state.
const COPIED: [u64; 2] = [256, 64 + 32 + 16];

fn chain_disk(f: &Fixture, dir: &str, chain: &[PathBuf]) -> Result<Disk, BlockError> {
    let mut o = f.opts();
    o.state_dir = f.path(dir);
    o.chain = chain.to_vec();
    Disk::open(&o)
}

#[test]
fn copied_blocks_are_references_that_every_reader_resolves() {
    let f = Fixture::new(SIZE);
    let (d, images) = workload(&f);
    for (name, compression) in [("raw", Compression::None), ("zstd", Compression::Zstd(3))] {
        for dedupe in [false, true] {
            let tag = format!("{name}-{dedupe}");
            let diffs: Vec<PathBuf> = (1..=2)
                .map(|g| {
                    let p = f.path(&format!("{tag}-g{g}.diff"));
                    d.export_with(g, &p, None, &opts(compression, dedupe))
                        .unwrap();
                    p
                })
                .collect();
            for (i, p) in diffs.iter().enumerate() {
                let st = DiffFile::open(p).unwrap().data_stats();
                let want = if dedupe { COPIED[i] } else { 0 };
                assert_eq!(st.referenced_blocks, want, "{tag} g{}", i + 1);
                // A reference stores 4 bytes a block, in entries of at most a frame.
                assert!(!dedupe || st.reference_frames >= want.div_ceil(16));
            }
            // apply, every prefix.
            for i in 0..2 {
                let out = f.path(&format!("{tag}-{i}.img"));
                diff::apply(Some(&f.base), &diffs[..=i], &out, false, &Job::new()).unwrap();
                assert_bytes(&std::fs::read(&out).unwrap(), &images[i]);
            }
            // squash: generation 1's references to the base stay references.
            let sq = f.path(&format!("{tag}-sq.diff"));
            diff::squash_with(&diffs, &sq, false, &opts(compression, true), &Job::new()).unwrap();
            let sq_refs = DiffFile::open(&sq).unwrap().data_stats().referenced_blocks;
            // The base blocks gen 1 copied, those gen 2 moved and rewrote; gen 2's copy of
            // gen 1's data is data of the squashed diff.
            assert_eq!(sq_refs, if dedupe { 256 + 32 + 16 } else { 0 }, "{tag}");
            let out = f.path(&format!("{tag}-sq.img"));
            diff::apply(
                Some(&f.base),
                std::slice::from_ref(&sq),
                &out,
                false,
                &Job::new(),
            )
            .unwrap();
            assert_bytes(&std::fs::read(&out).unwrap(), &images[1]);
            // to-qcow2: each diff over a raw image of its parent, which references are read from.
            let q1 = f.path(&format!("{tag}-1.qcow2"));
            diff::qcow2::to_qcow2(&diffs[0], &f.base, &q1, false, &Job::new()).unwrap();
            assert_bytes(&read_qcow2(&q1, &f.base_bytes), &images[0]);
            let parent = f.path(&format!("{tag}-0.img"));
            let q2 = f.path(&format!("{tag}-2.qcow2"));
            diff::qcow2::to_qcow2_over(
                &diffs[1],
                &parent,
                ChainRoot::Foreign,
                &q2,
                false,
                &Job::new(),
            )
            .unwrap();
            assert_bytes(&read_qcow2(&q2, &images[0]), &images[1]);
            // The squashed diff over the base.
            let q = f.path(&format!("{tag}-sq.qcow2"));
            diff::qcow2::to_qcow2(&sq, &f.base, &q, false, &Job::new()).unwrap();
            assert_bytes(&read_qcow2(&q, &f.base_bytes), &images[1]);
            // The chain under a disk: whole reads, and block by block backwards.
            let c = chain_disk(&f, &format!("{tag}-chain"), &diffs).unwrap();
            assert_bytes(&read_all(&c), &images[1]);
            for b in (0..SIZE as u64 / B).rev().step_by(7) {
                let got = common::read(&c, b * B, BS as usize);
                assert!(
                    got[..] == images[1][(b * B) as usize..((b + 1) * B) as usize],
                    "block {b}"
                );
            }
        }
    }
}

#[test]
fn a_disk_started_from_a_deduplicated_chain_deduplicates_against_it() {
    let f = Fixture::new(SIZE);
    let (d, images) = workload(&f);
    let diffs: Vec<PathBuf> = (1..=2)
        .map(|g| {
            let p = f.path(&format!("g{g}.diff"));
            d.export(g, &p, None).unwrap();
            p
        })
        .collect();
    drop(d);
    let c = chain_disk(&f, "chain", &diffs).unwrap();
    // Copies of blocks the chain's diffs hold, as data and as references, and of the base.
    copy(&c, 6 << 20, 1 << 20, 64 << 10);
    copy(&c, 4 << 20, (1 << 20) + (64 << 10), 64 << 10);
    copy(&c, 7 << 20, (1 << 20) + (128 << 10), 64 << 10);
    let cut = c.cut(false).unwrap();
    let want = read_all(&c);
    let p = f.path("g3.diff");
    c.export(cut.generation, &p, None).unwrap();
    assert_eq!(
        DiffFile::open(&p).unwrap().data_stats().referenced_blocks,
        48
    );
    let chain = [diffs.clone(), vec![p]].concat();
    let out = f.path("g3.img");
    diff::apply(Some(&f.base), &chain, &out, false, &Job::new()).unwrap();
    assert_bytes(&std::fs::read(&out).unwrap(), &want);
    assert_bytes(&images[1][..1 << 20], &want[..1 << 20]);
    // The chain diffs' hash lists were made once, in the state directory.
    for p in &diffs {
        let id = DiffFile::open(p).unwrap().header.id.simple().to_string();
        assert!(f.path(&format!("chain/chain-{id}.hashes")).exists());
    }
}

/// Rewrites index entry `entry` of the version-2 diff at `p` with `edit`, and makes the index
/// and trailer checksums agree again (only the change itself is left to be found).
fn rewrite_entry(p: &Path, entry: usize, edit: impl FnOnce(&mut [u8])) {
    let mut b = std::fs::read(p).unwrap();
    let t = b.len() - 40;
    let frames = u64::from_le_bytes(b[t + 8..t + 16].try_into().unwrap()) as usize;
    let ix = t - 64 * frames;
    edit(&mut b[ix + 64 * entry..ix + 64 * (entry + 1)]);
    let crc = crc32c::crc32c(&b[ix..t]);
    b[t + 20..t + 24].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c::crc32c(&b[t..t + 28]);
    b[t + 28..t + 32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(p, b).unwrap();
}

fn first_reference(p: &Path) -> (usize, diff::Frame) {
    let d = DiffFile::open(p).unwrap();
    let i = d
        .frames()
        .iter()
        .position(|f| f.reference.is_some())
        .unwrap();
    (i, d.frames()[i])
}

#[test]
fn dangling_references_and_wrong_parents_are_refused() {
    let f = Fixture::new(SIZE);
    let (d, _) = workload(&f);
    let (g1, g2) = (f.path("g1.diff"), f.path("g2.diff"));
    d.export(1, &g1, None).unwrap();
    d.export(2, &g2, None).unwrap();
    let job = Job::new();
    let out = f.path("out.img");

    // A reference past the device end, or one the entry's fields do not fit: refused at open
    // by every reader.
    let (i, fr) = first_reference(&g1);
    let blocks = SIZE as u64 / B;
    for (name, source) in [("past", blocks - 1), ("wrap", u64::MAX - 2)] {
        let p = f.path(&format!("{name}.diff"));
        std::fs::copy(&g1, &p).unwrap();
        rewrite_entry(&p, i, |e| e[40..48].copy_from_slice(&source.to_le_bytes()));
        let e = DiffFile::open(&p).err().unwrap();
        assert!(
            matches!(
                e,
                DiffError::Reference {
                    problem: RefProblem::OutsideDevice { .. },
                    ..
                }
            ),
            "{name}: {e}"
        );
        let e = diff::apply(Some(&f.base), std::slice::from_ref(&p), &out, true, &job).unwrap_err();
        assert!(matches!(e, DiffError::Reference { .. }) && !out.exists());
        assert!(matches!(
            chain_disk(&f, &format!("{name}-chain"), &[p]),
            Err(BlockError::Diff(DiffError::Reference { .. }))
        ));
    }
    let p = f.path("field.diff");
    std::fs::copy(&g1, &p).unwrap();
    rewrite_entry(&p, i, |e| e[50] = 1);
    assert!(matches!(DiffFile::open(&p), Err(DiffError::Unsupported(_))));

    // The recorded block checksums damaged: found by the diff alone.
    let p = f.path("list.diff");
    std::fs::copy(&g1, &p).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    file.write_all_at(&[0xff], fr.stored_offset + 1).unwrap();
    let e = DiffFile::open(&p).unwrap().verify(&job).unwrap_err();
    assert!(
        matches!(e, DiffError::Frame { frame, problem: FrameProblem::StoredChecksum, .. } if frame == i),
        "{e}"
    );
    let p = f.path("combine.diff");
    std::fs::copy(&g1, &p).unwrap();
    rewrite_entry(&p, i, |e| e[32] ^= 1);
    let e = DiffFile::open(&p).unwrap().verify(&job).unwrap_err();
    assert!(
        matches!(
            e,
            DiffError::Frame {
                problem: FrameProblem::BlockChecksums,
                ..
            }
        ),
        "{e}"
    );

    // A parent that is not the one the diff was cut on: the copied blocks do not match.
    let other = f.path("other.img");
    std::fs::write(&other, pattern(SIZE, 0x77)).unwrap();
    let mismatch = |e: &DiffError| {
        matches!(
            e,
            DiffError::Reference {
                problem: RefProblem::Mismatch { .. },
                ..
            }
        )
    };
    let e = diff::apply(Some(&other), std::slice::from_ref(&g1), &out, true, &job).unwrap_err();
    assert!(mismatch(&e) && !out.exists(), "{e}");
    // Generation 2 on the base without generation 1 (vouched for, wrongly).
    let e = diff::apply_to(
        Some(&f.base),
        std::slice::from_ref(&g2),
        &out,
        true,
        ChainRoot::Foreign,
        &job,
    )
    .unwrap_err();
    assert!(mismatch(&e), "{e}");
    let q = f.path("o.qcow2");
    let e = diff::qcow2::to_qcow2(&g1, &other, &q, true, &job).unwrap_err();
    assert!(mismatch(&e) && !q.exists(), "{e}");
    let mut o = DiskOptions::new(f.path("other-chain"));
    o.base = Some(other.clone());
    o.block_size = BS;
    o.chain = vec![g1.clone()];
    match Disk::open(&o) {
        Err(BlockError::Diff(e)) => assert!(mismatch(&e), "{e}"),
        r => panic!("a chain over the wrong base: {:?}", r.err()),
    }
    // Without the vouching, a diff whose parent is not in the chain is refused as before.
    let e = diff::apply(Some(&f.base), std::slice::from_ref(&g2), &out, true, &job).unwrap_err();
    assert!(matches!(e, DiffError::ForeignParent { .. }), "{e}");
    let e = diff::apply(Some(&f.base), &[g2.clone(), g1.clone()], &out, true, &job).unwrap_err();
    assert!(
        matches!(e, DiffError::Chain { .. } | DiffError::ForeignParent { .. }),
        "{e}"
    );

    // to-qcow2 over a qcow2 backing file: the parent's blocks cannot be read from it.
    let q1 = f.path("g1.qcow2");
    diff::qcow2::to_qcow2(&g1, &f.base, &q1, true, &job).unwrap();
    let e = diff::qcow2::to_qcow2_over(&g2, &q1, ChainRoot::Foreign, &q, true, &job).unwrap_err();
    assert!(
        matches!(
            e,
            DiffError::Reference {
                problem: RefProblem::NoParent(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(!q.exists());
    // Given a raw image of the parent to read them from, it converts.
    let img1 = f.path("g1.img");
    diff::apply(Some(&f.base), std::slice::from_ref(&g1), &img1, true, &job).unwrap();
    diff::qcow2::to_qcow2_with(&g2, &q1, Some(&img1), ChainRoot::Foreign, &q, true, &job).unwrap();
    // Readers without a parent say so.
    let d2 = DiffFile::open(&g2).unwrap();
    let e = d2.for_each_dirty_run(&job, |_, _| Ok(())).unwrap_err();
    assert!(
        matches!(
            e,
            DiffError::Reference {
                problem: RefProblem::NoParent(_),
                ..
            }
        ),
        "{e}"
    );
    d2.verify(&job).unwrap();
    // Version 1 cannot hold references: a squash that keeps some is refused, not flattened.
    let v1 = WriteOptions {
        version: diff::VERSION_1,
        compression: Compression::None,
        ..WriteOptions::default()
    };
    let e = diff::squash_with(
        std::slice::from_ref(&g1),
        &f.path("v1.diff"),
        true,
        &v1,
        &job,
    )
    .unwrap_err();
    assert!(matches!(e, DiffError::Options(_)), "{e}");
}

fn state_file(f: &Fixture, name: &str) -> PathBuf {
    f.path(&format!("state/{name}"))
}

#[test]
fn the_index_files_are_rebuilt_when_damaged_and_never_trusted() {
    let f = Fixture::new(SIZE);
    let (d, images) = workload(&f);
    // Cuts never hash: no index file exists before the first export.
    let hashes = || {
        let mut v: Vec<String> = std::fs::read_dir(f.path("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".hashes") || n.contains("hashes.vsnap-partial"))
            .collect();
        v.sort();
        v
    };
    assert!(hashes().is_empty());
    let export = |g: u64, name: &str| {
        let p = f.path(name);
        d.export(g, &p, None).unwrap();
        DiffFile::open(&p).unwrap().data_stats().referenced_blocks
    };
    assert_eq!(export(1, "g1.diff"), COPIED[0]);
    assert_eq!(export(2, "g2.diff"), COPIED[1]);
    assert_eq!(
        hashes(),
        ["base.hashes", "layer-000001.hashes", "layer-000002.hashes"]
    );
    let saved: Vec<Vec<u8>> = hashes()
        .iter()
        .map(|n| std::fs::read(state_file(&f, n)).unwrap())
        .collect();
    // Each file flipped, truncated, emptied or swapped for another: found, rebuilt as it was,
    // and the exports are what they were.
    let names = hashes();
    type Damage = dyn Fn(&mut Vec<u8>);
    let damage: [&Damage; 4] = [
        &|b| b[100] ^= 1,
        &|b| b.truncate(b.len() / 2),
        &|b| b.clear(),
        &|b| b[40] ^= 1,
    ];
    for (k, hurt) in damage.iter().enumerate() {
        for (name, good) in names.iter().zip(&saved) {
            let mut b = good.clone();
            hurt(&mut b);
            std::fs::write(state_file(&f, name), &b).unwrap();
            let want = if name.contains("000001") { 1 } else { 2 };
            let refs = export(want, &format!("again-{k}-{name}.diff"));
            // Generation 1's and 2's exports read the base's and generation 1's files.
            assert_eq!(refs, COPIED[want as usize - 1], "{name} damaged ({k})");
            assert!(
                std::fs::read(state_file(&f, name)).unwrap() == *good,
                "{name} not rebuilt"
            );
            std::fs::write(state_file(&f, name), good).unwrap();
        }
    }
    // Another layer's list under this one's name: made for another layer, so not used.
    std::fs::copy(
        state_file(&f, "layer-000002.hashes"),
        state_file(&f, "layer-000001.hashes"),
    )
    .unwrap();
    assert_eq!(export(2, "swapped.diff"), COPIED[1]);
    let out = f.path("swapped.img");
    diff::apply(
        Some(&f.base),
        &[f.path("g1.diff"), f.path("swapped.diff")],
        &out,
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(&out).unwrap(), &images[1]);

    // What a crash leaves: half-written temporaries, lists of layers and diffs no longer there.
    // The next start removes them and keeps the rest.
    drop(d);
    let leftovers = [
        ".base.hashes.vsnap-partial-1-0123",
        ".layer-000002.hashes.vsnap-partial-9-abcd",
        "layer-000077.hashes",
        "chain-0123456789abcdef0123456789abcdef.hashes",
    ];
    for l in leftovers {
        std::fs::write(state_file(&f, l), b"partial").unwrap();
    }
    let d = f.disk();
    for l in leftovers {
        assert!(!state_file(&f, l).exists(), "{l} survived a restart");
    }
    assert!(state_file(&f, "base.hashes").exists());
    assert_bytes(&read_all(&d), &images[1]);
}

#[test]
fn a_fold_merges_the_hash_lists_of_the_layers_it_folds() {
    let f = Fixture::new(SIZE);
    let (d, images) = workload(&f);
    for g in 1..=2 {
        d.export(g, &f.path(&format!("g{g}.diff")), None).unwrap();
    }
    d.fold(2, false).unwrap();
    let folded: Vec<String> = std::fs::read_dir(f.path("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("layer-000002-f") && n.ends_with(".hashes"))
        .collect();
    assert_eq!(folded.len(), 1, "the folded layer's list");
    assert!(!state_file(&f, "layer-000001.hashes").exists());
    assert!(!state_file(&f, "layer-000002.hashes").exists());
    let merged = std::fs::read(state_file(&f, &folded[0])).unwrap();
    // What the merge wrote is what hashing the folded layer's blocks gives.
    std::fs::remove_file(state_file(&f, &folded[0])).unwrap();
    d.export(2, &f.path("folded.diff"), None).unwrap();
    assert!(std::fs::read(state_file(&f, &folded[0])).unwrap() == merged);
    let out = f.path("folded.img");
    diff::apply(
        Some(&f.base),
        &[f.path("folded.diff")],
        &out,
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(&out).unwrap(), &images[1]);
    // A new generation copying the folded layer's data finds it there.
    copy(&d, 6 << 20, 0, 128 << 10);
    let c = d.cut(false).unwrap();
    let p = f.path("g3.diff");
    d.export(c.generation, &p, None).unwrap();
    assert_eq!(
        DiffFile::open(&p).unwrap().data_stats().referenced_blocks,
        32
    );
    let out = f.path("g3.img");
    diff::apply(
        Some(&f.base),
        &[f.path("folded.diff"), p],
        &out,
        false,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(&out).unwrap(), &read_all(&d));
}

#[test]
fn a_reference_to_the_short_last_block_applies_even_when_the_diff_overwrites_it() {
    // The last block holds 1536 bytes; a block elsewhere copies them (zeros after): a
    // reference to the last block, which the same generation then overwrites, so `apply`
    // reads it back from its spool, short.
    let f = Fixture::new(10 * BS as usize + 1536);
    let d = f.disk();
    let last = 10 * B;
    d.write(last, &pattern(1536, 0x21)).unwrap();
    d.cut(false).unwrap();
    let mut block = vec![0u8; BS as usize];
    d.read(last, &mut block[..1536]).unwrap();
    d.write(2 * B, &block).unwrap();
    d.write(last, &pattern(1536, 0x42)).unwrap();
    d.cut(false).unwrap();
    let diffs: Vec<PathBuf> = (1..=2)
        .map(|g| {
            let p = f.path(&format!("g{g}.diff"));
            d.export(g, &p, None).unwrap();
            p
        })
        .collect();
    let refs = DiffFile::open(&diffs[1])
        .unwrap()
        .data_stats()
        .referenced_blocks;
    assert_eq!(refs, 1, "the copy of the short block is a reference");
    let out = f.path("o.img");
    diff::apply(Some(&f.base), &diffs, &out, false, &Job::new()).unwrap();
    assert_bytes(&std::fs::read(&out).unwrap(), &read_all(&d));
}
