//! One vhost-user backend for every vsnap device, in the uniform shape of rust-vmm's
//! vhost-device crates: the shell keeps what is the same for every device (guest memory,
//! EVENT_IDX, the standard feature bits, one worker thread per queue, exit events, connection
//! state, in-flight accounting) and a [`Device`] supplies only its features, its config space and
//! what to do with one descriptor chain.
//!
//! In-flight accounting is what makes a disconnect safe under load: a chain counts as in flight
//! from the moment it is popped until its [`Completion`] is used. [`Shell::quiesce`] stops every
//! queue from popping and waits for the count to reach zero, so when the rings are handed back
//! (the socket closed, or `GET_VRING_BASE` answered) the used index covers every chain the
//! device took. A frontend that then restarts from the used index (QEMU after a disconnect)
//! loses nothing and sees nothing twice.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::faults::Faults;
use crate::inflight::{self, InflightError, Info, Region};
use crate::interpose::Intercept;
use crate::pacing::{self, Pacing};
use crate::queue::{self, Chain, Ring};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Guest memory as the framework hands it over.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
/// A snapshot of guest memory: cheap to clone, and keeps the mapping alive while held.
pub type GuestMem = GuestMemoryLoadGuard<GuestMemoryMmap>;

/// What a vhost-user device implements; [`Shell`] does the rest.
pub trait Device: Send + Sync + 'static {
    /// The daemon's name in the vhost-user framework and in logs.
    const NAME: &'static str;
    /// Offer inflight tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`). Only for a device that
    /// completes each queue's chains in the order it took them, each before taking the next,
    /// and whose requests may run twice (block I/O is idempotent; FUSE requests are not, which
    /// is why no virtio-fs daemon offers it). Then the chains a dead daemon took and never
    /// completed are exactly those the available ring holds from the guest's used index on,
    /// and reading the ring again from there resubmits them, oldest first.
    const INFLIGHT: bool = false;

    fn num_queues(&self) -> usize;
    fn max_queue_size(&self) -> usize;
    /// Device-type feature bits. The shell adds `VERSION_1`, `RING_EVENT_IDX`,
    /// `RING_INDIRECT_DESC` and `VHOST_USER_F_PROTOCOL_FEATURES`.
    fn features(&self) -> u64;
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    /// The features the driver accepted (sent again on every connection).
    fn acked_features(&self, _features: u64) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8>;
    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
    /// Handles one chain popped from queue `queue` (its buffers are in `mem`), completing it
    /// through `done` now or later from any thread. Completing with the used length is the
    /// device's whole duty.
    fn process(&self, queue: u16, mem: &GuestMem, chain: Chain, done: Completion);
    /// Where the device's guest-caused faults are counted; the shell counts its own there too.
    fn faults(&self) -> &Faults;
    /// The flag the shell keeps true exactly while a frontend is connected.
    fn connected_flag(&self) -> &AtomicBool;
    /// The longest a queue worker looks at its empty ring before sleeping (see
    /// [`crate::pacing`]); zero: it sleeps at once.
    fn poll_max(&self) -> Duration {
        pacing::LOOK_MAX
    }
    /// Queue `queue` started on a ring of `ring_size` descriptors (the size the VMM set).
    fn queue_started(&self, _queue: u16, _ring_size: u16) {}
    /// The frontend left and its requests are finished: drop per-connection state. What the
    /// driver negotiated and a reconnecting VMM will not resend must be kept.
    fn disconnected(&self) {}
}

