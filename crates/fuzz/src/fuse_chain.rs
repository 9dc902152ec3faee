//! Target `fuse_chain`: FUSE requests as a guest lays them out in descriptor chains, through the
//! device's own path: `vsnap_vhost::Segments::split`, then `vsnap_fs::device::run_chain`, which
//! gathers the request's head and either moves READ and WRITE data by `preadv`/`pwritev`
//! straight between the file and guest memory (`vsnap_fs::guest_io`), or gathers the rest of
//! the message for `Server::handle` and scatters the reply. `fuse_handle` drives `handle` with
//! flat messages and never reaches this.
//!
//! Guest memory has three regions: A `[0, 64 KiB)` and B `[64 KiB, 80 KiB)` adjacent, so a
//! segment can straddle them, and C `[128 KiB, 132 KiB)` after a gap. The share holds one file,
//! `data` (40 KiB), that each input's fresh session has looked up and opened read-write, and an
//! empty file with a long name; a shadow copy says what `data` must hold.
//!
//! ```text
//! input   := request*                                  (at most 8)
//! request := ctl:u8 mlen:u16le message[mlen] ndesc:u8 desc[ndesc % 17]
//! desc    := flags:u8 addr:u32le len:u32le
//! ```
//!
//! `ctl`: bit 0 fix the header's length; bit 1 steer the node id and file handle to `data`'s;
//! bit 2 take a READ or WRITE offset modulo 64 KiB; bit 3 set a WRITE's size to the payload the
//! message carries; bit 4 cut the message where the readable descriptors' lengths say (the last
//! one takes the rest), instead of filling descriptors of the given lengths in order (then the
//! message may be cut short, or followed by whatever memory holds). `desc.flags`: bit 0
//! device-writable; bit 1 the address as is (else modulo A+B: it starts in memory, and may run
//! into the gap); bit 2 the length as is (else modulo 32 KiB + 1). The requests of an input run
//! one after another on the same session and file.
//!
//! Opcodes that would change the share other than WRITE are sent as GETATTR (`fuse_handle`
//! covers them), and OPEN loses `O_TRUNC` and `O_APPEND`, so the shadow stays exact: a chain
//! whose readable bytes (as laid out, overlaps included) still ask for one is not run.
//!
//! Checked for every chain: the used length fits the writable part; no byte of guest memory
//! outside the writable segments changed; a defective chain is answered with nothing and
//! changes nothing; a chain without reply is a no-reply opcode or a recorded fault. When the
//! writable segments do not overlap, the reply is well formed (length field = used length,
//! the request's `unique`, errno in range, errors without body) and a successful reply leaves
//! the writable bytes past it as they were. A successful WRITE wrote to `data` exactly the
//! payload bytes of the readable segments, at its offset; a successful READ returned exactly
//! the shadow's bytes at its offset (as many as the file has, up to the size asked); a LOOKUP
//! in the root (long enough that its name is gathered after the head) finds exactly the names
//! the share holds; after each input the file equals the shadow and the share holds nothing
//! else.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vsnap_fs::abi::{opcode::*, *};
use vsnap_fs::device::run_chain;
use vsnap_fs::passthrough::{FsConfig, Passthrough};
use vsnap_fs::request::Op;
use vsnap_fs::server::{Reply, Server, DATA_HEAD, MAX_REQUEST};
use vsnap_vhost::{gather, Faults, Seg, Segments};
use zerocopy::{FromBytes, IntoBytes};

use crate::fuse_decode::{header, message};

/// Guest memory regions `(base, length)`: A and B adjacent, C after a gap.
const REGIONS: [(u64, usize); 3] = [(0, 0x1_0000), (0x1_0000, 0x4000), (0x2_0000, 0x1000)];
/// A and B: where an address not taken as is lands.
const LOW: u64 = 0x1_4000;
const MAX_SEG: u32 = 32 << 10;
/// Where a clamped READ or WRITE offset lands.
const WINDOW: u64 = 64 << 10;
const MAX_REQUESTS: usize = 8;
const MAX_DESCS: u8 = 16;
const DATA_LEN: usize = 40 << 10;
const WORKDIR: &str = ".vsnap-workdir";
/// A second file, whose LOOKUP is longer than the head the device gathers first.
const LONG: &str = "a-name-long-enough-that-its-lookup-outgrows-the-head";
const ROOT: u64 = 1;
const HEADER: usize = size_of::<InHeader>();
const OUT: usize = size_of::<OutHeader>();

pub const FIX_LEN: u8 = 1;
pub const STEER: u8 = 2;
pub const CLAMP: u8 = 4;
pub const FIT_WRITE: u8 = 8;
pub const CUT: u8 = 16;

pub const WRITABLE: u8 = 1;
pub const RAW_ADDR: u8 = 2;
pub const RAW_LEN: u8 = 4;

