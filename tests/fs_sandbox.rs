//! `vsnap fs` confined, as a VMM runs it: the real binary in each `--sandbox` mode with
//! `--seccomp kill`, driven over its vhost-user socket by the project's FUSE frontend through a
//! representative set of operations (a system call missing from the allow-list kills the daemon
//! and fails the test), then inspected from the outside through /proc: no_new_privs, seccomp,
//! capabilities of every thread, namespaces, root and mounts. SIGTERM must end it cleanly.
//!
//! Needs root (namespaces, chroot, capabilities); skipped otherwise.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vsnap_frontend::fs::{Fuse, Reply};

const ROOT: u64 = 1;
const VSNAP: &str = env!("CARGO_BIN_EXE_vsnap");

// Linux fuse.h opcodes.
const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const REMOVEXATTR: u32 = 24;
const FLUSH: u32 = 25;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const ACCESS: u32 = 34;
const CREATE: u32 = 35;
const BATCH_FORGET: u32 = 42;
const FALLOCATE: u32 = 43;
const READDIRPLUS: u32 = 44;
const RENAME2: u32 = 45;
const LSEEK: u32 = 46;
const COPY_FILE_RANGE: u32 = 47;
const SYNCFS: u32 = 50;

// Capability numbers (linux/capability.h).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_MKNOD: u32 = 27;
const CAP_SETFCAP: u32 = 31;

/// The capabilities a root daemon keeps by default (virtiofsd's set plus DAC_READ_SEARCH).
const KEPT: &[u32] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
    CAP_MKNOD,
    CAP_SETFCAP,
];

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// Little-endian argument bytes, in the order the fuse.h structs lay them out.
#[derive(Default)]
struct Args(Vec<u8>);

impl Args {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn name(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

struct Client(Fuse);

impl Client {
    fn call(&mut self, op: u32, node: u64, a: Args) -> Reply {
        self.0.call(op, node, &[&a.0])
    }

    fn ok(&mut self, what: &str, op: u32, node: u64, a: Args) -> Vec<u8> {
        let r = self.call(op, node, a);
        assert_eq!(r.error, 0, "{what}: errno {}", -r.error);
        r.body
    }

    /// The node id of a `fuse_entry_out` reply (LOOKUP, MKDIR, CREATE, ...).
    fn entry(&mut self, what: &str, op: u32, node: u64, a: Args) -> u64 {
        le64(&self.ok(what, op, node, a), 0)
    }

    fn read_in(fh: u64, offset: u64, size: u32) -> Args {
        Args::default()
            .u64(fh)
            .u64(offset)
            .u32(size)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
    }

    fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let r = self
            .0
            .call_cap(READ, node, &[&Self::read_in(fh, offset, size).0], 16 + size);
        assert_eq!(r.error, 0, "READ: errno {}", -r.error);
        r.body
    }

    fn release(&mut self, op: u32, node: u64, fh: u64) {
        self.ok(
            "RELEASE",
            op,
            node,
            Args::default().u64(fh).u32(0).u32(0).u64(0),
        );
    }
}

/// A 88-byte `fuse_setattr_in` changing mode and size.
fn setattr_mode_size(mode: u32, size: u64) -> Args {
    let a = Args::default()
        .u32(1 | 8) // FATTR_MODE | FATTR_SIZE
        .u32(0)
        .u64(0) // fh
        .u64(size)
        .u64(0) // lock_owner
        .u64(0)
        .u64(0)
        .u64(0) // atime, mtime, ctime
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(mode)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(0);
    assert_eq!(a.0.len(), 88);
    a
}

struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    share: PathBuf,
    sock: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `vsnap fs` on a fresh share holding `hello`, as `uid` (None: as this process).
    fn start(args: &[&str], uid: Option<u32>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        // Reachable and writable for the unprivileged runs and the non-root guest caller.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::write(share.join("hello"), b"hello from the host").unwrap();
        std::fs::write(dir.path().join("outside"), b"not shared").unwrap();
        let sock = dir.path().join("fs.sock");
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(VSNAP);
        cmd.arg("fs")
            .arg("--socket-path")
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&share)
            .arg("--xattr")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().unwrap();
        let d = Daemon {
            child: Some(child),
            dir,
            share,
            sock,
            log,
        };
        d.wait_until(|| d.sock.exists(), "the socket to appear");
        d
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_until(&self, mut cond: impl FnMut() -> bool, what: &str) {
        let t = Instant::now();
        while !cond() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}; daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The sandboxed child in namespace mode (the process we started only supervises).
    fn served_child(&self) -> u32 {
        let path = format!("/proc/{0}/task/{0}/children", self.pid());
        let mut pid = None;
        self.wait_until(
            || {
                pid = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok());
                pid.is_some()
            },
            "the sandboxed child",
        );
        pid.unwrap()
    }

    fn connect(&self) -> Client {
        let mut f = Fuse::connect(&self.sock).unwrap();
        f.init().unwrap();
        Client(f)
    }

    /// SIGTERM, then the exit status within 2 s.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t.elapsed() > Duration::from_secs(2) {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the daemon did not exit within 2 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The operations a guest does, each of which must succeed (or fail with the errno the
