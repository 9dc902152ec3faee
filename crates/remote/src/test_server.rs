//! An S3-compatible server for tests: moto in server mode (installed by tests/s3/deps.sh into
//! target/moto-venv), on a free local port, stopped on drop. [`S3::env`] is what a process
//! needs to reach it through [`crate::Location`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct S3 {
    child: Child,
    pub endpoint: String,
}

/// Where tests/s3/deps.sh puts moto (`VSNAP_MOTO_SERVER` overrides).
fn server_binary() -> PathBuf {
    std::env::var_os("VSNAP_MOTO_SERVER").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/moto-venv/bin/moto_server"),
        PathBuf::from,
    )
}

impl S3 {
    /// Starts the server; panics with what to run when moto is not installed.
    pub fn start() -> S3 {
        let bin = server_binary();
        assert!(
            bin.exists(),
            "{} missing: run tests/s3/deps.sh (make deps does)",
            bin.display()
        );
        // The port is free when picked but may be taken before moto binds it (another test
        // starting its own server): a moto that exits at once is started again on another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server starts");
            let mut s3 = S3 {
                child,
                endpoint: format!("http://127.0.0.1:{port}"),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if s3.child.try_wait().ok().flatten().is_some() {
                    break; // exited: the port was taken
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Listening, and the listener is ours (still running after the connect).
                    std::thread::sleep(Duration::from_millis(20));
                    if s3.child.try_wait().ok().flatten().is_none() {
                        return s3;
                    }
                    break;
                }
                assert!(Instant::now() < deadline, "moto_server did not listen");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("moto_server exited at start five times");
    }

    /// Creates `bucket` (a plain S3 `PUT /bucket`; moto does not check signatures). A server
    /// that just started listening may still reset the first connections: retried for 10 s.
    pub fn create_bucket(&self, bucket: &str) {
        let addr = self.endpoint.trim_start_matches("http://");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::put(addr, bucket) {
                Ok(reply) => {
                    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
                    return;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "create bucket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn put(addr: &str, bucket: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    }

    /// The environment that points the AWS store at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "vsnap-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "vsnap-test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
