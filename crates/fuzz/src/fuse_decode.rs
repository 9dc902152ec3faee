//! Target `fuse_decode`: `vsnap_fs::request::decode` on arbitrary bytes, with the properties a
//! decoded request must have: its header is the message's first 40 bytes, its length lies within
//! the message, bytes past that length change nothing, every borrowed name or payload has the
//! size its fixed arguments announce, and re-encoding the operation decodes to the same one.

use std::ffi::CStr;

use vsnap_fs::abi::{opcode::*, *};
use vsnap_fs::request::{decode, DecodeError, Op, Request};
use zerocopy::{FromBytes, IntoBytes};

const HEADER: usize = size_of::<InHeader>();

/// A message with `header` (its `len` set to the real length) and the concatenated `args`.
pub fn message(mut header: InHeader, args: &[&[u8]]) -> Vec<u8> {
    let body: usize = args.iter().map(|a| a.len()).sum();
    header.len = (HEADER + body) as u32;
    let mut m = Vec::with_capacity(HEADER + body);
    m.extend_from_slice(header.as_bytes());
    for a in args {
        m.extend_from_slice(a);
    }
    m
}

/// A request header for `opcode` on `nodeid`, as root.
pub fn header(opcode: u32, nodeid: u64, unique: u64) -> InHeader {
    InHeader {
        opcode,
        unique,
        nodeid,
        ..InHeader::default()
    }
}

fn cstr(c: &CStr) -> &[u8] {
    c.to_bytes_with_nul()
}

/// A `FUSE_EXT_GROUPS` extension naming one supplementary group.
pub fn groups_ext(group: u32) -> Vec<u8> {
    let h = ExtHeader {
        size: 16,
        typ: EXT_GROUPS,
    };
    [h.as_bytes(), &1u32.to_le_bytes(), &group.to_le_bytes()].concat()
}

/// The canonical argument bytes of `op` under `opcode` (the decoder's inverse).
pub fn encode_args(opcode: u32, op: &Op<'_>) -> Vec<u8> {
    let parts: Vec<&[u8]>;
    let owned: Vec<u8>;
    match op {
        Op::Init(i) => return i.as_bytes().to_vec(),
        Op::Destroy | Op::Readlink | Op::Statfs | Op::Unsupported(_) => return Vec::new(),
        Op::Syncfs => return 0u64.to_le_bytes().to_vec(),
        Op::Lookup(n) | Op::Unlink(n) | Op::Rmdir(n) | Op::Removexattr(n) => {
            return cstr(n).to_vec()
        }
        Op::Forget(n) => return ForgetIn { nlookup: *n }.as_bytes().to_vec(),
        Op::BatchForget(items) => {
            let mut v = BatchForgetIn {
                count: items.len() as u32,
                dummy: 0,
            }
            .as_bytes()
            .to_vec();
            v.extend_from_slice(items.as_bytes());
            return v;
        }
        Op::Getattr(a) => return a.as_bytes().to_vec(),
        Op::Setattr(a) => return a.as_bytes().to_vec(),
        Op::Symlink { name, target } => parts = vec![cstr(name), cstr(target)],
        Op::Mknod { arg, name } => parts = vec![arg.as_bytes(), cstr(name)],
        Op::Mkdir { arg, name } => parts = vec![arg.as_bytes(), cstr(name)],
        Op::Rename {
            newdir,
            flags,
            old,
            new,
        } => {
            owned = if opcode == RENAME {
                RenameIn { newdir: *newdir }.as_bytes().to_vec()
            } else {
                Rename2In {
                    newdir: *newdir,
                    flags: *flags,
                    padding: 0,
                }
                .as_bytes()
                .to_vec()
            };
            parts = vec![&owned, cstr(old), cstr(new)];
        }
        Op::Link { old, name } => {
            owned = LinkIn { oldnodeid: *old }.as_bytes().to_vec();
            parts = vec![&owned, cstr(name)];
        }
        Op::Open(a) | Op::Opendir(a) => return a.as_bytes().to_vec(),
        Op::Create { arg, name } => parts = vec![arg.as_bytes(), cstr(name)],
        Op::Tmpfile(a) => return a.as_bytes().to_vec(),
        Op::Read(a) | Op::Readdir(a) | Op::Readdirplus(a) => return a.as_bytes().to_vec(),
        Op::Write { arg, data } => parts = vec![arg.as_bytes(), data],
        Op::Flush(a) => return a.as_bytes().to_vec(),
        Op::Release(a) | Op::Releasedir(a) => return a.as_bytes().to_vec(),
        Op::Fsync(a) | Op::Fsyncdir(a) => return a.as_bytes().to_vec(),
        Op::Fallocate(a) => return a.as_bytes().to_vec(),
        Op::Lseek(a) => return a.as_bytes().to_vec(),
        Op::CopyFileRange(a) => return a.as_bytes().to_vec(),
        Op::Access(a) => return a.as_bytes().to_vec(),
        Op::Setxattr { arg, name, value } => parts = vec![arg.as_bytes(), cstr(name), value],
        Op::Getxattr { arg, name } => parts = vec![arg.as_bytes(), cstr(name)],
        Op::Listxattr(a) => return a.as_bytes().to_vec(),
        Op::Interrupt(a) => return a.as_bytes().to_vec(),
    }
    parts.concat()
}

