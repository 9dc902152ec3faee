//! A FUSE client over a virtio-fs device, as the guest kernel's virtiofs driver drives it: queue
//! 0 is the hiprio queue (FORGET), queue 1 carries requests. Messages are raw bytes, so tests can
//! send anything, malformed included; [`Fuse::call`] builds the header for well-formed ones, and
//! the typed calls below parse the replies. Every request has a deadline: a device that never
//! answers fails the call instead of hanging the caller.

use std::path::Path;
use std::time::Duration;

use crate::{Desc, Frontend, Result, Setup};

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// Request and reply buffers: a 1 MiB payload plus headers.
pub const BUF_LEN: u32 = (1 << 20) + 4096;
/// The bytes [`Fuse::send_split`] leaves around each reply piece, and what it fills them with.
pub const SPLIT_GAP: u64 = 64;
pub const CANARY: u8 = 0xa5;
/// [`Fuse::deadline`] unless the caller sets another.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// A reply: the used length the device reported, and the parsed header and body when present.
#[derive(Debug, Clone)]
pub struct Reply {
    pub used: u32,
    /// `fuse_out_header.len` (0 when the device wrote no header).
    pub len: u32,
    pub error: i32,
    pub unique: u64,
    /// The bytes after the header, within the reply buffer.
    pub body: Vec<u8>,
}

pub struct Fuse {
    pub fe: Frontend,
    unique: u64,
    req: u64,
    rep: u64,
    /// The caller the header of every [`Fuse::call`] names (see [`Fuse::with_ids`]).
    pub uid: u32,
    pub gid: u32,
    /// How long a request may go unanswered before the call fails (see [`CallError`]).
    pub deadline: Duration,
    /// Set once a request went unanswered: its chain still owns the shared buffers.
    wedged: bool,
}

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("request {unique} (opcode {opcode}) not answered within {deadline:?}")]
    Unanswered {
        opcode: u32,
        unique: u64,
        deadline: Duration,
    },
    #[error("an earlier request was never answered: this connection can carry no more")]
    Wedged,
    #[error("queue {0} has no room for another chain")]
    QueueFull(usize),
    #[error("request {sent} answered as {got} (used length {used})")]
    Misdirected { sent: u64, got: u64, used: u32 },
}

/// The 40-byte `fuse_in_header` for a message of `len` bytes.
pub fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(IN_HEADER_LEN);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&uid.to_le_bytes());
    h.extend_from_slice(&gid.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u32.to_le_bytes()); // total_extlen, padding
    h
}

impl Fuse {
    /// Connects with the hiprio queue and one request queue.
    pub fn connect(socket: &Path) -> Result<Self> {
        Self::connect_queues(socket, 1)
    }

    /// Connects with the hiprio queue and `request_queues` request queues (queues 1 to
    /// `request_queues`), as a guest does when the device offers several
    /// (`num_request_queues`); the calls below use queue 1.
    pub fn connect_queues(socket: &Path, request_queues: usize) -> Result<Self> {
        let fe = Frontend::connect(
            socket,
            &Setup {
                num_queues: 1 + request_queues,
                queue_size: 256,
                mem_size: 16 << 20,
                ..Setup::default()
            },
        )?;
        let req = fe.mem.alloc(u64::from(BUF_LEN), 4096);
        let rep = fe.mem.alloc(u64::from(BUF_LEN), 4096);
        Ok(Fuse {
            fe,
            unique: 0,
            req,
            rep,
            uid: 0,
            gid: 0,
            deadline: DEFAULT_DEADLINE,
            wedged: false,
        })
    }

    pub fn next_unique(&mut self) -> u64 {
        self.unique += 2;
        self.unique
    }

    /// Runs `f` with `uid`/`gid` in the header of every request it sends, as when a guest
    /// process of that user makes the system calls.
    pub fn with_ids<T>(&mut self, uid: u32, gid: u32, f: impl FnOnce(&mut Self) -> T) -> T {
        let saved = (self.uid, self.gid);
        (self.uid, self.gid) = (uid, gid);
        let r = f(self);
        (self.uid, self.gid) = saved;
        r
    }

