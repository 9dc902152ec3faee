//! Target `http_request`: the control API's HTTP/1.1 request reader (`vsnap_control::http`).
//!
//! Two layers, one input: the pure `http::parse_request` on the whole input, and the public
//! `http::Server` on a socket in a scratch directory (once per process) with a handler that
//! echoes what the reader produced (method, path, body); each input is one connection: the
//! bytes are sent, the write side is shut, the response is read. Both are checked against the
//! outcome computed from the input alone with `httparse` and the documented rules (head 16 KiB,
//! body 64 KiB, Content-Length framing, one length only, no chunked bodies), so the server's
//! incremental reading (reads as they arrive, parse after each, body completion, EOF) is
//! checked against a one-shot parse of the same bytes.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vsnap_control::http::{parse_request, Request, Response, Server, MAX_BODY, MAX_HEAD};

const MAX_HEADERS: usize = 32;

struct Listener {
    path: PathBuf,
}

/// The echo body: method, path and body, each as a little-endian u32 length and the bytes.
fn echo(req: &Request) -> Response {
    let mut body = Vec::new();
    for part in [req.method.as_bytes(), req.path.as_bytes(), &req.body] {
        body.extend_from_slice(&(part.len() as u32).to_le_bytes());
        body.extend_from_slice(part);
    }
    Response {
        status: 200,
        content_type: "application/octet-stream",
        body,
    }
}

fn listener() -> &'static Listener {
    static L: OnceLock<Listener> = OnceLock::new();
    L.get_or_init(|| {
        let path = crate::scratch::dir("http").join("api.sock");
        let server = Server::bind(&path).expect("bind the control socket");
        std::thread::Builder::new()
            .name("fuzz-http".into())
            .spawn(move || server.run(Arc::new(echo)))
            .expect("spawn the server");
        Listener { path }
    })
}

/// What a request's bytes must come to, computed from them alone.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Ok {
        method: Vec<u8>,
        path: Vec<u8>,
        body: Vec<u8>,
    },
    /// Refused with this status.
    Status(u16),
    /// Not complete yet: the parser waits for more; the server, once the client shuts its side,
    /// answers 400.
    Incomplete,
    /// Not HTTP: 400; a server that read more than the head limit of it before the bad byte
    /// arrived may answer 431 instead (`long`: the input is that long).
    Malformed { long: bool },
}

fn model(input: &[u8]) -> Expect {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(input) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => Expect::Status(431),
        Ok(httparse::Status::Complete(n)) => complete(&req, &input[n..]),
        Ok(httparse::Status::Partial) if input.len() > MAX_HEAD => Expect::Status(431),
        Ok(httparse::Status::Partial) => Expect::Incomplete,
        Err(_) => Expect::Malformed {
            long: input.len() > MAX_HEAD,
        },
    }
}

/// The outcome of a request whose head parsed; `rest` is what followed the head.
fn complete(req: &httparse::Request<'_, '_>, rest: &[u8]) -> Expect {
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Expect::Status(411);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
            else {
                return Expect::Status(400);
            };
            // Two different lengths: which one frames the body is ambiguous (smuggling).
            if content_length.is_some_and(|c| c != n) {
                return Expect::Status(400);
            }
            content_length = Some(n);
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Expect::Status(413);
    }
    if rest.len() < content_length {
        return Expect::Incomplete;
    }
    Expect::Ok {
        method: req.method.unwrap_or_default().as_bytes().to_vec(),
        path: req.path.unwrap_or_default().as_bytes().to_vec(),
        body: rest[..content_length].to_vec(),
    }
}

/// Sends `input` on a new connection and returns the raw response.
fn exchange(input: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(&listener().path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut sent = 0;
    while sent < input.len() {
        match crate::sys::send_nosignal(&s, &input[sent..]) {
            Ok(n) => sent += n,
            // The server answered early (an error) and closed.
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                break
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("send: {e}"),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut resp = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            // The server closed with our unread bytes queued: its reply came before.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the response: {e}"),
        }
    }
    resp
}

/// (status, body) of a well-formed response.
fn parse_response(resp: &[u8]) -> (u16, Vec<u8>) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(resp) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!(
            "malformed response ({other:?}): {:?}",
            String::from_utf8_lossy(resp)
        ),
    };
    let body = &resp[n..];
    let header = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    assert_eq!(header("content-length"), Some(body.len().to_string()));
    assert_eq!(header("connection").as_deref(), Some("close"));
    (r.code.expect("status code"), body.to_vec())
}

