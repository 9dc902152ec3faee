//! Serving the socket: listen, serve one frontend at a time, keep listening after it leaves (so a
//! VMM can reconnect and the guest keeps its disk), and stop cleanly on request.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::{Error as VuError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use vhost_user_backend::{VhostUserBackend, VringRwLock};

/// A device [`serve`] can run: a vhost-user backend told when a frontend comes and goes.
pub trait Device: VhostUserBackend<Vring = VringRwLock, Bitmap = ()> + 'static {
    /// The daemon's name in the vhost-user framework and in logs.
    const NAME: &'static str;
    /// A frontend connected.
    fn connected(&self);
    /// The frontend left: forget per-connection state before the next one connects.
    fn disconnected(&self);
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {path}: {source}")]
    Listen { path: PathBuf, source: VuError },
    #[error("vhost-user daemon: {0}")]
    Daemon(DaemonError),
}

/// Stops a running [`serve`] from another thread (a signal handler, a test).
#[derive(Clone, Default)]
pub struct Stopper(Arc<StopState>);

#[derive(Default)]
struct StopState {
    requested: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
    /// The listening socket, shut down to wake an `accept()` (works inside a chroot too).
    listener: Mutex<Option<RawFd>>,
}

impl Stopper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the server to stop: the frontend's connection is shut down, in-flight requests
    /// finish, and `serve` returns.
    pub fn stop(&self) {
        let conn = self
            .0
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.0.requested.store(true, Ordering::SeqCst);
        match &*conn {
            Some(h) => h.shutdown(),
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
}

/// Serves `backend` on `socket` until `stopper` is triggered. Each frontend gets a fresh daemon
/// (the framework keeps per-connection state in it); the listener is kept across connections.
pub fn serve<D: Device>(
    backend: Arc<D>,
    socket: &Path,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| ServeError::Listen {
        path: socket.to_owned(),
        source: VuError::SocketError(e),
    })?;
    let r = serve_listener(backend, listener, stopper);
    let _ = std::fs::remove_file(socket);
    r
}

/// [`serve`] on a socket that is already listening (one a supervisor passed, like `--fd`).
pub fn serve_listener<D: Device>(
    backend: Arc<D>,
    listener: UnixListener,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let socket = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    *stopper
        .0
        .listener
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(listener.as_raw_fd());
    let mut listener = Listener::from(listener);
    tracing::info!(device = D::NAME, socket = ?socket, queues = backend.num_queues(), "listening");
    while !stopper.is_stopped() {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(D::NAME.into(), backend.clone(), mem)
            .map_err(ServeError::Daemon)?;
        if let Err(e) = daemon.start(&mut listener) {
            if stopper.is_stopped() {
                break;
            }
            return Err(ServeError::Daemon(e));
        }
        {
            let mut conn = stopper
                .0
                .connection
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if stopper.is_stopped() {
                daemon.request_shutdown();
            } else {
                *conn = daemon.shutdown_handle();
                backend.connected();
                tracing::info!("frontend connected");
            }
        }
        let r = daemon.wait();
        *stopper
            .0
            .connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
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
        drop(daemon);
        backend.disconnected();
    }
    *stopper
        .0
        .listener
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = None;
    tracing::info!("stopped serving");
    Ok(())
}
