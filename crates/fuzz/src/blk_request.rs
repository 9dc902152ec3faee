//! Target `blk_request`: virtio-blk requests as the guest lays them out in memory.
//!
//! Parsing and execution are one step in `vsnap_blk::request` (`Chain::split` then `process`),
//! but both are pure over guest memory, so the harness drives them without sockets: a
//! `GuestMemoryMmap` of two regions with a gap, a 1 MiB `Disk` in a scratch directory, and a
//! shadow copy of the disk's bytes that every request is checked against.
//!
//! Input:
//!
//! ```text
//! flags:u8  nreq:u8  (ndesc:u8 desc{flags:u8 addr:u32le len:u32le}[ndesc % 9])[nreq % 8 + 1]  memory...
//! ```
//!
//! `desc.flags`: bit 0 device-writable; bit 1 the address is used as is (else modulo the first
//! region, so it lands in memory); bit 2 the length is used as is (else modulo 64 KiB + 1). The
//! bytes after the requests are the guest memory image at address 0. `flags` bits 0-3 all set:
//! write-through (every write flushed). Checked: the status byte written matches the outcome,
//! the used length fits the chain, a defective chain fails, and the disk holds exactly what the
//! shadow model says (reads return it, writes/zeroes/discards change exactly their range, a
//! failed request changes nothing).

use std::sync::{Mutex, OnceLock, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vsnap_blk::config::Limits;
use vsnap_blk::request::{process, Chain, Ctx, Seg, ID_LEN, S_IOERR, S_OK, S_UNSUPP};
use vsnap_block::{Disk, DiskOptions};

const MEM: u64 = 64 << 10;
const HIGH: u64 = 0x2_0000;
const HIGH_LEN: u64 = 4 << 10;
const DISK: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const SECTOR: u64 = 512;
const SERIAL: &[u8] = b"vsnap-fuzz-serial-number";

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_FLUSH_OUT: u32 = 5;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const T_BARRIER: u32 = 0x8000_0000;

pub const WRITABLE: u8 = 1;
pub const RAW_ADDR: u8 = 2;
pub const RAW_LEN: u8 = 4;

struct State {
    disk: Disk,
    mem: GuestMemoryMmap,
    model: Model,
}

/// What the disk must hold.
struct Model {
    shadow: Vec<u8>,
    /// The disk may differ from all zeros.
    written: bool,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        let dir = crate::scratch::dir("blk");
        let mut o = DiskOptions::new(dir.join("state"));
        o.size = Some(DISK);
        o.block_size = BLOCK as u32;
        let disk = Disk::open(&o).expect("open the scratch disk");
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEM as usize),
            (GuestAddress(HIGH), HIGH_LEN as usize),
        ])
        .expect("guest memory");
        Mutex::new(State {
            disk,
            mem,
            model: Model {
                shadow: vec![0; DISK as usize],
                written: false,
            },
        })
    })
}

type Desc = (GuestAddress, u32, bool);

/// Parses the request lists; returns them and the memory image.
fn parse(data: &[u8]) -> (u8, Vec<Vec<Desc>>, &[u8]) {
    let (&flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let (&nreq, mut rest) = rest.split_first().unwrap_or((&0, &[]));
    let mut reqs = Vec::new();
    for _ in 0..nreq % 8 + 1 {
        let Some((&n, r)) = rest.split_first() else {
            break;
        };
        rest = r;
        let mut descs = Vec::new();
        for _ in 0..n % 9 {
            if rest.len() < 9 {
                break;
            }
            let f = rest[0];
            let addr = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(rest[5..9].try_into().expect("4 bytes"));
            rest = &rest[9..];
            let addr = if f & RAW_ADDR != 0 {
                u64::from(addr)
            } else {
                u64::from(addr) % MEM
            };
            let len = if f & RAW_LEN != 0 {
                len
            } else {
                len % (MEM as u32 + 1)
            };
            descs.push((GuestAddress(addr), len, f & WRITABLE != 0));
        }
        reqs.push(descs);
    }
    (flags, reqs, rest)
}

fn read_segs(mem: &GuestMemoryMmap, segs: &[Seg]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        mem.read_slice(&mut b, s.addr).ok()?;
        out.extend_from_slice(&b);
    }
    Some(out)
}

/// True if no two of the ranges `[start, start + len)` share a byte.
fn disjoint(mut r: Vec<(u64, u64)>) -> bool {
    r.sort_unstable();
    r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
}

/// The harness.
pub fn blk_request(data: &[u8]) {
    run(data);
}

