//! Target `fuse_handle`: whole FUSE request handling, `Server::handle` over a passthrough of a
//! scratch share, as a hostile guest drives it.
//!
//! The share is created once per process: files, a directory tree, symlinks (one pointing out of
//! the share), with a canary directory beside it that nothing may touch. Each input runs in a
//! fresh session (a new `Server`, so node ids and file handles start over and a crash replays
//! alone): INIT, a few lookups and opens so ids exist, then the input as a script of messages:
//!
//! ```text
//! record := ctl:u8 len:u16le message[len]
//! ctl    := bit 7: send as is; else bit 0: fix header.len, bit 1: steer header.nodeid,
//!           bit 2: steer the file handle argument(s), bit 3: steer the second node argument
//!           (RENAME newdir, LINK oldnodeid, COPY_FILE_RANGE nodeid_out, first BATCH_FORGET item);
//!           bits 4-6: which known id (0 = the newest)
//! ```
//!
//! Known ids are the ones the replies handed out (entries, opens, READDIRPLUS), so the fuzzer
//! reaches the operations behind a successful lookup without guessing numbers. Checked on every
//! input: each reply is well formed (length, unique, errno range, body size for the opcode), the
//! canary and the directories around the share are unchanged, the root still answers GETATTR,
//! and the workdir holds no link once the session is gone. Then whatever the input changed in
//! the share is put back, so every input starts from the same tree.
//!
//! Host safety: the handling thread drops CAP_MKNOD (device nodes cannot be created, so a bug
//! that opened one could not reach real hardware), and file sizes are capped by RLIMIT_FSIZE.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use vsnap_fs::abi::{opcode::*, *};
use vsnap_fs::passthrough::{FsConfig, Passthrough};
use vsnap_fs::server::{Handled, Reply, Server};
use zerocopy::{FromBytes, IntoBytes};

use crate::fuse_decode::{header, message};

/// Files the fuzzer writes are capped at this size (fallocate, truncate and sparse writes past
/// it fail with EFBIG) so a run cannot fill the disk.
pub const FILE_SIZE_LIMIT: u64 = 16 << 20;
const MAX_RECORDS: usize = 16;
const HEADER: usize = size_of::<InHeader>();
const WORKDIR: &str = ".vsnap-workdir";
const ROOT: u64 = 1;
/// Names of the share's root looked up before each input, in this order (node ids 2, 3, ...).
const LOOKED_UP: &[&str] = &["file", "dir", "out"];

/// The scratch tree: `root/share` is served, `root/outside/canary` must stay untouched.
struct Scratch {
    root: PathBuf,
    share: PathBuf,
    outside: PathBuf,
    canary: PathBuf,
    /// (path, what it looked like) for everything outside the share.
    fixed: Vec<(PathBuf, Fingerprint)>,
    /// The same for the share's root and baseline tree, to tell what an input changed.
    baseline: Vec<(&'static str, Option<Fingerprint>)>,
    share_mode: u32,
    share_owner: (u32, u32),
}

/// A baseline entry of the share.
enum Entry {
    File(&'static [u8]),
    Dir,
    Symlink(PathBuf),
}

/// The top-level name of a share-relative path.
fn top(rel: &str) -> &str {
    rel.split('/').next().unwrap_or(rel)
}

/// Removes whatever is at `p` (a tree, a file, a symlink, nothing).
fn remove(p: &Path) {
    let r = match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.unwrap_or_else(|e| panic!("restore {}: {e}", p.display()));
}

/// What must not change about a file outside the share.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn fingerprint(p: &Path) -> Fingerprint {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    Fingerprint {
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        nlink: m.nlink(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    }
}

impl Scratch {
    fn new() -> Self {
        crate::sys::limit_file_size(FILE_SIZE_LIMIT).expect("RLIMIT_FSIZE");
        let root = crate::scratch::dir("fs");
        let share = root.join("share");
        let outside = root.join("outside");
        let canary = outside.join("canary");
        std::fs::create_dir(&share).expect("share");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(
            &canary,
            b"host secret: the guest must never see or change this\n",
        )
        .expect("canary");
        let mut s = Scratch {
            fixed: Vec::new(),
            baseline: Vec::new(),
            share_mode: 0o755,
            share_owner: {
                let m = std::fs::metadata(&share).expect("share");
                (m.uid(), m.gid())
            },
            root,
            share,
            outside,
            canary,
        };
        std::fs::set_permissions(&s.share, std::fs::Permissions::from_mode(s.share_mode))
            .expect("share mode");
        s.populate();
        s.baseline = s.fingerprint_share();
        s.fixed = [&s.root, &s.outside, &s.canary]
            .into_iter()
            .map(|p| (p.clone(), fingerprint(p)))
            .collect();
        s
    }

