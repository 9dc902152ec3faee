//! `vsnap fs`: the virtio-fs daemon. Flags it shares with virtiofsd keep virtiofsd's names, so a
//! VMM's or libvirt's command line works with either binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use vsnap_fs::device::{FsBackend, FsOptions, TAG_LEN};
use vsnap_fs::inode_store::StoreMode;
use vsnap_fs::passthrough::{CacheMode, FsConfig, Passthrough};
use vsnap_fs::sandbox::{Entered, Mode, Sandbox, SeccompMode};
use vsnap_fs::server::Server;
use vsnap_vhost::listen::{self, SocketFile};
use vsnap_vhost::serve_listener;

use crate::service::{Pidfile, ServiceArgs};

#[derive(Args)]
pub struct FsArgs {
    /// vhost-user socket to listen on (the VMM connects to it); one of it, --fd or systemd
    /// socket activation.
    #[arg(long, alias = "socket", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,
    /// Give the socket to this group (a name or a number) with mode 0660, so that a VMM
    /// running in it may connect.
    #[arg(long, requires = "socket_path")]
    socket_group: Option<String>,
    /// A listening vhost-user socket inherited as this fd (as libvirt passes it).
    #[arg(long)]
    fd: Option<i32>,
    /// The directory the guest sees.
    #[arg(long)]
    shared_dir: PathBuf,
    /// Where inodes the guest holds are kept as hard links; must be on the same file system as
    /// the shared dir, and is hidden from the guest if it lies inside it
    /// [default: SHARED_DIR/.vsnap-workdir].
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// How long the guest caches metadata and whether it caches file data.
    #[arg(long, value_enum, default_value = "auto")]
    cache: CacheArg,
    /// Serve extended attributes.
    #[arg(long)]
    xattr: bool,
    /// Let the guest cache writes (FUSE writeback cache; not with --cache never).
    #[arg(long)]
    writeback: bool,
    /// Do not offer READDIRPLUS.
    #[arg(long)]
    no_readdirplus: bool,
    /// Keep O_DIRECT when the guest opens with it.
    #[arg(long)]
    allow_direct_io: bool,
    /// Negotiate FUSE_HANDLE_KILLPRIV_V2: the daemon clears setuid/setgid when an unprivileged
    /// guest user writes or truncates (the default; virtiofsd's default is off).
    #[arg(long, overrides_with = "no_killpriv_v2")]
    killpriv_v2: bool,
    /// Serve the share read-only: every request that would change it gets EROFS.
    #[arg(long)]
    readonly: bool,
    /// Leave clearing setuid/setgid to the guest kernel.
    #[arg(long, overrides_with = "killpriv_v2")]
    no_killpriv_v2: bool,
    /// Threads serving requests; 0 serves them on the queue's own thread.
    #[arg(long, default_value_t = 0)]
    thread_pool_size: usize,
    /// The longest a queue's worker keeps looking at its empty ring before it sleeps, in µs:
    /// the look adapts between 0 and this and backs off when it finds nothing or the CPU is
    /// contended (QEMU's `poll-max-ns`). 0: never look, sleep at once (least CPU, a wake-up per
    /// idle gap).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=1000))]
    poll_max_us: u64,
    /// How guest-held inodes are kept: `workdir` links (no fd per inode) or one fd each.
    #[arg(long, value_enum, default_value = "workdir")]
    inode_store: StoreArg,
    /// Confinement of the daemon: `namespace` (new PID, mount, network and IPC namespaces,
    /// pivot_root into the shared dir; a parent process stays outside and supervises),
    /// `chroot`, or `none` [default: namespace as root, none otherwise]. See docs/fs.md.
    #[arg(long, value_enum)]
    sandbox: Option<SandboxArg>,
    /// What a system call outside the daemon's allow-list does: `kill` the daemon, `trap` (name
    /// the call on stderr, then die), `log` it (kernel audit log) and allow it, or `none` (no
    /// filter).
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: SeccompArg,
    /// Change the capabilities kept as root: colon-separated `+name` / `-name`, e.g.
    /// `-mknod:-dac_read_search` (without DAC_READ_SEARCH directories are held by fd, not by
    /// file handle). Kept by default: chown, dac_override, fowner, fsetid, setgid, setuid,
    /// mknod, setfcap, dac_read_search.
    #[arg(long, allow_hyphen_values = true)]
    modcaps: Option<String>,
    /// Tag offered in the config space (QEMU and cloud-hypervisor set their own).
    #[arg(long)]
    tag: Option<String>,
    /// Maximum virtqueue size.
    #[arg(long, default_value_t = 1024)]
    queue_size: u16,
    /// Request queues offered besides the hiprio queue (cloud-hypervisor's `num_queues`), each
    /// served by a thread of its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=255))]
    num_request_queues: u16,
    /// Exit when the frontend disconnects instead of keeping the FUSE session for its
    /// reconnect: virtiofsd's behaviour, which vsnap-virtiofsd always has (libvirt starts one
    /// daemon per guest and waits for it to exit).
    #[arg(long)]
    exit_after_disconnect: bool,
    /// Open-file limit to set; 0 leaves it alone [default: min(1,000,000, fs.nr_open) as root,
    /// the hard limit otherwise]. Open guest files (and, with `--inode-store fd`, every inode)
    /// take an fd each.
    #[arg(long)]
    rlimit_nofile: Option<u64>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// Raises RLIMIT_NOFILE like virtiofsd does.
fn raise_nofile(want: Option<u64>, root: bool) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out pointer.
    cvt(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) },
        "getrlimit",
    )?;
    let target = match want {
        Some(0) => return Ok(()),
        Some(n) => n,
        None if root => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
            .min(1_000_000),
        None => lim.rlim_max,
    };
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: target.max(lim.rlim_max),
    };
    // SAFETY: valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return Ok(());
    }
    // Without CAP_SYS_RESOURCE the hard limit cannot rise: take what it allows.
    let soft = libc::rlimit {
        rlim_cur: target.min(lim.rlim_max),
        rlim_max: lim.rlim_max,
    };
    tracing::info!(
        limit = soft.rlim_cur,
        "open-file limit capped by the hard limit"
    );
    // SAFETY: valid pointer.
    cvt(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) },
        "raise the open-file limit",
    )
}

