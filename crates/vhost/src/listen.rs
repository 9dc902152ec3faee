//! Getting the listening socket: bound to a path without ever taking over a live one, passed
//! by a manager as an fd (`--fd`, as libvirt does for virtiofsd), or by systemd socket
//! activation (`LISTEN_FDS`/`LISTEN_PID`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0} is served by another process: refusing to take it over")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket: refusing to replace it")]
    NotASocket(PathBuf),
    #[error("listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("fd {fd} is not a listening Unix socket: {why}")]
    BadFd { fd: RawFd, why: String },
    #[error("systemd socket activation: {0}")]
    Systemd(String),
    #[error("socket group {group}: {why}")]
    Group { group: String, why: String },
}

/// A socket file we created, identified so that it is removed only while it is still ours (a
/// newer daemon may have replaced a stale-looking one since). Device and inode alone do not do:
/// tmpfs hands a file removed and created again the same inode number; the change time tells
/// them apart. (A chmod after bind changes it too; then the file stays, and the next daemon
/// finds it stale.)
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    id: FileId,
}

type FileId = (u64, u64, i64, i64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one we bound.
    pub fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id);
        if !ours {
            return;
        }
        // unlinkat, not std's unlink: this may run under a seccomp filter that allows the
        // *at calls only (vsnap fs).
        if let Ok(c) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a valid C string; no other pointers.
            unsafe { libc::unlinkat(libc::AT_FDCWD, c.as_ptr(), 0) };
        }
    }
}

/// A listening socket bound to a path by [`bind_exclusive`].
#[derive(Debug)]
pub struct Bound {
    pub listener: UnixListener,
    pub file: SocketFile,
}

impl Bound {
    pub fn into_parts(self) -> (UnixListener, SocketFile) {
        (self.listener, self.file)
    }

    /// Gives the socket file to `group` (a name or a number) with mode 0660, so that a VMM
    /// running in that group may connect (virtiofsd's `--socket-group`).
    pub fn set_group(&mut self, group: &str) -> Result<(), ListenError> {
        let err = |why: String| ListenError::Group {
            group: group.to_string(),
            why,
        };
        let gid = group_id(group).map_err(err)?;
        let path = &self.file.path;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))
            .map_err(|e| err(e.to_string()))?;
        // Still ours: the change time moved, so the identity must follow it.
        let m = std::fs::symlink_metadata(path).map_err(|e| err(e.to_string()))?;
        self.file.id = file_id(&m);
        Ok(())
    }
}

/// The gid of a group name (or of a number, taken as it is).
fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let name = CString::new(group).map_err(|_| "a NUL in the name".to_string())?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut grp = std::mem::MaybeUninit::<libc::group>::zeroed();
    let mut found = std::ptr::null_mut();
    // SAFETY: valid C string, out structs and a buffer of the stated length; `found` points into
    // `grp` (or is null) and is read before either goes away.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            grp.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r).to_string());
    }
    if found.is_null() {
        return Err("no such group".into());
    }
    // SAFETY: getgrnam_r filled grp (found == grp).
    Ok(unsafe { grp.assume_init() }.gr_gid)
}

/// Binds a listening socket at `path`. A socket file left by a dead daemon (connecting to it is
/// refused) is replaced; one a live process accepts on is not, nor is any other kind of file.
pub fn bind_exclusive(path: &Path) -> Result<Bound, ListenError> {
    let bind_err = |source| ListenError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            remove_stale(path)?;
            // Losing a race to another daemon starting now shows up as EADDRINUSE again.
            UnixListener::bind(path).map_err(|e| match e.kind() {
                io::ErrorKind::AddrInUse => ListenError::InUse(path.to_owned()),
                _ => bind_err(e),
            })?
        }
        Err(e) => return Err(bind_err(e)),
    };
    let m = std::fs::symlink_metadata(path).map_err(bind_err)?;
    Ok(Bound {
        listener,
        file: SocketFile {
            path: path.to_owned(),
            id: file_id(&m),
        },
    })
}

/// Removes `path` if it is a socket nobody listens on.
fn remove_stale(path: &Path) -> Result<(), ListenError> {
    let m = std::fs::symlink_metadata(path).map_err(|source| ListenError::Bind {
        path: path.to_owned(),
        source,
    })?;
    if !m.file_type().is_socket() {
        return Err(ListenError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        // Someone accepts there. (They see one connection that sends nothing and closes.)
        Ok(_) => Err(ListenError::InUse(path.to_owned())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!(socket = %path.display(), "removing a stale socket");
            std::fs::remove_file(path).map_err(|source| ListenError::Bind {
                path: path.to_owned(),
                source,
            })
        }
        // EAGAIN: listening with a full backlog; anything else: not provably stale.
        Err(_) => Err(ListenError::InUse(path.to_owned())),
    }
}

/// Checks that `fd` is a listening `AF_UNIX` stream socket.
fn check_listening(fd: RawFd) -> Result<(), ListenError> {
    let bad = |why: String| ListenError::BadFd { fd, why };
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`; a bad fd only fails.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if accepting == 0 {
        return Err(bad("not listening".into()));
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || domain != libc::AF_UNIX {
        return Err(bad("not a Unix socket".into()));
    }
    Ok(())
}

/// A listening socket inherited as `fd` (`--fd`): checked to be a listening Unix socket and
/// made close-on-exec.
///
/// # Safety
///
/// `fd` must be an open fd that nothing else in this process owns or will close: one handed to
/// the process at exec, passed here once.
pub unsafe fn from_fd(fd: RawFd) -> Result<UnixListener, ListenError> {
    check_listening(fd)?;
    // SAFETY: the caller guarantees the fd is open and ours alone; check_listening showed
    // it is a listening socket.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned).map_err(|e| ListenError::BadFd {
        fd,
        why: e.to_string(),
    })?;
    Ok(UnixListener::from(owned))
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, no pointers.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many fds systemd passed to this process (`pid`), from `LISTEN_PID` and `LISTEN_FDS`;
/// `None` when the process was not socket-activated.
pub fn listen_fds(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> Result<Option<u32>, ListenError> {
    let (Some(p), Some(n)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let p: u32 = p
        .parse()
        .map_err(|_| ListenError::Systemd(format!("LISTEN_PID={p:?} is not a pid")))?;
    if p != pid {
        // Meant for another process (we inherited the environment): not activated.
        return Ok(None);
    }
    let n: u32 = n
        .parse()
        .map_err(|_| ListenError::Systemd(format!("LISTEN_FDS={n:?} is not a count")))?;
    Ok(Some(n))
}

static SYSTEMD_TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening socket systemd passed (socket activation), if this process was activated.
/// Exactly one fd is expected; `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` are removed
/// from the environment so children do not inherit them. Takes fd 3 at most once per process.
/// Call it at startup, before other threads run (it changes the environment).
pub fn from_systemd() -> Result<Option<UnixListener>, ListenError> {
    let var = |k| std::env::var(k).ok();
    let Some(n) = listen_fds(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(None);
    };
    if n != 1 {
        return Err(ListenError::Systemd(format!(
            "{n} sockets passed; one (the vhost-user socket) expected"
        )));
    }
    if SYSTEMD_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ListenError::Systemd("the socket was already taken".into()));
    }
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    // SAFETY: systemd hands fd 3 to this process (LISTEN_PID is ours); SYSTEMD_TAKEN makes
    // this the only place that takes ownership of it.
    unsafe { from_fd(LISTEN_FDS_START) }.map(Some)
}
