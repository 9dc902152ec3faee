//! A vhost-user frontend for tests, benchmarks and load generation: it connects to a backend's
//! socket, shares memfd-backed "guest" memory, sets up split virtqueues and lets the caller place
//! descriptor chains (direct, indirect, or deliberately malformed) and collect completions,
//! exactly as a VMM would — minus the VM.

pub mod blk;
pub mod fs;
pub mod procstat;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
const F_EVENT_IDX: u64 = 1 << 29;
const F_INDIRECT: u64 = 1 << 28;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user: {0}")]
    Vhost(#[from] vhost::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Guest memory: one memfd mapped shared, starting at guest physical address 0.
pub struct GuestMem {
    pub mmap: GuestMemoryMmap,
    size: u64,
    next: std::sync::atomic::AtomicU64,
}

impl GuestMem {
    pub fn new(size: u64) -> Result<Self> {
        // SAFETY: memfd_create with a static name; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"vsnap-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd was just created and is not owned elsewhere.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size as usize)
            .map_err(|e| Error::Memory(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| Error::Memory("region".into()))?;
        let mmap = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| Error::Memory(e.to_string()))?;
        Ok(Self {
            mmap,
            size,
            next: std::sync::atomic::AtomicU64::new(4096),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bump-allocates `len` bytes aligned to `align` (a power of two). Never freed.
    pub fn alloc(&self, len: u64, align: u64) -> u64 {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = cur.div_ceil(align) * align;
            let end = start + len;
            assert!(
                end <= self.size,
                "guest memory exhausted ({} bytes)",
                self.size
            );
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return start,
                Err(c) => cur = c,
            }
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        self.mmap
            .write_slice(data, GuestAddress(gpa))
            .expect("write inside guest memory");
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        self.mmap
            .read_slice(buf, GuestAddress(gpa))
            .expect("read inside guest memory");
    }

    pub fn read_vec(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(gpa, &mut v);
        v
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mmap
            .get_host_address(GuestAddress(gpa))
            .expect("address inside guest memory") as u64
    }

    fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        let r = self
            .mmap
            .iter()
            .next()
            .ok_or_else(|| Error::Memory("no region".into()))?;
        Ok(VhostUserMemoryRegionInfo::from_guest_region(r)?)
    }
}

/// One descriptor as the driver places it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Desc {
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// xorshift64: the same sequence for the same (non-zero) seed, so a benchmark or a test that
/// picks offsets or pauses with it can be repeated.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // not an iterator: it never ends
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Completions collected from a used ring: `(head, used length)`.
pub type Used = Vec<(u16, u32)>;

/// A split virtqueue in guest memory, driven from the driver side.
pub struct Queue {
    pub index: usize,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    next_avail: u16,
    last_used: u16,
    event_idx: bool,
    /// The available index at the last [`Queue::publish`]: with EVENT_IDX a kick is owed only
    /// when the device's available event lies between it and the new one.
    published: AtomicU16,
    /// Kick at the next publish whatever the device's available event says: the device is new
    /// (a reconnection) and has not written one yet, as QEMU kicks every queue it starts.
    kick_next: AtomicBool,
    /// Interrupts taken (the call eventfd's counts as read) and kicks sent: what a driver
    /// pays per request besides the work, reported by the benchmarks.
    interrupts: AtomicU64,
    kicks: AtomicU64,
}

impl Queue {
    fn new(mem: &GuestMem, index: usize, size: u16, event_idx: bool) -> Result<Self> {
        let n = u64::from(size);
        let q = Self {
            index,
            size,
            desc: mem.alloc(16 * n, 16),
            avail: mem.alloc(6 + 2 * n, 2),
            used: mem.alloc(6 + 8 * n, 4),
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            next_avail: 0,
            last_used: 0,
            event_idx,
            published: AtomicU16::new(0),
            kick_next: AtomicBool::new(true),
            interrupts: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
        };
        Ok(q)
    }

    pub fn in_flight(&self) -> usize {
        self.chains.len()
    }

    fn write_desc(
        mem: &GuestMem,
        table: u64,
        i: u16,
        (addr, len, flags, next): (u64, u32, u16, u16),
    ) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write(table + 16 * u64::from(i), &d);
    }

    /// Places a chain of descriptors in the ring (not yet visible: see [`Queue::publish`]).
    pub fn add(&mut self, mem: &GuestMem, descs: &[Desc]) -> Option<u16> {
        if descs.is_empty() || self.free.len() < descs.len() {
            return None;
        }
        let ids: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("checked"))
            .collect();
        for (k, d) in descs.iter().enumerate() {
            let last = k + 1 == descs.len();
            let flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 }
                | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            let next = if last { 0 } else { ids[k + 1] };
            Self::write_desc(mem, self.desc, ids[k], (d.addr, d.len, flags, next));
        }
        Some(self.push_avail(mem, ids))
    }

    /// Places the chain as an indirect table referenced by a single ring descriptor.
    pub fn add_indirect(&mut self, mem: &GuestMem, descs: &[Desc]) -> Option<u16> {
        let id = self.free.pop()?;
        let table = mem.alloc(16 * descs.len() as u64, 16);
        for (k, d) in descs.iter().enumerate() {
            let last = k + 1 == descs.len();
            let flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 }
                | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            let next = if last { 0 } else { k as u16 + 1 };
            Self::write_desc(mem, table, k as u16, (d.addr, d.len, flags, next));
        }
        let table_len = 16 * descs.len() as u32;
        Self::write_desc(
            mem,
            self.desc,
            id,
            (table, table_len, VIRTQ_DESC_F_INDIRECT, 0),
        );
        Some(self.push_avail(mem, vec![id]))
    }

    /// Places raw descriptors `(addr, len, flags, next)` at ring slots `0..` relative to free
    /// slots, for malformed chains: `next` indexes into the given list.
    pub fn add_raw(&mut self, mem: &GuestMem, raw: &[(u64, u32, u16, u16)]) -> Option<u16> {
        if self.free.len() < raw.len() {
            return None;
        }
        let ids: Vec<u16> = (0..raw.len())
            .map(|_| self.free.pop().expect("checked"))
            .collect();
        for (k, &(addr, len, flags, next)) in raw.iter().enumerate() {
            let next = ids.get(usize::from(next)).copied().unwrap_or(next);
            Self::write_desc(mem, self.desc, ids[k], (addr, len, flags, next));
        }
        Some(self.push_avail(mem, ids))
    }

    fn push_avail(&mut self, mem: &GuestMem, ids: Vec<u16>) -> u16 {
        let head = ids[0];
        let slot = self.next_avail % self.size;
        mem.write(self.avail + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        self.chains.insert(head, ids);
        head
    }

    /// Writes `idx` as the available index and kicks: a corrupt ring, as a hostile driver makes.
    pub fn publish_avail_idx(&self, mem: &GuestMem, idx: u16) {
        mem.mmap
            .store(idx, GuestAddress(self.avail + 2), Ordering::Release)
            .expect("avail idx inside guest memory");
        let _ = self.kick.write(1);
    }

    /// Interrupts taken and kicks sent so far.
    pub fn notifications(&self) -> (u64, u64) {
        (
            self.interrupts.load(Ordering::Relaxed),
            self.kicks.load(Ordering::Relaxed),
        )
    }

    /// The next available index this driver would publish.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// The used index the device last published.
    pub fn guest_used_idx(&self, mem: &GuestMem) -> u16 {
        mem.mmap
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .expect("used idx inside guest memory")
    }

    /// Makes every chain added so far visible to the device and kicks it if it asked to be
    /// (with EVENT_IDX: its available event lies in what this publish added, Linux's
    /// `virtqueue_kick_prepare`), else always.
    pub fn publish(&self, mem: &GuestMem) {
        self.publish_silently(mem);
        let old = self.published.swap(self.next_avail, Ordering::Relaxed);
        // The index store above before the event load below (the driver's virtio_mb).
        fence(Ordering::SeqCst);
        let forced = self.kick_next.swap(false, Ordering::Relaxed);
        if forced || !self.event_idx || need_event(self.avail_event(mem), self.next_avail, old) {
            let _ = self.kick.write(1);
            self.kicks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The available index the device asked to be kicked after (EVENT_IDX).
    fn avail_event(&self, mem: &GuestMem) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        mem.mmap
            .load(GuestAddress(at), Ordering::Acquire)
            .expect("avail event inside guest memory")
    }

    /// Asks for an interrupt at the next used entry beyond what we have collected.
    fn arm_used_event(&self, mem: &GuestMem) {
        if self.event_idx {
            let at = self.avail + 4 + 2 * u64::from(self.size);
            mem.write(at, &self.last_used.to_le_bytes());
            // The event store before the used index is read again (virtqueue_enable_cb).
            fence(Ordering::SeqCst);
        }
    }

    /// Makes every chain added so far visible without kicking: a driver whose kick the
    /// backend never saw (it was not running, or it died before reading it).
    pub fn publish_silently(&self, mem: &GuestMem) {
        if self.event_idx {
            // used_event: interrupt us as soon as anything beyond what we have seen is used.
            let at = self.avail + 4 + 2 * u64::from(self.size);
            mem.write(at, &self.last_used.to_le_bytes());
        }
        fence(Ordering::Release);
        mem.mmap
            .store(
                self.next_avail,
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .expect("avail idx inside guest memory");
    }

    /// Collects completions `(head, used len)` available now.
    pub fn poll_used(&mut self, mem: &GuestMem) -> Vec<(u16, u32)> {
        let idx = self.guest_used_idx(mem);
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = self.last_used % self.size;
            let mut e = [0u8; 8];
            mem.read(self.used + 4 + 8 * u64::from(slot), &mut e);
            let id = u32::from_le_bytes(e[0..4].try_into().expect("4")) as u16;
            let len = u32::from_le_bytes(e[4..8].try_into().expect("4"));
            if let Some(ids) = self.chains.remove(&id) {
                self.free.extend(ids);
            }
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Waits (on the call eventfd) until at least `n` completions are collected or `timeout`.
    pub fn wait_used(&mut self, mem: &GuestMem, n: usize, timeout: Duration) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let mut out = self.poll_used(mem);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Before sleeping, as a driver re-enables its callback: an interrupt for what comes
            // next, else a device honouring EVENT_IDX would have no reason to send one.
            self.arm_used_event(mem);
            out.extend(self.poll_used(mem));
            if out.len() >= n {
                break;
            }
            self.sleep_on_call(left.min(Duration::from_millis(100)));
            out.extend(self.poll_used(mem));
        }
        out
    }
    /// Waits for the device's next interrupt as a driver that trusts EVENT_IDX does (re-arms
    /// its used event, then sleeps on the call eventfd without looking at the used ring until
    /// woken), and collects the completions. `Err` holds what the used ring had when `timeout`
    /// passed without an interrupt: empty if the device had nothing to say (a lost kick, if
    /// requests were waiting), not empty if it used entries without the interrupt asked for.
    pub fn wait_interrupt(
        &mut self,
        mem: &GuestMem,
        timeout: Duration,
    ) -> std::result::Result<Used, Used> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.poll_used(mem);
            if !found.is_empty() {
                return Ok(found);
            }
            self.arm_used_event(mem);
            let found = self.poll_used(mem);
            if !found.is_empty() {
                return Ok(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.poll_used(mem));
            }
            if !self.sleep_on_call(left) {
                return Err(self.poll_used(mem));
            }
        }
    }

    /// Sleeps until the device signals the call eventfd (consumed) or `timeout` (at least
    /// 1 ms) passes; false only if the timeout passed (an interrupted sleep counts as a wake).
    fn sleep_on_call(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let woken = unsafe { libc::poll(&mut pfd, 1, ms) } != 0;
        if let Ok(n) = self.call.read() {
            self.interrupts.fetch_add(n, Ordering::Relaxed);
        }
        woken
    }
}