fn unecho(b: &[u8]) -> Expect {
    let mut parts = Vec::new();
    let mut rest = b;
    for _ in 0..3 {
        let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        parts.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    assert!(rest.is_empty(), "echo body has trailing bytes");
    let body = parts.pop().expect("3 parts");
    let path = parts.pop().expect("3 parts");
    let method = parts.pop().expect("3 parts");
    Expect::Ok { method, path, body }
}

/// The harness.
pub fn http_request(data: &[u8]) {
    let want = model(data);
    // The pure parser, on the whole input.
    let pure = match parse_request(data) {
        Ok(Some(r)) => Expect::Ok {
            method: r.method.into_bytes(),
            path: r.path.into_bytes(),
            body: r.body,
        },
        Ok(None) => Expect::Incomplete,
        Err(resp) => Expect::Status(resp.status),
    };
    let pure_fine = match &want {
        Expect::Malformed { .. } => pure == Expect::Status(400),
        w => pure == *w,
    };
    assert!(pure_fine, "parse_request gave {pure:?}, expected {want:?}");
    // The server, reading the same bytes from a socket as they arrive.
    let (status, body) = parse_response(&exchange(data));
    let got = match status {
        200 => unecho(&body),
        s => Expect::Status(s),
    };
    let fine = match &want {
        Expect::Incomplete => got == Expect::Status(400),
        Expect::Malformed { long } => {
            got == Expect::Status(400) || (*long && got == Expect::Status(431))
        }
        w => got == *w,
    };
    assert!(fine, "the server answered {got:?}, expected {want:?}");
}

/// Requests the control API serves (docs/api.md), and some it must refuse.
pub fn seeds() -> Vec<Vec<u8>> {
    let req = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let mut v = vec![
        req("GET", "/api/v1/info", ""),
        req("GET", "/api/v1/stats", ""),
        req("GET", "/metrics", ""),
        req("POST", "/api/v1/cut", "{\"durable\":true}"),
        req("GET", "/api/v1/generations", ""),
        req("GET", "/api/v1/generations/3", ""),
        req(
            "POST",
            "/api/v1/generations/1/export",
            "{\"path\":\"/tmp/x.vsnap\",\"format\":\"vsnap\"}",
        ),
        req("GET", "/api/v1/generations/1/export", ""),
        req("DELETE", "/api/v1/generations/1/export", ""),
        req("POST", "/api/v1/generations/2/fold", "{\"force\":false}"),
        b"GET /api/v1/info HTTP/1.0\r\n\r\n".to_vec(),
        b"GET /api/v1/info?x=1 HTTP/1.1\nHost: x\n\n".to_vec(),
        b"POST /api/v1/cut HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec(),
        b"POST /api/v1/cut HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 2\r\n\r\nhello"
            .to_vec(),
        b"POST /api/v1/cut HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nhi".to_vec(),
        b"POST /api/v1/cut HTTP/1.1\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
        b"POST /api/v1/cut HTTP/1.1\r\nContent-Length: 65537\r\n\r\n".to_vec(),
    ];
    // A head just under the limit, and a body at the limit.
    let pad = "x".repeat(MAX_HEAD - 64);
    v.push(format!("GET /metrics HTTP/1.1\r\nX-Pad: {pad}\r\n\r\n").into_bytes());
    v.push(req("POST", "/api/v1/cut", &" ".repeat(MAX_BODY)));
    v
}

pub const DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"Content-Length: ",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b" HTTP/1.1\r\n",
    b"GET ",
    b"POST ",
    b"/api/v1/",
    b"65536",
    b"65537",
    b"+1",
    b"18446744073709551616",
    b": ",
    b"\t",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_get_the_answers_the_model_predicts() {
        for s in seeds() {
            http_request(&s);
        }
        let get = &seeds()[0];
        assert!(matches!(model(get), Expect::Ok { .. }));
        assert_eq!(model(&seeds()[12]), Expect::Status(411));
        assert_eq!(model(&seeds()[13]), Expect::Status(400));
        assert!(matches!(model(&seeds()[14]), Expect::Ok { .. }));
        assert_eq!(model(&seeds()[15]), Expect::Incomplete);
        assert_eq!(model(&seeds()[16]), Expect::Status(413));
    }
}