/// One queue's in-flight accounting.
#[derive(Default)]
struct QueueCtl {
    /// Chains popped and not yet completed.
    inflight: AtomicUsize,
    /// Set while the queue's worker is inside [`Shell::drain`]; completions made meanwhile
    /// leave the guest notification to the drain, which batches it.
    draining: AtomicBool,
    /// A completion was made during a drain and left its guest notification to it.
    deferred: AtomicBool,
    /// Completions made now signal the guest themselves (if it asked) instead of leaving it to
    /// the end of the round: set as each chain is taken, in a round with early signals, once
    /// the ring is at low water (see [`pacing::low_water`]).
    early: AtomicBool,
    /// The worker's own state; only the queue's worker thread takes it.
    worker: Mutex<Worker>,
    /// The queue (re)started: its first drain interrupts the guest whatever EVENT_IDX says. A
    /// daemon killed between publishing completions and signalling them left the guest waiting
    /// for an interrupt that never came; with nothing else in flight it would wait for good.
    restarted: AtomicBool,
    /// Bumped when the queue's outstanding chains are abandoned: a completion carrying an older
    /// generation must not touch rings that now belong to the next frontend. Completions take
    /// the read side, so bumping it waits for one that is writing the used ring.
    generation: RwLock<u64>,
    /// An inflight region was handed over: when the queue starts, resume from it.
    recover: AtomicBool,
    /// The fetch order given to the next head marked in the inflight region.
    counter: AtomicU64,
}

/// What a queue's worker keeps between its drains.
#[derive(Default)]
struct Worker {
    pacing: Pacing,
    /// When the worker began its last look at the empty ring before it went to sleep.
    idle_since: Option<Instant>,
}

/// The shared part of the shell: what [`Completion`]s and the stopper reach.
pub(crate) struct Queues {
    queues: Vec<QueueCtl>,
    /// No queue pops another chain while set (a stop or a disconnect is under way).
    stopping: AtomicBool,
}

impl Queues {
    fn new(n: usize, poll_max: Duration) -> Self {
        let ctl = || QueueCtl {
            worker: Mutex::new(Worker {
                pacing: Pacing::new(poll_max),
                idle_since: None,
            }),
            ..QueueCtl::default()
        };
        Queues {
            queues: (0..n).map(|_| ctl()).collect(),
            stopping: AtomicBool::new(false),
        }
    }

    fn idle(&self, q: &QueueCtl) -> bool {
        q.inflight.load(Ordering::SeqCst) == 0 && !q.draining.load(Ordering::SeqCst)
    }

    /// Waits until `pick` queues are idle or `timeout` passes; true if they are.
    fn wait_idle(&self, pick: impl Fn(usize) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = self
                .queues
                .iter()
                .enumerate()
                .any(|(i, q)| pick(i) && !self.idle(q));
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Rare path (stop, disconnect): polling keeps the data path free of any lock.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Gives up on the chains of queue `q` still outstanding: they will never touch the ring.
    fn abandon(&self, q: &QueueCtl) {
        let mut g = q.generation.write().unwrap_or_else(PoisonError::into_inner);
        *g += 1;
        let n = q.inflight.swap(0, Ordering::SeqCst);
        if n > 0 {
            tracing::warn!(
                requests = n,
                "abandoned requests that did not finish in time"
            );
        }
    }

    /// Stops every queue from popping and waits (up to `timeout`) for what is in flight to
    /// complete. Returns whether everything completed; what did not is abandoned.
    pub(crate) fn quiesce(&self, timeout: Duration) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let done = self.wait_idle(|_| true, timeout);
        if !done {
            self.queues.iter().for_each(|q| self.abandon(q));
        }
        done
    }

    fn resume(&self) {
        for q in &self.queues {
            q.restarted.store(true, Ordering::SeqCst);
        }
        self.stopping.store(false, Ordering::SeqCst);
    }
}

/// The right and duty to complete one popped chain. Dropping it uncompleted completes the chain
/// with length 0: the guest sees an error instead of a request that never ends.
pub struct Completion {
    vring: VringRwLock,
    head: u16,
    queue: u16,
    generation: u64,
    queues: Arc<Queues>,
    /// The inflight region the head is marked in.
    inflight: Option<Arc<Region>>,
    done: bool,
}

impl Completion {
    /// The chain's head descriptor index.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Puts the chain in the used ring with `len` bytes written, and notifies the guest if it
    /// asked to be (unless the queue's drain will, for the whole batch).
    pub fn complete(mut self, len: u32) {
        self.done = true;
        self.finish(len);
    }

