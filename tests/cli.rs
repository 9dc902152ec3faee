//! The `vsnap` command line against real files: diff tools, bad input, qcow2 export checked by
//! qemu-img, image creation.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vsnap_block::{Disk, DiskOptions};

fn vsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vsnap"))
        .args(args)
        .output()
        .expect("run vsnap")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Chain {
    dir: tempfile::TempDir,
    base: PathBuf,
    diffs: Vec<PathBuf>,
    /// The disk at each cut.
    images: Vec<Vec<u8>>,
}

/// A base image and two chained diffs with dirty, zero and untouched blocks.
fn chain(block_size: u32, size: usize) -> Chain {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&base, &bytes).unwrap();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.base = Some(base.clone());
    o.block_size = block_size;
    let d = Disk::open(&o).unwrap();
    let mut diffs = Vec::new();
    let mut images = Vec::new();
    let read_all = |d: &Disk| {
        let mut v = vec![0u8; size];
        d.read(0, &mut v).unwrap();
        v
    };
    d.write(0, &vec![0xaa; 8192]).unwrap();
    d.write_zeroes(65536, 3 * 65536).unwrap();
    d.write(5 << 20, &vec![0x55; 1 << 20]).unwrap();
    d.discard(7 << 20, 1 << 20).unwrap();
    for round in 0..2 {
        let c = d.cut(false).unwrap();
        let p = dir.path().join(format!("g{}.diff", c.generation));
        d.export(c.generation, &p, None).unwrap();
        diffs.push(p);
        images.push(read_all(&d));
        if round == 0 {
            d.write(4096, &vec![0xbb; 4096]).unwrap();
            d.write(0, &vec![0u8; 4096]).unwrap();
            d.write_zeroes(6 << 20, 512 << 10).unwrap();
            d.write((size - 4096) as u64, &vec![0xcc; 4096]).unwrap();
        }
    }
    d.close().unwrap();
    Chain {
        dir,
        base,
        diffs,
        images,
    }
}

fn assert_fails(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, got success");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "stderr {err:?} lacks {needle:?}"
    );
}

