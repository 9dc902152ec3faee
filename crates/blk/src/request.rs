//! virtio-blk requests: splitting a descriptor chain into its device-readable bytes, its
//! device-writable bytes and the status byte, without assuming any layout (the header, data and
//! status may be split or merged across descriptors in any way), then executing the request on
//! the block layer. Pure over guest memory: unit-tested with `GuestMemoryMmap`, no sockets.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vsnap_block::{BlockError, Disk};
use vsnap_vhost::chain::Segments;
pub use vsnap_vhost::chain::{gather, scatter, Seg};

use crate::config::Limits;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_FLUSH_OUT: u32 = 5; // legacy name of FLUSH
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const T_BARRIER: u32 = 0x8000_0000; // legacy flag; masked off like QEMU does
const SEG_UNMAP: u32 = 1;
pub const ID_LEN: usize = 20;
/// Requests are moved between guest memory and the disk in pieces of at most this size.
const CHUNK: usize = 1 << 20;

/// A virtio-blk descriptor chain: the shared split, with the status byte taken off the end.
#[derive(Debug, Default)]
pub struct Chain {
    pub readable: Vec<Seg>,
    /// Device-writable bytes, the status byte excluded.
    pub writable: Vec<Seg>,
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
    let mut hdr = [0u8; 16];
    if chain.readable_len() < 16 || !gather(mem, &chain.readable, 0, &mut hdr) {
        return Outcome::err(S_IOERR, "request header shorter than 16 bytes");
    }
    let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes")) & !T_BARRIER;
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    let disk = ctx.disk;
    let writes = matches!(kind, T_OUT | T_DISCARD | T_WRITE_ZEROES);
    if writes && disk.readonly() {
        return Outcome::err(S_IOERR, "write to a read-only disk");
    }
    let out = match kind {
        T_IN => {
            let len = chain.writable_len();
            match transfer_range(sector, len) {
                Err(f) => Outcome::err(S_IOERR, f),
                Ok(off) => {
                    let io = disk.io();
                    let mut done = 0u64;
                    let mut res = Outcome::ok(u32::try_from(len + 1).unwrap_or(u32::MAX));
                    while done < len {
                        let n = (len - done).min(CHUNK as u64) as usize;
                        buf.resize(n.max(buf.len()), 0);
                        if let Err(e) = io.read(off + done, &mut buf[..n]) {
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
            }
        }
        T_OUT => {
            let len = chain.readable_len() - 16;
            match transfer_range(sector, len) {
                Err(f) => Outcome::err(S_IOERR, f),
                Ok(off) => {
                    let io = disk.io();
                    let mut done = 0u64;
                    let mut res = Outcome::ok(1);
                    while done < len {
                        let n = (len - done).min(CHUNK as u64) as usize;
                        buf.resize(n.max(buf.len()), 0);
                        if !gather(mem, &chain.readable, 16 + done, &mut buf[..n]) {
                            res = Outcome::err(S_IOERR, "guest buffer not readable");
                            break;
                        }
                        if let Err(e) = io.write(off + done, &buf[..n]) {
                            res = block_err(e);
                            break;
                        }
                        done += n as u64;
                    }
                    res
                }
            }
        }
        T_FLUSH | T_FLUSH_OUT => match disk.flush() {
            Ok(()) => Outcome::ok(1),
            Err(e) => block_err(e),
        },
        T_GET_ID => {
            let mut id = [0u8; ID_LEN];
            let n = ctx.serial.len().min(ID_LEN);
            id[..n].copy_from_slice(&ctx.serial[..n]);
            if chain.writable_len() < ID_LEN as u64 {
                Outcome::err(S_IOERR, "GET_ID buffer shorter than 20 bytes")
            } else if !scatter(mem, &chain.writable, 0, &id) {
                Outcome::err(S_IOERR, "guest buffer not writable")
            } else {
                Outcome::ok(ID_LEN as u32 + 1)
            }
        }
        T_DISCARD | T_WRITE_ZEROES => ranges(ctx, mem, chain, kind == T_DISCARD, buf),
        _ => Outcome::err(S_UNSUPP, "unsupported request type"),
    };
    if writes && out.status == S_OK && !ctx.writeback {
        if let Err(e) = disk.flush() {
            return block_err(e);
        }
    }
    out
}

/// Byte offset of a transfer of `len` bytes at `sector`, if its length is whole sectors.
fn transfer_range(sector: u64, len: u64) -> Result<u64, &'static str> {
    if !len.is_multiple_of(512) {
        return Err("data length not a multiple of 512");
    }
    sector.checked_mul(512).ok_or("sector out of range")
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

/// DISCARD and WRITE_ZEROES: an array of `{le64 sector, le32 num_sectors, le32 flags}`. Every
/// segment is validated before any is executed, and all run under one request ticket.
fn ranges<M: GuestMemoryBackend>(
    ctx: &Ctx<'_>,
    mem: &M,
    chain: &Chain,
    discard: bool,
    buf: &mut Vec<u8>,
) -> Outcome {
    let len = chain.readable_len() - 16;
    let (max_seg, max_sectors) = if discard {
        (ctx.limits.max_discard_seg, ctx.limits.max_discard_sectors)
    } else {
        (
            ctx.limits.max_write_zeroes_seg,
            ctx.limits.max_write_zeroes_sectors,
        )
    };
    if len == 0 || !len.is_multiple_of(16) {
        return Outcome::err(
            S_IOERR,
            "discard/write-zeroes payload not a multiple of 16 bytes",
        );
    }
    if len / 16 > u64::from(max_seg) {
        return Outcome::err(
            S_IOERR,
            "more discard/write-zeroes segments than advertised",
        );
    }
    buf.resize((len as usize).max(buf.len()), 0);
    let payload = &mut buf[..len as usize];
    if !gather(mem, &chain.readable, 16, payload) {
        return Outcome::err(S_IOERR, "guest buffer not readable");
    }
    let mut segs = Vec::with_capacity(payload.len() / 16);
    for s in payload.chunks_exact(16) {
        let sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
        if flags & !SEG_UNMAP != 0 {
            return Outcome::err(S_UNSUPP, "unknown discard/write-zeroes flags");
        }
        if discard && flags & SEG_UNMAP != 0 {
            return Outcome::err(S_UNSUPP, "unmap flag on discard");
        }
        if sectors > max_sectors {
            return Outcome::err(
                S_IOERR,
                "discard/write-zeroes segment above the advertised maximum",
            );
        }
        let Some(off) = sector.checked_mul(512) else {
            return Outcome::err(S_IOERR, "request past capacity");
        };
        if ctx
            .disk
            .geometry()
            .check_range(off, u64::from(sectors) * 512)
            .is_err()
        {
            return Outcome::err(S_IOERR, "request past capacity");
        }
        segs.push((off, u64::from(sectors) * 512));
    }
    let io = ctx.disk.io();
    for (off, n) in segs {
        let r = if discard {
            io.discard(off, n)
        } else {
            io.write_zeroes(off, n)
        };
        if let Err(e) = r {
            return block_err(e);
        }
    }
    Outcome::ok(1)
}