    fn finish(&self, len: u32) {
        let ctl = &self.queues.queues[usize::from(self.queue)];
        let g = ctl
            .generation
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if *g != self.generation {
            return;
        }
        let tracked = self
            .inflight
            .as_ref()
            .and_then(|r| r.queue(self.queue).ok());
        // The head stays marked until the guest can see its used entry; a crash in between is
        // repaired at recovery from the last-batch head.
        if let Some(q) = &tracked {
            let _ = q.begin_complete(self.head);
        }
        let used = {
            let mut state = self.vring.get_mut();
            state
                .add_used(self.head, len)
                .map(|()| state.get_queue().next_used())
        };
        match used {
            Ok(used) => {
                if let Some(q) = &tracked {
                    let _ = q.end_complete(self.head, used);
                }
            }
            Err(e) => tracing::warn!(error = %e, "completing a request"),
        }
        ctl.inflight.fetch_sub(1, Ordering::SeqCst);
        // Marked before looking, so a drain that ends after our look still sees the mark.
        ctl.deferred.store(true, Ordering::SeqCst);
        if !ctl.draining.load(Ordering::SeqCst) || ctl.early.load(Ordering::Relaxed) {
            signal(&self.vring, self.vring.needs_notification());
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.done {
            tracing::warn!(
                head = self.head,
                "request dropped uncompleted: completed empty"
            );
            self.finish(0);
        }
    }
}

/// Interrupts the driver if `needed` (its answer to whether it asked to be) says so.
fn signal(vring: &VringRwLock, needed: Result<bool, virtio_queue::Error>) {
    match needed {
        Ok(true) => {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(error = %e, "signalling the guest");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "reading the guest's used event"),
    }
}

/// A worker thread's exit event, made once and reused by every connection: the framework
/// registers the consumer in each connection's epoll set and never closes it, so a fresh one per
/// connection would leak an fd per queue per connection.
struct ExitEvent {
    consumer: EventConsumer,
    notifier: EventNotifier,
}

/// The backend the vhost-user framework runs: a [`Device`] and everything around it.
pub struct Shell<D: Device> {
    dev: Arc<D>,
    mem: RwLock<Option<Mem>>,
    /// The frontend's inflight region (`SET_INFLIGHT_FD`), for this connection.
    inflight: RwLock<Option<Arc<Region>>>,
    event_idx: AtomicBool,
    queues: Arc<Queues>,
    exits: Vec<ExitEvent>,
}

/// How long `GET_VRING_BASE` waits for the queue's requests before abandoning them.
const STOP_VRING_TIMEOUT: Duration = Duration::from_secs(5);

impl<D: Device> Shell<D> {
    pub fn new(dev: Arc<D>) -> io::Result<Self> {
        let n = dev.num_queues();
        let exits = (0..n)
            .map(|_| {
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
                    .map(|(consumer, notifier)| ExitEvent { consumer, notifier })
            })
            .collect::<io::Result<_>>()?;
        let queues = Arc::new(Queues::new(n, dev.poll_max()));
        Ok(Shell {
            dev,
            mem: RwLock::new(None),
            inflight: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            queues,
            exits,
        })
    }

    pub fn device(&self) -> &Arc<D> {
        &self.dev
    }

    pub fn connected(&self) -> bool {
        self.dev.connected_flag().load(Ordering::SeqCst)
    }

    pub(crate) fn queues(&self) -> &Arc<Queues> {
        &self.queues
    }

    /// A frontend connected: queues may pop again.
    pub(crate) fn begin_connection(&self) {
        self.queues.resume();
        self.dev.connected_flag().store(true, Ordering::SeqCst);
    }

    /// Stops every queue and waits up to `timeout` for the requests in flight.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        self.queues.quiesce(timeout)
    }

    /// The frontend is gone and the framework's threads have exited: forget the connection.
    pub(crate) fn end_connection(&self) {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = None;
        *self
            .inflight
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
        self.event_idx.store(false, Ordering::Relaxed);
        // The exit events are reused: clear what this connection's exit left in them.
        for e in &self.exits {
            let _ = e.consumer.consume();
        }
        self.dev.disconnected();
        self.dev.connected_flag().store(false, Ordering::SeqCst);
    }

