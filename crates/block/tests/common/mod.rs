#![allow(dead_code)]
//! Shared helpers: a temp dir with a non-zero base image and a disk over it.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use vsnap_block::{Disk, DiskOptions};

pub const BS: u32 = 4096;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub base_bytes: Vec<u8>,
}

/// Deterministic non-zero pattern: byte i of block b.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8) | 1 ^ seed)
        .map(|b| if b == 0 { 0x5a } else { b })
        .collect()
}

impl Fixture {
    pub fn new(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        let base_bytes = pattern(size, 0x33);
        std::fs::write(&base, &base_bytes).unwrap();
        Self {
            dir,
            base,
            base_bytes,
        }
    }

    pub fn opts(&self) -> DiskOptions {
        let mut o = DiskOptions::new(self.dir.path().join("state"));
        o.base = Some(self.base.clone());
        o.block_size = BS;
        o
    }

    pub fn disk(&self) -> Disk {
        Disk::open(&self.opts()).unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn read_all(d: &Disk) -> Vec<u8> {
    let mut v = vec![0u8; d.geometry().size as usize];
    d.read(0, &mut v).unwrap();
    v
}

pub fn read(d: &Disk, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.read(off, &mut v).unwrap();
    v
}

pub fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

pub fn write_file_at(p: &Path, data: &[u8], off: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
}

/// Asserts equal bytes, reporting the first difference instead of dumping both buffers.
#[track_caller]
pub fn assert_bytes(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "bytes differ first at offset {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Reads the whole virtual disk of a qcow2 overlay written by vsnap (version 3, no
/// compression, no encryption) over its raw backing image `backing`: data clusters from the
/// overlay, zero clusters as zeros, unallocated ones from the backing image. An independent
/// reading of what qemu would show, for tests that run without qemu-img.
pub fn read_qcow2(overlay: &Path, backing: &[u8]) -> Vec<u8> {
    let q = std::fs::read(overlay).unwrap();
    let be32 = |o: usize| u32::from_be_bytes(q[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(q[o..o + 8].try_into().unwrap());
    assert_eq!(&q[..4], b"QFI\xfb");
    assert_eq!(be32(4), 3);
    let cluster = 1usize << be32(20);
    let size = be64(24) as usize;
    let (l1_size, l1_off) = (be32(36) as usize, be64(40) as usize);
    let per_l2 = cluster / 8;
    let offset_mask = 0x00ff_ffff_ffff_fe00u64;
    let mut out = backing.to_vec();
    out.resize(size, 0);
    for c in 0..size.div_ceil(cluster) {
        let (l1i, l2i) = (c / per_l2, c % per_l2);
        assert!(l1i < l1_size, "cluster {c} past the L1 table");
        let l2 = (be64(l1_off + 8 * l1i) & offset_mask) as usize;
        if l2 == 0 {
            continue;
        }
        let e = be64(l2 + 8 * l2i);
        let (start, end) = (c * cluster, ((c + 1) * cluster).min(size));
        if e & 1 != 0 {
            out[start..end].fill(0);
        } else if e & offset_mask != 0 {
            let at = (e & offset_mask) as usize;
            out[start..end].copy_from_slice(&q[at..at + (end - start)]);
        }
    }
    out
}
