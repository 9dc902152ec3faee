//! The vhost-user inflight region (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`) for split rings, laid
//! out as QEMU's libvhost-user and DPDK/SPDK lay it out, so a region one of them allocated can
//! be taken over and the other way round.
//!
//! The backend allocates the region (a sealed memfd) on `GET_INFLIGHT_FD`; the VMM keeps the fd
//! and hands it back with `SET_INFLIGHT_FD` on every (re)connection, including to a restarted
//! daemon. Per queue, the backend marks a head before processing it ([`QueueRegion::mark`]) and
//! clears it once its used entry is published ([`QueueRegion::begin_complete`] before the used
//! ring is written, [`QueueRegion::end_complete`] after). When the queue starts again,
//! [`QueueRegion::recover`] says which heads to resubmit, oldest first, and where the available
//! ring resumes.
//!
//! Layout (little endian), one area per queue, `stride(queue_size)` bytes apart:
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | `features: u64` | 0 |
//! | 8 | `version: u16` | 1; 0 = fresh region (or the VM was reset) |
//! | 10 | `desc_num: u16` | entries, = queue size |
//! | 12 | `last_batch_head: u16` | head of the last completed batch (batches of one here) |
//! | 14 | `used_idx: u16` | used index after the last completed batch |
//! | 16 + 16 i | `desc[i]`: `inflight: u8`, pad `[u8; 5]`, `next: u16`, `counter: u64` | by head index |
//!
//! vhost-user-backend 0.24 answers `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD` with an error and
//! offers no hook for them, so [`crate::interpose`] answers them in its place; the shell marks
//! and completes heads and runs the recovery (docs/lifecycle.md).

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{fence, Ordering};

use std::num::Wrapping;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// libvhost-user's `INFLIGHT_ALIGNMENT`.
const ALIGN: u64 = 64;
const HEADER: u64 = 16;
const ENTRY: u64 = 16;
const VERSION: u16 = 1;

const OFF_VERSION: u64 = 8;
const OFF_DESC_NUM: u64 = 10;
const OFF_LAST_BATCH_HEAD: u64 = 12;
const OFF_USED_IDX: u64 = 14;
const ENTRY_INFLIGHT: u64 = 0;
const ENTRY_COUNTER: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("inflight region: {0}")]
    Io(#[from] io::Error),
    #[error("inflight region mapping: {0}")]
    Map(String),
    #[error("{num_queues} queues of {queue_size} need {need} bytes; the region has {have}")]
    TooSmall {
        num_queues: u16,
        queue_size: u16,
        need: u64,
        have: u64,
    },
    #[error("zero queues or a zero queue size")]
    Empty,
    #[error("{num_queues} queues of {queue_size} exceed the device's {max_queues} of {max_size}")]
    Exceeds {
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
        max_size: usize,
    },
    #[error("queue {0} is outside the region")]
    NoQueue(u16),
    #[error("descriptor head {head} outside a queue of {size}")]
    BadHead { head: u16, size: u16 },
    #[error("the region was written for a queue of {desc_num}, not {size}")]
    QueueSizeMismatch { desc_num: u16, size: u16 },
    #[error("a ring of {ring} does not fit a region for queues of {region}")]
    RingSize { ring: u16, region: u16 },
    #[error("the guest's ring: {0}")]
    Ring(String),
}

pub type Result<T> = std::result::Result<T, InflightError>;

/// Bytes one queue's area takes: libvhost-user's `vu_inflight_queue_size`. It leaves out the
/// 16-byte header but rounds `16 * size + 2` up to 64, which always leaves room for it.
pub fn stride(queue_size: u16) -> u64 {
    (ENTRY * u64::from(queue_size) + 2).div_ceil(ALIGN) * ALIGN
}

/// The `VhostUserInflight` message body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Info {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// A mapped inflight region.
pub struct Region {
    mem: GuestMemoryMmap,
    file: File,
    info: Info,
}