    /// The baseline tree inside the share, in creation order (parents first).
    fn tree(&self) -> Vec<(&'static str, Entry)> {
        vec![
            (
                "file",
                Entry::File(b"0123456789abcdef: the file the fuzzer reads and writes\n"),
            ),
            ("empty", Entry::File(b"")),
            ("dir", Entry::Dir),
            ("dir/sub", Entry::Dir),
            ("dir/inner", Entry::File(b"inner\n")),
            ("link", Entry::Symlink("file".into())),
            ("dangling", Entry::Symlink("nowhere".into())),
            // Escapes: relative and absolute, to a file and to a directory.
            ("out", Entry::Symlink("../outside/canary".into())),
            ("abs", Entry::Symlink(self.canary.clone())),
            ("outdir", Entry::Symlink("../outside".into())),
        ]
    }

    /// Creates the baseline entries whose top-level name is in `tops` (all if `None`).
    fn populate_some(&self, tops: Option<&[&str]>) {
        for (rel, e) in self.tree() {
            if tops.is_some_and(|t| !t.contains(&top(rel))) {
                continue;
            }
            let p = self.share.join(rel);
            // Explicit modes: the passthrough sets the process umask to 0.
            let mode = |p: &Path, m| std::fs::set_permissions(p, PermissionsExt::from_mode(m));
            let r = match e {
                Entry::File(b) => std::fs::write(&p, b).and_then(|()| mode(&p, 0o644)),
                Entry::Dir => std::fs::create_dir(&p).and_then(|()| mode(&p, 0o755)),
                Entry::Symlink(t) => std::os::unix::fs::symlink(t, &p),
            };
            r.unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        }
    }

    fn populate(&self) {
        self.populate_some(None);
    }

    /// The share root and every baseline entry, as they are now (`None`: missing).
    fn fingerprint_share(&self) -> Vec<(&'static str, Option<Fingerprint>)> {
        std::iter::once("")
            .chain(self.tree().into_iter().map(|(rel, _)| rel))
            .map(|rel| {
                let p = self.share.join(rel);
                (
                    rel,
                    std::fs::symlink_metadata(&p).ok().map(|_| fingerprint(&p)),
                )
            })
            .collect()
    }

    /// Puts back what an input changed in the share. Any change to an entry moves its ctime (or
    /// inode, size, links); any change to a directory's entries its mtime: an entry that looks
    /// as it did is as it was. Only the top-level entries that differ are recreated.
    fn restore_if_changed(&mut self) {
        let now = self.fingerprint_share();
        if now == self.baseline {
            return;
        }
        let mut changed: Vec<&str> = now
            .iter()
            .zip(&self.baseline)
            .filter(|(a, b)| a != b && !a.0.is_empty())
            .map(|(a, _)| top(a.0))
            .collect();
        changed.dedup();
        if now[0] != self.baseline[0] {
            // The root itself, or its list of entries: drop what the input added, reset the
            // root's own attributes.
            let names: Vec<&str> = self.tree().into_iter().map(|(rel, _)| top(rel)).collect();
            for e in std::fs::read_dir(&self.share).expect("read share") {
                let e = e.expect("share entry");
                let name = e.file_name();
                let keep = name == WORKDIR || names.iter().any(|n| name == *n);
                if !keep {
                    remove(&e.path());
                }
            }
            self.reset_root();
        }
        for t in &changed {
            remove(&self.share.join(t));
        }
        self.populate_some(Some(&changed));
        self.baseline = self.fingerprint_share();
    }

    fn reset_root(&self) {
        let (uid, gid) = self.share_owner;
        std::os::unix::fs::chown(&self.share, Some(uid), Some(gid)).expect("share owner");
        std::fs::set_permissions(&self.share, PermissionsExt::from_mode(self.share_mode))
            .expect("share mode");
        crate::sys::clear_xattrs(&self.share).expect("share xattrs");
    }

    /// Puts the whole share back as `populate` left it (for tests that used it directly).
    #[cfg(test)]
    fn restore(&mut self) {
        for e in std::fs::read_dir(&self.share).expect("read share") {
            let e = e.expect("share entry");
            if e.file_name() != WORKDIR {
                remove(&e.path());
            }
        }
        self.reset_root();
        self.populate();
        self.baseline = self.fingerprint_share();
    }

    /// Nothing outside the share changed: the canary, and the directories beside the share
    /// (whose mtime and ctime move if an entry is added, removed or renamed).
    fn check_outside(&self) {
        for (p, fp) in &self.fixed {
            assert_eq!(
                &fingerprint(p),
                fp,
                "{} outside the share changed",
                p.display()
            );
        }
    }
}

/// The scratch tree, locked: one session at a time uses it (tests run on several threads).
fn scratch() -> MutexGuard<'static, Scratch> {
    static S: OnceLock<Mutex<Scratch>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Scratch::new()))
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    static NO_MKNOD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// As root, a guest could otherwise create a node for a real device; see the module doc.
fn drop_mknod_once() {
    NO_MKNOD.with(|done| {
        if !done.get() {
            if crate::sys::is_root() {
                crate::sys::drop_mknod_on_this_thread().expect("drop CAP_MKNOD");
            }
            done.set(true);
        }
    });
}

