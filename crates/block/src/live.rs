//! The live block states of a layer: two bits per block in a `MAP_SHARED` mapping of a file,
//! updated with the in-memory tracker before a request completes, so they live in the page
//! cache, which survives a crash of the process (kill -9, panic, OOM kill): no syscall, no
//! fsync per write. After a crash on the same boot they are the truth; after a reboot (power
//! loss, where unflushed pages may be gone) the last flushed bitmap is.
//!
//! File: a 4 KiB header (magic, version, blocks, the boot id it was written under, crc32c),
//! then `blocks.div_ceil(4)` bytes of states: 0 untouched, 1 dirty, 2 zero. The whole file is
//! allocated when created, so a store into the mapping never needs space (a write fault on a
//! full file system would be SIGBUS).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;

use roaring::RoaringBitmap;

use crate::fsutil;
use crate::tracker::{runs, BlockState, Tracker};

const MAGIC: &[u8; 8] = b"VSNAPLIV";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const HEADER_FIELDS: usize = 40;

fn code(s: BlockState) -> u8 {
    match s {
        BlockState::Untouched => 0,
        BlockState::Dirty => 1,
        BlockState::Zero => 2,
    }
}

/// The id of the running kernel's boot: equal ids mean the page cache of the writer survived.
pub fn boot_id() -> [u8; 16] {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| uuid::Uuid::parse_str(s.trim()).ok())
        .map_or([0; 16], |u| *u.as_bytes())
}

fn header(blocks: u64, boot: [u8; 16]) -> [u8; HEADER_FIELDS + 4] {
    let mut h = [0u8; HEADER_FIELDS + 4];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&blocks.to_le_bytes());
    h[24..40].copy_from_slice(&boot);
    let crc = crc32c::crc32c(&h[..HEADER_FIELDS]);
    h[HEADER_FIELDS..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Reads the states a live file holds, if it was written under this boot for `blocks` blocks;
/// `Ok(None)` if it is absent, stale (another boot) or damaged.
pub fn load(path: &Path, blocks: u64) -> io::Result<Option<Tracker>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let boot = boot_id();
    let mut h = [0u8; HEADER_FIELDS + 4];
    // An unknown boot id (no /proc) never matches: then the bitmaps are the truth.
    if boot == [0; 16] || f.read_exact_at(&mut h, 0).is_err() || h != header(blocks, boot) {
        return Ok(None);
    }
    let mut bytes = vec![0u8; blocks.div_ceil(4) as usize];
    if f.read_exact_at(&mut bytes, HEADER).is_err() {
        return Ok(None);
    }
    Ok(decode(&bytes, blocks))
}

/// Two-bit states → a tracker; `None` if a block holds the unused code 3 or lies past `blocks`.
fn decode(bytes: &[u8], blocks: u64) -> Option<Tracker> {
    let (mut dirty, mut zero) = (RoaringBitmap::new(), RoaringBitmap::new());
    // Runs are gathered and inserted whole: O(runs) bitmap work over an O(blocks) scan.
    let mut run: Option<(u8, u32)> = None;
    let mut flush = |run: Option<(u8, u32)>, end: u32| match run {
        Some((1, s)) => {
            dirty.insert_range(s..end);
        }
        Some((2, s)) => {
            zero.insert_range(s..end);
        }
        _ => {}
    };
    for (i, &byte) in bytes.iter().enumerate() {
        let first = (i * 4) as u64;
        if byte == 0 && run.is_none() {
            continue;
        }
        for k in 0..4u64 {
            let b = first + k;
            let c = (byte >> (2 * k)) & 3;
            if c == 3 || (b >= blocks && c != 0) {
                return None;
            }
            if run.map(|r| r.0) != Some(c) {
                flush(run, b as u32);
                run = (c != 0).then_some((c, b as u32));
            }
        }
    }
    flush(run, blocks as u32);
    Tracker::from_bitmaps(dirty, zero)
}

