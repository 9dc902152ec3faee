//! virtio-blk requests: splitting a descriptor chain into its device-readable bytes, its
//! device-writable bytes and the status byte, without assuming any layout (the header, data and
//! status may be split or merged across descriptors in any way), then executing the request that
//! [`crate::parse`] made of it on the block layer. Pure over guest memory: tested with
//! `GuestMemoryMmap` (crates/blk/tests/vhost.rs drives it over a socket, crates/fuzz alone).

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vsnap_block::{BlockError, Disk};
pub use vsnap_vhost::chain::{gather, scatter, Seg};
use vsnap_vhost::chain::{SegList, Segments};

use crate::config::Limits;
use crate::parse::{self, Header, Refused, Request, HEADER_LEN};
pub use crate::parse::{ID_LEN, S_IOERR, S_OK, S_UNSUPP};

/// Requests are moved between guest memory and the disk in pieces of at most this size.
const CHUNK: usize = 1 << 20;

/// A virtio-blk descriptor chain: the shared split, with the status byte taken off the end.
#[derive(Debug, Default)]
pub struct Chain {
    pub readable: SegList,
    /// Device-writable bytes, the status byte excluded.
    pub writable: SegList,
    pub status: Option<GuestAddress>,
    /// Why the chain is malformed, if it is.
    pub defect: Option<&'static str>,
}

impl Chain {
    /// Splits descriptors `(addr, len, device_writable)` in chain order. The status byte is the
    /// last device-writable byte; a chain whose last writable byte lies outside guest memory has
    /// no status to write.
    pub fn split<M: GuestMemoryBackend>(
        descs: impl IntoIterator<Item = (GuestAddress, u32, bool)>,
        mem: &M,
    ) -> Self {
        let Segments {
            readable,
            mut writable,
            defect,
        } = Segments::split(descs, mem);
        let mut status = None;
        if let Some(last) = writable.last_mut() {
            let at = last.addr.checked_add(u64::from(last.len) - 1);
            if let Some(at) = at.filter(|&a| mem.check_range(a, 1)) {
                status = Some(at);
                last.len -= 1;
                if last.len == 0 {
                    writable.pop();
                }
            }
        }
        Chain {
            readable,
            writable,
            status,
            defect,
        }
    }

    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// What the device knows when executing a request.
pub struct Ctx<'a> {
    pub disk: &'a Disk,
    pub limits: Limits,
    pub serial: &'a [u8],
    /// False in write-through mode: every write is made durable before it completes.
    pub writeback: bool,
}

/// The result of one request: the status byte and the used length to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub len: u32,
    /// Set when the request failed because of guest input: a short label for logging.
    pub fault: Option<&'static str>,
}

impl Outcome {
    fn ok(len: u32) -> Self {
        Self {
            status: S_OK,
            len,
            fault: None,
        }
    }
    fn err(status: u8, fault: &'static str) -> Self {
        Self {
            status,
            len: 1,
            fault: Some(fault),
        }
    }
}

impl From<Refused> for Outcome {
    fn from(r: Refused) -> Self {
        Outcome::err(r.status, r.why)
    }
}

/// Executes the request in `chain` and writes its status byte. Returns `None` when the chain has
/// no status byte to write (the caller completes it with length 0).
pub fn process<M: GuestMemoryBackend>(
    ctx: &Ctx<'_>,
    mem: &M,
    chain: &Chain,
    buf: &mut Vec<u8>,
) -> Option<Outcome> {
    let status = chain.status?;
    let out = match chain.defect {
        Some(d) => Outcome::err(S_IOERR, d),
        None => execute(ctx, mem, chain, buf),
    };
    if mem.write_obj(out.status, status).is_err() {
        return None;
    }
    Some(out)
}

