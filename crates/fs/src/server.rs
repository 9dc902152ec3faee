//! FUSE dispatch: one request in, at most one reply out. INIT negotiates the session; every
//! other opcode goes to the passthrough file system. Guest input never ends the daemon: a
//! malformed message gets EINVAL, an unknown opcode ENOSYS, an unknown node ENOENT, an unknown
//! file handle EBADF.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, Ordering};

use smallvec::SmallVec;
use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{self, init, opcode, InHeader, InitIn, InitOut, OutHeader, ReadIn};
use crate::passthrough::{CacheMode, Caller, Errno, Passthrough, Res};
use crate::request::{decode, DecodeError, Op};

/// Largest WRITE payload (and READ size) the guest may send: 1 MiB, as virtiofsd.
pub const MAX_WRITE: u32 = 1 << 20;
/// Largest request the device accepts: a maximal WRITE plus its headers.
pub const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// How many bytes of a request [`Server::data_request`] looks at: the header and the
/// `fuse_read_in` / `fuse_write_in` that follows it.
pub const DATA_HEAD: usize = size_of::<InHeader>() + size_of::<ReadIn>();

/// A READ or WRITE whose data moves between the file and the guest's buffers without passing
/// through the daemon's memory: only its first [`DATA_HEAD`] bytes were read.
#[derive(Clone, Copy, Debug)]
pub struct DataRequest {
    pub write: bool,
    pub unique: u64,
    pub nodeid: u64,
    pub arg: ReadIn,
}

/// What handling one message did.
#[derive(Debug, Default)]
pub struct Handled {
    /// Whether the message was answered: not FORGET, BATCH_FORGET, INTERRUPT, nor a message
    /// too short to carry a `unique`.
    pub replied: bool,
    /// Set when the message was malformed or unknown: a label for the once-per-kind log.
    pub fault: Option<&'static str>,
}

pub struct Server {
    fs: Passthrough,
    /// Negotiated minor version; 0 until INIT.
    minor: AtomicU32,
}

/// A reply, header included. Most bodies are one fixed-size struct (an entry, attributes, an
/// open handle): the caller keeps the reply on its stack and the body is written into it in
/// place, so answering costs no allocation and no copy but the one into guest memory.
/// Directory listings, link targets and xattrs spill to the heap.
pub type Reply = SmallVec<[u8; 256]>;

const OUT_HEADER: usize = size_of::<OutHeader>();

/// Makes `out` the room for a reply's header, the body to be appended after it.
fn begin(out: &mut Reply) {
    out.clear();
    out.extend_from_slice(&[0; OUT_HEADER]);
}

/// Puts the header before the body appended since [`begin`], or makes the reply the error alone.
fn end(out: &mut Reply, unique: u64, r: Res<()>) {
    let error = match r {
        Ok(()) => 0,
        Err(Errno(e)) => {
            out.truncate(OUT_HEADER);
            -e
        }
    };
    let h = OutHeader {
        len: out.len() as u32,
        error,
        unique,
    };
    out[..OUT_HEADER].copy_from_slice(h.as_bytes());
}

/// The header of a READ reply whose `read` bytes of data follow it (or of its error).
pub fn read_reply_header(unique: u64, read: Res<usize>) -> OutHeader {
    let (len, error) = match read {
        Ok(n) => (size_of::<OutHeader>() + n, 0),
        Err(Errno(e)) => (size_of::<OutHeader>(), -e),
    };
    OutHeader {
        len: len as u32,
        error,
        unique,
    }
}

/// Appends the body a struct makes.
fn put<T: IntoBytes + zerocopy::Immutable>(out: &mut Reply, r: Res<T>) -> Res<()> {
    r.map(|v| out.extend_from_slice(v.as_bytes()))
}

/// Appends a body the file system built on the heap (its size known only once built).
fn put_vec(out: &mut Reply, r: Res<Vec<u8>>) -> Res<()> {
    r.map(|v| out.extend_from_slice(&v))
}

impl Server {
    pub fn new(fs: Passthrough) -> Self {
        Server {
            fs,
            minor: AtomicU32::new(0),
        }
    }