/// One session over the share: the ids handed out so far.
struct Session {
    server: Server,
    nodes: Vec<u64>,
    /// Open handles and the node each belongs to (the server checks that they match).
    fhs: Vec<(u64, u64)>,
    unique: u64,
    /// Something may have changed the share: restore it afterwards.
    dirty: bool,
}

/// Opcodes that change nothing in the share when they succeed.
const READ_ONLY: &[u32] = &[
    INIT,
    DESTROY,
    LOOKUP,
    FORGET,
    BATCH_FORGET,
    GETATTR,
    READLINK,
    READ,
    FLUSH,
    RELEASE,
    FSYNC,
    STATFS,
    SYNCFS,
    ACCESS,
    GETXATTR,
    LISTXATTR,
    OPENDIR,
    READDIR,
    READDIRPLUS,
    RELEASEDIR,
    FSYNCDIR,
    INTERRUPT,
    LSEEK,
];

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

impl Session {
    fn new(share: &Path) -> Self {
        let cfg = FsConfig {
            xattr: true,
            ..FsConfig::default()
        };
        let fs = Passthrough::new(share, &share.join(WORKDIR), cfg).expect("passthrough");
        let mut s = Session {
            server: Server::new(fs),
            nodes: vec![ROOT],
            fhs: Vec::new(),
            unique: 0,
            dirty: false,
        };
        s.init();
        for name in LOOKED_UP {
            let n = [name.as_bytes(), b"\0"].concat();
            s.expect_ok(LOOKUP, ROOT, &[&n]);
        }
        let rw = OpenIn {
            flags: libc::O_RDWR as u32,
            open_flags: 0,
        };
        s.expect_ok(OPEN, 2, &[rw.as_bytes()]);
        s.expect_ok(OPENDIR, ROOT, &[OpenIn::default().as_bytes()]);
        s.dirty = false;
        s
    }

