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
    /// The supplementary group of a create-type request's extension (`FUSE_EXT_GROUPS`).
    pub supp_group: Option<u32>,
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
    #[error("opcode {opcode}: malformed request extension")]
    BadExtension { opcode: u32 },
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
    // Extensions (in 8-byte units) close the message, after the arguments.
    let body = &msg[size_of::<InHeader>()..said];
    let ext_len = usize::from(header.total_extlen) * 8;
    let Some(args_len) = body.len().checked_sub(ext_len) else {
        return Err(DecodeError::BadExtension {
            opcode: header.opcode,
        });
    };
    let (args, ext) = body.split_at(args_len);
    let supp_group = decode_extensions(ext).ok_or(DecodeError::BadExtension {
        opcode: header.opcode,
    })?;
    let mut a = Args {
        rest: args,
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
        SYNCFS => {
            a.take::<u64>()?; // fuse_syncfs_in: padding only
            Op::Syncfs
        }
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
    Ok(Request {
        header,
        op,
        supp_group,
    })
}

/// Walks the extension records (`fuse_ext_header { size, type }`, each a multiple of 8 bytes)
/// and returns the supplementary group, if one is sent; `None` when a record is malformed.
fn decode_extensions(mut ext: &[u8]) -> Option<Option<u32>> {
    let mut group = None;
    while !ext.is_empty() {
        let (h, _) = ExtHeader::read_from_prefix(ext).ok()?;
        let size = h.size as usize;
        if size < size_of::<ExtHeader>() || !size.is_multiple_of(8) || size > ext.len() {
            return None;
        }
        let (rec, rest) = ext.split_at(size);
        if h.typ == EXT_GROUPS {
            let body = &rec[size_of::<ExtHeader>()..];
            let (n, groups) = u32::read_from_prefix(body).ok()?;
            // The kernel sends exactly one group: the parent directory's, which the caller is
            // in. More is not a request we understand.
            if n != 1 {
                return None;
            }
            group = Some(u32::read_from_prefix(groups).ok()?.0);
        }
        ext = rest;
    }
    Some(group)
}

