//! File data moved between a file and the guest's buffers by the kernel, without a copy in the
//! daemon: a READ is `preadv`'d straight into the chain's device-writable descriptors and a
//! WRITE `pwritev`'d from its device-readable ones (virtiofsd's `ZeroCopyWriter` and
//! `ZeroCopyReader` do the same).
//!
//! Guest memory is shared with a guest that may change it at any moment, so it is never seen
//! through a Rust reference: a range of it is only ever a list of (host pointer, length) pairs
//! that the kernel reads or writes, as it would any user buffer. Every range is checked against
//! the memory map when the list is built; a range that leaves guest memory yields no list.
//! This module holds the crate's only `unsafe` besides [`crate::sys`].

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};

use smallvec::SmallVec;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsnap_vhost::Seg;

/// The kernel's limit on the iovecs of one call (`UIO_MAXIOV`); longer lists go in pieces.
const IOV_MAX: usize = 1024;

/// One entry per range of guest memory; a request's data is a few descriptors, held inline so
/// that moving it costs no allocation.
type PerRange<T> = SmallVec<[T; 4]>;

/// Bytes `[skip, skip + len)` of the concatenation of `segs`, as guest address ranges, each
/// split where guest memory regions end. `None` if the segments hold fewer bytes or a range
/// leaves guest memory.
fn ranges<'m, T>(
    mem: &'m GuestMemoryMmap,
    segs: &[Seg],
    mut skip: u64,
    len: usize,
    mut each: impl FnMut(vm_memory::VolatileSlice<'m, ()>) -> T,
) -> Option<PerRange<T>> {
    let mut out = PerRange::with_capacity(segs.len());
    let mut left = len as u64;
    for s in segs {
        if left == 0 {
            break;
        }
        let sl = u64::from(s.len);
        if skip >= sl {
            skip -= sl;
            continue;
        }
        let n = (sl - skip).min(left);
        let addr: GuestAddress = s.addr.checked_add(skip)?;
        for slice in mem.get_slices(addr, n as usize) {
            out.push(each(slice.ok()?));
        }
        left -= n;
        skip = 0;
    }
    (left == 0).then_some(out)
}

/// Which way the kernel moves bytes through guest buffers. Sealed: only the two directions
/// below exist, so the kernel writes into guest memory only through buffers built from
/// writable guards ([`preadv`] takes nothing but a [`GuestSink`]).
pub trait Direction: sealed::Sealed {}

mod sealed {
    use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
    use vm_memory::VolatileSlice;

    pub trait Sealed {
        /// What keeps a range's host pointer valid, as the access it allows.
        type Guard;
        fn guard(s: VolatileSlice<'_, ()>) -> Self::Guard;
        fn iovec(g: &Self::Guard) -> libc::iovec;
    }

    impl Sealed for super::IntoGuest {
        type Guard = PtrGuardMut;
        fn guard(s: VolatileSlice<'_, ()>) -> PtrGuardMut {
            s.ptr_guard_mut()
        }
        fn iovec(g: &PtrGuardMut) -> libc::iovec {
            libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            }
        }
    }

    impl Sealed for super::OutOfGuest {
        type Guard = PtrGuard;
        fn guard(s: VolatileSlice<'_, ()>) -> PtrGuard {
            s.ptr_guard()
        }
        fn iovec(g: &PtrGuard) -> libc::iovec {
            // An iovec's base is `*mut` for both directions; `pwritev` only reads through it.
            libc::iovec {
                iov_base: g.as_ptr().cast_mut().cast(),
                iov_len: g.len(),
            }
        }
    }
}

/// The kernel writes into guest memory (a READ's data, into the chain's writable part).
pub enum IntoGuest {}
/// The kernel reads guest memory (a WRITE's data, from the chain's readable part).
pub enum OutOfGuest {}

impl Direction for IntoGuest {}
impl Direction for OutOfGuest {}

