//! The system calls of the passthrough file system, each in one thin wrapper (virtiofsd's
//! `oslib.rs` is the model): the rest of the crate has no `unsafe`.
//!
//! Two types carry the sandbox rules into the signatures:
//! - [`Name`]: one path component the guest named, checked once by [`Name::new`] (not empty, not
//!   `.` or `..`, no `/`). Every `*at` wrapper takes a `Name`, so no guest string can reach a
//!   system call as a path without that check; the compiler enforces it.
//! - [`InodeAt`]: how a path-based call reaches an inode the store holds (its workdir link, not
//!   followed, or its `/proc/self/fd` entry, which must be followed).
//!
//! Every open adds `O_CLOEXEC` and `O_NOFOLLOW`: the guest resolves symlinks itself, in its own
//! namespace, so no host symlink is ever followed on its behalf.

use std::ffi::{CStr, CString};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// An errno for a FUSE reply. `?` turns an [`io::Error`] into one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> Self {
        io::Error::from_raw_os_error(e.0)
    }
}

impl From<std::collections::TryReserveError> for Errno {
    fn from(_: std::collections::TryReserveError) -> Self {
        Errno(libc::ENOMEM)
    }
}

/// The result of a file system operation.
pub type Res<T> = Result<T, Errno>;

/// One path component named by the guest: not empty, not `.` or `..`, without `/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Name<'a>(&'a CStr);

impl<'a> Name<'a> {
    /// The only constructor: refuses (EINVAL) anything that is not a single component.
    pub fn new(s: &'a CStr) -> Result<Self, Errno> {
        let b = s.to_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
            return Err(Errno(libc::EINVAL));
        }
        Ok(Name(s))
    }

    pub fn as_c_str(&self) -> &'a CStr {
        self.0
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.0.to_bytes()
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

fn cvt_long(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Takes ownership of an fd a system call just returned.
fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: called only on a non-negative fd fresh from the kernel, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

// ---- /proc/self/fd ------------------------------------------------------------------------

static PROC_SELF_FD: OnceLock<OwnedFd> = OnceLock::new();

/// Opens `/proc/self/fd` once, before any sandbox hides `/proc` and after any fork (the
/// directory is that of the process that opens it): fd-held inodes are re-opened through it.
pub fn init_proc() -> io::Result<()> {
    if PROC_SELF_FD.get().is_none() {
        let fd = open_abs(c"/proc/self/fd", libc::O_PATH | libc::O_DIRECTORY)?;
        let _ = PROC_SELF_FD.set(fd);
    }
    Ok(())
}

fn proc_dir() -> BorrowedFd<'static> {
    PROC_SELF_FD
        .get()
        .expect("init_proc() runs before the file system is served")
        .as_fd()
}

fn fd_name(fd: RawFd) -> CString {
    CString::new(fd.to_string()).expect("no NUL in a number")
}

/// Opens the inode behind `fd` (an `O_PATH` fd) anew with `flags`, through its
/// `/proc/self/fd` entry. The caller has checked the inode's type: this follows the magic link.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let flags = flags & !libc::O_NOFOLLOW & !libc::O_CREAT;
    openat_raw(proc_dir(), &fd_name(fd.as_raw_fd()), flags, 0)
}

/// How path-based calls (chmod, chown, utimens, access, link) reach an inode: its workdir link
/// (not followed) or its `/proc/self/fd` entry (followed: the magic link is the inode).
pub struct InodeAt<'a> {
    dir: RawFd,
    name: CString,
    follow: bool,
    _fd: PhantomData<BorrowedFd<'a>>,
}

impl<'a> InodeAt<'a> {
    /// The inode's hard link `name` in the directory `dir` (the workdir).
    pub fn link(dir: BorrowedFd<'a>, name: &CStr) -> Self {
        InodeAt {
            dir: dir.as_raw_fd(),
            name: name.to_owned(),
            follow: false,
            _fd: PhantomData,
        }
    }

    /// The inode behind the `O_PATH` fd `fd`, which must outlive the calls.
    pub fn proc(fd: BorrowedFd<'a>) -> Self {
        InodeAt {
            dir: proc_dir().as_raw_fd(),
            name: fd_name(fd.as_raw_fd()),
            follow: true,
            _fd: PhantomData,
        }
    }

    /// Whether calls through this path follow a link: a symlink inode must not be passed to
    /// calls that cannot act on the link itself.
    pub fn follows(&self) -> bool {
        self.follow
    }

    fn nofollow(&self) -> libc::c_int {
        if self.follow {
            0
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        }
    }