/// The harness: never panics unless the decoder breaks one of its properties.
pub fn fuse_decode(data: &[u8]) {
    let got = decode(data);
    let Some((h, _)) = InHeader::read_from_prefix(data).ok() else {
        assert_eq!(got.unwrap_err(), DecodeError::NoHeader(data.len()));
        return;
    };
    let len = h.len as usize;
    if len < HEADER || len > data.len() {
        assert_eq!(
            got.unwrap_err(),
            DecodeError::BadLength {
                said: h.len,
                got: data.len()
            }
        );
        return;
    }
    // Bytes past the header's length are not part of the message: cutting them off, or adding
    // more, gives the same result.
    let cut = &data[..len];
    let mut longer = data.to_vec();
    longer.extend_from_slice(b"\0\xffjunk\0");
    let same = |other: &[u8]| match (&got, decode(other)) {
        (Ok(a), Ok(b)) => a.header == b.header && a.op == b.op,
        (Err(a), Err(b)) => *a == b,
        _ => false,
    };
    assert!(same(cut), "the result depends on bytes past len");
    assert!(
        same(&longer),
        "the result depends on bytes past the message"
    );
    let ext = usize::from(h.total_extlen) * 8;
    // Exhaustive on purpose: a new kind of error must be taught to this harness.
    match &got {
        Err(DecodeError::BadExtension { opcode }) => assert_eq!(*opcode, h.opcode),
        // Extensions longer than the message cannot be anything else.
        _ if ext > len - HEADER => panic!("{got:?} for extensions past the message"),
        Err(DecodeError::Truncated { opcode } | DecodeError::Unterminated { opcode }) => {
            assert_eq!(*opcode, h.opcode)
        }
        Err(e @ (DecodeError::NoHeader(_) | DecodeError::BadLength { .. })) => {
            panic!("{e:?} for a message whose header is whole and len is in bounds")
        }
        Ok(r) => check_request(r, &h, &cut[..len - ext]),
    }
}

/// `msg` is the message without its extensions.
fn check_request(r: &Request<'_>, h: &InHeader, msg: &[u8]) {
    assert_eq!(r.header, *h);
    let args = &msg[HEADER..];
    // Everything borrowed lies inside the arguments.
    let inside = |b: &[u8]| {
        let (s, e) = (args.as_ptr() as usize, args.as_ptr() as usize + args.len());
        let p = b.as_ptr() as usize;
        b.is_empty() || (p >= s && p + b.len() <= e)
    };
    let names: Vec<&CStr> = match &r.op {
        Op::Lookup(n) | Op::Unlink(n) | Op::Rmdir(n) | Op::Removexattr(n) => vec![n],
        Op::Symlink { name, target } => vec![name, target],
        Op::Mknod { name, .. }
        | Op::Mkdir { name, .. }
        | Op::Link { name, .. }
        | Op::Create { name, .. }
        | Op::Getxattr { name, .. } => vec![name],
        Op::Rename { old, new, .. } => vec![old, new],
        Op::Setxattr { name, .. } => vec![name],
        _ => vec![],
    };
    for n in names {
        assert!(inside(n.to_bytes_with_nul()), "a name outside the message");
    }
    match &r.op {
        Op::Write { arg, data } => {
            assert_eq!(data.len(), arg.size as usize);
            assert!(inside(data));
        }
        Op::Setxattr { arg, value, .. } => {
            assert_eq!(value.len(), arg.size as usize);
            assert!(inside(value));
        }
        Op::BatchForget(items) => {
            let count = BatchForgetIn::read_from_prefix(args)
                .expect("decoded")
                .0
                .count;
            assert_eq!(items.len(), count as usize);
        }
        Op::Rename { flags, .. } if h.opcode == RENAME => assert_eq!(*flags, 0),
        Op::Unsupported(c) => {
            assert_eq!(*c, h.opcode);
            assert!(
                !DECODED.contains(c),
                "opcode {c} is decoded but came back unsupported"
            );
        }
        _ => assert!(DECODED.contains(&h.opcode), "opcode {} decoded", h.opcode),
    }
    // The operation re-encoded under the same opcode (with only the extension the decoder
    // understood) decodes to itself.
    let ext = r.supp_group.map(groups_ext).unwrap_or_default();
    let h2 = InHeader {
        total_extlen: (ext.len() / 8) as u16,
        ..*h
    };
    let again = message(h2, &[&encode_args(h.opcode, &r.op), &ext]);
    let r2 = decode(&again).unwrap_or_else(|e| panic!("re-encoded {:?}: {e}", r.op));
    assert_eq!(r2.op, r.op, "the decoder is not the encoder's inverse");
    assert_eq!(r2.supp_group, r.supp_group, "the group extension changed");
}