    fn init(&mut self) {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 1 << 17,
            flags: u32::MAX,
            flags2: u32::MAX,
            ..InitIn::default()
        };
        self.expect_ok(INIT, ROOT, &[init.as_bytes()]);
    }

    fn expect_ok(&mut self, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
        self.unique += 1;
        let m = message(header(opcode, nodeid, self.unique), args);
        let r = self
            .send(&m)
            .unwrap_or_else(|| panic!("no reply to {opcode}"));
        let h = OutHeader::read_from_prefix(&r).expect("checked").0;
        assert_eq!(h.error, 0, "setup opcode {opcode} on node {nodeid} failed");
        r
    }

    /// Sends one message, checks the reply, and learns the ids it hands out.
    fn send(&mut self, msg: &[u8]) -> Option<Vec<u8>> {
        let mut reply = Reply::new();
        let Handled { replied, .. } = self.server.handle(msg, &mut reply);
        let Some((h, _)) = InHeader::read_from_prefix(msg).ok() else {
            assert!(!replied, "a reply to a message without a header");
            return None;
        };
        let reply = reply.into_vec();
        if !replied {
            assert!(
                matches!(h.opcode, FORGET | BATCH_FORGET | INTERRUPT),
                "no reply to opcode {}",
                h.opcode
            );
            return None;
        }
        let (oh, body) = OutHeader::read_from_prefix(&reply).expect("a reply has a header");
        assert_eq!(oh.len as usize, reply.len(), "reply length field");
        assert_eq!(oh.unique, h.unique, "reply unique");
        assert!(
            oh.error <= 0 && oh.error > -4096,
            "errno {} out of range",
            oh.error
        );
        let decoded = vsnap_fs::request::decode(msg).is_ok();
        let truncating = || u32_at(msg, HEADER).is_some_and(|f| f & libc::O_TRUNC as u32 != 0);
        let changes = match h.opcode {
            OPEN => truncating(),
            op => !READ_ONLY.contains(&op),
        };
        if decoded && changes {
            // Even a failed operation may have done part of its work (SETATTR).
            self.dirty = true;
        }
        if oh.error != 0 {
            assert!(body.is_empty(), "an error reply with a body");
            return Some(reply);
        }
        let args = msg.get(HEADER..h.len as usize).unwrap_or_default();
        self.check_body(&h, args, body);
        Some(reply)
    }

    /// The body of a successful reply has the size its opcode calls for.
    fn check_body(&mut self, h: &InHeader, args: &[u8], body: &[u8]) {
        let opcode = h.opcode;
        let entry = size_of::<EntryOut>();
        let want = |n: usize| assert_eq!(body.len(), n, "reply body of opcode {opcode}");
        match opcode {
            LOOKUP | MKDIR | MKNOD | SYMLINK | LINK => {
                want(entry);
                self.learn_node(body);
            }
            CREATE | TMPFILE => {
                want(entry + size_of::<OpenOut>());
                let node = self.learn_node(body);
                self.learn_fh(&body[entry..], node);
            }
            OPEN | OPENDIR => {
                want(size_of::<OpenOut>());
                self.learn_fh(body, h.nodeid);
            }
            GETATTR | SETATTR => want(size_of::<AttrOut>()),
            WRITE | COPY_FILE_RANGE => want(size_of::<WriteOut>()),
            STATFS => want(size_of::<Kstatfs>()),
            LSEEK => want(size_of::<LseekOut>()),
            INIT => want(size_of::<InitOut>()),
            READ => {
                let size = u32_at(args, 16).expect("decoded READ") as usize;
                assert!(body.len() <= size, "READ returned more than asked");
            }
            READDIR | READDIRPLUS => {
                let size = u32_at(args, 16).expect("decoded READDIR") as usize;
                assert!(body.len() <= size, "READDIR returned more than asked");
                self.walk_dirents(body, opcode == READDIRPLUS);
            }
            GETXATTR | LISTXATTR => {
                let size = u32_at(args, 0).expect("decoded GETXATTR") as usize;
                if size == 0 {
                    want(size_of::<GetxattrOut>());
                } else {
                    assert!(body.len() <= size, "xattr reply larger than asked");
                }
            }
            READLINK => {}
            _ => want(0),
        }
    }

    /// Checks a READDIR(PLUS) body entry by entry and learns the nodes it hands out.
    fn walk_dirents(&mut self, mut b: &[u8], plus: bool) {
        while !b.is_empty() {
            if plus {
                let (e, rest) = EntryOut::read_from_prefix(b).expect("a whole entry");
                if e.nodeid != 0 {
                    self.remember_node(e.nodeid);
                }
                b = rest;
            }
            let (d, _) = Dirent::read_from_prefix(b).expect("a whole dirent");
            let size = dirent_size(d.namelen as usize);
            assert!(size <= b.len(), "dirent past the body");
            let name = &b[size_of::<Dirent>()..size_of::<Dirent>() + d.namelen as usize];
            assert!(
                !name.is_empty() && !name.contains(&b'/') && !name.contains(&0),
                "bad dirent name"
            );
            assert_ne!(name, WORKDIR.as_bytes(), "the workdir is listed");
            b = &b[size..];
        }
    }

    fn learn_node(&mut self, body: &[u8]) -> u64 {
        let e = EntryOut::read_from_prefix(body).expect("entry").0;
        self.remember_node(e.nodeid);
        e.nodeid
    }

    fn remember_node(&mut self, id: u64) {
        if !self.nodes.contains(&id) {
            self.nodes.push(id);
        }
    }

    fn learn_fh(&mut self, body: &[u8], node: u64) {
        let o = OpenOut::read_from_prefix(body).expect("open").0;
        self.fhs.push((o.fh, node));
    }

    /// The id `pick` steps back from the newest, if any are known.
    fn pick<T: Copy>(list: &[T], pick: usize) -> Option<T> {
        (!list.is_empty()).then(|| list[list.len() - 1 - pick % list.len()])
    }

    /// Applies the record's steering to a message.
    fn steer(&self, ctl: u8, m: &mut [u8]) {
        if ctl & 0x80 != 0 || m.len() < HEADER {
            return;
        }
        let len = m.len() as u32;
        if ctl & 1 != 0 {
            m[0..4].copy_from_slice(&len.to_le_bytes());
        }
        let idx = usize::from((ctl >> 4) & 7);
        let opcode = u32_at(m, 4).expect("header");
        if ctl & 2 != 0 {
            if let Some(n) = Self::pick(&self.nodes, idx) {
                put_u64(m, 16, n);
            }
        }
        let a = HEADER;
        if ctl & 4 != 0 {
            if let Some((fh, node)) = Self::pick(&self.fhs, idx) {
                // The handle's own node, unless the record steers the node separately.
                if ctl & 2 == 0 {
                    put_u64(m, 16, node);
                }
                match opcode {
                    GETATTR | SETATTR => put_u64(m, a + 8, fh),
                    COPY_FILE_RANGE => {
                        put_u64(m, a, fh);
                        put_u64(m, a + 16, node);
                        put_u64(m, a + 24, fh);
                    }
                    READ | WRITE | READDIR | READDIRPLUS | FLUSH | RELEASE | RELEASEDIR | FSYNC
                    | FSYNCDIR | FALLOCATE | LSEEK => put_u64(m, a, fh),
                    _ => {}
                }
            }
        }
        if ctl & 8 != 0 {
            if let Some(n) = Self::pick(&self.nodes, idx) {
                match opcode {
                    RENAME | RENAME2 | LINK => put_u64(m, a, n),
                    COPY_FILE_RANGE => put_u64(m, a + 16, n),
                    BATCH_FORGET => put_u64(m, a + 8, n),
                    _ => {}
                }
            }
        }
    }
}

/// Splits an input into its records: (ctl, message).
pub fn records(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 3 {
            return None;
        }
        let ctl = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let m = &rest[3..3 + len];
        rest = &rest[3 + len..];
        Some((ctl, m))
    })
    .take(MAX_RECORDS)
}

