//! The index's files. Each is written under a temporary name, fsynced and renamed into place
//! (`AtomicFile`), so a crash leaves the old file or the new one, and carries checksums of its
//! header and records, so damage is found and the file rebuilt rather than used.
//!
//! Layout, little-endian: a 64-byte header, then `count` fixed-size records.
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | 8 bytes | magic: `VSNAPHSL` (a list) or `VSNAPHSB` (the base) |
//! | 8 | u32 | version, 1 |
//! | 12 | u32 | block size |
//! | 16 | u64 | device blocks |
//! | 24 | 16 bytes | key: the layer's or chain diff's id, or the base identity's digest |
//! | 40 | u64 | records |
//! | 48 | u32 | CRC-32C of the records |
//! | 52 | 8 bytes | reserved, zero |
//! | 60 | u32 | CRC-32C of bytes 0..60 |
//!
//! A list's records are `(u32 block, u64 hash)`, ascending blocks, each below the device's
//! blocks; the base's are one `u64 hash` per block of the device, in order.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{BlockError, IoContext, Result};
use crate::fsutil::AtomicFile;
use crate::geometry::Geometry;

const VERSION: u32 = 1;
const HEADER: usize = 64;

/// Which file: a sparse list of a layer's (or chain diff's) dirty blocks, or the base's array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    List,
    Base,
}

impl Kind {
    fn magic(self) -> &'static [u8; 8] {
        match self {
            Kind::List => b"VSNAPHSL",
            Kind::Base => b"VSNAPHSB",
        }
    }

    fn record_len(self) -> usize {
        match self {
            Kind::List => 12,
            Kind::Base => 8,
        }
    }
}

fn header(kind: Kind, g: Geometry, key: &[u8; 16], count: u64, crc: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(kind.magic());
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&g.block_size.to_le_bytes());
    h[16..24].copy_from_slice(&g.blocks().to_le_bytes());
    h[24..40].copy_from_slice(key);
    h[40..48].copy_from_slice(&count.to_le_bytes());
    h[48..52].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// Writes one index file; it appears at its path only on [`Writer::commit`].
pub(crate) struct Writer {
    kind: Kind,
    g: Geometry,
    key: [u8; 16],
    path: PathBuf,
    out: AtomicFile,
    w: BufWriter<File>,
    crc: u32,
    count: u64,
    next_block: u64,
}

impl Writer {
    pub fn create(path: &Path, kind: Kind, g: Geometry, key: [u8; 16]) -> Result<Self> {
        let ctx = || format!("create {}", path.display());
        let out = AtomicFile::create(path, true).ctx(ctx)?;
        let mut w = BufWriter::with_capacity(1 << 20, out.file().try_clone().ctx(ctx)?);
        // The header is written last, once the records and their checksum are known.
        w.write_all(&[0u8; HEADER]).ctx(ctx)?;
        Ok(Self {
            kind,
            g,
            key,
            path: path.to_owned(),
            out,
            w,
            crc: 0,
            count: 0,
            next_block: 0,
        })
    }

    /// Appends a list record: `block` must be above the last one.
    pub fn push(&mut self, block: u64, hash: u64) -> Result<()> {
        debug_assert_eq!(self.kind, Kind::List);
        if block < self.next_block || block >= self.g.blocks() {
            return Err(BlockError::Conflict(format!(
                "{}: block {block} out of order",
                self.path.display()
            )));
        }
        self.next_block = block + 1;
        let mut r = [0u8; 12];
        r[..4].copy_from_slice(&Geometry::idx(block).to_le_bytes());
        r[4..].copy_from_slice(&hash.to_le_bytes());
        self.record(&r)
    }

    /// Appends the base's hash of the next block.
    pub fn push_base(&mut self, hash: u64) -> Result<()> {
        debug_assert_eq!(self.kind, Kind::Base);
        self.record(&hash.to_le_bytes())
    }

