//! The `VhostUserBackend` for virtio-blk: one worker thread per queue, each draining its queue
//! straight into the block layer. Nothing here takes a lock shared by the queues on the data path.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vsnap_block::Disk;

use vsnap_vhost::{queue, Device, Faults};

use crate::config::{self, BlkConfig, Limits, WRITEBACK_OFFSET};
use crate::request::{self, Chain, Ctx};

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Settings of a blk device.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
    pub logical_block_size: u32,
}

pub struct BlkBackend {
    disk: Arc<Disk>,
    opts: BlkOptions,
    limits: Limits,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    writeback: AtomicBool,
    acked: AtomicU64,
    /// Bounce buffers, one per worker thread (each thread serves one queue).
    buffers: Vec<Mutex<Vec<u8>>>,
    pub faults: Faults,
    /// Chains that could not be answered at all (no status byte), completed with length 0.
    pub dropped_chains: AtomicU64,
    /// True while a frontend is connected.
    pub connected: AtomicBool,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, opts: BlkOptions) -> Self {
        let n = usize::from(opts.num_queues.max(1));
        Self {
            limits: Limits::for_queue_size(opts.queue_size),
            buffers: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            disk,
            opts,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(true),
            acked: AtomicU64::new(0),
            faults: Faults::default(),
            dropped_chains: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    pub fn options(&self) -> &BlkOptions {
        &self.opts
    }

    fn config(&self) -> BlkConfig {
        let g = self.disk.geometry();
        BlkConfig {
            capacity_sectors: g.size / 512,
            limits: self.limits,
            logical_block_size: self.opts.logical_block_size,
            tracking_block_size: g.block_size.max(self.opts.logical_block_size),
            num_queues: self.opts.num_queues,
            writeback: self.writeback.load(Ordering::Relaxed),
        }
    }

    fn process_queue(&self, vring: &VringRwLock, thread: usize) -> io::Result<()> {
        let Some(atomic) = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let mem = atomic.memory();
        let ctx = Ctx {
            disk: &self.disk,
            limits: self.limits,
            serial: self.opts.serial.as_bytes(),
            writeback: self.writeback.load(Ordering::Relaxed),
        };
        let mut buf = self.buffers[thread % self.buffers.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        queue::drain(vring, &atomic, event_idx, |head| {
            let index = head.head_index();
            let chain = Chain::split(head.map(|d| (d.addr(), d.len(), d.is_write_only())), &*mem);
            let len = match request::process(&ctx, &*mem, &chain, &mut buf) {
                Some(out) => {
                    if let Some(f) = out.fault {
                        self.faults.record(f);
                    }
                    out.len
                }
                None => {
                    self.dropped_chains.fetch_add(1, Ordering::Relaxed);
                    self.faults
                        .record("chain without a status byte (completed with length 0)");
                    0
                }
            };
            vring.add_used(index, len).map_err(queue::to_io)
        })?;
        // Large requests may have grown the bounce buffer; don't keep more than a few MiB.
        if buf.capacity() > 4 << 20 {
            *buf = Vec::new();
        }
        Ok(())
    }
}

impl Device for BlkBackend {
    const NAME: &'static str = "vsnap-blk";

    fn connected(&self) {
        self.connected.store(true, Ordering::SeqCst);
    }

    fn disconnected(&self) {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = None;
        self.event_idx.store(false, Ordering::Relaxed);
        self.writeback.store(true, Ordering::Relaxed);
        self.acked.store(0, Ordering::Relaxed);
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VHOST_USER_F_PROTOCOL_FEATURES
            | config::device_features(self.disk.readonly(), self.opts.num_queues)
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        // Without CONFIG_WCE the cache mode follows FLUSH: a driver that cannot flush gets
        // write-through, so every completed write is durable (virtio 1.3 §5.2.6.1).
        if features & (1 << VIRTIO_BLK_F_CONFIG_WCE) == 0 {
            self.writeback
                .store(features & (1 << VIRTIO_BLK_F_FLUSH) != 0, Ordering::Relaxed);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable.
        let o = offset as usize;
        if o > WRITEBACK_OFFSET || o + buf.len() <= WRITEBACK_OFFSET {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let wce = buf[WRITEBACK_OFFSET - o] != 0;
        if !wce {
            // Entering write-through: make everything so far durable first.
            self.disk.flush().map_err(io::Error::other)?;
        }
        self.writeback.store(wce, Ordering::Relaxed);
        tracing::info!(writeback = wce, "guest set the cache mode");
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.num_queues).map(|q| 1u64 << q).collect()
    }

    /// Without an exit event the worker threads could never leave their epoll loops, and
    /// dropping the daemon (which joins them) would hang.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring, thread_id),
            None => Ok(()),
        }
    }
}
