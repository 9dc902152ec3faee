//! The inode table of the passthrough file system.
//!
//! virtiofsd keeps one `O_PATH` fd per inode the guest has looked up, so a guest that caches a
//! large tree exhausts the daemon's fds. Here a non-directory is instead held by a hard link in a
//! private workdir on the same file system: `linkat("/proc/self/fd/N", AT_SYMLINK_FOLLOW)` needs
//! no capability, the fd is closed once the link is made, and the inode is reopened through the
//! link when needed. The link is removed when the guest forgets the inode.
//!
//! A new regular file is not linked at once: the newest [`YOUNG_FDS`] are held by their fd, and
//! the oldest of them is linked as a newer one comes, so a short-lived file (made, used,
//! removed and forgotten) costs no link and no unlink. One removed before its turn cannot be
//! linked any more (a name-less inode has nothing to link); it stays held by its fd until the
//! guest forgets it, and uses up the young budget meanwhile ([`Young::kept`]). Other linkable
//! inodes (symlinks, device nodes, FIFOs, sockets) are linked at once: reached through
//! `/proc/self/fd` a symlink would be followed, which would refuse its chown and utimes.
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
//! The table itself ([`crate::inode_table`]) is compact: a fixed-size record per inode (no fd,
//! no name: a link's name is derived from its inode number and node id), the key index a table
//! of slot numbers, and the few file handles and fds out of line. What callers get is an
//! [`Inode`], a copy of the record taken under the table's lock.
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
//! - A node id is never handed out twice (slots carry a generation; one that would wrap is
//!   retired): an id the guest kept past its forget, or made up, is unknown (ENOENT), and an
//!   [`Inode`] copy of a forgotten node reaches that node's link name, handle or fd only, never
//!   another inode's.

// foldhash: the keys are ids the daemon hands out, not values a guest picks.
use hashbrown::{HashMap, HashSet};
use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::inode_table::{self, NewRecord, Table, TableError};
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
    Table(#[from] TableError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<StoreError> for sys::Errno {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownNode(_) => sys::Errno(libc::ENOENT),
            StoreError::Io(e) | StoreError::Workdir { source: e, .. } => e.into(),
            StoreError::WorkdirRefused { .. } => sys::Errno(libc::EIO),
            StoreError::Table(_) => sys::Errno(libc::ENFILE),
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
#[derive(Clone, Debug)]
pub enum Handle {
    /// A hard link in the workdir, named by [`Inode::link_name`] (so no name is stored); no fd
    /// held.
    Link,
    /// A file handle (`name_to_handle_at`), for directories on the share's own mount when the
    /// daemon may open handles (CAP_DAC_READ_SEARCH); no fd held.
    Dir(Arc<FileHandle>),
    /// An `O_PATH` fd (shared with the copies of the inode in use: it closes when the inode is
    /// forgotten and the last copy is dropped).
    Fd(Arc<OwnedFd>),
}

/// The part of an inode not held by a link, kept out of the table's records.
#[derive(Clone, Debug)]
enum Rare {
    Dir(Arc<FileHandle>),
    Fd(Arc<OwnedFd>),
}

type Shared = RwLock<Table<Rare>>;

/// A copy of an inode's record, taken under the table's lock: cheap to clone (the file handle
/// or fd is shared). Only its lookup count is read live, from the table.
#[derive(Clone)]
pub struct Inode {
    pub id: u64,
    pub key: InodeKey,
    pub is_dir: bool,
    /// The file type bits (`S_IFMT`) of `st_mode`; an inode never changes type.
    pub kind: libc::mode_t,
    pub handle: Handle,
    /// For linked inodes: the ctime before and just after our `linkat`.
    ctimes: Option<(Ctime, Ctime)>,
    table: Arc<Shared>,
}

impl std::fmt::Debug for Inode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inode")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("kind", &self.kind)
            .field("handle", &self.handle)
            .field("ctimes", &self.ctimes)
            .finish_non_exhaustive()
    }
}

type Ctime = inode_table::Ctime;

fn ctime(st: &libc::stat) -> Ctime {
    (st.st_ctime, st.st_ctime_nsec)
}

fn read(t: &Shared) -> RwLockReadGuard<'_, Table<Rare>> {
    t.read().unwrap_or_else(PoisonError::into_inner)
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

/// How many new inodes a workdir store holds by their `O_PATH` fd before it links the oldest
/// of them into the workdir. Linking costs two directory changes (the link, and its unlink at
/// the forget), which make a first lookup dearer than an fd-holding daemon's; a file made and
/// removed while still among the newest [`YOUNG_FDS`] (a build's temporary files, a test's
/// scratch files) never costs them: its forget just closes its fd. Holding a tree still costs
/// a bounded handful of fds.
pub const YOUNG_FDS: usize = 64;

