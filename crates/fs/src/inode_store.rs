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
//!
//! Safety rules kept here:
//! - The workdir is opened without following a link and must be a directory the daemon owns;
//!   anything else at its name is refused before anything is touched, and emptying it never
//!   leaves it (`unlinkat` of its own entries).
//! - [`InodeStore::open`] opens only regular files and directories (EBADF otherwise, as
//!   virtiofsd): a device node, FIFO or socket the guest made is never opened on the host.
//! - An inode number is an identity only while something pins the inode (a link or an fd).
//!   Directories held by file handle are not pinned: their number can be reused by the file
//!   system once they are deleted, so a lookup compares the handle (which carries the inode's
//!   generation) before it returns an existing node.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::sys::{self, FileHandle, InodeAt, Name};

/// FUSE's root node id.
pub const ROOT_ID: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("workdir {path}: {source}")]
    Workdir { path: String, source: io::Error },
    #[error("workdir {path}: refused: {why}; nothing was changed")]
    WorkdirRefused { path: String, why: String },
    #[error("unknown node id {0}")]
    UnknownNode(u64),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<StoreError> for sys::Errno {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownNode(_) => sys::Errno(libc::ENOENT),
            StoreError::Io(e) | StoreError::Workdir { source: e, .. } => e.into(),
            StoreError::WorkdirRefused { .. } => sys::Errno(libc::EIO),
        }
    }
}

/// (st_dev, st_ino): what identifies an inode on the host while it is pinned.
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
    /// A hard link in the workdir, named by [`Inode::link_name`] (so no name is stored); no fd
    /// held.
    Link,
    /// A file handle (`name_to_handle_at`), for directories on the share's own mount when the
    /// daemon may open handles (CAP_DAC_READ_SEARCH); no fd held.
    Dir(FileHandle),
    /// An `O_PATH` fd.
    Fd(OwnedFd),
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

/// An `O_PATH` fd for an inode: the store's own (fd-held inodes) or one opened through the
/// inode's workdir link or file handle.
pub enum PathFd<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
    /// From the cache of directory fds (see [`DirFds`]).
    Shared(Arc<OwnedFd>),
}

impl AsFd for PathFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            PathFd::Borrowed(fd) => *fd,
            PathFd::Owned(fd) => fd.as_fd(),
            PathFd::Shared(fd) => fd.as_fd(),
        }
    }
}

/// How many directories held by file handle keep an open `O_PATH` fd ([`DirFds`]): enough for
/// the directories of a path walk in progress, few enough that holding a tree still costs a
/// handful of fds (the guest tests hold 20,000 inodes on fewer than 64).
pub const DIR_FDS: usize = 16;

/// `O_PATH` fds of the directories held by file handle that were used last, at most
/// [`DIR_FDS`]: a lookup in, or a getattr of, a cached directory opens nothing
/// (`open_by_handle_at` is the costliest call of a lookup otherwise), and holding many
/// directories still costs no fd each. A cached fd pins its directory, so while cached its
/// inode number is an identity, as a link's is.
#[derive(Default)]
struct DirFds {
    fds: HashMap<u64, (Arc<OwnedFd>, u64)>,
    /// Bumped on every use: the entry with the oldest stamp goes first.
    clock: u64,
}

impl DirFds {
    fn get(&mut self, id: u64) -> Option<Arc<OwnedFd>> {
        self.clock += 1;
        let now = self.clock;
        self.fds.get_mut(&id).map(|(fd, used)| {
            *used = now;
            fd.clone()
        })
    }

    fn insert(&mut self, id: u64, fd: Arc<OwnedFd>) {
        if self.fds.len() >= DIR_FDS && !self.fds.contains_key(&id) {
            let oldest = self
                .fds
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(&k, _)| k);
            if let Some(k) = oldest {
                self.fds.remove(&k);
            }
        }
        self.clock += 1;
        self.fds.insert(id, (fd, self.clock));
    }

    fn remove(&mut self, id: u64) {
        self.fds.remove(&id);
    }
}

