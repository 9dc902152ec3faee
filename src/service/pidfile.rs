//! `--pidfile PATH`: the daemon's pid, in a file that two daemons cannot share.
//!
//! The file is the lock: it is opened (created if missing) and `flock`ed before the daemon binds
//! anything, so a second daemon naming the same file stops at once with the first one's pid. A
//! file left by a daemon that died holds no lock and is simply taken over; no pid is ever
//! probed, so pid reuse cannot make a stale file look alive. The pid is written once the daemon
//! is ready to serve ([`Pidfile::write_pid`]); after that only a read-only descriptor stays open,
//! so a daemon compromised later (the guest is hostile) cannot rewrite the file through it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {path}: held by the running daemon {pid}")]
    Held { path: PathBuf, pid: String },
    #[error("pidfile {0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("pidfile {0}: replaced by another process each time it was locked")]
    Unstable(PathBuf),
    #[error("pidfile {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A locked pidfile. Dropping it closes it without removing it (what a forked child that must
/// not keep the host's file open does); [`Pidfile::remove`] is the clean exit.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    /// Read-only; the `flock` lives on its open file description.
    lock: File,
    /// Until the pid is written.
    writer: Option<File>,
    id: (u64, u64),
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// `flock(LOCK_EX | LOCK_NB)`: false when another open file description holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on an fd we own; no pointers.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(e)
}

impl Pidfile {
    /// Opens and locks `path`, creating it (mode 0644) if missing, and empties a stale one. A
    /// symlink, directory, FIFO or other non-regular file is refused, never followed or opened
    /// for real I/O.
    pub fn lock(path: &Path) -> Result<Self, PidfileError> {
        let io_err = |what| {
            move |source| PidfileError::Io {
                path: path.to_owned(),
                what,
                source,
            }
        };
        // A daemon that exits between our open and our lock unlinks the file we hold: the lock
        // is then on a file nobody else can find, so look again.
        for _ in 0..3 {
            // Not even opened when it is something else (a device node would be, by open).
            match std::fs::symlink_metadata(path) {
                Ok(m) if !m.file_type().is_file() => {
                    return Err(PidfileError::NotAFile(path.to_owned()))
                }
                _ => {}
            }
            // O_NONBLOCK: opening a FIFO planted there must not wait for a reader.
            let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
            let writer = OpenOptions::new()
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(flags)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::ENXIO) | Some(libc::EISDIR) => {
                        PidfileError::NotAFile(path.to_owned())
                    }
                    _ => io_err("open")(e),
                })?;
            let meta = writer.metadata().map_err(io_err("stat"))?;
            if !meta.file_type().is_file() {
                return Err(PidfileError::NotAFile(path.to_owned()));
            }
            let mut lock = OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(path)
                .map_err(io_err("open read-only"))?;
            let id = file_id(&meta);
            if file_id(&lock.metadata().map_err(io_err("stat"))?) != id {
                continue;
            }
            if !try_lock(&lock).map_err(io_err("lock"))? {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let pid = match pid.trim() {
                    "" => "(starting, no pid yet)".to_string(),
                    p => p.chars().take(32).collect(),
                };
                return Err(PidfileError::Held {
                    path: path.to_owned(),
                    pid,
                });
            }
            let now = std::fs::symlink_metadata(path).map_err(io_err("stat"))?;
            if file_id(&now) != id {
                continue;
            }
            // Whatever a dead daemon left must not be read as our pid while we start.
            writer.set_len(0).map_err(io_err("truncate"))?;
            return Ok(Pidfile {
                path: path.to_owned(),
                lock,
                writer: Some(writer),
                id,
            });
        }
        Err(PidfileError::Unstable(path.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `pid` and closes the writable descriptor. Once only.
    pub fn write_pid(&mut self, pid: u32) -> Result<(), PidfileError> {
        let path = self.path.clone();
        let io_err = |what| {
            let path = path.clone();
            move |source| PidfileError::Io { path, what, source }
        };
        let Some(mut w) = self.writer.take() else {
            return Err(io_err("write")(io::Error::other(
                "the pid was already written",
            )));
        };
        w.set_len(0).map_err(io_err("truncate"))?;
        w.rewind().map_err(io_err("seek"))?;
        w.write_all(format!("{pid}\n").as_bytes())
            .map_err(io_err("write"))?;
        Ok(())
    }

    /// Removes the file if it is still ours, then lets the lock go.
    pub fn remove(self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| file_id(&m) == self.id);
        if !ours {
            return;
        }
        // unlinkat, not std's unlink: `vsnap fs` removes it under a seccomp filter that allows
        // only the *at calls.
        if let Ok(c) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a valid C string; no other pointers.
            unsafe { libc::unlinkat(libc::AT_FDCWD, c.as_ptr(), 0) };
        }
        drop(self.lock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_refused_while_held_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.pid");
        let mut a = Pidfile::lock(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        match Pidfile::lock(&p) {
            Err(PidfileError::Held { pid, .. }) => assert!(pid.contains("starting"), "{pid}"),
            r => panic!("{r:?}"),
        }
        a.write_pid(4242).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "4242\n");
        assert!(a.write_pid(1).is_err());
        match Pidfile::lock(&p) {
            Err(PidfileError::Held { pid, .. }) => assert_eq!(pid, "4242"),
            r => panic!("{r:?}"),
        }
        a.remove();
        assert!(!p.exists());
        // Free again.
        Pidfile::lock(&p).unwrap().remove();
    }

    #[test]
    fn a_stale_file_is_taken_over_and_emptied() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.pid");
        std::fs::write(&p, "999999\n").unwrap();
        let mut a = Pidfile::lock(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        a.write_pid(7).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "7\n");
        // Closing without removing (a forked child's copy) leaves the file; its lock goes with
        // the last descriptor.
        drop(a);
        assert!(p.exists());
        Pidfile::lock(&p).unwrap();
    }

    #[test]
    fn a_replaced_file_is_not_removed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.pid");
        let a = Pidfile::lock(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, "someone else's").unwrap();
        a.remove();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "someone else's");
    }

    #[test]
    fn only_regular_files() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        let link = d.path().join("link.pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            Pidfile::lock(&link),
            Err(PidfileError::NotAFile(_))
        ));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert!(matches!(
            Pidfile::lock(d.path()),
            Err(PidfileError::NotAFile(_))
        ));
        let fifo = CString::new(d.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(matches!(
            Pidfile::lock(&d.path().join("fifo")),
            Err(PidfileError::NotAFile(_))
        ));
        assert!(matches!(
            Pidfile::lock(&d.path().join("no/such/dir.pid")),
            Err(PidfileError::Io { .. })
        ));
    }
}
