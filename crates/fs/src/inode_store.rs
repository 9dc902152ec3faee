//! The inode table of the passthrough file system.
//!
//! virtiofsd keeps one `O_PATH` fd per inode the guest has looked up, so a guest that caches a
//! large tree exhausts the daemon's fds. Here a non-directory is instead held by a hard link in a
//! private workdir on the same file system: `linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW)` needs
//! no capability, the fd is closed at once, and the inode is reopened through the link when
//! needed. The link is removed when the guest forgets the inode.
//!
//! Fallbacks, per inode: directories cannot be hard-linked and are held by fd (they are few);
//! inodes on another file system than the workdir (a mount below the share) and inodes the kernel
//! refuses to link (`protected_hardlinks` for an unprivileged daemon) are held by fd as well.
//!
//! The link adds one to `st_nlink` and moves `st_ctime`: [`InodeStore::stat`] reports what the
//! guest would see without it (the ctime from before our link, for as long as nothing else has
//! changed the inode). The workdir is emptied when the store opens (leftovers of a crash) and when
//! it is dropped. [`StoreMode::Fd`] keeps virtiofsd's classic behaviour (one `O_PATH` fd per
//! inode) for comparison.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::sys::{cvt, fstatat, openat, via_proc};

/// FUSE's root node id.
pub const ROOT_ID: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("workdir {path}: {source}")]
    Workdir { path: String, source: io::Error },
    #[error("unknown node id {0}")]
    UnknownNode(u64),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// (st_dev, st_ino): what identifies an inode on the host.
pub type InodeKey = (u64, u64);

/// How the store holds inodes the guest knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreMode {
    /// Non-directories by a hard link in the workdir (the default).
    Workdir,
    /// Every inode by an `O_PATH` fd (virtiofsd's way).
    Fd,
}

/// How an inode is held open.
#[derive(Debug)]
pub enum Handle {
    /// A hard link named `name` in the workdir; no fd held.
    Link(CString),
    /// A file handle (`name_to_handle_at`), for directories on the share's own mount when the
    /// daemon may open handles (CAP_DAC_READ_SEARCH); no fd held.
    Dir(FileHandle),
    /// An `O_PATH` fd.
    Fd(OwnedFd),
}

/// The opaque part of a `struct file_handle`.
#[derive(Debug)]
pub struct FileHandle {
    typ: i32,
    bytes: Box<[u8]>,
}

const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle, aligned as the kernel expects.
#[repr(C)]
struct RawHandle {
    bytes: u32,
    typ: i32,
    data: [u8; MAX_HANDLE_SZ],
}

/// The handle and mount id of the inode behind `fd`.
fn name_to_handle(fd: RawFd) -> io::Result<(FileHandle, i32)> {
    let mut h = RawHandle {
        bytes: MAX_HANDLE_SZ as u32,
        typ: 0,
        data: [0; MAX_HANDLE_SZ],
    };
    let mut mnt = 0;
    // SAFETY: valid fd, empty C string, a buffer of MAX_HANDLE_SZ bytes as declared.
    cvt(unsafe {
        libc::name_to_handle_at(
            fd,
            c"".as_ptr(),
            (&raw mut h).cast(),
            &mut mnt,
            libc::AT_EMPTY_PATH,
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

fn open_handle(mount_fd: RawFd, fh: &FileHandle, flags: libc::c_int) -> io::Result<OwnedFd> {
    let mut h = RawHandle {
        bytes: fh.bytes.len() as u32,
        typ: fh.typ,
        data: [0; MAX_HANDLE_SZ],
    };
    h.data[..fh.bytes.len()].copy_from_slice(&fh.bytes);
    // SAFETY: a handle from name_to_handle_at; the returned fd is ours.
    let fd = cvt(unsafe {
        libc::open_by_handle_at(mount_fd, (&raw mut h).cast(), flags | libc::O_CLOEXEC)
    })?;
    // SAFETY: fd was just returned by open_by_handle_at.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[derive(Debug)]
pub struct Inode {
    pub id: u64,
    pub key: InodeKey,
    pub is_dir: bool,
    /// The file type bits (`S_IFMT`) of `st_mode`; an inode never changes type.
    pub kind: libc::mode_t,
    pub handle: Handle,
    lookups: AtomicU64,
    /// For linked inodes: the ctime before and just after our `linkat`.
    ctimes: Option<(Ctime, Ctime)>,
}

type Ctime = (i64, i64);

fn ctime(st: &libc::stat) -> Ctime {
    (st.st_ctime, st.st_ctime_nsec)
}

/// An `O_PATH` fd for an inode: the store's own (directories, fd-held inodes) or one opened
/// through the inode's workdir link.
pub enum PathFd<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsRawFd for PathFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            PathFd::Borrowed(fd) => fd.as_raw_fd(),
            PathFd::Owned(fd) => fd.as_raw_fd(),
        }
    }
}

impl Inode {
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Acquire)
    }

    /// Takes our workdir link out of `st` (taken through the link or an fd of this inode).
    fn hide_link(&self, st: &mut libc::stat) {
        if let Some((before, after)) = self.ctimes {
            st.st_nlink = st.st_nlink.saturating_sub(1);
            if ctime(st) == after {
                (st.st_ctime, st.st_ctime_nsec) = before;
            }
        }
    }
}

