//! The diff format on real files: version 1 files (one written by vsnap before version 2
//! existed) through every reader; compression on and off; damaged frames, truncated or
//! rewritten indexes and frames of the wrong size refused with typed errors by every reader.

mod common;

use std::path::{Path, PathBuf};

use common::{read_all, Fixture};
use uuid::Uuid;
use vsnap_block::diff::{
    self, v2, Codec, Compression, DiffError, DiffFile, Frame, FrameProblem, WriteOptions, VERSION,
    VERSION_1,
};
use vsnap_block::{BlockError, BlockState, Disk, Geometry, Job, Tracker};

const SIZE: usize = 4 << 20;
const BS: u64 = common::BS as u64;

/// Text-like bytes: words from a small vocabulary, as a guest's logs and sources are.
fn text(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "block", "frame", "the", "diff", "guest", "kernel", "inode", "of", "journal", "write",
        "snapshot", "zero",
    ];
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(WORDS[(x % 12) as usize].as_bytes());
        v.push(if x.is_multiple_of(9) { b'\n' } else { b' ' });
    }
    v.truncate(len);
    v
}

fn v1() -> WriteOptions {
    WriteOptions {
        version: VERSION_1,
        compression: Compression::None,
        ..WriteOptions::default()
    }
}

fn with_frames(compression: Compression, frame_blocks: u32) -> WriteOptions {
    WriteOptions {
        compression,
        frame_size: frame_blocks * BS as u32,
        ..WriteOptions::default()
    }
}

/// Bytes no compressor shrinks (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A disk with text and noise written and a zeroed range, cut once; returns it and the image.
fn cut_disk(f: &Fixture) -> (Disk, Vec<u8>) {
    let d = f.disk();
    d.write(0, &text(1 << 20, 7)).unwrap();
    d.write(1 << 20, &noise(256 << 10, 9)).unwrap();
    d.write_zeroes(2 << 20, 64 << 10).unwrap();
    d.write((3 << 20) + 512, &text(40 << 10, 3)).unwrap();
    d.cut(false).unwrap();
    let want = read_all(&d);
    (d, want)
}

fn apply_err(f: &Fixture, diffs: &[PathBuf]) -> DiffError {
    let out = f.path("out.img");
    let e = diff::apply(Some(&f.base), diffs, &out, true, &Job::new()).unwrap_err();
    assert!(!out.exists(), "a refused apply left its output");
    e
}

/// Every reader refuses `path` with an error `check` accepts.
fn refused_everywhere(f: &Fixture, path: &Path, check: impl Fn(&DiffError) -> bool) {
    let p = [path.to_owned()];
    let e = apply_err(f, &p);
    assert!(check(&e), "apply: {e}");
    let e = diff::squash(&p, &f.path("sq.diff"), true, &Job::new()).unwrap_err();
    assert!(check(&e), "squash: {e}");
    let q = f.path("o.qcow2");
    let e = diff::qcow2::to_qcow2(path, &f.base, &q, true, &Job::new()).unwrap_err();
    assert!(check(&e) && !q.exists(), "to-qcow2: {e}");
    let mut o = f.opts();
    o.state_dir = f.path("chain-state");
    o.chain = p.to_vec();
    match Disk::open(&o) {
        Err(BlockError::Diff(e)) => assert!(check(&e), "chain: {e}"),
        Err(e) => panic!("chain: {e}"),
        Ok(_) => panic!("a chain with a damaged diff opened"),
    }
}