/// Whether a notification is owed for an index moving from `old` to `new` past `event`
/// (the virtio spec's `vring_need_event`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// How to set a device up.
#[derive(Clone, Debug)]
pub struct Setup {
    pub num_queues: usize,
    pub queue_size: u16,
    pub mem_size: u64,
    pub event_idx: bool,
    pub indirect: bool,
    /// Negotiate inflight tracking when offered, as QEMU and cloud-hypervisor do: one
    /// `GET_INFLIGHT_FD`, then `SET_INFLIGHT_FD` with that region on every (re)connection.
    pub inflight: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
            event_idx: true,
            indirect: true,
            inflight: false,
        }
    }
}

/// Where a reconnecting frontend tells each queue to resume (`SET_VRING_BASE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The guest's used index: what QEMU sends after losing its backend.
    UsedIndex,
    /// The guest's available index: what cloud-hypervisor sends.
    AvailIndex,
}

pub struct Frontend {
    /// `None` between [`Frontend::disconnect`] and [`Frontend::reconnect`].
    fe: Option<VuFrontend>,
    pub mem: GuestMem,
    pub queues: Vec<Queue>,
    pub offered_features: u64,
    pub acked_features: u64,
    pub protocol_features: VhostUserProtocolFeatures,
    pub queue_num: u64,
    setup: Setup,
    /// The inflight region the backend gave us, kept across reconnections as a VMM keeps it.
    pub inflight: Option<(VhostUserInflight, File)>,
}

