//! Serving the socket: listen, serve one frontend at a time, keep listening after it leaves (so a
//! VMM can reconnect and the guest keeps its disk), and stop cleanly on request.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::{Error as VuError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::BlkBackend;

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
    socket: Mutex<Option<PathBuf>>,
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
            // Waiting in accept(): a connection of our own wakes it up.
            None => {
                if let Some(p) = &*self.0.socket.lock().unwrap_or_else(PoisonError::into_inner) {
                    let _ = UnixStream::connect(p);
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
pub fn serve(backend: Arc<BlkBackend>, socket: &Path, stopper: &Stopper) -> Result<(), ServeError> {
    let mut listener = Listener::new(socket, true).map_err(|source| ServeError::Listen {
        path: socket.to_owned(),
        source,
    })?;
    *stopper
        .0
        .socket
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(socket.to_owned());
    tracing::info!(socket = %socket.display(), queues = backend.options().num_queues, "listening");
    while !stopper.is_stopped() {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vsnap-blk".into(), backend.clone(), mem)
            .map_err(ServeError::Daemon)?;
        daemon.start(&mut listener).map_err(ServeError::Daemon)?;
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
                backend.connected.store(true, Ordering::SeqCst);
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
        backend.reset();
    }
    tracing::info!("stopped serving");
    Ok(())
}
