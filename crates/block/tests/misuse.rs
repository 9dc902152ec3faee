//! The state directory handled carelessly: two daemons, a chain missing its first diff, a base
//! that shrank or was replaced, a deleted bitmap, an export killed half-way.

mod common;

use common::*;
use vsnap_block::diff::{self, ChainRoot, DiffError};
use vsnap_block::{BlockError, Disk, Job};

const SIZE: usize = 64 * BS as usize;

#[test]
fn a_second_writer_or_a_reader_beside_a_writer_is_refused() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &[1u8; 4096]).unwrap();
    d.flush().unwrap();
    let err = Disk::open(&f.opts()).err().expect("second writer refused");
    assert!(matches!(err, BlockError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("in use") && msg.contains(&std::process::id().to_string()),
        "{msg}"
    );
    let mut ro = f.opts();
    ro.readonly = true;
    assert!(matches!(Disk::open(&ro), Err(BlockError::Locked { .. })));
    // The first one is unharmed, and once it is gone the directory opens again.
    assert_eq!(read(&d, 0, 4096), vec![1u8; 4096]);
    d.close().unwrap();
    drop(d);
    let r1 = Disk::open(&ro).unwrap();
    let r2 = Disk::open(&ro).unwrap();
    assert!(
        matches!(Disk::open(&f.opts()), Err(BlockError::Locked { .. })),
        "no writer while readers read"
    );
    drop((r1, r2));
    assert_eq!(read(&f.disk(), 0, 4096), vec![1u8; 4096]);
}

/// g1 on the base, g2 on g1; returns their paths.
fn two_diffs(f: &Fixture) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = f.disk();
    d.write(0, &[1u8; 4096]).unwrap();
    d.cut(false).unwrap();
    d.write(4096, &[2u8; 4096]).unwrap();
    d.cut(false).unwrap();
    let (g1, g2) = (f.path("g1.diff"), f.path("g2.diff"));
    d.export(1, &g1, None).unwrap();
    d.export(2, &g2, None).unwrap();
    (g1, g2)
}

#[test]
fn a_chain_missing_its_first_diff_is_refused() {
    let f = Fixture::new(SIZE);
    let (g1, g2) = two_diffs(&f);
    let out = f.path("out.img");
    let err = diff::apply(
        Some(&f.base),
        std::slice::from_ref(&g2),
        &out,
        false,
        &Job::new(),
    )
    .unwrap_err();
    assert!(matches!(err, DiffError::ForeignParent { .. }), "{err}");
    assert!(!out.exists());
    let qcow = f.path("g2.qcow2");
    let err = diff::qcow2::to_qcow2(&g2, &f.base, &qcow, false, &Job::new()).unwrap_err();
    assert!(matches!(err, DiffError::ForeignParent { .. }), "{err}");
    assert!(!qcow.exists());

    let mut o = f.opts();
    o.state_dir = f.path("state2");
    o.chain = vec![g2.clone()];
    let err = Disk::open(&o).err().expect("chain without g1 refused");
    assert!(
        matches!(err, BlockError::Diff(DiffError::ForeignParent { .. })),
        "{err}"
    );
    // The whole chain is fine; so is the partial one when the caller vouches for the base.
    diff::apply(
        Some(&f.base),
        &[g1.clone(), g2.clone()],
        &out,
        false,
        &Job::new(),
    )
    .unwrap();
    let full = std::fs::read(&out).unwrap();
    let g1_img = f.path("g1.img");
    diff::apply(Some(&f.base), &[g1], &g1_img, false, &Job::new()).unwrap();
    let out2 = f.path("out2.img");
    diff::apply_to(
        Some(&g1_img),
        std::slice::from_ref(&g2),
        &out2,
        false,
        ChainRoot::Foreign,
        &Job::new(),
    )
    .unwrap();
    assert_bytes(&std::fs::read(&out2).unwrap(), &full);
    o.base = Some(g1_img);
    o.chain_root = ChainRoot::Foreign;
    assert_bytes(&read_all(&Disk::open(&o).unwrap()), &full);
}

#[test]
fn a_replaced_chain_diff_is_refused() {
    let f = Fixture::new(SIZE);
    let (g1, _) = two_diffs(&f);
    let mut o = f.opts();
    o.state_dir = f.path("state2");
    o.chain = vec![g1.clone()];
    Disk::open(&o).unwrap().close().unwrap();
    // Another diff on the base, put where g1 was.
    let d = Disk::open(&{
        let mut o = f.opts();
        o.state_dir = f.path("state3");
        o
    })
    .unwrap();
    d.write(0, &[9u8; 4096]).unwrap();
    d.cut(false).unwrap();
    std::fs::remove_file(&g1).unwrap();
    d.export(1, &g1, None).unwrap();
    o.chain.clear();
    let err = Disk::open(&o).err().expect("replaced chain refused");
    assert!(err.to_string().contains("lies on"), "{err}");
}

#[test]
fn a_shrunk_grown_or_replaced_base_is_refused() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &[5u8; 4096]).unwrap();
    d.close().unwrap();
    drop(d);
    let base = std::fs::OpenOptions::new()
        .write(true)
        .open(&f.base)
        .unwrap();
    for (what, len) in [("shrunk", SIZE - 4096), ("grown", SIZE + 4096)] {
        base.set_len(len as u64).unwrap();
        let err = Disk::open(&f.opts()).err().expect(what);
        assert!(
            matches!(err, BlockError::BaseChanged { .. }),
            "{what}: {err}"
        );
        assert!(err.to_string().contains("bytes"), "{err}");
    }
    base.set_len(SIZE as u64).unwrap();
    std::fs::write(&f.base, &f.base_bytes).unwrap();
    // Same size, one byte different in the middle of the first MiB.
    write_file_at(&f.base, &[!f.base_bytes[SIZE / 2]], (SIZE / 2) as u64);
    let err = Disk::open(&f.opts()).err().expect("replaced");
    assert!(err.to_string().contains("content changed"), "{err}");
    // A copy of the right image under the same path (new inode, new mtime) is the same base.
    let copy = f.path("copy.img");
    std::fs::write(&copy, &f.base_bytes).unwrap();
    std::fs::rename(&copy, &f.base).unwrap();
    let d = f.disk();
    assert_eq!(read(&d, 0, 4096), vec![5u8; 4096]);
}

