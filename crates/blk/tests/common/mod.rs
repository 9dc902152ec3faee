//! The blk daemon under test: a disk in a temp dir served on a socket by a thread, stopped and
//! joined on drop.

#![allow(dead_code)] // each test file uses its own part

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vsnap_blk::{serve, BlkBackend, BlkOptions, Stopper};
use vsnap_block::{Disk, DiskOptions};
use vsnap_frontend::blk::{place, Bufs, Layout, Placed};
use vsnap_frontend::{Frontend, Setup};

pub const SIZE: u64 = 64 << 20;
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Dev {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub disk: Arc<Disk>,
    pub backend: Arc<BlkBackend>,
    pub stopper: Stopper,
    thread: Option<JoinHandle<Result<(), vsnap_blk::ServeError>>>,
}

impl Dev {
    /// A blank 64 MiB disk on `queues` queues.
    pub fn start(queues: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut o = DiskOptions::new(dir.path().join("state"));
        o.size = Some(SIZE);
        let disk = Arc::new(Disk::open(&o).unwrap());
        Self::serve_disk(
            dir,
            disk,
            BlkOptions {
                num_queues: queues,
                queue_size: 256,
                serial: "vsnap-lifecycle".into(),
                logical_block_size: 512,
                ..BlkOptions::default()
            },
        )
    }

    /// Serves `disk` (whose files live in `dir`) on `dir/blk.sock` from a thread.
    pub fn serve_disk(dir: tempfile::TempDir, disk: Arc<Disk>, opts: BlkOptions) -> Self {
        let backend = Arc::new(BlkBackend::new(disk.clone(), opts));
        let sock = dir.path().join("blk.sock");
        let stopper = Stopper::new();
        let thread = {
            let (b, s, st) = (backend.clone(), sock.clone(), stopper.clone());
            std::thread::spawn(move || serve(b, &s, &st))
        };
        wait_until("the socket exists", || sock.exists());
        Dev {
            dir,
            sock,
            disk,
            backend,
            stopper,
            thread: Some(thread),
        }
    }

    /// A frontend set up as `setup` says.
    pub fn frontend(&self, setup: &Setup) -> Frontend {
        Frontend::connect(&self.sock, setup).unwrap()
    }

    pub fn connect(&self, queues: usize) -> Frontend {
        self.connect_with(queues, 16 << 20)
    }

    pub fn connect_with(&self, queues: usize, mem_size: u64) -> Frontend {
        let fe = Frontend::connect(
            &self.sock,
            &Setup {
                num_queues: queues,
                mem_size,
                ..Setup::default()
            },
        )
        .unwrap();
        wait_until("the device sees the frontend", || self.connected());
        fe
    }

    pub fn connected(&self) -> bool {
        self.backend.connected.load(Ordering::SeqCst)
    }

    /// Stops the server and waits for `serve` to return.
    pub fn stop(&mut self) -> Result<(), vsnap_blk::ServeError> {
        self.stopper.stop();
        self.thread.take().map_or(Ok(()), |t| t.join().unwrap())
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Queues `n` writes of `len` bytes on queue `q` (not published), each as one indirect
/// descriptor.
pub fn place_writes(fe: &mut Frontend, q: usize, n: usize, len: u32, seed: u8) -> Vec<Placed> {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_add(seed) | 1).collect();
    let stride = u64::from(len / 512);
    (0..n)
        .map(|i| {
            let sector = (q * n + i) as u64 * stride;
            let bufs = Bufs::new(&fe.mem, len);
            place(
                &mut fe.queues[q],
                &fe.mem,
                bufs,
                vsnap_frontend::blk::T_OUT,
                sector,
                &data,
                0,
                Layout::Simple,
                // One ring slot per request, so a queue holds as many as its size.
                true,
            )
            .unwrap()
        })
        .collect()
}