#[derive(Clone, Copy, ValueEnum)]
enum CacheArg {
    Never,
    Metadata,
    Auto,
    Always,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreArg {
    Workdir,
    Fd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SandboxArg {
    None,
    Chroot,
    Namespace,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SeccompArg {
    None,
    Log,
    Kill,
    Trap,
}

fn cvt(r: libc::c_int, what: &str) -> anyhow::Result<()> {
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(())
}

/// Whether `workdir` lies inside the (canonical) `shared` dir. The workdir may not exist yet:
/// its parent is resolved instead.
fn inside(shared: &Path, workdir: &Path) -> bool {
    let (Some(parent), Some(_)) = (workdir.parent(), workdir.file_name()) else {
        return false;
    };
    std::fs::canonicalize(parent).is_ok_and(|p| p.starts_with(shared))
}

/// The listening socket: systemd's, an inherited `--fd`, or `--socket-path` bound unless a live
/// daemon serves it (with the socket file to remove at exit).
fn listen(a: &FsArgs) -> anyhow::Result<(std::os::unix::net::UnixListener, Option<SocketFile>)> {
    if let Some(l) = listen::from_systemd()? {
        if a.socket_group.is_some() {
            bail!(
                "--socket-group: systemd passed the socket; set SocketGroup= in its .socket unit"
            );
        }
        return Ok((l, None));
    }
    match (&a.socket_path, a.fd) {
        (Some(p), _) => {
            let mut bound = listen::bind_exclusive(p)?;
            if let Some(g) = &a.socket_group {
                if let Err(e) = bound.set_group(g) {
                    bound.file.remove();
                    return Err(e.into());
                }
            }
            let (l, file) = bound.into_parts();
            Ok((l, Some(file)))
        }
        // SAFETY: the caller handed us this fd as a listening socket.
        (None, Some(fd)) => Ok((unsafe { listen::from_fd(fd) }?, None)),
        (None, None) => bail!("--socket-path, --fd or systemd socket activation is needed"),
    }
}

/// Removes the pidfile however `run` is left, except by the paths that must not (see `run`).
struct PidfileGuard(Option<Pidfile>);

impl Drop for PidfileGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.remove();
        }
    }
}