#[test]
fn a_version_1_file_from_before_version_2_is_read_by_every_tool() {
    // Written by vsnap's version-1 writer (the fuzz seed of this shape, fuzz/corpus): 64 KiB of
    // 512-byte blocks, dirty 0-2, 10, 127, zero 5-8, data byte = (offset % 251) | 1.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v1-64k-512.diff");
    let g = Geometry::new(64 << 10, 512).unwrap();
    let mut t = Tracker::new();
    for (s, e, st) in [
        (0, 3, BlockState::Dirty),
        (5, 9, BlockState::Zero),
        (10, 11, BlockState::Dirty),
        (127, 128, BlockState::Dirty),
    ] {
        t.set_range(s, e, st);
    }
    let fill = |off: u64, buf: &mut [u8]| -> Result<(), DiffError> {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = ((off + j as u64) % 251) as u8 | 1;
        }
        Ok(())
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    std::fs::write(&base, vec![0xeeu8; 64 << 10]).unwrap();
    let mut want = vec![0xeeu8; 64 << 10];
    for b in 0..128u64 {
        let r = (b * 512) as usize..((b + 1) * 512) as usize;
        match t.state(b as u32) {
            BlockState::Dirty => fill(b * 512, &mut want[r]).unwrap(),
            BlockState::Zero => want[r].fill(0),
            BlockState::Untouched => {}
        }
    }

    // The version-1 writer still writes exactly those bytes.
    let again = dir.path().join("again.diff");
    let (id, nil) = (Uuid::from_u128(1), Uuid::nil());
    diff::write_diff(&again, false, g, 1, id, nil, &t, &fill, &v1(), &Job::new()).unwrap();
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&fixture).unwrap());

    let d = DiffFile::open(&fixture).unwrap();
    assert_eq!((d.header.version, d.frames().len()), (VERSION_1, 1));
    d.verify(&Job::new()).unwrap();
    let out = dir.path().join("out.img");
    let one = [fixture.clone()];
    diff::apply(Some(&base), &one, &out, false, &Job::new()).unwrap();
    assert!(std::fs::read(&out).unwrap() == want);
    // Squashed into version 2, it applies to the same image and makes the same qcow2 overlay.
    let sq = dir.path().join("sq.diff");
    diff::squash(&one, &sq, false, &Job::new()).unwrap();
    assert_eq!(DiffFile::open(&sq).unwrap().header.version, VERSION);
    diff::apply(
        Some(&base),
        std::slice::from_ref(&sq),
        &out,
        true,
        &Job::new(),
    )
    .unwrap();
    assert!(std::fs::read(&out).unwrap() == want);
    let (q1, q2) = (dir.path().join("1.qcow2"), dir.path().join("2.qcow2"));
    diff::qcow2::to_qcow2(&fixture, &base, &q1, false, &Job::new()).unwrap();
    diff::qcow2::to_qcow2(&sq, &base, &q2, false, &Job::new()).unwrap();
    assert!(std::fs::read(&q1).unwrap() == std::fs::read(&q2).unwrap());
    // As a chain under a disk.
    let mut o = vsnap_block::DiskOptions::new(dir.path().join("state"));
    o.base = Some(base.clone());
    o.block_size = 512;
    o.chain = one.to_vec();
    assert!(read_all(&Disk::open(&o).unwrap()) == want);
}

#[test]
fn every_encoding_round_trips_and_compression_shrinks_text_only() {
    let f = Fixture::new(SIZE);
    let (d, want) = cut_disk(&f);
    let mut sizes = Vec::new();
    for (name, opts) in [
        ("v1", v1()),
        ("none", WriteOptions::new(Compression::None)),
        ("zstd1", WriteOptions::new(Compression::Zstd(1))),
        ("zstd3", WriteOptions::default()),
        ("zstd3-small", with_frames(Compression::Zstd(3), 3)),
        (
            "zstd3-2threads",
            WriteOptions {
                threads: 2,
                ..with_frames(Compression::Zstd(3), 16)
            },
        ),
    ] {
        let p = f.path(&format!("{name}.diff"));
        d.export_with(1, &p, None, &opts).unwrap();
        let df = DiffFile::open(&p).unwrap();
        df.verify(&Job::new()).unwrap();
        let st = df.data_stats();
        assert_eq!(st.raw_bytes, df.header.data_len());
        assert_eq!(st.frames as usize, df.frames().len());
        diff::apply(
            Some(&f.base),
            std::slice::from_ref(&p),
            &f.path("o.img"),
            true,
            &Job::new(),
        )
        .unwrap();
        assert!(std::fs::read(f.path("o.img")).unwrap() == want, "{name}");
        sizes.push((name, st));
    }
    for (name, st) in &sizes {
        match *name {
            "v1" | "none" => assert_eq!((st.stored_bytes, st.zstd_frames), (st.raw_bytes, 0)),
            _ => {
                // The text shrinks; frames of noise alone stay raw (with frames of 1 MiB the
                // noise shares a frame with text).
                assert!(st.stored_bytes < st.raw_bytes / 2, "{name}: {st:?}");
                assert!(st.zstd_frames > 0, "{name}: {st:?}");
                if st.frames > 2 {
                    assert!(st.zstd_frames < st.frames, "{name}: {st:?}");
                }
            }
        }
    }
}