/// Counts of how inodes are held, for stats and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub inodes: usize,
    pub links: usize,
    pub handles: usize,
    pub fds: usize,
}

pub struct InodeStore {
    mode: StoreMode,
    /// The share's root (for `open_by_handle_at`) and its mount id, when directories can be
    /// held by file handle.
    dir_handles: Option<(OwnedFd, i32)>,
    workdir: OwnedFd,
    workdir_key: InodeKey,
    /// Links only work within one mount: inodes of other mounts are held by fd.
    workdir_mnt: Option<u64>,
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    by_key: Mutex<HashMap<InodeKey, u64>>,
    next_id: AtomicU64,
}

/// The mount id of `fd` (statx, Linux 5.8+); `None` where the kernel cannot tell.
fn mnt_id(fd: RawFd) -> Option<u64> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: valid fd, empty C string and out pointer.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    // SAFETY: statx succeeded, so the struct is initialised.
    let stx = unsafe { stx.assume_init() };
    (r == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// Removes every entry of the workdir (it only ever holds our links).
fn empty_dir(dir: &OwnedFd) -> io::Result<usize> {
    let dup = cvt(unsafe { libc::dup(dir.as_raw_fd()) })?;
    // SAFETY: dup returned a new fd that fdopendir takes over.
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        // SAFETY: fdopendir failed, so dup is still ours to close.
        unsafe { libc::close(dup) };
        return Err(io::Error::last_os_error());
    }
    // SAFETY: d is a valid DIR*.
    unsafe { libc::rewinddir(d) };
    let mut names = Vec::new();
    loop {
        // SAFETY: d is a valid DIR*; the entry is copied out before the next call.
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: closes the DIR* and its fd.
    unsafe { libc::closedir(d) };
    for n in &names {
        // SAFETY: valid dirfd and C string.
        unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), 0) };
    }
    Ok(names.len())
}

impl InodeStore {
    /// Opens (creating, mode 0700) the workdir at `workdir` and empties it. The root of the share
    /// becomes node [`ROOT_ID`], held by fd.
    pub fn new(workdir: &Path, root: OwnedFd) -> Result<Self, StoreError> {
        Self::with_mode(workdir, root, StoreMode::Workdir)
    }

