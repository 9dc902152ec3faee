//! Descriptor chains as segments of guest memory: what the device reads (in chain order) and
//! what it writes, with copies between them and host buffers. No layout is assumed: a request's
//! header, payload and reply may be split or merged across descriptors in any way.

use smallvec::SmallVec;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Segments of one direction. Drivers lay a request out in a few descriptors (virtio-blk: header,
/// data, status; virtio-fs: header and arguments, reply): those stay inline, so a request costs no
/// allocation to describe. Longer chains spill to the heap.
pub type SegList = SmallVec<[Seg; 4]>;

/// A descriptor chain split into device-readable and device-writable segments.
#[derive(Debug, Default)]
pub struct Segments {
    pub readable: SegList,
    pub writable: SegList,
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
            if !in_memory(mem, addr, len) {
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

/// The region that holds all of `[addr, addr + len)`, and the offset of `addr` in it. Almost
/// every descriptor lies in one region, which one lookup finds; vm-memory's own accessors walk
/// the regions a range spans through an iterator, at several times the cost, and are left for
/// the ranges that do span more than one.
fn one_region<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> Option<(&M::R, MemoryRegionAddress)> {
    let (r, off) = mem.to_region_addr(addr)?;
    let end = off.raw_value().checked_add(len as u64)?;
    (end <= r.len()).then_some((r, off))
}

/// Whether `[addr, addr + len)` lies in guest memory.
fn in_memory<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, len: u32) -> bool {
    one_region(mem, addr, len as usize).is_some() || mem.check_range(addr, len as usize)
}

/// Copies bytes `[skip, skip + buf.len())` of the segments' concatenation into `buf`.
pub fn gather<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], skip: u64, buf: &mut [u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, r| {
        let buf = &mut buf[r];
        match one_region(mem, addr, buf.len()) {
            Some((region, off)) => region.read_slice(buf, off).is_ok(),
            None => mem.read_slice(buf, addr).is_ok(),
        }
    })
}

/// Copies `buf` into bytes `[skip, skip + buf.len())` of the segments' concatenation.
pub fn scatter<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], skip: u64, buf: &[u8]) -> bool {
    walk(segs, skip, buf.len(), |addr, r| {
        let buf = &buf[r];
        match one_region(mem, addr, buf.len()) {
            Some((region, off)) => region.write_slice(buf, off).is_ok(),
            None => mem.write_slice(buf, addr).is_ok(),
        }
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

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn ranges_in_one_region_across_adjacent_ones_and_outside() {
        // Two adjacent regions, then a gap, then a third.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        let at = |a: u64, len: u32| in_memory(&mem, GuestAddress(a), len);
        assert!(at(0, 0x1000) && at(0xfff, 1) && at(0x4000, 0x1000));
        assert!(at(0xff0, 0x20), "spanning adjacent regions");
        assert!(at(0, 0x2000));
        assert!(!at(0x1ff0, 0x20), "running into the gap");
        assert!(!at(0x2000, 1) && !at(0x4fff, 2) && !at(0x5000, 1));
        assert!(!at(u64::MAX, 2), "wrapping the address space");
        // Copies within one region and across two adjacent ones land where vm-memory's own
        // accessors put them; a copy running into the gap fails.
        let data: Vec<u8> = (0..0x30u8).collect();
        let segs = [
            Seg {
                addr: GuestAddress(0x10),
                len: 0x8,
            },
            Seg {
                addr: GuestAddress(0xff8),
                len: 0x28,
            },
        ];
        assert!(scatter(&mem, &segs, 0, &data));
        let mut back = vec![0u8; 0x30];
        assert!(gather(&mem, &segs, 0, &mut back));
        assert_eq!(back, data);
        let mut direct = vec![0u8; 0x28];
        mem.read_slice(&mut direct, GuestAddress(0xff8)).unwrap();
        assert_eq!(direct, data[8..]);
        let gap = [Seg {
            addr: GuestAddress(0x1ff8),
            len: 0x10,
        }];
        assert!(!scatter(&mem, &gap, 0, &data[..0x10]));
        assert!(!gather(&mem, &gap, 0, &mut back[..0x10]));
        // The result agrees with vm-memory's own walk.
        for a in (0..0x6000u64).step_by(0x3f0) {
            for len in [1u32, 0x10, 0x800, 0x1000, 0x1800, 0x3000] {
                assert_eq!(
                    at(a, len),
                    mem.check_range(GuestAddress(a), len as usize),
                    "{a:#x}+{len:#x}"
                );
            }
        }
    }
}