/// Opcodes that change the share when they succeed, besides WRITE and a truncating OPEN (the
/// ones `--readonly` refuses).
const CHANGES: &[u32] = &[
    SETATTR,
    SYMLINK,
    MKNOD,
    MKDIR,
    UNLINK,
    RMDIR,
    RENAME,
    RENAME2,
    LINK,
    CREATE,
    TMPFILE,
    FALLOCATE,
    COPY_FILE_RANGE,
    SETXATTR,
    REMOVEXATTR,
];
const OPEN_STRIPPED: u32 = (libc::O_TRUNC | libc::O_APPEND) as u32;

struct State {
    share: PathBuf,
    mem: GuestMemoryMmap,
    /// Each region's bytes as an input starts: a pattern, not zeros, so that writes of zeros
    /// show.
    fill: Vec<Vec<u8>>,
    baseline: Vec<u8>,
    /// `data` may differ from the baseline: set before anything could write to it, so an input
    /// that panicked leaves it set for the next.
    dirty: bool,
}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        crate::sys::limit_file_size(crate::fuse_handle::FILE_SIZE_LIMIT).expect("RLIMIT_FSIZE");
        let root = crate::scratch::dir("fs-chain");
        let share = root.join("share");
        std::fs::create_dir(&share).expect("share");
        let baseline: Vec<u8> = (0..DATA_LEN).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        std::fs::write(share.join("data"), &baseline).expect("data");
        std::fs::write(share.join(LONG), b"").expect("long-named file");
        let ranges: Vec<_> = REGIONS.iter().map(|&(b, l)| (GuestAddress(b), l)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
        let fill = REGIONS
            .iter()
            .enumerate()
            .map(|(r, &(_, l))| (0..l).map(|i| (i * 7 + r * 64 + 0x11) as u8).collect())
            .collect();
        Mutex::new(State {
            share,
            mem,
            fill,
            baseline,
            dirty: false,
        })
    })
    .lock()
    .unwrap_or_else(PoisonError::into_inner)
}

/// One request of an input.
struct Request<'a> {
    ctl: u8,
    msg: &'a [u8],
    descs: Vec<(u8, u32, u32)>,
}

/// Splits an input into its requests.
fn parse(mut rest: &[u8]) -> Vec<Request<'_>> {
    let mut out = Vec::new();
    while out.len() < MAX_REQUESTS && rest.len() >= 3 {
        let ctl = rest[0];
        let mlen = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let msg = &rest[3..3 + mlen];
        rest = &rest[3 + mlen..];
        let mut descs = Vec::new();
        if let Some((&n, r)) = rest.split_first() {
            rest = r;
            for _ in 0..n % (MAX_DESCS + 1) {
                let Some((d, r)) = rest.split_first_chunk::<9>() else {
                    break;
                };
                rest = r;
                let addr = u32::from_le_bytes(d[1..5].try_into().expect("4 bytes"));
                let len = u32::from_le_bytes(d[5..9].try_into().expect("4 bytes"));
                descs.push((d[0], addr, len));
            }
        }
        out.push(Request { ctl, msg, descs });
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// Whether the device may be handed a request that begins with `m` (see the module doc).
fn allowed(m: &[u8]) -> bool {
    match u32_at(m, 4) {
        Some(OPEN) => u32_at(m, HEADER).is_none_or(|f| f & OPEN_STRIPPED == 0),
        Some(op) => !CHANGES.contains(&op),
        None => true,
    }
}

/// The session of one input: a fresh server with `data` looked up and open.
struct Session {
    server: Server,
    faults: Faults,
    node: u64,
    fh: u64,
}

impl Session {
    fn new(st: &State) -> Self {
        let cfg = FsConfig {
            xattr: true,
            ..FsConfig::default()
        };
        let fs = Passthrough::new(&st.share, &st.share.join(WORKDIR), cfg).expect("passthrough");
        let server = Server::new(fs);
        let ok = |opcode, nodeid, args: &[&[u8]]| {
            let m = message(header(opcode, nodeid, 1), args);
            let mut r = Reply::new();
            assert!(server.handle(&m, &mut r).replied, "a reply");
            let (h, body) = OutHeader::read_from_prefix(&r).expect("reply header");
            assert_eq!(h.error, 0, "setup opcode {opcode} failed");
            body.to_vec()
        };
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 1 << 17,
            flags: u32::MAX,
            flags2: u32::MAX,
            ..InitIn::default()
        };
        ok(INIT, ROOT, &[init.as_bytes()]);
        let e = ok(LOOKUP, ROOT, &[b"data\0"]);
        let node = EntryOut::read_from_prefix(&e).expect("entry").0.nodeid;
        let rw = OpenIn {
            flags: libc::O_RDWR as u32,
            open_flags: 0,
        };
        let o = ok(OPEN, node, &[rw.as_bytes()]);
        let fh = OpenOut::read_from_prefix(&o).expect("open").0.fh;
        Session {
            server,
            faults: Faults::default(),
            node,
            fh,
        }
    }

    /// The message as the record's `ctl` asks for it, with the opcode filter applied.
    fn prepare(&self, ctl: u8, msg: &[u8]) -> Vec<u8> {
        let mut m = msg.to_vec();
        if m.len() < HEADER {
            return m;
        }
        let a = HEADER;
        let opcode = u32_at(&m, 4).expect("header");
        if CHANGES.contains(&opcode) {
            put_u32(&mut m, 4, GETATTR);
        }
        if opcode == OPEN {
            if let Some(f) = u32_at(&m, a) {
                put_u32(&mut m, a, f & !OPEN_STRIPPED);
            }
        }
        let opcode = u32_at(&m, 4).expect("header");
        if ctl & STEER != 0 {
            put_u64(&mut m, 16, self.node);
            match opcode {
                GETATTR => put_u64(&mut m, a + 8, self.fh),
                READ | WRITE | FLUSH | RELEASE | FSYNC | LSEEK => put_u64(&mut m, a, self.fh),
                _ => {}
            }
        }
        if matches!(opcode, READ | WRITE) {
            if ctl & CLAMP != 0 {
                if let Some(off) = u64_at(&m, a + 8) {
                    put_u64(&mut m, a + 8, off % WINDOW);
                }
            }
            if ctl & FIT_WRITE != 0 && opcode == WRITE && m.len() >= DATA_HEAD {
                let size = (m.len() - DATA_HEAD) as u32;
                put_u32(&mut m, a + 16, size);
            }
        }
        if ctl & FIX_LEN != 0 {
            let len = m.len() as u32;
            put_u32(&mut m, 0, len);
        }
        m
    }
}

