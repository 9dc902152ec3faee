//! The virtio-fs device for the `vsnap_vhost` shell: queue 0 is the hiprio queue (FORGET,
//! INTERRUPT), the others carry requests. Each queue has its own worker thread; with a thread
//! pool, the request chains a worker pops run on the pool and complete in any order.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;
use vsnap_vhost::queue::Chain;
use vsnap_vhost::shell::GuestMem;
use vsnap_vhost::{gather, scatter, Completion, Device, Faults, Segments};

use crate::server::{Server, MAX_REQUEST};

/// virtio-fs config space: `tag[36]` and `num_request_queues` (virtio 1.3 §5.11.4).
pub const TAG_LEN: usize = 36;

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
    pool: Option<Mutex<Sender<Job>>>,
    pub faults: Arc<Faults>,
    /// True while a frontend is connected (kept by the shell).
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

impl FsBackend {
    pub fn new(server: Arc<Server>, opts: FsOptions) -> io::Result<Self> {
        let pool = match opts.thread_pool_size {
            0 => None,
            n => Some(Mutex::new(spawn_pool(n)?)),
        };
        Ok(FsBackend {
            server,
            opts,
            pool,
            faults: Arc::new(Faults::default()),
            connected: AtomicBool::new(false),
        })
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
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

/// The FUSE session outlives the connection: a VMM that reconnects (cloud-hypervisor does)
/// brings back a guest that keeps its node ids and open handles, and a guest that mounts anew
/// starts with FUSE_INIT, which resets the session (`Server::handle`). docs/lifecycle.md.
impl Device for FsBackend {
    const NAME: &'static str = "vsnap-fs";

    fn num_queues(&self) -> usize {
        1 + usize::from(self.opts.request_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        0
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

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let (o, s) = (offset as usize, size as usize);
        if o.checked_add(s).is_none_or(|e| e > c.len()) {
            return Vec::new();
        }
        c[o..o + s].to_vec()
    }

    fn process(&self, _queue: u16, mem: &GuestMem, head: Chain, done: Completion) {
        let segs = Segments::split(head.map(|d| (d.addr(), d.len(), d.is_write_only())), &**mem);
        let Some(pool) = &self.pool else {
            done.complete(run_chain(&self.server, &self.faults, mem, &segs));
            return;
        };
        let (server, faults, mem) = (self.server.clone(), self.faults.clone(), mem.clone());
        let job: Job = Box::new(move || {
            done.complete(run_chain(&server, &faults, &mem, &segs));
        });
        // A pool that is gone drops the job, and with it `done`: the chain completes empty.
        let _ = pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job);
    }

    fn faults(&self) -> &Faults {
        &self.faults
    }

    fn connected_flag(&self) -> &AtomicBool {
        &self.connected
    }
}