/// One record of a script.
pub fn record(ctl: u8, msg: &[u8]) -> Vec<u8> {
    let mut r = vec![ctl];
    r.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    r.extend_from_slice(msg);
    r
}

/// The harness.
pub fn fuse_handle(data: &[u8]) {
    run(data);
}

/// Runs one input; returns the (opcode, errno) of each reply to its records.
fn run(data: &[u8]) -> Vec<(u32, i32)> {
    drop_mknod_once();
    let mut sc = scratch();
    let mut s = Session::new(&sc.share);
    let mut buf = Vec::new();
    let mut results = Vec::new();
    for (ctl, m) in records(data) {
        buf.clear();
        buf.extend_from_slice(m);
        s.steer(ctl, &mut buf);
        if let Some(r) = s.send(&buf) {
            let e = OutHeader::read_from_prefix(&r).expect("checked").0.error;
            results.push((u32_at(&buf, 4).expect("a reply has a header"), e));
        }
    }
    // The daemon still answers, and the root is still a directory. After a DESTROY (or an
    // INIT it refused) there is no session: a guest would INIT again first.
    let getattr = |s: &mut Session| {
        s.unique += 1;
        let m = message(
            header(GETATTR, ROOT, s.unique),
            &[GetattrIn::default().as_bytes()],
        );
        s.send(&m).expect("GETATTR reply")
    };
    let mut r = getattr(&mut s);
    if OutHeader::read_from_prefix(&r).expect("header").0.error == -libc::EIO {
        s.init();
        r = getattr(&mut s);
    }
    let (oh, body) = OutHeader::read_from_prefix(&r).expect("header");
    assert_eq!(oh.error, 0, "GETATTR of the root failed after the input");
    let attr = AttrOut::read_from_prefix(body).expect("attr").0.attr;
    assert_eq!(attr.mode & libc::S_IFMT, libc::S_IFDIR, "root is not a dir");
    sc.check_outside();
    let dirty = s.dirty;
    drop(s);
    let work = sc.share.join(WORKDIR);
    let left = std::fs::read_dir(&work).expect("workdir").count();
    assert_eq!(left, 0, "links left in the workdir after the session ended");
    if dirty {
        sc.restore_if_changed();
    }
    results
}

/// A root-relative message with the header's length fixed up: `(ctl, message)`.
fn rec(ctl: u8, opcode: u32, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
    record(ctl, &message(header(opcode, nodeid, 100), args))
}

/// Steering bits: fix len, plus node / fh / second node from the known ids, newest first.
const FIX: u8 = 1;
const NODE: u8 = 2;
const FH: u8 = 4;
const NODE2: u8 = 8;
const fn nth(i: u8) -> u8 {
    (i & 7) << 4
}