/// Runs one input; returns each request's status (`None`: no status byte to write).
fn run(data: &[u8]) -> Vec<Option<u8>> {
    let mut statuses = Vec::new();
    let mut st = state().lock().unwrap_or_else(PoisonError::into_inner);
    let State {
        disk, mem, model, ..
    } = &mut *st;
    if model.written {
        disk.write_zeroes(0, DISK).expect("reset the disk");
        model.shadow.fill(0);
        model.written = false;
    }
    let (flags, reqs, image) = parse(data);
    mem.write_slice(&vec![0u8; MEM as usize], GuestAddress(0))
        .expect("clear memory");
    mem.write_slice(&vec![0u8; HIGH_LEN as usize], GuestAddress(HIGH))
        .expect("clear memory");
    let image = &image[..image.len().min(MEM as usize)];
    mem.write_slice(image, GuestAddress(0))
        .expect("memory image");
    let ctx = Ctx {
        disk,
        limits: Limits::for_queue_size(256),
        serial: SERIAL,
        writeback: flags & 0xf != 0xf,
    };
    let mut buf = Vec::new();
    for descs in reqs {
        let chain = Chain::split(descs, &*mem);
        // Only a chain without defects lies in guest memory (and is bounded by it).
        let readable = chain
            .defect
            .is_none()
            .then(|| read_segs(mem, &chain.readable));
        let out = process(&ctx, &*mem, &chain, &mut buf);
        statuses.push(out.map(|o| o.status));
        let Some(status_at) = chain.status else {
            assert!(out.is_none(), "an outcome without a status byte");
            continue;
        };
        let o = out.expect("a chain with a status byte gets an outcome");
        assert!(
            [S_OK, S_IOERR, S_UNSUPP].contains(&o.status),
            "status {}",
            o.status
        );
        let written: u8 = mem.read_obj(status_at).expect("status byte");
        assert_eq!(written, o.status, "status byte in memory");
        assert!(o.len >= 1, "used length without the status byte");
        assert!(
            u64::from(o.len) <= chain.writable_len() + 1,
            "used length {} past the chain's {} writable bytes",
            o.len,
            chain.writable_len() + 1
        );
        if chain.defect.is_some() {
            assert_eq!(o.status, S_IOERR, "a defective chain was executed");
            continue;
        }
        let readable = readable
            .flatten()
            .expect("no defect: all readable segments are in memory");
        check(disk, mem, model, &chain, status_at, &readable, o.status);
    }
    statuses
}