    pub fn with_mode(workdir: &Path, root: OwnedFd, mode: StoreMode) -> Result<Self, StoreError> {
        let err = |source| StoreError::Workdir {
            path: workdir.display().to_string(),
            source,
        };
        crate::sys::init_proc()?;
        match std::fs::create_dir(workdir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
        std::fs::set_permissions(workdir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(err)?;
        let c = CString::new(workdir.as_os_str().as_encoded_bytes())
            .map_err(|e| err(io::Error::other(e)))?;
        // Readable (not O_PATH), so the same fd also lists the directory.
        let dir = openat(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY).map_err(err)?;
        let stale = empty_dir(&dir).map_err(err)?;
        if stale > 0 {
            tracing::warn!(workdir = %workdir.display(), links = stale, "removed links left by a previous run");
        }
        let st = fstatat(dir.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(err)?;
        let root_st = fstatat(root.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
        // Directories by handle need the right to open handles: probe it once on the root.
        let dir_handles = match mode {
            StoreMode::Fd => None,
            // open_by_handle_at() takes no O_PATH fd for the mount: open the root for reading.
            StoreMode::Workdir => name_to_handle(root.as_raw_fd())
                .and_then(|(h, mnt)| {
                    let (proc, name) = via_proc(root.as_raw_fd());
                    let mount_fd = openat(proc, &name, libc::O_RDONLY | libc::O_DIRECTORY)?;
                    open_handle(mount_fd.as_raw_fd(), &h, libc::O_PATH)?;
                    Ok((mount_fd, mnt))
                })
                .ok(),
        };
        if mode == StoreMode::Workdir && dir_handles.is_none() {
            tracing::info!("no CAP_DAC_READ_SEARCH: directories are held by fd");
        }
        let store = Self {
            mode,
            dir_handles,
            workdir_mnt: mnt_id(dir.as_raw_fd()),
            workdir: dir,
            workdir_key: (st.st_dev, st.st_ino),
            inodes: RwLock::new(HashMap::new()),
            by_key: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(ROOT_ID + 1),
        };
        let root = Arc::new(Inode {
            id: ROOT_ID,
            key: (root_st.st_dev, root_st.st_ino),
            is_dir: true,
            kind: libc::S_IFDIR,
            handle: Handle::Fd(root),
            lookups: AtomicU64::new(1),
            ctimes: None,
        });
        store
            .by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(root.key, ROOT_ID);
        store
            .inodes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ROOT_ID, root);
        Ok(store)
    }

    pub fn get(&self, id: u64) -> Result<Arc<Inode>, StoreError> {
        self.inodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
            .ok_or(StoreError::UnknownNode(id))
    }

    /// The workdir's (st_dev, st_ino): the file system layer hides it from the guest.
    pub fn workdir_key(&self) -> InodeKey {
        self.workdir_key
    }

    /// Looks `name` up in directory `parent` (which must not contain `/`; the caller checks) and
    /// counts one guest reference to the result. Returns the attributes the guest should see.
    pub fn lookup(
        &self,
        parent: &Inode,
        name: &CStr,
    ) -> Result<(Arc<Inode>, libc::stat), StoreError> {
        let pfd = self.path_fd(parent)?;
        let fd = openat(pfd.as_raw_fd(), name, libc::O_PATH | libc::O_NOFOLLOW)?;
        self.adopt(fd)
    }

    /// Counts one guest reference to the inode `fd` (an `O_PATH` fd) refers to, taking it into
    /// the table if it is new.
    pub fn adopt(&self, fd: OwnedFd) -> Result<(Arc<Inode>, libc::stat), StoreError> {
        let mut st = fstatat(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
        let key = (st.st_dev, st.st_ino);
        if key == self.workdir_key {
            return Err(io::Error::from_raw_os_error(libc::ENOENT).into());
        }
        let mut by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = by_key.get(&key) {
            let inode = self.get(id)?;
            inode.lookups.fetch_add(1, Ordering::AcqRel);
            drop(by_key);
            inode.hide_link(&mut st);
            return Ok((inode, st));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let linkable = self.mode == StoreMode::Workdir
            && !is_dir
            && st.st_dev == self.workdir_key.0
            && (self.workdir_mnt.is_none() || mnt_id(fd.as_raw_fd()) == self.workdir_mnt);
        let dir_handle = match &self.dir_handles {
            Some((_, root_mnt)) if is_dir => name_to_handle(fd.as_raw_fd())
                .ok()
                .filter(|(_, mnt)| mnt == root_mnt)
                .map(|(h, _)| h),
            _ => None,
        };
        let (handle, ctimes) = if let Some(h) = dir_handle {
            (Handle::Dir(h), None)
        } else if linkable {
            match self.link(&fd, st.st_ino, id) {
                Ok(name) => {
                    let after = fstatat(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)
                        .map(|a| ctime(&a))
                        .unwrap_or_default();
                    (Handle::Link(name), Some((ctime(&st), after)))
                }
                Err(e) => {
                    // EPERM (protected_hardlinks for an unprivileged daemon), …
                    tracing::debug!(error = %e, "holding inode by fd");
                    (Handle::Fd(fd), None)
                }
            }
        } else {
            (Handle::Fd(fd), None)
        };
        let inode = Arc::new(Inode {
            id,
            key,
            is_dir,
            kind: st.st_mode & libc::S_IFMT,
            handle,
            lookups: AtomicU64::new(1),
            ctimes,
        });
        by_key.insert(key, id);
        self.inodes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, inode.clone());
        drop(by_key);
        // `st` is from before the link: already what the guest should see.
        Ok((inode, st))
    }

    fn link(&self, fd: &OwnedFd, ino: u64, id: u64) -> io::Result<CString> {
        let name = CString::new(format!("{ino:x}.{id:x}")).expect("no NUL in hex");
        let (proc, fdname) = via_proc(fd.as_raw_fd());
        // SAFETY: valid C strings and dirfds.
        cvt(unsafe {
            libc::linkat(
                proc,
                fdname.as_ptr(),
                self.workdir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        Ok(name)
    }

    fn mount_fd(&self) -> RawFd {
        self.dir_handles
            .as_ref()
            .map_or(-1, |(fd, _)| fd.as_raw_fd())
    }

    /// An `O_PATH` fd for the inode: its own, or one opened through its link or handle.
    pub fn path_fd<'a>(&self, inode: &'a Inode) -> io::Result<PathFd<'a>> {
        match &inode.handle {
            Handle::Fd(fd) => Ok(PathFd::Borrowed(fd.as_fd())),
            Handle::Dir(h) => open_handle(self.mount_fd(), h, libc::O_PATH).map(PathFd::Owned),
            Handle::Link(name) => openat(
                self.workdir.as_raw_fd(),
                name,
                libc::O_PATH | libc::O_NOFOLLOW,
            )
            .map(PathFd::Owned),
        }
    }

    /// Where path-based calls reach the inode: (dirfd, name) for `*at` calls, plus the fd that
    /// keeps the path valid. Linked inodes are reached by their workdir name (pass
    /// `AT_SYMLINK_NOFOLLOW`); the others through `/proc/self/fd` (to be followed).
    pub fn at_path<'a>(
        &self,
        inode: &'a Inode,
    ) -> io::Result<(Option<PathFd<'a>>, RawFd, CString)> {
        Ok(match &inode.handle {
            Handle::Link(name) => (None, self.workdir.as_raw_fd(), name.clone()),
            _ => {
                let fd = self.path_fd(inode)?;
                let (dir, name) = via_proc(fd.as_raw_fd());
                (Some(fd), dir, name)
            }
        })
    }

    /// The target of a symlink inode.
    pub fn readlink(&self, inode: &Inode) -> io::Result<Vec<u8>> {
        let fd = self.path_fd(inode)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: valid fd, C string and buffer of the given length.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Opens the inode for I/O with `flags` (not for symlinks, which cannot be opened).
    pub fn open(&self, inode: &Inode, flags: libc::c_int) -> io::Result<OwnedFd> {
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY) | libc::O_NOFOLLOW;
        match &inode.handle {
            Handle::Link(name) => openat(self.workdir.as_raw_fd(), name, flags),
            Handle::Dir(h) => open_handle(self.mount_fd(), h, flags),
            Handle::Fd(fd) => {
                let (proc, name) = via_proc(fd.as_raw_fd());
                openat(proc, &name, flags & !libc::O_NOFOLLOW)
            }
        }
    }

    /// The inode's attributes as the guest should see them: without our workdir link.
    pub fn stat(&self, inode: &Inode) -> io::Result<libc::stat> {
        match &inode.handle {
            Handle::Fd(_) | Handle::Dir(_) => fstatat(
                self.path_fd(inode)?.as_raw_fd(),
                c"",
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            ),
            Handle::Link(name) => {
                let mut st = fstatat(self.workdir.as_raw_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
                inode.hide_link(&mut st);
                Ok(st)
            }
        }
    }

    /// Forgets every inode but the root (the guest unmounted, rebooted or re-initialised).
    pub fn clear(&self) {
        let ids: Vec<u64> = self
            .inodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .filter(|&id| id != ROOT_ID)
            .collect();
        for id in ids {
            self.forget(id, u64::MAX);
        }
    }

    /// Drops `n` guest references; the inode (and its link) goes when none is left.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        let Ok(inode) = self.get(id) else { return };
        let left = inode
            .lookups
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| {
                Some(l.saturating_sub(n))
            })
            .map(|prev| prev.saturating_sub(n))
            .unwrap_or(0);
        if left > 0 {
            return;
        }
        by_key.remove(&inode.key);
        self.inodes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        drop(by_key);
        if let Handle::Link(name) = &inode.handle {
            // SAFETY: valid dirfd and C string.
            unsafe { libc::unlinkat(self.workdir.as_raw_fd(), name.as_ptr(), 0) };
        }
    }

    /// BATCH_FORGET.
    pub fn forget_many(&self, items: &[(u64, u64)]) {
        for &(id, n) in items {
            self.forget(id, n);
        }
    }

    pub fn counts(&self) -> StoreCounts {
        let inodes = self.inodes.read().unwrap_or_else(PoisonError::into_inner);
        let mut c = StoreCounts {
            inodes: inodes.len(),
            ..StoreCounts::default()
        };
        for i in inodes.values() {
            match i.handle {
                Handle::Link(_) => c.links += 1,
                Handle::Dir(_) => c.handles += 1,
                Handle::Fd(_) => c.fds += 1,
            }
        }
        c
    }
}

impl Drop for InodeStore {
    fn drop(&mut self) {
        for inode in self
            .inodes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            if let Handle::Link(name) = &inode.handle {
                // SAFETY: valid dirfd and C string.
                unsafe { libc::unlinkat(self.workdir.as_raw_fd(), name.as_ptr(), 0) };
            }
        }
    }
}