/// Valid scripts: each exercises one area (I/O, namespace, xattrs, directories, escapes).
pub fn seeds() -> Vec<Vec<u8>> {
    let z = |n| vec![0u8; n];
    let read = |size: u32, offset: u64| ReadIn {
        fh: 0,
        offset,
        size,
        ..ReadIn::default()
    };
    let name = |s: &str| [s.as_bytes(), b"\0"].concat();
    let create = |flags: i32, n: &str| {
        [
            CreateIn {
                flags: (flags | libc::O_CREAT) as u32,
                mode: 0o644,
                umask: 0o022,
                open_flags: 0,
            }
            .as_bytes(),
            &name(n),
        ]
        .concat()
    };
    let setattr = |valid: u32, size: u64, mode: u32| SetattrIn {
        valid,
        size,
        mode,
        uid: 1000,
        gid: 1000,
        atime: 1,
        mtime: 2,
        ..SetattrIn::default()
    };
    let xattr = |size: u32| GetxattrIn { size, padding: 0 };
    let open = |flags: i32| OpenIn {
        flags: flags as u32,
        open_flags: 0,
    };
    // Node ids of a fresh session (see LOOKED_UP) and its two open handles.
    let (file, dir, out) = (2, 3, 4);
    let mut scripts: Vec<Vec<Vec<u8>>> = vec![
        // I/O: a second handle on the file, used through steering (the newest fh).
        vec![
            rec(FIX, OPEN, file, &[open(libc::O_RDWR).as_bytes()]),
            rec(FIX | FH, WRITE, 0, &[read(5, 3).as_bytes(), b"HELLO"]),
            rec(FIX | FH, READ, 0, &[read(4096, 0).as_bytes()]),
            rec(
                FIX | FH,
                FALLOCATE,
                0,
                &[FallocateIn {
                    length: 1 << 16,
                    ..FallocateIn::default()
                }
                .as_bytes()],
            ),
            rec(
                FIX | FH,
                LSEEK,
                0,
                &[LseekIn {
                    offset: 1,
                    whence: libc::SEEK_HOLE as u32,
                    ..LseekIn::default()
                }
                .as_bytes()],
            ),
            rec(
                FIX | FH,
                COPY_FILE_RANGE,
                0,
                &[CopyFileRangeIn {
                    nodeid_out: file,
                    off_out: 4000,
                    len: 64,
                    ..CopyFileRangeIn::default()
                }
                .as_bytes()],
            ),
            rec(FIX | FH, FSYNC, 0, &[FsyncIn::default().as_bytes()]),
            rec(FIX | FH, FLUSH, 0, &[FlushIn::default().as_bytes()]),
            rec(FIX | FH, RELEASE, 0, &[ReleaseIn::default().as_bytes()]),
            rec(
                FIX,
                READ,
                file,
                &[ReadIn {
                    fh: 1,
                    ..read(100, 0)
                }
                .as_bytes()],
            ),
        ],
        // Attributes.
        vec![
            rec(FIX, GETATTR, file, &[&z(16)]),
            rec(
                FIX,
                SETATTR,
                file,
                &[setattr(fattr::SIZE | fattr::MODE, 3, 0o600).as_bytes()],
            ),
            rec(
                FIX,
                SETATTR,
                file,
                &[SetattrIn {
                    fh: 1,
                    ..setattr(
                        fattr::FH
                            | fattr::SIZE
                            | fattr::UID
                            | fattr::GID
                            | fattr::ATIME
                            | fattr::MTIME_NOW,
                        100,
                        0,
                    )
                }
                .as_bytes()],
            ),
            rec(FIX, LOOKUP, ROOT, &[&name("link")]),
            rec(FIX | NODE, READLINK, 0, &[]),
            rec(
                FIX | NODE,
                ACCESS,
                0,
                &[AccessIn {
                    mask: 6,
                    padding: 0,
                }
                .as_bytes()],
            ),
            rec(
                FIX,
                ACCESS,
                dir,
                &[AccessIn {
                    mask: 1,
                    padding: 0,
                }
                .as_bytes()],
            ),
            rec(FIX, STATFS, ROOT, &[]),
            rec(FIX, SYNCFS, ROOT, &[&z(8)]),
        ],
        // Namespace: a directory, a file in it (steered to the new node), a hard link into the
        // root, a rename across directories, a symlink, a FIFO, removal.
        vec![
            rec(
                FIX,
                MKDIR,
                ROOT,
                &[
                    MkdirIn {
                        mode: 0o755,
                        umask: 0,
                    }
                    .as_bytes(),
                    &name("d"),
                ],
            ),
            rec(FIX | NODE, CREATE, 0, &[&create(libc::O_RDWR, "f")]),
            rec(FIX | FH, WRITE, 0, &[read(3, 0).as_bytes(), b"abc"]),
            rec(
                FIX | NODE2,
                LINK,
                ROOT,
                &[LinkIn { oldnodeid: 0 }.as_bytes(), &name("hard")],
            ),
            rec(
                FIX | NODE | nth(1),
                RENAME2,
                0,
                &[
                    Rename2In {
                        newdir: ROOT,
                        flags: libc::RENAME_NOREPLACE,
                        padding: 0,
                    }
                    .as_bytes(),
                    &name("f"),
                    &name("g"),
                ],
            ),
            rec(
                FIX,
                SYMLINK,
                ROOT,
                &[&name("sl"), &name("../../etc/passwd")],
            ),
            rec(
                FIX,
                MKNOD,
                ROOT,
                &[
                    MknodIn {
                        mode: libc::S_IFIFO | 0o600,
                        ..MknodIn::default()
                    }
                    .as_bytes(),
                    &name("fifo"),
                ],
            ),
            rec(
                FIX,
                RENAME,
                ROOT,
                &[
                    RenameIn { newdir: dir }.as_bytes(),
                    &name("sl"),
                    &name("sl2"),
                ],
            ),
            rec(FIX, UNLINK, ROOT, &[&name("hard")]),
            rec(FIX, UNLINK, ROOT, &[&name("g")]),
            rec(FIX, UNLINK, ROOT, &[&name("fifo")]),
            rec(FIX, RMDIR, ROOT, &[&name("d")]),
        ],
        // Extended attributes on the file and the root.
        vec![
            rec(
                FIX,
                SETXATTR,
                file,
                &[
                    SetxattrIn { size: 3, flags: 0 }.as_bytes(),
                    &name("user.k"),
                    b"val",
                ],
            ),
            rec(FIX, GETXATTR, file, &[xattr(0).as_bytes(), &name("user.k")]),
            rec(
                FIX,
                GETXATTR,
                file,
                &[xattr(64).as_bytes(), &name("user.k")],
            ),
            rec(FIX, LISTXATTR, file, &[xattr(0).as_bytes()]),
            rec(FIX, LISTXATTR, file, &[xattr(256).as_bytes()]),
            rec(FIX, REMOVEXATTR, file, &[&name("user.k")]),
            rec(
                FIX,
                SETXATTR,
                ROOT,
                &[
                    SetxattrIn { size: 1, flags: 0 }.as_bytes(),
                    &name("user.r"),
                    b"x",
                ],
            ),
            rec(FIX, LISTXATTR, ROOT, &[xattr(256).as_bytes()]),
        ],
        // Directories: list the root through its pre-opened handle, open a subdirectory and
        // list it with attributes, then look up what the listing handed out.
        vec![
            rec(
                FIX,
                READDIR,
                ROOT,
                &[ReadIn {
                    fh: 2,
                    ..read(4096, 0)
                }
                .as_bytes()],
            ),
            rec(
                FIX,
                READDIRPLUS,
                ROOT,
                &[ReadIn {
                    fh: 2,
                    ..read(300, 0)
                }
                .as_bytes()],
            ),
            rec(FIX, OPENDIR, dir, &[&z(8)]),
            rec(FIX | FH, READDIRPLUS, dir, &[read(4096, 0).as_bytes()]),
            rec(FIX | FH, READDIRPLUS, dir, &[read(4096, 3).as_bytes()]),
            rec(FIX | NODE, GETATTR, 0, &[&z(16)]),
            rec(FIX, LOOKUP, dir, &[&name("inner")]),
            rec(FIX | FH, FSYNCDIR, 0, &[FsyncIn::default().as_bytes()]),
            rec(FIX | FH, RELEASEDIR, 0, &[ReleaseIn::default().as_bytes()]),
        ],
        // Escapes: names the sandbox refuses, symlinks out of the share, the workdir.
        vec![
            rec(FIX, LOOKUP, ROOT, &[&name("..")]),
            rec(FIX, LOOKUP, ROOT, &[&name("outdir/canary")]),
            rec(FIX, LOOKUP, ROOT, &[&name(WORKDIR)]),
            rec(FIX, LOOKUP, ROOT, &[&name("abs")]),
            rec(
                FIX | NODE,
                OPEN,
                0,
                &[open(libc::O_RDWR | libc::O_TRUNC).as_bytes()],
            ),
            rec(
                FIX | NODE,
                SETATTR,
                0,
                &[setattr(fattr::SIZE | fattr::MODE, 0, 0o777).as_bytes()],
            ),
            rec(
                FIX,
                SETXATTR,
                out,
                &[
                    SetxattrIn { size: 1, flags: 0 }.as_bytes(),
                    &name("user.x"),
                    b"x",
                ],
            ),
            rec(FIX, LOOKUP, ROOT, &[&name("outdir")]),
            rec(FIX | NODE, LOOKUP, 0, &[&name("canary")]),
            rec(FIX | NODE, CREATE, 0, &[&create(libc::O_RDWR, "planted")]),
            rec(
                FIX,
                CREATE,
                ROOT,
                &[&create(libc::O_RDWR | libc::O_TRUNC, "out")],
            ),
            rec(
                FIX,
                MKDIR,
                ROOT,
                &[MkdirIn::default().as_bytes(), &name(WORKDIR)],
            ),
            rec(
                FIX,
                RENAME,
                ROOT,
                &[
                    RenameIn { newdir: ROOT }.as_bytes(),
                    &name("file"),
                    &name(WORKDIR),
                ],
            ),
            rec(
                FIX,
                LINK,
                ROOT,
                &[LinkIn { oldnodeid: out }.as_bytes(), &name("canary-link")],
            ),
            rec(FIX, READLINK, out, &[]),
        ],
        // Session: forgets, interrupt, a temp file, unknown and unsupported opcodes, a second
        // INIT, DESTROY.
        vec![
            rec(FIX, FORGET, out, &[ForgetIn { nlookup: 1 }.as_bytes()]),
            rec(
                FIX,
                BATCH_FORGET,
                0,
                &[
                    BatchForgetIn { count: 2, dummy: 0 }.as_bytes(),
                    ForgetOne {
                        nodeid: file,
                        nlookup: 1,
                    }
                    .as_bytes(),
                    ForgetOne {
                        nodeid: dir,
                        nlookup: u64::MAX,
                    }
                    .as_bytes(),
                ],
            ),
            rec(FIX, INTERRUPT, 0, &[InterruptIn { unique: 100 }.as_bytes()]),
            rec(
                FIX,
                TMPFILE,
                ROOT,
                &[CreateIn {
                    flags: libc::O_RDWR as u32,
                    mode: 0o600,
                    ..CreateIn::default()
                }
                .as_bytes()],
            ),
            rec(FIX | FH, WRITE, 0, &[read(2, 0).as_bytes(), b"tm"]),
            rec(FIX, GETLK, ROOT, &[&z(48)]),
            rec(FIX, 4242, ROOT, &[]),
            rec(
                FIX,
                INIT,
                0,
                &[InitIn {
                    major: KERNEL_VERSION,
                    minor: MIN_MINOR_VERSION,
                    ..InitIn::default()
                }
                .as_bytes()],
            ),
            rec(FIX, LOOKUP, ROOT, &[&name("file")]),
            rec(FIX, DESTROY, 0, &[]),
            rec(FIX, GETATTR, ROOT, &[&z(16)]),
        ],
    ];
    // Every single message of the decoder's corpus, as a one-record script on a known node.
    for m in crate::fuse_decode::seeds() {
        scripts.push(vec![record(FIX | NODE | FH | NODE2 | nth(2), &m)]);
    }
    scripts.into_iter().map(|s| s.concat()).collect()
}

