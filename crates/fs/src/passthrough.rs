//! The file system the guest sees: the shared directory, passed through operation by operation.
//!
//! The sandbox is structural. Every path operation is one `*at` call on a single [`Name`] (the
//! only type the `*at` wrappers take, built only by the name check) relative to a directory the
//! guest already holds, never following a symlink: the guest resolves symlinks itself, in its
//! own namespace. Symlink inodes are never passed to a call that would follow them. Only regular
//! files and directories are ever opened ([`InodeStore::open`]); a CREATE of a name that exists
//! opens it the same type-checked way, so a device node, FIFO or socket the guest made is never
//! opened on the host and no open blocks. Every guest-sized buffer is bounded before it is
//! allocated, and allocation failure is ENOMEM. The workdir, when it lies inside the share, is
//! hidden: not listed, not found, not replaceable.
//!
//! All system calls are in [`crate::sys`]; this module has no `unsafe`.

// foldhash: the keys are ids the daemon hands out, not values a guest picks.
use hashbrown::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use zerocopy::IntoBytes;

use crate::abi::*;
use crate::inode_store::{Inode, InodeStore, StoreError, StoreMode, ROOT_ID};
use crate::sys::{self, Name};
pub use crate::sys::{Errno, Res};

fn err<T>(e: i32) -> Res<T> {
    Err(Errno(e))
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
    /// Negotiate FUSE_HANDLE_KILLPRIV_V2: the daemon clears setuid/setgid on writes and
    /// truncations by unprivileged guest users (it may hold CAP_FSETID, so the host kernel
    /// would not).
    pub killpriv_v2: bool,
    /// Serve the share read-only (virtiofsd's `--readonly`): every request that would change
    /// it is refused with EROFS, whatever the host's permissions.
    pub readonly: bool,
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
            killpriv_v2: true,
            readonly: false,
        }
    }
}

/// The caller's identity, from the request header (and its supplementary-group extension).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// The one supplementary group the guest kernel sends with create-type requests
    /// (`FUSE_CREATE_SUPP_GROUP`): the parent directory's group, when the caller is a member.
    pub supp_group: Option<u32>,
}

/// An open file or directory of the guest.
struct FileHandle {
    fd: OwnedFd,
    inode: u64,
    is_dir: bool,
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
    /// Of `inode_fds`: new inodes held by fd until they are linked.
    pub young_fds: usize,
    /// Of `inode_fds`: inodes that could not be linked when their turn came (removed first).
    pub kept_fds: usize,
    pub handles: usize,
}

pub struct Passthrough {
    store: InodeStore,
    cfg: FsConfig,
    handles: RwLock<HashMap<u64, Arc<FileHandle>>>,
    next_fh: AtomicU64,
    /// Running as root: creations take the caller's fsuid/fsgid (and groups).
    switch_creds: bool,
}

/// While alive, the thread acts as the caller: fsuid/fsgid and supplementary groups are per
/// thread, and switching away from root makes the host check permissions as the caller.
struct AsCaller(bool);