/// Opcodes the decoder turns into a typed operation.
const DECODED: &[u32] = &[
    INIT,
    DESTROY,
    LOOKUP,
    FORGET,
    BATCH_FORGET,
    GETATTR,
    SETATTR,
    READLINK,
    SYMLINK,
    MKNOD,
    MKDIR,
    UNLINK,
    RMDIR,
    RENAME,
    RENAME2,
    LINK,
    OPEN,
    CREATE,
    TMPFILE,
    READ,
    WRITE,
    FLUSH,
    RELEASE,
    FSYNC,
    FALLOCATE,
    LSEEK,
    COPY_FILE_RANGE,
    STATFS,
    SYNCFS,
    ACCESS,
    SETXATTR,
    GETXATTR,
    LISTXATTR,
    REMOVEXATTR,
    OPENDIR,
    READDIR,
    READDIRPLUS,
    RELEASEDIR,
    FSYNCDIR,
    INTERRUPT,
];

/// One well-formed message per decoded opcode (and a few unsupported ones).
pub fn seeds() -> Vec<Vec<u8>> {
    let read = ReadIn {
        fh: 1,
        offset: 0,
        size: 4096,
        ..ReadIn::default()
    };
    let write = ReadIn { size: 5, ..read };
    let init = InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: 1 << 17,
        flags: u32::MAX,
        flags2: u32::MAX,
        ..InitIn::default()
    };
    let forgets = [
        ForgetOne {
            nodeid: 2,
            nlookup: 1,
        },
        ForgetOne {
            nodeid: 3,
            nlookup: 2,
        },
    ];
    let batch = BatchForgetIn { count: 2, dummy: 0 };
    let m = |op: u32, args: &[&[u8]]| message(header(op, 1, 7), args);
    vec![
        m(INIT, &[init.as_bytes()]),
        m(INIT, &[&init.as_bytes()[..INIT_IN_COMPAT_SIZE]]),
        m(DESTROY, &[]),
        m(LOOKUP, &[b"file\0"]),
        m(FORGET, &[ForgetIn { nlookup: 1 }.as_bytes()]),
        m(BATCH_FORGET, &[batch.as_bytes(), forgets.as_bytes()]),
        m(
            GETATTR,
            &[GetattrIn {
                getattr_flags: GETATTR_FH,
                dummy: 0,
                fh: 1,
            }
            .as_bytes()],
        ),
        m(
            SETATTR,
            &[SetattrIn {
                valid: fattr::MODE | fattr::SIZE | fattr::MTIME,
                mode: 0o644,
                size: 3,
                ..SetattrIn::default()
            }
            .as_bytes()],
        ),
        m(READLINK, &[]),
        m(SYMLINK, &[b"ln\0", b"../target\0"]),
        m(
            MKNOD,
            &[
                MknodIn {
                    mode: libc::S_IFIFO | 0o644,
                    ..MknodIn::default()
                }
                .as_bytes(),
                b"fifo\0",
            ],
        ),
        m(
            MKDIR,
            &[
                MkdirIn {
                    mode: 0o755,
                    umask: 0o022,
                }
                .as_bytes(),
                b"d\0",
            ],
        ),
        {
            let mut h = header(MKDIR, 1, 7);
            h.total_extlen = 2;
            let mk = MkdirIn {
                mode: 0o755,
                umask: 0,
            };
            message(h, &[mk.as_bytes(), b"grp\0", &groups_ext(1000)])
        },
        m(UNLINK, &[b"file\0"]),
        m(RMDIR, &[b"dir\0"]),
        m(RENAME, &[RenameIn { newdir: 1 }.as_bytes(), b"a\0b\0"]),
        m(
            RENAME2,
            &[
                Rename2In {
                    newdir: 1,
                    flags: libc::RENAME_NOREPLACE,
                    padding: 0,
                }
                .as_bytes(),
                b"a\0b\0",
            ],
        ),
        m(LINK, &[LinkIn { oldnodeid: 2 }.as_bytes(), b"hard\0"]),
        m(
            OPEN,
            &[OpenIn {
                flags: libc::O_RDWR as u32,
                open_flags: 0,
            }
            .as_bytes()],
        ),
        m(
            CREATE,
            &[
                CreateIn {
                    flags: (libc::O_RDWR | libc::O_CREAT) as u32,
                    mode: 0o644,
                    umask: 0o022,
                    open_flags: 0,
                }
                .as_bytes(),
                b"new\0",
            ],
        ),
        m(
            TMPFILE,
            &[CreateIn {
                flags: libc::O_RDWR as u32,
                mode: 0o600,
                ..CreateIn::default()
            }
            .as_bytes()],
        ),
        m(READ, &[read.as_bytes()]),
        m(WRITE, &[write.as_bytes(), b"hello"]),
        m(FLUSH, &[FlushIn::default().as_bytes()]),
        m(RELEASE, &[ReleaseIn::default().as_bytes()]),
        m(FSYNC, &[FsyncIn::default().as_bytes()]),
        m(
            FALLOCATE,
            &[FallocateIn {
                fh: 1,
                offset: 0,
                length: 8192,
                mode: 0,
                padding: 0,
            }
            .as_bytes()],
        ),
        m(
            LSEEK,
            &[LseekIn {
                fh: 1,
                offset: 0,
                whence: libc::SEEK_DATA as u32,
                padding: 0,
            }
            .as_bytes()],
        ),
        m(
            COPY_FILE_RANGE,
            &[CopyFileRangeIn {
                fh_in: 1,
                nodeid_out: 2,
                fh_out: 1,
                off_out: 100,
                len: 10,
                ..CopyFileRangeIn::default()
            }
            .as_bytes()],
        ),
        m(STATFS, &[]),
        m(SYNCFS, &[&0u64.to_le_bytes()]),
        m(
            ACCESS,
            &[AccessIn {
                mask: 4,
                padding: 0,
            }
            .as_bytes()],
        ),
        m(
            SETXATTR,
            &[
                SetxattrIn { size: 3, flags: 0 }.as_bytes(),
                b"user.k\0",
                b"val",
            ],
        ),
        m(
            GETXATTR,
            &[
                GetxattrIn {
                    size: 64,
                    padding: 0,
                }
                .as_bytes(),
                b"user.k\0",
            ],
        ),
        m(
            LISTXATTR,
            &[GetxattrIn {
                size: 0,
                padding: 0,
            }
            .as_bytes()],
        ),
        m(REMOVEXATTR, &[b"user.k\0"]),
        m(OPENDIR, &[OpenIn::default().as_bytes()]),
        m(READDIR, &[read.as_bytes()]),
        m(READDIRPLUS, &[read.as_bytes()]),
        m(RELEASEDIR, &[ReleaseIn::default().as_bytes()]),
        m(FSYNCDIR, &[FsyncIn::default().as_bytes()]),
        m(INTERRUPT, &[InterruptIn { unique: 7 }.as_bytes()]),
        m(GETLK, &[&[0u8; 48]]),
        m(IOCTL, &[&[0u8; 32]]),
        m(9999, &[]),
    ]
}

