//! A FUSE client over a virtio-fs device, as the guest kernel's virtiofs driver drives it: queue
//! 0 is the hiprio queue (FORGET), queue 1 carries requests. Messages are raw bytes, so tests can
//! send anything, malformed included; [`Fuse::call`] builds the header for well-formed ones.

use std::path::Path;
use std::time::Duration;

use crate::{Desc, Frontend, Result, Setup};

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// Request and reply buffers: a 1 MiB payload plus headers.
pub const BUF_LEN: u32 = (1 << 20) + 4096;
const WAIT: Duration = Duration::from_secs(10);

/// A reply: the used length the device reported, and the parsed header and body when present.
#[derive(Debug, Clone)]
pub struct Reply {
    pub used: u32,
    pub error: i32,
    pub unique: u64,
    pub body: Vec<u8>,
}

pub struct Fuse {
    pub fe: Frontend,
    unique: u64,
    req: u64,
    rep: u64,
    pub uid: u32,
    pub gid: u32,
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
        let fe = Frontend::connect(
            socket,
            &Setup {
                num_queues: 2,
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
        })
    }

    pub fn next_unique(&mut self) -> u64 {
        self.unique += 2;
        self.unique
    }

    /// Sends `msg` as the readable part of one chain on queue `q`, with `reply_cap` writable
    /// bytes (none: no writable descriptor), and waits for the completion.
    pub fn send_raw(&mut self, q: usize, msg: &[u8], reply_cap: u32) -> Reply {
        let mem = &self.fe.mem;
        mem.write(self.req, msg);
        let mut descs = vec![Desc::r(self.req, msg.len() as u32)];
        if reply_cap > 0 {
            mem.write(self.rep, &[0u8; OUT_HEADER_LEN]);
            descs.push(Desc::w(self.rep, reply_cap));
        }
        let queue = &mut self.fe.queues[q];
        queue.add(mem, &descs).expect("queue has room");
        queue.publish(mem);
        let done = queue.wait_used(mem, 1, WAIT);
        assert_eq!(done.len(), 1, "request not completed");
        let used = done[0].1;
        let out = if used as usize >= OUT_HEADER_LEN {
            mem.read_vec(self.rep, used as usize)
        } else {
            Vec::new()
        };
        let field = |r: std::ops::Range<usize>| out.get(r).unwrap_or(&[0; 8][..]).to_vec();
        Reply {
            used,
            error: i32::from_le_bytes(field(4..8)[..4].try_into().expect("4 bytes")),
            unique: u64::from_le_bytes(field(8..16)[..8].try_into().expect("8 bytes")),
            body: out.get(OUT_HEADER_LEN..).unwrap_or(&[]).to_vec(),
        }
    }

    /// A well-formed request on the request queue: header + `args` concatenated.
    pub fn call(&mut self, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Reply {
        self.call_cap(opcode, nodeid, args, BUF_LEN)
    }

    /// [`Fuse::call`] with `reply_cap` writable bytes. The Linux driver sizes the reply buffer
    /// of a READ to the bytes asked for, and virtiofsd relies on it.
    pub fn call_cap(&mut self, opcode: u32, nodeid: u64, args: &[&[u8]], reply_cap: u32) -> Reply {
        let len = IN_HEADER_LEN + args.iter().map(|a| a.len()).sum::<usize>();
        let unique = self.next_unique();
        let mut msg = in_header(len as u32, opcode, unique, nodeid, self.uid, self.gid);
        for a in args {
            msg.extend_from_slice(a);
        }
        let r = self.send_raw(1, &msg, reply_cap);
        assert_eq!(r.unique, unique, "reply to another request");
        r
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
    pub const UNLINK: u32 = 10;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const RELEASE: u32 = 18;
    pub const INIT: u32 = 26;
    pub const CREATE: u32 = 35;
    pub const BATCH_FORGET: u32 = 42;
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

/// Well-formed calls for benchmarks; each returns the errno (negative) as `Err`.
impl Fuse {
    fn ok(r: Reply) -> std::result::Result<Reply, i32> {
        if r.error == 0 {
            Ok(r)
        } else {
            Err(r.error)
        }
    }

    /// FUSE INIT as a 7.38 guest offering every flag.
    pub fn init(&mut self) -> std::result::Result<(), i32> {
        let mut a = vec![0u8; 64];
        a[0..4].copy_from_slice(&7u32.to_le_bytes());
        a[4..8].copy_from_slice(&38u32.to_le_bytes());
        a[8..12].copy_from_slice(&(128u32 << 10).to_le_bytes());
        a[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        Self::ok(self.call(op::INIT, 0, &[&a])).map(|_| ())
    }

    /// LOOKUP: the node id.
    pub fn lookup(&mut self, parent: u64, name: &str) -> std::result::Result<u64, i32> {
        Self::ok(self.call(op::LOOKUP, parent, &[&cname(name)])).map(|r| le64(&r.body, 0))
    }

    pub fn getattr(&mut self, node: u64) -> std::result::Result<(), i32> {
        Self::ok(self.call(op::GETATTR, node, &[&[0u8; 16]])).map(|_| ())
    }

    /// OPEN: the file handle.
    pub fn open(&mut self, node: u64, flags: u32) -> std::result::Result<u64, i32> {
        let mut a = [0u8; 8];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        Self::ok(self.call(op::OPEN, node, &[&a])).map(|r| le64(&r.body, 0))
    }

    /// CREATE (mode 0644): (node id, file handle).
    pub fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: u32,
    ) -> std::result::Result<(u64, u64), i32> {
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&flags.to_le_bytes());
        a[4..8].copy_from_slice(&0o100644u32.to_le_bytes());
        Self::ok(self.call(op::CREATE, parent, &[&a, &cname(name)]))
            .map(|r| (le64(&r.body, 0), le64(&r.body, 128)))
    }

    pub fn release(&mut self, node: u64, fh: u64) -> std::result::Result<(), i32> {
        let mut a = [0u8; 24];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        Self::ok(self.call(op::RELEASE, node, &[&a])).map(|_| ())
    }

    pub fn unlink(&mut self, parent: u64, name: &str) -> std::result::Result<(), i32> {
        Self::ok(self.call(op::UNLINK, parent, &[&cname(name)])).map(|_| ())
    }

    fn rw_in(fh: u64, offset: u64, size: u32) -> [u8; 40] {
        let mut a = [0u8; 40];
        a[0..8].copy_from_slice(&fh.to_le_bytes());
        a[8..16].copy_from_slice(&offset.to_le_bytes());
        a[16..20].copy_from_slice(&size.to_le_bytes());
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
        let cap = OUT_HEADER_LEN as u32 + size;
        Self::ok(self.call_cap(op::READ, node, &[&Self::rw_in(fh, offset, size)], cap))
            .map(|r| r.body.len())
    }

    pub fn write(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), i32> {
        let a = Self::rw_in(fh, offset, data.len() as u32);
        Self::ok(self.call(op::WRITE, node, &[&a, data])).map(|_| ())
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