    pub fn chmod(&self, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: valid dirfd and C string. fchmodat takes no AT_SYMLINK_NOFOLLOW; callers never
        // pass symlink inodes.
        cvt(unsafe { libc::fchmodat(self.dir, self.name.as_ptr(), mode, 0) }).map(drop)
    }

    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::fchownat(self.dir, self.name.as_ptr(), uid, gid, self.nofollow()) })
            .map(drop)
    }

    pub fn utimens(&self, times: &[libc::timespec; 2]) -> io::Result<()> {
        // SAFETY: valid dirfd, C string and two timespecs.
        cvt(unsafe {
            libc::utimensat(
                self.dir,
                self.name.as_ptr(),
                times.as_ptr(),
                self.nofollow(),
            )
        })
        .map(drop)
    }

    pub fn access(&self, mask: libc::c_int) -> io::Result<()> {
        // SAFETY: valid dirfd and C string.
        cvt(unsafe { libc::faccessat(self.dir, self.name.as_ptr(), mask, 0) }).map(drop)
    }

    /// Links the inode as `name` in `dir`.
    pub fn link_to(&self, dir: BorrowedFd<'_>, name: Name<'_>) -> io::Result<()> {
        let flags = if self.follow {
            libc::AT_SYMLINK_FOLLOW
        } else {
            0
        };
        // SAFETY: valid dirfds and C strings.
        cvt(unsafe {
            libc::linkat(
                self.dir,
                self.name.as_ptr(),
                dir.as_raw_fd(),
                name.0.as_ptr(),
                flags,
            )
        })
        .map(drop)
    }
}

/// Whether `linkat(fd, "", .., AT_EMPTY_PATH)` was refused for want of CAP_DAC_READ_SEARCH:
/// then every link goes through `/proc/self/fd`.
static EMPTY_PATH_REFUSED: AtomicBool = AtomicBool::new(false);

/// Links the inode `fd` refers to (an `O_PATH` fd) as `name` in `dir`. With CAP_DAC_READ_SEARCH
/// (vsnap as root keeps it) this is `AT_EMPTY_PATH` on the fd itself: a third of the CPU of the
/// same link through the fd's `/proc/self/fd` entry, whose lookup dominates the call (3 against
/// 10 µs measured). Without it the kernel answers ENOENT, and the `/proc` path, which needs no
/// capability, is used from then on.
pub fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: Name<'_>) -> io::Result<()> {
    if !EMPTY_PATH_REFUSED.load(Ordering::Relaxed) {
        // SAFETY: valid fds and C strings.
        let r = cvt(unsafe {
            libc::linkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                dir.as_raw_fd(),
                name.0.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        });
        match r {
            Ok(_) => return Ok(()),
            // ENOENT is also a file deleted meanwhile: only a `/proc` link that then works
            // says the capability is missing.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                InodeAt::proc(fd).link_to(dir, name)?;
                EMPTY_PATH_REFUSED.store(true, Ordering::Relaxed);
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    InodeAt::proc(fd).link_to(dir, name)
}

// ---- opening ------------------------------------------------------------------------------

/// Opens an operator-given absolute path (the share, the workdir's parent): never a guest name.
pub fn open_abs(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the returned fd is taken over at once.
    cvt(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) }).map(owned)
}

/// The one `openat` wrapper: `name` is a checked [`Name`], a constant of ours (`.`) or an
/// fd number in `/proc/self/fd`.
fn openat_raw(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid dirfd and C string; the returned fd is taken over at once.
    cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })
    .map(owned)
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn openat(
    dir: BorrowedFd<'_>,
    name: Name<'_>,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    openat_raw(dir, name.0, flags | libc::O_NOFOLLOW, mode)
}

/// An `O_PATH` fd for `name` in `dir`, not following a symlink: opens nothing, never blocks.
pub fn open_path(dir: BorrowedFd<'_>, name: Name<'_>) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH, 0)
}

/// An unnamed regular file in the directory `dir` (`O_TMPFILE`).
pub fn open_tmpfile(
    dir: BorrowedFd<'_>,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    openat_raw(dir, c".", flags | libc::O_TMPFILE, mode)
}

// ---- attributes ---------------------------------------------------------------------------

fn stat_at(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: valid C string and out pointer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so the struct is initialised.
    Ok(unsafe { st.assume_init() })
}

/// The attributes of the inode behind `fd` (any fd, `O_PATH` included; a symlink's own).
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    stat_at(
        fd.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
    )
}