/// A descriptor as the chain carries it.
fn descriptor((flags, addr, len): (u8, u32, u32)) -> (GuestAddress, u32, bool) {
    let addr = if flags & RAW_ADDR != 0 {
        u64::from(addr)
    } else {
        u64::from(addr) % LOW
    };
    let len = if flags & RAW_LEN != 0 {
        len
    } else {
        len % (MAX_SEG + 1)
    };
    (GuestAddress(addr), len, flags & WRITABLE != 0)
}

/// Writes `msg` into the readable descriptors: cut at their lengths, the last taking the rest
/// (`cut`), or filling them in order. Bytes that fall outside memory are dropped (the chain is
/// defective then).
fn place(mem: &GuestMemoryMmap, descs: &mut [(GuestAddress, u32, bool)], msg: &[u8], cut: bool) {
    let readable: Vec<usize> = (0..descs.len()).filter(|&i| !descs[i].2).collect();
    let mut at = 0usize;
    for (k, &i) in readable.iter().enumerate() {
        if cut && k + 1 == readable.len() {
            descs[i].1 = (msg.len() - at) as u32;
        }
        let (addr, len, _) = descs[i];
        let n = (len as usize).min(msg.len() - at);
        if cut {
            descs[i].1 = n as u32;
        }
        if n > 0 {
            let _ = mem.write_slice(&msg[at..at + n], addr);
        }
        at += n;
    }
}

/// Each region's bytes.
fn snapshot(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(b, l)| {
            let mut v = vec![0u8; l];
            mem.read_slice(&mut v, GuestAddress(b)).expect("region");
            v
        })
        .collect()
}

/// Per region, the byte ranges no writable segment covers (offsets into the region).
fn outside(segs: &[Seg]) -> Vec<Vec<Range<usize>>> {
    REGIONS
        .iter()
        .map(|&(b, l)| {
            let end = b + l as u64;
            let mut covered: Vec<(usize, usize)> = segs
                .iter()
                .filter_map(|s| {
                    let lo = s.addr.0.max(b);
                    let hi = s.addr.0.saturating_add(u64::from(s.len)).min(end);
                    (lo < hi).then(|| ((lo - b) as usize, (hi - b) as usize))
                })
                .collect();
            covered.sort_unstable();
            let mut free = Vec::new();
            let mut at = 0;
            for (lo, hi) in covered {
                if lo > at {
                    free.push(at..lo);
                }
                at = at.max(hi);
            }
            if at < l {
                free.push(at..l);
            }
            free
        })
        .collect()
}

/// True if no two segments share a byte.
fn disjoint(segs: &[Seg]) -> bool {
    let mut r: Vec<(u64, u64)> = segs
        .iter()
        .map(|s| (s.addr.0, s.addr.0 + u64::from(s.len)))
        .collect();
    r.sort_unstable();
    r.windows(2).all(|w| w[0].1 <= w[1].0)
}

