//! Confinement of the virtio-fs daemon, after Rust virtiofsd 1.14 (`src/sandbox.rs`,
//! `src/seccomp.rs`, `drop_capabilities` in `src/main.rs`).
//!
//! The steps are types, so they can only run in order:
//!
//! 1. [`Sandbox::new`] checks the configuration (mode, `--modcaps`) before anything changes.
//! 2. [`Sandbox::enter`], while the process is still single-threaded: drops supplementary groups
//!    and, for [`Mode::Namespace`], forks into a new PID namespace. The parent becomes a
//!    [`Supervisor`]; the child makes its own mount, network and IPC namespaces, mounts the share
//!    onto itself and replaces `/proc` with a view of its own fd table only.
//! 3. The caller opens the share ([`crate::passthrough::Passthrough::new`]): its paths are still
//!    visible, and in namespace mode what it opens lands on the sandbox's own mounts.
//! 4. [`Inside::confine`]: `pivot_root` (or `chroot`) into the share, every capability dropped
//!    but the passthrough's, `PR_SET_NO_NEW_PRIVS`. Capabilities are per thread: no thread may
//!    exist before this step.
//! 5. The caller starts its threads and signal handlers, then [`Confined::lock_down`] installs
//!    the seccomp allow-list on every thread (TSYNC).

mod caps;
mod namespace;
mod seccomp;

use std::ffi::{CStr, CString};
use std::io;
use std::path::Path;

pub use namespace::Supervisor;
pub use seccomp::SeccompMode;

