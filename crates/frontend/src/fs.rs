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
        let len = IN_HEADER_LEN + args.iter().map(|a| a.len()).sum::<usize>();
        let unique = self.next_unique();
        let mut msg = in_header(len as u32, opcode, unique, nodeid, self.uid, self.gid);
        for a in args {
            msg.extend_from_slice(a);
        }
        let r = self.send_raw(1, &msg, BUF_LEN);
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
