//! `--sandbox namespace`: a new PID namespace (the parent stays outside as a [`Supervisor`]),
//! private mount, network and IPC namespaces, and `pivot_root` into the share.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{sys, Error};

pub(super) enum Fork {
    Parent(Supervisor),
    Child,
}

/// The signals the supervisor passes on, and SIGCHLD, which tells it the child is gone.
const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only takes valid signal numbers.
    unsafe {
        let mut set = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn mask_signals(how: libc::c_int) -> Result<(), Error> {
    let set = signal_set();
    // SAFETY: a valid set; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Error::Sys {
            what: "change the signal mask",
            source: std::io::Error::from_raw_os_error(r),
        });
    }
    Ok(())
}

/// Forks into a new PID namespace. The child is its PID 1 and dies with the parent; it leaves
/// with private mount, network and IPC namespaces of its own. Only the child unshares those:
/// pivot_root moves the root of every process in its mount namespace, and the parent must keep
/// the host's view to remove the socket by path when the child is done.
pub(super) fn fork() -> Result<Fork, Error> {
    // Blocked across the fork, so neither side loses a signal that comes early: the parent
    // takes them with sigwaitinfo(); the child, as PID 1, would have one without a handler
    // dropped, so it keeps them blocked until the daemon's handlers exist
    // (unblock_stop_signals).
    mask_signals(libc::SIG_BLOCK)?;
    // SAFETY: plain syscall; it affects only the children created afterwards.
    sys(
        unsafe { libc::unshare(libc::CLONE_NEWPID) },
        "unshare a PID namespace",
    )?;
    // The child's test that the parent is still there (see below): it holds the write end.
    let mut fds = [0; 2];
    // SAFETY: valid out array of two fds.
    sys(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "create a pipe",
    )?;
    // SAFETY: pipe2 returned two fresh fds that nothing else owns.
    let (alive_r, alive_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded (Sandbox::enter checked), so the child may run
    // any code.
    let pid = sys(unsafe { libc::fork() }, "fork into the PID namespace")?;
    if pid > 0 {
        drop(alive_r);
        tracing::info!(
            pid,
            "sandboxed daemon started in new namespaces; this process supervises it"
        );
        return Ok(Fork::Parent(Supervisor {
            child: pid,
            _alive: alive_w,
        }));
    }
    drop(alive_w);
    // SAFETY: plain prctl.
    sys(
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) },
        "set the parent-death signal",
    )?;
    // The parent may have died before the prctl. getppid() cannot tell (the parent is outside
    // this PID namespace, so it reads 0 either way), but its end of the pipe closes with it.
    let mut p = libc::pollfd {
        fd: alive_r.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; no wait.
    sys(
        unsafe { libc::poll(&mut p, 1, 0) },
        "poll the parent's pipe",
    )?;
    if p.revents & libc::POLLHUP != 0 {
        return Err(Error::ParentGone);
    }
    drop(alive_r);
    // SAFETY: plain syscall.
    sys(
        unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC) },
        "unshare the mount, network and IPC namespaces",
    )?;
    Ok(Fork::Child)
}

/// Lets the signals [`fork`] blocked in again. The daemon's handlers must exist by now.
pub(super) fn unblock_stop_signals() -> Result<(), Error> {
    mask_signals(libc::SIG_UNBLOCK)
}

fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
    what: &'static str,
) -> Result<(), Error> {
    let p = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: valid C strings or null, as mount(2) allows for these arguments.
    let r = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) };
    sys(r, what).map(drop)
}

fn mkdir(path: &CStr, what: &'static str) -> Result<(), Error> {
    // SAFETY: valid C string.
    sys(unsafe { libc::mkdir(path.as_ptr(), 0o755) }, what).map(drop)
}

/// In the child, before the share is opened: the share becomes a mount of its own (so the
/// fds the passthrough opens by path live on the mount that becomes the root, and `..` from
/// them stops there), and `/proc` shows nothing but this process's fd table.
pub(super) fn prepare_mounts(shared: &CStr) -> Result<(), Error> {
    // Nothing mounted or unmounted from here on propagates back to the host.
    mount(
        None,
        c"/",
        None,
        libc::MS_SLAVE | libc::MS_REC,
        None,
        "make the sandbox's mounts slaves of the host's",
    )?;
    mount(
        Some(shared),
        shared,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
        "bind-mount the shared dir onto itself",
    )?;
    restrict_mounts(shared)?;
    proc_fd_only()
}

/// nodev, nosuid and noexec on the share and every mount below it, in this namespace only:
/// even a compromised daemon cannot open a device node the guest (or it) created, nor run
/// anything from the share. The passthrough neither opens special files nor executes; this
/// makes the kernel enforce it too.
fn restrict_mounts(shared: &CStr) -> Result<(), Error> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NOEXEC,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: valid C string and attribute struct of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            shared.as_ptr(),
            libc::AT_RECURSIVE,
            &attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(Error::Sys {
                what: "make the shared dir's mounts nodev, nosuid, noexec",
                source: e,
            });
        }
        tracing::warn!(
            "kernel without mount_setattr (Linux < 5.12): the share's device nodes stay openable \
             for a compromised daemon"
        );
    }
    Ok(())
}