    /// Hands every available chain of queue `index` to the device, then signals the guest if
    /// it asked to be. With EVENT_IDX it keeps going until re-enabling notifications finds
    /// nothing new (else a request arriving in between would wait for the next kick).
    fn drain(&self, index: u16, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self
            .mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let ctl = &self.queues.queues[usize::from(index)];
        let mut worker = ctl.worker.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(since) = worker.idle_since.take() {
            worker.pacing.woke(since.elapsed());
        }
        ctl.draining.store(true, Ordering::SeqCst);
        let r = self.drain_rounds(index, ctl, &mut worker, vring, &mem);
        ctl.draining.store(false, Ordering::SeqCst);
        ctl.early.store(false, Ordering::Relaxed);
        if ctl.restarted.swap(false, Ordering::SeqCst) {
            self.dev
                .queue_started(index, vring.get_ref().get_queue().size());
            // Spurious interrupts are harmless: the driver just finds nothing new.
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!(error = %e, "signalling the guest");
            }
        } else if ctl.deferred.swap(false, Ordering::SeqCst) {
            // A completion made on another thread after our last signal left it to us.
            signal(vring, vring.needs_notification());
        }
        r
    }

    fn drain_rounds(
        &self,
        index: u16,
        ctl: &QueueCtl,
        worker: &mut Worker,
        vring: &VringRwLock,
        mem: &Mem,
    ) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let stopping = || self.queues.stopping.load(Ordering::SeqCst);
        // The thread's preemption count read as the previous round's look found this round's
        // chains: it stands for a read at this round's start (each read is a system call).
        let mut carried = None;
        loop {
            let guest = mem.memory();
            if ctl.recover.load(Ordering::SeqCst) {
                self.recover(index, ctl, vring, &guest);
            }
            let region = self.region();
            let tracked = region.as_ref().and_then(|r| r.queue(index).ok());
            let available = match queue::ring_usable(vring, &guest) {
                Ring::Usable(n) => n,
                Ring::NotReady => return Ok(()),
                Ring::Corrupt(fault) => {
                    self.dev.faults().record(fault);
                    return Ok(());
                }
            };
            if event_idx {
                queue::disable_notification(vring, &guest).map_err(queue::to_io)?;
            }
            // Early signals only with EVENT_IDX, where the driver says which completion it
            // waits for (without it every completion would interrupt the guest), and only for
            // a round of more than one chain (for one, the round's end is as early).
            let batch = event_idx && available > 1;
            let early = batch && worker.pacing.early_signals();
            ctl.early.store(false, Ordering::Relaxed);
            // Whether the thread is preempted while it serves the round and looks for the next
            // one decides both whether early signals go on (see `Pacing::round`) and whether a
            // look that finds a request paid: found after the thread was preempted, the request
            // came from a driver that ran on this CPU in its stead (woken by this round's
            // signal, it typically does), so the look bought nothing a sleep would not have
            // and spent CPU others wanted; it counts as contended. On a busy machine that is
            // most looks with one request in flight, which then cost 1.3-2.8 µs of CPU per
            // request more than no look.
            let looking = event_idx && !worker.pacing.window().is_zero();
            let start = carried.take();
            let since = (early || looking).then(|| start.unwrap_or_else(preemptions));
            // The chains counted above and no more: popping past them would only read the ring
            // again to find it empty. Later ones are found below, by the look or by turning
            // notifications back on (or, without EVENT_IDX, by the driver's kick).
            let mut went_back = false;
            for _ in 0..available {
                if stopping() {
                    break;
                }
                let Some(chain) = queue::pop(vring, &guest) else {
                    went_back = true;
                    break;
                };
                if early {
                    let low = pacing::low_water(available, queue::pending(vring, &guest));
                    ctl.early.store(low, Ordering::Relaxed);
                }
                let generation = *ctl
                    .generation
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                ctl.inflight.fetch_add(1, Ordering::SeqCst);
                let head = chain.head_index();
                if let Some(q) = &tracked {
                    let _ = q.mark(head, ctl.counter.fetch_add(1, Ordering::SeqCst));
                }
                let done = Completion {
                    vring: vring.clone(),
                    head,
                    queue: index,
                    generation,
                    queues: self.queues.clone(),
                    inflight: region.clone(),
                    done: false,
                };
                self.dev.process(index, &guest, chain, done);
            }
            // This signal covers every completion so far, this thread's and others'.
            ctl.deferred.store(false, Ordering::SeqCst);
            signal(vring, queue::needs_notification(vring, &guest));
            if went_back {
                if let Ring::Corrupt(fault) = queue::index_went_back(vring) {
                    self.dev.faults().record(fault);
                }
                return Ok(());
            }
            // Stopping: leave notifications as they are; the next frontend starts the queue
            // afresh.
            if stopping() || !event_idx {
                return Ok(());
            }
            let looked = Instant::now();
            let found = self.look(worker, vring, &guest, looked);
            let now = (early || found).then(preemptions);
            let preempted = since.zip(now).is_some_and(|(a, b)| b > a);
            if found {
                if preempted {
                    worker.pacing.contended();
                } else {
                    worker.pacing.found();
                }
            }
            if batch {
                worker.pacing.round(preempted);
            }
            if found {
                carried = now;
                continue;
            }
            if !queue::enable_notification(vring, &guest).map_err(queue::to_io)? {
                worker.idle_since = Some(looked);
                return Ok(());
            }
        }
    }

    /// Looks at the empty ring for the worker's window before it sleeps; true if a request
    /// came (the caller tells the pacing whether that look paid). Notifications stay off
    /// meanwhile: the driver's kicks are not needed (with EVENT_IDX the available event still
    /// names the index it passed long ago).
    fn look(
        &self,
        worker: &mut Worker,
        vring: &VringRwLock,
        guest: &GuestMemoryMmap,
        start: Instant,
    ) -> bool {
        let window = worker.pacing.window();
        if window.is_zero() {
            return false;
        }
        let mut last = start;
        loop {
            if self.queues.stopping.load(Ordering::SeqCst) {
                return false;
            }
            if queue::has_avail(vring, guest) {
                return true;
            }
            let now = Instant::now();
            if now.duration_since(last) > pacing::CONTENDED {
                // The thread was preempted between two glances: the CPU is wanted, and
                // looking only competes with whoever wants it (the driver among them).
                worker.pacing.contended();
                return false;
            }
            if now.duration_since(start) >= window {
                worker.pacing.missed();
                return false;
            }
            last = now;
            // No yield: a yield hands the CPU to any runnable thread, a CPU-bound one keeps it
            // for a whole time slice, and the request that comes meanwhile waits for it.
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }
}

