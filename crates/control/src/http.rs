//! Just enough HTTP/1.1 over a Unix socket for a local control API: one request per connection,
//! parsed with `httparse`, with the limits a daemon serving a VM needs — bounded head and body, a
//! deadline per request (head and body together: a client that sends nothing, or one byte now
//! and then, is answered 408 and dropped), requests read by one poll loop so slow clients
//! cannot take the threads `info` and `cut` need, and caps on connections arriving and requests
//! running. Nothing here can block the device's data path.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MAX_HEAD: usize = 16 << 10;
pub const MAX_BODY: usize = 64 << 10;
/// Per request: from the connection's accept to its last byte.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Requests being handled at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections whose request is still arriving.
pub const MAX_PENDING: usize = 256;

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

/// Parses one request from the bytes received so far: `Ok(None)` while it is incomplete, an
/// `Err(Response)` with the error to answer. Pure (no I/O), so it can be fuzzed on its own.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, Response> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Response::error(
                431,
                format!("request head larger than {MAX_HEAD} bytes"),
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Response::error(400, format!("malformed HTTP request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Err(Response::error(
            431,
            format!("request head larger than {MAX_HEAD} bytes"),
        ));
    }
    let mut content_length = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(
                411,
                "chunked bodies are not supported: send Content-Length",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Response::error(400, "bad Content-Length"))?;
            // Two different lengths are a request smuggling attempt, not a request.
            if content_length.is_some_and(|c| c != n) {
                return Err(Response::error(400, "conflicting Content-Length headers"));
            }
            content_length = Some(n);
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(Response::error(
            413,
            format!("body larger than {MAX_BODY} bytes"),
        ));
    }
    let body = &buf[head_len..];
    if body.len() < content_length {
        return Ok(None);
    }
    Ok(Some(Request {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        body: body[..content_length].to_vec(),
    }))
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A listening control socket. Created mode 0600: only the owner may connect.
pub struct Server {
    listener: UnixListener,
    stopped: Arc<AtomicBool>,
    path: std::path::PathBuf,
}

/// A connection whose request is still arriving.
struct Pending {
    stream: UnixStream,
    buf: Vec<u8>,
    /// The whole request (head and body) must have arrived by then: a client trickling bytes
    /// cannot hold a slot longer than one that sends nothing.
    deadline: Instant,
}

impl Server {
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        // Created 0600, not made so afterwards: nobody else may connect in between. The umask
        // is the process's; a file another thread creates meanwhile is at most 0600 too.
        // SAFETY: plain syscalls on the process umask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
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