    /// Sends `msg` as the readable part of one chain on queue `q`, with `reply_cap` writable
    /// bytes (none: no writable descriptor), and waits up to [`Fuse::deadline`] for the
    /// completion. A device that claims more bytes than the buffer had shows in
    /// [`Reply::used`]; only the buffer itself is read.
    pub fn try_send_raw(
        &mut self,
        q: usize,
        msg: &[u8],
        reply_cap: u32,
    ) -> std::result::Result<Reply, CallError> {
        if self.wedged {
            return Err(CallError::Wedged);
        }
        let mem = &self.fe.mem;
        mem.write(self.req, msg);
        let mut descs = vec![Desc::r(self.req, msg.len() as u32)];
        if reply_cap > 0 {
            mem.write(self.rep, &[0u8; OUT_HEADER_LEN]);
            descs.push(Desc::w(self.rep, reply_cap));
        }
        let queue = &mut self.fe.queues[q];
        queue.add(mem, &descs).ok_or(CallError::QueueFull(q))?;
        queue.publish(mem);
        let done = queue.wait_used(mem, 1, self.deadline);
        let Some(&(_, used)) = done.first() else {
            // The chain still owns the buffers: nothing more can be sent safely.
            self.wedged = true;
            return Err(CallError::Unanswered {
                opcode: le32(msg, 4),
                unique: le64(msg, 8),
                deadline: self.deadline,
            });
        };
        let readable = used.min(reply_cap) as usize;
        let out = if readable >= OUT_HEADER_LEN {
            mem.read_vec(self.rep, readable)
        } else {
            Vec::new()
        };
        Ok(Reply {
            used,
            len: le32(&out, 0),
            error: le32(&out, 4) as i32,
            unique: le64(&out, 8),
            body: out.get(OUT_HEADER_LEN..).unwrap_or(&[]).to_vec(),
        })
    }

    /// Sends `msg` on the request queue cut into device-readable descriptors at the offsets
    /// `cuts`, with one device-writable descriptor per entry of `reply_lens`, laid out with
    /// [`SPLIT_GAP`] bytes of [`CANARY`] before, between and after them. Returns the reply
    /// reassembled from the pieces (as much of it as `used` covers) and whether every canary
    /// byte is intact, i.e. the device wrote nothing outside the descriptors.
    pub fn send_split(&mut self, msg: &[u8], cuts: &[usize], reply_lens: &[u32]) -> (Reply, bool) {
        assert!(!self.wedged, "an earlier request was never answered");
        let total: u64 = reply_lens.iter().map(|&l| u64::from(l) + SPLIT_GAP).sum();
        assert!(
            total + SPLIT_GAP <= u64::from(BUF_LEN),
            "reply pieces too large"
        );
        let mem = &self.fe.mem;
        mem.write(self.req, msg);
        let mut descs = Vec::new();
        let mut at = 0usize;
        for &c in cuts.iter().chain([msg.len()].iter()) {
            if c > at {
                descs.push(Desc::r(self.req + at as u64, (c - at) as u32));
                at = c;
            }
        }
        mem.write(self.rep, &vec![CANARY; (total + SPLIT_GAP) as usize]);
        let mut pieces = Vec::new();
        let mut addr = self.rep + SPLIT_GAP;
        for &l in reply_lens {
            descs.push(Desc::w(addr, l));
            pieces.push((addr, l));
            addr += u64::from(l) + SPLIT_GAP;
        }
        let queue = &mut self.fe.queues[1];
        queue.add(mem, &descs).expect("ring has room");
        queue.publish(mem);
        let done = queue.wait_used(mem, 1, self.deadline);
        let Some(&(_, used)) = done.first() else {
            self.wedged = true;
            panic!(
                "request {} not answered within {:?}",
                le64(msg, 8),
                self.deadline
            );
        };
        let mut out = Vec::new();
        for &(a, l) in &pieces {
            let n = (used as usize).saturating_sub(out.len()).min(l as usize);
            out.extend_from_slice(&mem.read_vec(a, n));
        }
        let all = mem.read_vec(self.rep, (total + SPLIT_GAP) as usize);
        let mut intact = true;
        let mut gap_start = 0u64;
        for &(a, l) in &pieces {
            intact &= all[gap_start as usize..(a - self.rep) as usize]
                .iter()
                .all(|&b| b == CANARY);
            gap_start = a - self.rep + u64::from(l);
        }
        intact &= all[gap_start as usize..].iter().all(|&b| b == CANARY);
        let reply = Reply {
            used,
            len: le32(&out, 0),
            error: le32(&out, 4) as i32,
            unique: le64(&out, 8),
            body: out.get(OUT_HEADER_LEN..).unwrap_or(&[]).to_vec(),
        };
        (reply, intact)
    }