/// Replaces `/proc` by a tmpfs holding only `self/fd`, a bind mount of this process's fd
/// directory from a fresh proc of the new PID namespace. The passthrough re-opens inodes
/// through `/proc/self/fd/N`; the rest of proc (`/proc/sys`, `/proc/sysrq-trigger`, other
/// processes' `root` links) is out of reach, whereas an fd to the host's `/proc/self/fd` would
/// lead there through `..`, pivot_root or not.
fn proc_fd_only() -> Result<(), Error> {
    let flags = libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOSUID;
    mount(
        Some(c"tmpfs"),
        c"/proc",
        Some(c"tmpfs"),
        flags,
        Some(c"mode=0755,size=16k"),
        "mount a tmpfs on /proc",
    )?;
    mkdir(c"/proc/fresh", "mkdir /proc/fresh")?;
    mount(
        Some(c"proc"),
        c"/proc/fresh",
        Some(c"proc"),
        flags | libc::MS_RELATIME,
        None,
        "mount the PID namespace's proc",
    )?;
    mkdir(c"/proc/self", "mkdir /proc/self")?;
    mkdir(c"/proc/self/fd", "mkdir /proc/self/fd")?;
    mount(
        Some(c"/proc/fresh/self/fd"),
        c"/proc/self/fd",
        None,
        libc::MS_BIND,
        None,
        "bind-mount the fd directory on /proc/self/fd",
    )?;
    // SAFETY: valid C strings.
    unsafe {
        sys(
            libc::umount2(c"/proc/fresh".as_ptr(), libc::MNT_DETACH),
            "unmount the full proc",
        )?;
        sys(libc::rmdir(c"/proc/fresh".as_ptr()), "rmdir /proc/fresh")?;
    }
    Ok(())
}

/// Makes the share's bind mount the root and detaches everything else.
pub(super) fn pivot_root(shared: &CStr) -> Result<(), Error> {
    // SAFETY: valid C strings; pivot_root(".", ".") stacks the old root on the new one, and
    // the detach below takes it (and every mount below it) away.
    unsafe {
        sys(libc::chdir(shared.as_ptr()), "chdir into the shared dir")?;
        sys(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root into the shared dir",
        )?;
        sys(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detach the old root",
        )?;
        sys(libc::chdir(c"/".as_ptr()), "chdir / in the new root")?;
    }
    Ok(())
}

/// Namespace mode's parent. It holds no fd of the share or the socket: it waits for the
/// sandboxed child, passes SIGTERM, SIGINT and SIGHUP on, and exits with the child's status.
pub struct Supervisor {
    child: libc::pid_t,
    /// Closed when this process dies; the child checks it once (see [`fork`]).
    _alive: OwnedFd,
}

impl Supervisor {
    /// Drops every capability of this process, then waits for the child, passing the stop
    /// signals on, and returns the exit code to leave with: the child's, or 128 + the signal
    /// that killed it. SIGHUP is passed on as SIGTERM: the child, PID 1 of its namespace, has
    /// no SIGHUP handler and would drop it, yet SIGHUP must end the daemon as it does
    /// virtiofsd.
    pub fn wait(self) -> i32 {
        if let Err(e) = drop_all_caps() {
            tracing::warn!(error = %e, "supervisor: could not drop its capabilities");
        }
        let set = signal_set();
        loop {
            // SAFETY: a valid set; the siginfo is not wanted.
            let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
            match sig {
                libc::SIGCHLD => {
                    if let Some(code) = self.reap() {
                        return code;
                    }
                }
                libc::SIGTERM | libc::SIGINT | libc::SIGHUP => {
                    let to = if sig == libc::SIGHUP {
                        libc::SIGTERM
                    } else {
                        sig
                    };
                    // SAFETY: plain syscall on our own child (a zombie at worst, which the
                    // next SIGCHLD reaps).
                    unsafe { libc::kill(self.child, to) };
                }
                -1 => {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::EINTR) {
                        continue;
                    }
                    tracing::error!(error = %e, "supervisor: sigwaitinfo failed; killing the child");
                    // SAFETY: as above.
                    unsafe { libc::kill(self.child, libc::SIGKILL) };
                    return self.reap_blocking();
                }
                _ => {}
            }
        }
    }

    fn reap(&self) -> Option<i32> {
        let mut status = 0;
        // SAFETY: valid out pointer.
        match unsafe { libc::waitpid(self.child, &mut status, libc::WNOHANG) } {
            0 => None,
            r if r < 0 => Some(1),
            _ => Some(exit_code(status)),
        }
    }

    fn reap_blocking(&self) -> i32 {
        let mut status = 0;
        // SAFETY: valid out pointer.
        if unsafe { libc::waitpid(self.child, &mut status, 0) } < 0 {
            return 1;
        }
        exit_code(status)
    }
}

fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        return libc::WEXITSTATUS(status);
    }
    let sig = libc::WTERMSIG(status);
    if sig == libc::SIGSYS {
        tracing::error!(
            "the sandboxed daemon made a system call outside its seccomp allow-list and was \
             killed; --seccomp trap names the call"
        );
    } else {
        tracing::error!(signal = sig, "the sandboxed daemon was killed by a signal");
    }
    128 + sig
}

fn drop_all_caps() -> Result<(), ::caps::errors::CapsError> {
    use ::caps::CapSet;
    ::caps::clear(None, CapSet::Bounding)?;
    ::caps::clear(None, CapSet::Ambient)?;
    ::caps::clear(None, CapSet::Inheritable)?;
    ::caps::clear(None, CapSet::Permitted)
}