/// The file's bytes, with frame `i`'s stored byte at `within` flipped.
fn flip_frame_byte(p: &Path, i: usize, within: u64) {
    let fr = DiffFile::open(p).unwrap().frames()[i];
    let mut b = std::fs::read(p).unwrap();
    b[(fr.stored_offset + within) as usize] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

#[test]
fn a_damaged_frame_is_refused_by_every_reader_and_stays_local() {
    let f = Fixture::new(SIZE);
    let (d, _) = cut_disk(&f);
    for compression in [Compression::Zstd(3), Compression::None] {
        let p = f.path(&format!("{compression}.diff"));
        d.export_with(1, &p, None, &with_frames(compression, 4))
            .unwrap();
        let df = DiffFile::open(&p).unwrap();
        let frames = df.frames().to_vec();
        let codec = if compression == Compression::None {
            Codec::Stored
        } else {
            Codec::Zstd
        };
        assert_eq!(frames[1].codec, codec);
        // Frames of 4 blocks: frame 1 holds dirty blocks 4-7, which are device blocks 4-7.
        flip_frame_byte(&p, 1, u64::from(frames[1].stored_len) / 2);
        let df = DiffFile::open(&p).unwrap();
        let e = df.verify(&Job::new()).unwrap_err();
        assert!(
            matches!(
                e,
                DiffError::Frame {
                    frame: 1,
                    problem: FrameProblem::StoredChecksum,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("checksum mismatch in the data"),
            "{e}"
        );
        refused_everywhere(&f, &p, |e| matches!(e, DiffError::Frame { frame: 1, .. }));
        // One block is read by decoding its own frame only: frame 0 still reads.
        let mut blk = vec![0u8; BS as usize];
        df.read_stored(0, &mut blk).unwrap();
        assert_eq!(blk, text(BS as usize, 7));
        if codec == Codec::Zstd {
            let e = df.read_stored(5 * BS, &mut blk).unwrap_err();
            assert!(matches!(e, DiffError::Frame { frame: 1, .. }), "{e}");
        }
    }
}

/// Rewrites `p`'s frame index and trailer: `edit` changes the frames, `patch` the encoded
/// entries; the index checksum and the trailer are recomputed, so only the change is wrong.
fn rewrite_index(p: &Path, edit: impl FnOnce(&mut Vec<Frame>), patch: impl FnOnce(&mut [u8])) {
    let df = DiffFile::open(p).unwrap();
    let mut frames = df.frames().to_vec();
    let b = std::fs::read(p).unwrap();
    let mut t = v2::Trailer::decode(&b[b.len() - v2::TRAILER_LEN as usize..]).unwrap();
    let index_at = (df.header.data_offset() + t.stored_len) as usize;
    edit(&mut frames);
    let mut index: Vec<u8> = frames.iter().flat_map(v2::encode_entry).collect();
    patch(&mut index);
    t.frames = frames.len() as u64;
    t.index_crc = crc32c::crc32c(&index);
    std::fs::write(p, [&b[..index_at], &index[..], &t.encode()[..]].concat()).unwrap();
}

#[test]
fn truncated_and_rewritten_indexes_are_refused() {
    let f = Fixture::new(SIZE);
    let (d, _) = cut_disk(&f);
    let good = f.path("good.diff");
    d.export_with(1, &good, None, &with_frames(Compression::Zstd(3), 8))
        .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let case = |name: &str, b: &[u8]| {
        let p = f.path(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let err = |p: &Path| match DiffFile::open(p) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    };
    // Cut anywhere in the index or trailer: the trailer is gone.
    for cut in [1usize, 39, 41, 64 * 3 + 7] {
        let p = case("cut.diff", &bytes[..bytes.len() - cut]);
        assert!(matches!(err(&p), DiffError::NoTrailer), "cut {cut}");
        refused_everywhere(&f, &p, |e| matches!(e, DiffError::NoTrailer));
    }
    // The trailer kept but an entry cut out from before it: the length is wrong.
    let t_at = bytes.len() - v2::TRAILER_LEN as usize;
    let p = case(
        "short-index.diff",
        &[&bytes[..t_at - 64], &bytes[t_at..]].concat(),
    );
    assert!(matches!(err(&p), DiffError::Length { .. }), "{}", err(&p));
    // A flipped index byte: the index checksum.
    let mut b = bytes.clone();
    b[t_at - 10] ^= 1;
    let p = case("flip-index.diff", &b);
    assert!(matches!(err(&p), DiffError::Checksum("frame index")));
    // The last frame dropped, trailer and checksum made consistent: data left uncovered.
    let p = case("fewer.diff", &bytes);
    rewrite_index(
        &p,
        |fr| {
            fr.pop();
        },
        |_| {},
    );
    let e = err(&p);
    assert!(
        matches!(e, DiffError::Length { .. } | DiffError::Index(_)),
        "{e}"
    );
    // Two frames swapped: not contiguous.
    let p = case("swap.diff", &bytes);
    rewrite_index(&p, |fr| fr.swap(0, 1), |_| {});
    assert!(matches!(err(&p), DiffError::Index(_)), "{}", err(&p));
    // A data entry marked a reference (it stores data, not checksums), an unknown kind, a
    // future codec, reserved bytes.
    for (at, v, unsupported) in [
        (0usize, 1u8, false),
        (0, 2, true),
        (1, 7, true),
        (2, 1, false),
        (45, 1, false),
    ] {
        let p = case("kind.diff", &bytes);
        rewrite_index(&p, |_| {}, |ix| ix[64 + at] = v);
        match err(&p) {
            DiffError::Unsupported(_) if unsupported => {}
            DiffError::Index(_) if !unsupported => {}
            e => panic!("byte {at} = {v}: {e}"),
        }
    }
    // A frame count past what the data could need, with a file long enough to hold it.
    let p = case("many.diff", &bytes);
    rewrite_index(
        &p,
        |fr| fr.extend(std::iter::repeat_n(fr[0], 100_000)),
        |_| {},
    );
    assert!(matches!(err(&p), DiffError::Index(_)), "{}", err(&p));
}

#[test]
fn a_frame_that_decompresses_to_another_size_is_refused() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &text(6 * BS as usize, 5)).unwrap();
    d.cut(false).unwrap();
    let p = f.path("g.diff");
    // Frames of up to 4 blocks: 4 + 2. The index is made to say 3 + 3 (which tiles the data).
    d.export_with(1, &p, None, &with_frames(Compression::Zstd(3), 4))
        .unwrap();
    let df = DiffFile::open(&p).unwrap();
    assert_eq!(df.frames().len(), 2);
    assert!(df.frames().iter().all(|f| f.codec == Codec::Zstd));
    rewrite_index(
        &p,
        |fr| {
            fr[0].raw_len = 3 * BS as u32;
            fr[1].raw_offset = 3 * BS;
            fr[1].raw_len = 3 * BS as u32;
        },
        |_| {},
    );
    let df = DiffFile::open(&p).unwrap();
    let size = |e: &DiffError| {
        matches!(
            e,
            DiffError::Frame {
                frame: 0,
                problem: FrameProblem::Size {
                    expected: 12288,
                    found: 16384
                },
                ..
            }
        )
    };
    let e = df.verify(&Job::new()).unwrap_err();
    assert!(size(&e), "{e}");
    let mut blk = vec![0u8; BS as usize];
    assert!(size(&df.read_stored(0, &mut blk).unwrap_err()));
    refused_everywhere(&f, &p, size);
}

#[test]
fn write_options_are_checked() {
    let f = Fixture::new(SIZE);
    let (d, _) = cut_disk(&f);
    let bad = [
        WriteOptions {
            compression: Compression::Zstd(3),
            ..v1()
        },
        WriteOptions {
            version: 3,
            ..WriteOptions::default()
        },
        WriteOptions {
            frame_size: 6000,
            ..WriteOptions::default()
        },
        WriteOptions {
            frame_size: 128 << 20,
            ..WriteOptions::default()
        },
        WriteOptions {
            threads: 0,
            ..WriteOptions::default()
        },
    ];
    for (i, o) in bad.iter().enumerate() {
        let p = f.path(&format!("bad{i}.diff"));
        match d.export_with(1, &p, None, o) {
            Err(BlockError::Diff(DiffError::Options(_))) => {}
            r => panic!("{o:?}: {:?}", r.map(|_| ())),
        }
        assert!(!p.exists());
    }
}

#[test]
fn hostile_counts_are_refused_before_anything_is_read_from_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("h.diff");
    // 2^25 dirty blocks of 512 bytes in 512-byte chunks: 2^25 chunks, a 128 MiB table.
    let h = diff::DiffHeader {
        version: VERSION_1,
        geometry: Geometry::new(1 << 40, 512).unwrap(),
        generation: 1,
        id: Uuid::from_u128(1),
        parent: Uuid::nil(),
        dirty_blocks: 1 << 25,
        zero_blocks: 0,
        dirty_bitmap_len: 100,
        zero_bitmap_len: 8,
        frame_size: 512,
    };
    std::fs::write(&p, h.encode()).unwrap();
    let e = DiffFile::open(&p).err().expect("opened");
    assert!(
        matches!(&e, DiffError::Corrupt(m) if m.contains("chunks")),
        "{e}"
    );
    // Version 2: a trailer that claims more frames than the limit, or than the data needs.
    let h2 = diff::DiffHeader {
        version: VERSION,
        frame_size: 1 << 20,
        ..h
    };
    for frames in [v2::MAX_FRAMES + 1, (1 << 25) + 1, 3] {
        let t = v2::Trailer {
            stored_len: 0,
            frames,
            bitmaps_crc: 0,
            index_crc: 0,
        };
        let f = std::fs::File::create(&p).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&h2.encode(), 0).unwrap();
        // A sparse file as long as the trailer says, so only the counts can refuse it.
        let len = h2.data_offset() + frames * v2::ENTRY_LEN + v2::TRAILER_LEN;
        f.write_all_at(&t.encode(), len - v2::TRAILER_LEN).unwrap();
        let e = DiffFile::open(&p).err().expect("opened");
        assert!(matches!(e, DiffError::Index(_)), "{frames} frames: {e}");
    }
    // A bitmap length no bitmap of the device can have.
    let mut big = h2.clone();
    big.dirty_bitmap_len = 1 << 40;
    std::fs::write(&p, big.encode()).unwrap();
    let e = DiffFile::open(&p).err().expect("opened");
    assert!(
        matches!(&e, DiffError::Corrupt(m) if m.contains("bitmap")),
        "{e}"
    );
}