impl Region {
    /// A fresh, zeroed region for `num_queues` queues of `queue_size` (`GET_INFLIGHT_FD`): a
    /// memfd sealed against growing and shrinking, so the VMM's mapping of it stays valid.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::Empty);
        }
        let size = u64::from(num_queues) * stride(queue_size);
        // SAFETY: memfd_create with a static name; the fd is owned by the File below.
        let fd = unsafe {
            libc::memfd_create(
                c"vhost-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own, no pointers.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Self::open(
            file,
            Info {
                mmap_size: size,
                mmap_offset: 0,
                num_queues,
                queue_size,
            },
        )
    }

    /// Maps a region the VMM hands over (`SET_INFLIGHT_FD`), possibly allocated by an earlier
    /// daemon. Its size must hold every queue; its contents are checked as they are read.
    pub fn open(file: File, info: Info) -> Result<Self> {
        if info.num_queues == 0 || info.queue_size == 0 {
            return Err(InflightError::Empty);
        }
        let need = u64::from(info.num_queues) * stride(info.queue_size);
        let have = file.metadata()?.len().saturating_sub(info.mmap_offset);
        if info.mmap_size < need || have < need {
            return Err(InflightError::TooSmall {
                num_queues: info.num_queues,
                queue_size: info.queue_size,
                need,
                have: info.mmap_size.min(have),
            });
        }
        let map = MmapRegion::from_file(
            FileOffset::new(file.try_clone()?, info.mmap_offset),
            need as usize,
        )
        .map_err(|e| InflightError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(map, GuestAddress(0))
            .ok_or_else(|| InflightError::Map("region".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| InflightError::Map(e.to_string()))?;
        Ok(Region { mem, file, info })
    }

    pub fn info(&self) -> Info {
        self.info
    }

    /// The fd to send with the `GET_INFLIGHT_FD` reply.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn queue(&self, index: u16) -> Result<QueueRegion<'_>> {
        if index >= self.info.num_queues {
            return Err(InflightError::NoQueue(index));
        }
        Ok(QueueRegion {
            mem: &self.mem,
            base: u64::from(index) * stride(self.info.queue_size),
            size: self.info.queue_size,
        })
    }
}

/// What to do when a queue starts on a region that may hold requests of an earlier daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (first start, or the VM was reset): nothing was in flight, and the
    /// frontend's `SET_VRING_BASE` stands.
    pub fresh: bool,
    /// Heads to process again before reading the available ring, oldest first.
    pub resubmit: Vec<u16>,
    /// Where the available ring resumes (`set_next_avail`): after the resubmitted heads.
    pub next_avail: u16,
    /// The used index to resume from (`set_next_used`): the guest's.
    pub next_used: u16,
    /// The counter to give the next head marked.
    pub next_counter: u64,
}

/// One queue's area of a [`Region`].
pub struct QueueRegion<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
}