/// Updates the shadow for a request that completed with `status`, and checks the disk against it.
fn check(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    model: &mut Model,
    chain: &Chain,
    status_at: GuestAddress,
    readable: &[u8],
    status: u8,
) {
    let Some(hdr) = readable.get(..16) else {
        assert_eq!(status, S_IOERR, "a request without a header succeeded");
        return;
    };
    let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes")) & !T_BARRIER;
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let ok = status == S_OK;
    // The byte ranges of the disk this request may have touched.
    let mut touched: Vec<(u64, u64)> = Vec::new();
    match kind {
        T_IN | T_OUT => {
            let len = if kind == T_IN {
                chain.writable_len()
            } else {
                readable.len() as u64 - 16
            };
            let off = sector.checked_mul(SECTOR);
            if ok {
                let off = off.expect("a successful request has an offset");
                // Whole sectors inside the disk; a zero-length transfer past the end is
                // refused too, as QEMU refuses it.
                let in_range = off.checked_add(len).is_some_and(|e| e <= DISK);
                assert!(
                    len.is_multiple_of(SECTOR) && in_range,
                    "a transfer of {len} bytes at {off} succeeded"
                );
                if len == 0 {
                    return;
                }
                let range = off as usize..(off + len) as usize;
                if kind == T_OUT {
                    model.shadow[range].copy_from_slice(&readable[16..]);
                    model.written = true;
                } else {
                    let mut segs: Vec<(u64, u64)> = chain
                        .writable
                        .iter()
                        .map(|s| (s.addr.0, u64::from(s.len)))
                        .collect();
                    segs.push((status_at.0, 1));
                    if disjoint(segs) {
                        let got = read_segs(mem, &chain.writable).expect("in memory");
                        assert!(
                            got == model.shadow[range],
                            "read returned other bytes than written"
                        );
                    }
                }
            }
            if let Some(off) = off {
                touched.push((off, len));
            }
        }
        T_FLUSH | T_FLUSH_OUT => assert!(ok, "flush failed"),
        T_GET_ID if ok => {
            let mut segs: Vec<(u64, u64)> = chain
                .writable
                .iter()
                .map(|s| (s.addr.0, u64::from(s.len)))
                .collect();
            segs.push((status_at.0, 1));
            if disjoint(segs) {
                let got = read_segs(mem, &chain.writable).expect("in memory");
                let mut want = [0u8; ID_LEN];
                let n = SERIAL.len().min(ID_LEN);
                want[..n].copy_from_slice(&SERIAL[..n]);
                assert_eq!(got[..ID_LEN], want, "GET_ID bytes");
            }
        }
        T_GET_ID => {}
        T_DISCARD | T_WRITE_ZEROES => {
            for s in readable[16..].chunks_exact(16) {
                let sec = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
                let n = u64::from(u32::from_le_bytes(s[8..12].try_into().expect("4 bytes")));
                let Some(off) = sec.checked_mul(SECTOR) else {
                    assert!(!ok, "a segment past u64 succeeded");
                    continue;
                };
                let len = n * SECTOR;
                touched.push((off, len));
                if !ok {
                    continue;
                }
                assert!(off + len <= DISK, "a segment past capacity succeeded");
                // Discard zeroes only the blocks it covers whole; write-zeroes every byte.
                let (s, e) = if kind == T_DISCARD {
                    (off.div_ceil(BLOCK) * BLOCK, (off + len) / BLOCK * BLOCK)
                } else {
                    (off, off + len)
                };
                if s < e {
                    model.shadow[s as usize..e as usize].fill(0);
                    model.written = true;
                }
            }
        }
        _ => assert_ne!(status, S_OK, "an unknown request type succeeded"),
    }
    // The disk matches the shadow over everything the request named.
    for (off, len) in touched {
        if off >= DISK {
            continue;
        }
        let len = len.min(DISK - off) / SECTOR * SECTOR;
        let mut got = vec![0u8; len as usize];
        disk.read(off, &mut got).expect("read back");
        assert!(
            got == model.shadow[off as usize..(off + len) as usize],
            "disk bytes at {off}+{len} differ from what the requests wrote"
        );
    }
}