/// passthrough gives, never by the daemon dying). `as_root`: the daemon switches to the
/// caller's uid for creations.
fn exercise(c: &mut Client, d: &Daemon, as_root: bool) {
    let hello = c.entry("LOOKUP hello", LOOKUP, ROOT, Args::default().name("hello"));
    c.ok(
        "GETATTR",
        GETATTR,
        hello,
        Args::default().u32(0).u32(0).u64(0),
    );
    let fh = le64(
        &c.ok(
            "OPEN",
            OPEN,
            hello,
            Args::default().u32(libc::O_RDONLY as u32).u32(0),
        ),
        0,
    );
    assert_eq!(c.read(hello, fh, 0, 4096), b"hello from the host");
    c.release(RELEASE, hello, fh);

    // A new file: write, sync, allocate, seek, copy, read back.
    let body = c.ok(
        "CREATE",
        CREATE,
        ROOT,
        Args::default()
            .u32(libc::O_RDWR as u32)
            .u32(libc::S_IFREG | 0o644)
            .u32(0)
            .u32(0)
            .name("new"),
    );
    let (new, fh) = (le64(&body, 0), le64(&body, 128));
    let w = c.ok(
        "WRITE",
        WRITE,
        new,
        Client::read_in(fh, 0, 4).bytes(b"data"),
    );
    assert_eq!(le32(&w, 0), 4);
    c.ok("FSYNC", FSYNC, new, Args::default().u64(fh).u32(0).u32(0));
    c.ok(
        "FSYNC datasync",
        FSYNC,
        new,
        Args::default().u64(fh).u32(1).u32(0),
    );
    c.ok(
        "FALLOCATE",
        FALLOCATE,
        new,
        Args::default().u64(fh).u64(0).u64(8192).u32(0).u32(0),
    );
    let l = c.ok(
        "LSEEK",
        LSEEK,
        new,
        Args::default()
            .u64(fh)
            .u64(0)
            .u32(libc::SEEK_DATA as u32)
            .u32(0),
    );
    assert_eq!(le64(&l, 0), 0);
    let w = c.ok(
        "COPY_FILE_RANGE",
        COPY_FILE_RANGE,
        new,
        Args::default()
            .u64(fh)
            .u64(0)
            .u64(new)
            .u64(fh)
            .u64(4096)
            .u64(4)
            .u64(0),
    );
    assert_eq!(le32(&w, 0), 4);
    assert_eq!(c.read(new, fh, 4096, 4), b"data");
    c.ok(
        "FLUSH",
        FLUSH,
        new,
        Args::default().u64(fh).u32(0).u32(0).u64(0),
    );
    c.release(RELEASE, new, fh);

    // Names: directory, symlink, hard link, renames, attributes, xattrs.
    let dir = c.entry(
        "MKDIR",
        MKDIR,
        ROOT,
        Args::default().u32(0o755).u32(0).name("dir"),
    );
    let link = c.entry(
        "SYMLINK",
        SYMLINK,
        ROOT,
        Args::default().name("link").name("new"),
    );
    assert_eq!(c.ok("READLINK", READLINK, link, Args::default()), b"new");
    c.entry("LINK", LINK, dir, Args::default().u64(new).name("hard"));
    c.ok(
        "RENAME",
        RENAME,
        ROOT,
        Args::default().u64(dir).name("new").name("moved"),
    );
    c.ok(
        "RENAME2 noreplace",
        RENAME2,
        dir,
        Args::default()
            .u64(ROOT)
            .u32(libc::RENAME_NOREPLACE)
            .u32(0)
            .name("moved")
            .name("back"),
    );
    let back = c.entry("LOOKUP back", LOOKUP, ROOT, Args::default().name("back"));
    let a = c.ok("SETATTR", SETATTR, back, setattr_mode_size(0o600, 2));
    assert_eq!(le32(&a, 16 + 60) & 0o7777, 0o600);
    c.ok(
        "ACCESS",
        ACCESS,
        back,
        Args::default().u32(libc::R_OK as u32).u32(0),
    );
    c.ok(
        "SETXATTR",
        SETXATTR,
        back,
        Args::default()
            .u32(5)
            .u32(0)
            .name("user.vsnap")
            .bytes(b"value"),
    );
    assert_eq!(
        c.ok(
            "GETXATTR",
            GETXATTR,
            back,
            Args::default().u32(64).u32(0).name("user.vsnap")
        ),
        b"value"
    );
    let names = c.ok(
        "LISTXATTR",
        LISTXATTR,
        back,
        Args::default().u32(256).u32(0),
    );
    assert!(names.windows(10).any(|w| w == b"user.vsnap"), "{names:?}");
    c.ok(
        "REMOVEXATTR",
        REMOVEXATTR,
        back,
        Args::default().name("user.vsnap"),
    );

    // A FIFO can be made, but is never opened on the host.
    let r = c.call(
        MKNOD,
        ROOT,
        Args::default()
            .u32(libc::S_IFIFO | 0o644)
            .u32(0)
            .u32(0)
            .u32(0)
            .name("fifo"),
    );
    let fifo_made = r.error == 0;
    if as_root {
        assert!(fifo_made, "MKNOD fifo: errno {}", -r.error);
    }
    if fifo_made {
        let fifo = le64(&r.body, 0);
        let r = c.call(
            OPEN,
            fifo,
            Args::default().u32(libc::O_RDONLY as u32).u32(0),
        );
        assert_ne!(r.error, 0, "a FIFO was opened on the host");
    }

    // Listing and file system calls.
    let dh = le64(
        &c.ok("OPENDIR", OPENDIR, ROOT, Args::default().u32(0).u32(0)),
        0,
    );
    let list = c.ok(
        "READDIRPLUS",
        READDIRPLUS,
        ROOT,
        Client::read_in(dh, 0, 8192),
    );
    for n in [&b"hello"[..], b"back", b"dir", b"link"] {
        assert!(
            list.windows(n.len()).any(|w| w == n),
            "{} not listed",
            String::from_utf8_lossy(n)
        );
    }
    c.release(RELEASEDIR, ROOT, dh);
    let st = c.ok("STATFS", STATFS, ROOT, Args::default());
    assert!(le32(&st, 40) > 0, "statfs bsize");
    c.ok("SYNCFS", SYNCFS, ROOT, Args::default().u64(0));

    // Created as an unprivileged guest user: the daemon takes its fsuid/fsgid.
    c.0.uid = 1000;
    c.0.gid = 1000;
    let body = c.ok(
        "CREATE as uid 1000",
        CREATE,
        ROOT,
        Args::default()
            .u32(libc::O_WRONLY as u32)
            .u32(libc::S_IFREG | 0o644)
            .u32(0)
            .u32(0)
            .name("users"),
    );
    let (users, fh) = (le64(&body, 0), le64(&body, 128));
    c.release(RELEASE, users, fh);
    c.0.uid = 0;
    c.0.gid = 0;
    if as_root {
        let m = std::fs::metadata(d.share.join("users")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
    }

    // The host sees what the guest did.
    assert_eq!(std::fs::read(d.share.join("back")).unwrap(), b"da");
    assert_eq!(
        std::fs::read_link(d.share.join("link")).unwrap(),
        Path::new("new")
    );
    assert_eq!(
        std::fs::metadata(d.share.join("back")).unwrap().mode() & 0o7777,
        0o600
    );

    // Removal, and forgetting everything looked up.
    for n in ["link", "back", "users"] {
        c.ok("UNLINK", UNLINK, ROOT, Args::default().name(n));
    }
    if fifo_made {
        c.ok("UNLINK fifo", UNLINK, ROOT, Args::default().name("fifo"));
    }
    c.ok("UNLINK hard", UNLINK, dir, Args::default().name("hard"));
    c.ok("RMDIR", RMDIR, ROOT, Args::default().name("dir"));
    let mut forget = Args::default().u32(3).u32(0);
    for n in [hello, dir, link] {
        forget = forget.u64(n).u64(1);
    }
    c.0.forget(BATCH_FORGET, 0, &forget.0);
    // Still alive after all of it.
    c.ok(
        "GETATTR root",
        GETATTR,
        ROOT,
        Args::default().u32(0).u32(0).u64(0),
    );
    assert_eq!(
        std::fs::read_dir(&d.share)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != ".vsnap-workdir")
            .collect::<Vec<_>>(),
        ["hello"]
    );
}

