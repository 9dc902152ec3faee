//! Serving the socket: listen, serve one frontend at a time, keep listening after it leaves (so a
//! VMM can reconnect and the guest keeps its disk), and stop cleanly on request.
//!
//! Order matters at both ends of a connection. When the frontend leaves, every chain the device
//! took is completed before the framework's threads are stopped and the next frontend is
//! accepted, so two connections never write the same rings. When we stop (SIGTERM), the queues
//! are quiesced *before* the socket is closed: a VMM that reconnects later restarts each queue
//! from its used index, which then accounts for every chain we took.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vhost::vhost_user::{Error as VuError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::interpose::{Interposer, Private};
use crate::listen::{self, ListenError};
use crate::shell::{Device, Queues, Shell};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("vhost-user daemon: {0}")]
    Daemon(DaemonError),
    #[error("device setup: {0}")]
    Setup(std::io::Error),
    #[error("accepting a frontend: {0}")]
    Accept(std::io::Error),
}

/// How long a stop waits for requests in flight before closing the socket anyway; short enough
/// that a daemon always exits within 2 s of SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_millis(1500);
/// How long a disconnect waits for requests in flight before abandoning them.
const DISCONNECT_GRACE: Duration = Duration::from_secs(10);

/// Stops a running [`serve`] from another thread (a signal handler, a test).
#[derive(Clone, Default)]
pub struct Stopper(Arc<StopState>);

#[derive(Default)]
struct StopState {
    requested: AtomicBool,
    /// Serve one frontend only: return once it leaves (virtiofsd's behaviour).
    once: AtomicBool,
    connection: Mutex<Option<Connection>>,
    /// The listening socket, shut down to wake an `accept()` (works inside a chroot too).
    listener: Mutex<Option<RawFd>>,
}

struct Connection {
    shutdown: ShutdownHandle,
    queues: Arc<Queues>,
}