    /// [`Fuse::try_send_raw`] that panics when the request goes unanswered.
    pub fn send_raw(&mut self, q: usize, msg: &[u8], reply_cap: u32) -> Reply {
        self.try_send_raw(q, msg, reply_cap)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A well-formed request on the request queue: header + `args` concatenated.
    pub fn call(&mut self, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Reply {
        self.call_cap(opcode, nodeid, args, BUF_LEN)
    }

    /// [`Fuse::call`] with `reply_cap` writable bytes. The Linux driver sizes the reply buffer
    /// of a READ to the bytes asked for, and virtiofsd relies on it.
    pub fn call_cap(&mut self, opcode: u32, nodeid: u64, args: &[&[u8]], reply_cap: u32) -> Reply {
        let (uid, gid) = (self.uid, self.gid);
        self.try_call_as(uid, gid, opcode, nodeid, args, reply_cap)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A well-formed request whose header names `uid`/`gid` as the caller, with `reply_cap`
    /// writable bytes; the reply must carry the request's `unique`.
    pub fn try_call_as(
        &mut self,
        uid: u32,
        gid: u32,
        opcode: u32,
        nodeid: u64,
        args: &[&[u8]],
        reply_cap: u32,
    ) -> std::result::Result<Reply, CallError> {
        let len = IN_HEADER_LEN + args.iter().map(|a| a.len()).sum::<usize>();
        let unique = self.next_unique();
        let mut msg = in_header(len as u32, opcode, unique, nodeid, uid, gid);
        for a in args {
            msg.extend_from_slice(a);
        }
        let r = self.try_send_raw(1, &msg, reply_cap)?;
        if r.unique != unique {
            return Err(CallError::Misdirected {
                sent: unique,
                got: r.unique,
                used: r.used,
            });
        }
        Ok(r)
    }

    /// A FORGET (or BATCH_FORGET) on the hiprio queue: no reply.
    pub fn forget(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> u32 {
        let len = IN_HEADER_LEN + args.len();
        let unique = self.next_unique();
        let mut msg = in_header(len as u32, opcode, unique, nodeid, self.uid, self.gid);
        msg.extend_from_slice(args);
        self.send_raw(0, &msg, 0).used
    }
}

/// The opcodes the convenience calls below use (Linux `fuse.h`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const RELEASEDIR: u32 = 29;
    pub const CREATE: u32 = 35;
    pub const BATCH_FORGET: u32 = 42;
}

/// `fuse_setattr_in.valid` bits (Linux `fuse.h`).
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    /// Clear setuid/setgid as the kernel would (with `FUSE_HANDLE_KILLPRIV_V2`).
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// The attributes of a reply (`fuse_attr`), the fields tests look at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mtime: u64,
    pub mtimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

impl Attr {
    /// `fuse_attr` at the start of `b`.
    fn parse(b: &[u8]) -> Self {
        Attr {
            ino: le64(b, 0),
            size: le64(b, 8),
            mtime: le64(b, 32),
            mtimensec: le32(b, 52),
            mode: le32(b, 60),
            nlink: le32(b, 64),
            uid: le32(b, 68),
            gid: le32(b, 72),
            rdev: le32(b, 76),
        }
    }
}

/// A `fuse_entry_out`: the node id and its attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub attr: Attr,
}

const ENTRY_OUT_LEN: usize = 128;
const ENTRY_ATTR_AT: usize = 40;
const ATTR_OUT_ATTR_AT: usize = 16;

impl Entry {
    fn parse(b: &[u8]) -> Self {
        Entry {
            nodeid: le64(b, 0),
            attr: Attr::parse(b.get(ENTRY_ATTR_AT..).unwrap_or(&[])),
        }
    }
}

/// The `fuse_setattr_in` fields a caller sets; [`SetAttr::bytes`] lays them out.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl SetAttr {
    pub fn bytes(&self) -> [u8; 88] {
        let mut a = [0u8; 88];
        a[0..4].copy_from_slice(&self.valid.to_le_bytes());
        a[8..16].copy_from_slice(&self.fh.to_le_bytes());
        a[16..24].copy_from_slice(&self.size.to_le_bytes());
        a[32..40].copy_from_slice(&self.atime.to_le_bytes());
        a[40..48].copy_from_slice(&self.mtime.to_le_bytes());
        a[68..72].copy_from_slice(&self.mode.to_le_bytes());
        a[76..80].copy_from_slice(&self.uid.to_le_bytes());
        a[80..84].copy_from_slice(&self.gid.to_le_bytes());
        a
    }
}

/// What GETXATTR and LISTXATTR return: the size needed (asked with size 0), or the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Xattr {
    Size(u32),
    Value(Vec<u8>),
}

