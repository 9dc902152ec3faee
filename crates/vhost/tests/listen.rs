//! Getting the listening socket: never over a live daemon's, a stale one replaced, other files
//! left alone, an inherited fd checked, systemd socket activation.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::Command;

use vsnap_vhost::listen::{self, bind_exclusive, listen_fds, ListenError};

#[test]
fn a_live_socket_is_refused_a_stale_one_replaced_and_other_files_kept() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.sock");
    let live = UnixListener::bind(&p).unwrap();
    assert!(matches!(bind_exclusive(&p), Err(ListenError::InUse(_))));
    // The live listener still owns the path.
    let _c = UnixStream::connect(&p).unwrap();
    live.accept().unwrap();
    drop(live);
    let b = bind_exclusive(&p).expect("a socket nobody listens on is stale");
    UnixStream::connect(&p).unwrap();
    // remove() only removes the socket file while it is still ours.
    let (l, file) = b.into_parts();
    drop(l);
    std::fs::remove_file(&p).unwrap();
    let newer = bind_exclusive(&p).unwrap();
    file.remove();
    assert!(p.exists(), "a newer daemon's socket was removed");
    newer.file.remove();
    assert!(!p.exists());

    let f = dir.path().join("file");
    std::fs::write(&f, b"keep me").unwrap();
    assert!(matches!(
        bind_exclusive(&f),
        Err(ListenError::NotASocket(_))
    ));
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
}

#[test]
fn an_inherited_fd_must_be_a_listening_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.sock");
    let fd = UnixListener::bind(&p).unwrap().into_raw_fd();
    // SAFETY: fd was just released by its owner.
    let l = unsafe { listen::from_fd(fd) }.unwrap();
    assert_eq!(l.as_raw_fd(), fd);
    // SAFETY: F_GETFD on an open fd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert_ne!(flags & libc::FD_CLOEXEC, 0, "made close-on-exec");
    drop(l);

    let (a, _b) = UnixStream::pair().unwrap();
    let fd = a.into_raw_fd();
    // SAFETY: as above; on failure the fd is not taken.
    assert!(matches!(
        unsafe { listen::from_fd(fd) },
        Err(ListenError::BadFd { .. })
    ));
    // SAFETY: still ours after the refusal.
    unsafe { libc::close(fd) };

    let file = std::fs::File::create(dir.path().join("f")).unwrap();
    let fd = file.as_raw_fd();
    // SAFETY: refused before ownership is taken, so `file` still owns it.
    assert!(matches!(
        unsafe { listen::from_fd(fd) },
        Err(ListenError::BadFd { .. })
    ));
}

#[test]
fn listen_env_is_for_this_pid_only() {
    assert_eq!(listen_fds(None, None, 7).unwrap(), None);
    assert_eq!(listen_fds(Some("7"), Some("1"), 7).unwrap(), Some(1));
    assert_eq!(listen_fds(Some("8"), Some("1"), 7).unwrap(), None);
    assert!(listen_fds(Some("x"), Some("1"), 7).is_err());
    assert!(listen_fds(Some("7"), Some("-1"), 7).is_err());
}

const CHILD: &str = "VSNAP_LISTEN_TEST_CHILD";

/// Run as a child by the test below, with fd 3 and LISTEN_* set the way systemd does; a no-op
/// otherwise.
#[test]
fn systemd_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let l = listen::from_systemd().unwrap().expect("activated");
    assert!(std::env::var_os("LISTEN_FDS").is_none(), "env cleared");
    assert!(listen::from_systemd().unwrap().is_none(), "taken once");
    let (mut s, _) = l.accept().unwrap();
    s.write_all(b"ok").unwrap();
}

#[test]
fn systemd_socket_activation_passes_the_socket_as_fd_3() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.sock");
    let l = UnixListener::bind(&p).unwrap();
    let fd = l.as_raw_fd();
    let exe = std::env::current_exe().unwrap();
    // `sh` sets LISTEN_PID to its own pid, which `exec` hands on, as systemd does after fork.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --exact systemd_child --nocapture")
        .arg(&exe)
        .env(CHILD, "1");
    // SAFETY: dup2 and fcntl are async-signal-safe; fd stays open in the parent until the
    // child runs.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec, so clear it in that case.
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
    let mut child = cmd.spawn().unwrap();
    let mut c = UnixStream::connect(&p).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(got, b"ok");
}

#[test]
fn the_socket_group_gets_the_socket_and_it_is_still_ours_to_remove() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let mut b = listen::bind_exclusive(&path).unwrap();
    // SAFETY: plain syscall.
    let gid = unsafe { libc::getegid() };
    b.set_group(&gid.to_string()).unwrap();
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!((m.gid(), m.mode() & 0o777), (gid, 0o660));
    if gid == 0 {
        b.set_group("root").unwrap();
    }
    assert!(b.set_group("no-such-group-vsnap").is_err());
    let (_l, file) = b.into_parts();
    file.remove();
    assert!(!path.exists(), "the regrouped socket was not removed");
}