impl AsCaller {
    fn new(on: bool, c: Caller) -> Res<Self> {
        if on {
            // Never the daemon's own groups (the CVE-2022-0358 class): only the one the guest
            // kernel vouched for, or none.
            let groups: &[u32] = match &c.supp_group {
                Some(g) => std::slice::from_ref(g),
                None => &[],
            };
            sys::set_thread_groups(groups)?;
            sys::set_fs_ids(c.uid, c.gid);
        }
        Ok(AsCaller(on))
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        if self.0 {
            sys::set_fs_ids(0, 0);
            let _ = sys::set_thread_groups(&[]);
        }
    }
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

/// The setuid/setgid bits a write, truncate or truncating open by an unprivileged caller must
/// clear (the kernel's `should_remove_suid`: setgid only with group-execute).
fn kill_bits(mode: libc::mode_t) -> libc::mode_t {
    let mut bits = mode & libc::S_ISUID;
    if mode & (libc::S_ISGID | libc::S_IXGRP) == libc::S_ISGID | libc::S_IXGRP {
        bits |= libc::S_ISGID;
    }
    bits
}

/// Clears setuid/setgid on the open file `fd` (FUSE_HANDLE_KILLPRIV_V2). The daemon may hold
/// CAP_FSETID, so the host kernel would not do it for us.
fn kill_suidgid(fd: BorrowedFd<'_>) -> Res<()> {
    let st = sys::fstat(fd)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFREG {
        let bits = kill_bits(st.st_mode);
        if bits != 0 {
            sys::fchmod(fd, st.st_mode & 0o7777 & !bits)?;
        }
    }
    Ok(())
}

/// A zeroed buffer of `n` bytes, or ENOMEM: a guest-sized allocation never aborts the daemon.
fn buffer(n: usize) -> Res<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)?;
    v.resize(n, 0);
    Ok(v)
}

