//! Decoding one FUSE request (the device-readable bytes of a descriptor chain) into a header and
//! a typed operation. Pure: no file system, no guest memory; every length is checked, so a
//! truncated or lying message is an error, never a panic.

use std::ffi::CStr;

use zerocopy::FromBytes;

use crate::abi::*;

/// A decoded request: its header and operation, borrowing names and data from the message.
#[derive(Debug)]
pub struct Request<'a> {
    pub header: InHeader,
    pub op: Op<'a>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Init(InitIn),
    Destroy,
    Lookup(&'a CStr),
    Forget(u64),
    BatchForget(Vec<ForgetOne>),
    Getattr(GetattrIn),
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a CStr,
        target: &'a CStr,
    },
    Mknod {
        arg: MknodIn,
        name: &'a CStr,
    },
    Mkdir {
        arg: MkdirIn,
        name: &'a CStr,
    },
    Unlink(&'a CStr),
    Rmdir(&'a CStr),
    Rename {
        newdir: u64,
        flags: u32,
        old: &'a CStr,
        new: &'a CStr,
    },
    Link {
        old: u64,
        name: &'a CStr,
    },
    Open(OpenIn),
    Create {
        arg: CreateIn,
        name: &'a CStr,
    },
    Tmpfile(CreateIn),
    Read(ReadIn),
    Write {
        arg: ReadIn,
        data: &'a [u8],
    },
    Flush(FlushIn),
    Release(ReleaseIn),
    Fsync(FsyncIn),
    Fallocate(FallocateIn),
    Lseek(LseekIn),
    CopyFileRange(CopyFileRangeIn),
    Statfs,
    Syncfs,
    Access(AccessIn),
    Setxattr {
        arg: SetxattrIn,
        name: &'a CStr,
        value: &'a [u8],
    },
    Getxattr {
        arg: GetxattrIn,
        name: &'a CStr,
    },
    Listxattr(GetxattrIn),
    Removexattr(&'a CStr),
    Opendir(OpenIn),
    Readdir(ReadIn),
    Readdirplus(ReadIn),
    Releasedir(ReleaseIn),
    Fsyncdir(FsyncIn),
    Interrupt(InterruptIn),
    /// Known opcodes vsnap does not implement (locks, ioctl, poll, bmap, DAX mappings), and
    /// opcodes it does not know: answered with ENOSYS.
    Unsupported(u32),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No reply is possible: without a whole header there is no `unique` to answer.
    #[error("message of {0} bytes is shorter than the FUSE header")]
    NoHeader(usize),
    #[error("header says {said} bytes, the message has {got}")]
    BadLength { said: u32, got: usize },
    #[error("opcode {opcode}: arguments truncated")]
    Truncated { opcode: u32 },
    #[error("opcode {opcode}: a name is not NUL-terminated")]
    Unterminated { opcode: u32 },
}

impl DecodeError {
    /// The errno of the reply (EINVAL for every malformed message).
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// Reads fixed-size arguments and NUL-terminated names off the front of a message.
struct Args<'a> {
    rest: &'a [u8],
    opcode: u32,
}

impl<'a> Args<'a> {
    fn take<T: FromBytes>(&mut self) -> Result<T, DecodeError> {
        let (v, rest) = T::read_from_prefix(self.rest).map_err(|_| DecodeError::Truncated {
            opcode: self.opcode,
        })?;
        self.rest = rest;
        Ok(v)
    }

    fn name(&mut self) -> Result<&'a CStr, DecodeError> {
        let c = CStr::from_bytes_until_nul(self.rest).map_err(|_| DecodeError::Unterminated {
            opcode: self.opcode,
        })?;
        self.rest = &self.rest[c.to_bytes().len() + 1..];
        Ok(c)
    }

    fn bytes(&mut self, n: u32) -> Result<&'a [u8], DecodeError> {
        let n = n as usize;
        if self.rest.len() < n {
            return Err(DecodeError::Truncated {
                opcode: self.opcode,
            });
        }
        let (b, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(b)
    }
}

/// Decodes `msg`, the whole device-readable part of a chain.
pub fn decode(msg: &[u8]) -> Result<Request<'_>, DecodeError> {
    let (header, _) =
        InHeader::read_from_prefix(msg).map_err(|_| DecodeError::NoHeader(msg.len()))?;
    let said = header.len as usize;
    if said < size_of::<InHeader>() || said > msg.len() {
        return Err(DecodeError::BadLength {
            said: header.len,
            got: msg.len(),
        });
    }
    let mut a = Args {
        rest: &msg[size_of::<InHeader>()..said],
        opcode: header.opcode,
    };
    use opcode::*;
    let op = match header.opcode {
        INIT => {
            // Guests before 7.36 send only the first 16 bytes.
            let mut raw = [0u8; size_of::<InitIn>()];
            let n = a.rest.len().min(raw.len());
            if n < INIT_IN_COMPAT_SIZE {
                return Err(DecodeError::Truncated { opcode: INIT });
            }
            raw[..n].copy_from_slice(&a.rest[..n]);
            Op::Init(InitIn::read_from_bytes(&raw).expect("sized buffer"))
        }
        DESTROY => Op::Destroy,
        LOOKUP => Op::Lookup(a.name()?),
        FORGET => Op::Forget(a.take::<ForgetIn>()?.nlookup),
        BATCH_FORGET => {
            let n = a.take::<BatchForgetIn>()?.count as usize;
            if a.rest.len() / size_of::<ForgetOne>() < n {
                return Err(DecodeError::Truncated {
                    opcode: BATCH_FORGET,
                });
            }
            (0..n)
                .map(|_| a.take::<ForgetOne>())
                .collect::<Result<_, _>>()
                .map(Op::BatchForget)?
        }
        GETATTR => Op::Getattr(a.take()?),
        SETATTR => Op::Setattr(a.take()?),
        READLINK => Op::Readlink,
        SYMLINK => Op::Symlink {
            name: a.name()?,
            target: a.name()?,
        },
        MKNOD => Op::Mknod {
            arg: a.take()?,
            name: a.name()?,
        },
        MKDIR => Op::Mkdir {
            arg: a.take()?,
            name: a.name()?,
        },
        UNLINK => Op::Unlink(a.name()?),
        RMDIR => Op::Rmdir(a.name()?),
        RENAME => Op::Rename {
            newdir: a.take::<RenameIn>()?.newdir,
            flags: 0,
            old: a.name()?,
            new: a.name()?,
        },
        RENAME2 => {
            let r: Rename2In = a.take()?;
            Op::Rename {
                newdir: r.newdir,
                flags: r.flags,
                old: a.name()?,
                new: a.name()?,
            }
        }
        LINK => Op::Link {
            old: a.take::<LinkIn>()?.oldnodeid,
            name: a.name()?,
        },
        OPEN => Op::Open(a.take()?),
        CREATE => Op::Create {
            arg: a.take()?,
            name: a.name()?,
        },
        TMPFILE => Op::Tmpfile(a.take()?),
        READ => Op::Read(a.take()?),
        WRITE => {
            let arg: ReadIn = a.take()?;
            Op::Write {
                arg,
                data: a.bytes(arg.size)?,
            }
        }
        FLUSH => Op::Flush(a.take()?),
        RELEASE => Op::Release(a.take()?),
        FSYNC => Op::Fsync(a.take()?),
        FALLOCATE => Op::Fallocate(a.take()?),
        LSEEK => Op::Lseek(a.take()?),
        COPY_FILE_RANGE => Op::CopyFileRange(a.take()?),
        STATFS => Op::Statfs,
        SYNCFS => Op::Syncfs,
        ACCESS => Op::Access(a.take()?),
        SETXATTR => {
            let arg: SetxattrIn = a.take()?;
            Op::Setxattr {
                arg,
                name: a.name()?,
                value: a.bytes(arg.size)?,
            }
        }
        GETXATTR => Op::Getxattr {
            arg: a.take()?,
            name: a.name()?,
        },
        LISTXATTR => Op::Listxattr(a.take()?),
        REMOVEXATTR => Op::Removexattr(a.name()?),
        OPENDIR => Op::Opendir(a.take()?),
        READDIR => Op::Readdir(a.take()?),
        READDIRPLUS => Op::Readdirplus(a.take()?),
        RELEASEDIR => Op::Releasedir(a.take()?),
        FSYNCDIR => Op::Fsyncdir(a.take()?),
        INTERRUPT => Op::Interrupt(a.take()?),
        other => Op::Unsupported(other),
    };
    Ok(Request { header, op })
}

/// The opcodes that get no reply.
pub fn no_reply(op: &Op<'_>) -> bool {
    matches!(op, Op::Forget(_) | Op::BatchForget(_) | Op::Interrupt(_))
}
