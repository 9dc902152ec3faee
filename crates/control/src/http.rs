//! Just enough HTTP/1.1 over a Unix socket for a local control API: one request per connection,
//! parsed with `httparse`, with the limits a daemon serving a VM needs — bounded head and body,
//! read/write timeouts (a client that connects and sends nothing is answered 408 and dropped),
//! and a cap on concurrent connections. Nothing here can block the device's data path.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const MAX_HEAD: usize = 16 << 10;
pub const MAX_BODY: usize = 64 << 10;
pub const TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 32;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        let mut body = serde_json::to_vec_pretty(value).expect("serialisable");
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            body,
        }
    }

    pub fn error(status: u16, msg: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": msg.to_string() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

fn write_response(s: &mut UnixStream, r: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&r.body)?;
    s.flush()
}

/// Reads one request; an `Err(Response)` is the error to answer with.
fn read_request(s: &mut UnixStream) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (method, path, body_start, content_length) = loop {
        let n = match s.read(&mut chunk) {
            Ok(0) => {
                return Err(Response::error(
                    400,
                    "connection closed before a complete request",
                ))
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Response::error(408, "no complete request within 5 s"))
            }
            Err(e) => return Err(Response::error(400, e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut content_length = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(Response::error(
                            411,
                            "chunked bodies are not supported: send Content-Length",
                        ));
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        content_length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| Response::error(400, "bad Content-Length"))?;
                    }
                }
                if content_length > MAX_BODY {
                    return Err(Response::error(
                        413,
                        format!("body larger than {MAX_BODY} bytes"),
                    ));
                }
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                break (method, path, len, content_length);
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(Response::error(
                    431,
                    format!("request head larger than {MAX_HEAD} bytes"),
                ))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Response::error(400, format!("malformed HTTP request: {e}"))),
        }
    };
    let mut body = buf.split_off(body_start);
    if body.len() > content_length {
        body.truncate(content_length);
    }
    while body.len() < content_length {
        let n = match s.read(&mut chunk) {
            Ok(0) => return Err(Response::error(400, "body shorter than Content-Length")),
            Ok(n) => n,
            Err(_) => return Err(Response::error(408, "body not received within 5 s")),
        };
        body.extend_from_slice(&chunk[..n.min(content_length - body.len())]);
    }
    Ok(Request { method, path, body })
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A listening control socket. Created mode 0600: only the owner may connect.
pub struct Server {
    listener: UnixListener,
    stopped: Arc<AtomicBool>,
    path: std::path::PathBuf,
}

impl Server {
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            listener,
            stopped: Arc::new(AtomicBool::new(false)),
            path: path.to_owned(),
        })
    }

    /// A handle that stops [`Server::run`].
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let (stopped, path) = (self.stopped.clone(), self.path.clone());
        move || {
            stopped.store(true, Ordering::SeqCst);
            let _ = UnixStream::connect(&path);
        }
    }

    /// Serves until stopped, one thread per connection, at most [`MAX_CONNECTIONS`] at once.
    pub fn run(self, handler: Handler) {
        let active = Arc::new(AtomicUsize::new(0));
        for conn in self.listener.incoming() {
            if self.stopped.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let _ = s.set_write_timeout(Some(TIMEOUT));
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                let _ = write_response(
                    &mut s,
                    &Response::error(503, "too many control connections"),
                );
                continue;
            }
            let (handler, active) = (handler.clone(), active.clone());
            let spawned = std::thread::Builder::new()
                .name("vsnap-api".into())
                .spawn(move || {
                    let resp = match read_request(&mut s) {
                        Ok(req) => handler(&req),
                        Err(resp) => {
                            tracing::debug!(status = resp.status, "control request refused");
                            resp
                        }
                    };
                    let _ = write_response(&mut s, &resp);
                    active.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                tracing::warn!("cannot spawn a control connection thread");
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request and returns (status, body).
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> io::Result<(u16, Vec<u8>)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body
        .map(|b| serde_json::to_vec(b).expect("serialisable"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => Ok((r.code.unwrap_or(0), resp[n..].to_vec())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed HTTP response",
        )),
    }
}