/// The name of the workdir link of inode number `ino` held as node `id`: unique among our
/// links, and derived again whenever needed instead of stored with each inode.
fn link_file_name(ino: u64, id: u64) -> CString {
    CString::new(format!("{ino:x}.{id:x}")).expect("no NUL in hex")
}

impl Inode {
    /// The name of this inode's workdir link (meaningful for [`Handle::Link`] only).
    pub fn link_name(&self) -> CString {
        link_file_name(self.key.1, self.id)
    }

    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Acquire)
    }

    /// Whether opening this inode for I/O is safe: regular files and directories only.
    pub fn openable(&self) -> bool {
        matches!(self.kind, libc::S_IFREG | libc::S_IFDIR)
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
    /// The workdir's parent directory and its name there.
    workdir_entry: (InodeKey, CString),
    /// Links only work within one mount: inodes of other mounts are held by fd.
    workdir_mnt: Option<u64>,
    inodes: RwLock<HashMap<u64, Arc<Inode>>>,
    by_key: Mutex<HashMap<InodeKey, u64>>,
    next_id: AtomicU64,
    dir_fds: Mutex<DirFds>,
}

/// Opens the workdir at the absolute path `path`, creating it (0700) if absent. Refuses,
/// before touching anything, whatever else is at that name: a symlink (not followed), a file, a
/// directory owned by another user. Returns the workdir and where it stands: its parent
/// directory's key and its name (the file system layer hides that name from the guest).
pub fn open_workdir(path: &Path) -> Result<(OwnedFd, (InodeKey, CString)), StoreError> {
    let shown = || path.display().to_string();
    let err = |source| StoreError::Workdir {
        path: shown(),
        source,
    };
    let refuse = |why: String| StoreError::WorkdirRefused { path: shown(), why };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(refuse("not a path to a directory entry".into()));
    };
    let c = |p: &std::ffi::OsStr| {
        CString::new(p.as_encoded_bytes()).map_err(|_| refuse("the path holds a NUL byte".into()))
    };
    let parent =
        sys::open_abs(&c(parent.as_os_str())?, libc::O_PATH | libc::O_DIRECTORY).map_err(err)?;
    let name_c = c(name)?;
    let name = Name::new(&name_c).map_err(|_| refuse("not a single path component".into()))?;
    match sys::mkdirat(parent.as_fd(), name, 0o700) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(err(e)),
    }
    // O_NOFOLLOW|O_DIRECTORY: a symlink planted at this name fails instead of being followed.
    let dir =
        sys::openat(parent.as_fd(), name, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ELOOP | libc::ENOTDIR) => {
                    let link = sys::fstatat(parent.as_fd(), name)
                        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                    refuse(
                        if link {
                            "it is a symbolic link"
                        } else {
                            "it is not a directory"
                        }
                        .into(),
                    )
                }
                _ => err(e),
            }
        })?;
    let st = sys::fstat(dir.as_fd()).map_err(err)?;
    let me = sys::geteuid();
    if st.st_uid != me {
        return Err(refuse(format!(
            "it is owned by uid {}, not by the daemon (uid {me})",
            st.st_uid
        )));
    }
    if st.st_mode & 0o7777 != 0o700 {
        // Ours, reached without following a link: closing it to everyone else is safe.
        sys::fchmod(dir.as_fd(), 0o700).map_err(err)?;
    }
    let p = sys::fstat(parent.as_fd()).map_err(err)?;
    Ok((dir, ((p.st_dev, p.st_ino), name_c)))
}