/// A live file mapped for writing: the active layer's.
pub struct LiveMap {
    ptr: NonNull<u8>,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is plain shared memory owned by this value; every mutation goes through
// `&mut self` (the layer serialises them under its tracker lock), so moving or sharing the
// handle between threads is sound.
unsafe impl Send for LiveMap {}
// SAFETY: as above; `&self` gives no access to the bytes.
unsafe impl Sync for LiveMap {}

impl LiveMap {
    /// (Re)writes the live file at `path` to hold `t` under this boot, fully allocated, and maps
    /// its states.
    pub fn create(path: &Path, blocks: u64, t: &Tracker) -> io::Result<Self> {
        let len = blocks.div_ceil(4);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.set_len(HEADER + len)?;
        fsutil::reserve(&f, 0, HEADER + len)?;
        let mut states = vec![0u8; len as usize];
        for (bm, c) in [(t.dirty(), 1u8), (t.zero(), 2u8)] {
            for (s, e) in runs(bm) {
                set_codes(&mut states, u64::from(s), e, c);
            }
        }
        f.write_all_at(&states, HEADER)?;
        // The header last: a crash before it leaves a file `load` refuses.
        f.write_all_at(&header(blocks, boot_id()), 0)?;
        Self::map(f, len as usize)
    }

    fn map(file: File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::dangling(),
                len,
                _file: file,
            });
        }
        // SAFETY: a fresh shared mapping of `len` bytes of `file` at the page-aligned offset
        // HEADER, inside the file's length; it is unmapped only in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                HEADER as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: NonNull::new(p.cast()).expect("mmap never returns null on success"),
            len,
            _file: file,
        })
    }

    /// Records blocks `[start, end)` as `state`.
    pub fn set(&mut self, start: u64, end: u64, state: BlockState) {
        // SAFETY: `ptr` maps `len` bytes for as long as `self` lives, and `&mut self` makes
        // this the only access.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) };
        set_codes(bytes, start, end, code(state));
    }
}

impl Drop for LiveMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping `map` made; nothing refers to it afterwards.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Sets the 2-bit codes of blocks `[start, end)` to `c`: partial bytes bit by bit, whole bytes
/// at once.
fn set_codes(bytes: &mut [u8], start: u64, end: u64, c: u8) {
    let end = end.min(bytes.len() as u64 * 4);
    let mut b = start;
    while b < end && !b.is_multiple_of(4) {
        set_one(bytes, b, c);
        b += 1;
    }
    let whole_end = end - end % 4;
    if b < whole_end {
        let fill = c * 0b0101_0101;
        bytes[(b / 4) as usize..(whole_end / 4) as usize].fill(fill);
        b = whole_end;
    }
    while b < end {
        set_one(bytes, b, c);
        b += 1;
    }
}

fn set_one(bytes: &mut [u8], b: u64, c: u8) {
    let (i, sh) = ((b / 4) as usize, 2 * (b % 4));
    bytes[i] = (bytes[i] & !(3 << sh)) | (c << sh);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_the_file_and_the_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.live");
        let blocks = 1003;
        let mut t = Tracker::new();
        t.set_range(1, 2, BlockState::Dirty);
        t.set_range(5, 700, BlockState::Zero);
        t.set_range(999, 1003, BlockState::Dirty);
        let mut m = LiveMap::create(&p, blocks, &t).unwrap();
        assert_eq!(load(&p, blocks).unwrap().unwrap(), t);
        // Changes through the mapping are in the file at once (the page cache is shared).
        for (s, e, st) in [
            (0, 3, BlockState::Zero),
            (6, 13, BlockState::Dirty),
            (400, 402, BlockState::Untouched),
            (1001, 1003, BlockState::Zero),
        ] {
            m.set(s, e, st);
            t.set_range(s as u32, e as u32, st);
        }
        assert_eq!(load(&p, blocks).unwrap().unwrap(), t);
        drop(m);
        assert_eq!(load(&p, blocks).unwrap().unwrap(), t);
        // Another geometry, another boot or damage: not trusted.
        assert!(load(&p, blocks + 1).unwrap().is_none());
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff], 30).unwrap(); // inside the boot id
        assert!(load(&p, blocks).unwrap().is_none());
        assert!(load(&dir.path().join("none"), blocks).unwrap().is_none());
    }

    #[test]
    fn code_3_and_states_past_the_end_are_refused() {
        assert!(decode(&[0b11], 4).is_none());
        assert!(decode(&[0b0100_0000], 3).is_none());
        assert_eq!(decode(&[0b0100_0000], 4).unwrap().dirty_count(), 1);
    }
}
