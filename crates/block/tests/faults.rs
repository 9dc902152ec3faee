//! Faults of the medium under the block layer: a state directory whose file system fills up.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use vsnap_block::{BlockError, Disk};

/// A tmpfs of `size` bytes mounted for the test's life (needs root, as the test suite has here).
struct SmallFs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl SmallFs {
    fn mount(size: u64) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Some(Self { _dir: dir, mnt })
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Opens a disk whose previous user (this process, or a killed child) just let go of it.
///
/// Other tests of this binary spawn children meanwhile; between its fork and exec a child holds
/// a copy of every fd of this process, the state dir's lock included, for a moment after this
/// process closed its own. A daemon spawns nothing, so only tests meet this; they wait it out.
fn open(o: &DiskOptions) -> Disk {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Disk::open(o) {
            Err(BlockError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r.unwrap(),
        }
    }
}

fn is_enospc(e: &BlockError) -> bool {
    matches!(e, BlockError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
}

#[test]
fn a_full_state_file_system_fails_writes_not_reads_nor_flushes_of_rewrites() {
    let Some(fs) = SmallFs::mount(1 << 20) else {
        return;
    };
    let size = 4usize << 20;
    let f = Fixture::new(size);
    let mut o = f.opts();
    o.state_dir = fs.path().join("state");
    let d = open(&o);
    let mut want = f.base_bytes.clone();
    let bs = BS as usize;
    let block = |i: usize, seed: u8| pattern(bs, seed.wrapping_add(i as u8));

    // Fill the file system one block at a time, until a write fails.
    let mut written = 0;
    let full_at = loop {
        assert!(
            written < size / bs,
            "the disk never filled the 1 MiB file system"
        );
        match d.write((written * bs) as u64, &block(written, 1)) {
            Ok(()) => {
                want[written * bs..(written + 1) * bs].copy_from_slice(&block(written, 1));
                written += 1;
            }
            Err(e) => {
                assert!(is_enospc(&e), "{e}");
                break written;
            }
        }
    };
    assert!(full_at > 64, "only {full_at} blocks fitted");
    // Old data still reads, the failed block included (it is what the base said).
    assert_bytes(&read_all(&d), &want);
    // The blocks written before the file system filled can be made durable: the bitmap goes
    // into space reserved ahead.
    d.flush().unwrap();

    // Rewrites of allocated blocks need no space, and neither does their flush.
    for round in 0..3u8 {
        for i in (0..full_at).step_by(7) {
            d.write((i * bs) as u64, &block(i, 50 + round)).unwrap();
            want[i * bs..(i + 1) * bs].copy_from_slice(&block(i, 50 + round));
        }
        d.flush().unwrap();
    }
    // New blocks still fail, and change nothing.
    let e = d
        .write((full_at * bs) as u64, &block(full_at, 9))
        .unwrap_err();
    assert!(is_enospc(&e), "{e}");
    assert_bytes(&read_all(&d), &want);

    // A discard gives space back: writes and flushes work again.
    d.discard(0, 32 * BS as u64).unwrap();
    want[..32 * bs].fill(0);
    for i in full_at..full_at + 8 {
        d.write((i * bs) as u64, &block(i, 3)).unwrap();
        want[i * bs..(i + 1) * bs].copy_from_slice(&block(i, 3));
    }
    d.flush().unwrap();
    assert_bytes(&read_all(&d), &want);
    d.close().unwrap();
    drop(d);
    assert_bytes(&read_all(&open(&o)), &want);
}

// ---------------------------------------------------------------------------------------------
// Kills at random points, and limits, in a child process: the test binary runs itself again as
// `child_process_entry` with a role, and is killed with SIGKILL from here.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use vsnap_block::diff::{self, DiffFile};
use vsnap_block::{DiskOptions, Job};

const ROLE: &str = "VSNAP_FAULT_ROLE";
const DIR: &str = "VSNAP_FAULT_DIR";

/// A scratch directory on tmpfs when there is one (fsync is free there, so thousands of cuts
/// take seconds), else in the default temp dir.
fn scratch() -> tempfile::TempDir {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => d,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

fn spawn_child(role: &str, dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE, role)
        .env(DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Waits for the child to print `line` (it says "ready" once the disk is open).
fn wait_line(c: &mut Child, line: &str) -> BufReader<std::process::ChildStdout> {
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut l = String::new();
    loop {
        l.clear();
        assert!(
            out.read_line(&mut l).unwrap() > 0,
            "child ended before {line:?}"
        );
        // libtest's "test child_process_entry ... " may precede it on the line.
        if l.trim_end().ends_with(line) {
            return out;
        }
    }
}

fn child_opts(dir: &Path) -> DiskOptions {
    let mut o = DiskOptions::new(dir.join("state"));
    o.base = Some(dir.join("base.img"));
    o.block_size = BS;
    o
}

/// A deterministic generator (xorshift64*), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
#[ignore = "runs only as the child process of the fault tests"]
fn child_process_entry() {
    let role = std::env::var(ROLE).expect("started by a fault test");
    let dir = PathBuf::from(std::env::var(DIR).unwrap());
    match role.as_str() {
        "cuts" => child_cuts(&dir),
        "fold" => child_fold(&dir),
        "export" => child_export(&dir),
        "writes" => child_writes(&dir),
        other => panic!("unknown role {other}"),
    }
}

const CUTS: u64 = 10_000;
const CUT_BLOCKS: u64 = 1024;

fn child_cuts(dir: &Path) {
    // As `ulimit -n 1024` would.
    let lim = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: setrlimit reads the struct it is given; no other effect on this process's memory.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut o = DiskOptions::new(dir.join("state"));
    o.size = Some(CUT_BLOCKS * u64::from(BS));
    o.block_size = BS;
    let d = open(&o);
    let stamp = |i: u64| {
        let mut b = vec![0u8; BS as usize];
        b[..8].copy_from_slice(&(i + 1).to_le_bytes());
        b
    };
    let mut want = vec![0u8; (CUT_BLOCKS * u64::from(BS)) as usize];
    for i in 0..CUTS {
        let blk = (i * 7) % CUT_BLOCKS;
        d.write(blk * u64::from(BS), &stamp(i)).unwrap();
        let off = (blk * u64::from(BS)) as usize;
        want[off..off + BS as usize].copy_from_slice(&stamp(i));
        d.cut(false).unwrap();
    }
    let check = |d: &Disk| {
        assert_eq!(d.info().layers.len() as u64, CUTS + 1);
        assert_bytes(&read_all(d), &want);
        let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert!(fds < 200, "{fds} fds open for {} generations", CUTS + 1);
    };
    check(&d);
    d.flush().unwrap();
    d.close().unwrap();
    drop(d);
    let d = open(&o);
    check(&d);
    // Still a working disk: a write, a cut, an export of the newest generation.
    d.write(0, &stamp(CUTS)).unwrap();
    let c = d.cut(true).unwrap();
    d.export(c.generation, &dir.join("last.diff"), None)
        .unwrap();
    println!("done");
}

#[test]
fn ten_thousand_generations_under_a_1024_fd_limit() {
    let dir = scratch();
    let mut c = spawn_child("cuts", dir.path());
    let st = c.wait().unwrap();
    assert!(st.success(), "child: {st}");
}

/// Generations with scattered data (so a fold or export takes a while), and the disk image at
/// each cut.
struct Template {
    dir: tempfile::TempDir,
    images: Vec<Vec<u8>>,
}

const GENS: u64 = 6;

fn template() -> Template {
    let dir = scratch();
    let size = 8usize << 20;
    std::fs::write(dir.path().join("base.img"), pattern(size, 0x21)).unwrap();
    let d = open(&child_opts(dir.path()));
    let mut rng = Rng(0x5eed_f01d);
    let mut images = Vec::new();
    let blocks = (size / BS as usize) as u64;
    for g in 0..GENS {
        for _ in 0..600 {
            let b = rng.below(blocks);
            let off = b * u64::from(BS);
            match rng.below(8) {
                0 => d.write_zeroes(off, u64::from(BS)).unwrap(),
                1 => d.discard(off, u64::from(BS)).unwrap(),
                2 => d.write(off + 512, &pattern(1024, g as u8)).unwrap(),
                _ => d
                    .write(off, &pattern(BS as usize, (g * 7 + b) as u8))
                    .unwrap(),
            }
        }
        images.push(read_all(&d));
        d.cut(false).unwrap();
    }
    d.close().unwrap();
    Template { dir, images }
}

impl Template {
    /// A fresh copy of the state directory (the base stays shared).
    fn copy(&self) -> tempfile::TempDir {
        let to = scratch();
        let st = Command::new("cp")
            .arg("-a")
            .arg(self.dir.path().join("state"))
            .arg(to.path().join("state"))
            .status()
            .unwrap();
        assert!(st.success());
        std::os::unix::fs::symlink(self.dir.path().join("base.img"), to.path().join("base.img"))
            .unwrap();
        to
    }
}

fn child_fold(dir: &Path) {
    let mut o = child_opts(dir);
    o.base = None; // as recorded
    let d = open(&o);
    println!("ready");
    // Fold the newest frozen generation down until it lies on the base.
    while d.fold(GENS, true).is_ok() {}
    println!("done");
}

fn child_export(dir: &Path) {
    let mut o = child_opts(dir);
    o.base = None;
    let d = open(&o);
    println!("ready");
    for g in 1..=GENS {
        d.export(g, &dir.join(format!("out/g{g}.diff")), None)
            .unwrap();
    }
    println!("done");
}

/// Runs `role` on a copy of `t`, kills it after `delay` (none: lets it finish), and returns
/// the copy and how long the work took.
fn run_killed(t: &Template, role: &str, delay: Option<Duration>) -> (tempfile::TempDir, Duration) {
    let dir = t.copy();
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let mut c = spawn_child(role, dir.path());
    let mut out = wait_line(&mut c, "ready");
    let t0 = Instant::now();
    match delay {
        Some(d) => {
            std::thread::sleep(d);
            let _ = c.kill();
            c.wait().unwrap();
        }
        None => {
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            assert!(l.trim_end().ends_with("done"), "{l:?}");
            assert!(c.wait().unwrap().success());
        }
    }
    (dir, t0.elapsed())
}

/// After a restart: every listed generation exports exactly its own content (the chain of
/// exports up to it applies to the image at its cut), the disk reads as at the last cut, and
/// no temporary or leftover file survives.
fn check_restarted(t: &Template, dir: &Path, what: &str) {
    let mut o = child_opts(dir);
    o.base = None; // as recorded
    let d = open(&o);
    assert_bytes(&read_all(&d), t.images.last().unwrap());
    let info = d.info();
    let mut chain = Vec::new();
    for l in info.layers.iter().rev().filter(|l| !l.active) {
        let p = dir.join(format!("check-g{}.diff", l.generation));
        d.export(l.generation, &p, None).unwrap();
        chain.push(p);
        let img = dir.join("check.img");
        diff::apply(Some(&dir.join("base.img")), &chain, &img, true, &Job::new()).unwrap();
        let want = &t.images[(l.generation - 1) as usize];
        assert!(
            std::fs::read(&img).unwrap() == *want,
            "{what}: generation {} does not export its own content",
            l.generation
        );
    }
    // What an interrupted export wrote is either absent or complete and right.
    for g in 1..=GENS {
        let p = dir.join(format!("out/g{g}.diff"));
        if p.exists() {
            let f = DiffFile::open(&p).unwrap();
            f.verify(&Job::new()).unwrap();
            assert_eq!(f.header.generation, g);
        }
    }
    let stems: Vec<String> = d
        .info()
        .layers
        .iter()
        .map(|l| l.generation)
        .map(|g| format!("{g:06}"))
        .collect();
    for sub in ["state", "out"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains("vsnap-partial"),
                "{what}: {sub}/{name} survived"
            );
            if sub == "state" && name.starts_with("layer-") {
                assert!(
                    stems.iter().any(|s| name.contains(s.as_str())),
                    "{what}: leftover {name}"
                );
            }
        }
    }
}

fn kill_at_random_points(role: &str) {
    let t = template();
    let (dir, work) = run_killed(&t, role, None);
    eprintln!("{role}: the uninterrupted run took {work:?}");
    check_restarted(&t, dir.path(), &format!("{role} run to completion"));
    let mut rng = Rng(0xdead_beef ^ role.len() as u64);
    for i in 0..20 {
        let delay = Duration::from_nanos(rng.below(work.as_nanos() as u64 + 1));
        let (dir, _) = run_killed(&t, role, Some(delay));
        check_restarted(
            &t,
            dir.path(),
            &format!("{role} killed #{i} after {delay:?}"),
        );
    }
}

#[test]
fn a_kill_at_any_point_of_a_fold_leaves_every_generation_exact() {
    kill_at_random_points("fold");
}

#[test]
fn a_kill_at_any_point_of_an_export_leaves_every_generation_exact() {
    kill_at_random_points("export");
}

// ---------------------------------------------------------------------------------------------
// kill -9 during writes: every write that completed before the kill reads back, flushed or not.

const W_SIZE: u64 = 4 << 20;
const W_THREADS: u64 = 4;
const SECTORS_PER_BLOCK: u64 = BS as u64 / 512;

/// Sector `sector` as op `seq` writes it: its seq and index, then a pattern of both.
fn sector_bytes(seq: u64, sector: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sector;
    for c in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    b
}

fn w_base() -> Vec<u8> {
    (0..W_SIZE / 512)
        .flat_map(|s| sector_bytes(u64::MAX - s, s))
        .collect()
}

/// One op of writer `thread`: (first sector, sectors, zeroes?) inside one block it owns.
fn w_op(rng: &mut Rng, thread: u64) -> (u64, u64, bool) {
    let blocks = W_SIZE / u64::from(BS) / W_THREADS;
    let block = rng.below(blocks) * W_THREADS + thread;
    let (first, n) = match rng.below(4) {
        0 => {
            let a = rng.below(SECTORS_PER_BLOCK);
            (a, 1 + rng.below(SECTORS_PER_BLOCK - a))
        }
        _ => (0, SECTORS_PER_BLOCK),
    };
    (block * SECTORS_PER_BLOCK + first, n, rng.below(6) == 0)
}

fn child_writes(dir: &Path) {
    let start: u64 = std::env::var("VSNAP_FAULT_SEQ").unwrap().parse().unwrap();
    let mut o = DiskOptions::new(dir.join("state"));
    o.base = std::env::var_os("VSNAP_FAULT_BASE").map(PathBuf::from);
    o.block_size = BS;
    let d = open(&o);
    let out = std::sync::Mutex::new(std::io::stdout());
    let say = |line: String| {
        use std::io::Write;
        let mut o = out.lock().unwrap();
        writeln!(o, "{line}").unwrap();
        o.flush().unwrap();
    };
    say("ready".into());
    std::thread::scope(|s| {
        for t in 0..W_THREADS {
            let (d, say) = (&d, &say);
            s.spawn(move || {
                let mut rng = Rng(start ^ (t + 1).wrapping_mul(0x1234_5678_9abc));
                let mut seq = start + t;
                loop {
                    let (first, n, zero) = w_op(&mut rng, t);
                    say(format!("s {seq} {first} {n} {}", u8::from(zero)));
                    if zero {
                        d.write_zeroes(first * 512, n * 512).unwrap();
                    } else {
                        let data: Vec<u8> = (first..first + n)
                            .flat_map(|s| sector_bytes(seq, s))
                            .collect();
                        d.write(first * 512, &data).unwrap();
                    }
                    say(format!("c {seq}"));
                    seq += W_THREADS;
                }
            });
        }
        let mut rng = Rng(start ^ 0xf1u64);
        loop {
            std::thread::sleep(Duration::from_millis(rng.below(20)));
            match rng.below(4) {
                0 => drop(d.cut(rng.below(2) == 0).unwrap()),
                _ => d.flush().unwrap(),
            }
        }
    });
}

/// What each sector may read: the value of the last op on it that completed, and of one op
/// started after it (in flight at the kill). `None` = the base; `Some((seq, zero))` an op.
#[derive(Clone, Copy, Default)]
struct SectorModel {
    done: Option<(u64, bool)>,
    in_flight: Option<(u64, bool)>,
}

#[test]
fn kill_9_during_writes_loses_no_completed_write() {
    let dir = scratch();
    let base = dir.path().join("base.img");
    let base_bytes = w_base();
    std::fs::write(&base, &base_bytes).unwrap();
    let mut model = vec![SectorModel::default(); (W_SIZE / 512) as usize];
    let mut pending: std::collections::HashMap<u64, (u64, u64, bool)> = Default::default();
    let mut rng = Rng(0x6b11_1e57);
    let mut seq = 1u64;
    let (mut completed, mut in_flight_seen) = (0u64, 0u64);
    for round in 0..12 {
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_process_entry",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, "writes")
            .env(DIR, dir.path())
            .env("VSNAP_FAULT_SEQ", seq.to_string())
            .env("VSNAP_FAULT_BASE", &base)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_line(&mut c, "ready");
        let reader =
            std::thread::spawn(move || out.lines().map_while(Result::ok).collect::<Vec<String>>());
        std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
        for l in reader.join().unwrap() {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            match (l.as_bytes().first(), f.as_slice()) {
                (Some(b's'), &[q, first, n, z]) => {
                    pending.insert(q, (first, n, z == 1));
                    for s in first..first + n {
                        model[s as usize].in_flight = Some((q, z == 1));
                    }
                }
                (Some(b'c'), &[q]) => {
                    let (first, n, z) = pending.remove(&q).expect("completion of a started op");
                    for s in first..first + n {
                        model[s as usize] = SectorModel {
                            done: Some((q, z)),
                            in_flight: None,
                        };
                    }
                    completed += 1;
                }
                _ => {}
            }
            seq = seq.max(f.first().copied().unwrap_or(0) + W_THREADS + 1);
        }
        in_flight_seen += pending.len() as u64;
        // Restart and check every sector.
        let mut o = DiskOptions::new(dir.path().join("state"));
        o.block_size = BS;
        let d = open(&o);
        let got = read_all(&d);
        for (i, m) in model.iter_mut().enumerate() {
            let sec = &got[i * 512..(i + 1) * 512];
            let is = |v: Option<(u64, bool)>| match v {
                None => sec == &base_bytes[i * 512..(i + 1) * 512],
                Some((_, true)) => sec.iter().all(|&b| b == 0),
                Some((q, false)) => sec == sector_bytes(q, i as u64),
            };
            let ok = is(m.done) || (m.in_flight.is_some() && is(m.in_flight));
            assert!(
                ok,
                "round {round}: sector {i} reads neither its last completed write {:?} nor the \
                 one in flight {:?} (first bytes {:?})",
                m.done,
                m.in_flight,
                &sec[..16]
            );
            // Whichever it reads is now what it holds.
            if m.in_flight.is_some() && !is(m.done) {
                m.done = m.in_flight;
            }
            m.in_flight = None;
        }
        pending.clear();
        d.close().unwrap();
    }
    assert!(completed > 1000, "only {completed} writes completed");
    eprintln!("{completed} completed writes checked, {in_flight_seen} in flight at the kills");
}