/// This thread's involuntary context switches so far: how often it was preempted.
fn preemptions() -> libc::c_long {
    // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one `rusage` into the struct we own; RUSAGE_THREAD is valid on
    // every kernel vsnap runs on (2.6.26 and later). On failure the struct stays zero.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_nivcsw
}

impl<D: Device> Shell<D> {
    fn region(&self) -> Option<Arc<Region>> {
        self.inflight
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The queue starts on an inflight region: resume where the requests the guest has not
    /// seen completed begin, whatever `SET_VRING_BASE` said (cloud-hypervisor sends the
    /// guest's available index, which skips them).
    fn recover(&self, index: u16, ctl: &QueueCtl, vring: &VringRwLock, guest: &GuestMemoryMmap) {
        let Some(region) = self.region() else {
            ctl.recover.store(false, Ordering::SeqCst);
            return;
        };
        let mut state = vring.get_mut();
        let q = state.get_queue_mut();
        if !q.ready() {
            return;
        }
        ctl.recover.store(false, Ordering::SeqCst);
        match inflight::resume_point(&region, index, q, guest) {
            Ok(Some(r)) => {
                q.set_next_avail(r.next_avail);
                q.set_next_used(r.next_used);
                ctl.counter.store(r.counter, Ordering::SeqCst);
                if r.lost > 0 {
                    self.dev
                        .faults()
                        .record("inflight region taken out of order: requests not resubmitted");
                    tracing::error!(
                        queue = index,
                        requests = r.lost,
                        "requests another backend left in flight out of ring order cannot be \
                         resubmitted"
                    );
                }
            }
            Ok(None) => {}
            Err(why) => {
                self.dev
                    .faults()
                    .record("inflight region unusable (tracking off)");
                tracing::error!(queue = index, error = %why, "inflight region: tracking off");
                *self
                    .inflight
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
        }
    }
}

impl<D: Device> Intercept for Shell<D> {
    fn get_inflight_fd(&self, want: Info) -> Result<(Info, File), InflightError> {
        let (max_queues, max_size) = (self.dev.num_queues(), self.dev.max_queue_size());
        if usize::from(want.num_queues) > max_queues || usize::from(want.queue_size) > max_size {
            return Err(InflightError::Exceeds {
                num_queues: want.num_queues,
                queue_size: want.queue_size,
                max_queues,
                max_size,
            });
        }
        let region = Region::create(want.num_queues, want.queue_size)?;
        Ok((region.info(), region.file().try_clone()?))
    }

    fn set_inflight_fd(&self, info: Info, file: File) -> Result<(), InflightError> {
        let region = Region::open(file, info)?;
        tracing::info!(
            queues = info.num_queues,
            queue_size = info.queue_size,
            "requests tracked in the frontend's inflight region"
        );
        *self
            .inflight
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(region));
        for q in &self.queues.queues {
            q.recover.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    fn tracking(&self) -> bool {
        self.region().is_some()
    }
}

impl<D: Device> VhostUserBackend for Shell<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.dev.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.dev.max_queue_size()
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES
            | self.dev.features()
    }

    fn acked_features(&self, features: u64) {
        self.dev.acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let inflight = if D::INFLIGHT {
            VhostUserProtocolFeatures::INFLIGHT_SHMFD
        } else {
            VhostUserProtocolFeatures::empty()
        };
        self.dev.protocol_features() | inflight
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.dev.get_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.dev.set_config(offset, buf)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
        Ok(())
    }

    /// One worker thread per queue: no queue waits behind another's I/O.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.dev.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let e = self.exits.get(thread_index)?;
        let notifier = match e.notifier.try_clone() {
            Ok(n) => n,
            Err(err) => {
                tracing::error!(error = %err, "cloning an exit event");
                return None;
            }
        };
        // SAFETY: vhost-user-backend 0.24.0 (pinned in Cargo.toml) turns this consumer into a
        // raw fd for its epoll set at once (`VringEpollHandler::new`) and never closes it, so
        // the fd stays solely owned by `self.exits`, which outlives every connection's daemon.
        // The notifier is a real duplicate: the framework drops (closes) it with the daemon.
        let consumer = unsafe { EventConsumer::from_raw_fd(e.consumer.as_raw_fd()) };
        Some((consumer, notifier))
    }

    /// `GET_VRING_BASE`: the queue is no longer ready (nothing more is popped); answer only
    /// once the chains it already handed out are completed, so the base we return is exact.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let i = queue_index as usize;
        let Some(q) = self.queues.queues.get(i) else {
            return Ok(());
        };
        if !self.queues.wait_idle(|j| j == i, STOP_VRING_TIMEOUT) {
            tracing::warn!(
                queue = i,
                "requests still running when the queue was stopped"
            );
            self.queues.abandon(q);
        }
        // When the frontend starts the queue again, the guest hears from it at once.
        q.restarted.store(true, Ordering::SeqCst);
        Ok(())
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
        // Each thread serves one queue: its vrings[0], queue number `thread_id`.
        let (Some(vring), Ok(index)) = (
            vrings.get(usize::from(device_event)),
            u16::try_from(thread_id),
        ) else {
            return Ok(());
        };
        self.drain(index, vring)
    }
}