/// The attributes of `name` in `dir`, not following a symlink.
pub fn fstatat(dir: BorrowedFd<'_>, name: Name<'_>) -> io::Result<libc::stat> {
    stat_at(dir.as_raw_fd(), name.0, libc::AT_SYMLINK_NOFOLLOW)
}

/// The mount id of `fd` (statx, Linux 5.8+); `None` where the kernel cannot tell.
pub fn mnt_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: valid fd, empty C string and out pointer.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    // SAFETY: the buffer was zeroed, so it is initialised whether or not statx filled it.
    let stx = unsafe { stx.assume_init() };
    (r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: valid fd and out pointer.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), s.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded.
    Ok(unsafe { s.assume_init() })
}

/// The target of the symlink behind `fd` (an `O_PATH` fd of the link).
pub fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: valid fd, C string and a buffer of the given length.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

// ---- the namespace ------------------------------------------------------------------------

pub fn mkdirat(dir: BorrowedFd<'_>, name: Name<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid dirfd and C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.0.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(
    dir: BorrowedFd<'_>,
    name: Name<'_>,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid dirfd and C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.0.as_ptr(), mode, rdev) }).map(drop)
}

/// Creates the symlink `name` in `dir` pointing at `target` (any bytes: the guest resolves it).
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: Name<'_>) -> io::Result<()> {
    // SAFETY: valid dirfd and C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.0.as_ptr()) }).map(drop)
}

/// `unlinkat`: never follows a link (it removes the name itself).
pub fn unlinkat(dir: BorrowedFd<'_>, name: Name<'_>, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid dirfd and C string.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.0.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: Name<'_>,
    new_dir: BorrowedFd<'_>,
    new: Name<'_>,
    flags: libc::c_uint,
) -> io::Result<()> {
    // SAFETY: valid dirfds and C strings.
    cvt(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.0.as_ptr(),
            new_dir.as_raw_fd(),
            new.0.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

// ---- directory listing --------------------------------------------------------------------

/// One `linux_dirent64` record.
#[derive(Debug)]
pub struct Dirent<'a> {
    pub ino: u64,
    /// The cookie of the next entry.
    pub off: u64,
    pub typ: u8,
    pub name: &'a CStr,
}

/// Repositions a directory fd at a cookie from an earlier [`Dirent::off`] (0: the start).
pub fn seekdir(fd: BorrowedFd<'_>, cookie: u64) -> io::Result<()> {
    // SAFETY: valid fd.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), cookie as libc::off_t, libc::SEEK_SET) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the next batch of entries of the directory `fd` into `buf`; empty at the end.
pub fn getdents<'b>(fd: BorrowedFd<'_>, buf: &'b mut [u8]) -> io::Result<Dirents<'b>> {
    // SAFETY: valid fd and buffer of the given length.
    let n = cvt_long(unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    })?;
    Ok(Dirents {
        rest: &buf[..n as usize],
    })
}

/// The records of one `getdents64` batch.
pub struct Dirents<'b> {
    rest: &'b [u8],
}

impl Dirents<'_> {
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

impl<'b> Iterator for Dirents<'b> {
    type Item = io::Result<Dirent<'b>>;

    fn next(&mut self) -> Option<Self::Item> {
        // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name (NUL-terminated).
        const FIXED: usize = 19;
        if self.rest.is_empty() {
            return None;
        }
        let r = self.rest;
        let reclen = r
            .get(16..18)
            .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]) as usize);
        if reclen <= FIXED || reclen > r.len() {
            self.rest = &[];
            return Some(Err(io::Error::from_raw_os_error(libc::EIO)));
        }
        let (rec, rest) = r.split_at(reclen);
        self.rest = rest;
        let u64_at = |i: usize| u64::from_ne_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
        let Ok(name) = CStr::from_bytes_until_nul(&rec[FIXED..]) else {
            return Some(Err(io::Error::from_raw_os_error(libc::EIO)));
        };
        Some(Ok(Dirent {
            ino: u64_at(0),
            off: u64_at(8),
            typ: rec[18],
            name,
        }))
    }
}

// ---- file handles -------------------------------------------------------------------------

const MAX_HANDLE_SZ: usize = 128;

/// The opaque part of a `struct file_handle`: it names an inode and its generation, so an inode
/// number the file system reused is a different handle.
#[derive(Debug, PartialEq, Eq)]
pub struct FileHandle {
    typ: i32,
    bytes: Box<[u8]>,
}

/// `struct file_handle` with room for the largest handle, aligned as the kernel expects.
#[repr(C)]
struct RawHandle {
    bytes: u32,
    typ: i32,
    data: [u8; MAX_HANDLE_SZ],
}

