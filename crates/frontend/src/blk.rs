//! virtio-blk requests from the driver side: buffers in guest memory and descriptor layouts,
//! including the odd ones a device must accept (header split across descriptors, data merged
//! with the status byte, indirect tables).

use crate::{Desc, GuestMem, Queue};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// How a request is laid over descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// header | data | status, one descriptor each (what Linux does).
    Simple,
    /// header split 5+11, data cut into uneven pieces, the last data piece merged with status.
    Split,
    /// header and device-readable data in one descriptor; device-writable data and status in one.
    Merged,
}

/// Guest buffers for one request: reusable across requests of at most `cap` data bytes.
#[derive(Clone, Copy, Debug)]
pub struct Bufs {
    pub hdr: u64,
    pub data: u64,
    pub cap: u32,
}

impl Bufs {
    /// Allocates the header, `cap` data bytes and the status byte contiguously, so a merged
    /// layout can cover neighbours with one descriptor.
    pub fn new(mem: &GuestMem, cap: u32) -> Self {
        let hdr = mem.alloc(16 + u64::from(cap) + 1, 4096);
        Self {
            hdr,
            data: hdr + 16,
            cap,
        }
    }

    pub fn status_addr(&self, data_len: u32) -> u64 {
        self.data + u64::from(data_len)
    }
}

/// A request placed in a queue.
#[derive(Clone, Copy, Debug)]
pub struct Placed {
    pub head: u16,
    pub bufs: Bufs,
    pub data_len: u32,
}

impl Placed {
    pub fn status(&self, mem: &GuestMem) -> u8 {
        mem.read_vec(self.bufs.status_addr(self.data_len), 1)[0]
    }
    pub fn data(&self, mem: &GuestMem) -> Vec<u8> {
        mem.read_vec(self.bufs.data, self.data_len as usize)
    }
}

/// Discard / write-zeroes segment payload.
pub fn segments(segs: &[(u64, u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 * segs.len());
    for &(sector, n, flags) in segs {
        v.extend_from_slice(&sector.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
    }
    v
}

/// Places a request of type `typ` at `sector`. `out` is device-readable payload (writes,
/// discard segments); otherwise `in_len` device-writable bytes are provided (reads, GET_ID).
#[allow(clippy::too_many_arguments)]
pub fn place(
    q: &mut Queue,
    mem: &GuestMem,
    bufs: Bufs,
    typ: u32,
    sector: u64,
    out: &[u8],
    in_len: u32,
    layout: Layout,
    indirect: bool,
) -> Option<Placed> {
    let data_len = if out.is_empty() {
        in_len
    } else {
        out.len() as u32
    };
    assert!(data_len <= bufs.cap, "request larger than its buffers");
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&typ.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write(bufs.hdr, &hdr);
    if !out.is_empty() {
        mem.write(bufs.data, out);
    }
    let status = bufs.status_addr(data_len);
    mem.write(status, &[0xff]);
    let writes = !out.is_empty();
    let mut d = Vec::new();
    match layout {
        Layout::Simple => {
            d.push(Desc::r(bufs.hdr, 16));
            if data_len > 0 {
                d.push(Desc {
                    addr: bufs.data,
                    len: data_len,
                    write: !writes,
                });
            }
            d.push(Desc::w(status, 1));
        }
        Layout::Split => {
            d.push(Desc::r(bufs.hdr, 5));
            d.push(Desc::r(bufs.hdr + 5, 11));
            let cuts = [data_len / 3, data_len / 3 + 7, data_len];
            let mut at = 0u32;
            for (k, &c) in cuts.iter().enumerate() {
                let c = c.clamp(at, data_len);
                let last = k + 1 == cuts.len();
                let len = c - at + if last && !writes { 1 } else { 0 };
                if len > 0 {
                    d.push(Desc {
                        addr: bufs.data + u64::from(at),
                        len,
                        write: !writes,
                    });
                }
                at = c;
            }
            if writes || data_len == 0 {
                d.push(Desc::w(status, 1));
            }
        }
        Layout::Merged => {
            if writes {
                d.push(Desc::r(bufs.hdr, 16 + data_len));
                d.push(Desc::w(status, 1));
            } else {
                d.push(Desc::r(bufs.hdr, 16));
                d.push(Desc::w(bufs.data, data_len + 1));
            }
        }
    }
    let head = if indirect {
        q.add_indirect(mem, &d)?
    } else {
        q.add(mem, &d)?
    };
    Some(Placed {
        head,
        bufs,
        data_len,
    })
}
