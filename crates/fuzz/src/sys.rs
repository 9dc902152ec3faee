//! The few system calls the harnesses make themselves, each in a thin wrapper.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Caps the size of any file this process writes (RLIMIT_FSIZE) and makes crossing the cap an
/// `EFBIG` error instead of a SIGXFSZ that kills the process.
pub fn limit_file_size(bytes: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; only this process's limit changes.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) })?;
    // SAFETY: SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The NUL-separated names of `path`'s extended attributes (not following a symlink).
pub fn list_xattrs(path: &Path) -> io::Result<Vec<u8>> {
    let c = c_path(path)?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C string and a buffer of the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        // A file system without xattrs has none.
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(Vec::new()),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Removes every extended attribute of `path` itself (not following a symlink).
pub fn clear_xattrs(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    for name in list_xattrs(path)?.split_inclusive(|&b| b == 0) {
        let name = CStr::from_bytes_with_nul(name).map_err(io::Error::other)?;
        // SAFETY: valid C strings.
        cvt(unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) })?;
    }
    Ok(())
}

/// Sets an extended attribute of `path` itself.
#[cfg(test)]
pub fn set_xattr(path: &Path, name: &CStr, value: &[u8]) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: valid C strings and a value of the length passed.
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

pub fn is_root() -> bool {
    // SAFETY: a plain syscall without arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Drops CAP_MKNOD from this thread's effective and permitted sets, for good (capabilities are
/// per thread on Linux; `setfsuid(0)` re-raises only what is still permitted).
pub fn drop_mknod_on_this_thread() -> io::Result<()> {
    use caps::{CapSet, Capability};
    for set in [CapSet::Effective, CapSet::Permitted] {
        caps::drop(None, set, Capability::CAP_MKNOD).map_err(io::Error::other)?;
    }
    Ok(())
}

/// Sends `buf` on a socket without raising SIGPIPE when the peer has gone (libFuzzer's main is
/// not Rust's, so SIGPIPE is not ignored there). Returns the bytes sent.
pub fn send_nosignal(fd: &impl std::os::fd::AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: a valid fd and a buffer of the length passed.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