impl Passthrough {
    /// Serves `shared_dir`, holding inodes through `workdir` (which must be on the same file
    /// system for links to work; elsewhere every inode falls back to an fd).
    pub fn new(shared_dir: &Path, workdir: &Path, cfg: FsConfig) -> Result<Self, StoreError> {
        let c = CString::new(shared_dir.as_os_str().as_encoded_bytes())
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        let root = sys::open_abs(&c, libc::O_PATH | libc::O_DIRECTORY)?;
        let store = InodeStore::with_mode(workdir, root, cfg.inode_store)?;
        // Modes arrive with the guest's umask applied; ours must not mask them again.
        sys::umask(0);
        Ok(Passthrough {
            store,
            cfg,
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            switch_creds: sys::geteuid() == 0,
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
            young_fds: s.young,
            kept_fds: s.kept,
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

    fn inode(&self, id: u64) -> Res<Inode> {
        Ok(self.store.get(id)?)
    }

    fn handle(&self, fh: u64) -> Res<Arc<FileHandle>> {
        self.handles
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh)
            .cloned()
            .ok_or(Errno(libc::EBADF))
    }

    /// The open regular file `fh`: a directory handle is EBADF, as is a handle of another node
    /// when the request names one (`node`).
    fn file(&self, fh: u64, node: Option<u64>) -> Res<Arc<FileHandle>> {
        let h = self.handle(fh)?;
        if h.is_dir || node.is_some_and(|n| n != h.inode) {
            return err(libc::EBADF);
        }
        Ok(h)
    }

    /// The open directory `fh` of node `node`.
    fn dir_handle(&self, fh: u64, node: u64) -> Res<Arc<FileHandle>> {
        let h = self.handle(fh)?;
        if !h.is_dir || h.inode != node {
            return err(libc::EBADF);
        }
        Ok(h)
    }

    fn add_handle(&self, fd: OwnedFd, inode: u64, is_dir: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                fh,
                Arc::new(FileHandle {
                    fd,
                    inode,
                    is_dir,
                    dir: Mutex::new(()),
                }),
            );
        fh
    }

    /// Whether `name` in `parent` is the workdir (when it lies inside the share).
    fn is_hidden(&self, parent: &Inode, name: Name<'_>) -> bool {
        let (dir, workdir) = self.store.workdir_entry();
        dir == parent.key && workdir.to_bytes() == name.as_bytes()
    }

    /// A name the guest may create, remove or rename in `parent`.
    fn target<'n>(&self, parent: &Inode, name: &'n CStr) -> Res<Name<'n>> {
        let name = Name::new(name)?;
        if self.is_hidden(parent, name) {
            return err(libc::EACCES);
        }
        Ok(name)
    }

    fn dir(&self, id: u64) -> Res<Inode> {
        let i = self.inode(id)?;
        if !i.is_dir {
            return err(libc::ENOTDIR);
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
        let name = Name::new(name)?;
        let p = self.dir(parent)?;
        if self.is_hidden(&p, name) {
            return err(libc::ENOENT);
        }
        match self.store.lookup(&p, name).map_err(Errno::from) {
            Ok((i, st)) => Ok(self.entry(&i, &st)),
            // A name that is not there: a negative entry (node 0), which the guest caches as
            // long as it caches entries, instead of asking again for every path it tries.
            Err(Errno(libc::ENOENT)) if self.cfg.cache != CacheMode::Never => {
                let t = self.cfg.cache.timeout();
                Ok(EntryOut {
                    entry_valid: t.as_secs(),
                    entry_valid_nsec: t.subsec_nanos(),
                    ..EntryOut::default()
                })
            }
            Err(e) => Err(e),
        }
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
        let st = self.store.stat(&i)?;
        Ok(self.attr_out(&st))
    }

    pub fn setattr(&self, id: u64, a: &SetattrIn) -> Res<AttrOut> {
        let i = self.inode(id)?;
        // The fh, when given, must be an open file of this very node.
        let fh = if a.valid & fattr::FH != 0 {
            Some(self.file(a.fh, Some(id))?)
        } else {
            None
        };
        let symlink = i.kind == libc::S_IFLNK;
        self.store.with_path(&i, |path| {
            // A symlink is reached through /proc only by following the magic link, which
            // chmod/chown/utimens would take to the link's target: refuse instead.
            let unsupported = || std::io::Error::from_raw_os_error(libc::EOPNOTSUPP);
            if a.valid & fattr::MODE != 0 {
                if symlink {
                    return Err(unsupported());
                }
                match &fh {
                    Some(h) => sys::fchmod(h.fd.as_fd(), a.mode & 0o7777)?,
                    None => path.chmod(a.mode & 0o7777)?,
                }
            }
            if a.valid & (fattr::UID | fattr::GID) != 0 {
                if symlink && path.follows() {
                    return Err(unsupported());
                }
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
                // chown clears setuid/setgid itself, even for root.
                path.chown(uid, gid)?;
            }
            Ok(())
        })?;
        if a.valid & fattr::SIZE != 0 {
            if i.kind != libc::S_IFREG {
                return err(libc::EINVAL);
            }
            let opened;
            let fd = match &fh {
                Some(h) => h.fd.as_fd(),
                None => {
                    opened = self.store.open(&i, libc::O_WRONLY)?;
                    opened.as_fd()
                }
            };
            if a.valid & fattr::KILL_SUIDGID != 0 {
                kill_suidgid(fd)?;
            }
            sys::ftruncate(fd, a.size)?;
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
            self.store.with_path(&i, |path| {
                if symlink && path.follows() {
                    return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                }
                path.utimens(&times)
            })?;
        }
        let st = self.store.stat(&i)?;
        Ok(self.attr_out(&st))
    }

    pub fn readlink(&self, id: u64) -> Res<Vec<u8>> {
        let i = self.inode(id)?;
        if i.kind != libc::S_IFLNK {
            return err(libc::EINVAL);
        }
        Ok(self.store.readlink(&i)?)
    }

    /// Runs `make(parent_fd, name)` as the caller, then looks the new name up.
    fn make(
        &self,
        c: Caller,
        parent: u64,
        name: &CStr,
        make: impl FnOnce(BorrowedFd<'_>, Name<'_>) -> std::io::Result<()>,
    ) -> Res<EntryOut> {
        let p = self.dir(parent)?;
        let name = self.target(&p, name)?;
        let pfd = self.store.path_fd(&p)?;
        {
            let _as = AsCaller::new(self.switch_creds, c)?;
            make(pfd.as_fd(), name)?;
        }
        let (i, st) = self.store.lookup(&p, name)?;
        Ok(self.entry(&i, &st))
    }

    pub fn mkdir(&self, c: Caller, parent: u64, a: &MkdirIn, name: &CStr) -> Res<EntryOut> {
        self.make(c, parent, name, |fd, n| {
            sys::mkdirat(fd, n, a.mode & 0o7777)
        })
    }

    /// MKNOD creates whatever the guest asks for (its device nodes and FIFOs are its own
    /// business); such nodes are never opened on the host afterwards.
    pub fn mknod(&self, c: Caller, parent: u64, a: &MknodIn, name: &CStr) -> Res<EntryOut> {
        self.make(c, parent, name, |fd, n| {
            sys::mknodat(fd, n, a.mode, libc::dev_t::from(a.rdev))
        })
    }

    pub fn symlink(&self, c: Caller, parent: u64, name: &CStr, target: &CStr) -> Res<EntryOut> {
        self.make(c, parent, name, |fd, n| sys::symlinkat(target, fd, n))
    }

    pub fn link(&self, c: Caller, old: u64, parent: u64, name: &CStr) -> Res<EntryOut> {
        let o = self.inode(old)?;
        if o.is_dir {
            return err(libc::EPERM);
        }
        self.make(c, parent, name, |fd, n| {
            self.store.with_path(&o, |path| path.link_to(fd, n))
        })
    }

    fn remove(&self, parent: u64, name: &CStr, flags: libc::c_int) -> Res<()> {
        let p = self.dir(parent)?;
        let name = self.target(&p, name)?;
        let pfd = self.store.path_fd(&p)?;
        // A directory removed here stops being pinned by the store's fd cache at once, as if
        // the cache were not there: its inode goes, and its number can be reused.
        let dir = (flags & libc::AT_REMOVEDIR != 0)
            .then(|| sys::fstatat(pfd.as_fd(), name).ok())
            .flatten();
        sys::unlinkat(pfd.as_fd(), name, flags)?;
        if let Some(st) = dir {
            self.store.uncache_dir((st.st_dev, st.st_ino));
        }
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
            return err(libc::EINVAL);
        }
        let (p, n) = (self.dir(parent)?, self.dir(newdir)?);
        let old = self.target(&p, old)?;
        let new = self.target(&n, new)?;
        let (pfd, nfd) = (self.store.path_fd(&p)?, self.store.path_fd(&n)?);
        Ok(sys::renameat2(pfd.as_fd(), old, nfd.as_fd(), new, flags)?)
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

    /// Opens a regular file with the guest's open flags through `open`. With `kill` (the
    /// KILLPRIV request of an unprivileged caller) a truncating open clears setuid/setgid first.
    fn open_regular(
        &self,
        i: &Inode,
        flags: u32,
        kill: bool,
        open: impl FnOnce(libc::c_int) -> std::io::Result<OwnedFd>,
    ) -> Res<OwnedFd> {
        match i.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return err(libc::EISDIR),
            // What an O_NOFOLLOW open of a symlink answers.
            libc::S_IFLNK => return err(libc::ELOOP),
            // Device nodes, FIFOs and sockets are the guest's business: EBADF, as
            // virtiofsd answers (CVE-2020-35517).
            _ => return err(libc::EBADF),
        }
        let flags = self.open_flags(flags);
        if !(kill && flags & libc::O_TRUNC != 0) {
            return Ok(open(flags)?);
        }
        let fd = open(flags & !libc::O_TRUNC)?;
        kill_suidgid(fd.as_fd())?;
        sys::ftruncate(fd.as_fd(), 0)?;
        Ok(fd)
    }

    pub fn open(&self, id: u64, a: &OpenIn) -> Res<OpenOut> {
        let i = self.inode(id)?;
        let kill = a.open_flags & OPEN_KILL_SUIDGID != 0;
        let fd = self.open_regular(&i, a.flags, kill, |f| self.store.open(&i, f))?;
        Ok(self.open_out(self.add_handle(fd, id, false), false))
    }

    pub fn create(
        &self,
        c: Caller,
        parent: u64,
        a: &CreateIn,
        name: &CStr,
    ) -> Res<(EntryOut, OpenOut)> {
        let p = self.dir(parent)?;
        let name = self.target(&p, name)?;
        let pfd = self.store.path_fd(&p)?;
        // Always exclusive: opening a name that already exists must go through the type check,
        // or the guest could plant a device node or FIFO and have us open it.
        let made = {
            let _as = AsCaller::new(self.switch_creds, c)?;
            sys::openat(
                pfd.as_fd(),
                name,
                self.open_flags(a.flags) | libc::O_CREAT | libc::O_EXCL,
                a.mode & 0o7777,
            )
        };
        let fd = match made {
            Ok(fd) => fd,
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST) && a.flags as i32 & libc::O_EXCL == 0 =>
            {
                return self.create_existing(c, &p, name, a)
            }
            Err(e) => return Err(e.into()),
        };
        let (i, st) = self.store.lookup(&p, name)?;
        let fh = self.add_handle(fd, i.id, false);
        Ok((self.entry(&i, &st), self.open_out(fh, false)))
    }

    /// CREATE without O_EXCL of a name that exists: opened as OPEN would (regular files only),
    /// as the caller, so the host checks the caller's permission on the existing file.
    fn create_existing(
        &self,
        c: Caller,
        p: &Inode,
        name: Name<'_>,
        a: &CreateIn,
    ) -> Res<(EntryOut, OpenOut)> {
        let (i, st) = self.store.lookup(p, name)?;
        let kill = a.open_flags & OPEN_KILL_SUIDGID != 0;
        let opened = self.open_regular(&i, a.flags, kill, |flags| {
            let path = self.store.path_fd(&i)?;
            let _as = AsCaller::new(self.switch_creds, c)?;
            sys::reopen(path.as_fd(), flags)
        });
        match opened {
            Ok(fd) => {
                let st = if a.flags as i32 & libc::O_TRUNC != 0 {
                    self.store.stat(&i)?
                } else {
                    st
                };
                let fh = self.add_handle(fd, i.id, false);
                Ok((self.entry(&i, &st), self.open_out(fh, false)))
            }
            Err(e) => {
                // The guest gets no entry, so it holds no reference to drop later.
                self.store.forget(i.id, 1);
                Err(e)
            }
        }
    }

    pub fn tmpfile(&self, c: Caller, parent: u64, a: &CreateIn) -> Res<(EntryOut, OpenOut)> {
        let p = self.dir(parent)?;
        let dir = self.store.open(&p, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let flags = (self.open_flags(a.flags) & !libc::O_ACCMODE) | libc::O_RDWR;
        let fd = {
            let _as = AsCaller::new(self.switch_creds, c)?;
            sys::open_tmpfile(dir.as_fd(), flags, a.mode & 0o7777)?
        };
        let path = sys::reopen(fd.as_fd(), libc::O_PATH)?;
        let (i, st) = self.store.adopt(path)?;
        let fh = self.add_handle(fd, i.id, false);
        Ok((self.entry(&i, &st), self.open_out(fh, false)))
    }

    /// READ into a buffer of `a.size` bytes (the caller bounds it by the negotiated maximum).
    pub fn read(&self, id: u64, a: &ReadIn) -> Res<Vec<u8>> {
        let mut buf = buffer(a.size as usize)?;
        let n = self.read_with(id, a, |fd, off| sys::pread(fd, &mut buf, off))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// READ through `read(fd, offset)`, which puts the bytes where they go (the guest's own
    /// buffers, [`crate::guest_io`]) and returns how many it read.
    pub fn read_with(
        &self,
        id: u64,
        a: &ReadIn,
        read: impl FnOnce(BorrowedFd<'_>, u64) -> std::io::Result<usize>,
    ) -> Res<usize> {
        let h = self.file(a.fh, Some(id))?;
        Ok(read(h.fd.as_fd(), a.offset)?)
    }

    pub fn write(&self, id: u64, a: &ReadIn, data: &[u8]) -> Res<WriteOut> {
        self.write_with(id, a, |fd, off| sys::pwrite(fd, data, off))
    }

    /// WRITE through `write(fd, offset)`, which takes the bytes from where they are (the
    /// guest's own buffers) and returns how many it wrote.
    pub fn write_with(
        &self,
        id: u64,
        a: &ReadIn,
        write: impl FnOnce(BorrowedFd<'_>, u64) -> std::io::Result<usize>,
    ) -> Res<WriteOut> {
        let h = self.file(a.fh, Some(id))?;
        if a.flags_rw & WRITE_KILL_SUIDGID != 0 {
            kill_suidgid(h.fd.as_fd())?;
        }
        let n = write(h.fd.as_fd(), a.offset)?;
        Ok(WriteOut {
            size: n as u32,
            padding: 0,
        })
    }

    pub fn flush(&self, id: u64, fh: u64) -> Res<()> {
        self.file(fh, Some(id)).map(drop)
    }

    fn drop_handle(&self, fh: u64) {
        self.handles
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh);
    }

    pub fn release(&self, id: u64, fh: u64) -> Res<()> {
        self.file(fh, Some(id))?;
        self.drop_handle(fh);
        Ok(())
    }

    pub fn releasedir(&self, id: u64, fh: u64) -> Res<()> {
        self.dir_handle(fh, id)?;
        self.drop_handle(fh);
        Ok(())
    }

    pub fn fsync(&self, id: u64, fh: u64, datasync: bool) -> Res<()> {
        let h = self.file(fh, Some(id))?;
        Ok(sys::fsync(h.fd.as_fd(), datasync)?)
    }

    pub fn fsyncdir(&self, id: u64, fh: u64, datasync: bool) -> Res<()> {
        let h = self.dir_handle(fh, id)?;
        Ok(sys::fsync(h.fd.as_fd(), datasync)?)
    }

    pub fn fallocate(&self, id: u64, a: &FallocateIn) -> Res<()> {
        let h = self.file(a.fh, Some(id))?;
        Ok(sys::fallocate(
            h.fd.as_fd(),
            a.mode as i32,
            a.offset,
            a.length,
        )?)
    }

    pub fn lseek(&self, id: u64, a: &LseekIn) -> Res<LseekOut> {
        let h = self.file(a.fh, Some(id))?;
        let offset = sys::lseek(h.fd.as_fd(), a.offset, a.whence as i32)?;
        Ok(LseekOut { offset })
    }

    pub fn copy_file_range(&self, id: u64, a: &CopyFileRangeIn) -> Res<WriteOut> {
        let (i, o) = (
            self.file(a.fh_in, Some(id))?,
            self.file(a.fh_out, Some(a.nodeid_out))?,
        );
        // The reply counts in 32 bits: never copy more than it can say.
        let len = (a.len as usize).min(u32::MAX as usize & !0xfff);
        let n = sys::copy_file_range(
            i.fd.as_fd(),
            a.off_in,
            o.fd.as_fd(),
            a.off_out,
            len,
            a.flags as u32,
        )?;
        Ok(WriteOut {
            size: n as u32,
            padding: 0,
        })
    }

    pub fn statfs(&self, id: u64) -> Res<Kstatfs> {
        let i = self.inode(id)?;
        let fd = self.store.path_fd(&i)?;
        let s = sys::fstatvfs(fd.as_fd())?;
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
        let fd = self.store.open(&root, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(sys::syncfs(fd.as_fd())?)
    }

    pub fn access(&self, id: u64, mask: u32) -> Res<()> {
        let i = self.inode(id)?;
        if i.kind == libc::S_IFLNK {
            return Ok(());
        }
        Ok(self
            .store
            .with_path(&i, |path| path.access(mask as libc::c_int))?)
    }

    /// An fd for the f*xattr calls. Only regular files and directories carry the xattrs a
    /// guest may set (`user.*` is refused on the rest by Linux), and only they are safe to open.
    fn xattr_fd(&self, id: u64) -> Res<OwnedFd> {
        if !self.cfg.xattr {
            return err(libc::ENOSYS);
        }
        let i = self.inode(id)?;
        let flags = match i.kind {
            libc::S_IFREG => libc::O_RDONLY | libc::O_NONBLOCK,
            libc::S_IFDIR => libc::O_RDONLY | libc::O_DIRECTORY,
            _ => return err(libc::EPERM),
        };
        Ok(self.store.open(&i, flags)?)
    }

    pub fn setxattr(&self, id: u64, a: &SetxattrIn, name: &CStr, value: &[u8]) -> Res<()> {
        let fd = self.xattr_fd(id)?;
        Ok(sys::fsetxattr(fd.as_fd(), name, value, a.flags as i32)?)
    }

    /// GETXATTR (`name`) and LISTXATTR (`None`): with `size == 0` the reply is the needed size,
    /// else the bytes. Linux never returns more than [`XATTR_SIZE_MAX`], so a larger guest size
    /// allocates no more than that.
    pub fn getxattr(&self, id: u64, name: Option<&CStr>, size: u32) -> Res<Result<Vec<u8>, u32>> {
        let fd = self.xattr_fd(id)?;
        let mut buf = buffer(size.min(XATTR_SIZE_MAX) as usize)?;
        let n = sys::fgetxattr(fd.as_fd(), name, &mut buf)?;
        if size == 0 {
            return Ok(Err(n as u32));
        }
        buf.truncate(n);
        Ok(Ok(buf))
    }

    pub fn removexattr(&self, id: u64, name: &CStr) -> Res<()> {
        let fd = self.xattr_fd(id)?;
        Ok(sys::fremovexattr(fd.as_fd(), name)?)
    }

    pub fn opendir(&self, id: u64) -> Res<OpenOut> {
        let i = self.dir(id)?;
        let fd = self.store.open(&i, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(self.open_out(self.add_handle(fd, id, true), true))
    }

    /// READDIR and READDIRPLUS: entries from the cookie `a.offset` on, as many as fit `a.size`
    /// (itself bounded by `max`).
    pub fn readdir(&self, id: u64, a: &ReadIn, plus: bool, max: usize) -> Res<Vec<u8>> {
        let h = self.dir_handle(a.fh, id)?;
        let dir = self.inode(id)?;
        let size = (a.size as usize).min(max);
        let _g = h.dir.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = h.fd.as_fd();
        sys::seekdir(fd, a.offset)?;
        let mut out = Vec::new();
        out.try_reserve_exact(size)?;
        let mut buf = buffer(size.clamp(4096, 64 << 10))?;
        loop {
            let batch = sys::getdents(fd, &mut buf)?;
            if batch.is_empty() {
                return Ok(out);
            }
            for e in batch {
                let e = e?;
                let nb = e.name.to_bytes();
                let name = Name::new(e.name).ok();
                if name.is_some_and(|n| self.is_hidden(&dir, n)) {
                    continue;
                }
                let dsz = dirent_size(nb.len());
                let need = dsz + if plus { size_of::<EntryOut>() } else { 0 };
                if out.len() + need > size {
                    // Not sent: the next READDIR starts again at this entry's cookie, so the
                    // directory position must not have moved past it.
                    return Ok(out);
                }
                if plus {
                    // "." and ".." (and names that vanished) go without attributes: node 0.
                    let entry = name
                        .and_then(|n| self.store.lookup_at(fd, n).ok())
                        .map(|(i, st)| self.entry(&i, &st))
                        .unwrap_or_default();
                    out.extend_from_slice(entry.as_bytes());
                }
                let d = Dirent {
                    ino: e.ino,
                    off: e.off,
                    namelen: nb.len() as u32,
                    typ: u32::from(e.typ),
                };
                let start = out.len();
                out.extend_from_slice(d.as_bytes());
                out.extend_from_slice(nb);
                out.resize(start + dsz, 0);
            }
        }
    }
}
