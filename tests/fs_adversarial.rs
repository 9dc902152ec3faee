//! `vsnap fs` attacked as a hostile guest kernel would attack it: the real daemon binary, driven
//! over its vhost-user socket by the project's FUSE frontend, under `--sandbox none` and
//! `--sandbox namespace`.
//!
//! Every case gets a fresh share with a canary tree beside it (files, directories, a symlink;
//! content, mode, owner, times and listings recorded) that must come out untouched; every request
//! must be answered within [`BOUND`] (a FIFO opened on the host would block a worker forever);
//! and the daemon must still answer GETATTR at the end. The errnos are virtiofsd's: a device node,
//! FIFO or socket is never opened on the host, and CREATE or OPEN of one is EBADF.
//!
//! Needs root (device nodes, chown, the namespace sandbox), as CI has.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vsnap_frontend::fs::{fattr, Fuse, Reply, SetAttr, Xattr, BUF_LEN, IN_HEADER_LEN};
use vsnap_fs::abi::{opcode::*, *};
use zerocopy::{FromBytes, IntoBytes};

const ROOT: u64 = 1;
/// No request may take longer than this.
const BOUND: Duration = Duration::from_secs(2);
/// A case still running after this has hung somewhere the deadline does not reach (the
/// vhost-user handshake): the watchdog kills its daemon, which fails the case.
const CASE_LIMIT: Duration = Duration::from_secs(120);
/// How long the daemon may take to listen, or to refuse to start.
const START_LIMIT: Duration = Duration::from_secs(10);
/// An unprivileged guest user.
const USER: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sandbox {
    None,
    Namespace,
}

impl Sandbox {
    fn arg(self) -> &'static str {
        match self {
            Sandbox::None => "none",
            Sandbox::Namespace => "namespace",
        }
    }
}

