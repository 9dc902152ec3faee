//! The `vsnap blk` binary's lifecycle: SIGTERM under load ends it quickly after finishing the
//! requests it took, a daemon killed under load loses nothing once the VMM reconnects to its
//! successor, and a second daemon does not take over a live socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use vsnap_frontend::blk::{place, Bufs, Layout, Placed, T_IN, T_OUT};
use vsnap_frontend::{Frontend, Resume, Setup};

const QUEUES: usize = 4;

fn spawn_blk(sock: &Path, state: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_vsnap"))
        .args(["blk", "--socket-path"])
        .arg(sock)
        .arg("--state-dir")
        .arg(state)
        .args(["--size", "64M", "--num-queues", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_listening(sock: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "vsnap blk exited");
        assert!(Instant::now() < deadline, "vsnap blk did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

struct Dir {
    _tmp: tempfile::TempDir,
    sock: PathBuf,
    state: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().unwrap();
    Dir {
        sock: tmp.path().join("blk.sock"),
        state: tmp.path().join("state"),
        _tmp: tmp,
    }
}

#[test]
fn sigterm_under_load_exits_within_two_seconds_after_finishing_what_it_took() {
    let d = dir();
    let mut child = spawn_blk(&d.sock, &d.state);
    wait_listening(&d.sock, &mut child);
    let mut fe = Frontend::connect(
        &d.sock,
        &Setup {
            num_queues: QUEUES,
            mem_size: 96 << 20,
            ..Setup::default()
        },
    )
    .unwrap();
    let data = vec![0x5au8; 128 << 10];
    for q in 0..QUEUES {
        for i in 0..128u64 {
            let bufs = Bufs::new(&fe.mem, data.len() as u32);
            let sector = (q as u64 * 128 + i) * 256;
            let queue = &mut fe.queues[q];
            place(
                queue,
                &fe.mem,
                bufs,
                T_OUT,
                sector,
                &data,
                0,
                Layout::Simple,
                true,
            )
            .unwrap();
        }
        fe.queues[q].publish(&fe.mem);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = 0;
    while done == 0 {
        assert!(Instant::now() < deadline, "no request completed");
        done += fe.queues[0].poll_used(&fe.mem).len();
    }
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let took = t0.elapsed();
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("vsnap blk still running 10 s after SIGTERM")
    });
    eprintln!("vsnap blk exited {took:?} after SIGTERM under load ({status})");
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    // Everything the daemon completed is in the rings; a dead daemon adds nothing.
    let before: usize = (0..QUEUES)
        .map(|q| fe.queues[q].poll_used(&fe.mem).len())
        .sum();
    std::thread::sleep(Duration::from_millis(100));
    let after: usize = (0..QUEUES)
        .map(|q| fe.queues[q].poll_used(&fe.mem).len())
        .sum();
    assert_eq!(after, 0, "{before} then {after} completions");
    assert!(!d.sock.exists(), "the socket file is removed on exit");
}

fn block(i: u64) -> Vec<u8> {
    (0..4096u64).map(|k| (i * 31 + k) as u8 | 1).collect()
}

/// Writes of distinct blocks kept `DEPTH` deep on every queue, each checked to complete once.
struct Load {
    /// Per queue: head -> (request, block it writes).
    inflight: Vec<HashMap<u16, (Placed, u64)>>,
    next: Vec<u64>,
    completions: usize,
}

impl Load {
    const DEPTH: usize = 16;
    const PER_QUEUE: u64 = 200;
    const TOTAL: usize = QUEUES * Self::PER_QUEUE as usize;

    fn new() -> Self {
        Load {
            inflight: vec![HashMap::new(); QUEUES],
            next: vec![0; QUEUES],
            completions: 0,
        }
    }

    /// Tops every queue up and kicks it (or only publishes: a kick the daemon never read).
    fn submit(&mut self, fe: &mut Frontend, kick: bool) {
        for q in 0..QUEUES {
            while self.inflight[q].len() < Self::DEPTH && self.next[q] < Self::PER_QUEUE {
                let blk = q as u64 * Self::PER_QUEUE + self.next[q];
                self.next[q] += 1;
                let bufs = Bufs::new(&fe.mem, 4096);
                let p = place(
                    &mut fe.queues[q],
                    &fe.mem,
                    bufs,
                    T_OUT,
                    blk * 8,
                    &block(blk),
                    0,
                    Layout::Simple,
                    true,
                )
                .unwrap();
                self.inflight[q].insert(p.head, (p, blk));
            }
            if kick {
                fe.queues[q].publish(&fe.mem);
            } else {
                fe.queues[q].publish_silently(&fe.mem);
            }
        }
    }

    fn collect(&mut self, fe: &mut Frontend) {
        for q in 0..QUEUES {
            for (head, _) in fe.queues[q].poll_used(&fe.mem) {
                let (p, blk) = self.inflight[q]
                    .remove(&head)
                    .unwrap_or_else(|| panic!("queue {q}: head {head} completed twice"));
                assert_eq!(p.status(&fe.mem), 0, "write of block {blk}");
                self.completions += 1;
            }
        }
    }

    fn pending(&self) -> usize {
        self.inflight.iter().map(HashMap::len).sum()
    }
}

/// kill -9 with 16 writes in flight per queue, a new daemon on the same state, and a VMM that
/// reconnects as cloud-hypervisor does (each queue resumes from the guest's *available* index,
/// skipping whatever the dead daemon had not completed unless the inflight region says
/// otherwise) and as QEMU does (from the used index). Every write completes exactly once and
/// is on the disk.
#[test]
fn kill_9_under_load_loses_no_request_when_the_vmm_reconnects() {
    for resume in [Resume::AvailIndex, Resume::UsedIndex] {
        let d = dir();
        let mut child = spawn_blk(&d.sock, &d.state);
        wait_listening(&d.sock, &mut child);
        let setup = Setup {
            num_queues: QUEUES,
            queue_size: 64,
            mem_size: 64 << 20,
            inflight: true,
            ..Setup::default()
        };
        let mut fe = Frontend::connect(&d.sock, &setup).unwrap();
        assert!(fe.inflight.is_some());
        let mut load = Load::new();
        // Run until about half is done, then kill the daemon with the queues full: the last
        // writes are in the ring, but their kick is lost with the daemon.
        while load.completions < Load::TOTAL / 2 {
            load.submit(&mut fe, true);
            load.collect(&mut fe);
        }
        load.collect(&mut fe);
        load.submit(&mut fe, false);
        child.kill().unwrap();
        child.wait().unwrap();
        fe.disconnect();
        eprintln!(
            "{resume:?}: killed with {} writes outstanding",
            load.pending()
        );

        let mut child = spawn_blk(&d.sock, &d.state);
        wait_listening(&d.sock, &mut child);
        fe.reconnect(&d.sock, resume).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while load.completions < Load::TOTAL {
            assert!(
                Instant::now() < deadline,
                "{resume:?}: {} writes never completed after the reconnect",
                Load::TOTAL - load.completions
            );
            load.collect(&mut fe);
            load.submit(&mut fe, true);
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        load.collect(&mut fe);
        // Every block reads back as written.
        for blk in 0..Load::TOTAL as u64 {
            let bufs = Bufs::new(&fe.mem, 4096);
            let p = place(
                &mut fe.queues[0],
                &fe.mem,
                bufs,
                T_IN,
                blk * 8,
                &[],
                4096,
                Layout::Simple,
                true,
            )
            .unwrap();
            fe.queues[0].publish(&fe.mem);
            let got = fe.queues[0].wait_used(&fe.mem, 1, Duration::from_secs(10));
            assert_eq!(got.len(), 1, "read of block {blk}");
            assert_eq!(p.status(&fe.mem), 0);
            assert!(
                p.data(&fe.mem) == block(blk),
                "{resume:?}: block {blk} lost its write"
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn a_second_daemon_does_not_take_over_a_live_socket() {
    let d = dir();
    let mut first = spawn_blk(&d.sock, &d.state);
    wait_listening(&d.sock, &mut first);
    let mut second = spawn_blk(&d.sock, &d.sock.with_extension("other-state"));
    let status = wait_exit(&mut second, Duration::from_secs(20));
    let _ = second.kill();
    let status = status.expect("the second daemon keeps running");
    assert!(!status.success());
    assert!(first.try_wait().unwrap().is_none(), "the first daemon died");
    let fe = Frontend::connect(&d.sock, &Setup::default());
    let _ = first.kill();
    let _ = first.wait();
    assert!(fe.is_ok(), "the first daemon is unreachable");
}

/// virtio-fs keeps its FUSE session across a reconnect to the same daemon: the guest's node ids
/// and open handles still work without a new INIT; a new INIT starts a new session.
#[test]
fn the_fuse_session_survives_a_reconnect() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use vsnap_frontend::fs::Fuse;
    use vsnap_fs::device::{FsBackend, FsOptions};
    use vsnap_fs::passthrough::{FsConfig, Passthrough};
    use vsnap_fs::server::Server;
    use vsnap_vhost::{serve, Stopper};

    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("file"), b"0123456789").unwrap();
    let fs = Passthrough::new(&share, &share.join(".vsnap-workdir"), FsConfig::default()).unwrap();
    let backend =
        Arc::new(FsBackend::new(Arc::new(Server::new(fs)), FsOptions::default()).unwrap());
    let sock = tmp.path().join("fs.sock");
    let stopper = Stopper::new();
    let t = {
        let (b, s, st) = (backend.clone(), sock.clone(), stopper.clone());
        std::thread::spawn(move || serve(b, &s, &st))
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait("the socket exists", &|| sock.exists());

    let mut f = Fuse::connect(&sock).unwrap();
    f.init().unwrap();
    let node = f.lookup(1, "file").unwrap();
    let fh = f.open(node, libc::O_RDONLY as u32).unwrap();
    drop(f);
    wait("the frontend is gone", &|| {
        !backend.connected.load(Ordering::SeqCst)
    });

    // The VMM reconnects; the guest carries on without INIT.
    let mut f = Fuse::connect(&sock).unwrap();
    f.getattr(node).expect("node id lost across the reconnect");
    assert_eq!(f.read_bytes(node, fh, 2, 4).unwrap(), b"2345");
    // A guest that mounts anew starts over.
    f.init().unwrap();
    assert!(
        f.getattr(node).is_err(),
        "a new session keeps the old node ids"
    );
    drop(f);
    stopper.stop();
    t.join().unwrap().unwrap();
}
