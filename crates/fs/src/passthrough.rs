//! The file system the guest sees: the shared directory, passed through operation by operation.
//!
//! The sandbox is structural. Every path operation is one `*at` call on a single validated name
//! (no `/`, not empty, not `.` or `..`) relative to a directory the guest already holds, with
//! `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`: the guest resolves symlinks itself, in its own namespace,
//! so no host symlink is ever followed. Symlink inodes are never passed to a call that would
//! follow them. Special files are never opened. The workdir, when it lies inside the share, is
//! hidden: not listed, not found, not replaceable.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use zerocopy::IntoBytes;

use crate::abi::*;
use crate::inode_store::{Inode, InodeKey, InodeStore, StoreError, StoreMode, ROOT_ID};
use crate::sys::{cvt, cvt_size, is_proc, openat, openat_mode, via_proc};

/// An errno for the reply.
pub type Errno = i32;
pub type Res<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn store_errno(e: StoreError) -> Errno {
    match e {
        StoreError::UnknownNode(_) => libc::ENOENT,
        StoreError::Io(e) => errno(e),
        StoreError::Workdir { source, .. } => errno(source),
    }
}

/// How long the guest may cache entries and attributes, and how files are opened (virtiofsd's
/// `--cache` modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// No caching: timeouts 0, files opened with direct I/O.
    Never,
    /// Metadata cached for a day, file data not cached.
    Metadata,
    /// Close-to-open: timeouts of 1 s, the page cache revalidated on open.
    Auto,
    /// Everything cached for a day, the page cache kept across opens.
    Always,
}

impl CacheMode {
    pub fn timeout(self) -> Duration {
        match self {
            CacheMode::Never => Duration::ZERO,
            CacheMode::Auto => Duration::from_secs(1),
            CacheMode::Metadata | CacheMode::Always => Duration::from_secs(86400),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FsConfig {
    pub cache: CacheMode,
    pub xattr: bool,
    /// Negotiate the guest's writeback cache (virtiofsd's `--writeback`).
    pub writeback: bool,
    pub readdirplus: bool,
    /// Keep `O_DIRECT` on open (virtiofsd strips it unless `--allow-direct-io`).
    pub allow_direct_io: bool,
    pub inode_store: StoreMode,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            cache: CacheMode::Auto,
            xattr: false,
            writeback: false,
            readdirplus: true,
            allow_direct_io: false,
            inode_store: StoreMode::Workdir,
        }
    }
}

/// The caller's identity, from the request header.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// An open file or directory of the guest.
struct FileHandle {
    fd: OwnedFd,
    inode: u64,
    /// Serialises seek + getdents on a directory.
    dir: Mutex<()>,
}

/// Counts for stats and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsCounts {
    pub inodes: usize,
    pub links: usize,
    pub dir_handles: usize,
    pub inode_fds: usize,
    pub handles: usize,
}

pub struct Passthrough {
    store: InodeStore,
    cfg: FsConfig,
    handles: RwLock<HashMap<u64, Arc<FileHandle>>>,
    next_fh: AtomicU64,
    /// The workdir's parent directory and name, when the workdir lies inside the share.
    hidden: Option<(InodeKey, CString)>,
    /// Running as root: creations take the caller's fsuid/fsgid.
    switch_creds: bool,
}

/// While alive, the thread creates files as the caller (fsuid/fsgid are per thread).
struct AsCaller(bool);

impl AsCaller {
    fn new(on: bool, c: Caller) -> Self {
        if on {
            // SAFETY: plain syscalls on this thread's credentials.
            unsafe {
                libc::setfsgid(c.gid);
                libc::setfsuid(c.uid);
            }
        }
        AsCaller(on)
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: restores root's fsuid/fsgid on this thread.
            unsafe {
                libc::setfsuid(0);
                libc::setfsgid(0);
            }
        }
    }
}

fn check_name(name: &CStr) -> Res<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