/// The handle and mount id of the inode behind `fd`.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(FileHandle, i32)> {
    handle_at(fd, c"", libc::AT_EMPTY_PATH)
}

/// The file handle and mount id of `name` in `dir`, without opening it (a symlink is not
/// followed: it has a handle of its own).
pub fn name_to_handle_at(dir: BorrowedFd<'_>, name: Name<'_>) -> io::Result<(FileHandle, i32)> {
    handle_at(dir, name.as_c_str(), 0)
}

fn handle_at(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
) -> io::Result<(FileHandle, i32)> {
    let mut h = RawHandle {
        bytes: MAX_HANDLE_SZ as u32,
        typ: 0,
        data: [0; MAX_HANDLE_SZ],
    };
    let mut mnt = 0;
    // SAFETY: valid fd, a NUL-terminated C string, a buffer of MAX_HANDLE_SZ bytes as declared.
    cvt(unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            path.as_ptr(),
            (&raw mut h).cast(),
            &mut mnt,
            flags,
        )
    })?;
    let n = (h.bytes as usize).min(MAX_HANDLE_SZ);
    Ok((
        FileHandle {
            typ: h.typ,
            bytes: h.data[..n].into(),
        },
        mnt,
    ))
}

/// Opens the inode of `fh` on the mount of `mount_fd` (needs CAP_DAC_READ_SEARCH).
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    fh: &FileHandle,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    let mut h = RawHandle {
        bytes: fh.bytes.len() as u32,
        typ: fh.typ,
        data: [0; MAX_HANDLE_SZ],
    };
    h.data[..fh.bytes.len()].copy_from_slice(&fh.bytes);
    // SAFETY: a handle from name_to_handle_at; the returned fd is taken over at once.
    cvt(unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            (&raw mut h).cast(),
            flags | libc::O_CLOEXEC,
        )
    })
    .map(owned)
}

// ---- data ---------------------------------------------------------------------------------

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: valid fd and buffer of the given length.
    cvt_size(unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: valid fd and buffer of the given length.
    cvt_size(unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            off as libc::off_t,
        )
    })
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: valid fd.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: valid fd; the kernel checks mode and range.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
        .map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, off: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: valid fd; the kernel checks whence.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
    u64::try_from(r).map_err(|_| io::Error::last_os_error())
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: usize,
    flags: u32,
) -> io::Result<usize> {
    let (mut i, mut o) = (off_in as libc::loff_t, off_out as libc::loff_t);
    // SAFETY: valid fds and offset pointers.
    cvt_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut i,
            fd_out.as_raw_fd(),
            &mut o,
            len,
            flags,
        )
    })
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

// ---- extended attributes ------------------------------------------------------------------

/// `fgetxattr` (`name`) or `flistxattr` (`None`); an empty `buf` asks for the size.
pub fn fgetxattr(fd: BorrowedFd<'_>, name: Option<&CStr>, buf: &mut [u8]) -> io::Result<usize> {
    let ptr = if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr()
    };
    // SAFETY: valid fd and C string; ptr is null with length 0 or a buffer of buf.len() bytes.
    cvt_size(unsafe {
        match name {
            Some(n) => libc::fgetxattr(fd.as_raw_fd(), n.as_ptr(), ptr.cast(), buf.len()),
            None => libc::flistxattr(fd.as_raw_fd(), ptr.cast(), buf.len()),
        }
    })
}

pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: valid fd, C string and buffer.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn fremovexattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and C string.
    cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }).map(drop)
}

// ---- credentials --------------------------------------------------------------------------

pub fn geteuid() -> u32 {
    // SAFETY: plain syscall without arguments.
    unsafe { libc::geteuid() }
}

/// Sets the file system uid and gid of the calling thread only (the kernel keeps them per
/// thread; glibc does not broadcast these two). Switching away from uid 0 drops the file system
/// capabilities from the thread's effective set, so the host checks permissions as the caller.
pub fn set_fs_ids(uid: u32, gid: u32) {
    // SAFETY: plain syscalls on this thread's credentials.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
}

/// Sets the supplementary groups of the calling thread only: the raw system call, not glibc's
/// `setgroups`, which would change every thread of the process.
pub fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: a valid array of groups.len() gids.
    cvt_long(unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) }).map(drop)
}

/// Sets the process umask (the guest applies its own before a mode reaches us).
pub fn umask(mask: libc::mode_t) {
    // SAFETY: plain syscall.
    unsafe { libc::umask(mask) };
}
