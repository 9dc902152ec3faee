//! The virtio-blk device for the `vsnap_vhost` shell: features, config space, and each chain
//! executed straight into the block layer on its queue's worker thread. Nothing here takes a
//! lock shared by the queues on the data path.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use vsnap_block::Disk;

use vsnap_vhost::queue::Chain as DescChain;
use vsnap_vhost::shell::GuestMem;
use vsnap_vhost::{Completion, Device, Faults};

use crate::cache_mode::CacheModeFile;
use crate::config::{self, BlkConfig, Limits, WRITEBACK_OFFSET};
use crate::request::{self, Chain, Ctx};

/// Settings of a blk device.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    pub num_queues: u16,
    /// The ring size the VMM sets (QEMU's `queue-size`, cloud-hypervisor's `queue_size`; 128 by
    /// default in both). `seg_max` is derived from it: the VMM reads the config space before it
    /// sizes any ring, and a request may not take more descriptors than its ring holds (virtio
    /// 1.3 §2.7.5.3.1). Larger rings are accepted, up to [`MAX_QUEUE_SIZE`]; a smaller one is
    /// warned about when it starts.
    pub queue_size: u16,
    pub serial: String,
    pub logical_block_size: u32,
    /// The longest a queue's worker looks at its empty ring before it sleeps
    /// (`--poll-max-us`; vsnap_vhost::pacing).
    pub poll_max: Duration,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            queue_size: 128,
            serial: String::new(),
            logical_block_size: 512,
            poll_max: vsnap_vhost::pacing::LOOK_MAX,
        }
    }
}

/// The largest split ring (virtio 1.3 §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

pub struct BlkBackend {
    disk: Arc<Disk>,
    opts: BlkOptions,
    limits: Limits,
    /// The cache mode the guest chose. Kept across reconnects: a reconnecting VMM does not
    /// send it again, and a guest that chose write-through must stay write-through.
    writeback: AtomicBool,
    /// The mode the guest set through the config space (or a previous daemon saved), if it
    /// ever did: it holds for every driver that negotiates CONFIG_WCE, whatever drivers without
    /// it (firmware) negotiated in between.
    chosen: Mutex<Option<bool>>,
    /// Where the cache mode is kept across daemon restarts, if anywhere.
    cache_file: Option<CacheModeFile>,
    /// Bounce buffers, one per queue (each queue has its own worker thread).
    buffers: Vec<Mutex<Vec<u8>>>,
    pub faults: Faults,
    /// Chains that could not be answered at all (no status byte), completed with length 0.
    pub dropped_chains: AtomicU64,
    /// True while a frontend is connected (kept by the shell).
    pub connected: AtomicBool,
    /// A ring too small for `seg_max` was reported (once per daemon).
    small_ring_reported: AtomicBool,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, opts: BlkOptions) -> Self {
        let n = usize::from(opts.num_queues.max(1));
        Self {
            limits: Limits::for_queue_size(opts.queue_size),
            buffers: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            disk,
            opts,
            writeback: AtomicBool::new(true),
            chosen: Mutex::new(None),
            cache_file: None,
            faults: Faults::default(),
            dropped_chains: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            small_ring_reported: AtomicBool::new(false),
        }
    }

    /// Keeps the cache mode the guest sets in `file` and starts in the mode saved there (the
    /// state dir is the place: the mode belongs to the disk's guest).
    pub fn with_cache_mode_file(mut self, file: CacheModeFile) -> io::Result<Self> {
        if let Some(wce) = file.load()? {
            tracing::info!(writeback = wce, "cache mode the guest set earlier");
            self.writeback.store(wce, Ordering::Relaxed);
            *self.chosen.lock().unwrap_or_else(PoisonError::into_inner) = Some(wce);
        }
        self.cache_file = Some(file);
        Ok(self)
    }

    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    pub fn options(&self) -> &BlkOptions {
        &self.opts
    }

    /// Whether the guest's writes are cached (write-back) or durable on completion.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    fn config(&self) -> BlkConfig {
        let g = self.disk.geometry();
        BlkConfig {
            capacity_sectors: g.size / 512,
            limits: self.limits,
            logical_block_size: self.opts.logical_block_size,
            tracking_block_size: g.block_size.max(self.opts.logical_block_size),
            num_queues: self.opts.num_queues,
            writeback: self.writeback(),
        }
    }
}

impl Device for BlkBackend {
    const NAME: &'static str = "vsnap-blk";
    // Each queue's chains are processed and completed one at a time on its worker thread, in
    // ring order (`process` completes before it returns), and block requests may run twice.
    const INFLIGHT: bool = true;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE.max(self.opts.queue_size))
    }

    fn poll_max(&self) -> Duration {
        self.opts.poll_max
    }

    fn queue_started(&self, queue: u16, ring_size: u16) {
        let need = self.limits.seg_max + 2;
        if u32::from(ring_size) < need && !self.small_ring_reported.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                queue,
                ring_size,
                seg_max = self.limits.seg_max,
                "the VMM's ring is smaller than the seg_max + 2 descriptors the config space \
                 promised the guest: run vsnap blk with --queue-size {ring_size}"
            );
        }
    }

    fn features(&self) -> u64 {
        config::device_features(self.disk.readonly(), self.opts.num_queues)
    }

    fn acked_features(&self, features: u64) {
        // Without CONFIG_WCE the cache mode follows FLUSH: a driver that cannot flush gets
        // write-through, so every completed write is durable (virtio 1.3 §5.2.6.1). With it,
        // the mode the guest chose stands (a reconnecting VMM re-acks the same features and
        // never sets it again); until it chooses, the default again follows FLUSH. Firmware
        // (SeaBIOS) negotiates first without either, and must not leave Linux write-through.
        let flush = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        let wce = features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
        let chosen = *self.chosen.lock().unwrap_or_else(PoisonError::into_inner);
        let mode = match chosen {
            Some(mode) if wce => mode,
            _ => flush,
        };
        self.writeback.store(mode, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
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
        *self.chosen.lock().unwrap_or_else(PoisonError::into_inner) = Some(wce);
        tracing::info!(writeback = wce, "guest set the cache mode");
        match &self.cache_file {
            Some(f) => f.store(wce).inspect_err(|e| {
                tracing::error!(error = %e, file = %f.path().display(), "saving the cache mode")
            }),
            None => Ok(()),
        }
    }

    fn process(&self, queue: u16, mem: &GuestMem, head: DescChain, done: Completion) {
        let ctx = Ctx {
            disk: &self.disk,
            limits: self.limits,
            serial: self.opts.serial.as_bytes(),
            writeback: self.writeback(),
        };
        let chain = Chain::split(head.map(|d| (d.addr(), d.len(), d.is_write_only())), &**mem);
        let mut buf = self.buffers[usize::from(queue) % self.buffers.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let len = match request::process(&ctx, &**mem, &chain, &mut buf) {
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
        // Large requests may have grown the bounce buffer; don't keep more than a few MiB.
        if buf.capacity() > 4 << 20 {
            *buf = Vec::new();
        }
        drop(buf);
        done.complete(len);
    }

    fn faults(&self) -> &Faults {
        &self.faults
    }

    fn connected_flag(&self) -> &AtomicBool {
        &self.connected
    }
}