pub fn attr(st: &libc::stat) -> Attr {
    Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

impl Passthrough {
    /// Serves `shared_dir`, holding inodes through `workdir` (which must be on the same file
    /// system for links to work; elsewhere every inode falls back to an fd).
    pub fn new(shared_dir: &Path, workdir: &Path, cfg: FsConfig) -> Result<Self, StoreError> {
        let c = CString::new(shared_dir.as_os_str().as_encoded_bytes())
            .map_err(|e| StoreError::Io(io::Error::other(e)))?;
        let root = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY)?;
        let store = InodeStore::with_mode(workdir, root, cfg.inode_store)?;
        // Modes arrive with the guest's umask applied; ours must not mask them again.
        // SAFETY: plain syscall.
        unsafe { libc::umask(0) };
        let hidden = match (workdir.parent(), workdir.file_name()) {
            (Some(parent), Some(name)) => std::fs::metadata(parent).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (
                    (m.dev(), m.ino()),
                    CString::new(name.as_encoded_bytes()).expect("path without NUL"),
                )
            }),
            _ => None,
        };
        Ok(Passthrough {
            store,
            cfg,
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            hidden,
            // SAFETY: plain syscall.
            switch_creds: unsafe { libc::geteuid() } == 0,
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn counts(&self) -> FsCounts {
        let s = self.store.counts();
        FsCounts {
            inodes: s.inodes,
            links: s.links,
            dir_handles: s.handles,
            inode_fds: s.fds,
            handles: self
                .handles
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
        }
    }

    /// Drops every inode and open file (the guest re-initialised or went away).
    pub fn reset(&self) {
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.store.clear();
    }

    fn inode(&self, id: u64) -> Res<Arc<Inode>> {
        self.store.get(id).map_err(store_errno)
    }

    fn handle(&self, fh: u64) -> Res<Arc<FileHandle>> {
        self.handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh)
            .cloned()
            .ok_or(libc::EBADF)
    }

    fn add_handle(&self, fd: OwnedFd, inode: u64) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                fh,
                Arc::new(FileHandle {
                    fd,
                    inode,
                    dir: Mutex::new(()),
                }),
            );
        fh
    }

    fn is_hidden(&self, parent: &Inode, name: &CStr) -> bool {
        self.hidden
            .as_ref()
            .is_some_and(|(k, n)| *k == parent.key && n.as_c_str() == name)
    }

    /// A name the guest may create, remove or rename in `parent`.
    fn target(&self, parent: &Inode, name: &CStr) -> Res<()> {
        check_name(name)?;
        if self.is_hidden(parent, name) {
            return Err(libc::EACCES);
        }
        Ok(())
    }

    fn dir(&self, id: u64) -> Res<Arc<Inode>> {
        let i = self.inode(id)?;
        if !i.is_dir {
            return Err(libc::ENOTDIR);
        }
        Ok(i)
    }

    fn entry(&self, inode: &Inode, st: &libc::stat) -> EntryOut {
        let t = self.cfg.cache.timeout();
        EntryOut {
            nodeid: inode.id,
            generation: 0,
            entry_valid: t.as_secs(),
            attr_valid: t.as_secs(),
            entry_valid_nsec: t.subsec_nanos(),
            attr_valid_nsec: t.subsec_nanos(),
            attr: attr(st),
        }
    }

    fn attr_out(&self, st: &libc::stat) -> AttrOut {
        let t = self.cfg.cache.timeout();
        AttrOut {
            attr_valid: t.as_secs(),
            attr_valid_nsec: t.subsec_nanos(),
            dummy: 0,
            attr: attr(st),
        }
    }

    pub fn lookup(&self, parent: u64, name: &CStr) -> Res<EntryOut> {
        check_name(name)?;
        let p = self.dir(parent)?;
        if self.is_hidden(&p, name) {
            return Err(libc::ENOENT);
        }
        let (i, st) = self.store.lookup(&p, name).map_err(store_errno)?;
        Ok(self.entry(&i, &st))
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.store.forget(id, n);
    }

    pub fn batch_forget(&self, items: &[ForgetOne]) {
        for f in items {
            self.store.forget(f.nodeid, f.nlookup);
        }
    }

    pub fn getattr(&self, id: u64) -> Res<AttrOut> {
        let i = self.inode(id)?;
        let st = self.store.stat(&i).map_err(errno)?;
        Ok(self.attr_out(&st))
    }

    pub fn setattr(&self, id: u64, a: &SetattrIn) -> Res<AttrOut> {
        let i = self.inode(id)?;
        let fh = if a.valid & fattr::FH != 0 {
            Some(self.handle(a.fh)?)
        } else {
            None
        };
        let symlink = i.kind == libc::S_IFLNK;
        let (_keep, dirfd, name) = self.store.at_path(&i).map_err(errno)?;
        // Linked inodes are reached by their workdir name (not following: it may be a symlink);
        // the others through /proc/self/fd, which must be followed to reach the inode.
        let nofollow = if is_proc(dirfd) {
            0
        } else {
            libc::AT_SYMLINK_NOFOLLOW
        };
        if a.valid & fattr::MODE != 0 {
            if symlink {
                return Err(libc::EOPNOTSUPP);
            }
            // SAFETY: valid fds and C strings.
            cvt(match &fh {
                Some(h) => unsafe { libc::fchmod(h.fd.as_raw_fd(), a.mode & 0o7777) },
                None => unsafe { libc::fchmodat(dirfd, name.as_ptr(), a.mode & 0o7777, 0) },
            })
            .map_err(errno)?;
        }
        if a.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = if a.valid & fattr::UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & fattr::GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            if symlink && is_proc(dirfd) {
                return Err(libc::EOPNOTSUPP);
            }
            // SAFETY: valid fd and C string.
            cvt(unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, nofollow) })
                .map_err(errno)?;
        }
        if a.valid & fattr::SIZE != 0 {
            if i.kind != libc::S_IFREG {
                return Err(libc::EINVAL);
            }
            let opened;
            let fd = match &fh {
                Some(h) => h.fd.as_raw_fd(),
                None => {
                    opened = self.store.open(&i, libc::O_WRONLY).map_err(errno)?;
                    opened.as_raw_fd()
                }
            };
            // SAFETY: valid fd.
            cvt(unsafe { libc::ftruncate(fd, a.size as libc::off_t) }).map_err(errno)?;
        }
        if a.valid & (fattr::ATIME | fattr::MTIME) != 0 {
            let ts = |set: u32, now: u32, sec: u64, nsec: u32| libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: if a.valid & now != 0 {
                    libc::UTIME_NOW
                } else if a.valid & set != 0 {
                    libc::c_long::from(nsec)
                } else {
                    libc::UTIME_OMIT
                },
            };
            let times = [
                ts(fattr::ATIME, fattr::ATIME_NOW, a.atime, a.atimensec),
                ts(fattr::MTIME, fattr::MTIME_NOW, a.mtime, a.mtimensec),
            ];
            if symlink && is_proc(dirfd) {
                return Err(libc::EOPNOTSUPP);
            }
            // SAFETY: valid fd, C string and two timespecs.
            cvt(unsafe { libc::utimensat(dirfd, name.as_ptr(), times.as_ptr(), nofollow) })
                .map_err(errno)?;
        }
        let st = self.store.stat(&i).map_err(errno)?;
        Ok(self.attr_out(&st))
    }

    pub fn readlink(&self, id: u64) -> Res<Vec<u8>> {
        let i = self.inode(id)?;
        if i.kind != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        self.store.readlink(&i).map_err(errno)
    }

    /// Runs `make(parent_fd)` as the caller, then looks the new name up.
    fn make(
        &self,
        c: Caller,
        parent: u64,
        name: &CStr,
        make: impl FnOnce(RawFd) -> libc::c_int,
    ) -> Res<EntryOut> {
        let p = self.dir(parent)?;
        self.target(&p, name)?;
        let pfd = self.store.path_fd(&p).map_err(errno)?;
        {
            let _as = AsCaller::new(self.switch_creds, c);
            cvt(make(pfd.as_raw_fd())).map_err(errno)?;
        }
        let (i, st) = self.store.lookup(&p, name).map_err(store_errno)?;
        Ok(self.entry(&i, &st))
    }

    pub fn mkdir(&self, c: Caller, parent: u64, a: &MkdirIn, name: &CStr) -> Res<EntryOut> {
        // SAFETY: valid fd and C string.
        self.make(c, parent, name, |fd| unsafe {
            libc::mkdirat(fd, name.as_ptr(), a.mode & 0o7777)
        })
    }

    pub fn mknod(&self, c: Caller, parent: u64, a: &MknodIn, name: &CStr) -> Res<EntryOut> {
        // SAFETY: valid fd and C string.
        self.make(c, parent, name, |fd| unsafe {
            libc::mknodat(fd, name.as_ptr(), a.mode, libc::dev_t::from(a.rdev))
        })
    }

    pub fn symlink(&self, c: Caller, parent: u64, name: &CStr, target: &CStr) -> Res<EntryOut> {
        // SAFETY: valid fd and C strings.
        self.make(c, parent, name, |fd| unsafe {
            libc::symlinkat(target.as_ptr(), fd, name.as_ptr())
        })
    }

    pub fn link(&self, c: Caller, old: u64, parent: u64, name: &CStr) -> Res<EntryOut> {
        let o = self.inode(old)?;
        if o.is_dir {
            return Err(libc::EPERM);
        }
        let (_keep, odir, oname) = self.store.at_path(&o).map_err(errno)?;
        let follow = if is_proc(odir) {
            libc::AT_SYMLINK_FOLLOW
        } else {
            0
        };
        // SAFETY: valid fds and C strings.
        self.make(c, parent, name, |fd| unsafe {
            libc::linkat(odir, oname.as_ptr(), fd, name.as_ptr(), follow)
        })
    }

    fn remove(&self, parent: u64, name: &CStr, flags: libc::c_int) -> Res<()> {
        let p = self.dir(parent)?;
        self.target(&p, name)?;
        let pfd = self.store.path_fd(&p).map_err(errno)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::unlinkat(pfd.as_raw_fd(), name.as_ptr(), flags) }).map_err(errno)?;
        Ok(())
    }

    pub fn unlink(&self, parent: u64, name: &CStr) -> Res<()> {
        self.remove(parent, name, 0)
    }

    pub fn rmdir(&self, parent: u64, name: &CStr) -> Res<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    pub fn rename(&self, parent: u64, old: &CStr, newdir: u64, new: &CStr, flags: u32) -> Res<()> {
        let known = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT;
        if flags & !known != 0 {
            return Err(libc::EINVAL);
        }
        let (p, n) = (self.dir(parent)?, self.dir(newdir)?);
        self.target(&p, old)?;
        self.target(&n, new)?;
        let (pfd, nfd) = (
            self.store.path_fd(&p).map_err(errno)?,
            self.store.path_fd(&n).map_err(errno)?,
        );
        // SAFETY: valid fds and C strings.
        cvt(unsafe {
            libc::renameat2(
                pfd.as_raw_fd(),
                old.as_ptr(),
                nfd.as_raw_fd(),
                new.as_ptr(),
                flags,
            )
        })
        .map_err(errno)?;
        Ok(())
    }

    fn open_flags(&self, flags: u32) -> libc::c_int {
        let mut f = flags as libc::c_int
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOATIME);
        if !self.cfg.allow_direct_io {
            f &= !libc::O_DIRECT;
        }
        if self.cfg.writeback {
            // The guest's page cache reads to fill partial pages and handles O_APPEND itself.
            if f & libc::O_ACCMODE == libc::O_WRONLY {
                f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            f &= !libc::O_APPEND;
        }
        f
    }

    fn open_out(&self, fh: u64, dir: bool) -> OpenOut {
        let open_flags = match (self.cfg.cache, dir) {
            (CacheMode::Never, false) | (CacheMode::Metadata, false) => fopen::DIRECT_IO,
            (CacheMode::Always, false) => fopen::KEEP_CACHE,
            (CacheMode::Always, true) | (CacheMode::Metadata, true) => {
                fopen::KEEP_CACHE | fopen::CACHE_DIR
            }
            _ => 0,
        };
        OpenOut {
            fh,
            open_flags,
            padding: 0,
        }
    }

    pub fn open(&self, id: u64, a: &OpenIn) -> Res<OpenOut> {
        let i = self.inode(id)?;
        match i.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(libc::EISDIR),
            libc::S_IFLNK => return Err(libc::ELOOP),
            // Device nodes and FIFOs are the guest's business, never opened on the host.
            _ => return Err(libc::ENXIO),
        }
        let fd = self
            .store
            .open(&i, self.open_flags(a.flags))
            .map_err(errno)?;
        Ok(self.open_out(self.add_handle(fd, id), false))
    }

    pub fn create(
        &self,
        c: Caller,
        parent: u64,
        a: &CreateIn,
        name: &CStr,
    ) -> Res<(EntryOut, OpenOut)> {
        let p = self.dir(parent)?;
        self.target(&p, name)?;
        let pfd = self.store.path_fd(&p).map_err(errno)?;
        let flags = self.open_flags(a.flags) | (a.flags as libc::c_int & libc::O_EXCL);
        let fd = {
            let _as = AsCaller::new(self.switch_creds, c);
            openat_mode(
                pfd.as_raw_fd(),
                name,
                flags | libc::O_CREAT | libc::O_NOFOLLOW,
                a.mode & 0o7777,
            )
            .map_err(errno)?
        };
        let (i, st) = self.store.lookup(&p, name).map_err(store_errno)?;
        let fh = self.add_handle(fd, i.id);
        Ok((self.entry(&i, &st), self.open_out(fh, false)))
    }

    pub fn tmpfile(&self, c: Caller, parent: u64, a: &CreateIn) -> Res<(EntryOut, OpenOut)> {
        let p = self.dir(parent)?;
        let pfd = self.store.path_fd(&p).map_err(errno)?;
        let dir =
            openat(pfd.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY).map_err(errno)?;
        let flags = (self.open_flags(a.flags) & !libc::O_ACCMODE) | libc::O_RDWR;
        let fd = {
            let _as = AsCaller::new(self.switch_creds, c);
            openat_mode(
                dir.as_raw_fd(),
                c".",
                flags | libc::O_TMPFILE,
                a.mode & 0o7777,
            )
            .map_err(errno)?
        };
        let (proc, fdname) = via_proc(fd.as_raw_fd());
        let path = openat(proc, &fdname, libc::O_PATH).map_err(errno)?;
        let (i, st) = self.store.adopt(path).map_err(store_errno)?;
        let fh = self.add_handle(fd, i.id);
        Ok((self.entry(&i, &st), self.open_out(fh, false)))
    }

    pub fn read(&self, a: &ReadIn) -> Res<Vec<u8>> {
        let h = self.handle(a.fh)?;
        let mut buf = vec![0u8; a.size as usize];
        // SAFETY: valid fd and buffer.
        let n = cvt_size(unsafe {
            libc::pread(
                h.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                a.offset as libc::off_t,
            )
        })
        .map_err(errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn write(&self, a: &ReadIn, data: &[u8]) -> Res<WriteOut> {
        let h = self.handle(a.fh)?;
        // SAFETY: valid fd and buffer.
        let n = cvt_size(unsafe {
            libc::pwrite(
                h.fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                a.offset as libc::off_t,
            )
        })
        .map_err(errno)?;
        Ok(WriteOut {
            size: n as u32,
            padding: 0,
        })
    }

    pub fn flush(&self, fh: u64) -> Res<()> {
        self.handle(fh).map(|_| ())
    }

    pub fn release(&self, fh: u64) -> Res<()> {
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh)
            .map(|_| ())
            .ok_or(libc::EBADF)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        let h = self.handle(fh)?;
        let fd = h.fd.as_raw_fd();
        // SAFETY: valid fd.
        cvt(unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        })
        .map_err(errno)?;
        Ok(())
    }

    pub fn fallocate(&self, a: &FallocateIn) -> Res<()> {
        let h = self.handle(a.fh)?;
        // SAFETY: valid fd.
        cvt(unsafe {
            libc::fallocate(
                h.fd.as_raw_fd(),
                a.mode as libc::c_int,
                a.offset as libc::off_t,
                a.length as libc::off_t,
            )
        })
        .map_err(errno)?;
        Ok(())
    }

    pub fn lseek(&self, a: &LseekIn) -> Res<LseekOut> {
        let h = self.handle(a.fh)?;
        // SAFETY: valid fd.
        let r = unsafe {
            libc::lseek(
                h.fd.as_raw_fd(),
                a.offset as libc::off_t,
                a.whence as libc::c_int,
            )
        };
        if r < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        Ok(LseekOut { offset: r as u64 })
    }

    pub fn copy_file_range(&self, a: &CopyFileRangeIn) -> Res<WriteOut> {
        let (i, o) = (self.handle(a.fh_in)?, self.handle(a.fh_out)?);
        let (mut off_in, mut off_out) = (a.off_in as libc::loff_t, a.off_out as libc::loff_t);
        // SAFETY: valid fds and offsets.
        let n = cvt_size(unsafe {
            libc::copy_file_range(
                i.fd.as_raw_fd(),
                &mut off_in,
                o.fd.as_raw_fd(),
                &mut off_out,
                a.len as usize,
                a.flags as libc::c_uint,
            )
        })
        .map_err(errno)?;
        Ok(WriteOut {
            size: n.min(u32::MAX as usize) as u32,
            padding: 0,
        })
    }

    pub fn statfs(&self, id: u64) -> Res<Kstatfs> {
        let i = self.inode(id)?;
        let fd = self.store.path_fd(&i).map_err(errno)?;
        let mut s = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: valid fd and out pointer.
        cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), s.as_mut_ptr()) }).map_err(errno)?;
        // SAFETY: fstatvfs succeeded.
        let s = unsafe { s.assume_init() };
        Ok(Kstatfs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
            ..Kstatfs::default()
        })
    }

    pub fn syncfs(&self) -> Res<()> {
        let root = self.inode(ROOT_ID)?;
        let fd = self
            .store
            .open(&root, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(errno)?;
        // SAFETY: valid fd.
        cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map_err(errno)?;
        Ok(())
    }

    pub fn access(&self, id: u64, mask: u32) -> Res<()> {
        let i = self.inode(id)?;
        if i.kind == libc::S_IFLNK {
            return Ok(());
        }
        let (_keep, dirfd, name) = self.store.at_path(&i).map_err(errno)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::faccessat(dirfd, name.as_ptr(), mask as libc::c_int, 0) })
            .map_err(errno)?;
        Ok(())
    }

    /// An fd for the f*xattr calls. Only regular files and directories carry the xattrs a
    /// guest may set (`user.*` is refused on the rest by Linux), and only they are safe to open.
    fn xattr_fd(&self, id: u64) -> Res<OwnedFd> {
        if !self.cfg.xattr {
            return Err(libc::ENOSYS);
        }
        let i = self.inode(id)?;
        let flags = match i.kind {
            libc::S_IFREG => libc::O_RDONLY | libc::O_NONBLOCK,
            libc::S_IFDIR => libc::O_RDONLY | libc::O_DIRECTORY,
            _ => return Err(libc::EPERM),
        };
        self.store.open(&i, flags).map_err(errno)
    }

    pub fn setxattr(&self, id: u64, a: &SetxattrIn, name: &CStr, value: &[u8]) -> Res<()> {
        let fd = self.xattr_fd(id)?;
        // SAFETY: valid fd, C string and buffer.
        cvt(unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                a.flags as libc::c_int,
            )
        })
        .map_err(errno)?;
        Ok(())
    }

    /// GETXATTR and LISTXATTR: with `size == 0` the reply is the needed size, else the bytes.
    pub fn getxattr(&self, id: u64, name: Option<&CStr>, size: u32) -> Res<Result<Vec<u8>, u32>> {
        let fd = self.xattr_fd(id)?;
        let mut buf = vec![0u8; size as usize];
        let ptr = if size == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr()
        };
        // SAFETY: valid fd, C string and buffer (null with length 0 asks for the size).
        let n = cvt_size(unsafe {
            match name {
                Some(n) => libc::fgetxattr(fd.as_raw_fd(), n.as_ptr(), ptr.cast(), buf.len()),
                None => libc::flistxattr(fd.as_raw_fd(), ptr.cast(), buf.len()),
            }
        })
        .map_err(errno)?;
        if size == 0 {
            return Ok(Err(n as u32));
        }
        buf.truncate(n);
        Ok(Ok(buf))
    }

    pub fn removexattr(&self, id: u64, name: &CStr) -> Res<()> {
        let fd = self.xattr_fd(id)?;
        // SAFETY: valid fd and C string.
        cvt(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }).map_err(errno)?;
        Ok(())
    }

    pub fn opendir(&self, id: u64) -> Res<OpenOut> {
        let i = self.dir(id)?;
        let fd = self
            .store
            .open(&i, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(errno)?;
        Ok(self.open_out(self.add_handle(fd, id), true))
    }

    /// READDIR and READDIRPLUS: entries from the cookie `a.offset` on, as many as fit `a.size`.
    pub fn readdir(&self, id: u64, a: &ReadIn, plus: bool) -> Res<Vec<u8>> {
        let h = self.handle(a.fh)?;
        if h.inode != id {
            return Err(libc::EBADF);
        }
        let dir = self.inode(id)?;
        let size = (a.size as usize).min(1 << 20);
        let _g = h.dir.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = h.fd.as_raw_fd();
        // SAFETY: valid fd; the offset is a cookie from an earlier getdents64.
        if unsafe { libc::lseek(fd, a.offset as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(errno(io::Error::last_os_error()));
        }
        let mut out = Vec::with_capacity(size);
        let mut buf = vec![0u8; size.clamp(4096, 64 << 10)];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
            if n < 0 {
                return Err(errno(io::Error::last_os_error()));
            }
            if n == 0 {
                return Ok(out);
            }
            let mut pos = 0usize;
            while pos + 19 <= n as usize {
                // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
                let rec = &buf[pos..n as usize];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
                let off = u64::from_ne_bytes(rec[8..16].try_into().expect("8 bytes"));
                let reclen = u16::from_ne_bytes(rec[16..18].try_into().expect("2 bytes")) as usize;
                let typ = rec[18];
                if reclen < 19 || reclen > rec.len() {
                    return Err(libc::EIO);
                }
                pos += reclen;
                let Ok(name) = CStr::from_bytes_until_nul(&rec[19..reclen]) else {
                    continue;
                };
                if self.is_hidden(&dir, name) {
                    continue;
                }
                let nb = name.to_bytes();
                let dsz = dirent_size(nb.len());
                let need = dsz + if plus { size_of::<EntryOut>() } else { 0 };
                if out.len() + need > size {
                    return Ok(out);
                }
                if plus {
                    // "." and ".." (and names that vanished) go without attributes: node 0.
                    let e = if nb == b"." || nb == b".." {
                        EntryOut::default()
                    } else {
                        openat(fd, name, libc::O_PATH | libc::O_NOFOLLOW)
                            .map_err(StoreError::from)
                            .and_then(|f| self.store.adopt(f))
                            .map(|(i, st)| self.entry(&i, &st))
                            .unwrap_or_default()
                    };
                    out.extend_from_slice(e.as_bytes());
                }
                let d = Dirent {
                    ino,
                    off,
                    namelen: nb.len() as u32,
                    typ: u32::from(typ),
                };
                let start = out.len();
                out.extend_from_slice(d.as_bytes());
                out.extend_from_slice(nb);
                out.resize(start + dsz, 0);
            }
        }
    }

    pub fn releasedir(&self, fh: u64) -> Res<()> {
        self.release(fh)
    }
}