/// Every case runs once per sandbox mode.
macro_rules! in_both_sandboxes {
    ($($case:ident),* $(,)?) => {
        mod sandbox_none {
            $(#[test] fn $case() { super::$case(super::Sandbox::None) })*
        }
        mod sandbox_namespace {
            $(#[test] fn $case() { super::$case(super::Sandbox::Namespace) })*
        }
    };
}

in_both_sandboxes!(
    host_devices_are_never_opened,
    fifos_and_sockets_never_wedge_the_daemon,
    planted_workdir_symlink_is_refused,
    planted_workdir_file_is_refused,
    foreign_workdir_is_refused,
    stale_workdir_is_emptied,
    huge_xattr_sizes_are_survived,
    reused_inode_numbers_get_new_nodes,
    file_handles_belong_to_their_node_and_kind,
    killpriv_v2_clears_setuid_and_setgid,
    names_never_leave_the_share,
    symlinks_are_never_followed_on_the_host,
    the_workdir_is_hidden_and_untouchable,
    malformed_messages_get_errors,
);

// ---------------------------------------------------------------------------------------------
// The share, the canary beside it, and the daemon.

/// One file system object of the canary, as compared before and after.
#[derive(Debug, PartialEq, Eq)]
struct Obj {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    /// File content, symlink target, or the sorted names of a directory.
    data: Vec<u8>,
}

type Snapshot = BTreeMap<PathBuf, Obj>;

fn snapshot(root: &Path) -> Snapshot {
    fn walk(root: &Path, p: &Path, out: &mut Snapshot) {
        let m = fs::symlink_metadata(p).unwrap();
        let data = if m.file_type().is_symlink() {
            fs::read_link(p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else if m.is_dir() {
            let mut names: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in &names {
                walk(root, &p.join(n), out);
            }
            names.join(std::ffi::OsStr::new("/")).into_encoded_bytes()
        } else {
            fs::read(p).unwrap()
        };
        let rel = p.strip_prefix(root).unwrap().to_owned();
        out.insert(
            rel,
            Obj {
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
                data,
            },
        );
    }
    let mut out = Snapshot::new();
    walk(root, root, &mut out);
    out
}

fn diff(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    let mut d = Vec::new();
    for (p, b) in before {
        match after.get(p) {
            None => d.push(format!("{} removed", p.display())),
            Some(a) if a != b => d.push(format!("{} changed: {b:?} -> {a:?}", p.display())),
            _ => {}
        }
    }
    for p in after.keys().filter(|p| !before.contains_key(*p)) {
        d.push(format!("{} appeared", p.display()));
    }
    d
}

fn set_mode(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn write_file(p: &Path, data: &[u8], mode: u32) {
    fs::write(p, data).unwrap();
    set_mode(p, mode);
}

fn make_dir(p: &Path, mode: u32) {
    fs::create_dir(p).unwrap();
    set_mode(p, mode);
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// A fresh share and, beside it, the canary no guest request may reach.
struct Case {
    dir: tempfile::TempDir,
    share: PathBuf,
    canary: PathBuf,
    sandbox: Sandbox,
    before: Snapshot,
}

impl Case {
    fn new(sandbox: Sandbox) -> Self {
        Self::new_in(sandbox, &std::env::temp_dir())
    }

    /// Shares hold `file` ("0123456789"), `sub/`, a world-writable `pub/` for unprivileged
    /// callers, and symlinks out of the share (absolute, relative, and to a directory).
    fn new_in(sandbox: Sandbox, base: &Path) -> Self {
        assert_eq!(
            fs::metadata("/proc/self").unwrap().uid(),
            0,
            "these tests need root (device nodes, chown, --sandbox namespace), as CI has"
        );
        let dir = tempfile::tempdir_in(base).unwrap();
        let share = dir.path().join("share");
        let canary = dir.path().join("canary");
        make_dir(&canary, 0o755);
        write_file(&canary.join("secret"), b"host secret", 0o600);
        write_file(&canary.join("exec"), b"#!/bin/sh\n", 0o755);
        make_dir(&canary.join("dir"), 0o750);
        write_file(&canary.join("dir/nested"), b"nested", 0o644);
        make_dir(&canary.join("dir/deeper"), 0o700);
        write_file(&canary.join("dir/deeper/leaf"), b"leaf", 0o400);
        // What a planted workdir symlink points at.
        make_dir(&canary.join("wd-target"), 0o711);
        write_file(&canary.join("wd-target/a"), b"a", 0o640);
        write_file(&canary.join("wd-target/b"), b"b", 0o604);
        make_dir(&canary.join("wd-target/sub"), 0o700);
        write_file(&canary.join("wd-target/sub/c"), b"c", 0o600);
        symlink("secret", canary.join("link")).unwrap();

        make_dir(&share, 0o755);
        write_file(&share.join("file"), b"0123456789", 0o644);
        make_dir(&share.join("sub"), 0o755);
        make_dir(&share.join("pub"), 0o777);
        symlink(canary.join("secret"), share.join("abs-escape")).unwrap();
        symlink("../canary/secret", share.join("rel-escape")).unwrap();
        symlink("../canary", share.join("dir-escape")).unwrap();
        let before = snapshot(&canary);
        Case {
            dir,
            share,
            canary,
            sandbox,
            before,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("fs.sock")
    }

    fn command(&self, extra: &[&str], rlimit_as: Option<u64>) -> (Command, PathBuf) {
        let log = self.dir.path().join("daemon.log");
        let out = File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vsnap"));
        cmd.arg("fs")
            .arg("--socket-path")
            .arg(self.sock())
            .arg("--shared-dir")
            .arg(&self.share)
            .args(["--sandbox", self.sandbox.arg()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        if let Some(limit) = rlimit_as {
            // SAFETY: the closure runs between fork and exec and only calls setrlimit, which is
            // async-signal-safe, on a stack value.
            unsafe {
                cmd.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_AS, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        (cmd, log)
    }

    /// The daemon, listening.
    fn start(&self, extra: &[&str]) -> Daemon {
        self.start_limited(extra, None)
    }

    /// The daemon with its address space limited to `rlimit_as` bytes.
    fn start_limited(&self, extra: &[&str], rlimit_as: Option<u64>) -> Daemon {
        let (mut cmd, log) = self.command(extra, rlimit_as);
        let child = Arc::new(Mutex::new(cmd.spawn().expect("spawn vsnap fs")));
        let (tx, rx) = mpsc::channel::<()>();
        let watchdog = {
            let child = child.clone();
            std::thread::spawn(move || {
                if rx.recv_timeout(CASE_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
                    eprintln!("watchdog: the case ran past {CASE_LIMIT:?}; killing the daemon");
                    // A reaped child is not signalled again (std keeps its status).
                    let _ = child.lock().unwrap_or_else(PoisonError::into_inner).kill();
                }
            })
        };
        let d = Daemon {
            child,
            sock: self.sock(),
            log,
            sandbox: self.sandbox,
            watchdog: Some((tx, watchdog)),
        };
        let t = Instant::now();
        while !d.sock.exists() {
            if let Some(st) = d.exited() {
                panic!("vsnap fs exited ({st}) before listening:\n{}", d.log_text());
            }
            assert!(
                t.elapsed() < START_LIMIT,
                "vsnap fs did not listen within {START_LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    /// Runs a daemon that must refuse to start: its exit status and output.
    fn start_refused(&self) -> (ExitStatus, String) {
        let (mut cmd, log) = self.command(&[], None);
        let mut child = cmd.spawn().expect("spawn vsnap fs");
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > START_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vsnap fs still runs {START_LIMIT:?} after start instead of refusing:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (status, fs::read_to_string(&log).unwrap_or_default())
    }

    /// The canary is exactly as it was.
    fn finish(self) {
        let d = diff(&self.before, &snapshot(&self.canary));
        assert!(
            d.is_empty(),
            "the canary outside the share changed:\n{}",
            d.join("\n")
        );
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let d = diff(&self.before, &snapshot(&self.canary));
            if !d.is_empty() {
                eprintln!(
                    "also, the canary outside the share changed:\n{}",
                    d.join("\n")
                );
            }
        }
    }
}

/// A running `vsnap fs`, killed when dropped; its output goes to a log shown on failure.
struct Daemon {
    child: Arc<Mutex<Child>>,
    sock: PathBuf,
    log: PathBuf,
    sandbox: Sandbox,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .id()
    }

    fn exited(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .try_wait()
            .unwrap()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A connection past the vhost-user handshake, before FUSE INIT, with the case's deadline.
    fn connect(&self) -> Fuse {
        let mut f = Fuse::connect(&self.sock).unwrap_or_else(|e| {
            panic!("connect to vsnap fs: {e}\n{}", self.log_text());
        });
        f.deadline = BOUND;
        f
    }

    /// A connection past FUSE INIT, as a guest offering every flag of the first word.
    fn client(&self) -> Fuse {
        let mut f = self.connect();
        assert_eq!(f.init(), Ok(()), "INIT");
        f
    }

    /// SIGTERM: the daemon must be gone within `limit`.
    fn terminate(&mut self, limit: Duration) -> ExitStatus {
        {
            let child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
            // SAFETY: kill(2) on our child, not yet reaped (we hold the lock that reaps it).
            assert_eq!(
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
                0
            );
        }
        let t = Instant::now();
        loop {
            if let Some(st) = self.exited() {
                return st;
            }
            assert!(
                t.elapsed() < limit,
                "vsnap fs still runs {limit:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the daemon holds `node` open for I/O (an `O_PATH` fd is only a reference).
    fn holds_open(&self, node: &Path) -> bool {
        let m = fs::symlink_metadata(node).unwrap();
        let pid = self.pid();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.filter_map(Result::ok).any(|fd| {
            let same =
                fs::metadata(fd.path()).is_ok_and(|f| (f.dev(), f.ino()) == (m.dev(), m.ino()));
            let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
            let flags = fs::read_to_string(info).unwrap_or_default();
            let o_path = flags
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .is_some_and(|v| v & libc::O_PATH as u32 != 0);
            same && !o_path
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some((tx, t)) = self.watchdog.take() {
            drop(tx);
            let _ = t.join();
        }
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let status = child.try_wait().ok().flatten();
        let _ = child.kill();
        let _ = child.wait();
        if std::thread::panicking() {
            let how = match status {
                Some(st) => match st.signal() {
                    Some(sig) => format!("killed by signal {sig}"),
                    None => format!("exited with {st}"),
                },
                None => "still running".to_string(),
            };
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "vsnap fs (--sandbox {}) was {how}; its log ends:\n{}",
                self.sandbox.arg(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Findings of a case collected before failing it, so one run reports every hole.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    /// `r` must be the errno `want`.
    fn errno<T: std::fmt::Debug>(&mut self, what: &str, r: &Result<T, i32>, want: i32) {
        self.check(matches!(r, Err(e) if *e == -want), || {
            format!("{what}: got {}, want {}", show(r), errno_name(want))
        });
    }

    /// An errno where the value, ERANGE or ENOMEM was allowed.
    fn push_errno(&mut self, what: &str, e: i32) {
        self.0.push(format!(
            "{what}: {} (want the value, ERANGE or ENOMEM)",
            errno_name(e)
        ));
    }

    fn done(self) {
        assert!(
            self.0.is_empty(),
            "{} finding(s):\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

/// "Bad file descriptor (os error 9)" for -9 or 9.
fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(e.abs()).to_string()
}

fn show<T: std::fmt::Debug>(r: &Result<T, i32>) -> String {
    match r {
        Ok(v) => format!("success ({v:?})"),
        Err(e) => errno_name(*e),
    }
}

/// The daemon still serves: GETATTR of the root.
fn assert_alive(f: &mut Fuse) {
    assert_eq!(
        f.getattr(ROOT),
        Ok(()),
        "GETATTR of the root after the attack"
    );
}

fn cname(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `rdev` as the Linux FUSE driver encodes it (`new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode()
}

fn o(flags: i32) -> u32 {
    flags as u32
}

// ---------------------------------------------------------------------------------------------
// 1. Host devices.

/// New records of the host's kernel log (`/dev/kmsg`) from the moment it is opened.
struct Kmsg {
    reader: File,
    seen: String,
}

impl Kmsg {
    /// Positioned at the end of the log, and proven to see what is written after that.
    fn open() -> Self {
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .expect("open /dev/kmsg");
        reader.seek(SeekFrom::End(0)).unwrap();
        let mut k = Kmsg {
            reader,
            seen: String::new(),
        };
        let control = format!("vsnap-fs-adversarial control {}", unique_token());
        writeln!(
            OpenOptions::new().write(true).open("/dev/kmsg").unwrap(),
            "{control}"
        )
        .unwrap();
        assert!(
            k.contains(&control),
            "a line written to /dev/kmsg is not readable back: the marker check would be blind"
        );
        k
    }

    fn contains(&mut self, needle: &str) -> bool {
        let mut buf = vec![0u8; 8192];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // Records overwritten while we were not reading: carry on from the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => panic!("read /dev/kmsg: {e}"),
            }
        }
        self.seen.contains(needle)
    }
}

fn unique_token() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!("{}-{}", std::process::id(), t.as_nanos())
}

/// What a guest does with a handle it should never have got: write a marker, read. The
/// findings say what reached the host's device.
fn abuse(f: &mut Fuse, c: &mut Checks, what: &str, node: u64, fh: u64, marker: &str) {
    let w = f.write_with(node, fh, 0, format!("{marker}\n").as_bytes(), 0);
    c.check(w.is_err(), || {
        format!("{what}: the guest wrote {w:?} bytes to the host's device")
    });
    let r = f.read(node, fh, 0, 64);
    c.check(r.is_err(), || {
        format!("{what}: the guest read {r:?} bytes from the host's device")
    });
    let _ = f.release(node, fh);
}

fn host_devices_are_never_opened(sb: Sandbox) {
    let case = Case::new(sb);
    let d = case.start(&[]);
    let mut f = d.client();
    let mut kmsg = Kmsg::open();
    let marker = format!("vsnap-guest-marker-{}-{}", sb.arg(), unique_token());
    let mut c = Checks::default();
    let nodes = [
        ("kmsg", libc::S_IFCHR, 1, 11),
        ("null", libc::S_IFCHR, 1, 3),
        ("loop0", libc::S_IFBLK, 7, 0),
    ];
    for (name, kind, major, minor) in nodes {
        let path = case.share.join(name);
        // Guest root makes the node; virtiofsd allows it (the node is the guest's business).
        let e = f
            .with_ids(0, 0, |f| {
                f.mknod(ROOT, name, kind | 0o666, encode_dev(major, minor))
            })
            .unwrap_or_else(|e| panic!("MKNOD {name}: {}", errno_name(e)));
        let m = fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.mode() & libc::S_IFMT, kind, "{name} on the host");
        assert_eq!(
            m.rdev(),
            libc::makedev(major, minor),
            "{name}'s device number"
        );
        assert_eq!(
            e.attr.mode & libc::S_IFMT,
            kind,
            "{name} in the MKNOD reply"
        );

        // CREATE over the existing name without O_EXCL would open the host's device.
        let r = f.with_ids(0, 0, |f| {
            f.create_with(ROOT, name, o(libc::O_RDWR), libc::S_IFREG | 0o644, 0)
        });
        let what = format!("CREATE O_RDWR over the {name} node");
        c.errno(&what, &r, libc::EBADF);
        if let Ok((ce, fh)) = r {
            abuse(&mut f, &mut c, &what, ce.nodeid, fh, &marker);
        }
        for flags in [libc::O_RDWR, libc::O_RDONLY | libc::O_NONBLOCK] {
            let r = f.with_ids(0, 0, |f| f.open(e.nodeid, o(flags)));
            let what = format!("OPEN {flags:#o} of the {name} node");
            c.errno(&what, &r, libc::EBADF);
            if let Ok(fh) = r {
                abuse(&mut f, &mut c, &what, e.nodeid, fh, &marker);
            }
        }
        c.check(!d.holds_open(&path), || {
            format!("the daemon holds the host's {name} device open")
        });
    }
    c.check(!kmsg.contains(&marker), || {
        "the guest's marker reached the host's kernel log".to_string()
    });
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 2. FIFOs and sockets.

fn fifos_and_sockets_never_wedge_the_daemon(sb: Sandbox) {
    let case = Case::new(sb);
    let mut d = case.start(&[]);
    let mut f = d.client();
    let mut c = Checks::default();
    let pubdir = f.lookup(ROOT, "pub").unwrap();
    f.mknod(ROOT, "fifo", libc::S_IFIFO | 0o666, 0)
        .expect("MKNOD a FIFO as root");
    f.with_ids(USER, USER, |f| {
        f.mknod(pubdir, "fifo", libc::S_IFIFO | 0o644, 0)
    })
    .expect("MKNOD a FIFO as an unprivileged user");
    let m = fs::symlink_metadata(case.share.join("pub/fifo")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (USER, USER),
        "the FIFO belongs to its maker"
    );
    f.mknod(ROOT, "sock", libc::S_IFSOCK | 0o644, 0)
        .expect("MKNOD a socket node");
    // And a live socket made on the host.
    let _listener = UnixListener::bind(case.share.join("bound.sock")).unwrap();

    let targets = [
        (0, ROOT, "fifo", "fifo"),
        (USER, pubdir, "fifo", "pub/fifo"),
        (0, ROOT, "sock", "sock"),
        (0, ROOT, "bound.sock", "bound.sock"),
    ];
    for (uid, parent, name, rel) in targets {
        // With nobody at the other end, opening the FIFO on the host would never return.
        let r = f.with_ids(uid, uid, |f| {
            f.create_with(parent, name, o(libc::O_RDONLY), libc::S_IFREG | 0o644, 0)
        });
        c.errno(
            &format!("CREATE O_RDONLY over {rel} as uid {uid}"),
            &r,
            libc::EBADF,
        );
        if let Ok((e, fh)) = r {
            let _ = f.release(e.nodeid, fh);
        }
        let node = f.lookup(parent, name).unwrap();
        for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
            let r = f.with_ids(uid, uid, |f| f.open(node, o(flags)));
            c.errno(
                &format!("OPEN {flags:#o} of {rel} as uid {uid}"),
                &r,
                libc::EBADF,
            );
            if let Ok(fh) = r {
                let _ = f.release(node, fh);
            }
        }
        c.check(!d.holds_open(&case.share.join(rel)), || {
            format!("the daemon holds {rel} open")
        });
    }
    assert_alive(&mut f);

    // A new guest (the VMM reconnects) is served, and sees what the last one made.
    drop(f);
    let mut f = d.client();
    assert_alive(&mut f);
    let e = f
        .lookup_entry(ROOT, "fifo")
        .expect("LOOKUP after reconnecting");
    assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFIFO);
    drop(f);
    let st = d.terminate(BOUND);
    c.check(st.success(), || format!("exit status after SIGTERM: {st}"));
    c.done();
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 3. The workdir (SHARE/.vsnap-workdir by default) planted by the guest or anyone before start.

fn assert_refused(case: &Case, what: &str) {
    let (st, out) = case.start_refused();
    assert!(!st.success(), "vsnap fs started with {what}:\n{out}");
    let error = out
        .lines()
        .filter(|l| l.contains("error"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        error.to_lowercase().contains("workdir"),
        "vsnap fs refused {what} without saying it is about the workdir:\n{out}"
    );
}

fn planted_workdir_symlink_is_refused(sb: Sandbox) {
    let case = Case::new(sb);
    let wd = case.share.join(".vsnap-workdir");
    let target = case.canary.join("wd-target");
    symlink(&target, &wd).unwrap();
    assert_refused(&case, "a workdir that is a symlink out of the share");
    assert_eq!(fs::read_link(&wd).unwrap(), target, "the planted symlink");
    case.finish();
}

fn planted_workdir_file_is_refused(sb: Sandbox) {
    let case = Case::new(sb);
    let wd = case.share.join(".vsnap-workdir");
    write_file(&wd, b"not a directory", 0o640);
    let before = fs::symlink_metadata(&wd).unwrap();
    assert_refused(&case, "a regular file at the workdir's name");
    let after = fs::symlink_metadata(&wd).unwrap();
    assert_eq!(fs::read(&wd).unwrap(), b"not a directory");
    assert_eq!(
        (after.mode(), after.mtime(), after.mtime_nsec()),
        (before.mode(), before.mtime(), before.mtime_nsec()),
        "the file at the workdir's name was changed (mode, mtime)"
    );
    case.finish();
}

fn foreign_workdir_is_refused(sb: Sandbox) {
    let case = Case::new(sb);
    let wd = case.share.join(".vsnap-workdir");
    make_dir(&wd, 0o700);
    write_file(&wd.join("theirs"), b"keep", 0o600);
    chown(&wd.join("theirs"), 65534, 65534);
    chown(&wd, 65534, 65534);
    let before = snapshot(&wd);
    assert_refused(&case, "a workdir owned by another user");
    let d = diff(&before, &snapshot(&wd));
    assert!(
        d.is_empty(),
        "the foreign workdir changed:\n{}",
        d.join("\n")
    );
    case.finish();
}

fn stale_workdir_is_emptied(sb: Sandbox) {
    let case = Case::new(sb);
    let wd = case.share.join(".vsnap-workdir");
    make_dir(&wd, 0o700);
    write_file(&wd.join("stale-1"), b"left by a crash", 0o644);
    fs::hard_link(case.share.join("file"), wd.join("stale-2")).unwrap();
    // Emptying removes the link itself, never what it points at.
    symlink(case.canary.join("secret"), wd.join("stale-link")).unwrap();
    let d = case.start(&[]);
    let mut f = d.client();
    assert_alive(&mut f);
    assert_eq!(f.lookup(ROOT, ".vsnap-workdir"), Err(-libc::ENOENT));
    let left: Vec<_> = fs::read_dir(&wd)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "stale entries kept in the workdir: {left:?}"
    );
    assert_eq!(mode_of(&wd) & 0o7777, 0o700, "the workdir's mode");
    assert_eq!(fs::read(case.share.join("file")).unwrap(), b"0123456789");
    drop(f);
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 4. Guest-chosen xattr buffer sizes.

fn huge_xattr_sizes_are_survived(sb: Sandbox) {
    let case = Case::new(sb);
    let file = case.share.join("file");
    let p = std::ffi::CString::new(file.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: valid C strings and a 1-byte value.
    let r = unsafe { libc::setxattr(p.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    // 1 GiB of address space: a buffer sized by the guest cannot be had.
    let d = case.start_limited(&["--xattr"], Some(1 << 30));
    let mut f = d.client();
    let node = f.lookup(ROOT, "file").unwrap();
    assert_eq!(f.getxattr(node, "user.k", 0), Ok(Xattr::Size(1)));
    assert_eq!(
        f.getxattr(node, "user.k", 64),
        Ok(Xattr::Value(b"v".to_vec()))
    );
    assert_eq!(f.listxattr(node, 0), Ok(Xattr::Size(7)));
    let mut c = Checks::default();
    for size in [0xffff_ffffu32, 0x1000_0001] {
        let get = GetxattrIn { size, padding: 0 };
        let get = get.as_bytes();
        let calls: [(&str, u32, Vec<u8>, &[u8]); 2] = [
            ("GETXATTR", GETXATTR, [get, &cname("user.k")].concat(), b"v"),
            ("LISTXATTR", LISTXATTR, get.to_vec(), b"user.k\0"),
        ];
        for (what, op, args, value) in calls {
            let r = f.call(op, node, &[&args]);
            let what = format!("{what} of size {size:#x}");
            c.check(r.used <= BUF_LEN && r.len == r.used, || {
                format!(
                    "{what}: reply of {} bytes (header says {}) for a {BUF_LEN}-byte buffer",
                    r.used, r.len
                )
            });
            match -r.error {
                0 => c.check(r.body == value, || format!("{what}: value {:?}", r.body)),
                libc::ERANGE | libc::ENOMEM => {}
                e => c.push_errno(&what, e),
            }
        }
    }
    c.check(d.exited().is_none(), || "the daemon died".to_string());
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 5. Inode numbers reused by the host file system.

/// How often a file created right after a directory was removed gets the directory's inode
/// number on the file system of `base`, out of 20.
fn reuse_rate(base: &Path) -> Option<usize> {
    let dir = tempfile::tempdir_in(base).ok()?;
    let mut n = 0;
    for i in 0..20 {
        let d = dir.path().join("d");
        fs::create_dir(&d).ok()?;
        let ino = fs::metadata(&d).ok()?.ino();
        fs::remove_dir(&d).ok()?;
        let f = dir.path().join(format!("f{i}"));
        fs::write(&f, b"").ok()?;
        n += usize::from(fs::metadata(&f).ok()?.ino() == ino);
    }
    Some(n)
}

fn fs_type(p: &Path) -> String {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return "unknown".into();
    }
    // SAFETY: statfs succeeded.
    let t = unsafe { s.assume_init() }.f_type;
    match t {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        _ => format!("{t:#x}"),
    }
}

fn reused_inode_numbers_get_new_nodes(sb: Sandbox) {
    // The share must be where numbers are reused, or the case proves nothing.
    let candidates = [
        std::env::temp_dir(),
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
        PathBuf::from("/dev/shm"),
    ];
    let rates: Vec<_> = candidates
        .iter()
        .map(|p| (p, fs_type(p), reuse_rate(p)))
        .collect();
    let Some((base, fstype, _)) = rates.iter().find(|(_, _, r)| r.unwrap_or(0) > 0) else {
        panic!("no candidate file system reuses inode numbers: {rates:?}");
    };
    let case = Case::new_in(sb, base);
    let d = case.start(&[]);
    let mut f = d.client();
    let mut c = Checks::default();
    let mut reused = 0;
    // Whether a number comes back depends on what the other cases allocate in parallel:
    // go on until it did a few times rather than for a fixed count.
    for i in 0..2000 {
        if reused == 5 {
            break;
        }
        // The guest keeps its lookup of the removed directory (a process sits in it).
        let a = f.mkdir(ROOT, "d", 0o755).expect("MKDIR");
        let looked = f.lookup(ROOT, "d").expect("LOOKUP d");
        assert_eq!(looked, a.nodeid, "LOOKUP d after MKDIR");
        let dir_ino = fs::metadata(case.share.join("d")).unwrap().ino();
        f.rmdir(ROOT, "d").expect("RMDIR");
        let name = format!("f{i}");
        let (e, fh) = f
            .create_with(ROOT, &name, o(libc::O_RDWR), libc::S_IFREG | 0o644, 0)
            .expect("CREATE");
        let file_ino = fs::metadata(case.share.join(&name)).unwrap().ino();
        reused += usize::from(file_ino == dir_ino);
        let l = f.lookup_entry(ROOT, &name).expect("LOOKUP the new file");
        c.check(e.nodeid != a.nodeid && l.nodeid != a.nodeid, || {
            format!(
                "round {i}: the new file got the removed directory's node {}",
                a.nodeid
            )
        });
        c.check(e.nodeid == l.nodeid, || {
            format!(
                "round {i}: CREATE said node {}, LOOKUP {}",
                e.nodeid, l.nodeid
            )
        });
        for (what, mode) in [("CREATE", e.attr.mode), ("LOOKUP", l.attr.mode)] {
            c.check(mode & libc::S_IFMT == libc::S_IFREG, || {
                format!("round {i}: {what} reports mode {mode:#o} for a regular file")
            });
        }
        let st = f.stat(l.nodeid);
        c.check(
            st.is_ok_and(|a| a.mode & libc::S_IFMT == libc::S_IFREG),
            || format!("round {i}: GETATTR of the new file: {}", show(&st)),
        );
        // The removed directory's node is stale: it must not show the file.
        let old = f.stat(a.nodeid);
        c.check(
            !old.is_ok_and(|a| a.mode & libc::S_IFMT != libc::S_IFDIR),
            || {
                format!(
                    "round {i}: GETATTR of the removed directory's node: {}",
                    show(&old)
                )
            },
        );
        f.release(e.nodeid, fh).unwrap();
    }
    assert!(
        reused > 0,
        "no inode number was reused in 2000 rounds on {} ({fstype}): the case proved nothing",
        base.display()
    );
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 6. File handles used with another node or as the other kind.

fn file_handles_belong_to_their_node_and_kind(sb: Sandbox) {
    let case = Case::new(sb);
    write_file(&case.share.join("a"), b"aaaa", 0o644);
    write_file(&case.share.join("b"), b"bbbb", 0o600);
    let d = case.start(&[]);
    let mut f = d.client();
    let mut c = Checks::default();
    let a = f.lookup(ROOT, "a").unwrap();
    let b = f.lookup(ROOT, "b").unwrap();
    let sub = f.lookup(ROOT, "sub").unwrap();
    let fh_b = f.open(b, o(libc::O_RDWR)).unwrap();
    let dfh = f.opendir(sub).unwrap();

    for (what, valid) in [
        ("truncate", fattr::FH | fattr::SIZE),
        ("chmod", fattr::FH | fattr::MODE),
    ] {
        let s = SetAttr {
            valid,
            fh: fh_b,
            size: 0,
            mode: 0o777,
            ..SetAttr::default()
        };
        let r = f.setattr(a, &s);
        c.errno(
            &format!("SETATTR ({what}) of a with b's handle"),
            &r,
            libc::EBADF,
        );
    }
    for (name, data, mode) in [("a", b"aaaa", 0o644), ("b", b"bbbb", 0o600)] {
        let p = case.share.join(name);
        c.check(fs::read(&p).unwrap() == data, || {
            format!("{name}'s content changed")
        });
        c.check(mode_of(&p) & 0o7777 == mode, || {
            format!("{name}'s mode is {:#o}", mode_of(&p) & 0o7777)
        });
    }

    let r = f.releasedir(b, fh_b);
    c.errno("RELEASEDIR of a file's handle", &r, libc::EBADF);
    let r = f.release(sub, dfh);
    c.errno("RELEASE of a directory's handle", &r, libc::EBADF);
    // Both handles still work as what they are.
    let r = f.read_bytes(b, fh_b, 0, 4);
    c.check(r.as_deref() == Ok(b"bbbb"), || {
        format!("READ through b's handle: {}", show(&r))
    });
    let rd = f.call(
        READDIR,
        sub,
        &[ReadIn {
            fh: dfh,
            size: 4096,
            ..ReadIn::default()
        }
        .as_bytes()],
    );
    c.check(rd.error == 0, || {
        format!("READDIR through sub's handle: {}", errno_name(rd.error))
    });
    // (Either may be gone already if a confused release above released it.)
    let _ = f.release(b, fh_b);
    let _ = f.releasedir(sub, dfh);
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 7. FUSE_HANDLE_KILLPRIV_V2: the daemon (root, CAP_FSETID) must clear setuid/setgid the way the
//    kernel would for the unprivileged writer.

#[derive(Clone, Copy, Debug)]
enum Kill {
    Write,
    Truncate,
    OpenTrunc,
}

fn killpriv_v2_clears_setuid_and_setgid(sb: Sandbox) {
    let case = Case::new(sb);
    // (mode before, mode after): setgid without group-exec is mandatory locking, kept.
    let modes = [(0o4755, 0o0755), (0o2775, 0o0775), (0o2745, 0o2745)];
    let kinds = [Kill::Write, Kill::Truncate, Kill::OpenTrunc];
    for k in kinds {
        for (mode, _) in modes {
            let p = case.share.join(format!("{k:?}-{mode:o}"));
            fs::write(&p, b"data").unwrap();
            chown(&p, USER, USER);
            set_mode(&p, mode);
            assert_eq!(mode_of(&p) & 0o7777, mode);
        }
    }
    let d = case.start(&[]);
    let mut f = d.connect();
    let mut c = Checks::default();
    let session = f.init_with(u64::from(u32::MAX)).expect("INIT");
    c.check(session.flags & init::HANDLE_KILLPRIV_V2 != 0, || {
        format!(
            "INIT offering FUSE_HANDLE_KILLPRIV_V2 got flags {:#x} without it",
            session.flags
        )
    });
    for k in kinds {
        for (mode, want) in modes {
            let name = format!("{k:?}-{mode:o}");
            let r = f.with_ids(USER, USER, |f| {
                let node = f.lookup(ROOT, &name)?;
                match k {
                    Kill::Write => {
                        let fh = f.open(node, o(libc::O_WRONLY))?;
                        let w = f.write_with(node, fh, 0, b"more", WRITE_KILL_SUIDGID);
                        f.release(node, fh)?;
                        w.map(|_| ())
                    }
                    Kill::Truncate => f
                        .setattr(
                            node,
                            &SetAttr {
                                valid: fattr::SIZE | fattr::KILL_SUIDGID,
                                size: 0,
                                ..SetAttr::default()
                            },
                        )
                        .map(|_| ()),
                    Kill::OpenTrunc => {
                        let fh = f.open_with(
                            node,
                            o(libc::O_WRONLY | libc::O_TRUNC),
                            OPEN_KILL_SUIDGID,
                        )?;
                        f.release(node, fh)
                    }
                }
            });
            c.check(r.is_ok(), || format!("{name}: {}", show(&r)));
            let got = mode_of(&case.share.join(&name)) & 0o7777;
            c.check(got == want, || {
                format!("{k:?} of a {mode:o} file as its owner: mode {got:o}, want {want:o}")
            });
        }
    }
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

// ---------------------------------------------------------------------------------------------
// 8. Names, symlinks, the workdir and malformed messages (as crates/fs/tests/fuse.rs does it
//    in process), against the binary.

fn entry(r: &Reply) -> EntryOut {
    assert_eq!(r.error, 0, "request failed with {}", errno_name(r.error));
    EntryOut::read_from_prefix(&r.body).unwrap().0
}

fn raw_lookup(f: &mut Fuse, parent: u64, n: &str) -> Reply {
    f.call(LOOKUP, parent, &[&cname(n)])
}

fn raw_open(f: &mut Fuse, node: u64, flags: i32) -> Reply {
    let a = OpenIn {
        flags: o(flags),
        open_flags: 0,
    };
    f.call(OPEN, node, &[a.as_bytes()])
}

fn raw_create(f: &mut Fuse, parent: u64, n: &str, flags: i32) -> Reply {
    let a = CreateIn {
        flags: o(flags),
        mode: 0o644,
        ..CreateIn::default()
    };
    f.call(CREATE, parent, &[a.as_bytes(), &cname(n)])
}

fn raw_mkdir(f: &mut Fuse, parent: u64, n: &str) -> Reply {
    let a = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    f.call(MKDIR, parent, &[a.as_bytes(), &cname(n)])
}

fn raw_mknod(f: &mut Fuse, parent: u64, n: &str) -> Reply {
    let a = MknodIn {
        mode: libc::S_IFREG | 0o644,
        ..MknodIn::default()
    };
    f.call(MKNOD, parent, &[a.as_bytes(), &cname(n)])
}

fn raw_symlink(f: &mut Fuse, parent: u64, n: &str, target: &str) -> Reply {
    f.call(SYMLINK, parent, &[&cname(n), &cname(target)])
}

fn raw_link(f: &mut Fuse, node: u64, parent: u64, n: &str) -> Reply {
    f.call(
        LINK,
        parent,
        &[LinkIn { oldnodeid: node }.as_bytes(), &cname(n)],
    )
}

fn raw_rename(f: &mut Fuse, parent: u64, old: &str, newdir: u64, new: &str) -> Reply {
    f.call(
        RENAME,
        parent,
        &[RenameIn { newdir }.as_bytes(), &cname(old), &cname(new)],
    )
}

fn readdir_names(f: &mut Fuse, node: u64) -> Vec<String> {
    let h = f.opendir(node).unwrap();
    let r = f.call(
        READDIR,
        node,
        &[ReadIn {
            fh: h,
            size: 65536,
            ..ReadIn::default()
        }
        .as_bytes()],
    );
    assert_eq!(r.error, 0);
    let mut names = Vec::new();
    let mut b = &r.body[..];
    while !b.is_empty() {
        let d = Dirent::read_from_prefix(b).unwrap().0;
        names.push(String::from_utf8(b[24..24 + d.namelen as usize].to_vec()).unwrap());
        b = &b[dirent_size(d.namelen as usize)..];
    }
    f.releasedir(node, h).unwrap();
    names.sort();
    names
}

fn errno_of(r: &Reply) -> Result<(), i32> {
    if r.error == 0 {
        Ok(())
    } else {
        Err(r.error)
    }
}

fn names_never_leave_the_share(sb: Sandbox) {
    let case = Case::new(sb);
    let d = case.start(&[]);
    let mut f = d.client();
    let mut c = Checks::default();
    let file = f.lookup(ROOT, "file").unwrap();
    let sub = f.lookup(ROOT, "sub").unwrap();
    for parent in [ROOT, sub] {
        for bad in [
            "..",
            ".",
            "",
            "a/b",
            "../canary/secret",
            "/etc/passwd",
            "../../etc",
        ] {
            let at = format!("{bad:?} in node {parent}");
            let calls = [
                ("LOOKUP", raw_lookup(&mut f, parent, bad)),
                ("CREATE", raw_create(&mut f, parent, bad, libc::O_RDWR)),
                ("MKDIR", raw_mkdir(&mut f, parent, bad)),
                ("MKNOD", raw_mknod(&mut f, parent, bad)),
                ("SYMLINK", raw_symlink(&mut f, parent, bad, "file")),
                ("LINK", raw_link(&mut f, file, parent, bad)),
                ("RENAME to", raw_rename(&mut f, ROOT, "file", parent, bad)),
                (
                    "RENAME from",
                    raw_rename(&mut f, parent, bad, ROOT, "moved"),
                ),
                ("UNLINK", f.call(UNLINK, parent, &[&cname(bad)])),
                ("RMDIR", f.call(RMDIR, parent, &[&cname(bad)])),
            ];
            for (what, r) in calls {
                c.errno(&format!("{what} {at}"), &errno_of(&r), libc::EINVAL);
            }
        }
    }
    assert_eq!(fs::read(case.share.join("file")).unwrap(), b"0123456789");
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

fn symlinks_are_never_followed_on_the_host(sb: Sandbox) {
    let case = Case::new(sb);
    let d = case.start(&["--xattr"]);
    let mut f = d.client();
    let mut c = Checks::default();
    for link in ["abs-escape", "rel-escape", "dir-escape"] {
        let e = entry(&raw_lookup(&mut f, ROOT, link));
        assert_eq!(
            e.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{link} is a symlink"
        );
        for flags in [libc::O_RDONLY, libc::O_RDWR | libc::O_TRUNC] {
            let r = errno_of(&raw_open(&mut f, e.nodeid, flags));
            c.errno(&format!("OPEN {flags:#o} of {link}"), &r, libc::ELOOP);
        }
        // What would change the target if followed: refused, or applied to the link itself
        // (chown and times with AT_SYMLINK_NOFOLLOW); the canary tells.
        let refused = [("chmod", fattr::MODE), ("truncate", fattr::SIZE)];
        for (what, valid) in refused {
            let s = SetAttr {
                valid,
                mode: 0o777,
                ..SetAttr::default()
            };
            let r = f.setattr(e.nodeid, &s);
            c.check(r.is_err(), || {
                format!("SETATTR ({what}) of {link}: {}", show(&r))
            });
        }
        let s = SetAttr {
            valid: fattr::UID | fattr::GID | fattr::ATIME | fattr::MTIME,
            uid: USER,
            gid: USER,
            atime: 1,
            mtime: 1,
            ..SetAttr::default()
        };
        let _ = f.setattr(e.nodeid, &s);
        let x = SetxattrIn { size: 1, flags: 0 };
        let r = f.call(SETXATTR, e.nodeid, &[x.as_bytes(), &cname("user.x"), b"1"]);
        c.check(r.error != 0, || format!("SETXATTR of {link} succeeded"));
        let r = errno_of(&raw_create(
            &mut f,
            ROOT,
            link,
            libc::O_RDWR | libc::O_TRUNC,
        ));
        c.check(r.is_err(), || {
            format!("CREATE O_TRUNC over {link} succeeded")
        });
        let r = errno_of(&raw_mkdir(&mut f, e.nodeid, "x"));
        c.errno(&format!("MKDIR in {link}"), &r, libc::ENOTDIR);
        let r = errno_of(&raw_lookup(&mut f, e.nodeid, "secret"));
        c.errno(&format!("LOOKUP through {link}"), &r, libc::ENOTDIR);
        let r = f.opendir(e.nodeid);
        c.errno(&format!("OPENDIR of {link}"), &r, libc::ENOTDIR);
    }
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

fn the_workdir_is_hidden_and_untouchable(sb: Sandbox) {
    let case = Case::new(sb);
    let d = case.start(&[]);
    let mut f = d.client();
    let mut c = Checks::default();
    let wd = ".vsnap-workdir";
    let names = readdir_names(&mut f, ROOT);
    c.check(!names.iter().any(|n| n.contains("vsnap")), || {
        format!("the workdir is listed: {names:?}")
    });
    let r = errno_of(&raw_lookup(&mut f, ROOT, wd));
    c.errno("LOOKUP of the workdir", &r, libc::ENOENT);
    let file = f.lookup(ROOT, "file").unwrap();
    let sub = f.lookup(ROOT, "sub").unwrap();
    let (x, xfh) = f.create(sub, "x", o(libc::O_RDWR)).unwrap();
    f.release(x, xfh).unwrap();
    let calls = [
        ("MKDIR", raw_mkdir(&mut f, ROOT, wd)),
        ("CREATE", raw_create(&mut f, ROOT, wd, libc::O_RDWR)),
        ("MKNOD", raw_mknod(&mut f, ROOT, wd)),
        ("SYMLINK", raw_symlink(&mut f, ROOT, wd, "/")),
        ("LINK", raw_link(&mut f, file, ROOT, wd)),
        ("RENAME over", raw_rename(&mut f, sub, "x", ROOT, wd)),
        ("RENAME away", raw_rename(&mut f, ROOT, wd, sub, "taken")),
        ("RMDIR", f.call(RMDIR, ROOT, &[&cname(wd)])),
        ("UNLINK", f.call(UNLINK, ROOT, &[&cname(wd)])),
    ];
    for (what, r) in calls {
        c.errno(
            &format!("{what} of the workdir"),
            &errno_of(&r),
            libc::EACCES,
        );
    }
    let m = fs::symlink_metadata(case.share.join(wd)).unwrap();
    c.check(m.is_dir() && m.mode() & 0o777 == 0o700, || {
        format!("the workdir is now {:#o}", m.mode())
    });
    assert_alive(&mut f);
    c.done();
    drop(f);
    drop(d);
    case.finish();
}

fn malformed_messages_get_errors(sb: Sandbox) {
    let case = Case::new(sb);
    let d = case.start(&[]);
    let mut f = d.connect();
    // Before INIT, nothing but INIT.
    assert_eq!(raw_lookup(&mut f, ROOT, "file").error, -libc::EIO);
    drop(f);
    let mut f = d.client();
    let file = f.lookup(ROOT, "file").unwrap();

    // Shorter than a header: no unique to answer, completed with length 0.
    assert_eq!(f.send_raw(1, &[1, 2, 3], BUF_LEN).used, 0);
    // Header lengths that lie: longer than the message, shorter than a header, huge.
    for (len, unique) in [(1000, 77), (8, 79), (u32::MAX, 81)] {
        let mut m = vsnap_frontend::fs::in_header(len, LOOKUP, unique, ROOT, 0, 0);
        m.extend_from_slice(b"file\0");
        let r = f.send_raw(1, &m, BUF_LEN);
        assert_eq!(
            (r.unique, r.error),
            (unique, -libc::EINVAL),
            "header length {len}"
        );
    }
    // Truncated arguments, an unterminated name, a write carrying less than it says.
    assert_eq!(f.call(SETATTR, file, &[&[0u8; 10]]).error, -libc::EINVAL);
    assert_eq!(f.call(LOOKUP, ROOT, &[b"file"]).error, -libc::EINVAL);
    let fh = f.open(file, o(libc::O_RDWR)).unwrap();
    let w = ReadIn {
        fh,
        size: 100,
        ..ReadIn::default()
    };
    assert_eq!(
        f.call(WRITE, file, &[w.as_bytes(), b"short"]).error,
        -libc::EINVAL
    );
    // A READ far larger than any reply may be: refused, or capped to what fits.
    let r = f.call(
        READ,
        file,
        &[ReadIn {
            fh,
            size: u32::MAX,
            ..ReadIn::default()
        }
        .as_bytes()],
    );
    assert!(r.used <= BUF_LEN, "READ reply of {} bytes", r.used);
    assert!(
        r.error == -libc::EINVAL || (r.error == 0 && r.body == b"0123456789"),
        "READ of u32::MAX bytes: {} {:?}",
        errno_name(r.error),
        r.body
    );
    // Unknown and unsupported opcodes.
    assert_eq!(f.call(4242, ROOT, &[]).error, -libc::ENOSYS);
    assert_eq!(f.call(GETLK, file, &[&[0u8; 64]]).error, -libc::ENOSYS);
    // Unknown node ids and file handles.
    for node in [0, 999_999, u64::MAX] {
        let r = f.call(GETATTR, node, &[GetattrIn::default().as_bytes()]);
        assert_eq!(r.error, -libc::ENOENT, "GETATTR of node {node}");
        assert_eq!(raw_lookup(&mut f, node, "x").error, -libc::ENOENT);
    }
    assert_eq!(f.read(file, 12345, 0, 10), Err(-libc::EBADF));
    assert_eq!(f.release(file, 12345), Err(-libc::EBADF));
    // Reading a directory handle as another node's directory.
    let h = f.opendir(ROOT).unwrap();
    let r = f.call(
        READDIR,
        file,
        &[ReadIn {
            fh: h,
            size: 4096,
            ..ReadIn::default()
        }
        .as_bytes()],
    );
    assert_eq!(r.error, -libc::EBADF);
    // A reply larger than the guest's buffer is never written past it: the guest gets EIO
    // where a header fits (or its request would hang in its kernel), else length 0.
    let getattr = |unique| {
        let mut m =
            vsnap_frontend::fs::in_header((IN_HEADER_LEN + 16) as u32, GETATTR, unique, file, 0, 0);
        m.extend_from_slice(&[0u8; 16]);
        m
    };
    let r = f.send_raw(1, &getattr(83), 20);
    assert_eq!((r.used, r.len, r.unique, r.error), (16, 16, 83, -libc::EIO));
    assert_eq!(f.send_raw(1, &getattr(85), 8).used, 0);
    assert_eq!(
        f.send_raw(1, &getattr(87), 0).used,
        0,
        "no reply buffer at all"
    );
    // Forgetting what was never looked up, or more than was, is harmless.
    f.forget(FORGET, 999_999, ForgetIn { nlookup: 5 }.as_bytes());
    for count in [1000, u32::MAX] {
        f.forget(
            BATCH_FORGET,
            0,
            BatchForgetIn { count, dummy: 0 }.as_bytes(),
        );
    }

    // Still serving.
    assert_eq!(f.read_bytes(file, fh, 0, 4).as_deref(), Ok(&b"0123"[..]));
    assert_alive(&mut f);
    drop(f);
    drop(d);
    case.finish();
}