/// `Name:\tvalue` from /proc/PID/status or /proc/PID/task/TID/status.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{name} not in status"))
        .trim()
        .to_string()
}

fn cap_mask(caps: &[u32]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c)
}

/// This process's permitted set: a kept capability the test itself lacks cannot be kept.
fn own_permitted() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    u64::from_str_radix(&status_field(&s, "CapPrm"), 16).unwrap()
}

/// Checks every thread of `pid`: no_new_privs, the seccomp filter, and the capability sets
/// (the bounding set only for a root daemon: an unprivileged one cannot change it).
fn check_confined(pid: u32, caps: u64, root: bool, log: &str) {
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(tasks.len() > 1, "the daemon runs its worker threads");
    for t in tasks {
        let s = std::fs::read_to_string(t.join("status")).unwrap();
        let hex = |n: &str| u64::from_str_radix(&status_field(&s, n), 16).unwrap();
        let ctx = format!("{} ({})\n{log}", t.display(), status_field(&s, "Name"));
        assert_eq!(status_field(&s, "NoNewPrivs"), "1", "{ctx}");
        assert_eq!(status_field(&s, "Seccomp"), "2", "{ctx}");
        assert_eq!(hex("CapEff"), caps, "CapEff of {ctx}");
        assert_eq!(hex("CapPrm"), caps, "CapPrm of {ctx}");
        assert_eq!(hex("CapInh"), 0, "CapInh of {ctx}");
        assert_eq!(hex("CapAmb"), 0, "CapAmb of {ctx}");
        if root {
            assert_eq!(hex("CapBnd"), 0, "CapBnd of {ctx}");
        }
    }
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn same_inode(a: &Path, b: &Path) -> bool {
    let (a, b) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[derive(Clone, Copy, PartialEq)]
enum Sandbox {
    Namespace,
    Chroot,
    None,
}

fn run_mode(sandbox: Sandbox, extra: &[&str], caps: &[u32]) {
    let name = match sandbox {
        Sandbox::Namespace => "namespace",
        Sandbox::Chroot => "chroot",
        Sandbox::None => "none",
    };
    let mut args = vec!["--sandbox", name, "--seccomp", "kill"];
    args.extend_from_slice(extra);
    let mut d = Daemon::start(&args, None);
    let served = if sandbox == Sandbox::Namespace {
        d.served_child()
    } else {
        d.pid()
    };
    let mut c = d.connect();
    exercise(&mut c, &d, true);
    // The VMM goes away and comes back (a reconnect): the daemon keeps listening.
    drop(c);
    let mut c = d.connect();
    c.ok(
        "GETATTR after reconnecting",
        GETATTR,
        ROOT,
        Args::default().u32(0).u32(0).u64(0),
    );

    check_confined(served, cap_mask(caps) & own_permitted(), true, &d.log());
    let (me, it) = ("self".to_string(), served.to_string());
    let proc_root = PathBuf::from(format!("/proc/{served}/root"));
    match sandbox {
        Sandbox::Namespace => {
            for kind in ["mnt", "pid", "net", "ipc"] {
                assert_ne!(ns(&me, kind), ns(&it, kind), "{kind} namespace shared");
            }
            assert!(same_inode(&proc_root, &d.share), "root is not the share");
            // Its mount table is the share alone, nodev/nosuid/noexec: the host's mounts, /proc
            // included, were detached.
            let mounts = std::fs::read_to_string(format!("/proc/{served}/mountinfo")).unwrap();
            let lines: Vec<_> = mounts.lines().collect();
            assert_eq!(lines.len(), 1, "mounts left in the sandbox:\n{mounts}");
            let fields: Vec<_> = lines[0].split(' ').collect();
            assert_eq!(fields[4], "/", "{mounts}");
            for opt in ["nodev", "nosuid", "noexec"] {
                assert!(fields[5].split(',').any(|o| o == opt), "{opt}: {mounts}");
            }
        }
        Sandbox::Chroot => {
            assert_eq!(ns(&me, "mnt"), ns(&it, "mnt"));
            assert!(same_inode(&proc_root, &d.share), "root is not the share");
        }
        Sandbox::None => assert!(same_inode(&proc_root, Path::new("/"))),
    }
    if sandbox != Sandbox::None {
        // Nothing outside the share is reachable through the daemon's root.
        assert!(!proc_root.join("outside").exists());
        assert!(proc_root.join("hello").exists());
    }

    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "exit status {st:?}; log:\n{}", d.log());
    drop(c);
    if sandbox == Sandbox::Namespace {
        assert!(
            !Path::new(&format!("/proc/{served}")).exists(),
            "the sandboxed child outlived its supervisor"
        );
    }
    // Removed by whoever can still reach it; in a chroot nobody can (the next start replaces it).
    assert_eq!(d.sock.exists(), sandbox == Sandbox::Chroot);
    let workdir = d.share.join(".vsnap-workdir");
    if workdir.exists() {
        assert_eq!(std::fs::read_dir(&workdir).unwrap().count(), 0);
    }
    assert!(
        !d.log().contains("seccomp: system call"),
        "log:\n{}",
        d.log()
    );
}

#[test]
fn namespace_sandbox_serves_confined() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    run_mode(Sandbox::Namespace, &[], KEPT);
}

