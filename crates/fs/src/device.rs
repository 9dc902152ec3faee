//! The vhost-user backend of virtio-fs: queue 0 is the hiprio queue (FORGET, INTERRUPT), the
//! others carry requests. Each queue has its own worker thread; with a thread pool, the request
//! chains a worker pops run on the pool and complete in any order.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vsnap_vhost::{gather, queue, scatter, Device, Faults, Segments};

use crate::server::{Server, MAX_REQUEST};

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio-fs config space: `tag[36]` and `num_request_queues` (virtio 1.3 §5.11.4).
pub const TAG_LEN: usize = 36;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Offered in the config space (QEMU and cloud-hypervisor set their own from `tag=`).
    pub tag: Option<String>,
    pub request_queues: u16,
    pub queue_size: u16,
    /// 0: requests run on the queue's worker thread.
    pub thread_pool_size: usize,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            tag: None,
            request_queues: 1,
            queue_size: 1024,
            thread_pool_size: 0,
        }
    }
}

pub struct FsBackend {
    server: Arc<Server>,
    opts: FsOptions,
    mem: RwLock<Option<Mem>>,
    event_idx: AtomicBool,
    pool: Option<Mutex<Sender<Job>>>,
    pub faults: Arc<Faults>,
    /// True while a frontend is connected.
    pub connected: AtomicBool,
}

/// Runs one request chain: gathers the message, handles it, scatters the reply. Returns the
/// used length.
fn run_chain(server: &Server, faults: &Faults, mem: &GuestMemoryMmap, segs: &Segments) -> u32 {
    if let Some(d) = segs.defect {
        faults.record(d);
        return 0;
    }
    let len = segs.readable_len();
    if len > MAX_REQUEST as u64 {
        faults.record("FUSE request larger than the maximum write");
        return 0;
    }
    let mut msg = vec![0u8; len as usize];
    if !gather(mem, &segs.readable, 0, &mut msg) {
        faults.record("FUSE request unreadable");
        return 0;
    }
    let handled = server.handle(&msg);
    if let Some(f) = handled.fault {
        faults.record(f);
    }
    let Some(mut reply) = handled.reply else {
        return 0;
    };
    if reply.len() as u64 > segs.writable_len() {
        // The guest asked for more than it gave room for: it still gets an answer, or the
        // request would hang in its kernel for good.
        faults.record("FUSE reply larger than the guest's buffers");
        reply = crate::server::error_reply(&msg, libc::EIO);
        if reply.len() as u64 > segs.writable_len() {
            return 0;
        }
    }
    if !scatter(mem, &segs.writable, 0, &reply) {
        faults.record("FUSE reply unwritable");
        return 0;
    }
    reply.len() as u32
}

/// Completes a chain from a pool thread, signalling the guest if it asked to be.
fn complete(vring: &VringRwLock, head: u16, len: u32) -> io::Result<()> {
    vring.add_used(head, len).map_err(queue::to_io)?;
    if vring.needs_notification().map_err(queue::to_io)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl FsBackend {
    pub fn new(server: Arc<Server>, opts: FsOptions) -> io::Result<Self> {
        let pool = match opts.thread_pool_size {
            0 => None,
            n => Some(Mutex::new(spawn_pool(n)?)),
        };
        Ok(FsBackend {
            server,
            opts,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            pool,
            faults: Arc::new(Faults::default()),
            connected: AtomicBool::new(false),
        })
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mem = atomic.memory();
        queue::drain(vring, &atomic, event_idx, |head| {
            let index = head.head_index();
            let segs = Segments::split(head.map(|d| (d.addr(), d.len(), d.is_write_only())), &*mem);
            let Some(pool) = &self.pool else {
                let len = run_chain(&self.server, &self.faults, &mem, &segs);
                return vring.add_used(index, len).map_err(queue::to_io);
            };
            let (server, faults, vring, atomic) = (
                self.server.clone(),
                self.faults.clone(),
                vring.clone(),
                atomic.clone(),
            );
            let job: Job = Box::new(move || {
                let len = run_chain(&server, &faults, &atomic.memory(), &segs);
                if let Err(e) = complete(&vring, index, len) {
                    tracing::warn!(error = %e, "completing a request");
                }
            });
            pool.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(job)
                .map_err(|_| io::Error::other("thread pool gone"))
        })
    }

    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; TAG_LEN + 4];
        if let Some(t) = &self.opts.tag {
            let b = t.as_bytes();
            c[..b.len().min(TAG_LEN)].copy_from_slice(&b[..b.len().min(TAG_LEN)]);
        }
        c[TAG_LEN..].copy_from_slice(&u32::from(self.opts.request_queues).to_le_bytes());
        c
    }
}

fn spawn_pool(n: usize) -> io::Result<Sender<Job>> {
    let (tx, rx) = channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..n {
        let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
        std::thread::Builder::new()
            .name(format!("vsnap-fs-pool-{i}"))
            .spawn(move || loop {
                let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            })?;
    }
    Ok(tx)
}

impl Device for FsBackend {
    const NAME: &'static str = "vsnap-fs";

    fn connected(&self) {
        self.connected.store(true, Ordering::SeqCst);
    }

    fn disconnected(&self) {
        self.connected.store(false, Ordering::SeqCst);
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = None;
        self.event_idx.store(false, Ordering::Relaxed);
        self.server.reset();
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1 + usize::from(self.opts.request_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.opts.tag.is_some() {
            f | VhostUserProtocolFeatures::CONFIG
        } else {
            f
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let (o, s) = (offset as usize, size as usize);
        if o.checked_add(s).is_none_or(|e| e > c.len()) {
            return Vec::new();
        }
        c[o..o + s].to_vec()
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    /// Without an exit event the worker threads could never leave their epoll loops.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring),
            None => Ok(()),
        }
    }
}