/// Tokens the mutator inserts: names the sandbox must refuse, and small structures.
pub const DICT: &[&[u8]] = &[
    b"..\0",
    b".\0",
    b"/\0",
    b"a/b\0",
    b"\0",
    b".vsnap-workdir\0",
    b"user.k\0",
    b"trusted.x\0",
    b"security.capability\0",
    b"system.posix_acl_access\0",
    b"out\0",
    b"file\0",
    &[0xff; 8],
    &[0; 8],
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_decodes_and_round_trips() {
        let mut groups = 0;
        for s in seeds() {
            let r = decode(&s).unwrap();
            groups += usize::from(r.supp_group == Some(1000));
            fuse_decode(&s);
        }
        assert_eq!(groups, 1, "the extension seed carries its group");
    }

    #[test]
    fn a_lying_length_is_an_error_and_a_wrong_header_is_caught() {
        let lookup = seeds()[3].clone();
        let mut m = lookup.clone();
        m[0..4].copy_from_slice(&(lookup.len() as u32 + 1).to_le_bytes());
        fuse_decode(&m);
        let r = std::panic::catch_unwind(|| {
            check_request(&decode(&lookup).unwrap(), &header(LOOKUP, 2, 7), &lookup)
        });
        assert!(r.is_err(), "a header mismatch goes unnoticed");
    }
}