/// The young inodes: held by their fd until [`YOUNG_FDS`] newer ones came. Guarded by the key
/// lock.
struct Young {
    /// Oldest first. Ids forgotten meanwhile stay until they reach the front.
    ids: VecDeque<u64>,
    /// Young inodes the kernel would not link when their turn came, that the guest still holds:
    /// most often a file removed before then (a name-less inode has nothing to link). They stay
    /// held by fd until forgotten, and they count against [`YOUNG_FDS`]: a guest that keeps
    /// removed files without forgetting them makes new files linked at once, as before young
    /// files, instead of making the daemon hold an fd more for each.
    kept: HashSet<u64>,
}

/// How many directories held by file handle keep an open `O_PATH` fd ([`DirFds`]): enough for
/// the directories of a path walk 64 levels deep (a walk deeper than the cache misses it at
/// every level, being least recently used, and pays `open_by_handle_at` each time), few enough
/// that holding a tree still costs a bounded handful of fds (the guest tests hold 20,000
/// inodes on fewer than 128).
pub const DIR_FDS: usize = 64;

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
fn link_file_name(ino: u64, id: u64) -> LinkName {
    LinkName::new(ino, id)
}

/// A workdir link's name, `{ino:x}.{id:x}`, built on the stack: it is made for every stat,
/// open and unlink of a linked inode.
#[derive(Clone, Copy)]
pub struct LinkName {
    /// Two numbers of at most 16 hex digits each, the dot and the NUL.
    buf: [u8; 34],
    len: usize,
}

impl LinkName {
    fn new(ino: u64, id: u64) -> Self {
        let mut n = LinkName {
            buf: [0; 34],
            len: 0,
        };
        n.push_hex(ino);
        n.buf[n.len] = b'.';
        n.len += 1;
        n.push_hex(id);
        n
    }

    fn push_hex(&mut self, v: u64) {
        let digits = (64 - v.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            let d = (v >> (4 * (digits - 1 - i))) & 0xf;
            self.buf[self.len + i] = b"0123456789abcdef"[d as usize];
        }
        self.len += digits;
    }

    pub fn as_c_str(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.buf[..=self.len]).expect("one NUL, at the end")
    }

    fn component(&self) -> Name<'_> {
        Name::new(self.as_c_str()).expect("our link names are single components")
    }
}

impl Inode {
    /// The name of this inode's workdir link (meaningful for [`Handle::Link`] only).
    pub fn link_name(&self) -> LinkName {
        link_file_name(self.key.1, self.id)
    }

    /// The guest's references to this node now: 0 once it is forgotten.
    pub fn lookups(&self) -> u64 {
        read(&self.table).lookups(self.id).unwrap_or(0)
    }

    /// Whether opening this inode for I/O is safe: regular files and directories only.
    pub fn openable(&self) -> bool {
        matches!(self.kind, libc::S_IFREG | libc::S_IFDIR)
    }