/// Inodes held by fd are re-opened through /proc/self/fd, which in namespace mode is a bind of
/// the fd directory of a fresh proc, used after the old root is detached. Worker threads come
/// from the pool; --modcaps changes what they hold.
#[test]
fn namespace_sandbox_with_fd_store_pool_and_modcaps() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let kept: Vec<u32> = KEPT
        .iter()
        .copied()
        .filter(|&c| c != CAP_DAC_READ_SEARCH && c != CAP_SETFCAP)
        .collect();
    run_mode(
        Sandbox::Namespace,
        &[
            "--inode-store",
            "fd",
            "--thread-pool-size",
            "2",
            "--modcaps=-dac_read_search:-setfcap",
        ],
        &kept,
    );
}

#[test]
fn chroot_sandbox_serves_confined() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    run_mode(Sandbox::Chroot, &[], KEPT);
}

#[test]
fn no_sandbox_still_drops_capabilities_and_filters() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    run_mode(Sandbox::None, &["--thread-pool-size", "2"], KEPT);
}

/// An unprivileged daemon has nothing to drop, but still runs under no_new_privs and seccomp;
/// namespace and chroot modes are refused with a reason.
#[test]
fn unprivileged_daemon_is_filtered_and_refuses_root_only_modes() {
    if !is_root() {
        eprintln!("skipped: needs root (to run the daemon as another user)");
        return;
    }
    const NOBODY: u32 = 65534;
    let mut d = Daemon::start(&["--sandbox", "none", "--seccomp", "kill"], Some(NOBODY));
    let mut c = d.connect();
    exercise(&mut c, &d, false);
    check_confined(d.pid(), 0, false, &d.log());
    let st = d.terminate();
    assert_eq!(st.code(), Some(0), "exit status {st:?}; log:\n{}", d.log());

    for mode in ["namespace", "chroot"] {
        let out = Command::new(VSNAP)
            .args(["fs", "--sandbox", mode, "--socket-path"])
            .arg(d.dir.path().join("refused.sock"))
            .arg("--shared-dir")
            .arg(&d.share)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("--sandbox {mode} needs root")),
            "{err}"
        );
        assert!(!d.dir.path().join("refused.sock").exists());
    }
}

