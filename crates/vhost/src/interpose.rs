//! A thin seam for the vhost-user messages vhost-user-backend 0.24 cannot handle: it answers
//! `GET_INFLIGHT_FD` and `SET_INFLIGHT_FD` itself (the framework replies to both with an error
//! and has no hook for them, see docs/lifecycle.md) and passes every other message, with its
//! fds, unchanged to the framework's handler over a private socket; replies come back the same
//! way. Only the control path goes through it: the rings, kicks and calls stay direct.
//!
//! ```text
//!   VMM ──socket── [interposer] ──private socket── vhost-user-backend handler
//!                       │ GET/SET_INFLIGHT_FD
//!                       └──────────── Intercept (the shell)
//! ```
//!
//! The private socket is a listening socket in a fresh 0700 directory; the framework connects
//! to it (`VhostUserDaemon::start_client`) and a connection is accepted only from this very
//! process (`SO_PEERCRED`), so nothing else on the host can reach the handler through it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserInflight, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vm_memory::ByteValued;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight::{InflightError, Info};

const HEADER: usize = 12;
/// `VHOST_USER_VRING_NOFD_MASK`: the kick message carries no fd.
const VRING_NOFD: u64 = 0x100;

/// What the interposer hands to the device side.
pub trait Intercept: Send + Sync + 'static {
    /// `GET_INFLIGHT_FD`: a fresh region for the queues the frontend describes.
    fn get_inflight_fd(&self, want: Info) -> Result<(Info, File), InflightError>;
    /// `SET_INFLIGHT_FD`: the region to track requests in from now on (perhaps an earlier
    /// daemon's, kept by the VMM across our restart).
    fn set_inflight_fd(&self, info: Info, file: File) -> Result<(), InflightError>;
    /// Whether a region is in use: then every queue that starts is kicked once, because
    /// requests the guest queued before we came may have nobody else to announce them.
    fn tracking(&self) -> bool;
}

/// One vhost-user message as read off the socket.
struct Msg {
    hdr: [u8; HEADER],
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn field(&self, i: usize) -> u32 {
        u32::from_ne_bytes(self.hdr[4 * i..4 * i + 4].try_into().expect("4 bytes"))
    }
    fn request(&self) -> u32 {
        self.field(0)
    }
    fn flags(&self) -> u32 {
        self.field(1)
    }
}

/// Fills `buf` from the socket, keeping every fd that comes along. `Ok(false)`: the peer
/// closed before the first byte.
fn recv_exact(s: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        // SAFETY: the iovec points into `rest`, which is borrowed mutably for the call and
        // may hold any bytes.
        let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }.map_err(io::Error::from)?;
        for &fd in &raw[..nfds] {
            // SAFETY: recvmsg just installed these fds in our table; nothing else owns them.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Reads one message; `None` when the peer has closed the connection.
fn read_msg(s: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HEADER];
    let mut fds = Vec::new();
    if !recv_exact(s, &mut hdr, &mut fds)? {
        return Ok(None);
    }
    let size = u32::from_ne_bytes(hdr[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_MSG_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message of {size} bytes"),
        ));
    }
    let mut body = vec![0u8; size];
    if !recv_exact(s, &mut body, &mut fds)? && size > 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Some(Msg { hdr, body, fds }))
}

fn write_msg(s: &UnixStream, hdr: &[u8], body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = s
        .send_with_fds(&[hdr, body], fds)
        .map_err(io::Error::from)?;
    // A short send carried the fds with its first byte; the rest goes as plain bytes.
    let rest = hdr
        .iter()
        .chain(body)
        .skip(sent)
        .copied()
        .collect::<Vec<u8>>();
    if !rest.is_empty() {
        (&*s).write_all(&rest)?;
    }
    Ok(())
}

fn reply_header(request: u32, size: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&request.to_ne_bytes());
    h[4..8].copy_from_slice(&(0x1 | VhostUserHeaderFlag::REPLY.bits()).to_ne_bytes());
    h[8..12].copy_from_slice(&(size as u32).to_ne_bytes());
    h
}