/// Bytes of guest memory the kernel moves in direction `D`, as the iovecs of one call.
pub struct GuestBufs<'m, D: Direction> {
    iov: PerRange<libc::iovec>,
    len: usize,
    /// Keep the pointers valid (they map nothing on this backend, but say so in the types).
    _guards: PerRange<D::Guard>,
    _mem: PhantomData<&'m GuestMemoryMmap>,
}

/// Guest buffers the kernel writes into: the device-writable part of a chain.
pub type GuestSink<'m> = GuestBufs<'m, IntoGuest>;
/// Guest buffers the kernel reads from: the device-readable part of a chain.
pub type GuestSource<'m> = GuestBufs<'m, OutOfGuest>;

impl<'m, D: Direction> GuestBufs<'m, D> {
    /// Bytes `[skip, skip + len)` of the segments `segs` (writable ones for a [`GuestSink`],
    /// readable ones for a [`GuestSource`]); `None` if they do not hold that many bytes or
    /// leave guest memory.
    pub fn new(mem: &'m GuestMemoryMmap, segs: &[Seg], skip: u64, len: usize) -> Option<Self> {
        let guards = ranges(mem, segs, skip, len, D::guard)?;
        let iov = guards.iter().map(D::iovec).collect();
        Some(GuestBufs {
            iov,
            len,
            _guards: guards,
            _mem: PhantomData,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Runs `call` on the iovecs in pieces the kernel accepts, until one comes up short (end of
/// file, a full disk): the bytes transferred.
fn in_pieces(
    iov: &[libc::iovec],
    mut off: u64,
    mut call: impl FnMut(&[libc::iovec], libc::off_t) -> isize,
) -> io::Result<usize> {
    let mut done = 0usize;
    for piece in iov.chunks(IOV_MAX) {
        let want: usize = piece.iter().map(|v| v.iov_len).sum();
        let at =
            libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let n = call(piece, at);
        let n = match usize::try_from(n) {
            Ok(n) => n,
            // An error after some bytes moved reports those bytes, as a short call would.
            Err(_) if done > 0 => return Ok(done),
            Err(_) => return Err(io::Error::last_os_error()),
        };
        done += n;
        if n < want {
            break;
        }
        off += n as u64;
    }
    Ok(done)
}

/// Reads from `fd` at `off` into the guest's buffers; the bytes read.
pub fn preadv(fd: BorrowedFd<'_>, sink: &GuestSink<'_>, off: u64) -> io::Result<usize> {
    in_pieces(&sink.iov, off, |iov, at| {
        // SAFETY: each iovec is a range of guest memory that `GuestBufs::new` checked lies in a
        // region mapped for as long as the sink borrows the memory, taken through a writable
        // guard (a sink is `IntoGuest`); the kernel writes at most `iov_len` bytes into each. No Rust reference to those bytes exists, so the guest
        // writing them at the same time breaks no aliasing rule: it only races with the
        // kernel's copy, and gets whatever bytes it raced for.
        unsafe { libc::preadv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, at) }
    })
}

/// Writes the guest's buffers to `fd` at `off`; the bytes written.
pub fn pwritev(fd: BorrowedFd<'_>, src: &GuestSource<'_>, off: u64) -> io::Result<usize> {
    in_pieces(&src.iov, off, |iov, at| {
        // SAFETY: each iovec is a range of guest memory that `GuestBufs::new` checked lies in a
        // region mapped for as long as the source borrows the memory; the kernel only reads
        // it. The guest may change the bytes meanwhile: the file then gets some mix of them,
        // which is what the guest asked for by racing with its own request.
        unsafe { libc::pwritev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, at) }
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    use vm_memory::Bytes;

    use super::*;

    /// Two adjacent regions, so a segment can straddle them.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
            .unwrap()
    }

    fn seg(addr: u64, len: u32) -> Seg {
        Seg {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn data_lands_in_the_segments_only_across_regions() {
        let mem = mem();
        mem.write_slice(&[0xee; 0x8000], GuestAddress(0)).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        // Skip 10 bytes of the first segment; the second straddles the regions.
        let segs = [seg(0x100, 20), seg(0x3ff0, 0x40), seg(0x6000, 0x1000)];
        let sink = GuestSink::new(&mem, &segs, 10, 3000).unwrap();
        assert_eq!(sink.iov.len(), 4, "the straddling segment is two iovecs");
        assert_eq!(preadv(file.as_fd(), &sink, 7).unwrap(), 3000);
        let mut got = vec![0u8; 10];
        mem.read_slice(&mut got, GuestAddress(0x10a)).unwrap();
        assert_eq!(got, data[7..17]);
        let mut got = vec![0u8; 0x40];
        mem.read_slice(&mut got, GuestAddress(0x3ff0)).unwrap();
        assert_eq!(got, data[17..17 + 0x40]);
        let mut got = vec![0u8; 3000 - 10 - 0x40];
        mem.read_slice(&mut got, GuestAddress(0x6000)).unwrap();
        assert_eq!(got, data[17 + 0x40..3007]);
        // Nothing around them was touched.
        let mut b = [0u8; 1];
        for at in [0x109, 0x100 + 20, 0x3fef, 0x4030, 0x6000 + 3000 - 10 - 0x40] {
            mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            assert_eq!(b[0], 0xee, "byte at {at:#x}");
        }
        // And back out to the file, from the same layout.
        let src = GuestSource::new(&mem, &segs, 10, 3000).unwrap();
        assert_eq!(pwritev(file.as_fd(), &src, 20_000).unwrap(), 3000);
        let mut back = vec![0u8; 3000];
        file.seek(std::io::SeekFrom::Start(20_000)).unwrap();
        file.read_exact(&mut back).unwrap();
        assert_eq!(back, data[7..3007]);
    }

    #[test]
    fn ranges_outside_memory_or_the_segments_yield_nothing() {
        let mem = mem();
        // Past the end of guest memory, or wrapping the address space.
        assert!(GuestSink::new(&mem, &[seg(0x7f00, 0x200)], 0, 0x200).is_none());
        assert!(GuestSource::new(&mem, &[seg(u64::MAX - 4, 16)], 8, 4).is_none());
        // More bytes than the segments hold.
        assert!(GuestSink::new(&mem, &[seg(0, 16), seg(32, 16)], 0, 33).is_none());
        assert!(GuestSource::new(&mem, &[seg(0, 16)], 10, 7).is_none());
        // Exactly what they hold, and nothing at all.
        assert_eq!(
            GuestSink::new(&mem, &[seg(0, 16), seg(32, 16)], 0, 32)
                .unwrap()
                .len(),
            32
        );
        assert!(GuestSource::new(&mem, &[], 0, 0).unwrap().is_empty());
    }

    #[test]
    fn long_lists_go_in_pieces_and_stop_at_a_short_one() {
        let iov = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 2,
            };
            2500
        ];
        // Every piece whole: three calls, at advancing offsets.
        let mut calls = Vec::new();
        let n = in_pieces(&iov, 100, |p, at| {
            calls.push((p.len(), at));
            (p.len() * 2) as isize
        })
        .unwrap();
        assert_eq!(n, 5000);
        assert_eq!(calls, [(1024, 100), (1024, 2148), (452, 4196)]);
        // A short piece (end of file) ends the transfer.
        let mut calls = 0;
        let n = in_pieces(&iov, 0, |p, _| {
            calls += 1;
            if calls == 2 {
                7
            } else {
                (p.len() * 2) as isize
            }
        })
        .unwrap();
        assert_eq!((n, calls), (2048 + 7, 2));
        // An error with nothing done is the error; after some bytes, those bytes.
        assert!(in_pieces(&iov, 0, |_, _| -1).is_err());
        let mut calls = 0;
        let n = in_pieces(&iov, 0, |p, _| {
            calls += 1;
            if calls == 1 {
                (p.len() * 2) as isize
            } else {
                -1
            }
        })
        .unwrap();
        assert_eq!(n, 2048);
        // An offset the kernel cannot take.
        assert!(in_pieces(&iov, u64::MAX, |_, _| 0).is_err());
    }
}