    /// Serves until stopped. One thread reads every connection's request (non-blocking, under
    /// poll), so idle or trickling clients cost a buffer each, not a thread, and each is cut off
    /// at its request deadline; when [`MAX_PENDING`] connections are arriving at once, the one
    /// nearest its deadline is dropped to let a new one in. Complete requests run on their own
    /// threads, at most [`MAX_CONNECTIONS`] at once.
    pub fn run(self, handler: Handler) {
        let busy = Arc::new(AtomicUsize::new(0));
        let mut pending: Vec<Pending> = Vec::new();
        let mut chunk = vec![0u8; 16 << 10];
        while !self.stopped.load(Ordering::SeqCst) {
            let now = Instant::now();
            let timeout = pending
                .iter()
                .map(|p| p.deadline.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(3600));
            let mut fds: Vec<libc::pollfd> = std::iter::once(&self.listener as &dyn AsRawFd)
                .chain(pending.iter().map(|p| &p.stream as &dyn AsRawFd))
                .map(|f| libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            if let Err(e) = poll(&mut fds, timeout) {
                tracing::warn!(error = %e, "control socket poll failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            // Requests: read what arrived; answer what is complete, refused or late.
            let now = Instant::now();
            let mut i = pending.len();
            while i > 0 {
                i -= 1;
                let ready = fds[i + 1].revents != 0;
                let outcome = if ready {
                    read_some(&mut pending[i], &mut chunk)
                } else {
                    Ok(None)
                };
                let outcome = match outcome {
                    Ok(None) if now >= pending[i].deadline => Err(Response::error(
                        408,
                        format!("no complete request within {} s", TIMEOUT.as_secs()),
                    )),
                    o => o,
                };
                match outcome {
                    Ok(None) => {}
                    Ok(Some(req)) => {
                        let p = pending.swap_remove(i);
                        dispatch(p, req, &handler, &busy);
                    }
                    Err(resp) => {
                        let mut p = pending.swap_remove(i);
                        tracing::debug!(status = resp.status, "control request refused");
                        answer(&mut p.stream, &resp, p.deadline);
                    }
                }
            }
            if fds[0].revents != 0 {
                self.accept_all(&mut pending);
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }

    fn accept_all(&self, pending: &mut Vec<Pending>) {
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave the rest queued in the kernel for a moment.
                    tracing::warn!(error = %e, "cannot accept a control connection");
                    return;
                }
            };
            if self.stopped.load(Ordering::SeqCst) || s.set_nonblocking(true).is_err() {
                continue;
            }
            if pending.len() >= MAX_PENDING {
                let oldest = (0..pending.len())
                    .min_by_key(|&i| pending[i].deadline)
                    .expect("pending is full, so not empty");
                let mut p = pending.swap_remove(oldest);
                answer(
                    &mut p.stream,
                    &Response::error(503, "too many control connections"),
                    p.deadline,
                );
            }
            pending.push(Pending {
                stream: s,
                buf: Vec::new(),
                deadline: Instant::now() + TIMEOUT,
            });
        }
    }
}

/// Reads what is available without blocking and tries to parse the request.
fn read_some(p: &mut Pending, chunk: &mut [u8]) -> Result<Option<Request>, Response> {
    loop {
        match p.stream.read(chunk) {
            Ok(0) => {
                return match parse_request(&p.buf)? {
                    Some(r) => Ok(Some(r)),
                    None => Err(Response::error(
                        400,
                        "connection closed before a complete request",
                    )),
                }
            }
            Ok(n) => {
                p.buf.extend_from_slice(&chunk[..n]);
                if let Some(r) = parse_request(&p.buf)? {
                    return Ok(Some(r));
                }
                if p.buf.len() > MAX_HEAD + MAX_BODY {
                    return Err(Response::error(413, "request too large"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Response::error(400, e)),
        }
    }
}

/// Runs a complete request on its own thread (a cut may wait for in-flight I/O, a fold copy).
fn dispatch(p: Pending, req: Request, handler: &Handler, busy: &Arc<AtomicUsize>) {
    let Pending {
        mut stream,
        deadline,
        ..
    } = p;
    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        busy.fetch_sub(1, Ordering::AcqRel);
        answer(
            &mut stream,
            &Response::error(503, "too many control requests running"),
            deadline,
        );
        return;
    }
    let (handler, running) = (handler.clone(), busy.clone());
    let spawned = std::thread::Builder::new()
        .name("vsnap-api".into())
        .spawn(move || {
            let resp = handler(&req);
            // The handler may take long (a fold); the answer gets a deadline of its own.
            answer(&mut stream, &resp, Instant::now() + TIMEOUT);
            running.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot spawn a control request thread");
        busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Writes a response, giving up at `deadline` (a client that does not read cannot hold on).
fn answer(s: &mut UnixStream, r: &Response, deadline: Instant) {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    if s.set_nonblocking(false).is_ok() && s.set_write_timeout(Some(left)).is_ok() {
        let _ = write_response(s, r);
    }
}

/// `poll(2)` over `fds` for at most `timeout`.
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()` pollfd structs, which
    // poll only writes the `revents` of.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_waits_for_the_whole_request_and_refuses_bad_ones() {
        let full = b"POST /api/v1/cut HTTP/1.1\r\nContent-Length: 4\r\n\r\n{}  ";
        for n in 0..full.len() {
            assert!(parse_request(&full[..n]).unwrap().is_none(), "prefix {n}");
        }
        let r = parse_request(full).unwrap().unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/api/v1/cut")
        );
        assert_eq!(r.body, b"{}  ");
        let mut extra = full.to_vec();
        extra.extend_from_slice(b"trailing");
        assert_eq!(parse_request(&extra).unwrap().unwrap().body, b"{}  ");
        let status = |b: &[u8]| parse_request(b).unwrap_err().status;
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status(b"\x00\x01 garbage\r\n\r\n"), 400);
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert_eq!(status(&long), 431);
    }
}