impl QueueRegion<'_> {
    fn at(&self, off: u64) -> GuestAddress {
        GuestAddress(self.base + off)
    }

    fn entry(&self, head: u16) -> Result<u64> {
        if head >= self.size {
            return Err(InflightError::BadHead {
                head,
                size: self.size,
            });
        }
        Ok(HEADER + ENTRY * u64::from(head))
    }

    // The offsets are inside the mapping by construction (Region::open checked its size), so
    // accesses cannot fail; a failure would be a bug here, reported as a mapping error.
    fn load16(&self, off: u64) -> Result<u16> {
        self.mem
            .load(self.at(off), Ordering::Acquire)
            .map_err(|e| InflightError::Map(e.to_string()))
    }
    fn store16(&self, off: u64, v: u16) -> Result<()> {
        self.mem
            .store(v, self.at(off), Ordering::Release)
            .map_err(|e| InflightError::Map(e.to_string()))
    }
    fn load8(&self, off: u64) -> Result<u8> {
        self.mem
            .load(self.at(off), Ordering::Acquire)
            .map_err(|e| InflightError::Map(e.to_string()))
    }
    fn store8(&self, off: u64, v: u8) -> Result<()> {
        self.mem
            .store(v, self.at(off), Ordering::Release)
            .map_err(|e| InflightError::Map(e.to_string()))
    }
    fn load64(&self, off: u64) -> Result<u64> {
        self.mem
            .load(self.at(off), Ordering::Acquire)
            .map_err(|e| InflightError::Map(e.to_string()))
    }
    fn store64(&self, off: u64, v: u64) -> Result<()> {
        self.mem
            .store(v, self.at(off), Ordering::Release)
            .map_err(|e| InflightError::Map(e.to_string()))
    }

    /// `head` was popped and is about to be processed. The counter is written before the
    /// flag, so a reader that sees the flag sees the counter.
    pub fn mark(&self, head: u16, counter: u64) -> Result<()> {
        let e = self.entry(head)?;
        self.store64(e + ENTRY_COUNTER, counter)?;
        self.store8(e + ENTRY_INFLIGHT, 1)
    }

    /// Before `head`'s used entry is written: remembered as the last batch, so a crash between
    /// publishing it and [`Self::end_complete`] is repaired by [`Self::recover`].
    pub fn begin_complete(&self, head: u16) -> Result<()> {
        self.entry(head)?;
        self.store16(OFF_LAST_BATCH_HEAD, head)
    }

    /// After `head`'s used entry and the used index `used_idx` are visible to the guest.
    pub fn end_complete(&self, head: u16, used_idx: u16) -> Result<()> {
        let e = self.entry(head)?;
        fence(Ordering::SeqCst);
        self.store8(e + ENTRY_INFLIGHT, 0)?;
        fence(Ordering::SeqCst);
        self.store16(OFF_USED_IDX, used_idx)
    }

    /// Called when the queue starts (`SET_VRING_KICK`) with the used index the guest's ring
    /// holds: repairs an interrupted completion, and lists what is still in flight by age.
    pub fn recover(&self, guest_used_idx: u16) -> Result<Recovery> {
        if self.load16(OFF_VERSION)? == 0 {
            // Fresh (or the VM was reset): nothing was in flight.
            self.store16(OFF_DESC_NUM, self.size)?;
            self.store16(OFF_USED_IDX, guest_used_idx)?;
            self.store16(OFF_VERSION, VERSION)?;
            return Ok(Recovery {
                fresh: true,
                resubmit: Vec::new(),
                next_avail: guest_used_idx,
                next_used: guest_used_idx,
                next_counter: 0,
            });
        }
        // A region written for another queue size cannot be trusted entry by entry.
        let desc_num = self.load16(OFF_DESC_NUM)?;
        if desc_num != self.size {
            return Err(InflightError::QueueSizeMismatch {
                desc_num,
                size: self.size,
            });
        }
        if self.load16(OFF_USED_IDX)? != guest_used_idx {
            // The used entry of the last batch reached the guest, the bookkeeping did not.
            let last = self.load16(OFF_LAST_BATCH_HEAD)?;
            let e = self.entry(last)?;
            self.store8(e + ENTRY_INFLIGHT, 0)?;
            self.store16(OFF_USED_IDX, guest_used_idx)?;
        }
        let mut live = Vec::new();
        for head in 0..self.size {
            let e = self.entry(head)?;
            if self.load8(e + ENTRY_INFLIGHT)? == 1 {
                live.push((self.load64(e + ENTRY_COUNTER)?, head));
            }
        }
        live.sort_unstable();
        let next_counter = live.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(Recovery {
            fresh: false,
            next_avail: guest_used_idx.wrapping_add(live.len() as u16),
            next_used: guest_used_idx,
            resubmit: live.into_iter().map(|(_, h)| h).collect(),
            next_counter,
        })
    }
}