/// The opcodes that get no reply.
pub fn no_reply(op: &Op<'_>) -> bool {
    matches!(op, Op::Forget(_) | Op::BatchForget(_) | Op::Interrupt(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn msg(opcode: u32, args: &[u8]) -> Vec<u8> {
        let h = InHeader {
            len: (size_of::<InHeader>() + args.len()) as u32,
            opcode,
            unique: 42,
            nodeid: 7,
            ..InHeader::default()
        };
        let mut m = h.as_bytes().to_vec();
        m.extend_from_slice(args);
        m
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// One well-formed message per opcode the decoder knows, with the operation it must yield.
    fn samples() -> Vec<(u32, Vec<u8>)> {
        use opcode::*;
        let read = ReadIn {
            fh: 3,
            offset: 4096,
            size: 5,
            ..ReadIn::default()
        };
        let setattr = SetattrIn {
            valid: fattr::MODE,
            mode: 0o644,
            ..SetattrIn::default()
        };
        vec![
            (
                INIT,
                InitIn {
                    major: 7,
                    minor: 38,
                    ..InitIn::default()
                }
                .as_bytes()
                .to_vec(),
            ),
            (DESTROY, vec![]),
            (LOOKUP, b"name\0".to_vec()),
            (FORGET, ForgetIn { nlookup: 3 }.as_bytes().to_vec()),
            (
                BATCH_FORGET,
                cat(&[
                    BatchForgetIn { count: 2, dummy: 0 }.as_bytes(),
                    ForgetOne {
                        nodeid: 2,
                        nlookup: 1,
                    }
                    .as_bytes(),
                    ForgetOne {
                        nodeid: 3,
                        nlookup: 4,
                    }
                    .as_bytes(),
                ]),
            ),
            (GETATTR, GetattrIn::default().as_bytes().to_vec()),
            (SETATTR, setattr.as_bytes().to_vec()),
            (READLINK, vec![]),
            (SYMLINK, b"link\0target\0".to_vec()),
            (
                MKNOD,
                cat(&[
                    MknodIn {
                        mode: 0o10644,
                        ..MknodIn::default()
                    }
                    .as_bytes(),
                    b"fifo\0",
                ]),
            ),
            (
                MKDIR,
                cat(&[
                    MkdirIn {
                        mode: 0o755,
                        umask: 0,
                    }
                    .as_bytes(),
                    b"dir\0",
                ]),
            ),
            (UNLINK, b"f\0".to_vec()),
            (RMDIR, b"d\0".to_vec()),
            (RENAME, cat(&[RenameIn { newdir: 9 }.as_bytes(), b"a\0b\0"])),
            (
                RENAME2,
                cat(&[
                    Rename2In {
                        newdir: 9,
                        flags: 1,
                        padding: 0,
                    }
                    .as_bytes(),
                    b"a\0b\0",
                ]),
            ),
            (LINK, cat(&[LinkIn { oldnodeid: 5 }.as_bytes(), b"hard\0"])),
            (
                OPEN,
                OpenIn {
                    flags: 2,
                    open_flags: 0,
                }
                .as_bytes()
                .to_vec(),
            ),
            (
                CREATE,
                cat(&[
                    CreateIn {
                        flags: 0o100,
                        mode: 0o644,
                        ..CreateIn::default()
                    }
                    .as_bytes(),
                    b"new\0",
                ]),
            ),
            (TMPFILE, CreateIn::default().as_bytes().to_vec()),
            (READ, read.as_bytes().to_vec()),
            (WRITE, cat(&[read.as_bytes(), b"hello"])),
            (FLUSH, FlushIn::default().as_bytes().to_vec()),
            (RELEASE, ReleaseIn::default().as_bytes().to_vec()),
            (FSYNC, FsyncIn::default().as_bytes().to_vec()),
            (FALLOCATE, FallocateIn::default().as_bytes().to_vec()),
            (LSEEK, LseekIn::default().as_bytes().to_vec()),
            (
                COPY_FILE_RANGE,
                CopyFileRangeIn::default().as_bytes().to_vec(),
            ),
            (STATFS, vec![]),
            (SYNCFS, 0u64.as_bytes().to_vec()),
            (ACCESS, AccessIn::default().as_bytes().to_vec()),
            (
                SETXATTR,
                cat(&[
                    SetxattrIn { size: 3, flags: 0 }.as_bytes(),
                    b"user.a\0",
                    b"xyz",
                ]),
            ),
            (
                GETXATTR,
                cat(&[
                    GetxattrIn {
                        size: 64,
                        padding: 0,
                    }
                    .as_bytes(),
                    b"user.a\0",
                ]),
            ),
            (LISTXATTR, GetxattrIn::default().as_bytes().to_vec()),
            (REMOVEXATTR, b"user.a\0".to_vec()),
            (OPENDIR, OpenIn::default().as_bytes().to_vec()),
            (READDIR, read.as_bytes().to_vec()),
            (READDIRPLUS, read.as_bytes().to_vec()),
            (RELEASEDIR, ReleaseIn::default().as_bytes().to_vec()),
            (FSYNCDIR, FsyncIn::default().as_bytes().to_vec()),
            (INTERRUPT, InterruptIn { unique: 40 }.as_bytes().to_vec()),
        ]
    }

    #[test]
    fn every_opcode_decodes() {
        for (opcode, args) in samples() {
            let m = msg(opcode, &args);
            let r = decode(&m).unwrap_or_else(|e| panic!("opcode {opcode}: {e}"));
            assert_eq!((r.header.unique, r.header.nodeid), (42, 7));
            assert!(!matches!(r.op, Op::Unsupported(_)), "opcode {opcode}");
        }
        let m = msg(opcode::RENAME2, &samples()[14].1);
        assert_eq!(
            decode(&m).unwrap().op,
            Op::Rename {
                newdir: 9,
                flags: 1,
                old: c"a",
                new: c"b"
            }
        );
        let m = msg(opcode::WRITE, &samples()[20].1);
        assert!(matches!(
            decode(&m).unwrap().op,
            Op::Write { data: b"hello", .. }
        ));
        let m = msg(opcode::SETXATTR, &samples()[30].1);
        assert!(matches!(
            decode(&m).unwrap().op,
            Op::Setxattr { name, value: b"xyz", .. } if name == c"user.a"
        ));
        let m = msg(opcode::BATCH_FORGET, &samples()[4].1);
        assert!(
            matches!(decode(&m).unwrap().op, Op::BatchForget(v) if v.len() == 2 && v[1].nlookup == 4)
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for (opcode, args) in samples() {
            // Ops whose arguments may be empty have no truncated form.
            let min = match opcode {
                opcode::INIT => INIT_IN_COMPAT_SIZE,
                _ => args.len(),
            };
            for cut in 0..min {
                let m = msg(opcode, &args[..cut]);
                assert!(
                    decode(&m).is_err(),
                    "opcode {opcode} cut to {cut} bytes decoded"
                );
            }
            // A header that claims more than the message holds.
            let mut m = msg(opcode, &args);
            let lie = m.len() as u32 + 1;
            m[0..4].copy_from_slice(&lie.to_le_bytes());
            assert_eq!(
                decode(&m).unwrap_err(),
                DecodeError::BadLength {
                    said: m.len() as u32 + 1,
                    got: m.len()
                }
            );
            // Every prefix of the message, header included, is handled.
            let m = msg(opcode, &args);
            for cut in 0..m.len() {
                let _ = decode(&m[..cut]);
            }
        }
    }

    #[test]
    fn short_messages_and_odd_opcodes() {
        assert_eq!(decode(&[0u8; 39]).unwrap_err(), DecodeError::NoHeader(39));
        let mut m = msg(opcode::LOOKUP, b"x\0");
        m[0..4].copy_from_slice(&10u32.to_le_bytes());
        assert!(matches!(
            decode(&m),
            Err(DecodeError::BadLength { said: 10, .. })
        ));
        assert_eq!(decode(&msg(9999, &[])).unwrap().op, Op::Unsupported(9999));
        assert_eq!(
            decode(&msg(opcode::GETLK, &[])).unwrap().op,
            Op::Unsupported(opcode::GETLK)
        );
        // A write whose size says more than it carries.
        let mut w = ReadIn {
            size: 100,
            ..ReadIn::default()
        }
        .as_bytes()
        .to_vec();
        w.extend_from_slice(b"short");
        assert_eq!(
            decode(&msg(opcode::WRITE, &w)).unwrap_err(),
            DecodeError::Truncated {
                opcode: opcode::WRITE
            }
        );
        // A batch forget whose count is larger than what follows (and would overflow).
        let b = BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        };
        assert!(decode(&msg(opcode::BATCH_FORGET, b.as_bytes())).is_err());
        // Old guests send the 16-byte INIT.
        let i = InitIn {
            major: 7,
            minor: 31,
            ..InitIn::default()
        };
        let m = msg(opcode::INIT, &i.as_bytes()[..INIT_IN_COMPAT_SIZE]);
        let r = decode(&m).unwrap();
        assert!(matches!(r.op, Op::Init(InitIn { minor: 31, .. })));
        // Bytes past the header's length are ignored (the name is cut at len).
        let mut m = msg(opcode::LOOKUP, b"abc\0");
        m.extend_from_slice(b"junk");
        assert_eq!(decode(&m).unwrap().op, Op::Lookup(c"abc"));
    }

    /// A create-type request with `ext` appended as its extension area.
    fn with_ext(opcode: u32, args: &[u8], ext: &[u8]) -> Vec<u8> {
        let mut m = msg(opcode, &cat(&[args, ext]));
        let mut h = InHeader::read_from_prefix(&m).unwrap().0;
        h.total_extlen = (ext.len() / 8) as u16;
        m[..size_of::<InHeader>()].copy_from_slice(h.as_bytes());
        m
    }

    fn groups_ext(groups: &[u32]) -> Vec<u8> {
        let mut body = (groups.len() as u32).to_le_bytes().to_vec();
        for g in groups {
            body.extend_from_slice(&g.to_le_bytes());
        }
        body.resize(body.len().next_multiple_of(8), 0);
        let h = ExtHeader {
            size: (size_of::<ExtHeader>() + body.len()) as u32,
            typ: EXT_GROUPS,
        };
        cat(&[h.as_bytes(), &body])
    }

    #[test]
    fn the_supplementary_group_extension() {
        let mk = MkdirIn {
            mode: 0o755,
            umask: 0,
        };
        let args = cat(&[mk.as_bytes(), b"d\0\0\0\0\0\0\0"]);
        let m = with_ext(opcode::MKDIR, &args, &groups_ext(&[1234]));
        let r = decode(&m).unwrap();
        assert_eq!(r.supp_group, Some(1234));
        assert!(matches!(r.op, Op::Mkdir { name, .. } if name == c"d"));
        // An unknown extension type is skipped.
        let other = cat(&[ExtHeader { size: 16, typ: 99 }.as_bytes(), &[0u8; 8]]);
        let m = with_ext(opcode::MKDIR, &args, &other);
        let r = decode(&m).unwrap();
        assert_eq!(r.supp_group, None);
        // Lies: more groups than the kernel sends, a record longer than the area, a size
        // that is not a multiple of 8, an area longer than the message.
        let bad = [
            groups_ext(&[1, 2]),
            cat(&[
                ExtHeader {
                    size: 64,
                    typ: EXT_GROUPS,
                }
                .as_bytes(),
                &[0u8; 8],
            ]),
            cat(&[ExtHeader { size: 12, typ: 7 }.as_bytes(), &[0u8; 8]]),
            cat(&[ExtHeader { size: 0, typ: 7 }.as_bytes()]),
        ];
        for ext in bad {
            assert_eq!(
                decode(&with_ext(opcode::MKDIR, &args, &ext)).unwrap_err(),
                DecodeError::BadExtension {
                    opcode: opcode::MKDIR
                }
            );
        }
        let mut m = msg(opcode::MKDIR, &args);
        m[size_of::<InHeader>() - 4] = 200; // total_extlen: 1600 bytes, past the message
        assert!(matches!(decode(&m), Err(DecodeError::BadExtension { .. })));
    }
}