#[test]
fn a_large_base_is_fingerprinted_by_samples_that_catch_a_change_inside() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("big.img");
    let size = 64u64 << 20;
    let f = std::fs::File::create(&base).unwrap();
    f.set_len(size).unwrap();
    let id = vsnap_block::BaseIdentity::of(&base).unwrap();
    // Sample 10 of 64 lies at 1 MiB + span * 10 / 63.
    let span = size - (2 << 20) - 4096;
    let off = (1 << 20) + span * 10 / 63 + 100;
    write_file_at(&base, &[1], off);
    let changed = vsnap_block::BaseIdentity::of(&base).unwrap();
    assert_eq!(changed.size, id.size);
    assert_ne!(changed.fingerprint, id.fingerprint);
}

#[test]
fn a_missing_bitmap_is_an_error_not_an_empty_layer() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &[5u8; 4096]).unwrap();
    d.cut(false).unwrap();
    d.close().unwrap();
    drop(d);
    for stem in ["layer-000001", "layer-000002"] {
        let bm = f.path(&format!("state/{stem}.bitmap"));
        let saved = std::fs::read(&bm).unwrap();
        std::fs::remove_file(&bm).unwrap();
        let err = Disk::open(&f.opts()).err().expect("missing bitmap refused");
        assert!(err.to_string().contains("bitmap file is missing"), "{err}");
        std::fs::write(&bm, saved).unwrap();
    }
    assert_eq!(read(&f.disk(), 0, 4096), vec![5u8; 4096]);
}

#[test]
fn start_removes_the_temporary_files_of_its_interrupted_exports_only() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &pattern(8 * 4096, 1)).unwrap();
    d.cut(false).unwrap();
    let target = f.path("g1.diff");
    d.start_export(1, &target).unwrap();
    // What a kill during the export leaves: its temporary file next to the target.
    let partial = f.path(".g1.diff.vsnap-partial-4242-0123abcd");
    std::fs::write(&partial, vec![7u8; 4096]).unwrap();
    // Someone else's: another target's partial file, and a file that merely looks alike.
    let other = f.path(".g7.diff.vsnap-partial-1-2");
    std::fs::write(&other, b"x").unwrap();
    let lookalike = f.path("g1.diff.vsnap-partial-1");
    std::fs::write(&lookalike, b"x").unwrap();
    drop(d); // as if killed: no close
    let d = f.disk();
    assert!(!partial.exists(), "interrupted export's temp file removed");
    assert!(other.exists() && lookalike.exists(), "others' files kept");
    assert!(std::fs::read_dir(f.path("state")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".pending")));
    // The generation can be exported now.
    d.export(1, &target, None).unwrap();
}

#[test]
fn a_state_dir_of_format_1_is_read_and_converted() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &[3u8; 4096]).unwrap();
    d.cut(false).unwrap();
    d.write(4096, &[4u8; 4096]).unwrap();
    let want = read_all(&d);
    d.close().unwrap();
    drop(d);
    // Format 1 listed the layers in the manifest and had no meta files.
    let state = f.path("state");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("vsnap-state.json")).unwrap()).unwrap();
    let mut layers = Vec::new();
    for stem in ["layer-000001", "layer-000002"] {
        let meta = state.join(format!("{stem}.meta"));
        layers.push(
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&meta).unwrap()).unwrap(),
        );
        std::fs::remove_file(meta).unwrap();
    }
    m["format"] = 1.into();
    m["layers"] = layers.into();
    m.as_object_mut().unwrap().remove("base_identity");
    std::fs::write(state.join("vsnap-state.json"), m.to_string()).unwrap();
    let mut ro = f.opts();
    ro.readonly = true;
    assert_bytes(&read_all(&Disk::open(&ro).unwrap()), &want);
    let d = f.disk();
    assert_bytes(&read_all(&d), &want);
    drop(d);
    assert!(state.join("layer-000001.meta").exists());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("vsnap-state.json")).unwrap()).unwrap();
    assert_eq!(m["format"], 2);
    assert!(
        m.get("layers").is_none() && m.get("base_identity").is_some(),
        "{m}"
    );
    assert_bytes(&read_all(&f.disk()), &want);
}

#[test]
fn an_export_that_cannot_be_run_is_not_left_running() {
    let f = Fixture::new(SIZE);
    let d = f.disk();
    d.write(0, &[1u8; 4096]).unwrap();
    d.cut(false).unwrap();
    let p = f.path("g1.diff");
    d.start_export(1, &p).unwrap();
    assert_eq!(d.info().layers[1].export, vsnap_block::ExportPhase::Running);
    // What the API does when it cannot spawn the export's thread.
    d.abort_export(1, "cannot start the export thread");
    let l = &d.info().layers[1];
    assert_eq!(l.export, vsnap_block::ExportPhase::Failed);
    assert!(l.export_error.as_deref().unwrap().contains("cannot start"));
    assert!(std::fs::read_dir(f.path("state")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".pending")));
    d.export(1, &p, None).unwrap();
    assert_eq!(d.info().layers[1].export, vsnap_block::ExportPhase::Done);
}