    fn record(&mut self, r: &[u8]) -> Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, r);
        self.count += 1;
        self.w
            .write_all(r)
            .ctx(|| format!("write {}", self.path.display()))
    }

    pub fn commit(self) -> Result<()> {
        let ctx = || format!("write {}", self.path.display());
        if self.kind == Kind::Base && self.count != self.g.blocks() {
            return Err(BlockError::Conflict(format!(
                "{}: {} hashes for {} blocks",
                self.path.display(),
                self.count,
                self.g.blocks()
            )));
        }
        let h = header(self.kind, self.g, &self.key, self.count, self.crc);
        self.w.into_inner().map_err(|e| e.into_error()).ctx(ctx)?;
        self.out.file().write_all_at(&h, 0).ctx(ctx)?;
        self.out.commit().ctx(ctx)
    }
}

/// What reading an index file found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// Every record was handed out and the file checks.
    Valid,
    /// No such file.
    Absent,
    /// Not a valid file of this kind and key (say why): records handed out before this was
    /// found were hints like any other, and the file is to be rebuilt.
    Damaged(String),
}

/// An index file being read, record by record.
pub(crate) struct Reader {
    r: BufReader<File>,
    kind: Kind,
    blocks: u64,
    left: u64,
    index: u64,
    next_block: u64,
    crc: u32,
    expected_crc: u32,
    damage: Option<String>,
}

/// What opening an index file found.
pub(crate) enum Opened {
    Reader(Reader),
    Absent,
    Damaged(String),
}

/// Opens the `kind` file at `path` made for `g` and `key`, its header checked.
pub(crate) fn open(path: &Path, kind: Kind, g: Geometry, key: &[u8; 16]) -> Opened {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Opened::Absent,
        Err(e) => return Opened::Damaged(e.to_string()),
    };
    let damaged = |m: &str| Opened::Damaged(m.to_string());
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return Opened::Damaged(e.to_string()),
    };
    let mut h = [0u8; HEADER];
    if len < HEADER as u64 || file.read_exact_at(&mut h, 0).is_err() {
        return damaged("shorter than its header");
    }
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let count = u64::from_le_bytes(h[40..48].try_into().expect("8 bytes"));
    if crc32c::crc32c(&h[..60]) != u32_at(60) {
        return damaged("header checksum mismatch");
    }
    if h != header(kind, g, key, count, u32_at(48)) {
        return damaged("made for another disk, layer or version");
    }
    let rl = kind.record_len() as u64;
    let count_ok = match kind {
        Kind::List => count <= g.blocks(),
        Kind::Base => count == g.blocks(),
    };
    if !count_ok || Some(len) != count.checked_mul(rl).map(|n| n + HEADER as u64) {
        return damaged("record count does not match its length");
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    if r.seek_relative(HEADER as i64).is_err() {
        return damaged("unreadable");
    }
    Opened::Reader(Reader {
        r,
        kind,
        blocks: g.blocks(),
        left: count,
        index: 0,
        next_block: 0,
        crc: 0,
        expected_crc: u32_at(48),
        damage: None,
    })
}

impl Reader {
    /// The next record as (block, hash): a list's as stored, the base's as (position, hash).
    /// `None` at the end, or at damage (see [`Reader::status`]).
    pub fn next_record(&mut self) -> Option<(u64, u64)> {
        if self.left == 0 || self.damage.is_some() {
            return None;
        }
        let mut rec = [0u8; 12];
        let rec = &mut rec[..self.kind.record_len()];
        if self.r.read_exact(rec).is_err() {
            self.damage = Some("unreadable".into());
            return None;
        }
        self.left -= 1;
        self.crc = crc32c::crc32c_append(self.crc, rec);
        let out = match self.kind {
            Kind::List => {
                let b = u64::from(u32::from_le_bytes(rec[..4].try_into().expect("4 bytes")));
                if b < self.next_block || b >= self.blocks {
                    self.damage = Some("blocks out of order".into());
                    return None;
                }
                self.next_block = b + 1;
                (b, u64::from_le_bytes(rec[4..].try_into().expect("8 bytes")))
            }
            Kind::Base => (
                self.index,
                u64::from_le_bytes(rec[..].try_into().expect("8 bytes")),
            ),
        };
        self.index += 1;
        Some(out)
    }