fn concat(mem: &GuestMemoryMmap, segs: &[Seg], len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    assert!(gather(mem, segs, 0, &mut b), "segments of a sound chain");
    b
}

/// The harness.
pub fn fuse_chain(data: &[u8]) {
    run(data);
}

/// Runs one input; returns each chain's used length (`None`: not run, see the opcode filter).
fn run(data: &[u8]) -> Vec<Option<u32>> {
    let mut st = state();
    let path = st.share.join("data");
    if st.dirty {
        std::fs::write(&path, &st.baseline).expect("reset data");
        st.dirty = false;
    }
    for (r, &(b, _)) in REGIONS.iter().enumerate() {
        st.mem
            .write_slice(&st.fill[r], GuestAddress(b))
            .expect("fill memory");
    }
    let mut shadow = st.baseline.clone();
    let s = Session::new(&st);
    let mut used = Vec::new();
    for req in parse(data) {
        let msg = s.prepare(req.ctl, req.msg);
        let mut descs: Vec<_> = req.descs.iter().copied().map(descriptor).collect();
        place(&st.mem, &mut descs, &msg, req.ctl & CUT != 0);
        let segs = Segments::split(descs.iter().copied(), &st.mem);
        let rlen = segs.readable_len();
        // What the device will read, if it reads anything.
        let readable = (segs.defect.is_none() && rlen <= MAX_REQUEST as u64)
            .then(|| concat(&st.mem, &segs.readable, rlen));
        if !readable.as_deref().is_none_or(allowed) {
            used.push(None);
            continue;
        }
        let write = readable.as_deref().and_then(|r| u32_at(r, 4)) == Some(WRITE);
        if write {
            st.dirty = true;
        }
        let n = chain(&st.mem, &s, &segs, readable.as_deref(), &mut shadow);
        used.push(Some(n));
        if write {
            let file = std::fs::read(&path).expect("read data");
            reconcile(
                readable.as_deref().expect("a read chain"),
                &file,
                &mut shadow,
            );
        }
    }
    drop(s);
    let file = std::fs::read(&path).expect("read data");
    assert!(
        file == shadow,
        "data holds other bytes than the chains wrote"
    );
    let mut names: Vec<_> = std::fs::read_dir(&st.share)
        .expect("share")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, [WORKDIR, LONG, "data"], "the share changed");
    let left = std::fs::read_dir(st.share.join(WORKDIR))
        .expect("workdir")
        .count();
    assert_eq!(left, 0, "links left in the workdir after the session ended");
    if file == st.baseline {
        st.dirty = false;
    }
    used
}

/// Runs one chain whose readable bytes are `readable` (`None`: defective or oversized) and
/// checks what it did to guest memory, its reply, and the data it moved; a WRITE whose reply
/// was checked updates `shadow`. The used length.
fn chain(
    mem: &GuestMemoryMmap,
    s: &Session,
    segs: &Segments,
    readable: Option<&[u8]>,
    shadow: &mut Vec<u8>,
) -> u32 {
    let wlen = segs.writable_len();
    let before = snapshot(mem);
    let wbefore = readable.map(|_| concat(mem, &segs.writable, wlen));
    let faults = s.faults.total.load(Ordering::Relaxed);
    let n = run_chain(&s.server, &s.faults, mem, segs);
    let faulted = s.faults.total.load(Ordering::Relaxed) > faults;
    let after = snapshot(mem);
    // Compared range by range: a byte-by-byte scan of all of memory dominates a debug build.
    for (r, free) in outside(&segs.writable).iter().enumerate() {
        for f in free {
            if after[r][f.clone()] != before[r][f.clone()] {
                let i = f
                    .clone()
                    .find(|&i| after[r][i] != before[r][i])
                    .expect("a byte");
                panic!(
                    "guest byte {:#x} outside the writable segments changed",
                    REGIONS[r].0 + i as u64
                );
            }
        }
    }
    assert!(
        u64::from(n) <= wlen,
        "used length {n} past {wlen} writable bytes"
    );
    let (Some(readable), Some(wbefore)) = (readable, wbefore) else {
        assert_eq!(n, 0, "a defective or oversized chain was answered");
        assert!(faulted, "a defective or oversized chain without a fault");
        assert!(
            after == before,
            "a defective or oversized chain changed memory"
        );
        return n;
    };
    let opcode = u32_at(readable, 4);
    if n == 0 {
        assert!(
            faulted || matches!(opcode, Some(FORGET | BATCH_FORGET | INTERRUPT)),
            "no reply to opcode {opcode:?} and no fault"
        );
        return n;
    }
    assert!(n as usize >= OUT, "a reply of {n} bytes");
    if !disjoint(&segs.writable) {
        // Later bytes of the reply may have landed on earlier ones: nothing to read back.
        return n;
    }
    let wafter = concat(mem, &segs.writable, wlen);
    let (h, body) = OutHeader::read_from_prefix(&wafter[..n as usize]).expect("16 bytes");
    assert_eq!(h.len, n, "reply length field");
    assert_eq!(h.unique, InHeader::read_unique(readable), "reply unique");
    assert!(
        h.error <= 0 && h.error > -4096,
        "errno {} out of range",
        h.error
    );
    check_lookup(readable, h.error, body);
    if h.error != 0 {
        assert_eq!(n as usize, OUT, "an error reply with a body");
        // A READ refused after the data went out (the guest's buffers too small for what the
        // file has) leaves that data in them: the bytes past the reply are not checked.
        return n;
    }
    assert!(
        wafter[n as usize..] == wbefore[n as usize..],
        "writable bytes past the reply changed"
    );
    check_data(readable, body, shadow);
    n
}