fn desc(flags: u8, addr: u32, len: u32) -> Vec<u8> {
    let mut d = vec![flags];
    d.extend_from_slice(&addr.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d
}

fn request(descs: &[Vec<u8>]) -> Vec<u8> {
    [&[descs.len() as u8][..], &descs.concat()].concat()
}

fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Memory image with `parts` placed at their addresses.
fn image(parts: &[(usize, &[u8])]) -> Vec<u8> {
    let end = parts.iter().map(|(a, b)| a + b.len()).max().unwrap_or(0);
    let mut m = vec![0u8; end];
    for (a, b) in parts {
        m[*a..*a + b.len()].copy_from_slice(b);
    }
    m
}

fn input(flags: u8, reqs: &[Vec<u8>], mem: &[u8]) -> Vec<u8> {
    [&[flags, reqs.len() as u8 - 1][..], &reqs.concat(), mem].concat()
}

/// Well-formed requests of every type, with the layouts guests use and some they may.
pub fn seeds() -> Vec<Vec<u8>> {
    const R: u8 = 0;
    const W: u8 = WRITABLE;
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 | 1).collect();
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    };
    let status = desc(W, 0x3000, 1);
    vec![
        // Write 4 KiB at sector 8, read it back elsewhere, flush.
        input(
            0,
            &[
                request(&[desc(R, 0, 16), desc(R, 0x1000, 4096), status.clone()]),
                request(&[desc(R, 0x20, 16), desc(W, 0x5000, 4096), status.clone()]),
                request(&[desc(R, 0x40, 16), status.clone()]),
            ],
            &image(&[
                (0, &header(T_OUT, 8)),
                (0x20, &header(T_IN, 8)),
                (0x40, &header(T_FLUSH, 0)),
                (0x1000, &data),
            ]),
        ),
        // Header and data in one descriptor, data split, data and status in one writable.
        input(
            0,
            &[
                request(&[
                    desc(R, 0xe00, 16 + 512),
                    desc(R, 0x2000, 1024),
                    status.clone(),
                ]),
                request(&[desc(R, 0x20, 16), desc(W, 0x6000, 1536 + 1)]),
            ],
            &image(&[
                (0xe00, &header(T_OUT, 2047 - 2)),
                (0xe10, &data[..512]),
                (0x2000, &data[512..1536]),
                (0x20, &header(T_IN | T_BARRIER, 2045)),
            ]),
        ),
        // The high region, past capacity, a sector overflow, an odd length.
        input(
            0,
            &[
                request(&[
                    desc(R, 0, 16),
                    desc(R | RAW_ADDR, HIGH as u32, 2048),
                    status.clone(),
                ]),
                request(&[desc(R, 0x20, 16), desc(W, 0x5000, 1024), status.clone()]),
                request(&[desc(R, 0x40, 16), desc(W, 0x5000, 1000), status.clone()]),
                request(&[
                    desc(R, 0x60, 16),
                    desc(W | RAW_ADDR, MEM as u32 - 8, 64),
                    status.clone(),
                ]),
            ],
            &image(&[
                (0, &header(T_OUT, 100)),
                (0x20, &header(T_IN, DISK / 512 - 1)),
                (0x40, &header(T_IN, u64::MAX / 256)),
                (0x60, &header(T_IN, 0)),
            ]),
        ),
        // GET_ID, discard and write-zeroes (multi-segment, unaligned), unsupported types.
        input(
            0,
            &[
                request(&[desc(R, 0, 16), desc(W, 0x1000, 20), status.clone()]),
                request(&[desc(R, 0x100, 16 + 32), status.clone()]),
                request(&[desc(R, 0x200, 16 + 16), status.clone()]),
                request(&[desc(R, 0x300, 16), status.clone()]),
                request(&[desc(R, 0x400, 16 + 16), status.clone()]),
            ],
            &image(&[
                (0, &header(T_GET_ID, 0)),
                (0x100, &header(T_DISCARD, 0)),
                (0x110, &seg(1, 15, 0)),
                (0x120, &seg(64, 64, 0)),
                (0x200, &header(T_WRITE_ZEROES, 0)),
                (0x210, &seg(3, 9, 1)),
                (0x300, &header(99, 0)),
                (0x400, &header(T_DISCARD, 0)),
                (0x410, &seg(0, 8, 1)),
            ]),
        ),
        // Write then zero part of it, then read across, write-through.
        input(
            0xf,
            &[
                request(&[desc(R, 0, 16), desc(R, 0x1000, 4096), status.clone()]),
                request(&[desc(R, 0x200, 16 + 16), status.clone()]),
                request(&[desc(R, 0x20, 16), desc(W, 0x5000, 8192), status.clone()]),
            ],
            &image(&[
                (0, &header(T_OUT, 0)),
                (0x200, &header(T_WRITE_ZEROES, 0)),
                (0x210, &seg(1, 2, 0)),
                (0x20, &header(T_IN, 0)),
                (0x1000, &data),
            ]),
        ),
        // Malformed chains: a readable after a writable, a descriptor outside memory, no status.
        input(
            0,
            &[
                request(&[desc(R, 0, 16), status.clone(), desc(R, 0x1000, 512)]),
                request(&[
                    desc(R, 0, 16),
                    desc(R | RAW_ADDR, 0x1_0000, 512),
                    status.clone(),
                ]),
                request(&[desc(R, 0, 16), desc(R, 0x1000, 512)]),
            ],
            &image(&[(0, &header(T_OUT, 0))]),
        ),
    ]
}

pub const DICT: &[&[u8]] = &[
    &[1, 0, 0, 0],
    &[0, 0, 0, 0],
    &[11, 0, 0, 0],
    &[13, 0, 0, 0],
    &[0, 0x10, 0, 0],
    &[0, 2, 0, 0],
    &[0, 0, 2, 0],
    &[WRITABLE, 0, 0x30, 0, 0, 1, 0, 0, 0],
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run_and_the_model_holds() {
        let (ok, err, unsupp) = (Some(S_OK), Some(S_IOERR), Some(S_UNSUPP));
        let want = [
            vec![ok, ok, ok],
            vec![ok, ok],
            vec![ok, err, err, err],
            vec![ok, ok, ok, unsupp, unsupp],
            vec![ok, ok, ok],
            vec![err, err, None],
        ];
        for (i, (s, w)) in seeds().iter().zip(want).enumerate() {
            assert_eq!(run(s), w, "seed {i}");
        }
    }

    #[test]
    fn parse_reads_the_layout() {
        let s = &seeds()[0];
        let (flags, reqs, mem) = parse(s);
        assert_eq!(flags, 0);
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0][1], (GuestAddress(0x1000), 4096, false));
        assert_eq!(reqs[1][1], (GuestAddress(0x5000), 4096, true));
        assert_eq!(&mem[0..4], &T_OUT.to_le_bytes());
    }
}
