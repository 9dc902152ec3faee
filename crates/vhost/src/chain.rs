//! Descriptor chains as segments of guest memory: what the device reads (in chain order) and
//! what it writes, with copies between them and host buffers. No layout is assumed: a request's
//! header, payload and reply may be split or merged across descriptors in any way.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A descriptor chain split into device-readable and device-writable segments.
#[derive(Debug, Default)]
pub struct Segments {
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    /// Why the chain is malformed, if it is.
    pub defect: Option<&'static str>,
}

impl Segments {
    /// Splits descriptors `(addr, len, device_writable)` in chain order, noting (not failing on)
    /// descriptors outside guest memory and readable descriptors after writable ones.
    pub fn split<M: GuestMemoryBackend>(
        descs: impl IntoIterator<Item = (GuestAddress, u32, bool)>,
        mem: &M,
    ) -> Self {
        let mut c = Segments::default();
        for (addr, len, writable) in descs {
            if len == 0 {
                continue;
            }
            if !mem.check_range(addr, len as usize) {
                c.defect.get_or_insert("descriptor outside guest memory");
            }
            if writable {
                c.writable.push(Seg { addr, len });
            } else {
                if !c.writable.is_empty() {
                    c.defect
                        .get_or_insert("device-readable descriptor after a writable one");
                }
                c.readable.push(Seg { addr, len });
            }
        }
        c
    }

    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Copies bytes `[skip, skip + buf.len())` of the segments' concatenation into `buf`.
pub fn gather<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], skip: u64, buf: &mut [u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, r| {
        mem.read_slice(&mut buf[r], addr).is_ok()
    })
}

/// Copies `buf` into bytes `[skip, skip + buf.len())` of the segments' concatenation.
pub fn scatter<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], skip: u64, buf: &[u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, r| {
        mem.write_slice(&buf[r], addr).is_ok()
    })
}

fn walk(
    segs: &[Seg],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let sl = u64::from(s.len);
        if skip >= sl {
            skip -= sl;
            continue;
        }
        let n = ((sl - skip) as usize).min(len - done);
        let Some(addr) = s.addr.checked_add(skip) else {
            return false;
        };
        if !f(addr, done..done + n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}