/// A LOOKUP in the root (as the readable bytes decode) answers for exactly the names the share
/// holds: a device that handed `Server::handle` other bytes than the chain's finds nothing for a
/// name that exists, or finds one that does not. Not found is ENOENT or an entry for node 0
/// (a negative entry the guest may cache).
fn check_lookup(readable: &[u8], error: i32, body: &[u8]) {
    let Ok(r) = vsnap_fs::request::decode(readable) else {
        return;
    };
    let Op::Lookup(name) = r.op else {
        return;
    };
    if r.header.nodeid != ROOT {
        return;
    }
    let name = name.to_bytes();
    let exists = [b"data".as_slice(), LONG.as_bytes()].contains(&name);
    let found = match error {
        0 => {
            EntryOut::read_from_prefix(body)
                .expect("a LOOKUP reply")
                .0
                .nodeid
                != 0
        }
        e if e == -libc::ENOENT => false,
        _ => return,
    };
    if found {
        assert!(
            exists || name == b"." || name == b"..",
            "LOOKUP found {name:?}, which the share does not hold"
        );
    } else {
        assert!(!exists, "LOOKUP missed {name:?}");
    }
}

/// A successful READ or WRITE (as the readable bytes say): the data moved is the file's, or
/// the payload's, at the request's offset; the shadow takes a write.
fn check_data(readable: &[u8], body: &[u8], shadow: &mut Vec<u8>) {
    let opcode = u32_at(readable, 4);
    if !matches!(opcode, Some(READ | WRITE)) {
        return;
    }
    let (arg, _) = ReadIn::read_from_prefix(&readable[HEADER..]).expect("a decoded READ or WRITE");
    let off = arg.offset;
    if opcode == Some(WRITE) {
        assert_eq!(body.len(), size_of::<WriteOut>(), "WRITE reply body");
        let (w, _) = WriteOut::read_from_prefix(body).expect("a WRITE reply");
        assert!(w.size <= arg.size, "wrote {} of {} bytes", w.size, arg.size);
        let end = off.saturating_add(u64::from(w.size));
        assert!(
            w.size == 0 || end <= crate::fuse_handle::FILE_SIZE_LIMIT,
            "a write past the file size limit succeeded"
        );
        apply(
            shadow,
            off,
            &readable[DATA_HEAD..DATA_HEAD + w.size as usize],
        );
        return;
    }
    let from = usize::try_from(off).unwrap_or(usize::MAX).min(shadow.len());
    let want = (shadow.len() - from).min(arg.size as usize);
    assert_eq!(
        body.len(),
        want,
        "READ of {} at {off}: bytes returned",
        arg.size
    );
    assert!(
        body == &shadow[from..from + want],
        "READ returned other bytes than the file's"
    );
}

/// `payload` written at `off` into the shadow.
fn apply(shadow: &mut Vec<u8>, off: u64, payload: &[u8]) {
    if payload.is_empty() {
        return;
    }
    let off = usize::try_from(off).expect("a written offset is below the file size limit");
    if shadow.len() < off + payload.len() {
        shadow.resize(off + payload.len(), 0);
    }
    shadow[off..off + payload.len()].copy_from_slice(payload);
}

/// After a chain whose readable bytes say WRITE: the file is the shadow, with the payload
/// written or not. A write whose reply was lost (no room for it, overlapping buffers, the
/// EIO of a reply too large) may still have happened, whole, or cut at the file size limit.
fn reconcile(readable: &[u8], file: &[u8], shadow: &mut Vec<u8>) {
    if file == shadow.as_slice() {
        return;
    }
    let arg = readable
        .get(HEADER..)
        .and_then(|r| ReadIn::read_from_prefix(r).ok())
        .expect("data changed by a WRITE without arguments")
        .0;
    let whole = u64::from(arg.size);
    let cut = crate::fuse_handle::FILE_SIZE_LIMIT.saturating_sub(arg.offset);
    for k in [whole, cut.min(whole)] {
        if arg.offset.saturating_add(k) > crate::fuse_handle::FILE_SIZE_LIMIT {
            continue;
        }
        let Some(payload) = readable.get(DATA_HEAD..DATA_HEAD + k as usize) else {
            continue;
        };
        let mut s = shadow.clone();
        apply(&mut s, arg.offset, payload);
        if s == file {
            *shadow = s;
            return;
        }
    }
    panic!("data holds other bytes than the chain's WRITE could have written");
}

