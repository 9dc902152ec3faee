//! The daemons as service managers run them (docs/service.md): `--pidfile`, `--log-level`,
//! `--syslog` (into a journal or syslog socket the test binds, seen by the daemon in a private
//! mount namespace), `vsnap-blk`'s vhost-user conventions, `vsnap fs --num-request-queues`
//! served in parallel, and the systemd unit templates under `systemd-analyze verify`.
//!
//! The mount-namespace and sandbox cases need root, as CI has; elsewhere they say so and pass.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vsnap_frontend::fs::{in_header, Fuse, IN_HEADER_LEN, OUT_HEADER_LEN};
use vsnap_frontend::{Desc, Frontend, GuestMem, Queue, Setup};

const VSNAP: &str = env!("CARGO_BIN_EXE_vsnap");
const VIRTIOFSD: &str = env!("CARGO_BIN_EXE_vsnap-virtiofsd");
const VSNAP_BLK: &str = env!("CARGO_BIN_EXE_vsnap-blk");
const LIMIT: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

fn skip_unless_root(test: &str) -> bool {
    if !is_root() {
        eprintln!("{test}: skipped: needs root (mount namespaces, the fs sandbox)");
    }
    !is_root()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !ready() {
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `pidfile` names a pid (the daemon writes it when it is ready) and returns it.
fn wait_pid(pidfile: &Path, child: &mut Daemon) -> u32 {
    wait_new_pid(pidfile, child, None)
}

/// [`wait_pid`] for a file that named `old` before the daemon started.
fn wait_new_pid(pidfile: &Path, child: &mut Daemon, old: Option<u32>) -> u32 {
    let mut pid = None;
    wait_until("the pidfile", || {
        if let Ok(Some(st)) = child.child().try_wait() {
            panic!("the daemon exited early: {st:?}");
        }
        let s = std::fs::read_to_string(pidfile).unwrap_or_default();
        pid = s.strip_suffix('\n').and_then(|p| p.parse().ok());
        pid.is_some() && pid != old
    });
    pid.unwrap()
}

/// A daemon the test started: killed if the test fails before it stops it.
struct Daemon(Option<Child>);

impl Daemon {
    fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

trait SpawnDaemon {
    fn spawn_daemon(&mut self) -> Daemon;
}

impl SpawnDaemon for Command {
    fn spawn_daemon(&mut self) -> Daemon {
        Daemon(Some(self.spawn().expect("start the daemon")))
    }
}

/// SIGTERM, then the exit status and everything the daemon wrote on stderr.
fn stop(mut daemon: Daemon) -> (ExitStatus, String) {
    let child = daemon.0.take().expect("running");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vsnap blk` on a blank 1 MiB disk: DIR/NAME.sock, state in DIR/NAME.state.
fn blk(dir: &Path, name: &str) -> Command {
    let mut c = Command::new(VSNAP);
    c.arg("blk")
        .arg("--socket-path")
        .arg(dir.join(format!("{name}.sock")))
        .arg("--state-dir")
        .arg(dir.join(format!("{name}.state")))
        .args(["--size", "1M", "--num-queues", "1"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// `vsnap fs` of DIR/share on DIR/fs.sock.
fn fs(dir: &Path, sandbox: &str) -> Command {
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let mut c = Command::new(VSNAP);
    c.arg("fs")
        .arg("--socket-path")
        .arg(dir.join("fs.sock"))
        .arg("--shared-dir")
        .arg(&share)
        .args(["--sandbox", sandbox])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn pidfile_is_written_refused_while_held_and_removed_at_exit() {
    let d = tempfile::tempdir().unwrap();
    let pidfile = d.path().join("blk.pid");
    let mut a = blk(d.path(), "a")
        .arg("--pidfile")
        .arg(&pidfile)
        .spawn_daemon();
    assert_eq!(wait_pid(&pidfile, &mut a), a.id());
    // A second daemon naming the same pidfile stops before it binds or opens anything.
    let out = blk(d.path(), "b")
        .arg("--pidfile")
        .arg(&pidfile)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("held by the running daemon {}", a.id())),
        "{err}"
    );
    assert!(!d.path().join("b.sock").exists());
    assert!(!d.path().join("b.state").exists());
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{}\n", a.id())
    );
    let (status, err) = stop(a);
    assert!(status.success(), "{status:?}: {err}");
    assert!(!pidfile.exists(), "pidfile left after a clean exit");
    assert!(!d.path().join("a.sock").exists());
}

#[test]
fn a_pidfile_left_by_a_killed_daemon_is_taken_over() {
    let d = tempfile::tempdir().unwrap();
    let pidfile = d.path().join("blk.pid");
    let mut a = blk(d.path(), "a")
        .arg("--pidfile")
        .arg(&pidfile)
        .spawn_daemon();
    let dead = wait_pid(&pidfile, &mut a);
    a.child().kill().unwrap();
    a.child().wait().unwrap();
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap(),
        format!("{dead}\n")
    );
    let mut b = blk(d.path(), "a")
        .arg("--pidfile")
        .arg(&pidfile)
        .spawn_daemon();
    assert_eq!(wait_new_pid(&pidfile, &mut b, Some(dead)), b.id());
    let (status, err) = stop(b);
    assert!(status.success(), "{status:?}: {err}");
    assert!(!pidfile.exists());
}

/// `vsnap fs` writes and removes it too: without a sandbox (the removal then runs under the
/// seccomp filter) and, as root, in namespace mode, where the pid written is the supervisor's,
/// the process a service manager signals.
#[test]
fn fs_pidfile_in_and_out_of_the_sandbox() {
    let sandboxes: &[&str] = if is_root() {
        &["none", "namespace"]
    } else {
        eprintln!("fs_pidfile_in_and_out_of_the_sandbox: namespace mode skipped: needs root");
        &["none"]
    };
    for sandbox in sandboxes {
        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("fs.pid");
        let mut child = fs(d.path(), sandbox)
            .args(["--seccomp", "kill", "--pidfile"])
            .arg(&pidfile)
            .spawn_daemon();
        assert_eq!(wait_pid(&pidfile, &mut child), child.id(), "{sandbox}");
        let mut f = Fuse::connect(&d.path().join("fs.sock")).unwrap();
        f.init().unwrap();
        f.getattr(1).unwrap();
        drop(f);
        let (status, err) = stop(child);
        assert!(status.success(), "{sandbox}: {status:?}: {err}");
        assert!(!pidfile.exists(), "{sandbox}: {err}");
    }
}

#[test]
fn log_level_overrides_rust_log() {
    let d = tempfile::tempdir().unwrap();
    let pidfile = d.path().join("blk.pid");
    let run = |rust_log: &str, level: Option<&str>| {
        let mut c = blk(d.path(), "a");
        c.env("RUST_LOG", rust_log).arg("--pidfile").arg(&pidfile);
        if let Some(l) = level {
            c.args(["--log-level", l]);
        }
        let mut child = c.spawn_daemon();
        wait_pid(&pidfile, &mut child);
        let (status, err) = stop(child);
        assert!(status.success(), "{status:?}: {err}");
        err
    };
    let err = run("off", Some("info"));
    assert!(err.contains("listening"), "{err}");
    let err = run("info", Some("warn"));
    assert!(!err.contains("INFO"), "{err}");
    // Without it, RUST_LOG still applies.
    let err = run("warn", None);
    assert!(!err.contains("INFO"), "{err}");
    let out = blk(d.path(), "b")
        .args(["--log-level", "loud"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}

/// virtiofsd's spelling reaches `vsnap fs`: `--log-level=` and `-d`.
#[test]
fn virtiofsd_log_level() {
    let d = tempfile::tempdir().unwrap();
    let share = d.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let sock = d.path().join("fs.sock");
    let run = |args: &[&str]| {
        let child = Command::new(VIRTIOFSD)
            .arg(format!("--socket-path={}", sock.display()))
            .arg(format!("--shared-dir={}", share.display()))
            .arg("--sandbox=none")
            .args(args)
            .env("RUST_LOG", "off")
            .stderr(Stdio::piped())
            .spawn_daemon();
        wait_until("the socket", || sock.exists());
        // Serving: the stop is handled from here on.
        let mut f = Fuse::connect(&sock).unwrap();
        f.init().unwrap();
        drop(f);
        let (status, err) = stop(child);
        assert!(status.success(), "{status:?}: {err}");
        err
    };
    let err = run(&["--log-level=info"]);
    assert!(err.contains("listening") && !err.contains("DEBUG"), "{err}");
    let err = run(&["-d"]);
    assert!(err.contains("DEBUG"), "{err}");
    let err = run(&["--log-level=error"]);
    assert!(!err.contains("INFO"), "{err}");
}

/// A mount the daemon's private mount namespace gets before exec.
enum MountOp {
    /// Bind-mounts the first path onto the second.
    Bind(CString, CString),
    Tmpfs(CString),
    /// Creates an empty file to mount onto.
    Touch(CString),
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Runs `cmd` in a mount namespace of its own, with `ops` applied there.
fn in_private_mounts(cmd: &mut Command, ops: Vec<MountOp>) {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: the closure runs in the forked child before exec and only makes system calls on
    // C strings built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            let none = std::ptr::null();
            check(libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for op in &ops {
                match op {
                    MountOp::Bind(src, dst) => check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        none,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ))?,
                    MountOp::Tmpfs(dst) => check(libc::mount(
                        c"tmpfs".as_ptr(),
                        dst.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    ))?,
                    MountOp::Touch(p) => {
                        let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                        check(fd)?;
                        libc::close(fd);
                    }
                }
            }
            Ok(())
        });
    }
}

/// Every datagram `server` has queued (the daemon has exited: nothing more comes).
fn drain(server: &UnixDatagram) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    server.set_nonblocking(true).unwrap();
    while let Ok(n) = server.recv(&mut buf) {
        out.push(buf[..n].to_vec());
    }
    out
}

/// A native-protocol journal entry: its fields in either form.
fn journal_fields(mut b: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut fields = Vec::new();
    while let Some(nl) = b.iter().position(|&c| c == b'\n') {
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                line[eq + 1..].to_vec(),
            ));
            b = &b[nl + 1..];
        } else {
            let len = u64::from_le_bytes(b[nl + 1..nl + 9].try_into().unwrap()) as usize;
            fields.push((
                String::from_utf8_lossy(line).into_owned(),
                b[nl + 9..nl + 9 + len].to_vec(),
            ));
            b = &b[nl + 10 + len..];
        }
    }
    fields
}

fn field(entry: &[(String, Vec<u8>)], name: &str) -> String {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_else(|| panic!("no {name} in {entry:?}"))
}

/// A journald socket the test binds, seen by the daemon at /run/systemd/journal/socket.
struct FakeJournal {
    dir: tempfile::TempDir,
    server: UnixDatagram,
}

impl FakeJournal {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("run/systemd/journal");
        std::fs::create_dir_all(&j).unwrap();
        let server = UnixDatagram::bind(j.join("socket")).unwrap();
        FakeJournal { dir, server }
    }

    fn mounts(&self) -> Vec<MountOp> {
        vec![MountOp::Bind(
            c(&self.dir.path().join("run")),
            c(Path::new("/run")),
        )]
    }

    fn entries(&self) -> Vec<Vec<(String, Vec<u8>)>> {
        drain(&self.server)
            .iter()
            .map(|e| journal_fields(e))
            .collect()
    }
}

#[test]
fn syslog_goes_to_the_journal() {
    if skip_unless_root("syslog_goes_to_the_journal") {
        return;
    }
    let journal = FakeJournal::new();
    let d = tempfile::tempdir().unwrap();
    let pidfile = d.path().join("blk.pid");
    let mut cmd = blk(d.path(), "a");
    cmd.arg("--syslog").arg("--pidfile").arg(&pidfile);
    in_private_mounts(&mut cmd, journal.mounts());
    let mut child = cmd.spawn_daemon();
    let pid = wait_pid(&pidfile, &mut child);
    let (status, err) = stop(child);
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("listening"), "logged to stderr too: {err}");
    let entries = journal.entries();
    let listening = entries
        .iter()
        .find(|e| field(e, "MESSAGE").contains("listening"))
        .unwrap_or_else(|| panic!("no 'listening' entry in {entries:?}"));
    assert_eq!(field(listening, "PRIORITY"), "6");
    assert_eq!(field(listening, "SYSLOG_IDENTIFIER"), "vsnap");
    assert_eq!(field(listening, "SYSLOG_PID"), pid.to_string());
}

/// vsnap-virtiofsd's `--syslog`, from inside the namespace sandbox: the entries logged after the
/// root moved into the share and seccomp came on arrive all the same.
#[test]
fn virtiofsd_syslog_from_the_sandbox() {
    if skip_unless_root("virtiofsd_syslog_from_the_sandbox") {
        return;
    }
    let journal = FakeJournal::new();
    let d = tempfile::tempdir().unwrap();
    let share = d.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let sock = d.path().join("fs.sock");
    let mut cmd = Command::new(VIRTIOFSD);
    cmd.arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .args(["--sandbox=namespace", "--seccomp=kill", "--syslog"])
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped());
    in_private_mounts(&mut cmd, journal.mounts());
    let child = cmd.spawn_daemon();
    wait_until("the socket", || sock.exists());
    let mut f = Fuse::connect(&sock).unwrap();
    f.init().unwrap();
    drop(f);
    let supervisor = child.id();
    let (status, err) = stop(child);
    assert!(status.success(), "{status:?}: {err}");
    let entries = journal.entries();
    let serving = entries
        .iter()
        .find(|e| field(e, "MESSAGE").contains("listening"))
        .unwrap_or_else(|| panic!("no 'listening' entry in {entries:?}; stderr: {err}"));
    assert_eq!(field(serving, "SYSLOG_IDENTIFIER"), "vsnap-virtiofsd");
    assert_eq!(field(serving, "SYSLOG_PID"), supervisor.to_string());
}

/// Without a journal, `--syslog` writes RFC 3164 lines to /dev/log; with neither it refuses to
/// start.
#[test]
fn syslog_without_a_journal_uses_dev_log() {
    if skip_unless_root("syslog_without_a_journal_uses_dev_log") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty-run");
    std::fs::create_dir(&empty).unwrap();
    let devlog = d.path().join("devlog");
    let server = UnixDatagram::bind(&devlog).unwrap();
    let no_journal = || {
        vec![
            MountOp::Bind(c(&empty), c(Path::new("/run"))),
            MountOp::Tmpfs(c(Path::new("/dev"))),
        ]
    };
    let pidfile = d.path().join("blk.pid");
    let mut cmd = blk(d.path(), "a");
    cmd.arg("--syslog").arg("--pidfile").arg(&pidfile);
    let mut ops = no_journal();
    ops.push(MountOp::Touch(c(Path::new("/dev/log"))));
    ops.push(MountOp::Bind(c(&devlog), c(Path::new("/dev/log"))));
    in_private_mounts(&mut cmd, ops);
    let mut child = cmd.spawn_daemon();
    let pid = wait_pid(&pidfile, &mut child);
    let (status, err) = stop(child);
    assert!(status.success(), "{status:?}: {err}");
    let lines: Vec<String> = drain(&server)
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let head = format!(" vsnap[{pid}]: ");
    let listening = lines
        .iter()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no 'listening' line in {lines:?}"));
    // daemon.info, then the timestamp, then the identifier.
    assert!(listening.starts_with("<30>"), "{listening}");
    assert!(listening.contains(&head), "{listening}");

    let mut cmd = blk(d.path(), "b");
    cmd.arg("--syslog");
    in_private_mounts(&mut cmd, no_journal());
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--syslog: neither journald"), "{err}");
    assert!(!d.path().join("b.sock").exists());
}

#[test]
fn vsnap_blk_prints_its_capabilities() {
    // The other options are ignored, even ones it would refuse.
    for args in [
        &["--print-capabilities"][..],
        &["--bogus", "--print-capabilities"],
    ] {
        let out = Command::new(VSNAP_BLK).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["type"], "block");
        assert_eq!(v["features"], serde_json::json!(["blk-file", "read-only"]));
    }
}

/// What the capabilities promise: `--blk-file` is the disk the guest sees, `--read-only` makes
/// it read-only (VIRTIO_BLK_F_RO), `--fd` serves an inherited listening socket.
#[test]
fn vsnap_blk_serves_blk_file_read_only_on_an_inherited_fd() {
    const VIRTIO_BLK_F_RO: u64 = 5;
    let d = tempfile::tempdir().unwrap();
    let image = d.path().join("disk.raw");
    std::fs::write(&image, vec![7u8; 3 << 20]).unwrap();
    let sock = d.path().join("blk.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(VSNAP_BLK);
    cmd.arg(format!("--fd={fd}"))
        .arg(format!("--blk-file={}", image.display()))
        .arg("--read-only")
        .arg(format!("--state-dir={}", d.path().join("state").display()))
        .args(["--num-queues", "1"])
        .stderr(Stdio::piped());
    // SAFETY: only fcntl on an fd this process owns, in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            // Keep it across exec (std made it close-on-exec).
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn_daemon();
    drop(listener);
    let mut fe = Frontend::connect(
        &sock,
        &Setup {
            num_queues: 1,
            mem_size: 1 << 20,
            ..Setup::default()
        },
    )
    .unwrap();
    assert_ne!(fe.offered_features & (1 << VIRTIO_BLK_F_RO), 0);
    let capacity = u64::from_le_bytes(fe.get_config(0, 8).unwrap().try_into().unwrap());
    assert_eq!(capacity, (3 << 20) / 512);
    drop(fe);
    let (status, err) = stop(child);
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(std::fs::read(&image).unwrap(), vec![7u8; 3 << 20]);
}

/// One request queue of a FUSE frontend: its own request and reply buffers.
struct Lane<'a> {
    mem: &'a GuestMem,
    queue: &'a mut Queue,
    req: u64,
    rep: u64,
    unique: u64,
}

const REPLY_CAP: u32 = 64 << 10;

impl<'a> Lane<'a> {
    fn new(mem: &'a GuestMem, queue: &'a mut Queue, first_unique: u64) -> Self {
        Lane {
            mem,
            queue,
            req: mem.alloc(64 << 10, 4096),
            rep: mem.alloc(u64::from(REPLY_CAP), 4096),
            unique: first_unique,
        }
    }

    /// Sends one request; None when no answer came within `wait`.
    fn call(
        &mut self,
        opcode: u32,
        node: u64,
        args: &[u8],
        wait: Duration,
    ) -> Option<(i32, Vec<u8>)> {
        self.unique += 2;
        let mut msg = in_header(
            (IN_HEADER_LEN + args.len()) as u32,
            opcode,
            self.unique,
            node,
            0,
            0,
        );
        msg.extend_from_slice(args);
        self.mem.write(self.req, &msg);
        self.mem.write(self.rep, &[0u8; OUT_HEADER_LEN]);
        self.queue
            .add(
                self.mem,
                &[
                    Desc::r(self.req, msg.len() as u32),
                    Desc::w(self.rep, REPLY_CAP),
                ],
            )
            .unwrap();
        self.queue.publish(self.mem);
        self.collect(wait)
    }

    /// The answer to the request in flight.
    fn collect(&mut self, wait: Duration) -> Option<(i32, Vec<u8>)> {
        let (_, used) = *self.queue.wait_used(self.mem, 1, wait).first()?;
        let out = self.mem.read_vec(self.rep, used as usize);
        let unique = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert_eq!(
            unique, self.unique,
            "reply on the wrong queue or to the wrong request"
        );
        let error = i32::from_le_bytes(out[4..8].try_into().unwrap());
        Some((error, out[OUT_HEADER_LEN..].to_vec()))
    }
}

const FUSE_LOOKUP: u32 = 1;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_INIT: u32 = 26;

fn lookup(lane: &mut Lane, name: &str) -> u64 {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    let (e, body) = lane
        .call(FUSE_LOOKUP, 1, &n, LIMIT)
        .expect("LOOKUP answered");
    assert_eq!(e, 0, "LOOKUP {name}");
    u64::from_le_bytes(body[0..8].try_into().unwrap())
}

/// Two request queues, each served by its own thread. Both answer while two frontend threads
/// drive them at once; and while an OPEN on the first waits in the host kernel (the test holds
/// a write lease on the file, so the daemon's open(2) blocks until it is let go), the second
/// keeps answering, then the first answers too.
#[test]
fn request_queues_are_served_in_parallel() {
    let d = tempfile::tempdir().unwrap();
    let share = d.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("leased"), b"x").unwrap();
    std::fs::write(share.join("free"), b"y").unwrap();
    let sock = d.path().join("fs.sock");
    let child = fs(d.path(), "none")
        .args(["--num-request-queues", "2", "--tag", "mq"])
        .spawn_daemon();
    wait_until("the socket", || sock.exists());
    let mut fe = Frontend::connect(
        &sock,
        &Setup {
            num_queues: 3,
            queue_size: 64,
            mem_size: 4 << 20,
            ..Setup::default()
        },
    )
    .unwrap();
    assert_eq!(fe.queue_num, 3, "hiprio + 2 request queues");
    // virtio-fs config: tag[36], then num_request_queues.
    let n = fe.get_config(36, 4).unwrap();
    assert_eq!(u32::from_le_bytes(n.try_into().unwrap()), 2);

    let mem = &fe.mem;
    let (_hiprio, rest) = fe.queues.split_at_mut(1);
    let (q1, q2) = rest.split_at_mut(1);
    let mut one = Lane::new(mem, &mut q1[0], 1 << 32);
    let mut two = Lane::new(mem, &mut q2[0], 2 << 32);
    let mut init = vec![0u8; 64];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&38u32.to_le_bytes());
    assert_eq!(one.call(FUSE_INIT, 0, &init, LIMIT).unwrap().0, 0);
    let leased = lookup(&mut one, "leased");
    let free = lookup(&mut two, "free");

    std::thread::scope(|s| {
        for (lane, node) in [(&mut one, leased), (&mut two, free)] {
            s.spawn(move || {
                for _ in 0..200 {
                    let (e, _) = lane.call(FUSE_GETATTR, node, &[0u8; 16], LIMIT).unwrap();
                    assert_eq!(e, 0);
                }
            });
        }
    });

    // SAFETY: plain syscall. SIGIO, the lease-break notice, would end this process.
    unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
    let holder = std::fs::File::open(share.join("leased")).unwrap();
    // SAFETY: fcntl on an fd we own.
    let r = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    assert_eq!(r, 0, "F_SETLEASE: {}", std::io::Error::last_os_error());
    let mut open_in = (libc::O_RDONLY as u32).to_le_bytes().to_vec();
    open_in.extend_from_slice(&[0u8; 4]);
    // Stays in flight: the first queue's thread is stuck in open(2).
    assert!(one
        .call(FUSE_OPEN, leased, &open_in, Duration::from_millis(500))
        .is_none());
    for _ in 0..20 {
        let (e, _) = two
            .call(FUSE_GETATTR, free, &[0u8; 16], Duration::from_secs(5))
            .expect("the second queue answers while the first is blocked");
        assert_eq!(e, 0);
    }
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(holder.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    assert_eq!(r, 0);
    let (e, _) = one
        .collect(LIMIT)
        .expect("the OPEN is answered once the lease goes");
    assert_eq!(e, 0);
    drop(fe);
    let (status, err) = stop(child);
    assert!(status.success(), "{status:?}: {err}");
}

/// With one request queue a frontend asking for two is refused at the handshake.
#[test]
fn one_request_queue_by_default() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("fs.sock");
    let child = fs(d.path(), "none").spawn_daemon();
    wait_until("the socket", || sock.exists());
    let r = Frontend::connect(
        &sock,
        &Setup {
            num_queues: 3,
            ..Setup::default()
        },
    );
    assert!(r.is_err());
    let (status, err) = stop(child);
    assert!(status.success(), "{status:?}: {err}");
}

/// `program args` started as systemd starts a socket-activated service: `listener` as fd 3,
/// `LISTEN_PID` (set by `sh` to its own pid, which `exec` hands on) and `LISTEN_FDS=1`.
fn activated(listener: &std::os::unix::net::UnixListener, program: &str, args: &[&str]) -> Command {
    let fd = listener.as_raw_fd();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(program)
        .args(args)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl on fds this process owns, in the child before exec.
    unsafe {
        c.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Both daemons serve the socket systemd passes, without --socket-path; --socket-group, which
/// only the socket unit can honour then, is refused.
#[test]
fn socket_activation_for_both_daemons() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let state = state.to_str().unwrap();
    let sock = d.path().join("blk.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let blk_args = [
        "blk",
        "--state-dir",
        state,
        "--size",
        "1M",
        "--num-queues",
        "1",
    ];
    let daemon = activated(&listener, VSNAP, &blk_args).spawn_daemon();
    let fe = Frontend::connect(
        &sock,
        &Setup {
            num_queues: 1,
            mem_size: 1 << 20,
            ..Setup::default()
        },
    )
    .unwrap();
    drop(fe);
    let (status, err) = stop(daemon);
    assert!(status.success(), "{status:?}: {err}");
    let mut refused = blk_args.to_vec();
    refused.extend([
        "--socket-path",
        "/nonexistent/x.sock",
        "--socket-group",
        "0",
    ]);
    let out = activated(&listener, VSNAP, &refused).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("SocketGroup="), "{err}");
    drop(listener);

    let share = d.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let sock = d.path().join("fs.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fs_args = [
        "fs",
        "--shared-dir",
        share.to_str().unwrap(),
        "--sandbox",
        "none",
    ];
    let daemon = activated(&listener, VSNAP, &fs_args).spawn_daemon();
    let mut f = Fuse::connect(&sock).unwrap();
    f.init().unwrap();
    f.getattr(1).unwrap();
    drop(f);
    let (status, err) = stop(daemon);
    assert!(status.success(), "{status:?}: {err}");
}

fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name)
}

/// The unit templates pass `systemd-analyze verify` (with ExecStart= pointed at the built
/// binary, as `make install` points it at PREFIX/bin).
#[test]
fn systemd_units_verify() {
    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd_units_verify: skipped: no systemd-analyze on this machine");
        return;
    };
    assert!(v.status.success());
    let d = tempfile::tempdir().unwrap();
    let bindir = Path::new(VSNAP).parent().unwrap();
    for kind in ["blk", "fs"] {
        for ext in ["service", "socket"] {
            let name = format!("vsnap-{kind}@.{ext}");
            let text = std::fs::read_to_string(contrib(&name)).unwrap();
            assert!(
                ext == "socket" || text.contains("ExecStart=/usr/local/bin/vsnap "),
                "{name}: make install rewrites /usr/local/bin/ in ExecStart="
            );
            let text = text.replace("/usr/local/bin/", &format!("{}/", bindir.display()));
            std::fs::write(d.path().join(&name), text).unwrap();
        }
        let unit = d.path().join(format!("vsnap-{kind}@disk0.service"));
        let socket = d.path().join(format!("vsnap-{kind}@disk0.socket"));
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .arg(&socket)
            .env("SYSTEMD_UNIT_PATH", format!("{}:", d.path().display()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Only what concerns our units: verify also loads the host's.
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("vsnap")).collect();
        assert!(out.status.success() && ours.is_empty(), "{kind}: {err}");
    }
}