    pub fn fs(&self) -> &Passthrough {
        &self.fs
    }

    /// The frontend went away: the next guest starts from INIT with no inodes.
    pub fn reset(&self) {
        self.minor.store(0, Ordering::SeqCst);
        self.fs.reset();
    }

    /// Handles `msg`, its reply (if it has one) left in `out`.
    pub fn handle(&self, msg: &[u8], out: &mut Reply) -> Handled {
        begin(out);
        let req = match decode(msg) {
            Ok(r) => r,
            Err(e @ DecodeError::NoHeader(_)) => {
                return Handled {
                    replied: false,
                    fault: Some(fault_label(&e)),
                }
            }
            Err(e) => {
                end(out, InHeader::read_unique(msg), Err(Errno(e.errno())));
                return Handled {
                    replied: true,
                    fault: Some(fault_label(&e)),
                };
            }
        };
        let h = req.header;
        let mut fault = None;
        if crate::request::no_reply(&req.op) {
            match &req.op {
                Op::Forget(n) => self.fs.forget(h.nodeid, *n),
                Op::BatchForget(items) => self.fs.batch_forget(items),
                // Requests complete quickly and are not interruptible.
                _ => {}
            }
            return Handled {
                replied: false,
                fault,
            };
        }
        let r = match (&req.op, self.minor.load(Ordering::SeqCst)) {
            (Op::Init(i), _) => put(out, self.init(i)),
            (_, 0) => Err(Errno(libc::EIO)),
            (op, _) if self.fs.config().readonly && changes_the_share(op) => {
                Err(Errno(libc::EROFS))
            }
            (op, _) => self.dispatch(&h, req.supp_group, op, &mut fault, out),
        };
        end(out, h.unique, r);
        Handled {
            replied: true,
            fault,
        }
    }

    /// Whether the request of `msg_len` bytes that begins with `head` is a READ or WRITE the
    /// data path may serve: whole, without extensions, in a session, and nothing
    /// [`Server::handle`] would refuse before it reached the file (a READ larger than the
    /// maximum, a WRITE of a read-only share, a WRITE carrying less than it says). Every other
    /// request, malformed ones included, goes through `handle`, which has the answer.
    pub fn data_request(&self, head: &[u8], msg_len: usize) -> Option<DataRequest> {
        let (h, rest) = InHeader::read_from_prefix(head).ok()?;
        let (arg, _) = ReadIn::read_from_prefix(rest).ok()?;
        let said = h.len as usize;
        if said < DATA_HEAD || said > msg_len || h.total_extlen != 0 {
            return None;
        }
        if self.minor.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let write = match h.opcode {
            opcode::READ if arg.size <= MAX_WRITE => false,
            opcode::WRITE
                if !self.fs.config().readonly && said - DATA_HEAD >= arg.size as usize =>
            {
                true
            }
            _ => return None,
        };
        Some(DataRequest {
            write,
            unique: h.unique,
            nodeid: h.nodeid,
            arg,
        })
    }

