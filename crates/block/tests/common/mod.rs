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
