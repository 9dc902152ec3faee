//! The virtio-fs device for the `vsnap_vhost` shell: queue 0 is the hiprio queue (FORGET,
//! INTERRUPT), the others carry requests. Each queue has its own worker thread; with a thread
//! pool, the request chains a worker pops run on the pool and complete in any order.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryMmap;
use vsnap_vhost::queue::Chain;
use vsnap_vhost::shell::GuestMem;
use vsnap_vhost::{gather, scatter, Completion, Device, Faults, Segments};

use smallvec::SmallVec;
use zerocopy::IntoBytes;

use crate::abi::{InHeader, OutHeader};
use crate::guest_io::{self, GuestSink, GuestSource};
use crate::server::{read_reply_header, DataRequest, Reply, Server, DATA_HEAD, MAX_REQUEST};
use crate::sys::{self, Errno};

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
    /// The longest a queue's worker looks at its empty ring before it sleeps
    /// (`--poll-max-us`; vsnap_vhost::pacing).
    pub poll_max: Duration,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            tag: None,
            request_queues: 1,
            queue_size: 1024,
            thread_pool_size: 0,
            poll_max: vsnap_vhost::pacing::LOOK_MAX,
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

/// Runs one request chain and returns the used length. Its first [`DATA_HEAD`] bytes are
/// gathered; READ and WRITE data then go straight between the file and the guest's buffers
/// (`data_chain`), and every other request has the rest of its bytes gathered, is handled and
/// its reply scattered. Public for the fuzz harness (`vsnap_fuzz::fuse_chain`), which drives
/// it with chains over its own guest memory.
pub fn run_chain(server: &Server, faults: &Faults, mem: &GuestMemoryMmap, segs: &Segments) -> u32 {
    if let Some(d) = segs.defect {
        faults.record(d);
        return 0;
    }
    let len = segs.readable_len();
    if len > MAX_REQUEST as u64 {
        faults.record("FUSE request larger than the maximum write");
        return 0;
    }
    let len = len as usize;
    let mut head = [0u8; DATA_HEAD];
    let head = &mut head[..len.min(DATA_HEAD)];
    if !gather(mem, &segs.readable, 0, head) {
        faults.record("FUSE request unreadable");
        return 0;
    }
    if let Some(r) = server.data_request(head, len) {
        return data_chain(server, faults, mem, segs, &r);
    }
    // The head is read from guest memory once: the message `handle` decodes begins with the
    // very bytes `data_request` looked at, even if the guest has changed them since.
    let got = head.len();
    // Requests other than READ and WRITE are small (a name or two, a few structs): on the
    // stack they cost no allocation; a large SETXATTR or a WRITE that is not a data request
    // spills to the heap.
    let mut msg = SmallVec::<[u8; 512]>::with_capacity(len);
    msg.extend_from_slice(head);
    msg.resize(len, 0);
    if !gather(mem, &segs.readable, got as u64, &mut msg[got..]) {
        faults.record("FUSE request unreadable");
        return 0;
    }
    let mut reply = Reply::new();
    let handled = server.handle(&msg, &mut reply);
    if let Some(f) = handled.fault {
        faults.record(f);
    }
    if !handled.replied {
        return 0;
    }
    reply_to(faults, mem, segs, InHeader::read_unique(&msg), &reply)
}

/// Scatters `reply` into the chain's writable buffers; the used length.
fn reply_to(
    faults: &Faults,
    mem: &GuestMemoryMmap,
    segs: &Segments,
    unique: u64,
    reply: &[u8],
) -> u32 {
    let mut reply = std::borrow::Cow::Borrowed(reply);
    if reply.len() as u64 > segs.writable_len() {
        // The guest asked for more than it gave room for: it still gets an answer, or the
        // request would hang in its kernel for good.
        faults.record("FUSE reply larger than the guest's buffers");
        reply = error(unique, libc::EIO).as_bytes().to_vec().into();
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

fn error(unique: u64, errno: i32) -> OutHeader {
    read_reply_header(unique, Err(Errno(errno)))
}

/// A READ or WRITE whose data the kernel moves between the file and guest memory: the WRITE
/// payload is read from the readable buffers after its [`DATA_HEAD`] bytes, the READ data
/// lands in the writable buffers after the reply header.
fn data_chain(
    server: &Server,
    faults: &Faults,
    mem: &GuestMemoryMmap,
    segs: &Segments,
    r: &DataRequest,
) -> u32 {
    let size = r.arg.size as usize;
    if r.write {
        // `data_request` checked that the request holds the payload.
        let Some(src) = GuestSource::new(mem, &segs.readable, DATA_HEAD as u64, size) else {
            faults.record("FUSE request unreadable");
            return 0;
        };
        let mut reply = Reply::new();
        server.write_direct(r, |fd, off| guest_io::pwritev(fd, &src, off), &mut reply);
        return reply_to(faults, mem, segs, r.unique, &reply);
    }
    let hdr = size_of::<OutHeader>();
    let writable = usize::try_from(segs.writable_len()).unwrap_or(usize::MAX);
    let Some(room) = writable.checked_sub(hdr) else {
        faults.record("FUSE reply larger than the guest's buffers");
        return 0;
    };
    let want = size.min(room);
    let Some(sink) = GuestSink::new(mem, &segs.writable, hdr as u64, want) else {
        faults.record("FUSE reply unwritable");
        return 0;
    };
    let mut too_small = false;
    let read = server.read_direct(r, |fd, off| {
        let n = guest_io::preadv(fd, &sink, off)?;
        // Less room than asked for, and all of it filled: if the file had more, the reply
        // would not have fit. The guest then gets EIO, as for any reply too large for it.
        if n == want && want < size {
            let mut probe = [0u8; 1];
            if sys::pread(fd, &mut probe, off.saturating_add(n as u64))? > 0 {
                too_small = true;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        Ok(n)
    });
    if too_small {
        faults.record("FUSE reply larger than the guest's buffers");
    }
    let h = read_reply_header(r.unique, read);
    if !scatter(mem, &segs.writable, 0, h.as_bytes()) {
        faults.record("FUSE reply unwritable");
        return 0;
    }
    h.len
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

    fn poll_max(&self) -> Duration {
        self.opts.poll_max
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