/// What a backend agreed to in the handshake.
struct Agreed {
    offered: u64,
    acked: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
}

fn handshake(socket: &Path, setup: &Setup) -> Result<(VuFrontend, Agreed)> {
    let mut fe = VuFrontend::connect(socket, setup.num_queues as u64)?;
    fe.set_owner()?;
    let offered = fe.get_features()?;
    if offered & F_PROTOCOL_FEATURES == 0 {
        return Err(Error::Protocol(
            "backend offers no protocol features".into(),
        ));
    }
    let pf = fe.get_protocol_features()?;
    let mut wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    if setup.inflight {
        wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    let want = pf & wanted;
    fe.set_protocol_features(want)?;
    if want.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let queue_num = if want.contains(VhostUserProtocolFeatures::MQ) {
        fe.get_queue_num()?
    } else {
        1
    };
    if (setup.num_queues as u64) > queue_num {
        return Err(Error::Protocol(format!(
            "backend has {queue_num} queues, {} wanted",
            setup.num_queues
        )));
    }
    let mut acked = offered;
    if !setup.event_idx {
        acked &= !F_EVENT_IDX;
    }
    if !setup.indirect {
        acked &= !F_INDIRECT;
    }
    fe.set_features(acked)?;
    Ok((
        fe,
        Agreed {
            offered,
            acked,
            protocol: want,
            queue_num,
        },
    ))
}

impl Frontend {
    /// Connects and runs the setup sequence a VMM runs, acking every device feature offered
    /// (EVENT_IDX and INDIRECT_DESC as `setup` says).
    pub fn connect(socket: &Path, setup: &Setup) -> Result<Self> {
        let (fe, agreed) = handshake(socket, setup)?;
        let mem = GuestMem::new(setup.mem_size)?;
        let event_idx = agreed.acked & F_EVENT_IDX != 0;
        let queues = (0..setup.num_queues)
            .map(|i| Queue::new(&mem, i, setup.queue_size, event_idx))
            .collect::<Result<Vec<_>>>()?;
        let mut f = Self {
            fe: Some(fe),
            mem,
            queues,
            offered_features: agreed.offered,
            acked_features: agreed.acked,
            protocol_features: agreed.protocol,
            queue_num: agreed.queue_num,
            setup: setup.clone(),
            inflight: None,
        };
        f.start_queues(Resume::UsedIndex)?;
        Ok(f)
    }

    /// Connects again, as a VMM does after its backend went away (restarted, upgraded or
    /// killed): the same guest memory, rings and inflight region, each queue resuming as
    /// `resume` says. The new connection must agree to the same features.
    pub fn reconnect(&mut self, socket: &Path, resume: Resume) -> Result<()> {
        let (fe, agreed) = handshake(socket, &self.setup)?;
        if agreed.acked != self.acked_features || agreed.protocol != self.protocol_features {
            return Err(Error::Protocol(
                "the backend offers other features than before".into(),
            ));
        }
        self.fe = Some(fe);
        self.start_queues(resume)
    }

    /// Closes the connection and keeps the guest: memory, rings and the inflight region.
    pub fn disconnect(&mut self) {
        self.fe = None;
    }

    fn fe(&mut self) -> Result<&mut VuFrontend> {
        self.fe
            .as_mut()
            .ok_or_else(|| Error::Protocol("not connected".into()))
    }

    /// Memory, the inflight region and every queue, in the order QEMU sends them.
    fn start_queues(&mut self, resume: Resume) -> Result<()> {
        let region = self.mem.region_info()?;
        self.fe()?.set_mem_table(&[region])?;
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if self.inflight.is_none() {
                let want =
                    VhostUserInflight::new(0, 0, self.queues.len() as u16, self.setup.queue_size);
                self.inflight = Some(self.fe()?.get_inflight_fd(&want)?);
            }
            if let (Some(fe), Some((info, file))) = (self.fe.as_mut(), &self.inflight) {
                fe.set_inflight_fd(info, file.as_raw_fd())?;
            }
        }
        let fe = self
            .fe
            .as_mut()
            .ok_or_else(|| Error::Protocol("not connected".into()))?;
        for q in &self.queues {
            let i = q.index;
            q.kick_next.store(true, Ordering::Relaxed);
            let base = match resume {
                Resume::UsedIndex => q.guest_used_idx(&self.mem),
                Resume::AvailIndex => q.next_avail,
            };
            fe.set_vring_num(i, q.size)?;
            fe.set_vring_base(i, base)?;
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: q.size,
                    queue_size: q.size,
                    flags: 0,
                    desc_table_addr: self.mem.host(q.desc),
                    used_ring_addr: self.mem.host(q.used),
                    avail_ring_addr: self.mem.host(q.avail),
                    log_addr: None,
                },
            )?;
            fe.set_vring_call(i, &q.call)?;
            fe.set_vring_kick(i, &q.kick)?;
            fe.set_vring_enable(i, true)?;
        }
        Ok(())
    }

    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let (_, cfg) = self.fe()?.get_config(
            offset,
            size,
            VhostUserConfigFlags::WRITABLE,
            &vec![0u8; size as usize],
        )?;
        Ok(cfg)
    }

    pub fn set_config(&mut self, offset: u32, buf: &[u8]) -> Result<()> {
        Ok(self
            .fe()?
            .set_config(offset, VhostUserConfigFlags::WRITABLE, buf)?)
    }

    /// Stops queue `i` (GET_VRING_BASE) and returns the device's next avail index.
    pub fn stop_queue(&mut self, i: usize) -> Result<u32> {
        Ok(self.fe()?.get_vring_base(i)?)
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn a_kick_is_owed_only_when_the_event_lies_in_what_was_added() {
        // The device asked for a kick after index 5 (it has taken 0..=5 and will look for 6).
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 9, 3));
        assert!(!need_event(5, 9, 6), "already kicked past the event");
        assert!(!need_event(5, 5, 5), "nothing added");
        // Across the wrap of the 16-bit index.
        assert!(need_event(u16::MAX, 2, u16::MAX));
        assert!(!need_event(u16::MAX, 2, 0));
    }
}