fn execute<M: GuestMemoryBackend>(
    ctx: &Ctx<'_>,
    mem: &M,
    chain: &Chain,
    buf: &mut Vec<u8>,
) -> Outcome {
    let mut hdr = [0u8; HEADER_LEN as usize];
    if chain.readable_len() < HEADER_LEN || !gather(mem, &chain.readable, 0, &mut hdr) {
        return Outcome::err(S_IOERR, "request header shorter than 16 bytes");
    }
    let disk = ctx.disk;
    let dev = parse::Device {
        capacity: disk.geometry().size,
        readonly: disk.readonly(),
        limits: ctx.limits,
    };
    let out_len = chain.readable_len() - HEADER_LEN;
    let req = match parse::parse(&dev, Header::parse(&hdr), out_len, chain.writable_len()) {
        Ok(r) => r,
        Err(refused) => return refused.into(),
    };
    let out = match req {
        Request::Read { offset, len } => {
            let io = disk.io();
            let mut done = 0u64;
            let mut res = Outcome::ok(u32::try_from(len + 1).unwrap_or(u32::MAX));
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                buf.resize(n.max(buf.len()), 0);
                if let Err(e) = io.read(offset + done, &mut buf[..n]) {
                    res = block_err(e);
                    break;
                }
                if !scatter(mem, &chain.writable, done, &buf[..n]) {
                    res = Outcome::err(S_IOERR, "guest buffer not writable");
                    break;
                }
                done += n as u64;
            }
            res
        }
        Request::Write { offset, len } => {
            let io = disk.io();
            let mut done = 0u64;
            let mut res = Outcome::ok(1);
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                buf.resize(n.max(buf.len()), 0);
                if !gather(mem, &chain.readable, HEADER_LEN + done, &mut buf[..n]) {
                    res = Outcome::err(S_IOERR, "guest buffer not readable");
                    break;
                }
                if let Err(e) = io.write(offset + done, &buf[..n]) {
                    res = block_err(e);
                    break;
                }
                done += n as u64;
            }
            res
        }
        Request::Flush => match disk.flush() {
            Ok(()) => Outcome::ok(1),
            Err(e) => block_err(e),
        },
        Request::GetId => {
            let mut id = [0u8; ID_LEN];
            let n = ctx.serial.len().min(ID_LEN);
            id[..n].copy_from_slice(&ctx.serial[..n]);
            if scatter(mem, &chain.writable, 0, &id) {
                Outcome::ok(ID_LEN as u32 + 1)
            } else {
                Outcome::err(S_IOERR, "guest buffer not writable")
            }
        }
        Request::Ranges { discard, .. } => ranges(ctx, &dev, mem, chain, discard, buf),
    };
    if req.writes() && out.status == S_OK && !ctx.writeback {
        if let Err(e) = disk.flush() {
            return block_err(e);
        }
    }
    out
}

fn block_err(e: BlockError) -> Outcome {
    match e {
        BlockError::OutOfRange { .. } => Outcome::err(S_IOERR, "request past capacity"),
        BlockError::Unaligned { .. } => Outcome::err(S_IOERR, "request not sector aligned"),
        BlockError::ReadOnly => Outcome::err(S_IOERR, "write to a read-only disk"),
        e => {
            tracing::error!(error = %e, "I/O error");
            Outcome {
                status: S_IOERR,
                len: 1,
                fault: None,
            }
        }
    }
}

/// DISCARD and WRITE_ZEROES: every segment is checked before any is executed, and all run
/// under one request ticket.
fn ranges<M: GuestMemoryBackend>(
    ctx: &Ctx<'_>,
    dev: &parse::Device,
    mem: &M,
    chain: &Chain,
    discard: bool,
    buf: &mut Vec<u8>,
) -> Outcome {
    let len = (chain.readable_len() - HEADER_LEN) as usize;
    buf.resize(len.max(buf.len()), 0);
    let payload = &mut buf[..len];
    if !gather(mem, &chain.readable, HEADER_LEN, payload) {
        return Outcome::err(S_IOERR, "guest buffer not readable");
    }
    let segs = match parse::segments(dev, discard, payload) {
        Ok(s) => s,
        Err(refused) => return refused.into(),
    };
    let io = ctx.disk.io();
    for s in segs {
        let r = if discard {
            io.discard(s.offset, s.len)
        } else {
            io.write_zeroes(s.offset, s.len)
        };
        if let Err(e) = r {
            return block_err(e);
        }
    }
    Outcome::ok(1)
}