    /// After [`Reader::next_record`] returned `None`: whether the whole file checked.
    pub fn status(&self) -> Status {
        match &self.damage {
            Some(m) => Status::Damaged(m.clone()),
            None if self.left > 0 => Status::Damaged("not read to its end".into()),
            None if self.crc != self.expected_crc => {
                Status::Damaged("record checksum mismatch".into())
            }
            None => Status::Valid,
        }
    }
}

/// Streams the records of the `kind` file at `path` made for `g` and `key` to `f` (see
/// [`Reader::next_record`]). Errors of `f` (a cancel) end it; anything wrong with the file is
/// [`Status::Damaged`].
pub(crate) fn read(
    path: &Path,
    kind: Kind,
    g: Geometry,
    key: &[u8; 16],
    f: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<Status> {
    let mut r = match open(path, kind, g, key) {
        Opened::Reader(r) => r,
        Opened::Absent => return Ok(Status::Absent),
        Opened::Damaged(m) => return Ok(Status::Damaged(m)),
    };
    while let Some((b, h)) = r.next_record() {
        f(b, h)?;
    }
    Ok(r.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(p: &Path, kind: Kind, g: Geometry, key: &[u8; 16]) -> (Status, Vec<(u64, u64)>) {
        let mut v = Vec::new();
        let s = read(p, kind, g, key, &mut |b, h| {
            v.push((b, h));
            Ok(())
        })
        .unwrap();
        (s, v)
    }

    #[test]
    fn lists_round_trip_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.hashes");
        let g = Geometry::new(1 << 20, 4096).unwrap();
        let key = [7u8; 16];
        assert_eq!(collect(&p, Kind::List, g, &key).0, Status::Absent);
        let mut w = Writer::create(&p, Kind::List, g, key).unwrap();
        for (b, h) in [(1, 10), (5, 50), (255, 2550)] {
            w.push(b, h).unwrap();
        }
        assert!(w.push(5, 1).is_err(), "out of order accepted");
        // Nothing at the path until the commit.
        assert!(!p.exists());
        w.commit().unwrap();
        let (s, v) = collect(&p, Kind::List, g, &key);
        assert_eq!((s, v), (Status::Valid, vec![(1, 10), (5, 50), (255, 2550)]));
        // Another key, geometry or kind: not this file.
        for (kind, g2, k) in [
            (Kind::List, g, [8u8; 16]),
            (Kind::List, Geometry::new(2 << 20, 4096).unwrap(), key),
            (Kind::Base, g, key),
        ] {
            assert!(matches!(collect(&p, kind, g2, &k).0, Status::Damaged(_)));
        }
        // Every flipped byte and every truncation is found.
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x20;
            std::fs::write(&p, &b).unwrap();
            assert!(
                matches!(collect(&p, Kind::List, g, &key).0, Status::Damaged(_)),
                "flip at {i} accepted"
            );
        }
        for n in [0, 10, HEADER, good.len() - 1] {
            std::fs::write(&p, &good[..n]).unwrap();
            assert!(matches!(
                collect(&p, Kind::List, g, &key).0,
                Status::Damaged(_)
            ));
        }
    }

    #[test]
    fn the_base_array_has_one_hash_per_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("base.hashes");
        let g = Geometry::new(3 * 4096 + 512, 4096).unwrap();
        let key = [1u8; 16];
        let mut w = Writer::create(&p, Kind::Base, g, key).unwrap();
        w.push_base(3).unwrap();
        w.push_base(0).unwrap();
        assert!(
            Writer::create(&p, Kind::Base, g, key)
                .unwrap()
                .commit()
                .is_err(),
            "a short array committed"
        );
        w.push_base(9).unwrap();
        w.push_base(4).unwrap();
        w.commit().unwrap();
        let (s, v) = collect(&p, Kind::Base, g, &key);
        assert_eq!(
            (s, v),
            (Status::Valid, vec![(0, 3), (1, 0), (2, 9), (3, 4)])
        );
    }
}
