//! Draining a virtqueue the same way for every device: pop every available chain, and with
//! EVENT_IDX keep going until re-enabling notifications finds nothing new (else a request that
//! arrives in between would wait for the next kick).

use std::io;

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