/// Tokens: record heads and the names the sandbox must refuse.
pub const DICT: &[&[u8]] = &[
    &[FIX | NODE, 40, 0],
    &[FIX | FH, 80, 0],
    &[0x80, 40, 0],
    b"..\0",
    b"/\0",
    b".vsnap-workdir\0",
    b"out\0",
    b"outdir\0",
    b"canary\0",
    b"user.k\0",
    b"trusted.t\0",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_what_they_are_for() {
        let seeds = seeds();
        // I/O, attributes, namespace, xattrs, directories: every operation succeeds.
        for (i, s) in seeds[..5].iter().enumerate() {
            let r = run(s);
            assert_eq!(r.len(), records(s).count(), "seed {i}: a reply per record");
            assert!(r.iter().all(|&(_, e)| e == 0), "seed {i}: {r:?}");
        }
        // Escapes: only looking at the symlinks (and linking one inside the share) works.
        let ok: Vec<u32> = run(&seeds[5])
            .into_iter()
            .filter(|&(_, e)| e == 0)
            .map(|(op, _)| op)
            .collect();
        assert_eq!(ok, [LOOKUP, LOOKUP, LINK, READLINK], "escape seed");
    }

    /// Everything about the share a later input could notice (the workdir aside).
    fn snapshot(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != WORKDIR)
            .collect();
        entries.sort();
        for n in entries {
            let r = if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            };
            let p = dir.join(&r);
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.is_symlink() {
                format!("-> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                "dir".into()
            } else {
                format!("{:?}", std::fs::read(&p).unwrap())
            };
            out.push(format!("{r} {:o} {}:{} {what}", m.mode(), m.uid(), m.gid()));
            if m.is_dir() {
                snapshot(dir, &r, out);
            }
        }
    }

    fn share_state() -> Vec<String> {
        let sc = scratch();
        let m = std::fs::metadata(&sc.share).unwrap();
        let mut v = vec![format!("root {:o} {}:{}", m.mode(), m.uid(), m.gid())];
        v.push(format!("{:?}", crate::sys::list_xattrs(&sc.share).unwrap()));
        snapshot(&sc.share, "", &mut v);
        v
    }

    #[test]
    fn seeds_run_clean_and_leave_the_share_as_it_was() {
        let before = share_state();
        for s in seeds() {
            fuse_handle(&s);
            assert_eq!(share_state(), before);
        }
        // Changes made behind the harness's back are found and undone too.
        {
            let mut sc = scratch();
            std::fs::write(sc.share.join("file"), b"changed").unwrap();
            std::fs::write(sc.share.join("dir/sub/new"), b"new").unwrap();
            std::fs::rename(sc.share.join("link"), sc.share.join("moved")).unwrap();
            std::fs::set_permissions(&sc.share, PermissionsExt::from_mode(0o700)).unwrap();
            crate::sys::set_xattr(&sc.share, c"user.t", b"v").unwrap();
            sc.restore_if_changed();
        }
        assert_eq!(share_state(), before);
    }

    #[test]
    fn steering_reaches_the_handed_out_ids() {
        // CREATE then WRITE to "the newest fh": the write must succeed, so its reply has a
        // WriteOut of 3 bytes.
        drop_mknod_once();
        let mut sc = scratch();
        let mut s = Session::new(&sc.share);
        let create = [
            CreateIn {
                flags: (libc::O_RDWR | libc::O_CREAT) as u32,
                mode: 0o644,
                ..CreateIn::default()
            }
            .as_bytes(),
            b"steered\0",
        ]
        .concat();
        let script = [
            rec(FIX, CREATE, ROOT, &[&create]),
            rec(
                FIX | FH,
                WRITE,
                0,
                &[
                    ReadIn {
                        size: 3,
                        ..ReadIn::default()
                    }
                    .as_bytes(),
                    b"abc",
                ],
            ),
        ];
        let mut replies = Vec::new();
        for r in &script {
            for (ctl, m) in records(r) {
                let mut m = m.to_vec();
                s.steer(ctl, &mut m);
                replies.push(s.send(&m).unwrap());
            }
        }
        assert_eq!(
            OutHeader::read_from_prefix(&replies[0]).unwrap().0.error,
            0,
            "CREATE"
        );
        let w = &replies[1];
        assert_eq!(OutHeader::read_from_prefix(w).unwrap().0.error, 0);
        assert_eq!(WriteOut::read_from_prefix(&w[16..]).unwrap().0.size, 3);
        drop(s);
        sc.restore();
    }
}