    /// Takes our workdir link out of `st` (taken through the link or an fd of this inode).
    fn hide_link(&self, st: &mut libc::stat) {
        if let Handle::Link = self.handle {
            st.st_nlink = st.st_nlink.saturating_sub(1);
            if let Some((before, after)) = self.ctimes {
                if ctime(st) == after {
                    (st.st_ctime, st.st_ctime_nsec) = before;
                }
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
    /// Of `fds`: the young inodes, held by fd until they are linked ([`YOUNG_FDS`]).
    pub young: usize,
    /// Of `fds`: linkable inodes the kernel would not link when their turn came ([`Young::kept`]).
    pub kept: usize,
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
    /// The key lock: held by whatever decides which inodes the table holds and counts their
    /// lookups (adopt, the lookup of a known inode, forget), across the system calls that
    /// decide it, so two lookups of one new inode make one node and a forget never runs between
    /// finding a node and counting the lookup. Taken before the table's lock and the dir fd
    /// cache's; those two are never held together but for the cache's lock taken first
    /// (`path_fd`).
    /// It guards the young inodes too ([`Young`]): adopting and settling them decide how the
    /// table holds inodes.
    keys: Mutex<Young>,
    /// How many young inodes are held by fd ([`YOUNG_FDS`]; 0: linked at once).
    young_fds: usize,
    /// The inodes; its lock is held for memory work only, never across a system call. The
    /// [`Inode`] copies share it to read their lookup counts.
    table: Arc<Shared>,
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

    /// Holds at most `n` young inodes by fd instead of [`YOUNG_FDS`]; 0 links every linkable
    /// inode as it is adopted.
    pub fn with_young_fds(mut self, n: usize) -> Self {
        self.young_fds = n;
        self
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
        // The table's first record is node 1.
        let mut table = Table::new();
        let slot = table.reserve((root_st.st_dev, root_st.st_ino))?;
        debug_assert_eq!(slot.id(), ROOT_ID);
        table.fill(
            slot,
            NewRecord {
                kind: libc::S_IFDIR,
                ctimes: None,
                rare: Some(Rare::Fd(Arc::new(root))),
                lookups: 1,
            },
        );
        Ok(Self {
            mode,
            dir_handles,
            workdir_mnt: sys::mnt_id(dir.as_fd()),
            workdir: dir,
            workdir_key: (st.st_dev, st.st_ino),
            workdir_entry,
            keys: Mutex::new(Young {
                ids: VecDeque::with_capacity(YOUNG_FDS + 1),
                kept: HashSet::default(),
            }),
            young_fds: YOUNG_FDS,
            table: Arc::new(RwLock::new(table)),
            dir_fds: Mutex::new(DirFds::default()),
        })
    }

    fn table(&self) -> RwLockReadGuard<'_, Table<Rare>> {
        read(&self.table)
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, Table<Rare>> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn keys(&self) -> MutexGuard<'_, Young> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn inode(&self, e: inode_table::Entry<Rare>) -> Inode {
        Inode {
            id: e.id,
            key: e.key,
            is_dir: e.kind == libc::S_IFDIR,
            kind: e.kind,
            handle: match e.rare {
                None => Handle::Link,
                Some(Rare::Dir(h)) => Handle::Dir(h),
                Some(Rare::Fd(fd)) => Handle::Fd(fd),
            },
            ctimes: e.ctimes,
            table: self.table.clone(),
        }
    }

    pub fn get(&self, id: u64) -> Result<Inode, StoreError> {
        let entry = self.table().get(id);
        entry
            .map(|e| self.inode(e))
            .ok_or(StoreError::UnknownNode(id))
    }

    /// The node indexed under `key` (the newest inode of that number).
    fn find(&self, key: InodeKey) -> Option<Inode> {
        let entry = {
            let t = self.table();
            t.find(key).and_then(|id| t.get(id))
        };
        entry.map(|e| self.inode(e))
    }

    /// Bytes the inode table has allocated (figures only).
    pub fn table_bytes(&self) -> usize {
        self.table().heap_bytes()
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
    ) -> Result<(Inode, libc::stat), StoreError> {
        self.lookup_at(self.path_fd(parent)?.as_fd(), name)
    }

    /// [`InodeStore::lookup`] in the directory `dir` (an fd of a directory the guest holds).
    pub fn lookup_at(
        &self,
        dir: BorrowedFd<'_>,
        name: Name<'_>,
    ) -> Result<(Inode, libc::stat), StoreError> {
        if let Some(known) = self.lookup_known(dir, name)? {
            return Ok(known);
        }
        self.adopt(sys::open_path(dir, name)?)
    }

    /// The lookup of a name whose inode the guest already holds, pinned (by a link, an fd or a
    /// cached directory fd): one `fstatat`, no fd opened. The inode behind the name when it was
    /// stat'ed carries the key of a pinned inode, and a pinned inode's number is not reused, so
    /// it is that inode. A directory held by handle alone is confirmed by the name's handle
    /// (one more call, still no fd). `None`: not such an inode, the caller opens the name and
    /// adopts it. A name that does not exist fails here, with the `fstatat`'s error.
    fn lookup_known(
        &self,
        dir: BorrowedFd<'_>,
        name: Name<'_>,
    ) -> Result<Option<(Inode, libc::stat)>, StoreError> {
        // Nothing pins the name's inode between the stat and the key lock: another queue may
        // forget it and adopt a new inode under its reused number meanwhile. Adopting fills a
        // record (under the key lock), so an unchanged fill count says that did not happen.
        let fills = self.table().fills();
        let mut st = sys::fstatat(dir, name)?;
        let key = (st.st_dev, st.st_ino);
        if key == self.workdir_key {
            return Err(io::Error::from_raw_os_error(libc::ENOENT).into());
        }
        let keys = self.keys();
        if self.table().fills() != fills {
            return Ok(None);
        }
        let Some(inode) = self.find(key) else {
            return Ok(None);
        };
        let pinned = match &inode.handle {
            Handle::Link | Handle::Fd(_) => true,
            // Not pinned: its number may belong to a new directory by now. The handle carries
            // the inode's generation, so the name's handle matching ours says it is the same
            // one, without opening it (a walk deeper than the fd cache meets this at every
            // level).
            Handle::Dir(h) => {
                self.dir_fds().get(inode.id).is_some()
                    || self.dir_handles.as_ref().is_some_and(|(_, root_mnt)| {
                        sys::name_to_handle_at(dir, name)
                            .is_ok_and(|(now, mnt)| mnt == *root_mnt && now == **h)
                    })
            }
        };
        if !pinned || inode.kind != st.st_mode & libc::S_IFMT {
            return Ok(None);
        }
        // Under the key lock, as the find: no forget ran in between, the node is still there.
        self.table_mut().add_lookups(inode.id, 1);
        drop(keys);
        inode.hide_link(&mut st);
        Ok(Some((inode, st)))
    }

    /// Drops the cached fd of the directory known under `key`, if any (it was removed).
    pub fn uncache_dir(&self, key: InodeKey) {
        let _keys = self.keys();
        let id = self.table().find(key);
        if let Some(id) = id {
            self.dir_fds().remove(id);
        }
    }

    fn dir_fds(&self) -> MutexGuard<'_, DirFds> {
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
            Handle::Dir(h) => sys::name_to_handle(fd.as_fd()).is_ok_and(|(now, _)| now == **h),
            Handle::Link | Handle::Fd(_) => true,
        }
    }