/// The INIT reply fields a caller looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitReply {
    pub major: u32,
    pub minor: u32,
    /// `flags | flags2 << 32`.
    pub flags: u64,
    pub max_write: u32,
}

fn cname(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .unwrap_or(0)
}

/// Well-formed calls for benchmarks and tests; each returns the errno (negative) as `Err`, and
/// panics when the request goes unanswered past [`Fuse::deadline`].
impl Fuse {
    fn ok(r: Reply) -> std::result::Result<Reply, i32> {
        if r.error == 0 {
            Ok(r)
        } else {
            Err(r.error)
        }
    }

    /// FUSE INIT as a 7.38 guest offering every flag of the first word.
    pub fn init(&mut self) -> std::result::Result<(), i32> {
        self.init_with(u64::from(u32::MAX)).map(|_| ())
    }

    /// FUSE INIT as a 7.38 guest offering `flags` (bits 32.. go in `flags2`, which the device
    /// reads when bit 30, `FUSE_INIT_EXT`, is offered too).
    pub fn init_with(&mut self, flags: u64) -> std::result::Result<InitReply, i32> {
        let mut a = vec![0u8; 64];
        a[0..4].copy_from_slice(&7u32.to_le_bytes());
        a[4..8].copy_from_slice(&38u32.to_le_bytes());
        a[8..12].copy_from_slice(&(128u32 << 10).to_le_bytes());
        a[12..16].copy_from_slice(&(flags as u32).to_le_bytes());
        a[16..20].copy_from_slice(&((flags >> 32) as u32).to_le_bytes());
        let r = Self::ok(self.call(op::INIT, 0, &[&a]))?;
        let b = &r.body;
        Ok(InitReply {
            major: le32(b, 0),
            minor: le32(b, 4),
            flags: u64::from(le32(b, 12)) | u64::from(le32(b, 32)) << 32,
            max_write: le32(b, 20),
        })
    }

    /// LOOKUP: the node id.
    pub fn lookup(&mut self, parent: u64, name: &str) -> std::result::Result<u64, i32> {
        self.lookup_entry(parent, name).map(|e| e.nodeid)
    }

    /// LOOKUP: the whole entry.
    pub fn lookup_entry(&mut self, parent: u64, name: &str) -> std::result::Result<Entry, i32> {
        Self::ok(self.call(op::LOOKUP, parent, &[&cname(name)])).map(|r| Entry::parse(&r.body))
    }