impl Stopper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server to stop: no more requests are taken, those in flight finish (for at
    /// most [`STOP_GRACE`]), then the frontend's connection is closed and `serve` returns.
    /// Returns once the connection is closed.
    pub fn stop(&self) {
        let conn = self
            .0
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.0.requested.store(true, Ordering::SeqCst);
        match &*conn {
            Some(c) => {
                if !c.queues.quiesce(STOP_GRACE) {
                    tracing::warn!("stopping with requests still running");
                }
                c.shutdown.shutdown();
            }
            // Waiting in accept(): shutting the listener down makes accept() fail at once.
            None => {
                if let Some(fd) = *self
                    .0
                    .listener
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                {
                    // SAFETY: the fd stays open until serve_listener() returns, which needs
                    // this wake-up first.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.0.requested.load(Ordering::SeqCst)
    }

    /// Makes the server return when its first frontend disconnects, instead of listening for
    /// the next one: what virtiofsd does, and what libvirt, which starts one daemon per guest
    /// and waits for it to go, expects of a daemon it runs in virtiofsd's place.
    pub fn exit_after_disconnect(&self) {
        self.0.once.store(true, Ordering::SeqCst);
    }
}

/// Serves `device` on a socket at `path`, refusing to take over a socket another process
/// serves (see [`listen::bind_exclusive`]). The socket file is removed on return if it is
/// still ours.
pub fn serve<D: Device>(device: Arc<D>, path: &Path, stopper: &Stopper) -> Result<(), ServeError> {
    let (listener, file) = listen::bind_exclusive(path)?.into_parts();
    let r = serve_listener(device, listener, stopper);
    file.remove();
    r
}

/// [`serve`] on a socket that is already listening (one a supervisor passed, like `--fd`, or
/// systemd's).
pub fn serve_listener<D: Device>(
    device: Arc<D>,
    listener: UnixListener,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let shell = Arc::new(Shell::new(device).map_err(ServeError::Setup)?);
    let socket: Option<PathBuf> = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    *stopper
        .0
        .listener
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(listener.as_raw_fd());
    // Devices with inflight tracking are served through the interposer, which answers what
    // the framework cannot (crate::interpose).
    let private = if D::INFLIGHT {
        Some(Private::new().map_err(ServeError::Setup)?)
    } else {
        None
    };
    tracing::info!(device = D::NAME, socket = ?socket, queues = shell.num_queues(), "listening");
    let r = loop {
        if stopper.is_stopped() {
            break Ok(());
        }
        match serve_one(&shell, &listener, private.as_ref(), stopper) {
            Ok(()) if stopper.0.once.load(Ordering::SeqCst) => break Ok(()),
            Ok(()) => {}
            Err(e) if stopper.is_stopped() => {
                tracing::debug!(error = %e, "accept ended by the stop");
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };
    *stopper
        .0
        .listener
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    tracing::info!("stopped serving");
    r
}

/// Connects the next frontend to `daemon`: directly, or through the interposer (whose threads
/// are returned).
fn accept<D: Device>(
    shell: &Arc<Shell<D>>,
    listener: &UnixListener,
    private: Option<&Private>,
    daemon: &mut VhostUserDaemon<Arc<Shell<D>>>,
) -> Result<Option<Interposer>, ServeError> {
    let Some(private) = private else {
        let mut l = Listener::from(listener.try_clone().map_err(ServeError::Accept)?);
        return daemon
            .start(&mut l)
            .map(|()| None)
            .map_err(ServeError::Daemon);
    };
    let (vmm, _) = listener.accept().map_err(ServeError::Accept)?;
    let path = private.path().to_str().ok_or_else(|| {
        ServeError::Setup(std::io::Error::other("private socket path is not UTF-8"))
    })?;
    daemon.start_client(path).map_err(ServeError::Daemon)?;
    let inner = private.accept_own().map_err(ServeError::Accept)?;
    Interposer::spawn(vmm, inner, shell.clone())
        .map(Some)
        .map_err(ServeError::Setup)
}

/// Accepts one frontend and serves it until it leaves or the stopper stops it.
fn serve_one<D: Device>(
    shell: &Arc<Shell<D>>,
    listener: &UnixListener,
    private: Option<&Private>,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon =
        VhostUserDaemon::new(D::NAME.into(), shell.clone(), mem).map_err(ServeError::Daemon)?;
    let interposer = match accept(shell, listener, private, &mut daemon) {
        Ok(i) => i,
        Err(e) => {
            // The framework's threads exit when the daemon drops; nothing was connected.
            daemon.request_shutdown();
            let _ = daemon.wait();
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
            drop(daemon);
            shell.end_connection();
            return Err(e);
        }
    };
    {
        let mut conn = stopper
            .0
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shell.begin_connection();
        match daemon.shutdown_handle() {
            Some(shutdown) if !stopper.is_stopped() => {
                *conn = Some(Connection {
                    shutdown,
                    queues: shell.queues().clone(),
                });
                tracing::info!("frontend connected");
            }
            _ => daemon.request_shutdown(),
        }
    }
    let r = daemon.wait();
    if let Some(i) = interposer {
        i.join();
    }
    *stopper
        .0
        .connection
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    // The frontend is gone (or we closed it after quiescing): finish what it left in flight
    // before the framework's threads go and the next frontend can take the rings.
    if !shell.quiesce(DISCONNECT_GRACE) {
        tracing::warn!("requests of the departed frontend abandoned");
    }
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    match r {
        Ok(())
        | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => {
            if !stopper.is_stopped() {
                tracing::info!("frontend disconnected; listening for the next one");
            }
        }
        // A misbehaving frontend ends its own connection, not the daemon.
        Err(e) => {
            tracing::warn!(error = %e, "frontend connection ended with an error; listening again")
        }
    }
    // Joins the worker threads and drops the connection's rings, eventfds and memory.
    drop(daemon);
    shell.end_connection();
    Ok(())
}
