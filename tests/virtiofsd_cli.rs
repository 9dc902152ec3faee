//! `vsnap-virtiofsd` started as libvirt 9 starts virtiofsd: the `-o` command line, the
//! capabilities query, refused options, and a share served over the socket it names.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vsnap_frontend::fs::Fuse;

const BIN: &str = env!("CARGO_BIN_EXE_vsnap-virtiofsd");

fn wait_for(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn print_capabilities_is_the_vhost_user_json() {
    let out = Command::new(BIN)
        .args(["--print-capabilities", "--socket-path=/nonexistent/x"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["type"], "fs");
    assert!(v["features"].is_array());
}

#[test]
fn security_relevant_options_it_cannot_honour_are_refused() {
    for args in [
        &[
            "--socket-path=/tmp/x",
            "--shared-dir=/tmp",
            "--uid-map=:0:1000:1:",
        ][..],
        &["--fd=3", "-o", "source=/tmp,xattrmap=:ok:all:::"],
        &["--socket-path=/tmp/x", "--shared-dir=/tmp", "--posix-acl"],
        &[
            "--socket-path=/tmp/x",
            "--shared-dir=/tmp",
            "--no-such-option",
        ],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{args:?}: {err}");
    }
}

#[test]
fn serves_a_share_from_libvirts_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share,with,commas");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), b"from the host").unwrap();
    let sock = dir.path().join("fs.sock");
    // libvirt doubles the commas of a path inside -o.
    let source = share.to_str().unwrap().replace(',', ",,");
    let mut child = Command::new(BIN)
        .arg(format!("--socket-path={}", sock.display()))
        .args([
            "-o",
            &format!("source={source},cache=always,xattr,flock,posix_lock,sandbox=none"),
            "--thread-pool-size=2",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let mut f = Fuse::connect(&sock).unwrap();
    f.init().unwrap();
    let node = f.lookup(1, "hello").unwrap();
    let fh = f.open(node, libc::O_RDONLY as u32).unwrap();
    assert_eq!(f.read_bytes(node, fh, 0, 64).unwrap(), b"from the host");
    // Like virtiofsd, it exits once the frontend has gone (libvirt waits for that).
    drop(f);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("vsnap-virtiofsd still running 10 s after its frontend left");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(!sock.exists(), "the socket file is removed");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    // The lock options are accepted with a warning saying what vsnap does instead.
    assert!(err.contains("-o flock: accepted"), "{err}");
    assert!(err.contains("-o posix_lock: accepted"), "{err}");
}
