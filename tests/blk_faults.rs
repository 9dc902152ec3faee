//! The real `vsnap blk` daemon handled carelessly: a second daemon on its state directory, a
//! chain missing its first diff, control clients that trickle.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vsnap_block::{Disk, DiskOptions};

fn vsnap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vsnap"))
        .args(args)
        .output()
        .expect("run vsnap")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A running `vsnap blk`, killed when dropped.
struct Daemon {
    child: Child,
    api: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, name: &str, extra: &[&str]) -> Self {
        let sock = dir.join(format!("{name}.sock"));
        let api = dir.join(format!("{name}.api"));
        let mut args = vec![
            "blk",
            "--socket-path",
            s(&sock),
            "--api-socket",
            s(&api),
            "--num-queues",
            "1",
        ];
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_vsnap"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Self { child, api };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&d.api).is_err() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("vsnap blk exited early: {st}");
            }
            assert!(Instant::now() < deadline, "vsnap blk did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base_image(dir: &Path, size: usize) -> PathBuf {
    let base = dir.join("base.img");
    std::fs::write(
        &base,
        (0..size).map(|i| (i % 253) as u8 | 1).collect::<Vec<_>>(),
    )
    .unwrap();
    base
}

#[test]
fn a_second_daemon_or_writer_on_a_state_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), 4 << 20);
    let state = dir.path().join("state");
    let common = ["--base", s(&base), "--state-dir", s(&state)];
    let first = Daemon::start(dir.path(), "a", &common);
    let t = Instant::now();
    let mut second = vec!["blk", "--socket-path"];
    let b_sock = dir.path().join("b.sock");
    second.push(s(&b_sock));
    second.extend_from_slice(&common);
    let out = vsnap(&second);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!b_sock.exists(), "the refused daemon never listened");
    let out = vsnap(&[
        "materialize",
        "--state-dir",
        s(&state),
        "--out",
        s(&dir.path().join("m.img")),
    ]);
    assert!(!out.status.success(), "materialize beside a running daemon");
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    // The first daemon is unharmed.
    let out = vsnap(&["ctl", "--api-socket", s(&first.api), "info"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn blk_refuses_a_chain_missing_its_first_diff() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), 4 << 20);
    let mut o = DiskOptions::new(dir.path().join("state"));
    o.base = Some(base.clone());
    let d = Disk::open(&o).unwrap();
    d.write(0, &[1u8; 4096]).unwrap();
    d.cut(false).unwrap();
    d.write(4096, &[2u8; 4096]).unwrap();
    d.cut(false).unwrap();
    let (g1, g2) = (dir.path().join("g1.diff"), dir.path().join("g2.diff"));
    d.export(1, &g1, None).unwrap();
    d.export(2, &g2, None).unwrap();
    let sock = dir.path().join("c.sock");
    let state2 = dir.path().join("state2");
    let args = |chain: &[&Path]| {
        let mut a = vec![
            "blk".to_string(),
            "--socket-path".into(),
            s(&sock).into(),
            "--base".into(),
            s(&base).into(),
            "--state-dir".into(),
            s(&state2).into(),
        ];
        for c in chain {
            a.push("--chain".into());
            a.push(s(c).into());
        }
        a
    };
    let a = args(&[&g2]);
    let out = vsnap(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not on the base image"),
        "{}",
        stderr(&out)
    );
    assert!(!state2.join("vsnap-state.json").exists(), "no disk made");
    let out = vsnap(&[
        "diff",
        "apply",
        "--base",
        s(&base),
        "--out",
        s(&dir.path().join("o.img")),
        s(&g2),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not on the base image"));
    assert!(!dir.path().join("o.img").exists());
    // The whole chain starts.
    let a = args(&[&g1, &g2]);
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    let api = dir.path().join("c.api");
    a.extend(["--api-socket", s(&api)]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vsnap"))
        .args(&a)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&api).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "full chain refused");
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn ctl_info_answers_within_a_second_while_40_clients_trickle() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), "t", &["--size", "16M"]);
    let t0 = Instant::now();
    let tricklers: Vec<_> = (0..40)
        .map(|_| {
            let api = d.api.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(&api).unwrap();
                for &b in b"GET /api/v1/info HTTP/1.1\r\n\r\n" {
                    if c.write_all(&[b]).is_err() || t0.elapsed() > Duration::from_secs(7) {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
                let mut out = String::new();
                let _ = c.read_to_string(&mut out);
                out
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    while t0.elapsed() < Duration::from_secs(6) {
        let t = Instant::now();
        let out = vsnap(&["ctl", "--api-socket", s(&d.api), "info"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "ctl info took {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for t in tricklers {
        let out = t.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    }
}

mod kill_9 {
    //! kill -9 of the real daemon while a vhost-user frontend keeps 32 writes in flight (and
    //! flushes now and then): after a restart every write the device completed reads back.

    use super::*;
    use std::collections::HashMap;
    use vsnap_frontend::blk::{place, Bufs, Layout, Placed, T_FLUSH, T_IN, T_OUT};
    use vsnap_frontend::{Frontend, Setup};

    const SIZE: u64 = 16 << 20;
    const BS: u64 = 4096;
    const QD: usize = 32;

    fn stamp(seq: u64, block: u64) -> Vec<u8> {
        (0..BS / 512)
            .flat_map(|s| {
                let mut v = vec![(seq as u8) | 1; 512];
                v[..8].copy_from_slice(&seq.to_le_bytes());
                v[8..16].copy_from_slice(&(block * 8 + s).to_le_bytes());
                v
            })
            .collect()
    }

    fn connect(api_dir: &Path, state: &Path) -> (Daemon, Frontend) {
        let d = Daemon::start(api_dir, "k", &["--size", "16M", "--state-dir", s(state)]);
        let fe = Frontend::connect(
            &api_dir.join("k.sock"),
            &Setup {
                mem_size: 16 << 20,
                ..Setup::default()
            },
        )
        .unwrap();
        (d, fe)
    }

    fn wait_one(fe: &mut Frontend, deadline: Instant) -> Vec<(u16, u32)> {
        loop {
            let done = fe.queues[0].poll_used(&fe.mem);
            if !done.is_empty() {
                return done;
            }
            assert!(Instant::now() < deadline, "the device completes nothing");
            std::thread::yield_now();
        }
    }

    #[test]
    fn kill_9_of_the_daemon_loses_no_completed_write() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let blocks = SIZE / BS;
        // Per block: the last completed write, and the one in flight (at most one at a time).
        let mut done: HashMap<u64, u64> = HashMap::new();
        let mut seq = 1u64;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut completed = 0usize;
        for round in 0..4 {
            let (mut d, mut fe) = connect(dir.path(), &state);
            let bufs: Vec<Bufs> = (0..QD).map(|_| Bufs::new(&fe.mem, BS as u32)).collect();
            let mut free: Vec<Bufs> = bufs.clone();
            // head -> (placed, block, seq); seq 0 = a flush
            let mut inflight: HashMap<u16, (Placed, u64, u64)> = HashMap::new();
            let t0 = Instant::now();
            let run_for = Duration::from_millis(200 + rand() % 300);
            while t0.elapsed() < run_for {
                while let Some(b) = free.pop() {
                    let busy = |blk: u64| inflight.values().any(|v| v.1 == blk && v.2 != 0);
                    let placed = if rand() % 16 == 0 {
                        let p = place(
                            &mut fe.queues[0],
                            &fe.mem,
                            b,
                            T_FLUSH,
                            0,
                            &[],
                            0,
                            Layout::Simple,
                            true,
                        );
                        p.map(|p| (p, u64::MAX, 0))
                    } else {
                        let mut blk = rand() % blocks;
                        while busy(blk) {
                            blk = rand() % blocks;
                        }
                        let p = place(
                            &mut fe.queues[0],
                            &fe.mem,
                            b,
                            T_OUT,
                            blk * (BS / 512),
                            &stamp(seq, blk),
                            0,
                            Layout::Simple,
                            true,
                        );
                        seq += 1;
                        p.map(|p| (p, blk, seq - 1))
                    };
                    let p = placed.expect("ring has room for QD requests");
                    inflight.insert(p.0.head, p);
                }
                fe.queues[0].publish(&fe.mem);
                for (head, _) in wait_one(&mut fe, Instant::now() + Duration::from_secs(10)) {
                    let (p, blk, q) = inflight.remove(&head).expect("a request we placed");
                    assert_eq!(p.status(&fe.mem), 0, "request failed");
                    if q != 0 {
                        done.insert(blk, q);
                        completed += 1;
                    }
                    free.push(p.bufs);
                }
            }
            d.child.kill().unwrap(); // SIGKILL, with QD requests in flight
            d.child.wait().unwrap();
            // Completions the device published before it died count too.
            for (head, _) in fe.queues[0].poll_used(&fe.mem) {
                let (p, blk, q) = inflight.remove(&head).unwrap();
                if q != 0 && p.status(&fe.mem) == 0 {
                    done.insert(blk, q);
                    completed += 1;
                }
            }
            let maybe: HashMap<u64, u64> = inflight
                .values()
                .filter(|v| v.2 != 0)
                .map(|v| (v.1, v.2))
                .collect();
            drop(fe);
            drop(d);

            // Restart on the same state directory and read everything back through the device.
            let (_d, mut fe) = connect(dir.path(), &state);
            let chunk = 1u32 << 20;
            let rb = Bufs::new(&fe.mem, chunk);
            let mut disk = Vec::new();
            for c in 0..SIZE / u64::from(chunk) {
                let p = place(
                    &mut fe.queues[0],
                    &fe.mem,
                    rb,
                    T_IN,
                    c * u64::from(chunk) / 512,
                    &[],
                    chunk,
                    Layout::Simple,
                    true,
                )
                .unwrap();
                fe.queues[0].publish(&fe.mem);
                wait_one(&mut fe, Instant::now() + Duration::from_secs(10));
                assert_eq!(p.status(&fe.mem), 0);
                disk.extend(p.data(&fe.mem));
            }
            for blk in 0..blocks {
                let got = &disk[(blk * BS) as usize..((blk + 1) * BS) as usize];
                let want = done.get(&blk).map(|&q| stamp(q, blk));
                let alt = maybe.get(&blk).map(|&q| stamp(q, blk));
                let ok = match &want {
                    Some(w) => got == w.as_slice(),
                    None => got.iter().all(|&b| b == 0),
                } || alt.as_deref() == Some(got);
                assert!(
                    ok,
                    "round {round}: block {blk} lost its last completed write {:?}",
                    done.get(&blk)
                );
                if alt.as_deref() == Some(got) {
                    done.insert(blk, maybe[&blk]);
                }
            }
        }
        assert!(completed > 500, "only {completed} writes completed");
        eprintln!("{completed} completed writes survived 4 kills of the daemon");
    }
}