/// SIGTERM right after the fork, while the child (PID 1 of its namespace, which drops signals
/// it has no handler for) is still setting up, is held until the daemon's handler exists: the
/// daemon still stops cleanly.
#[test]
fn namespace_sigterm_during_setup_is_not_lost() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    for _ in 0..5 {
        let mut d = Daemon::start(&["--sandbox", "namespace"], None);
        d.served_child();
        let st = d.terminate();
        assert_eq!(st.code(), Some(0), "exit status {st:?}; log:\n{}", d.log());
    }
}

/// SIGHUP ends the daemon as it does virtiofsd; SIGKILL to the supervisor takes the sandboxed
/// child with it (PR_SET_PDEATHSIG).
#[test]
fn namespace_child_follows_its_supervisor() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut d = Daemon::start(&["--sandbox", "namespace"], None);
    drop(d.connect());
    let mut child = d.child.take().unwrap();
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let t = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "SIGHUP ignored");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(st.code(), Some(0), "{st:?}; log:\n{}", d.log());

    let mut d = Daemon::start(&["--sandbox", "namespace"], None);
    let served = d.served_child();
    drop(d.connect());
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    d.wait_until(
        || !Path::new(&format!("/proc/{served}")).exists(),
        "the sandboxed child to die with its supervisor",
    );
}

/// The workdir must be inside the share in namespace mode (its fd would lead out of the
/// sandbox); --modcaps is checked before anything happens.
#[test]
fn namespace_refuses_outside_workdir_and_bad_modcaps() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let share = t.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let sock = t.path().join("fs.sock");
    let run = |extra: &[&str]| {
        let out = Command::new(VSNAP)
            .arg("fs")
            .arg("--socket-path")
            .arg(&sock)
            .arg("--shared-dir")
            .arg(&share)
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let mut err = String::new();
        out.stderr.as_slice().read_to_string(&mut err).unwrap();
        err
    };
    let outside = t.path().join("work");
    let err = run(&["--workdir", outside.to_str().unwrap()]);
    assert!(err.contains("--workdir inside the --shared-dir"), "{err}");
    let err = run(&["--modcaps=+no_such_cap"]);
    assert!(err.contains("unknown capability"), "{err}");
    let err = run(&["--modcaps=chown"]);
    assert!(err.contains("is not +name or -name"), "{err}");
    assert!(!sock.exists());
}
