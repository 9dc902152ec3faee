//! Reading a virtqueue's available ring the same way for every device. A ring whose available
//! index is corrupt stops the queue (logged once) instead of spinning: virtio-queue yields no
//! chain for it while re-enabling notifications keeps reporting more.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestMemoryLoadGuard, GuestMemoryMmap};

pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

pub fn to_io(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Whether a queue can be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Ready, with this many chains available that we have not taken.
    Usable(u16),
    /// Not set up, stopped by the frontend, or stopped by us earlier.
    NotReady,
    /// Found corrupt just now and stopped: the label says how (for fault counting).
    Corrupt(&'static str),
}

/// Whether the queue is ready and its available index is one a driver could have written: at
/// most a queue's worth of chains ahead of the next one we take. A queue found corrupt is
/// stopped until the frontend sets it up again (a new connection or `SET_VRING_*`).
pub fn ring_usable(vring: &VringRwLock, mem: &GuestMemoryMmap) -> Ring {
    let mut state = vring.get_mut();
    let q = state.get_queue_mut();
    if !q.ready() {
        return Ring::NotReady;
    }
    let ahead = q
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| (idx - Wrapping(q.next_avail())).0);
    match ahead {
        Ok(n) if n <= q.size() => Ring::Usable(n),
        Ok(n) => {
            tracing::error!(
                ahead = n,
                size = q.size(),
                "virtqueue available index runs ahead of the queue size: queue stopped"
            );
            q.set_ready(false);
            Ring::Corrupt("available index ahead of the queue size (queue stopped)")
        }
        Err(e) => {
            tracing::error!(error = %e, "virtqueue available ring unreadable: queue stopped");
            q.set_ready(false);
            Ring::Corrupt("available ring unreadable (queue stopped)")
        }
    }
}

/// [`pop`] found no chain where [`ring_usable`] had counted some: unless the queue was stopped
/// meanwhile, the available index moved back, which no driver does (it only ever moves it on).
/// Stopped, as [`ring_usable`] stops a corrupt ring: a guest flipping the index back and forth
/// would otherwise keep the worker going round with nothing to take.
pub fn index_went_back(vring: &VringRwLock) -> Ring {
    let mut state = vring.get_mut();
    let q = state.get_queue_mut();
    if !q.ready() {
        return Ring::NotReady;
    }
    tracing::error!("virtqueue available index moved back: queue stopped");
    q.set_ready(false);
    Ring::Corrupt("available index moved back (queue stopped)")
}

/// The next available chain, if the queue is (still) ready and has one.
pub fn pop(vring: &VringRwLock, mem: &GuestMemoryLoadGuard<GuestMemoryMmap>) -> Option<Chain> {
    let mut state = vring.get_mut();
    let q = state.get_queue_mut();
    // `GET_VRING_BASE` may have stopped the queue since the last look; popping a stopped
    // queue would only log an error.
    if !q.ready() {
        return None;
    }
    q.pop_descriptor_chain(mem.clone())
}

/// How many chains the driver has made available that we have not taken (0 if the ring is not
/// ready or unreadable; [`ring_usable`] is what judges a ring).
pub fn pending(vring: &VringRwLock, mem: &GuestMemoryMmap) -> u16 {
    let state = vring.get_ref();
    let q = state.get_queue();
    if !q.ready() {
        return 0;
    }
    q.avail_idx(mem, Ordering::Acquire)
        .map_or(0, |idx| (idx - Wrapping(q.next_avail())).0)
}

/// Whether the queue is ready and the driver has made a chain available that we have not
/// taken: a cheap look (no lock but the ring's, no chain read) for a worker deciding to sleep.
pub fn has_avail(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let q = state.get_queue();
    q.ready()
        && q.avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != q.next_avail())
}

// The vring's own notification calls load the memory map (an `ArcSwap`) on every call; a worker
// round already holds it. These take the map the caller holds, as `pop` does.

/// Asks the driver to kick again. Whether it made chains available meanwhile (the caller then
/// takes them instead of sleeping).
pub fn enable_notification(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    vring.get_mut().get_queue_mut().enable_notification(mem)
}

/// Tells the driver it need not kick while the caller takes chains.
pub fn disable_notification(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Result<(), virtio_queue::Error> {
    vring.get_mut().get_queue_mut().disable_notification(mem)
}

/// Whether the driver asked for an interrupt for what was used since the last one.
pub fn needs_notification(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    vring.get_mut().get_queue_mut().needs_notification(mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

    const AVAIL: u64 = 0x1000;

    /// A ready queue whose driver has made one chain available, as [`ring_usable`] counted it.
    fn one_counted() -> (VringRwLock, GuestMemoryAtomic<GuestMemoryMmap>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem);
        let vring = VringRwLock::new(atomic.clone(), 16).unwrap();
        vring.set_queue_size(16);
        vring.set_queue_info(0, AVAIL, 0x2000).unwrap();
        vring.set_queue_ready(true);
        let mem = atomic.memory();
        set_avail_idx(&mem, 1);
        assert_eq!(ring_usable(&vring, &mem), Ring::Usable(1));
        drop(mem);
        (vring, atomic)
    }

    fn set_avail_idx(mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn an_available_index_that_moved_back_stops_the_queue() {
        let (vring, atomic) = one_counted();
        let mem = atomic.memory();
        // The driver takes it back before we pop.
        set_avail_idx(&mem, 0);
        assert!(pop(&vring, &mem).is_none());
        assert!(matches!(index_went_back(&vring), Ring::Corrupt(_)));
        set_avail_idx(&mem, 1);
        assert_eq!(ring_usable(&vring, &mem), Ring::NotReady, "stopped");
        assert!(!has_avail(&vring, &mem));
    }

    #[test]
    fn a_queue_stopped_meanwhile_is_no_fault() {
        let (vring, atomic) = one_counted();
        let mem = atomic.memory();
        // GET_VRING_BASE stopped it.
        vring.set_queue_ready(false);
        assert!(pop(&vring, &mem).is_none());
        assert_eq!(index_went_back(&vring), Ring::NotReady);
    }
}