/// A request: `ctl`, the message, the descriptors `(flags, addr, len)`.
pub fn request(ctl: u8, msg: &[u8], descs: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut r = vec![ctl];
    r.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    r.extend_from_slice(msg);
    r.push(descs.len() as u8);
    for &(f, a, l) in descs {
        r.push(f);
        r.extend_from_slice(&a.to_le_bytes());
        r.extend_from_slice(&l.to_le_bytes());
    }
    r
}

/// Steering for the seeds: everything fixed up, the message cut at the descriptors.
const ALL: u8 = FIX_LEN | STEER | CLAMP | FIT_WRITE | CUT;

fn rw(opcode: u32, offset: u64, size: u32, payload: &[u8]) -> Vec<u8> {
    let a = ReadIn {
        offset,
        size,
        ..ReadIn::default()
    };
    message(header(opcode, 0, 7), &[a.as_bytes(), payload])
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Valid inputs, each aimed at one part of the path.
pub fn seeds() -> Vec<Vec<u8>> {
    const R: u8 = 0;
    const W: u8 = WRITABLE;
    const HIGH: u32 = REGIONS[2].0 as u32;
    let boundary = REGIONS[1].0 as u32;
    let scripts: Vec<Vec<Vec<u8>>> = vec![
        // A write with the header and payload in separate descriptors, read back into a reply
        // whose header and data are split.
        vec![
            request(
                ALL,
                &rw(WRITE, 10, 100, &pattern(100, 1)),
                &[(R, 0x100, 80), (R, 0x1000, 0), (W, 0x2000, 24)],
            ),
            request(
                ALL,
                &rw(READ, 0, 200, &[]),
                &[(R, 0x100, 0), (W, 0x3000, 16), (W, 0x4000, 200)],
            ),
        ],
        // Data straddling the A|B boundary both ways, and a reply header split across it.
        vec![
            request(
                ALL,
                &rw(WRITE, 4000, 3000, &pattern(3000, 2)),
                &[(R, boundary - 1000, 0), (W, 0x200, 24)],
            ),
            request(
                ALL,
                &rw(READ, 3990, 3020, &[]),
                &[(R, 0x300, 0), (W, boundary - 8, 3036)],
            ),
        ],
        // Reads into region C, past the end of the file, and into less room than asked with
        // more in the file (EIO), then the whole file into fifteen pieces.
        vec![
            request(
                ALL,
                &rw(READ, 100, 2000, &[]),
                &[(R, 0x100, 0), (W | RAW_ADDR, HIGH, 2016)],
            ),
            request(
                ALL,
                &rw(READ, DATA_LEN as u64 - 10, 100, &[]),
                &[(R, 0x100, 0), (W, 0x8000, 116)],
            ),
            request(
                ALL,
                &rw(READ, 0, 4096, &[]),
                &[(R, 0x100, 0), (W, 0x8000, 1000)],
            ),
            {
                let mut d = vec![(R, 0x100, 0)];
                d.extend((0..15).map(|i| (W, 0x4000 + i * 0x1000, 0xc00)));
                request(ALL, &rw(READ, 0, DATA_LEN as u32, &[]), &d)
            },
        ],
        // A write cut into sixteen descriptors, the header itself split; its payload from
        // region C.
        vec![
            {
                let mut d: Vec<_> = (0..15).map(|i| (R, 0x100 + i * 0x40, 7)).collect();
                d.push((W, 0x6000, 24));
                request(ALL, &rw(WRITE, 20, 300, &pattern(300, 3)), &d)
            },
            request(
                ALL,
                &rw(WRITE, 500, 1000, &pattern(1000, 4)),
                &[
                    (R, 0x100, 80),
                    (R | RAW_ADDR, HIGH + 0x10, 0),
                    (W, 0x6000, 24),
                ],
            ),
        ],
        // Requests past the data path: gathered whole (longer than the head), handled, the
        // reply scattered over pieces (LOOKUPs in the root: not steered to `data`); a WRITE with
        // an extension goes this way too.
        vec![
            request(
                ALL & !STEER,
                &message(
                    header(LOOKUP, ROOT, 8),
                    &[&[b"data".repeat(20).as_slice(), b"\0"].concat()],
                ),
                &[(R, 0x100, 50), (R, 0x200, 0), (W, 0x1000, 16)],
            ),
            request(
                ALL & !STEER,
                &message(header(LOOKUP, ROOT, 9), &[LONG.as_bytes(), b"\0"]),
                &[
                    (R, 0x100, 41),
                    (R, 0x200, 0),
                    (W, 0x1000, 16),
                    (W, 0x1100, 200),
                ],
            ),
            request(
                ALL,
                &message(header(GETATTR, 0, 10), &[GetattrIn::default().as_bytes()]),
                &[(R, 0x100, 0), (W, boundary - 20, 120)],
            ),
            request(
                ALL,
                &message(
                    header(GETXATTR, 0, 11),
                    &[
                        GetxattrIn {
                            size: 64,
                            padding: 0,
                        }
                        .as_bytes(),
                        b"user.nothing-here\0",
                    ],
                ),
                &[(R, 0x100, 60), (R, 0x200, 0), (W, 0x1000, 16)],
            ),
            {
                let mut m = rw(WRITE, 64, 16, &pattern(16, 5));
                let ext = ExtHeader { size: 16, typ: 99 };
                m.extend_from_slice(ext.as_bytes());
                m.extend_from_slice(&[0; 8]);
                let mut h = InHeader::read_from_prefix(&m).expect("header").0;
                h.total_extlen = 2;
                m[..HEADER].copy_from_slice(h.as_bytes());
                // Its size is the 16 bytes before the extension, not all that follows the head.
                request(
                    ALL & !FIT_WRITE,
                    &m,
                    &[(R, 0x100, 90), (R, 0x200, 0), (W, 0x1000, 24)],
                )
            },
        ],
        // Chains the device must refuse or answer without a body: a readable descriptor after
        // a writable one, one outside memory, one running into the gap; a message shorter than
        // its header; a reply larger than its buffers, once with room for the EIO and once
        // without; a READ larger than the maximum; a FORGET.
        vec![
            request(
                ALL,
                &rw(READ, 0, 16, &[]),
                &[(W, 0x1000, 32), (R, 0x100, 0)],
            ),
            request(
                ALL,
                &rw(READ, 0, 16, &[]),
                &[(R | RAW_ADDR, 0x3_0000, 0), (W, 0x1000, 32)],
            ),
            request(
                ALL,
                &rw(WRITE, 0, 64, &pattern(64, 6)),
                &[(R, LOW as u32 - 100, 0), (W, 0x1000, 24)],
            ),
            request(
                ALL,
                &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
                &[(R, 0x100, 0), (W, 0x1000, 16)],
            ),
            request(
                ALL,
                &message(header(GETATTR, 0, 13), &[GetattrIn::default().as_bytes()]),
                &[(R, 0x100, 0), (W, 0x1000, 16)],
            ),
            request(
                ALL,
                &message(header(GETATTR, 0, 14), &[GetattrIn::default().as_bytes()]),
                &[(R, 0x100, 0), (W, 0x1000, 8)],
            ),
            request(
                ALL,
                &rw(READ, 0, 2 << 20, &[]),
                &[(R, 0x100, 0), (W, 0x1000, 64)],
            ),
            request(
                ALL,
                &message(header(FORGET, 0, 12), &[ForgetIn { nlookup: 1 }.as_bytes()]),
                &[(R, 0x100, 0)],
            ),
        ],
        // Descriptors as given: a message longer than its readable part, and one shorter (the
        // rest is whatever memory holds); overlapping writable descriptors.
        vec![
            request(
                FIX_LEN | STEER,
                &rw(WRITE, 0, 32, &pattern(32, 7)),
                &[(R, 0x100, 90), (W, 0x1000, 24)],
            ),
            request(
                FIX_LEN | STEER | CLAMP,
                &rw(READ, 0, 64, &[]),
                &[
                    (R, 0x100, 60),
                    (R, 0x200, 40),
                    (W, 0x1000, 48),
                    (W, 0x1010, 48),
                ],
            ),
        ],
    ];
    scripts.into_iter().map(|s| s.concat()).collect()
}

/// Tokens: descriptors at the interesting places (the A|B boundary, the gap, region C).
pub const DICT: &[&[u8]] = &[
    &[WRITABLE, 0xf8, 0xff, 0, 0, 0x20, 0, 0, 0],
    &[0, 0xf0, 0xff, 0, 0, 0x50, 0, 0, 0],
    &[WRITABLE, 0xf0, 0x3f, 0x01, 0, 0x20, 0, 0, 0],
    &[WRITABLE | RAW_ADDR, 0, 0, 0x02, 0, 0x00, 0x10, 0, 0],
    &[RAW_ADDR, 0xf0, 0x0f, 0x02, 0, 0x20, 0, 0, 0],
    &[WRITABLE | RAW_LEN, 0, 0x10, 0, 0, 0, 0, 0x10, 0],
    &[ALL, 80, 0],
    &[ALL, 120, 0],
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_what_they_are_for() {
        let seeds = seeds();
        let reply = |s: &[u8]| run(s);
        // Every chain of the data seeds is run and answered.
        for (i, s) in seeds[..5].iter().enumerate() {
            let u = reply(s);
            assert_eq!(u.len(), parse(s).len(), "seed {i}");
            assert!(
                u.iter().all(|n| n.is_some_and(|n| n >= 16)),
                "seed {i}: {u:?}"
            );
        }
        // Straight data replies: WriteOut, 200 bytes; 3000 written, 3020 read.
        assert_eq!(reply(&seeds[0]), [Some(24), Some(216)]);
        assert_eq!(reply(&seeds[1]), [Some(24), Some(3036)]);
        // C region; ten bytes at the end; EIO into too little room; the whole file.
        assert_eq!(
            reply(&seeds[2]),
            [Some(2016), Some(26), Some(16), Some(16 + DATA_LEN as u32)]
        );
        // Past the data path: ENOENT, an entry, attributes, ENODATA, a WriteOut.
        let entry = (OUT + size_of::<EntryOut>()) as u32;
        let attr = (OUT + size_of::<AttrOut>()) as u32;
        assert_eq!(
            reply(&seeds[4]),
            [Some(16), Some(entry), Some(attr), Some(16), Some(24)]
        );
        // Refused chains: defects, no header, EIO, nothing, EINVAL, FORGET.
        assert_eq!(
            reply(&seeds[5]),
            [
                Some(0),
                Some(0),
                Some(0),
                Some(0),
                Some(16),
                Some(0),
                Some(16),
                Some(0)
            ]
        );
    }

    #[test]
    fn share_changing_opcodes_do_not_reach_the_device() {
        // A valid MKDIR (the name's NUL, then padding) is sent as GETATTR of the root: its
        // MkdirIn and name read as a GetattrIn without a handle. The share stays as it was
        // (`run` checks that).
        let mk = MkdirIn {
            mode: 0o754,
            umask: 0,
        };
        let mk = message(header(MKDIR, ROOT, 1), &[mk.as_bytes(), b"d\0\0\0\0\0\0\0"]);
        let s = request(
            CUT | FIX_LEN,
            &mk,
            &[(0, 0x100, 0), (WRITABLE, 0x1000, 200)],
        );
        assert_eq!(run(&s), [Some((OUT + size_of::<AttrOut>()) as u32)]);
        // A GETATTR whose opcode field a later, overlapping descriptor rewrites to MKDIR as
        // the message is laid out: the device never sees the chain.
        let mut getattr = message(header(GETATTR, ROOT, 2), &[GetattrIn::default().as_bytes()]);
        getattr.extend_from_slice(&MKDIR.to_le_bytes());
        let d = [
            (0, 0x100, 8),
            (0, 0x200, 48),
            (0, 0x104, 4),
            (WRITABLE, 0x1000, 200),
        ];
        assert_eq!(run(&request(0, &getattr, &d)), [None]);
    }

    #[test]
    fn outside_and_disjoint() {
        // A segment straddling A|B, one in C, one in the gap: what is left of each region.
        let seg = |addr, len| Seg {
            addr: GuestAddress(addr),
            len,
        };
        let segs = [seg(0xfff0, 0x20), seg(0x2_0100, 0x10), seg(0x1_8000, 0x100)];
        let o = outside(&segs);
        assert_eq!(o[0], vec![0..0xfff0]);
        assert_eq!(o[1], vec![0x10..0x4000]);
        assert_eq!(o[2], [0..0x100, 0x110..0x1000]);
        assert!(disjoint(&segs));
        assert!(!disjoint(&[segs[0], seg(0x1_000f, 1)]));
        // Overlapping and nested segments merge.
        let o = outside(&[seg(0x100, 0x100), seg(0x180, 0x10), seg(0x1f0, 0x20)]);
        assert_eq!(o[0], [0..0x100, 0x210..0x1_0000]);
    }

    #[test]
    #[should_panic(expected = "READ returned other bytes")]
    fn a_read_of_other_bytes_is_caught() {
        let mut shadow = b"0123456789".to_vec();
        let m = rw(READ, 2, 4, &[]);
        check_data(&m, b"2345", &mut shadow);
        check_data(&m, b"2346", &mut shadow);
    }

    #[test]
    #[should_panic(expected = "other bytes than the chain's WRITE could have written")]
    fn a_write_of_other_bytes_is_caught() {
        let mut shadow = b"0123456789".to_vec();
        let m = rw(WRITE, 2, 3, b"abc");
        // Unwritten, or written whole, are both what a lost reply allows.
        reconcile(&m, b"0123456789", &mut shadow);
        reconcile(&m, b"01abc56789", &mut shadow);
        assert_eq!(shadow, b"01abc56789");
        reconcile(&m, b"01abc5678X", &mut shadow);
    }
}