/// Where a queue starting on a region that is not fresh resumes.
pub(crate) struct Resume {
    pub next_avail: u16,
    pub next_used: u16,
    /// The next fetch counter.
    pub counter: u64,
    /// Requests in flight that cannot be resubmitted (a foreign, out-of-order region).
    pub lost: usize,
}

/// Where queue `index`, starting on `region`, resumes; `None` for a fresh region (the
/// frontend's `SET_VRING_BASE` stands). The device completes in ring order
/// (`Device::INFLIGHT`), which is what lets the ring itself stand for the resubmit list.
pub(crate) fn resume_point(
    region: &Region,
    index: u16,
    q: &Queue,
    guest: &GuestMemoryMmap,
) -> Result<Option<Resume>> {
    let region_size = region.info().queue_size;
    if q.size() == 0 || q.size() > region_size {
        return Err(InflightError::RingSize {
            ring: q.size(),
            region: region_size,
        });
    }
    let used = q
        .used_idx(guest, Ordering::Acquire)
        .map_err(|e| InflightError::Ring(e.to_string()))?
        .0;
    let rec = region.queue(index)?.recover(used)?;
    if rec.fresh {
        return Ok(None);
    }
    // Taken in ring order and completed in that order (Device::INFLIGHT): the marked heads
    // are the ring's entries from the used index on, and reading the ring again from there
    // resubmits them, oldest first.
    let avail_head = |pos: Wrapping<u16>| -> Option<u16> {
        let at = q.avail_ring() + 4 + 2 * u64::from(pos.0 % q.size());
        guest
            .read_obj::<u16>(GuestAddress(at))
            .ok()
            .map(u16::from_le)
    };
    let in_order = rec
        .resubmit
        .iter()
        .enumerate()
        .all(|(k, &h)| avail_head(Wrapping(used) + Wrapping(k as u16)) == Some(h));
    if !in_order {
        // Written by a backend that completes out of order: its heads cannot be replayed from
        // the ring. Resume after them (libvhost-user's rule) so that nothing else is lost.
        return Ok(Some(Resume {
            next_avail: rec.next_avail,
            next_used: rec.next_used,
            counter: rec.next_counter,
            lost: rec.resubmit.len(),
        }));
    }
    if !rec.resubmit.is_empty() {
        tracing::info!(
            queue = index,
            requests = rec.resubmit.len(),
            "resubmitting requests an earlier daemon left in flight"
        );
    }
    Ok(Some(Resume {
        next_avail: used,
        next_used: rec.next_used,
        counter: rec.next_counter,
        lost: 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn raw(r: &Region, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        r.mem.read_slice(&mut v, GuestAddress(off)).unwrap();
        v
    }

    #[test]
    fn stride_matches_libvhost_user_and_fits_the_header() {
        assert_eq!(stride(256), 4160);
        assert_eq!(stride(1024), 16448);
        assert_eq!(stride(1), 64);
        for qs in 1..=1024u16 {
            assert!(stride(qs) >= HEADER + ENTRY * u64::from(qs), "size {qs}");
            assert_eq!(stride(qs) % ALIGN, 0);
        }
    }

    #[test]
    fn fields_sit_where_the_c_structs_put_them() {
        let r = Region::create(2, 8).unwrap();
        assert_eq!(r.info().mmap_size, 2 * stride(8));
        let q1 = r.queue(1).unwrap();
        q1.recover(7).unwrap();
        q1.mark(3, 0x1122_3344_5566_7788).unwrap();
        q1.begin_complete(5).unwrap();
        let base = stride(8);
        let h = raw(&r, base, 16);
        assert_eq!(&h[0..8], &[0; 8], "features");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]), 1, "version");
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 8, "desc_num");
        assert_eq!(u16::from_le_bytes([h[12], h[13]]), 5, "last_batch_head");
        assert_eq!(u16::from_le_bytes([h[14], h[15]]), 7, "used_idx");
        let e = raw(&r, base + 16 + 16 * 3, 16);
        assert_eq!(e[0], 1, "inflight");
        assert_eq!(&e[1..8], &[0; 7], "padding and next");
        assert_eq!(
            u64::from_le_bytes(e[8..16].try_into().unwrap()),
            0x1122_3344_5566_7788
        );
        assert!(raw(&r, 0, 16).iter().all(|&b| b == 0), "queue 0 untouched");
    }

    #[test]
    fn a_restarted_daemon_resubmits_what_was_in_flight_oldest_first() {
        let first = Region::create(1, 16).unwrap();
        let q = first.queue(0).unwrap();
        let fresh = q.recover(0).unwrap();
        assert!(fresh.fresh && fresh.resubmit.is_empty());
        // Popped in this order: 9, 2, 14, 5; 2 completes (used idx 0 -> 1).
        for (counter, head) in [(0, 9), (1, 2), (2, 14), (3, 5)] {
            q.mark(head, counter).unwrap();
        }
        q.begin_complete(2).unwrap();
        q.end_complete(2, 1).unwrap();
        // The daemon dies; the VMM hands the same memfd to the next one.
        let info = first.info();
        let fd = first.file().try_clone().unwrap();
        drop(first);
        let second = Region::open(fd, info).unwrap();
        let rec = second.queue(0).unwrap().recover(1).unwrap();
        assert_eq!(rec.resubmit, vec![9, 14, 5]);
        assert!(!rec.fresh);
        assert_eq!((rec.next_avail, rec.next_used, rec.next_counter), (4, 1, 4));
    }

    #[test]
    fn a_crash_after_publishing_the_used_entry_is_repaired() {
        let r = Region::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(10).unwrap();
        q.mark(1, 0).unwrap();
        q.mark(3, 1).unwrap();
        q.begin_complete(1).unwrap();
        // Used entry for head 1 published (guest used idx 11), then the crash.
        let rec = q.recover(11).unwrap();
        assert_eq!(rec.resubmit, vec![3]);
        assert_eq!((rec.next_avail, rec.next_used), (12, 11));
    }

    #[test]
    fn used_index_wraps() {
        let r = Region::create(1, 4).unwrap();
        let q = r.queue(0).unwrap();
        q.recover(u16::MAX).unwrap();
        q.mark(0, 7).unwrap();
        q.mark(1, 8).unwrap();
        assert_eq!(q.recover(u16::MAX).unwrap().next_avail, 1);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(Region::create(0, 8), Err(InflightError::Empty)));
        let r = Region::create(1, 8).unwrap();
        assert!(matches!(r.queue(1), Err(InflightError::NoQueue(1))));
        let q = r.queue(0).unwrap();
        assert!(matches!(
            q.mark(8, 0),
            Err(InflightError::BadHead { head: 8, .. })
        ));
        // A region too small for what the VMM claims.
        let mut info = r.info();
        info.num_queues = 2;
        let fd = r.file().try_clone().unwrap();
        assert!(matches!(
            Region::open(fd, info),
            Err(InflightError::TooSmall { .. })
        ));
        // A region written for another queue size.
        q.recover(0).unwrap();
        let other = Region::open(
            r.file().try_clone().unwrap(),
            Info {
                queue_size: 4,
                ..r.info()
            },
        )
        .unwrap();
        assert!(matches!(
            other.queue(0).unwrap().recover(0),
            Err(InflightError::QueueSizeMismatch {
                desc_num: 8,
                size: 4
            })
        ));
    }

    #[test]
    fn the_memfd_is_sealed() {
        let r = Region::create(1, 8).unwrap();
        assert!(r.file().set_len(1 << 20).is_err(), "grows");
        assert!(r.file().set_len(16).is_err(), "shrinks");
        // SAFETY: F_GET_SEALS on an fd we own.
        let seals = unsafe { libc::fcntl(r.file().as_raw_fd(), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SEAL, 0);
    }
}
