//! Draining a virtqueue the same way for every device: pop every available chain, and with
//! EVENT_IDX keep going until re-enabling notifications finds nothing new (else a request that
//! arrives in between would wait for the next kick). A ring whose available index is corrupt
//! stops the queue (logged once) instead of spinning: virtio-queue yields no chain for it while
//! re-enabling notifications keeps reporting more.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

pub fn to_io(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Hands every available chain of `vring` to `each` (which completes it with `add_used`, now
/// or later), then signals the guest if it asked to be.
pub fn drain(
    vring: &VringRwLock,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    mut each: impl FnMut(Chain) -> io::Result<()>,
) -> io::Result<()> {
    let mem = mem.memory();
    loop {
        if !ring_usable(vring, &mem) {
            return Ok(());
        }
        if event_idx {
            vring.disable_notification().map_err(to_io)?;
        }
        loop {
            // Not `while let`: the temporary guard would live through the body and deadlock
            // against add_used().
            let next = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(head) = next else { break };
            each(head)?;
        }
        if vring.needs_notification().map_err(to_io)? {
            vring.signal_used_queue()?;
        }
        if !event_idx || !vring.enable_notification().map_err(to_io)? {
            return Ok(());
        }
    }
}

/// Whether the queue is ready and its available index is one a driver could have written: at
/// most a queue's worth of chains ahead of the next one we take. A queue found corrupt is
/// stopped until the frontend sets it up again (a new connection or `SET_VRING_*`).
fn ring_usable(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let mut state = vring.get_mut();
    let q = state.get_queue_mut();
    if !q.ready() {
        return false;
    }
    let ahead = q
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| (idx - Wrapping(q.next_avail())).0);
    match ahead {
        Ok(n) if n <= q.size() => true,
        Ok(n) => {
            tracing::error!(
                ahead = n,
                size = q.size(),
                "virtqueue available index runs ahead of the queue size: queue stopped"
            );
            q.set_ready(false);
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "virtqueue available ring unreadable: queue stopped");
            q.set_ready(false);
            false
        }
    }
}