    pub fn getattr(&mut self, node: u64) -> std::result::Result<(), i32> {
        self.stat(node).map(|_| ())
    }

    /// GETATTR: the attributes.
    pub fn stat(&mut self, node: u64) -> std::result::Result<Attr, i32> {
        Self::ok(self.call(op::GETATTR, node, &[&[0u8; 16]]))
            .map(|r| Attr::parse(r.body.get(ATTR_OUT_ATTR_AT..).unwrap_or(&[])))
    }

    /// SETATTR: the attributes after it.
    pub fn setattr(&mut self, node: u64, a: &SetAttr) -> std::result::Result<Attr, i32> {
        Self::ok(self.call(op::SETATTR, node, &[&a.bytes()]))
            .map(|r| Attr::parse(r.body.get(ATTR_OUT_ATTR_AT..).unwrap_or(&[])))
    }

    /// MKNOD of `mode` (file type bits included) with `rdev` encoded as the Linux driver
    /// encodes it (`new_encode_dev`).
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> std::result::Result<Entry, i32> {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&mode.to_le_bytes());
        a[4..8].copy_from_slice(&rdev.to_le_bytes());
        Self::ok(self.call(op::MKNOD, parent, &[&a, &cname(name)])).map(|r| Entry::parse(&r.body))
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> std::result::Result<Entry, i32> {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&mode.to_le_bytes());
        Self::ok(self.call(op::MKDIR, parent, &[&a, &cname(name)])).map(|r| Entry::parse(&r.body))
    }

    pub fn rmdir(&mut self, parent: u64, name: &str) -> std::result::Result<(), i32> {
        Self::ok(self.call(op::RMDIR, parent, &[&cname(name)])).map(|_| ())
    }

    pub fn rename(
        &mut self,
        parent: u64,
        old: &str,
        newdir: u64,
        new: &str,
    ) -> std::result::Result<(), i32> {
        let a = newdir.to_le_bytes();
        Self::ok(self.call(op::RENAME, parent, &[&a, &cname(old), &cname(new)])).map(|_| ())
    }

    /// OPEN: the file handle.
    pub fn open(&mut self, node: u64, flags: u32) -> std::result::Result<u64, i32> {
        self.open_with(node, flags, 0)
    }

    /// OPEN with `fuse_open_in.open_flags` (`FUSE_OPEN_KILL_SUIDGID`, ...): the file handle.
    pub fn open_with(
        &mut self,
        node: u64,
        flags: u32,
        open_flags: u32,
    ) -> std::result::Result<u64, i32> {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        a[4..8].copy_from_slice(&open_flags.to_le_bytes());
        Self::ok(self.call(op::OPEN, node, &[&a])).map(|r| le64(&r.body, 0))
    }

    /// CREATE (mode 0644): (node id, file handle).
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: u32,
    ) -> std::result::Result<(u64, u64), i32> {
        self.create_with(parent, name, flags, 0o100644, 0)
            .map(|(e, fh)| (e.nodeid, fh))
    }

    /// CREATE with every argument chosen: (entry, file handle).
    pub fn create_with(
        &mut self,
        parent: u64,
        name: &str,
        flags: u32,
        mode: u32,
        open_flags: u32,
    ) -> std::result::Result<(Entry, u64), i32> {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        a[4..8].copy_from_slice(&mode.to_le_bytes());
        a[12..16].copy_from_slice(&open_flags.to_le_bytes());
        Self::ok(self.call(op::CREATE, parent, &[&a, &cname(name)]))
            .map(|r| (Entry::parse(&r.body), le64(&r.body, ENTRY_OUT_LEN)))
    }

    fn release_in(fh: u64) -> [u8; 24] {
        let mut a = [0u8; 24];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a
    }

    pub fn release(&mut self, node: u64, fh: u64) -> std::result::Result<(), i32> {
        Self::ok(self.call(op::RELEASE, node, &[&Self::release_in(fh)])).map(|_| ())
    }

    /// OPENDIR: the directory handle.
    pub fn opendir(&mut self, node: u64) -> std::result::Result<u64, i32> {
        Self::ok(self.call(op::OPENDIR, node, &[&[0u8; 8]])).map(|r| le64(&r.body, 0))
    }

    pub fn releasedir(&mut self, node: u64, fh: u64) -> std::result::Result<(), i32> {
        Self::ok(self.call(op::RELEASEDIR, node, &[&Self::release_in(fh)])).map(|_| ())
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> std::result::Result<(), i32> {
        Self::ok(self.call(op::UNLINK, parent, &[&cname(name)])).map(|_| ())
    }

    /// GETXATTR asking for at most `size` bytes (0: the size needed).
    pub fn getxattr(
        &mut self,
        node: u64,
        name: &str,
        size: u32,
    ) -> std::result::Result<Xattr, i32> {
        let r = self.call(op::GETXATTR, node, &[&Self::xattr_in(size), &cname(name)]);
        Self::xattr_out(Self::ok(r)?, size)
    }

    /// LISTXATTR asking for at most `size` bytes (0: the size needed).
    pub fn listxattr(&mut self, node: u64, size: u32) -> std::result::Result<Xattr, i32> {
        let r = self.call(op::LISTXATTR, node, &[&Self::xattr_in(size)]);
        Self::xattr_out(Self::ok(r)?, size)
    }

    fn xattr_in(size: u32) -> [u8; 8] {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&size.to_le_bytes());
        a
    }

    fn xattr_out(r: Reply, size: u32) -> std::result::Result<Xattr, i32> {
        if size == 0 {
            // `fuse_getxattr_out`; anything else is a malformed reply.
            if r.body.len() != 8 {
                return Err(-libc::EPROTO);
            }
            return Ok(Xattr::Size(le32(&r.body, 0)));
        }
        Ok(Xattr::Value(r.body))
    }

    /// `fuse_read_in` / `fuse_write_in` (the same 40-byte layout).
    pub fn rw_in(fh: u64, offset: u64, size: u32, rw_flags: u32) -> [u8; 40] {
        let mut a = [0u8; 40];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a[8..16].copy_from_slice(&offset.to_le_bytes());
        a[16..20].copy_from_slice(&size.to_le_bytes());
        a[20..24].copy_from_slice(&rw_flags.to_le_bytes());
        a
    }

    /// READ: the bytes read.
    pub fn read(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> std::result::Result<usize, i32> {
        self.read_bytes(node, fh, offset, size).map(|b| b.len())
    }

    /// READ into a reply buffer of just `size` bytes, as the Linux driver sizes it.
    pub fn read_bytes(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> std::result::Result<Vec<u8>, i32> {
        let cap = OUT_HEADER_LEN as u32 + size;
        let a = Self::rw_in(fh, offset, size, 0);
        Self::ok(self.call_cap(op::READ, node, &[&a], cap)).map(|r| r.body)
    }

    pub fn write(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), i32> {
        self.write_with(node, fh, offset, data, 0).map(|_| ())
    }

    /// WRITE with `fuse_write_in.write_flags` (`FUSE_WRITE_KILL_SUIDGID`, ...): the bytes
    /// written.
    pub fn write_with(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
    ) -> std::result::Result<u32, i32> {
        let a = Self::rw_in(fh, offset, data.len() as u32, write_flags);
        Self::ok(self.call(op::WRITE, node, &[&a, data])).map(|r| le32(&r.body, 0))
    }

    /// BATCH_FORGET of `(node, nlookup)` pairs on the hiprio queue.
    pub fn batch_forget(&mut self, items: &[(u64, u64)]) {
        for chunk in items.chunks(4096) {
            let mut a = Vec::with_capacity(8 + 16 * chunk.len());
            a.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            a.extend_from_slice(&0u32.to_le_bytes());
            for (n, k) in chunk {
                a.extend_from_slice(&n.to_le_bytes());
                a.extend_from_slice(&k.to_le_bytes());
            }
            self.forget(op::BATCH_FORGET, 0, &a);
        }
    }
}
