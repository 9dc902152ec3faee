//! vsnap's control API: HTTP/1.1 + JSON over a Unix socket, in the style of cloud-hypervisor's
//! and Firecracker's (`curl --unix-socket PATH http://localhost/api/v1/info`).
//!
//! - [`http`]: the minimal server (limits, timeouts) and a client;
//! - [`api`]: request and response bodies;
//! - [`routes`]: endpoints → disk operations.

pub mod api;
pub mod http;
pub mod routes;
pub mod upload;

use std::path::Path;
use std::sync::Arc;

pub use api::DeviceStatus;
pub use routes::{Api, StatusFn};

/// Binds `socket` (mode 0600) and serves the API on a background thread. Returns a function that
/// stops it.
pub fn spawn(socket: &Path, api: Api) -> std::io::Result<impl Fn() + Send + Sync + 'static> {
    let server = http::Server::bind(socket)?;
    let stop = server.stopper();
    let api = Arc::new(api);
    std::thread::Builder::new()
        .name("vsnap-api-accept".into())
        .spawn(move || server.run(Arc::new(move |r| api.handle(r))))?;
    Ok(stop)
}