/// How the daemon is confined (`--sandbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No confinement beyond capabilities, `no_new_privs` and seccomp.
    None,
    /// `chroot` into the share; no namespaces. Root only.
    Chroot,
    /// New PID, mount, network and IPC namespaces and `pivot_root` into the share. Root only.
    Namespace,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Chroot => "chroot",
            Mode::Namespace => "namespace",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--sandbox {0} needs root (user namespaces are not used); run as root or with --sandbox none"
    )]
    NeedsRoot(&'static str),
    #[error("--modcaps needs root: an unprivileged daemon has no capabilities to keep or drop")]
    ModcapsNeedsRoot,
    #[error("--modcaps: {0}")]
    Modcaps(String),
    #[error("the shared dir's path contains a NUL byte")]
    Nul,
    #[error(
        "{0} threads are running: the sandbox must be entered while the process is single-threaded"
    )]
    Threads(usize),
    #[error("the supervising parent exited before the sandbox was set up")]
    ParentGone,
    #[error("{what}")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("capabilities")]
    Caps(#[from] ::caps::errors::CapsError),
    #[error("seccomp")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter")]
    SeccompBackend(#[from] seccompiler::BackendError),
}

/// A failed system call as an [`Error`] naming what it was for.
fn sys(r: libc::c_int, what: &'static str) -> Result<libc::c_int, Error> {
    if r < 0 {
        Err(Error::Sys {
            what,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(r)
    }
}

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// A checked configuration; nothing has changed yet.
pub struct Sandbox {
    mode: Mode,
    shared: CString,
    /// Some when running as root.
    caps: Option<caps::Kept>,
}

/// What [`Sandbox::enter`] made of this process.
pub enum Entered {
    /// Namespace mode's parent: it only waits for the sandboxed child and forwards signals.
    Supervisor(Supervisor),
    /// The process that serves: namespaces entered, share not yet opened.
    Inside(Inside),
}

/// Inside the namespaces (if any), before the root changes.
pub struct Inside {
    mode: Mode,
    shared: CString,
    caps: Option<caps::Kept>,
}

/// Root changed and capabilities dropped; seccomp not yet installed.
pub struct Confined {
    mode: Mode,
}

impl Sandbox {
    /// Checks `mode` and `modcaps` (virtiofsd's `+name:-name` list) for `shared_dir`, which
    /// must be canonical (the sandbox mounts and changes root by this path).
    pub fn new(mode: Mode, shared_dir: &Path, modcaps: Option<&str>) -> Result<Self, Error> {
        let root = is_root();
        if !root && mode != Mode::None {
            return Err(Error::NeedsRoot(mode.name()));
        }
        let caps = match (root, modcaps) {
            (true, m) => Some(caps::Kept::parse(m)?),
            (false, Some(_)) => return Err(Error::ModcapsNeedsRoot),
            (false, None) => None,
        };
        let shared =
            CString::new(shared_dir.as_os_str().as_encoded_bytes()).map_err(|_| Error::Nul)?;
        Ok(Sandbox { mode, shared, caps })
    }

    /// Drops supplementary groups and enters the namespaces. Must run while the process is
    /// single-threaded (it forks, and the credentials it changes are per thread).
    pub fn enter(self) -> Result<Entered, Error> {
        let threads = thread_count()?;
        if threads != 1 {
            return Err(Error::Threads(threads));
        }
        if self.caps.is_some() {
            // The daemon acts as arbitrary guest uids and gids; host group memberships must not
            // come along (CVE-2022-0358: files created in setgid directories got groups the
            // caller was not in).
            // SAFETY: a null list of length 0.
            sys(
                unsafe { libc::setgroups(0, std::ptr::null()) },
                "drop supplementary groups",
            )?;
        }
        if self.mode == Mode::Namespace {
            match namespace::fork()? {
                namespace::Fork::Parent(sup) => return Ok(Entered::Supervisor(sup)),
                namespace::Fork::Child => namespace::prepare_mounts(&self.shared)?,
            }
        }
        if let Some(caps) = &self.caps {
            // The share is opened next, and it probes what it may do (file handles need
            // CAP_DAC_READ_SEARCH): let it see the set it will serve with.
            caps.lower_effective(setup_caps(self.mode))?;
        }
        Ok(Entered::Inside(Inside {
            mode: self.mode,
            shared: self.shared,
            caps: self.caps,
        }))
    }
}

/// The capabilities the confinement itself uses, kept in the effective set until
/// [`Inside::confine`]: changing root, and emptying the bounding set (SETPCAP).
fn setup_caps(mode: Mode) -> &'static [::caps::Capability] {
    use ::caps::Capability::{CAP_SETPCAP, CAP_SYS_ADMIN, CAP_SYS_CHROOT};
    match mode {
        Mode::None => &[CAP_SETPCAP],
        Mode::Chroot => &[CAP_SETPCAP, CAP_SYS_CHROOT],
        Mode::Namespace => &[CAP_SETPCAP, CAP_SYS_ADMIN],
    }
}

impl Inside {
    /// Changes root to the share, drops capabilities and sets `no_new_privs`. Call after the
    /// share is opened and before any thread is started.
    pub fn confine(self) -> Result<Confined, Error> {
        match self.mode {
            Mode::None => {}
            Mode::Chroot => chroot(&self.shared)?,
            Mode::Namespace => namespace::pivot_root(&self.shared)?,
        }
        if let Some(caps) = &self.caps {
            caps.apply()?;
        }
        // The daemon never executes anything; this also lets an unprivileged daemon install
        // its seccomp filter.
        // SAFETY: plain prctl.
        sys(
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
            "set no_new_privs",
        )?;
        Ok(Confined { mode: self.mode })
    }
}

impl Confined {
    /// Lets stop signals in (namespace mode holds them until the handlers exist: the daemon is
    /// PID 1 of its namespace, which drops signals it has no handler for) and installs the
    /// seccomp filter on every thread. The last step before serving.
    pub fn lock_down(self, seccomp: SeccompMode) -> Result<(), Error> {
        if self.mode == Mode::Namespace {
            namespace::unblock_stop_signals()?;
        }
        seccomp::install(seccomp)
    }
}

fn chroot(dir: &CStr) -> Result<(), Error> {
    // SAFETY: valid C strings.
    unsafe {
        sys(libc::chroot(dir.as_ptr()), "chroot into the shared dir")?;
        sys(libc::chdir(c"/".as_ptr()), "chdir / in the chroot")?;
    }
    Ok(())
}

fn thread_count() -> Result<usize, Error> {
    std::fs::read_dir("/proc/self/task")
        .map(Iterator::count)
        .map_err(|source| Error::Sys {
            what: "count this process's threads in /proc/self/task",
            source,
        })
}
