//! Thin wrappers over the `*at` system calls the file system uses, returning `io::Result`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn fstatat(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid C string and out pointer.
    cvt(unsafe { libc::fstatat(dirfd, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so the struct is initialised.
    Ok(unsafe { st.assume_init() })
}

pub fn openat(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the returned fd is owned by the caller.
    let fd = cvt(unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fd was just returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

static PROC_SELF_FD: OnceLock<OwnedFd> = OnceLock::new();

/// Opens `/proc/self/fd` once, before any sandbox hides `/proc`: fd-held inodes are reached by
/// path-based calls through it (`openat(proc, "N")` re-opens the inode behind fd N).
pub fn init_proc() -> io::Result<()> {
    if PROC_SELF_FD.get().is_none() {
        let fd = openat(
            libc::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
        )?;
        let _ = PROC_SELF_FD.set(fd);
    }
    Ok(())
}

fn proc_dir() -> RawFd {
    PROC_SELF_FD
        .get()
        .map(AsRawFd::as_raw_fd)
        .expect("init_proc() runs before the file system is served")
}

/// (dirfd, name) reaching the inode behind `fd` for `*at` calls (which must follow the magic
/// link: no `AT_SYMLINK_NOFOLLOW`).
pub fn via_proc(fd: RawFd) -> (RawFd, CString) {
    (
        proc_dir(),
        CString::new(fd.to_string()).expect("no NUL in a number"),
    )
}

/// Whether `dirfd` is the `/proc/self/fd` directory of [`via_proc`].
pub fn is_proc(dirfd: RawFd) -> bool {
    PROC_SELF_FD.get().is_some_and(|p| p.as_raw_fd() == dirfd)
}

/// `openat` with a creation mode.
pub fn openat_mode(
    dirfd: RawFd,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the returned fd is owned by the caller.
    let fd = cvt(unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: fd was just returned by openat.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn cvt_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