#[test]
fn inspect_apply_squash() {
    let c = chain(4096, 16 << 20);
    let out = vsnap(&["diff", "inspect", "--json", s(&c.diffs[0])]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dirty_blocks"], 2 + 256);
    assert_eq!(v["zero_blocks"], 3 * 16 + 256);
    assert_eq!(v["data_bytes"], (2 + 256) * 4096);
    assert_eq!(v["checksums"], "ok");
    let text = vsnap(&["diff", "inspect", s(&c.diffs[1])]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("parent:"));

    let img = c.dir.path().join("applied.img");
    let out = vsnap(&[
        "diff",
        "apply",
        "--base",
        s(&c.base),
        "--out",
        s(&img),
        s(&c.diffs[0]),
        s(&c.diffs[1]),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&img).unwrap() == c.images[1],
        "applied image differs"
    );

    let sq = c.dir.path().join("sq.diff");
    assert!(vsnap(&[
        "diff",
        "squash",
        "--out",
        s(&sq),
        s(&c.diffs[0]),
        s(&c.diffs[1])
    ])
    .status
    .success());
    let img2 = c.dir.path().join("sq.img");
    assert!(vsnap(&[
        "diff",
        "apply",
        "--base",
        s(&c.base),
        "--out",
        s(&img2),
        s(&sq)
    ])
    .status
    .success());
    assert!(
        std::fs::read(&img2).unwrap() == c.images[1],
        "squashed image differs"
    );
}

#[test]
fn bad_diffs_are_refused_and_leave_nothing() {
    let c = chain(4096, 16 << 20);
    let out_img = c.dir.path().join("out.img");
    let bytes = std::fs::read(&c.diffs[0]).unwrap();
    let bad = |name: &str, b: &[u8]| {
        let p = c.dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    let mut magic = bytes.clone();
    magic[0] = b'X';
    // A byte in the middle of the stored data (compressed frames by default), wherever the
    // format puts it.
    let info: serde_json::Value =
        serde_json::from_slice(&vsnap(&["diff", "inspect", "--json", s(&c.diffs[0])]).stdout)
            .unwrap();
    let data_at = |k: &str| info[k].as_u64().unwrap() as usize;
    let mut flipped = bytes.clone();
    flipped[data_at("data_offset") + data_at("stored_bytes") / 2] ^= 0x01;
    let mut flipped_bitmap = bytes.clone();
    flipped_bitmap[130] ^= 0x01;
    let cases: Vec<(PathBuf, &str)> = vec![
        (bad("magic.diff", &magic), "bad magic"),
        (bad("trunc.diff", &bytes[..bytes.len() - 100]), "truncated"),
        (bad("short.diff", &bytes[..60]), "truncated"),
        (bad("flip.diff", &flipped), "checksum mismatch in the data"),
        (
            bad("flipbm.diff", &flipped_bitmap),
            "checksum mismatch in the bitmaps",
        ),
    ];
    for (p, msg) in &cases {
        let out = vsnap(&[
            "diff",
            "apply",
            "--base",
            s(&c.base),
            "--out",
            s(&out_img),
            s(p),
        ]);
        assert_fails(&out, msg);
        assert!(!out_img.exists(), "output left behind for {}", p.display());
        assert_fails(&vsnap(&["diff", "inspect", s(p)]), msg);
    }
    // Wrong order.
    let out = vsnap(&[
        "diff",
        "apply",
        "--base",
        s(&c.base),
        "--out",
        s(&out_img),
        s(&c.diffs[1]),
        s(&c.diffs[0]),
    ]);
    assert_fails(&out, "chain out of order");
    assert!(!out_img.exists());
    // Block-size and device-size mismatches.
    let other_bs = chain(8192, 16 << 20);
    let out = vsnap(&[
        "diff",
        "squash",
        "--out",
        s(&out_img),
        s(&c.diffs[0]),
        s(&other_bs.diffs[1]),
    ]);
    assert_fails(&out, "block size mismatch");
    let other_size = chain(4096, 12 << 20);
    let out = vsnap(&[
        "diff",
        "apply",
        "--out",
        s(&out_img),
        s(&c.diffs[0]),
        s(&other_size.diffs[1]),
    ]);
    assert_fails(&out, "device size mismatch");
    let out = vsnap(&[
        "diff",
        "apply",
        "--base",
        s(&other_size.base),
        "--out",
        s(&out_img),
        s(&c.diffs[0]),
    ]);
    assert_fails(&out, "base image size mismatch");
    assert!(!out_img.exists());
    // An existing output is not overwritten without --force.
    std::fs::write(&out_img, b"keep").unwrap();
    assert_fails(
        &vsnap(&[
            "diff",
            "apply",
            "--base",
            s(&c.base),
            "--out",
            s(&out_img),
            s(&c.diffs[0]),
        ]),
        "exists",
    );
    assert_eq!(std::fs::read(&out_img).unwrap(), b"keep");
    assert!(vsnap(&[
        "diff",
        "apply",
        "--force",
        "--base",
        s(&c.base),
        "--out",
        s(&out_img),
        s(&c.diffs[0])
    ])
    .status
    .success());
    assert!(
        std::fs::read(&out_img).unwrap() == c.images[0],
        "forced apply differs"
    );
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed (make deps)")
}

#[test]
fn qcow2_export_passes_qemu_img_check_and_compare() {
    for bs in [4096u32, 65536, 512] {
        let c = chain(bs, 16 << 20);
        let q1 = c.dir.path().join("g1.qcow2");
        let q2 = c.dir.path().join("g2.qcow2");
        let out = vsnap(&[
            "diff",
            "to-qcow2",
            "--backing",
            s(&c.base),
            "--out",
            s(&q1),
            s(&c.diffs[0]),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // g2 lies on g1, not on the base: its overlay over q1 needs the parent vouched for.
        let g2_over = |extra: &[&str]| {
            let mut args = vec!["diff", "to-qcow2", "--backing", s(&q1), "--out", s(&q2)];
            args.extend_from_slice(extra);
            args.push(s(&c.diffs[1]));
            vsnap(&args)
        };
        assert_fails(&g2_over(&[]), "not on the base image");
        assert!(!q2.exists());
        let out = g2_over(&["--allow-foreign-parent"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for q in [&q1, &q2] {
            let chk = qemu_img(&["check", s(q)]);
            assert!(
                chk.status.success(),
                "qemu-img check {}: {}{}",
                q.display(),
                String::from_utf8_lossy(&chk.stdout),
                String::from_utf8_lossy(&chk.stderr)
            );
        }
        for (i, q) in [&q1, &q2].into_iter().enumerate() {
            let raw = c.dir.path().join(format!("want{i}.img"));
            std::fs::write(&raw, &c.images[i]).unwrap();
            let cmp = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(q)]);
            assert!(
                cmp.status.success(),
                "bs {bs}: qemu-img compare: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
        // Zero blocks are zero clusters and untouched blocks unallocated: the map says so.
        let map = qemu_img(&["map", "--output=json", s(&q1)]);
        let v: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let zero_in_overlay = v
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["zero"] == true && e["depth"] == 0);
        let from_backing = v
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["depth"] == 1 && e["data"] == true);
        assert!(zero_in_overlay && from_backing, "map: {v}");
    }
}

#[test]
fn image_create_and_info() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.img");
    for (mode, min_alloc, max_alloc) in [
        ("off", 0u64, 0u64),
        ("falloc", 8 << 20, 9 << 20),
        ("full", 8 << 20, 9 << 20),
    ] {
        let out = vsnap(&[
            "image",
            "create",
            s(&p),
            "--size",
            "8M",
            "--prealloc",
            mode,
            "--force",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 8 << 20);
        let alloc = m.blocks() * 512;
        assert!((min_alloc..=max_alloc).contains(&alloc), "{mode}: {alloc}");
        let info = vsnap(&["image", "info", "--json", s(&p)]);
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(
            (
                v["capacity"].as_u64(),
                v["allocated"].as_u64(),
                v["format"].as_str()
            ),
            (Some(8 << 20), Some(alloc), Some("raw"))
        );
    }
    assert_fails(
        &vsnap(&["image", "create", s(&p), "--size", "1M"]),
        "exists",
    );
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 << 20);
    assert_fails(
        &vsnap(&[
            "image",
            "create",
            s(&dir.path().join("x")),
            "--size",
            "1000",
        ]),
        "multiple of 512",
    );
}

#[test]
fn image_create_cancels_cleanly_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.img");
    let child = Command::new(env!("CARGO_BIN_EXE_vsnap"))
        .args([
            "image",
            "create",
            s(&p),
            "--size",
            "64G",
            "--prealloc",
            "full",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert!(!p.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no temporary file left"
    );
}

#[test]
fn materialize_writes_the_disk_as_last_seen() {
    let c = chain(4096, 16 << 20);
    let out = c.dir.path().join("m.img");
    let r = vsnap(&[
        "materialize",
        "--state-dir",
        s(&c.dir.path().join("state")),
        "--out",
        s(&out),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        std::fs::read(&out).unwrap() == *c.images.last().unwrap(),
        "materialized image differs"
    );
}

#[test]
fn fs_refuses_bad_options_before_serving() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("fs.sock");
    let long_tag = "t".repeat(37);
    let out = vsnap(&[
        "fs",
        "--socket-path",
        s(&sock),
        "--shared-dir",
        s(t.path()),
        "--tag",
        &long_tag,
    ]);
    assert_fails(&out, "--tag is longer than 36 bytes");
    let missing = t.path().join("missing");
    let out = vsnap(&["fs", "--socket-path", s(&sock), "--shared-dir", s(&missing)]);
    assert_fails(&out, "shared dir");
    let out = vsnap(&["fs", "--shared-dir", s(t.path())]);
    assert_fails(&out, "--socket-path");
    assert!(!sock.exists());
}

#[test]
fn image_compare_counts_the_data_a_diff_needs() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let mut data = vec![7u8; 4 * 4096];
    std::fs::write(&a, &data).unwrap();
    data[5000] = 8; // block 1 changes
    data[3 * 4096..].fill(0); // block 3 becomes zero
    std::fs::write(&b, &data).unwrap();
    let out = vsnap(&["image", "compare", "--base", s(&a), s(&b), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["changed_blocks"], 2);
    assert_eq!(v["changed_to_zero_blocks"], 1);
    assert_eq!(v["min_data_bytes"], 4096);
}
