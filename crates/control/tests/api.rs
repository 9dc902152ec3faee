//! The control API over its real socket, against a real disk: every endpoint, every bad request.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vsnap_block::{Disk, DiskOptions, Job};
use vsnap_control::http::call;
use vsnap_control::{Api, DeviceStatus};

struct Fixture {
    dir: tempfile::TempDir,
    disk: Arc<Disk>,
    sock: PathBuf,
    stop: Box<dyn Fn()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        (self.stop)();
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.size = Some(16 << 20);
    let disk = Arc::new(Disk::open(&o).unwrap());
    let status = Arc::new(|| DeviceStatus {
        kind: "virtio-blk".into(),
        queues: 2,
        connected: true,
        ..DeviceStatus::default()
    });
    let sock = dir.path().join("api.sock");
    let stop = vsnap_control::spawn(&sock, Api::new(disk.clone(), status)).unwrap();
    Fixture {
        dir,
        disk,
        sock,
        stop: Box::new(stop),
    }
}

fn req(sock: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (st, b) = call(sock, method, path, body.as_ref()).unwrap();
    (
        st,
        serde_json::from_slice(&b).unwrap_or(Value::String(String::from_utf8_lossy(&b).into())),
    )
}

fn raw(sock: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn wait_export(sock: &Path, g: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = req(
            sock,
            "GET",
            &format!("/api/v1/generations/{g}/export"),
            None,
        );
        if v["state"] != "running" || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn endpoints() {
    let f = fixture();
    let mode = std::fs::metadata(&f.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (st, v) = req(&f.sock, "GET", "/api/v1/info", None);
    assert_eq!(st, 200);
    assert_eq!(
        (
            v["capacity"].as_u64(),
            v["generation"].as_u64(),
            v["connected"].as_bool()
        ),
        (Some(16 << 20), Some(1), Some(true))
    );
    f.disk.write(0, &vec![7u8; 8192]).unwrap();
    f.disk.write_zeroes(8192, 4096).unwrap();
    let (st, v) = req(&f.sock, "GET", "/api/v1/stats", None);
    assert_eq!(st, 200);
    assert_eq!(
        (v["dirty_blocks"].as_u64(), v["zero_blocks"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(v["requests"]["writes"], 1);
    assert_eq!(v["generations"], 1);
    assert_eq!(
        v["open_layer_files"], 0,
        "the active layer's own fd is not cached"
    );
    let (st, m) = req(&f.sock, "GET", "/metrics", None);
    assert_eq!(st, 200);
    let m = m.as_str().unwrap().to_string();
    assert!(m.contains("vsnap_requests_total{type=\"write\"} 1"), "{m}");
    assert!(m.contains("vsnap_blocks{state=\"dirty\"} 2"));

    let (st, v) = req(
        &f.sock,
        "POST",
        "/api/v1/cut",
        Some(json!({"durable": true})),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["generation"].as_u64(), v["active_generation"].as_u64()),
        (Some(1), Some(2))
    );
    assert!(v["pause_us"].as_u64().is_some());
    let frozen = {
        let mut b = vec![0u8; 16 << 20];
        f.disk.read(0, &mut b).unwrap();
        b
    };
    f.disk.write(0, &vec![9u8; 4096]).unwrap();
    let out = f.dir.path().join("g1.diff");
    let (st, v) = req(
        &f.sock,
        "POST",
        "/api/v1/generations/1/export",
        Some(json!({"path": out})),
    );
    assert_eq!(st, 202, "{v}");
    let v = wait_export(&f.sock, 1);
    assert_eq!(v["state"], "done", "{v}");
    // What the diff costs, in the status and in the metrics, as `diff inspect` reports it.
    let stats = vsnap_block::diff::DiffFile::open(&out)
        .unwrap()
        .data_stats();
    assert_eq!(v["figures"]["raw_bytes"], stats.raw_bytes, "{v}");
    assert_eq!(v["figures"]["stored_bytes"], stats.stored_bytes, "{v}");
    assert!(
        stats.raw_bytes > 0 && stats.stored_bytes < stats.raw_bytes,
        "{v}"
    );
    let (_, m) = req(&f.sock, "GET", "/metrics", None);
    let m = m.as_str().unwrap().to_string();
    let line = format!(
        "vsnap_export_stored_bytes{{generation=\"1\"}} {}",
        stats.stored_bytes
    );
    assert!(m.contains(&line), "{m}");
    let img = f.dir.path().join("g1.img");
    vsnap_block::diff::apply(None, std::slice::from_ref(&out), &img, false, &Job::new()).unwrap();
    assert!(
        std::fs::read(&img).unwrap() == frozen,
        "export differs from the frozen generation"
    );
    let (st, v) = req(&f.sock, "GET", "/api/v1/generations", None);
    assert_eq!(st, 200);
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[1]["export"], "done");
    // qcow2 export.
    let base = f.dir.path().join("blank.img");
    vsnap_block::image::create(
        &base,
        16 << 20,
        vsnap_block::image::Prealloc::Off,
        false,
        &Job::new(),
    )
    .unwrap();
    let q = f.dir.path().join("g1.qcow2");
    let (st, _) = req(
        &f.sock,
        "POST",
        "/api/v1/generations/1/export",
        Some(json!({"path": q, "format": "qcow2", "backing": base})),
    );
    assert_eq!(st, 202);
    assert_eq!(wait_export(&f.sock, 1)["state"], "done");
    assert!(q.exists());
    // Fold: generation 1 lies on the base.
    let (st, v) = req(&f.sock, "POST", "/api/v1/generations/1/fold", None);
    assert_eq!(st, 409, "{v}");
}

#[test]
fn bad_requests() {
    let f = fixture();
    f.disk.cut(false).unwrap();
    let existing = f.dir.path().join("exists");
    std::fs::write(&existing, b"x").unwrap();
    let cases: Vec<(&str, &str, Option<Value>, u16, &str)> = vec![
        ("GET", "/api/v1/nothing", None, 404, "no such endpoint"),
        ("DELETE", "/api/v1/info", None, 405, "not allowed"),
        (
            "POST",
            "/api/v1/cut",
            Some(json!({"durable": "yes"})),
            400,
            "invalid JSON",
        ),
        (
            "POST",
            "/api/v1/cut",
            Some(json!({"bogus": 1})),
            400,
            "unknown field",
        ),
        ("GET", "/api/v1/generations/9", None, 404, "does not exist"),
        ("GET", "/api/v1/generations/x", None, 400, "not a number"),
        (
            "POST",
            "/api/v1/generations/9/export",
            Some(json!({"path": "/tmp/a"})),
            404,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/generations/2/export",
            Some(json!({"path": f.dir.path().join("a")})),
            409,
            "active layer",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            None,
            400,
            "needs a JSON body",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": "rel.diff"})),
            400,
            "absolute",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": "/nonexistent-dir/x"})),
            400,
            "does not exist",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": "s3://bucket/x.diff"})),
            400,
            "local paths only",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": "/tmp/x.diff", "compression": "brotli"})),
            400,
            "invalid JSON body",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": existing})),
            409,
            "already exists",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": f.dir.path().join("q"), "format": "qcow2"})),
            400,
            "backing",
        ),
        (
            "POST",
            "/api/v1/generations/1/export",
            Some(json!({"path": f.dir.path().join("q"), "format": "zip"})),
            400,
            "invalid JSON",
        ),
        (
            "DELETE",
            "/api/v1/generations/1/export",
            None,
            409,
            "no export running",
        ),
        (
            "POST",
            "/api/v1/generations/2/fold",
            None,
            409,
            "active layer",
        ),
    ];
    for (m, p, body, want, msg) in cases {
        let (st, v) = req(&f.sock, m, p, body);
        assert_eq!(st, want, "{m} {p}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(msg), "{m} {p}: error {e:?} lacks {msg:?}");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"x");
    // Malformed and oversized HTTP.
    assert!(raw(&f.sock, b"NOT HTTP AT ALL\r\n\r\n").starts_with("HTTP/1.1 400"));
    let big = format!(
        "POST /api/v1/cut HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    );
    assert!(raw(&f.sock, big.as_bytes()).starts_with("HTTP/1.1 413"));
    let chunked = b"POST /api/v1/cut HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert!(raw(&f.sock, chunked).starts_with("HTTP/1.1 411"));
    let mut huge_head = b"GET /api/v1/info HTTP/1.1\r\nX: ".to_vec();
    huge_head.extend(std::iter::repeat_n(b'a', 20 << 10));
    assert!(raw(&f.sock, &huge_head).starts_with("HTTP/1.1 431"));
    // The API still answers.
    assert_eq!(req(&f.sock, "GET", "/api/v1/info", None).0, 200);
}

#[test]
fn silent_client_times_out_without_blocking_others() {
    let f = fixture();
    let t0 = Instant::now();
    let mut silent = UnixStream::connect(&f.sock).unwrap();
    // Meanwhile the API and the disk keep working.
    assert_eq!(req(&f.sock, "GET", "/api/v1/info", None).0, 200);
    f.disk.write(0, &[1u8; 512]).unwrap();
    let mut out = String::new();
    silent.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(30),
        "{waited:?}"
    );
}

#[test]
fn a_cut_while_another_runs_is_refused() {
    let f = fixture();
    // An in-flight request holds the first cut in its drain.
    let io = f.disk.io();
    let first = {
        let sock = f.sock.clone();
        std::thread::spawn(move || req(&sock, "POST", "/api/v1/cut", None))
    };
    std::thread::sleep(Duration::from_millis(300));
    let (st, v) = req(&f.sock, "POST", "/api/v1/cut", None);
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("another cut"));
    io.write(0, &[5u8; 512]).unwrap();
    drop(io);
    let (st, v) = first.join().unwrap();
    assert_eq!(st, 200);
    assert_eq!(v["drained"], 1, "the in-flight request was drained: {v}");
    // ...and its write landed in the frozen generation.
    assert_eq!(f.disk.info().layers[1].dirty_blocks, 1);
}

#[test]
fn trickling_clients_cannot_starve_info_or_cut() {
    let f = fixture();
    // 40 clients (more than MAX_CONNECTIONS) each send one byte of a request every 2 s.
    let head = b"GET /api/v1/info HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let t0 = Instant::now();
    let slow: Vec<_> = (0..40)
        .map(|_| {
            let sock = f.sock.clone();
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&sock).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut out = Vec::new();
                for &b in head.iter() {
                    if s.write_all(&[b]).is_err() {
                        break;
                    }
                    let mut buf = [0u8; 512];
                    let mut got_answer = false;
                    let until = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < until {
                        match s.read(&mut buf) {
                            Ok(0) => {
                                got_answer = true;
                                break;
                            }
                            Ok(n) => out.extend_from_slice(&buf[..n]),
                            Err(_) => {}
                        }
                    }
                    if got_answer {
                        break;
                    }
                }
                (String::from_utf8_lossy(&out).into_owned(), t0.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(7) {
        let t = Instant::now();
        let (st, v) = req(&f.sock, "GET", "/api/v1/info", None);
        assert_eq!(st, 200, "{v}");
        let (st, v) = req(&f.sock, "POST", "/api/v1/cut", None);
        assert_eq!(st, 200, "{v}");
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(worst < Duration::from_secs(1), "info + cut took {worst:?}");
    // Each trickler is cut off at its request deadline, though it never went quiet for 5 s.
    for h in slow {
        let (out, when) = h.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
        assert!(
            when >= Duration::from_secs(4) && when < Duration::from_secs(8),
            "{when:?}"
        );
    }
}