fn parse_inflight(body: &[u8]) -> Option<Info> {
    let m = VhostUserInflight::from_slice(body)?;
    Some(Info {
        mmap_size: m.mmap_size,
        mmap_offset: m.mmap_offset,
        num_queues: m.num_queues,
        queue_size: m.queue_size,
    })
}

fn inflight_body(i: Info) -> Vec<u8> {
    VhostUserInflight::new(i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size)
        .as_slice()
        .to_vec()
}

/// The two threads that carry one frontend connection.
pub struct Interposer {
    threads: Vec<JoinHandle<()>>,
}

impl Interposer {
    /// Starts carrying messages between `vmm` (the frontend's connection) and `inner` (the
    /// framework's). When either side closes or misbehaves, both are shut down.
    pub fn spawn(vmm: UnixStream, inner: UnixStream, x: Arc<dyn Intercept>) -> io::Result<Self> {
        let to_vmm = Arc::new(Mutex::new(vmm.try_clone()?));
        let ends = (vmm.try_clone()?, inner.try_clone()?);
        let close = move || {
            let _ = ends.0.shutdown(std::net::Shutdown::Both);
            let _ = ends.1.shutdown(std::net::Shutdown::Both);
        };
        let close = Arc::new(close);
        let (inner_rx, replies) = (inner.try_clone()?, to_vmm.clone());
        let c = close.clone();
        let down = std::thread::Builder::new()
            .name("vhost-interpose-rx".into())
            .spawn(move || {
                if let Err(e) = frontend_to_handler(&vmm, &inner, &replies, &*x) {
                    tracing::warn!(error = %e, "vhost-user frontend connection ended");
                }
                c();
            })?;
        let up = std::thread::Builder::new()
            .name("vhost-interpose-tx".into())
            .spawn(move || {
                if let Err(e) = handler_to_frontend(&inner_rx, &to_vmm) {
                    tracing::debug!(error = %e, "vhost-user handler connection ended");
                }
                close();
            })?;
        Ok(Interposer {
            threads: vec![down, up],
        })
    }

    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn send_locked(to: &Mutex<UnixStream>, hdr: &[u8], body: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let s = to.lock().unwrap_or_else(PoisonError::into_inner);
    write_msg(&s, hdr, body, fds)
}

fn handler_to_frontend(inner: &UnixStream, vmm: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(m) = read_msg(inner)? {
        let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_locked(vmm, &m.hdr, &m.body, &fds)?;
    }
    Ok(())
}

fn frontend_to_handler(
    vmm: &UnixStream,
    inner: &UnixStream,
    replies: &Mutex<UnixStream>,
    x: &dyn Intercept,
) -> io::Result<()> {
    let get = u32::from(FrontendReq::GET_INFLIGHT_FD);
    let set = u32::from(FrontendReq::SET_INFLIGHT_FD);
    let kick = u32::from(FrontendReq::SET_VRING_KICK);
    while let Some(mut m) = read_msg(vmm)? {
        let request = m.request();
        if request == get {
            // A frontend waits for this reply before it sends anything else that is answered,
            // so it cannot overtake a reply the handler still owes.
            let region = parse_inflight(&m.body)
                .ok_or(InflightError::Empty)
                .and_then(|want| x.get_inflight_fd(want));
            let (info, file) = match region {
                Ok((info, file)) => (info, Some(file)),
                Err(e) => {
                    // A zero size tells QEMU and cloud-hypervisor to go on without a region.
                    tracing::warn!(error = %e, "GET_INFLIGHT_FD: no inflight region");
                    (Info::default(), None)
                }
            };
            let body = inflight_body(info);
            let fds: Vec<RawFd> = file.iter().map(AsRawFd::as_raw_fd).collect();
            send_locked(replies, &reply_header(get, body.len()), &body, &fds)?;
        } else if request == set {
            let result = match (parse_inflight(&m.body), m.fds.pop(), m.fds.is_empty()) {
                (Some(info), Some(fd), true) => x.set_inflight_fd(info, File::from(fd)),
                _ => Err(InflightError::Empty),
            };
            if let Err(e) = &result {
                tracing::warn!(error = %e, "SET_INFLIGHT_FD refused: requests are not tracked");
            }
            if m.flags() & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 {
                let status = u64::from(result.is_err());
                send_locked(replies, &reply_header(set, 8), &status.to_ne_bytes(), &[])?;
            }
        } else {
            let kick_fd = (request == kick && x.tracking() && m.fds.len() == 1)
                .then(|| m.body.get(..8))
                .flatten()
                .filter(|b| u64::from_ne_bytes((*b).try_into().expect("8 bytes")) & VRING_NOFD == 0)
                .and_then(|_| m.fds[0].try_clone().ok());
            let fds: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
            write_msg(inner, &m.hdr, &m.body, &fds)?;
            if let Some(fd) = kick_fd {
                kick_once(File::from(fd));
            }
        }
    }
    Ok(())
}

/// Signals a kick eventfd once, as libvhost-user does after recovering a queue. Only an
/// eventfd with room in its counter is written, so a frontend cannot make this block.
fn kick_once(mut f: File) {
    let is_eventfd = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .is_ok_and(|l| l.as_os_str() == "anon_inode:[eventfd]");
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let writable = is_eventfd && unsafe { libc::poll(&mut pfd, 1, 0) } == 1;
    if !writable || f.write_all(&1u64.to_ne_bytes()).is_err() {
        tracing::warn!("could not kick a restarted queue");
    }
}

/// The private socket the framework's handler connects to.
pub struct Private {
    listener: UnixListener,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Private {
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("vsnap-vhost-").tempdir()?;
        let path = dir.path().join("handler.sock");
        let listener = UnixListener::bind(&path)?;
        Ok(Private {
            listener,
            path,
            _dir: dir,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The connection the framework made to us (it has connected before this is called).
    /// Anything that connected from another process is closed.
    pub fn accept_own(&self) -> io::Result<UnixStream> {
        loop {
            let (s, _) = self.listener.accept()?;
            match peer_pid(&s) {
                Ok(pid) if pid == std::process::id() as i32 => return Ok(s),
                Ok(pid) => tracing::warn!(pid, "refused a connection to the private socket"),
                Err(e) => tracing::warn!(error = %e, "private socket peer"),
            }
        }
    }
}

fn peer_pid(s: &UnixStream) -> io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is the size of `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake {
        tracking: AtomicBool,
        set: Mutex<Option<Info>>,
    }

    impl Intercept for Fake {
        fn get_inflight_fd(&self, want: Info) -> Result<(Info, File), InflightError> {
            let r = crate::inflight::Region::create(want.num_queues, want.queue_size)?;
            Ok((r.info(), r.file().try_clone()?))
        }
        fn set_inflight_fd(&self, info: Info, _file: File) -> Result<(), InflightError> {
            *self.set.lock().unwrap() = Some(info);
            self.tracking.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn tracking(&self) -> bool {
            self.tracking.load(Ordering::SeqCst)
        }
    }

    fn header(request: u32, flags: u32, size: usize) -> [u8; HEADER] {
        let mut h = reply_header(request, size);
        h[4..8].copy_from_slice(&flags.to_ne_bytes());
        h
    }

    struct Rig {
        vmm: UnixStream,
        handler: UnixStream,
        fake: Arc<Fake>,
        ip: Option<Interposer>,
    }

    fn rig() -> Rig {
        let (vmm, vmm_end) = UnixStream::pair().unwrap();
        let (handler, handler_end) = UnixStream::pair().unwrap();
        let fake = Arc::new(Fake {
            tracking: AtomicBool::new(false),
            set: Mutex::new(None),
        });
        let ip = Interposer::spawn(vmm_end, handler_end, fake.clone()).unwrap();
        Rig {
            vmm,
            handler,
            fake,
            ip: Some(ip),
        }
    }

    #[test]
    fn other_messages_and_their_fds_pass_both_ways_unchanged() {
        let r = rig();
        let (a, _b) = UnixStream::pair().unwrap();
        let hdr = header(u32::from(FrontendReq::SET_VRING_CALL), 1, 8);
        write_msg(&r.vmm, &hdr, &0u64.to_ne_bytes(), &[a.as_raw_fd()]).unwrap();
        let m = read_msg(&r.handler).unwrap().unwrap();
        assert_eq!(m.hdr, hdr);
        assert_eq!(m.body, 0u64.to_ne_bytes());
        assert_eq!(m.fds.len(), 1);
        // The fd that arrived is the same socket: what is written to it reaches `a`'s peer.
        let reply = reply_header(u32::from(FrontendReq::GET_FEATURES), 8);
        write_msg(&r.handler, &reply, &7u64.to_ne_bytes(), &[]).unwrap();
        let m = read_msg(&r.vmm).unwrap().unwrap();
        assert_eq!((m.hdr, m.body), (reply, 7u64.to_ne_bytes().to_vec()));
    }

    #[test]
    fn inflight_messages_are_answered_here_and_never_reach_the_handler() {
        let r = rig();
        let get = u32::from(FrontendReq::GET_INFLIGHT_FD);
        let want = inflight_body(Info {
            num_queues: 2,
            queue_size: 128,
            ..Info::default()
        });
        write_msg(&r.vmm, &header(get, 1, want.len()), &want, &[]).unwrap();
        let m = read_msg(&r.vmm).unwrap().unwrap();
        assert_eq!(m.request(), get);
        assert_ne!(m.flags() & VhostUserHeaderFlag::REPLY.bits(), 0);
        let info = parse_inflight(&m.body).unwrap();
        assert_eq!((info.num_queues, info.queue_size), (2, 128));
        assert_eq!(info.mmap_size, 2 * crate::inflight::stride(128));
        assert_eq!(m.fds.len(), 1);

        let set = u32::from(FrontendReq::SET_INFLIGHT_FD);
        let flags = 1 | VhostUserHeaderFlag::NEED_REPLY.bits();
        let fd = m.fds[0].as_raw_fd();
        write_msg(&r.vmm, &header(set, flags, m.body.len()), &m.body, &[fd]).unwrap();
        let ack = read_msg(&r.vmm).unwrap().unwrap();
        assert_eq!(
            (ack.request(), ack.body),
            (set, 0u64.to_ne_bytes().to_vec())
        );
        assert_eq!(*r.fake.set.lock().unwrap(), Some(info));

        // A SET without its fd is refused (status 1) and the connection carries on.
        write_msg(&r.vmm, &header(set, flags, m.body.len()), &m.body, &[]).unwrap();
        let ack = read_msg(&r.vmm).unwrap().unwrap();
        assert_eq!(ack.body, 1u64.to_ne_bytes());

        // Nothing of the above reached the handler: the next thing it reads is this.
        let hdr = header(u32::from(FrontendReq::GET_FEATURES), 1, 0);
        write_msg(&r.vmm, &hdr, &[], &[]).unwrap();
        assert_eq!(read_msg(&r.handler).unwrap().unwrap().hdr, hdr);
    }

    #[test]
    fn a_started_queue_is_kicked_once_while_tracking() {
        let r = rig();
        r.fake.tracking.store(true, Ordering::SeqCst);
        let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let hdr = header(u32::from(FrontendReq::SET_VRING_KICK), 1, 8);
        write_msg(&r.vmm, &hdr, &0u64.to_ne_bytes(), &[kick.as_raw_fd()]).unwrap();
        let m = read_msg(&r.handler).unwrap().unwrap();
        assert_eq!(m.fds.len(), 1);
        // The kick follows the forwarded message.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let n = loop {
            match kick.read() {
                Ok(n) => break n,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("no kick: {e}"),
            }
        };
        assert_eq!(n, 1);
    }

    #[test]
    fn a_closed_or_lying_frontend_ends_both_sides() {
        let mut r = rig();
        let hdr = header(1, 1, MAX_MSG_SIZE + 1);
        write_msg(&r.vmm, &hdr, &[], &[]).unwrap();
        r.ip.take().unwrap().join();
        let mut buf = [0u8; 1];
        assert_eq!((&r.handler).read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn the_private_socket_takes_only_this_process() {
        let p = Private::new().unwrap();
        let _c = UnixStream::connect(p.path()).unwrap();
        assert!(p.accept_own().is_ok());
    }
}