    /// A READ from [`Server::data_request`]: `read(fd, offset)` puts at most `arg.size` bytes
    /// where the reply's data goes and says how many.
    pub fn read_direct(
        &self,
        r: &DataRequest,
        read: impl FnOnce(BorrowedFd<'_>, u64) -> std::io::Result<usize>,
    ) -> Res<usize> {
        self.fs.read_with(r.nodeid, &r.arg, read)
    }

    /// A WRITE from [`Server::data_request`]: `write(fd, offset)` writes the `arg.size` bytes
    /// of data from where they are. The reply is left in `out`.
    pub fn write_direct(
        &self,
        r: &DataRequest,
        write: impl FnOnce(BorrowedFd<'_>, u64) -> std::io::Result<usize>,
        out: &mut Reply,
    ) {
        begin(out);
        let w = put(out, self.fs.write_with(r.nodeid, &r.arg, write));
        end(out, r.unique, w);
    }

    fn init(&self, i: &InitIn) -> Res<InitOut> {
        if i.major != abi::KERNEL_VERSION || i.minor < abi::MIN_MINOR_VERSION {
            tracing::warn!(major = i.major, minor = i.minor, "unsupported FUSE version");
            return Err(Errno(libc::EPROTO));
        }
        if self.minor.load(Ordering::SeqCst) != 0 {
            // A new session (the guest remounted): nothing of the old one stays.
            self.fs.reset();
        }
        let cfg = self.fs.config();
        let mut offer = init::ASYNC_READ
            | init::ATOMIC_O_TRUNC
            | init::BIG_WRITES
            | init::AUTO_INVAL_DATA
            | init::ASYNC_DIO
            | init::PARALLEL_DIROPS
            | init::MAX_PAGES
            | init::INIT_EXT
            | init::CREATE_SUPP_GROUP;
        if cfg.killpriv_v2 {
            offer |= init::HANDLE_KILLPRIV_V2;
        }
        if cfg.cache != CacheMode::Never {
            offer |= init::CACHE_SYMLINKS;
            if cfg.readdirplus {
                offer |= init::DO_READDIRPLUS | init::READDIRPLUS_AUTO;
            }
            if cfg.writeback && !cfg.readonly {
                offer |= init::WRITEBACK_CACHE;
            }
        }
        let mut guest = u64::from(i.flags);
        if guest & init::INIT_EXT != 0 {
            guest |= u64::from(i.flags2) << 32;
        }
        let flags = offer & guest;
        let minor = i.minor.min(abi::KERNEL_MINOR_VERSION);
        self.minor.store(minor, Ordering::SeqCst);
        tracing::info!(
            minor,
            flags = format_args!("{flags:#x}"),
            "FUSE session started"
        );
        let out = InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            max_readahead: i.max_readahead,
            flags: flags as u32,
            max_background: 256,
            congestion_threshold: 192,
            max_write: MAX_WRITE,
            time_gran: 1,
            max_pages: (MAX_WRITE / 4096) as u16,
            map_alignment: 0,
            flags2: (flags >> 32) as u32,
            unused: [0; 7],
        };
        Ok(out)
    }

    fn dispatch(
        &self,
        h: &InHeader,
        supp_group: Option<u32>,
        op: &Op<'_>,
        fault: &mut Option<&'static str>,
        out: &mut Reply,
    ) -> Res<()> {
        let fs = &self.fs;
        let c = Caller {
            uid: h.uid,
            gid: h.gid,
            supp_group,
        };
        let n = h.nodeid;
        match op {
            Op::Init(_) | Op::Forget(_) | Op::BatchForget(_) | Op::Interrupt(_) => {
                unreachable!("handled before dispatch")
            }
            Op::Destroy => {
                self.reset();
                Ok(())
            }
            Op::Lookup(name) => put(out, fs.lookup(n, name)),
            Op::Getattr(_) => put(out, fs.getattr(n)),
            Op::Setattr(a) => put(out, fs.setattr(n, a)),
            Op::Readlink => put_vec(out, fs.readlink(n)),
            Op::Symlink { name, target } => put(out, fs.symlink(c, n, name, target)),
            Op::Mknod { arg, name } => put(out, fs.mknod(c, n, arg, name)),
            Op::Mkdir { arg, name } => put(out, fs.mkdir(c, n, arg, name)),
            Op::Unlink(name) => fs.unlink(n, name),
            Op::Rmdir(name) => fs.rmdir(n, name),
            Op::Rename {
                newdir,
                flags,
                old,
                new,
            } => fs.rename(n, old, *newdir, new, *flags),
            Op::Link { old, name } => put(out, fs.link(c, *old, n, name)),
            Op::Open(a) => put(out, fs.open(n, a)),
            Op::Create { arg, name } => put_pair(out, fs.create(c, n, arg, name)),
            Op::Tmpfile(arg) => put_pair(out, fs.tmpfile(c, n, arg)),
            Op::Read(a) if a.size > MAX_WRITE => Err(Errno(libc::EINVAL)),
            Op::Read(a) => put_vec(out, fs.read(n, a)),
            Op::Write { arg, data } => put(out, fs.write(n, arg, data)),
            Op::Flush(a) => fs.flush(n, a.fh),
            Op::Release(a) => fs.release(n, a.fh),
            Op::Fsync(a) => fs.fsync(n, a.fh, a.fsync_flags & 1 != 0),
            Op::Fallocate(a) => fs.fallocate(n, a),
            Op::Lseek(a) => put(out, fs.lseek(n, a)),
            Op::CopyFileRange(a) => put(out, fs.copy_file_range(n, a)),
            Op::Statfs => put(out, fs.statfs(n)),
            Op::Syncfs => fs.syncfs(),
            Op::Access(a) => fs.access(n, a.mask),
            Op::Setxattr { arg, name, value } => fs.setxattr(n, arg, name, value),
            Op::Getxattr { arg, name } => put_xattr(out, fs.getxattr(n, Some(name), arg.size)),
            Op::Listxattr(arg) => put_xattr(out, fs.getxattr(n, None, arg.size)),
            Op::Removexattr(name) => fs.removexattr(n, name),
            Op::Opendir(_) => put(out, fs.opendir(n)),
            Op::Readdir(a) => put_vec(out, fs.readdir(n, a, false, MAX_WRITE as usize)),
            Op::Readdirplus(a) => put_vec(out, fs.readdir(n, a, true, MAX_WRITE as usize)),
            Op::Releasedir(a) => fs.releasedir(n, a.fh),
            Op::Fsyncdir(a) => fs.fsyncdir(n, a.fh, a.fsync_flags & 1 != 0),
            Op::Unsupported(code) => {
                if !known_unsupported(*code) {
                    *fault = Some("unknown FUSE opcode");
                }
                Err(Errno(libc::ENOSYS))
            }
        }
    }
}

/// Whether `op` would change the share (refused with EROFS under `--readonly`): every
/// namespace and data change, and opens for writing or truncation.
fn changes_the_share(op: &Op<'_>) -> bool {
    let writes = |flags: u32| {
        let f = flags as i32;
        f & libc::O_ACCMODE != libc::O_RDONLY || f & libc::O_TRUNC != 0
    };
    match op {
        Op::Setattr(_)
        | Op::Symlink { .. }
        | Op::Mknod { .. }
        | Op::Mkdir { .. }
        | Op::Unlink(_)
        | Op::Rmdir(_)
        | Op::Rename { .. }
        | Op::Link { .. }
        | Op::Create { .. }
        | Op::Tmpfile(_)
        | Op::Write { .. }
        | Op::Fallocate(_)
        | Op::CopyFileRange(_)
        | Op::Setxattr { .. }
        | Op::Removexattr(_) => true,
        Op::Open(a) => writes(a.flags),
        _ => false,
    }
}

fn put_pair(out: &mut Reply, r: Res<(abi::EntryOut, abi::OpenOut)>) -> Res<()> {
    r.map(|(e, o)| {
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(o.as_bytes());
    })
}

/// An xattr's value (or the list of names), or the size it would take.
fn put_xattr(out: &mut Reply, r: Res<Result<Vec<u8>, u32>>) -> Res<()> {
    match r? {
        Ok(bytes) => out.extend_from_slice(&bytes),
        Err(size) => out.extend_from_slice(abi::GetxattrOut { size, padding: 0 }.as_bytes()),
    }
    Ok(())
}

/// Opcodes the protocol defines that vsnap answers with ENOSYS on purpose (the guest then
/// handles locks itself, or stops asking).
fn known_unsupported(code: u32) -> bool {
    use opcode::*;
    matches!(
        code,
        GETLK | SETLK | SETLKW | BMAP | IOCTL | POLL | SETUPMAPPING | REMOVEMAPPING
    )
}

fn fault_label(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::NoHeader(_) => "FUSE message shorter than its header (no reply possible)",
        DecodeError::BadLength { .. } => "FUSE header length disagrees with the message",
        DecodeError::Truncated { .. } => "FUSE arguments truncated",
        DecodeError::Unterminated { .. } => "FUSE name not NUL-terminated",
        DecodeError::BadExtension { .. } => "FUSE request extension malformed",
    }
}

impl InHeader {
    /// The `unique` of a message whose header is whole (0 otherwise).
    pub fn read_unique(msg: &[u8]) -> u64 {
        msg.get(8..16)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(0)
    }
}
