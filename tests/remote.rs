//! Diffs in object storage, against a real S3-compatible server (moto, tests/s3/deps.sh): a
//! daemon exports a generation to `s3://`, another daemon starts from that `s3://` chain and
//! serves the same bytes, `vsnap diff list/inspect/apply` read it there, and a daemon killed
//! while uploading leaves no object behind.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vsnap_frontend::blk::{place, Bufs, Layout, T_IN, T_OUT};
use vsnap_frontend::{Frontend, Setup};
use vsnap_remote::test_server::S3;
use vsnap_remote::Location;

const BIN: &str = env!("CARGO_BIN_EXE_vsnap");
const CHUNK: usize = 128 << 10;

struct Daemon {
    child: Child,
    sock: PathBuf,
    api: PathBuf,
}

impl Daemon {
    fn start(s3: &S3, dir: &Path, name: &str, extra: &[&str]) -> Daemon {
        let sock = dir.join(format!("{name}.sock"));
        let api = dir.join(format!("{name}.api"));
        let mut child = Command::new(BIN)
            .args(["blk", "--socket-path"])
            .arg(&sock)
            .arg("--api-socket")
            .arg(&api)
            .arg("--state-dir")
            .arg(dir.join(format!("{name}.state")))
            .args(["--size", "96M", "--num-queues", "1"])
            .args(extra)
            .envs(s3.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&sock).is_err() || !api.exists() {
            assert!(child.try_wait().unwrap().is_none(), "vsnap blk exited");
            assert!(Instant::now() < deadline, "vsnap blk did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon { child, sock, api }
    }

    fn ctl(&self, s3: &S3, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.api)
            .args(args)
            .envs(s3.env())
            .output()
            .unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn frontend(d: &Daemon) -> Frontend {
    Frontend::connect(
        &d.sock,
        &Setup {
            mem_size: 128 << 20,
            ..Setup::default()
        },
    )
    .unwrap()
}

/// One request of `CHUNK` bytes at chunk `i`, waited for; what the guest got back.
fn request(fe: &mut Frontend, typ: u32, i: usize, out: &[u8]) -> Vec<u8> {
    let bufs = Bufs::new(&fe.mem, CHUNK as u32);
    let sector = (i * CHUNK / 512) as u64;
    let in_len = if out.is_empty() { CHUNK as u32 } else { 0 };
    let p = place(
        &mut fe.queues[0],
        &fe.mem,
        bufs,
        typ,
        sector,
        out,
        in_len,
        Layout::Simple,
        true,
    )
    .unwrap();
    fe.queues[0].publish(&fe.mem);
    let done = fe.queues[0].wait_used(&fe.mem, 1, Duration::from_secs(10));
    assert_eq!(done.len(), 1);
    assert_eq!(p.status(&fe.mem), 0);
    p.data(&fe.mem)
}

/// Writes `data` from offset 0 in 128 KiB requests.
fn write(fe: &mut Frontend, data: &[u8]) {
    for (i, c) in data.chunks(CHUNK).enumerate() {
        request(fe, T_OUT, i, c);
    }
}

fn read(fe: &mut Frontend, len: usize) -> Vec<u8> {
    (0..len / CHUNK)
        .flat_map(|i| request(fe, T_IN, i, &[]))
        .collect()
}

/// Mixed content: compressible text and incompressible noise.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if (i / 65536) % 2 == 0 {
                b"the quick brown fox jumps over the lazy dog "[i % 44]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "{}{err}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn object(s3: &S3, url: &str) -> vsnap_remote::Object {
    match Location::parse_with(url, s3.env()).unwrap() {
        Location::Object(o) => o,
        Location::Local(_) => unreachable!(),
    }
}

#[test]
fn a_generation_exported_to_s3_starts_another_daemon() {
    let s3 = S3::start();
    s3.create_bucket("diffs");
    let dir = tempfile::tempdir().unwrap();
    let data = content(8 << 20, 7);
    let url = "s3://diffs/vm1/gen-1.diff";
    {
        let d = Daemon::start(&s3, dir.path(), "a", &[]);
        let mut fe = frontend(&d);
        write(&mut fe, &data);
        ok(&d.ctl(&s3, &["cut"]));
        ok(&d.ctl(&s3, &["export", "1", "--path", url, "--wait"]));
        let status = ok(&d.ctl(&s3, &["export-status", "1"]));
        assert!(status.contains(url) && status.contains("done"), "{status}");
    }
    let o = object(&s3, url);
    let size = o.head().unwrap().size;
    assert!(
        size > 0 && size < data.len() as u64,
        "stored {size} bytes, compressed"
    );
    let listed = object(&s3, "s3://diffs/vm1").list().unwrap();
    assert_eq!(
        listed.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["gen-1.diff"]
    );

    // The offline tools read it from there too.
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .envs(s3.env())
            .env("VSNAP_CACHE_DIR", dir.path().join("cache"))
            .output()
            .unwrap()
    };
    let listing = ok(&cli(&["diff", "list", "s3://diffs/vm1"]));
    assert!(listing.contains("gen-1.diff"), "{listing}");
    let info = ok(&cli(&["diff", "inspect", "--json", url]));
    assert!(info.contains("\"stored_bytes\""), "{info}");
    let img = dir.path().join("applied.img");
    ok(&cli(&[
        "diff",
        "apply",
        "--out",
        img.to_str().unwrap(),
        url,
    ]));
    let applied = std::fs::read(&img).unwrap();
    assert!(
        applied[..data.len()] == data[..],
        "apply from s3 wrote other bytes"
    );

    let d = Daemon::start(&s3, dir.path(), "b", &["--chain", url]);
    let mut fe = frontend(&d);
    assert!(
        read(&mut fe, data.len()) == data,
        "the chain from s3 serves other bytes"
    );
    assert!(
        std::fs::read_dir(dir.path().join("b.state/remote-cache"))
            .unwrap()
            .count()
            == 1,
        "the diff is cached in the state dir"
    );
}

#[test]
fn a_daemon_killed_while_uploading_leaves_no_object() {
    let s3 = S3::start();
    s3.create_bucket("diffs");
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://diffs/vm2/gen-1.diff";
    let d = Daemon::start(&s3, dir.path(), "c", &[]);
    let mut fe = frontend(&d);
    // Noise only: the upload is as large as the data (several 8 MiB parts).
    let data: Vec<u8> = content(64 << 20, 3)
        .chunks(65536)
        .enumerate()
        .flat_map(|(i, c)| {
            if i % 2 == 0 {
                content(c.len(), i as u64 + 11)
            } else {
                c.to_vec()
            }
        })
        .collect();
    write(&mut fe, &data);
    ok(&d.ctl(&s3, &["cut"]));
    ok(&d.ctl(
        &s3,
        &["export", "1", "--path", url, "--compression", "none"],
    ));
    // The local file is complete (renamed into the upload directory): the upload is under way.
    let uploads = dir.path().join("c.state/uploads");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let staged = std::fs::read_dir(&uploads)
            .map(|rd| {
                rd.flatten()
                    .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
            })
            .unwrap_or(false);
        if staged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the export never reached its upload"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(fe);
    drop(d);
    assert!(
        object(&s3, url).head().is_err(),
        "an interrupted upload left an object"
    );
    assert!(object(&s3, "s3://diffs/vm2").list().unwrap().is_empty());
}