/// Removes every non-directory entry of the workdir (it only ever holds our links). Works on
/// the workdir's own fd: `unlinkat` removes names, it never follows them out.
fn empty_dir(dir: &OwnedFd) -> io::Result<usize> {
    let mut names = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    sys::seekdir(dir.as_fd(), 0)?;
    loop {
        let batch = sys::getdents(dir.as_fd(), &mut buf)?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            let e = e?;
            if let Ok(n) = Name::new(e.name) {
                names.push(n.as_c_str().to_owned());
            }
        }
    }
    let mut removed = 0;
    for n in &names {
        let name = Name::new(n).expect("checked above");
        if sys::unlinkat(dir.as_fd(), name, 0).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
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
        sys::init_proc()?;
        let (dir, workdir_entry) = open_workdir(workdir)?;
        let stale = empty_dir(&dir).map_err(err)?;
        if stale > 0 {
            tracing::warn!(workdir = %workdir.display(), links = stale, "removed links left by a previous run");
        }
        let st = sys::fstat(dir.as_fd()).map_err(err)?;
        let root_st = sys::fstat(root.as_fd())?;
        // Directories by handle need the right to open handles: probe it once on the root.
        let dir_handles = match mode {
            StoreMode::Fd => None,
            // open_by_handle_at() takes no O_PATH fd for the mount: open the root for reading.
            StoreMode::Workdir => sys::name_to_handle(root.as_fd())
                .and_then(|(h, mnt)| {
                    let mount_fd = sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                    sys::open_by_handle(mount_fd.as_fd(), &h, libc::O_PATH)?;
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
            workdir_mnt: sys::mnt_id(dir.as_fd()),
            workdir: dir,
            workdir_key: (st.st_dev, st.st_ino),
            workdir_entry,
            inodes: RwLock::new(HashMap::new()),
            by_key: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(ROOT_ID + 1),
            dir_fds: Mutex::new(DirFds::default()),
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

    /// The workdir's parent directory and the workdir's name in it.
    pub fn workdir_entry(&self) -> (InodeKey, &CStr) {
        (self.workdir_entry.0, &self.workdir_entry.1)
    }

    /// Looks `name` up in directory `parent` and counts one guest reference to the result.
    /// Returns the attributes the guest should see.
    pub fn lookup(
        &self,
        parent: &Inode,
        name: Name<'_>,
    ) -> Result<(Arc<Inode>, libc::stat), StoreError> {
        self.lookup_at(self.path_fd(parent)?.as_fd(), name)
    }

    /// [`InodeStore::lookup`] in the directory `dir` (an fd of a directory the guest holds).
    pub fn lookup_at(
        &self,
        dir: BorrowedFd<'_>,
        name: Name<'_>,
    ) -> Result<(Arc<Inode>, libc::stat), StoreError> {
        if let Some(known) = self.lookup_known(dir, name)? {
            return Ok(known);
        }
        self.adopt(sys::open_path(dir, name)?)
    }

    /// The lookup of a name whose inode the guest already holds, pinned (by a link, an fd or a
    /// cached directory fd): one `fstatat`, no fd opened. The inode behind the name when it was
    /// stat'ed carries the key of a pinned inode, and a pinned inode's number is not reused, so
    /// it is that inode. `None`: not such an inode, the caller opens the name and adopts it.
    /// A name that does not exist fails here, with the `fstatat`'s error.
    fn lookup_known(
        &self,
        dir: BorrowedFd<'_>,
        name: Name<'_>,
    ) -> Result<Option<(Arc<Inode>, libc::stat)>, StoreError> {
        let mut st = sys::fstatat(dir, name)?;
        let key = (st.st_dev, st.st_ino);
        if key == self.workdir_key {
            return Err(io::Error::from_raw_os_error(libc::ENOENT).into());
        }
        let by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(&id) = by_key.get(&key) else {
            return Ok(None);
        };
        let Ok(inode) = self.get(id) else {
            return Ok(None);
        };
        let pinned = match inode.handle {
            Handle::Link | Handle::Fd(_) => true,
            Handle::Dir(_) => self.dir_fds().get(id).is_some(),
        };
        if !pinned || inode.kind != st.st_mode & libc::S_IFMT {
            return Ok(None);
        }
        inode.lookups.fetch_add(1, Ordering::AcqRel);
        drop(by_key);
        inode.hide_link(&mut st);
        Ok(Some((inode, st)))
    }

    /// Drops the cached fd of the directory known under `key`, if any (it was removed).
    pub fn uncache_dir(&self, key: InodeKey) {
        let by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = by_key.get(&key) {
            self.dir_fds().remove(id);
        }
    }

    fn dir_fds(&self) -> std::sync::MutexGuard<'_, DirFds> {
        self.dir_fds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `known`, found under the key of the inode behind `fd`, is that inode. Linked and
    /// fd-held inodes pin their number, so the key is enough; a directory held by handle does
    /// not, and its number may have been reused since it was deleted.
    fn same_inode(known: &Inode, fd: &OwnedFd, st: &libc::stat) -> bool {
        if known.kind != st.st_mode & libc::S_IFMT {
            return false;
        }
        match &known.handle {
            Handle::Dir(h) => sys::name_to_handle(fd.as_fd()).is_ok_and(|(now, _)| &now == h),
            Handle::Link | Handle::Fd(_) => true,
        }
    }

    /// Counts one guest reference to the inode `fd` (an `O_PATH` fd) refers to, taking it into
    /// the table if it is new.
    pub fn adopt(&self, fd: OwnedFd) -> Result<(Arc<Inode>, libc::stat), StoreError> {
        let mut st = sys::fstat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        if key == self.workdir_key {
            return Err(io::Error::from_raw_os_error(libc::ENOENT).into());
        }
        let mut by_key = self.by_key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(&id) = by_key.get(&key) {
            let inode = self.get(id)?;
            if Self::same_inode(&inode, &fd, &st) {
                inode.lookups.fetch_add(1, Ordering::AcqRel);
                if matches!(inode.handle, Handle::Dir(_)) {
                    // Looked up now, likely walked through next: keep the fd we have. Under
                    // the key lock, so a forget of the node uncaches it after this.
                    self.dir_fds().insert(id, Arc::new(fd));
                }
                drop(by_key);
                inode.hide_link(&mut st);
                return Ok((inode, st));
            }
            // A new inode under a reused number: it gets a node id of its own below, and the
            // old node (which the guest may still hold) answers ESTALE until forgotten.
            tracing::debug!(old = id, "inode number reused");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let linkable = self.mode == StoreMode::Workdir
            && !is_dir
            && st.st_dev == self.workdir_key.0
            && (self.workdir_mnt.is_none() || sys::mnt_id(fd.as_fd()) == self.workdir_mnt);
        let dir_handle = match &self.dir_handles {
            Some((_, root_mnt)) if is_dir => sys::name_to_handle(fd.as_fd())
                .ok()
                .filter(|(_, mnt)| mnt == root_mnt)
                .map(|(h, _)| h),
            _ => None,
        };
        let mut dir_fd = None;
        let (handle, ctimes) = if let Some(h) = dir_handle {
            dir_fd = Some(fd);
            (Handle::Dir(h), None)
        } else if linkable {
            match self.link(&fd, st.st_ino, id) {
                Ok(()) => {
                    let after = sys::fstat(fd.as_fd())
                        .map(|a| ctime(&a))
                        .unwrap_or_default();
                    (Handle::Link, Some((ctime(&st), after)))
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
        if let Some(fd) = dir_fd {
            // Under the key lock: a forget of this node cannot run before it is cached.
            self.dir_fds().insert(id, Arc::new(fd));
        }
        drop(by_key);
        // `st` is from before the link: already what the guest should see.
        Ok((inode, st))
    }

    fn link(&self, fd: &OwnedFd, ino: u64, id: u64) -> io::Result<()> {
        let name = link_file_name(ino, id);
        InodeAt::proc(fd.as_fd()).link_to(self.workdir.as_fd(), Self::link_component(&name))
    }

    fn mount_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.dir_handles
            .as_ref()
            .map(|(fd, _)| fd.as_fd())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
    }

    fn link_component<'n>(name: &'n CString) -> Name<'n> {
        Name::new(name).expect("our link names are single components")
    }

    /// An `O_PATH` fd for the inode: its own, or one opened through its link or handle.
    pub fn path_fd<'a>(&self, inode: &'a Inode) -> io::Result<PathFd<'a>> {
        match &inode.handle {
            Handle::Fd(fd) => Ok(PathFd::Borrowed(fd.as_fd())),
            Handle::Dir(h) => {
                if let Some(fd) = self.dir_fds().get(inode.id) {
                    return Ok(PathFd::Shared(fd));
                }
                let fd = Arc::new(sys::open_by_handle(self.mount_fd()?, h, libc::O_PATH)?);
                // Not cached once forgotten: the cache must not pin a directory nobody holds.
                if inode.lookups() > 0 {
                    self.dir_fds().insert(inode.id, fd.clone());
                }
                Ok(PathFd::Shared(fd))
            }
            Handle::Link => {
                let name = inode.link_name();
                sys::open_path(self.workdir.as_fd(), Self::link_component(&name)).map(PathFd::Owned)
            }
        }
    }

    /// Runs `f` with the path that reaches the inode for path-based calls: its workdir link
    /// (linked inodes), else its `/proc/self/fd` entry.
    pub fn with_path<T>(
        &self,
        inode: &Inode,
        f: impl FnOnce(&InodeAt<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        match &inode.handle {
            Handle::Link => f(&InodeAt::link(self.workdir.as_fd(), &inode.link_name())),
            _ => {
                let fd = self.path_fd(inode)?;
                f(&InodeAt::proc(fd.as_fd()))
            }
        }
    }

    /// The target of a symlink inode.
    pub fn readlink(&self, inode: &Inode) -> io::Result<Vec<u8>> {
        sys::readlink(self.path_fd(inode)?.as_fd())
    }

    /// Opens the inode for I/O with `flags`. Only regular files and directories are ever
    /// opened: anything else is EBADF, as virtiofsd answers, so no guest-made device node, FIFO
    /// or socket is opened on the host and no open can block.
    pub fn open(&self, inode: &Inode, flags: libc::c_int) -> io::Result<OwnedFd> {
        if !inode.openable() {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
        match &inode.handle {
            Handle::Link => {
                let name = inode.link_name();
                sys::openat(self.workdir.as_fd(), Self::link_component(&name), flags, 0)
            }
            Handle::Dir(h) => sys::open_by_handle(self.mount_fd()?, h, flags | libc::O_NOFOLLOW),
            Handle::Fd(fd) => sys::reopen(fd.as_fd(), flags),
        }
    }

    /// The inode's attributes as the guest should see them: without our workdir link.
    pub fn stat(&self, inode: &Inode) -> io::Result<libc::stat> {
        match &inode.handle {
            Handle::Fd(_) | Handle::Dir(_) => sys::fstat(self.path_fd(inode)?.as_fd()),
            Handle::Link => {
                let name = inode.link_name();
                let mut st = sys::fstatat(self.workdir.as_fd(), Self::link_component(&name))?;
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
        // A reused number may already map to a newer inode: leave that mapping alone.
        if by_key.get(&inode.key) == Some(&id) {
            by_key.remove(&inode.key);
        }
        self.inodes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        drop(by_key);
        self.dir_fds().remove(id);
        self.unlink(&inode);
    }

    fn unlink(&self, inode: &Inode) {
        if let Handle::Link = &inode.handle {
            let name = inode.link_name();
            let _ = sys::unlinkat(self.workdir.as_fd(), Self::link_component(&name), 0);
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
                Handle::Link => c.links += 1,
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
            self.unlink(inode);
        }
    }
}