pub fn run(a: FsArgs) -> anyhow::Result<()> {
    // Before anything is bound or opened: a second daemon on the same pidfile stops here.
    let mut pidfile = PidfileGuard(a.service.lock_pidfile()?);
    if a.tag.as_ref().is_some_and(|t| t.len() > TAG_LEN) {
        bail!("--tag is longer than {TAG_LEN} bytes");
    }
    if !a.queue_size.is_power_of_two() || a.queue_size > 32768 {
        bail!("--queue-size must be a power of two up to 32768");
    }
    let shared = std::fs::canonicalize(&a.shared_dir)
        .with_context(|| format!("shared dir {}", a.shared_dir.display()))?;
    let workdir = match &a.workdir {
        Some(w) => std::path::absolute(w)?,
        None => shared.join(".vsnap-workdir"),
    };
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    let mode = match a.sandbox {
        Some(SandboxArg::None) => Mode::None,
        Some(SandboxArg::Chroot) => Mode::Chroot,
        Some(SandboxArg::Namespace) => Mode::Namespace,
        None if root => Mode::Namespace,
        None => Mode::None,
    };
    if mode == Mode::Namespace && !inside(&shared, &workdir) {
        // Its fd would be a way out of the sandbox root, and the links it holds could not
        // cross from the share's own mount to it anyway.
        bail!("--sandbox namespace needs the --workdir inside the --shared-dir");
    }
    let sandbox = Sandbox::new(mode, &shared, a.modcaps.as_deref())?;
    // Bind before the sandbox hides the socket's directory.
    let (listener, socket_file) = listen(&a)?;
    let cfg = FsConfig {
        cache: match a.cache {
            CacheArg::Never => CacheMode::Never,
            CacheArg::Metadata => CacheMode::Metadata,
            CacheArg::Auto => CacheMode::Auto,
            CacheArg::Always => CacheMode::Always,
        },
        xattr: a.xattr,
        writeback: a.writeback,
        readdirplus: !a.no_readdirplus,
        allow_direct_io: a.allow_direct_io,
        inode_store: match a.inode_store {
            StoreArg::Workdir => StoreMode::Workdir,
            StoreArg::Fd => StoreMode::Fd,
        },
        killpriv_v2: !a.no_killpriv_v2,
        readonly: a.readonly,
    };
    // The pid written is the one the host knows the daemon by: in namespace mode this process
    // becomes the supervisor, which passes stop signals on.
    let ready = raise_nofile(a.rlimit_nofile, root).and_then(|()| match &mut pidfile.0 {
        Some(p) => Ok(p.write_pid(std::process::id())?),
        None => Ok(()),
    });
    if let Err(e) = ready {
        if let Some(f) = &socket_file {
            f.remove();
        }
        return Err(e);
    }
    let inside = match sandbox.enter()? {
        Entered::Inside(i) => i,
        Entered::Supervisor(sup) => {
            // The sandboxed child listens on it now; this process keeps no part of the daemon.
            // Closing does not unlink the socket file, which is the child's until it exits.
            drop(listener);
            let code = sup.wait();
            if let Some(f) = &socket_file {
                f.remove();
            }
            drop(pidfile);
            std::process::exit(code);
        }
    };
    let _held_until_exit = match mode {
        // The supervisor holds the pidfile; the sandboxed child keeps no descriptor of the
        // host's file system.
        Mode::Namespace => {
            drop(pidfile.0.take());
            None
        }
        // The file is out of reach once the root changes: the lock is held until exit and the
        // file stays behind, for the next start to take over.
        Mode::Chroot => pidfile.0.take(),
        Mode::None => None,
    };
    // Opened here: after the fork (its /proc/self/fd is this process's) and while the paths
    // are still visible.
    tracing::debug!(
        config = ?cfg,
        request_queues = a.num_request_queues,
        thread_pool_size = a.thread_pool_size,
        "options"
    );
    let fs = Passthrough::new(&shared, &workdir, cfg)
        .with_context(|| format!("serve {}", shared.display()))?;
    let confined = inside.confine()?;
    tracing::info!(
        shared_dir = %shared.display(),
        workdir = %workdir.display(),
        sandbox = mode.name(),
        "serving"
    );
    let backend = Arc::new(FsBackend::new(
        Arc::new(Server::new(fs)),
        FsOptions {
            tag: a.tag.clone(),
            request_queues: a.num_request_queues,
            queue_size: a.queue_size,
            thread_pool_size: a.thread_pool_size,
            poll_max: std::time::Duration::from_micros(a.poll_max_us),
        },
    )?);
    let stopper = super::stop_on_signals()?;
    if a.exit_after_disconnect {
        stopper.exit_after_disconnect();
    }
    confined.lock_down(match a.seccomp {
        SeccompArg::None => SeccompMode::None,
        SeccompArg::Log => SeccompMode::Log,
        SeccompArg::Kill => SeccompMode::Kill,
        SeccompArg::Trap => SeccompMode::Trap,
    })?;
    let served = serve_listener(backend.clone(), listener, &stopper);
    // Inside a sandbox the socket's path is out of reach: the supervisor (namespace) or the
    // next start (chroot) removes it.
    if let (Some(f), Mode::None) = (&socket_file, mode) {
        f.remove();
    }
    // Dropping the server empties the workdir.
    drop(backend);
    served.map_err(|e| anyhow::anyhow!("{e}"))
}