    /// Counts one guest reference to the inode `fd` (an `O_PATH` fd) refers to, taking it into
    /// the table if it is new.
    pub fn adopt(&self, fd: OwnedFd) -> Result<(Inode, libc::stat), StoreError> {
        let mut st = sys::fstat(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        if key == self.workdir_key {
            return Err(io::Error::from_raw_os_error(libc::ENOENT).into());
        }
        let mut keys = self.keys();
        if let Some(inode) = self.find(key) {
            if Self::same_inode(&inode, &fd, &st) {
                self.table_mut().add_lookups(inode.id, 1);
                if matches!(inode.handle, Handle::Dir(_)) {
                    // Looked up now, likely walked through next: keep the fd we have. Under
                    // the key lock, so a forget of the node uncaches it after this.
                    self.dir_fds().insert(inode.id, Arc::new(fd));
                }
                drop(keys);
                inode.hide_link(&mut st);
                return Ok((inode, st));
            }
            // A new inode under a reused number: it gets a node id of its own below, and the
            // old node (which the guest may still hold) answers ESTALE until forgotten.
            tracing::debug!(old = inode.id, "inode number reused");
        }
        let kind = st.st_mode & libc::S_IFMT;
        let is_dir = kind == libc::S_IFDIR;
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
        // The node id first: the link is named after it. Only key-lock holders fill or free
        // slots, so the reservation is ours until filled below.
        let slot = self.table_mut().reserve(key)?;
        let id = slot.id();
        let mut dir_fd = None;
        // A linkable inode starts young: held by its fd, linked once YOUNG_FDS newer ones came.
        let rare = if let Some(h) = dir_handle {
            dir_fd = Some(fd);
            Rare::Dir(Arc::new(h))
        } else {
            Rare::Fd(Arc::new(fd))
        };
        let mut entry = self.table_mut().fill(
            slot,
            NewRecord {
                kind,
                ctimes: None,
                rare: Some(rare),
                lookups: 1,
            },
        );
        if let Some(fd) = dir_fd {
            // Under the key lock: a forget of this node cannot run before it is cached.
            self.dir_fds().insert(id, Arc::new(fd));
        }
        if linkable {
            drop(entry);
            if kind == libc::S_IFREG {
                keys.ids.push_back(id);
                self.settle_oldest(&mut keys);
            } else {
                // Not in use yet: no request has a copy.
                self.try_settle(&mut keys, id);
            }
            // The record as it is now: linked already if no young inode is kept. Under the key
            // lock, so no forget ran in between.
            entry = self.table().get(id).ok_or(StoreError::UnknownNode(id))?;
        }
        drop(keys);
        // `st` is from before any link: already what the guest should see.
        Ok((self.inode(entry), st))
    }

    /// Links the oldest young inodes into the workdir until at most `young_fds` are left
    /// besides the kept ones, skipping ids forgotten meanwhile. Under the key lock.
    fn settle_oldest(&self, young: &mut Young) {
        let mut busy = Vec::new();
        while young.ids.len() + busy.len() + young.kept.len() > self.young_fds {
            let Some(id) = young.ids.pop_front() else {
                break;
            };
            if !self.try_settle(young, id) {
                busy.push(id);
            }
        }
        // Oldest still: first in line next time.
        for id in busy.into_iter().rev() {
            young.ids.push_front(id);
        }
    }

    /// Links the inode `id` if it is still held by its fd; false if a request is using it now
    /// (a copy of it is out), to try again later: settled under that request, its `stat`
    /// through the fd would show our link. (A request that takes its copy while the link is
    /// being made may still see it once.) One the kernel refuses to link is kept by its fd.
    /// Under the key lock.
    fn try_settle(&self, young: &mut Young, id: u64) -> bool {
        let Some(entry) = self.table().get(id) else {
            return true;
        };
        let Some(Rare::Fd(fd)) = entry.rare else {
            return true;
        };
        // Ours, and the table's.
        if Arc::strong_count(&fd) > 2 {
            return false;
        }
        if !self.settle(id, entry.key.1, &fd) {
            young.kept.insert(id);
        }
        true
    }

    /// Holds the inode `id` (inode number `ino`, open as `fd`) by a workdir link from now on,
    /// its fd closed; false if the kernel refuses to link it (removed since, so no name is left
    /// to link; EPERM from `protected_hardlinks` for an unprivileged daemon; ENOSPC, EMLINK):
    /// it stays held by its fd.
    fn settle(&self, id: u64, ino: u64, fd: &OwnedFd) -> bool {
        let Ok(before) = sys::fstat(fd.as_fd()) else {
            return false;
        };
        if let Err(e) = self.link(fd, ino, id) {
            tracing::debug!(error = %e, "holding inode by fd");
            return false;
        }
        let after = sys::fstat(fd.as_fd())
            .map(|a| ctime(&a))
            .unwrap_or_default();
        // The fd the table held closes as our copy goes.
        self.table_mut().settle(id, Some((ctime(&before), after)));
        true
    }

    fn link(&self, fd: &OwnedFd, ino: u64, id: u64) -> io::Result<()> {
        let name = link_file_name(ino, id);
        sys::link_fd(fd.as_fd(), self.workdir.as_fd(), name.component())
    }

    fn mount_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.dir_handles
            .as_ref()
            .map(|(fd, _)| fd.as_fd())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))
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
                // Checked under the cache's lock: a forget frees the node before it uncaches
                // it, so either the node is gone here or its forget uncaches after this.
                let mut cache = self.dir_fds();
                if inode.lookups() > 0 {
                    cache.insert(inode.id, fd.clone());
                }
                Ok(PathFd::Shared(fd))
            }
            Handle::Link => {
                let name = inode.link_name();
                sys::open_path(self.workdir.as_fd(), name.component()).map(PathFd::Owned)
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
            Handle::Link => f(&InodeAt::link(
                self.workdir.as_fd(),
                inode.link_name().as_c_str(),
            )),
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
                sys::openat(self.workdir.as_fd(), name.component(), flags, 0)
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
                let mut st = sys::fstatat(self.workdir.as_fd(), name.component())?;
                inode.hide_link(&mut st);
                Ok(st)
            }
        }
    }

    /// Forgets every inode but the root (the guest unmounted, rebooted or re-initialised).
    pub fn clear(&self) {
        let ids: Vec<u64> = self.table().ids().filter(|&id| id != ROOT_ID).collect();
        for id in ids {
            self.forget(id, u64::MAX);
        }
    }

    /// Drops `n` guest references; the inode (and its link) goes when none is left. An id that
    /// is not a live node (never handed out, or forgotten, its slot maybe reused under another
    /// generation) changes nothing.
    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut keys = self.keys();
        let removed = self.table_mut().forget(id, n);
        if removed.is_some() {
            keys.kept.remove(&id);
        }
        drop(keys);
        let Some(removed) = removed else { return };
        self.dir_fds().remove(id);
        if removed.rare.is_none() {
            self.unlink(removed.key.1, id);
        }
        // An fd of the node closes here (outside every lock), unless a copy still holds it.
        drop(removed);
    }

    fn unlink(&self, ino: u64, id: u64) {
        let name = link_file_name(ino, id);
        let _ = sys::unlinkat(self.workdir.as_fd(), name.component(), 0);
    }

    /// BATCH_FORGET.
    pub fn forget_many(&self, items: &[(u64, u64)]) {
        for &(id, n) in items {
            self.forget(id, n);
        }
    }

    pub fn counts(&self) -> StoreCounts {
        let young = self.keys();
        let t = self.table();
        let mut c = StoreCounts {
            inodes: t.len(),
            ..StoreCounts::default()
        };
        for r in t.rare_parts() {
            match r {
                Rare::Dir(_) => c.handles += 1,
                Rare::Fd(_) => c.fds += 1,
            }
        }
        // What has no rare part is held by its link.
        c.links = c.inodes - c.handles - c.fds;
        c.kept = young.kept.len();
        c.young = young
            .ids
            .iter()
            .filter(|&&id| {
                t.get(id)
                    .is_some_and(|e| matches!(e.rare, Some(Rare::Fd(_))))
            })
            .count();
        c
    }
}

impl Drop for InodeStore {
    fn drop(&mut self) {
        let t = read(&self.table);
        for (id, (_, ino)) in t.plain() {
            self.unlink(ino, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::path::PathBuf;

    use super::*;

    fn open_dir(p: &Path) -> OwnedFd {
        let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        sys::open_abs(&c, libc::O_PATH | libc::O_DIRECTORY).unwrap()
    }

    fn lookup(s: &InodeStore, parent: &Inode, name: &str) -> Result<Inode, StoreError> {
        let c = CString::new(name).unwrap();
        s.lookup(parent, Name::new(&c).unwrap()).map(|(i, _)| i)
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut text = String::new();
        std::fs::File::from(fd).read_to_string(&mut text).unwrap();
        text
    }

    fn entries(p: &Path) -> usize {
        std::fs::read_dir(p).unwrap().count()
    }

    /// A share and a workdir, on the same file system unless `share_in` says where the share
    /// goes.
    fn setup(share_in: Option<&str>) -> (Vec<tempfile::TempDir>, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        let (share, mut dirs) = match share_in {
            Some(at) => {
                let s = tempfile::tempdir_in(at).unwrap();
                (s.path().to_owned(), vec![s])
            }
            None => {
                let share = t.path().join("share");
                std::fs::create_dir(&share).unwrap();
                (share, Vec::new())
            }
        };
        dirs.push(t);
        (dirs, share, work)
    }

    #[test]
    fn new_inodes_are_held_by_fd_until_enough_newer_ones_came() {
        let (_t, share, work) = setup(None);
        let n = YOUNG_FDS + 3;
        for i in 0..n {
            std::fs::write(share.join(format!("f{i}")), format!("{i}")).unwrap();
        }
        let s = InodeStore::new(&work, open_dir(&share)).unwrap();
        let root = s.get(ROOT_ID).unwrap();
        // Young: an fd, no link, nothing to hide.
        let first = lookup(&s, &root, "f0").unwrap();
        assert!(matches!(first.handle, Handle::Fd(_)));
        assert_eq!(entries(&work), 0);
        assert_eq!(s.stat(&first).unwrap().st_nlink, 1);
        // A young inode the guest forgets leaves nothing: no link was made, its fd closes.
        s.forget(first.id, 1);
        assert_eq!((entries(&work), s.counts().inodes), (0, 1));
        // The oldest beyond YOUNG_FDS are linked; while a request uses one it waits.
        let held: Vec<Inode> = (1..=YOUNG_FDS)
            .map(|i| lookup(&s, &root, &format!("f{i}")).unwrap())
            .collect();
        let busy = s.get(held[0].id).unwrap();
        drop(held);
        let newest = lookup(&s, &root, &format!("f{}", YOUNG_FDS + 1)).unwrap();
        assert!(matches!(newest.handle, Handle::Fd(_)));
        assert_eq!(entries(&work), 1, "f2 linked in place of the busy f1");
        assert!(matches!(
            s.get(held_id(&s, "f2")).unwrap().handle,
            Handle::Link
        ));
        drop(busy);
        lookup(&s, &root, &format!("f{}", YOUNG_FDS + 2)).unwrap();
        let f1 = s.get(held_id(&s, "f1")).unwrap();
        assert!(matches!(f1.handle, Handle::Link), "f1 linked once free");
        assert_eq!(entries(&work), 2);
        let c = s.counts();
        assert_eq!((c.links, c.fds), (2, 1 + YOUNG_FDS));
        // Settled, it reads and stats as before: our link hidden.
        let st = s.stat(&f1).unwrap();
        assert_eq!(st.st_nlink, 1);
        assert_eq!(read_all(s.open(&f1, libc::O_RDONLY).unwrap()), "1");
        // Forgetting a settled inode removes its link.
        s.forget(f1.id, 1);
        assert_eq!(entries(&work), 1);
    }

    /// A guest that looks files up and removes them but never forgets them: each removed young
    /// file can no longer be linked, so it stays held by its fd; those count against the young
    /// budget, so new files are linked at once once they fill it, and the fds stay bounded.
    #[test]
    fn removed_files_the_guest_keeps_do_not_make_the_fds_grow() {
        let (_t, share, work) = setup(None);
        let s = InodeStore::new(&work, open_dir(&share)).unwrap();
        let root = s.get(ROOT_ID).unwrap();
        let rounds = 5 * YOUNG_FDS;
        let mut held = Vec::new();
        for i in 0..rounds {
            let name = format!("f{i}");
            std::fs::write(share.join(&name), &name).unwrap();
            held.push(lookup(&s, &root, &name).unwrap().id);
            std::fs::remove_file(share.join(&name)).unwrap();
        }
        let c = s.counts();
        assert_eq!(c.inodes, 1 + rounds);
        assert!(
            c.fds <= 2 + YOUNG_FDS,
            "{c:?}: an fd for every removed file the guest holds"
        );
        assert_eq!(c.links, rounds + 1 - c.fds, "the rest are linked: {c:?}");
        // Each still answers: by its fd or by our link, which keeps its data.
        let last = s.get(*held.last().unwrap()).unwrap();
        assert_eq!(
            s.stat(&last).unwrap().st_nlink,
            0,
            "removed, our link hidden"
        );
        assert_eq!(
            read_all(s.open(&last, libc::O_RDONLY).unwrap()),
            format!("f{}", rounds - 1)
        );
        // Forgotten, they leave nothing, and the budget is whole again.
        for id in held {
            s.forget(id, 1);
        }
        let c = s.counts();
        assert_eq!((c.inodes, c.fds, c.kept, entries(&work)), (1, 1, 0, 0));
        std::fs::write(share.join("new"), b"new").unwrap();
        let new = lookup(&s, &root, "new").unwrap();
        assert!(matches!(new.handle, Handle::Fd(_)), "young again");
    }

    /// Only regular files start young: a symlink held by its fd would be reached through
    /// `/proc/self/fd`, which follows it, so its chown and utimes would be refused.
    #[test]
    fn symlinks_are_linked_at_once() {
        let (_t, share, work) = setup(None);
        std::os::unix::fs::symlink("target", share.join("l")).unwrap();
        let s = InodeStore::new(&work, open_dir(&share)).unwrap();
        let root = s.get(ROOT_ID).unwrap();
        let l = lookup(&s, &root, "l").unwrap();
        assert!(matches!(l.handle, Handle::Link));
        assert_eq!(entries(&work), 1);
        let st = s.stat(&l).unwrap();
        assert_eq!((st.st_mode & libc::S_IFMT, st.st_nlink), (libc::S_IFLNK, 1));
    }

    /// The id of the node `name` (in the share's root) is known under.
    fn held_id(s: &InodeStore, name: &str) -> u64 {
        let root = s.get(ROOT_ID).unwrap();
        let c = CString::new(name).unwrap();
        let dir = s.path_fd(&root).unwrap();
        let st = sys::fstatat(dir.as_fd(), Name::new(&c).unwrap()).unwrap();
        s.table().find((st.st_dev, st.st_ino)).expect("held")
    }

    #[test]
    fn a_forgotten_node_is_unknown_after_its_slot_is_reused() {
        let (_t, share, work) = setup(None);
        std::fs::write(share.join("a"), b"a").unwrap();
        std::fs::write(share.join("b"), b"b").unwrap();
        let s = InodeStore::new(&work, open_dir(&share))
            .unwrap()
            .with_young_fds(0);
        let root = s.get(ROOT_ID).unwrap();
        assert_eq!((root.id, root.is_dir), (ROOT_ID, true));
        let a = lookup(&s, &root, "a").unwrap();
        s.forget(a.id, 1);
        let b = lookup(&s, &root, "b").unwrap();
        assert_eq!(b.id as u32, a.id as u32, "b took a's slot");
        assert_ne!(b.id, a.id, "under another generation");
        assert!(matches!(s.get(a.id), Err(StoreError::UnknownNode(_))));
        assert_eq!(sys::Errno::from(s.get(a.id).unwrap_err()).0, libc::ENOENT);
        // A forget of the stale id (a guest that got it wrong) leaves b alone.
        s.forget(a.id, 1);
        assert_eq!((b.lookups(), s.counts().inodes), (1, 2));
        assert_eq!(
            read_all(s.open(&s.get(b.id).unwrap(), libc::O_RDONLY).unwrap()),
            "b"
        );
        // Looking `a` up again makes a new node: the old id stays unknown.
        let a2 = lookup(&s, &root, "a").unwrap();
        assert!(a2.id != a.id && s.get(a.id).is_err());
        assert_eq!(entries(&work), 2);
    }

    #[test]
    fn a_copy_of_a_forgotten_inode_never_reaches_the_next_inode_of_its_slot() {
        // Linked (same file system) and fd-held (the share on tmpfs).
        for share_in in [None, Some("/dev/shm")] {
            let (_t, share, work) = setup(share_in);
            std::fs::write(share.join("old"), b"old").unwrap();
            std::fs::write(share.join("new"), b"new").unwrap();
            let s = InodeStore::new(&work, open_dir(&share))
                .unwrap()
                .with_young_fds(0);
            let root = s.get(ROOT_ID).unwrap();
            let old = lookup(&s, &root, "old").unwrap();
            let linked = matches!(old.handle, Handle::Link);
            assert_eq!(linked, share_in.is_none());
            // Another thread forgets it while this one still uses its copy.
            std::thread::scope(|t| {
                t.spawn(|| s.forget(old.id, 1));
            });
            let new = lookup(&s, &root, "new").unwrap();
            assert_eq!(new.id as u32, old.id as u32);
            assert_eq!(old.lookups(), 0);
            match s.open(&old, libc::O_RDONLY) {
                // The copy's own fd: still the old inode.
                Ok(fd) => {
                    assert!(!linked);
                    assert_eq!(read_all(fd), "old");
                }
                // Its link is gone: a clean error, not the slot's new inode.
                Err(e) => {
                    assert!(linked);
                    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
                }
            }
            if linked {
                assert_eq!(s.stat(&old).unwrap_err().raw_os_error(), Some(libc::ENOENT));
            }
            assert_eq!(read_all(s.open(&new, libc::O_RDONLY).unwrap()), "new");
            assert_eq!(entries(&work), usize::from(linked));
        }
    }

    #[test]
    fn lookups_and_forgets_racing_on_the_same_names_leave_nothing_behind() {
        let (_t, share, work) = setup(None);
        let names: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
        for n in &names {
            std::fs::write(share.join(n), n).unwrap();
        }
        std::fs::create_dir(share.join("d")).unwrap();
        // Linked at once, and held by fd while young.
        for young in [0, YOUNG_FDS] {
            let s = InodeStore::new(&work, open_dir(&share))
                .unwrap()
                .with_young_fds(young);
            let root = s.get(ROOT_ID).unwrap();
            std::thread::scope(|t| {
                for k in 0..4 {
                    let (s, root, names, share) = (&s, &root, &names, &share);
                    t.spawn(move || {
                        for round in 0..3000 {
                            let name = if round % 5 == 0 {
                                "d"
                            } else {
                                &names[(round + k) % names.len()]
                            };
                            let i = lookup(s, root, name).unwrap();
                            // Whatever raced with it, the node is the inode behind the name.
                            let st = s.stat(&i).unwrap();
                            let host = std::fs::symlink_metadata(share.join(name)).unwrap();
                            assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&host));
                            if name != "d" {
                                assert_eq!(read_all(s.open(&i, libc::O_RDONLY).unwrap()), name);
                            }
                            s.forget(i.id, 1);
                        }
                    });
                }
            });
            assert_eq!(
                s.counts(),
                StoreCounts {
                    inodes: 1,
                    links: 0,
                    handles: 0,
                    fds: 1,
                    young: 0,
                    kept: 0,
                }
            );
            assert_eq!(entries(&work), 0, "every link removed");
        }
    }

    #[test]
    fn link_names_are_the_two_numbers_in_hex() {
        for (ino, id) in [
            (0, 0),
            (1, 0x10),
            (0xabc, 0xf),
            (u64::MAX, u64::MAX),
            (1 << 63, 7),
        ] {
            let n = LinkName::new(ino, id);
            assert_eq!(n.as_c_str().to_str().unwrap(), format!("{ino:x}.{id:x}"));
            assert_eq!(n.component().as_bytes(), n.as_c_str().to_bytes());
        }
    }

    #[test]
    fn counts_clear_and_the_table_bytes_per_held_inode() {
        let (_t, share, work) = setup(None);
        let n = 20_000;
        for i in 0..n {
            std::fs::write(share.join(format!("f{i}")), b"").unwrap();
        }
        std::fs::create_dir(share.join("d")).unwrap();
        let s = InodeStore::new(&work, open_dir(&share))
            .unwrap()
            .with_young_fds(0);
        let root = s.get(ROOT_ID).unwrap();
        let empty = s.table_bytes();
        for i in 0..n {
            lookup(&s, &root, &format!("f{i}")).unwrap();
        }
        let d = lookup(&s, &root, "d").unwrap();
        let c = s.counts();
        assert_eq!((c.inodes, c.links, c.handles + c.fds), (n + 2, n, 2));
        assert_eq!(c.handles, usize::from(matches!(d.handle, Handle::Dir(_))));
        let per = (s.table_bytes() - empty) as f64 / n as f64;
        eprintln!("inode store: {per:.1} table bytes per held inode at {n}");
        // The bound for the daemon's whole RSS per inode.
        assert!(per < 160.0, "{per} bytes per inode");
        s.clear();
        assert_eq!((s.counts().inodes, entries(&work)), (1, 0));
        assert!(s.get(ROOT_ID).is_ok() && s.get(d.id).is_err());
    }
}
