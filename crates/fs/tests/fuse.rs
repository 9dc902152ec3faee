//! The virtio-fs device driven over its vhost-user socket by the project's frontend, as the guest
//! kernel would: the sandbox cases, malformed messages, forget, and the link bookkeeping.

use std::ffi::CStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vsnap_frontend::fs::{in_header, Fuse, Reply, BUF_LEN, IN_HEADER_LEN};
use vsnap_fs::abi::{opcode::*, *};
use vsnap_fs::device::{FsBackend, FsOptions};
use vsnap_fs::passthrough::{FsConfig, Passthrough};
use vsnap_fs::server::Server;
use vsnap_vhost::{serve, Stopper};
use zerocopy::{FromBytes, IntoBytes};

const ROOT: u64 = 1;

struct Dev {
    dir: tempfile::TempDir,
    share: PathBuf,
    sock: PathBuf,
    backend: Arc<FsBackend>,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl Dev {
    fn start(cfg: FsConfig) -> Self {
        Self::start_with(cfg, FsOptions::default())
    }

    fn start_with(cfg: FsConfig, opts: FsOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("file"), b"0123456789").unwrap();
        std::fs::create_dir(share.join("sub")).unwrap();
        // Outside the share: nothing may reach it.
        std::fs::write(dir.path().join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), share.join("abs-escape")).unwrap();
        std::os::unix::fs::symlink("../secret", share.join("rel-escape")).unwrap();
        let fs = Passthrough::new(&share, &share.join(".vsnap-workdir"), cfg).unwrap();
        let backend = Arc::new(FsBackend::new(Arc::new(Server::new(fs)), opts).unwrap());
        let sock = dir.path().join("fs.sock");
        let stopper = Stopper::new();
        let thread = {
            let (b, s, st) = (backend.clone(), sock.clone(), stopper.clone());
            std::thread::spawn(move || serve(b, &s, &st).unwrap())
        };
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Dev {
            dir,
            share,
            sock,
            backend,
            stopper,
            thread: Some(thread),
        }
    }

    /// A connected client past FUSE INIT.
    fn client(&self) -> Fuse {
        let mut f = Fuse::connect(&self.sock).unwrap();
        let init = InitIn {
            major: 7,
            minor: 38,
            max_readahead: 1 << 17,
            flags: u32::MAX,
            ..InitIn::default()
        };
        let r = f.call(INIT, 0, &[init.as_bytes()]);
        assert_eq!(r.error, 0);
        let out = InitOut::read_from_prefix(&r.body).unwrap().0;
        assert_eq!((out.major, out.max_write), (7, 1 << 20));
        f
    }

    /// The files the device holds for the guest: by a workdir link, or by fd while young (and
    /// after, if removed before their turn to be linked came).
    fn held_files(&self) -> usize {
        let links = std::fs::read_dir(self.share.join(".vsnap-workdir"))
            .unwrap()
            .count();
        let c = self.backend.server().fs().counts();
        assert_eq!(links, c.links, "a link for each inode counted as linked");
        links + c.young_fds + c.kept_fds
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn entry(r: &Reply) -> EntryOut {
    assert_eq!(r.error, 0, "request failed with errno {}", -r.error);
    EntryOut::read_from_prefix(&r.body).unwrap().0
}

fn lookup(f: &mut Fuse, parent: u64, n: &str) -> Reply {
    f.call(LOOKUP, parent, &[&name(n)])
}

fn open(f: &mut Fuse, node: u64, flags: i32) -> Reply {
    f.call(
        OPEN,
        node,
        &[OpenIn {
            flags: flags as u32,
            open_flags: 0,
        }
        .as_bytes()],
    )
}

fn fh(r: &Reply) -> u64 {
    assert_eq!(r.error, 0, "open failed with errno {}", -r.error);
    OpenOut::read_from_prefix(&r.body).unwrap().0.fh
}

fn read(f: &mut Fuse, node: u64, fh: u64, size: u32) -> Reply {
    f.call(
        READ,
        node,
        &[ReadIn {
            fh,
            offset: 0,
            size,
            ..ReadIn::default()
        }
        .as_bytes()],
    )
}

fn create(f: &mut Fuse, parent: u64, n: &str) -> Reply {
    let c = CreateIn {
        flags: libc::O_RDWR as u32,
        mode: 0o644,
        ..CreateIn::default()
    };
    f.call(CREATE, parent, &[c.as_bytes(), &name(n)])
}

fn readdir_names(f: &mut Fuse, node: u64) -> Vec<String> {
    let h = fh(&f.call(OPENDIR, node, &[OpenIn::default().as_bytes()]));
    let r = f.call(
        READDIR,
        node,
        &[ReadIn {
            fh: h,
            size: 65536,
            ..ReadIn::default()
        }
        .as_bytes()],
    );
    assert_eq!(r.error, 0);
    let mut names = Vec::new();
    let mut b = &r.body[..];
    while !b.is_empty() {
        let d = Dirent::read_from_prefix(b).unwrap().0;
        let n = &b[24..24 + d.namelen as usize];
        names.push(String::from_utf8(n.to_vec()).unwrap());
        b = &b[dirent_size(d.namelen as usize)..];
    }
    f.call(
        RELEASEDIR,
        node,
        &[ReleaseIn {
            fh: h,
            ..ReleaseIn::default()
        }
        .as_bytes()],
    );
    names.sort();
    names
}

#[test]
fn files_round_trip_and_links_follow_lookups() {
    let dev = Dev::start(FsConfig::default());
    let mut f = dev.client();
    let e = entry(&lookup(&mut f, ROOT, "file"));
    assert_eq!(
        (e.attr.size, e.attr.nlink),
        (10, 1),
        "our link is not counted"
    );
    assert_eq!(dev.held_files(), 1);
    let h = fh(&open(&mut f, e.nodeid, libc::O_RDONLY));
    assert_eq!(read(&mut f, e.nodeid, h, 100).body, b"0123456789");

    let c = create(&mut f, ROOT, "new");
    let ne = entry(&c);
    let nh = OpenOut::read_from_prefix(&c.body[size_of::<EntryOut>()..])
        .unwrap()
        .0
        .fh;
    let w = ReadIn {
        fh: nh,
        offset: 0,
        size: 5,
        ..ReadIn::default()
    };
    let r = f.call(WRITE, ne.nodeid, &[w.as_bytes(), b"hello"]);
    assert_eq!(WriteOut::read_from_prefix(&r.body).unwrap().0.size, 5);
    assert_eq!(std::fs::read(dev.share.join("new")).unwrap(), b"hello");

    // A hard link made by the guest counts; ours does not.
    let l = entry(
        &f.call(
            LINK,
            ROOT,
            &[
                LinkIn {
                    oldnodeid: ne.nodeid,
                }
                .as_bytes(),
                &name("new2"),
            ],
        ),
    );
    assert_eq!((l.nodeid, l.attr.nlink), (ne.nodeid, 2));
    assert_eq!(
        std::fs::metadata(dev.share.join("new")).unwrap().nlink(),
        2,
        "the guest's two names: a file this new has no link of ours yet"
    );

    // Unlinked while open: still readable through the handle, still held (by its fd while
    // young, and by it still after: a name-less inode cannot be linked).
    assert_eq!(f.call(UNLINK, ROOT, &[&name("file")]).error, 0);
    assert_eq!(read(&mut f, e.nodeid, h, 100).body, b"0123456789");
    let a = f.call(GETATTR, e.nodeid, &[GetattrIn::default().as_bytes()]);
    assert_eq!(AttrOut::read_from_prefix(&a.body).unwrap().0.attr.nlink, 0);

    // FORGET lets files go: the lookup of "file" once, "new" via create and link (2 lookups).
    assert_eq!(dev.held_files(), 2);
    f.forget(FORGET, e.nodeid, ForgetIn { nlookup: 1 }.as_bytes());
    let batch = [
        BatchForgetIn { count: 1, dummy: 0 }.as_bytes(),
        ForgetOne {
            nodeid: ne.nodeid,
            nlookup: 1,
        }
        .as_bytes(),
    ]
    .concat();
    f.forget(BATCH_FORGET, 0, &batch);
    // Forgets have no reply; a request after them is served after them on the same device.
    entry(&lookup(&mut f, ROOT, "sub"));
    assert_eq!(dev.held_files(), 1, "one lookup of new left");
    f.forget(FORGET, ne.nodeid, ForgetIn { nlookup: 1 }.as_bytes());
    entry(&lookup(&mut f, ROOT, "sub"));
    assert_eq!(dev.held_files(), 0);
    assert_eq!(
        dev.backend
            .faults
            .total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn nothing_outside_the_share_is_reachable() {
    let dev = Dev::start(FsConfig {
        xattr: true,
        ..FsConfig::default()
    });
    let mut f = dev.client();
    let secret = dev.dir.path().join("secret");
    let secret_mode = std::fs::metadata(&secret).unwrap().permissions().mode();
    for bad in ["..", ".", "", "a/b", "../secret", "/etc/passwd"] {
        assert_eq!(
            lookup(&mut f, ROOT, bad).error,
            -libc::EINVAL,
            "lookup {bad:?}"
        );
        assert_eq!(
            create(&mut f, ROOT, bad).error,
            -libc::EINVAL,
            "create {bad:?}"
        );
        let mk = f.call(
            MKDIR,
            ROOT,
            &[
                MkdirIn {
                    mode: 0o755,
                    umask: 0,
                }
                .as_bytes(),
                &name(bad),
            ],
        );
        assert_eq!(mk.error, -libc::EINVAL, "mkdir {bad:?}");
    }
    let rn = f.call(
        RENAME,
        ROOT,
        &[
            RenameIn { newdir: ROOT }.as_bytes(),
            &name("file"),
            &name("../moved"),
        ],
    );
    assert_eq!(rn.error, -libc::EINVAL);

    // Symlinks are looked up as symlinks, never followed on the host.
    for link in ["abs-escape", "rel-escape"] {
        let e = entry(&lookup(&mut f, ROOT, link));
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(open(&mut f, e.nodeid, libc::O_RDONLY).error, -libc::ELOOP);
        // chmod through a symlink would change the target: refused, target untouched.
        let s = SetattrIn {
            valid: fattr::MODE,
            mode: 0o777,
            ..SetattrIn::default()
        };
        assert_ne!(f.call(SETATTR, e.nodeid, &[s.as_bytes()]).error, 0);
        let s = SetattrIn {
            valid: fattr::SIZE,
            size: 0,
            ..SetattrIn::default()
        };
        assert_ne!(f.call(SETATTR, e.nodeid, &[s.as_bytes()]).error, 0);
        let x = SetxattrIn { size: 1, flags: 0 };
        assert_ne!(
            f.call(SETXATTR, e.nodeid, &[x.as_bytes(), &name("user.x"), b"1"])
                .error,
            0
        );
        // Creating over the symlink's name does not write through it.
        let c = CreateIn {
            flags: (libc::O_RDWR | libc::O_TRUNC) as u32,
            mode: 0o644,
            ..CreateIn::default()
        };
        assert_ne!(f.call(CREATE, ROOT, &[c.as_bytes(), &name(link)]).error, 0);
        let d = f.call(
            MKDIR,
            e.nodeid,
            &[
                MkdirIn {
                    mode: 0o755,
                    umask: 0,
                }
                .as_bytes(),
                &name("x"),
            ],
        );
        assert_eq!(d.error, -libc::ENOTDIR, "a symlink is no directory");
    }
    assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode(),
        secret_mode
    );

    // The workdir is invisible and untouchable.
    assert!(!readdir_names(&mut f, ROOT)
        .iter()
        .any(|n| n.contains("vsnap")));
    assert_eq!(lookup(&mut f, ROOT, ".vsnap-workdir").error, -libc::ENOENT);
    let mk = f.call(
        MKDIR,
        ROOT,
        &[
            MkdirIn {
                mode: 0o755,
                umask: 0,
            }
            .as_bytes(),
            &name(".vsnap-workdir"),
        ],
    );
    assert_eq!(mk.error, -libc::EACCES);
    let sub = entry(&lookup(&mut f, ROOT, "sub"));
    let rn = f.call(
        RENAME,
        sub.nodeid,
        &[
            RenameIn { newdir: ROOT }.as_bytes(),
            &name("x"),
            &name(".vsnap-workdir"),
        ],
    );
    assert_eq!(rn.error, -libc::EACCES);
    assert_eq!(
        f.call(RMDIR, ROOT, &[&name(".vsnap-workdir")]).error,
        -libc::EACCES
    );
    // Special files are never opened on the host.
    let fifo = entry(
        &f.call(
            MKNOD,
            ROOT,
            &[
                MknodIn {
                    mode: libc::S_IFIFO | 0o644,
                    ..MknodIn::default()
                }
                .as_bytes(),
                &name("fifo"),
            ],
        ),
    );
    assert_eq!(
        open(&mut f, fifo.nodeid, libc::O_RDONLY).error,
        -libc::EBADF
    );
    // A CREATE without O_EXCL of the existing FIFO would block in open(2): refused instead.
    let create = CreateIn {
        flags: libc::O_RDONLY as u32,
        mode: 0o644,
        ..CreateIn::default()
    };
    let r = f.call(CREATE, ROOT, &[create.as_bytes(), &name("fifo")]);
    assert_eq!(r.error, -libc::EBADF);
    assert_eq!(
        f.call(GETATTR, ROOT, &[GetattrIn::default().as_bytes()])
            .error,
        0
    );
}

#[test]
fn malformed_messages_get_errors_and_the_device_keeps_serving() {
    let dev = Dev::start(FsConfig::default());
    let mut f = Fuse::connect(&dev.sock).unwrap();
    // Before INIT, nothing but INIT.
    assert_eq!(lookup(&mut f, ROOT, "file").error, -libc::EIO);
    drop(f);
    let mut f = dev.client();
    let file = entry(&lookup(&mut f, ROOT, "file")).nodeid;

    // Shorter than a header: no unique to answer, completed with length 0.
    assert_eq!(f.send_raw(1, &[1, 2, 3], BUF_LEN).used, 0);
    // A header whose length lies.
    let mut m = in_header(1000, LOOKUP, 77, ROOT, 0, 0);
    m.extend_from_slice(b"file\0");
    let r = f.send_raw(1, &m, BUF_LEN);
    assert_eq!((r.unique, r.error), (77, -libc::EINVAL));
    // Truncated arguments, an unterminated name.
    let r = f.call(SETATTR, file, &[&[0u8; 10]]);
    assert_eq!(r.error, -libc::EINVAL);
    let r = f.call(LOOKUP, ROOT, &[b"file"]);
    assert_eq!(r.error, -libc::EINVAL);
    // Unknown and unsupported opcodes.
    assert_eq!(f.call(4242, ROOT, &[]).error, -libc::ENOSYS);
    assert_eq!(f.call(GETLK, file, &[&[0u8; 64]]).error, -libc::ENOSYS);
    // Unknown node ids and file handles.
    assert_eq!(
        f.call(GETATTR, 999_999, &[GetattrIn::default().as_bytes()])
            .error,
        -libc::ENOENT
    );
    assert_eq!(lookup(&mut f, 999_999, "x").error, -libc::ENOENT);
    assert_eq!(read(&mut f, file, 12345, 10).error, -libc::EBADF);
    let rel = ReleaseIn {
        fh: 12345,
        ..ReleaseIn::default()
    };
    assert_eq!(f.call(RELEASE, file, &[rel.as_bytes()]).error, -libc::EBADF);
    // Reading a directory handle as another node's directory.
    let h = fh(&f.call(OPENDIR, ROOT, &[OpenIn::default().as_bytes()]));
    let r = f.call(
        READDIR,
        file,
        &[ReadIn {
            fh: h,
            size: 4096,
            ..ReadIn::default()
        }
        .as_bytes()],
    );
    assert_eq!(r.error, -libc::EBADF);
    // A reply larger than the guest's buffer: an EIO header instead (the request must not
    // hang in the guest), and nothing written past the buffer.
    let mut m = in_header((IN_HEADER_LEN + 16) as u32, GETATTR, 78, file, 0, 0);
    m.extend_from_slice(&[0u8; 16]);
    let r = f.send_raw(1, &m, 20);
    assert_eq!((r.used, r.error), (16, -libc::EIO));
    // Not even room for a header: completed with length 0.
    let m = {
        let mut m = in_header((IN_HEADER_LEN + 16) as u32, GETATTR, 79, file, 0, 0);
        m.extend_from_slice(&[0u8; 16]);
        m
    };
    assert_eq!(f.send_raw(1, &m, 8).used, 0);
    // Forgetting what was never looked up is harmless.
    f.forget(FORGET, 999_999, ForgetIn { nlookup: 5 }.as_bytes());
    f.forget(
        BATCH_FORGET,
        0,
        BatchForgetIn {
            count: 1000,
            dummy: 0,
        }
        .as_bytes(),
    );

    // Still serving, and every fault was counted.
    let h = fh(&open(&mut f, file, libc::O_RDONLY));
    assert_eq!(read(&mut f, file, h, 4).body, b"0123");
    assert!(
        dev.backend
            .faults
            .total
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 6
    );
}

#[test]
fn readdirplus_counts_lookups_and_hides_the_workdir() {
    let dev = Dev::start(FsConfig::default());
    for i in 0..50 {
        std::fs::write(dev.share.join("sub").join(format!("f{i:02}")), b"x").unwrap();
    }
    let mut f = dev.client();
    let sub = entry(&lookup(&mut f, ROOT, "sub")).nodeid;
    let h = fh(&f.call(OPENDIR, sub, &[OpenIn::default().as_bytes()]));
    // Small buffers: the listing continues from each reply's last offset.
    let (mut offset, mut seen) = (0u64, Vec::new());
    loop {
        let r = f.call(
            READDIRPLUS,
            sub,
            &[ReadIn {
                fh: h,
                offset,
                size: 1024,
                ..ReadIn::default()
            }
            .as_bytes()],
        );
        assert_eq!(r.error, 0);
        if r.body.is_empty() {
            break;
        }
        let mut b = &r.body[..];
        while !b.is_empty() {
            let e = EntryOut::read_from_prefix(b).unwrap().0;
            let d = Dirent::read_from_prefix(&b[size_of::<EntryOut>()..])
                .unwrap()
                .0;
            let n = &b[size_of::<EntryOut>() + 24..][..d.namelen as usize];
            let n = CStr::from_bytes_with_nul(&[n, b"\0"].concat())
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if n != "." && n != ".." {
                assert_ne!(e.nodeid, 0, "{n} has attributes");
            }
            seen.push(n);
            offset = d.off;
            b = &b[size_of::<EntryOut>() + dirent_size(d.namelen as usize)..];
        }
    }
    assert_eq!(seen.len(), 52, "every entry exactly once: {seen:?}");
    assert_eq!(dev.held_files(), 50, "each listed file was looked up");
    let root = readdir_names(&mut f, ROOT);
    assert_eq!(root, [".", "..", "abs-escape", "file", "rel-escape", "sub"]);
}

fn init_flags(dev: &Dev, minor: u32, flags: u64) -> Result<u64, i32> {
    let mut f = Fuse::connect(&dev.sock).unwrap();
    let init = InitIn {
        major: 7,
        minor,
        flags: flags as u32,
        flags2: (flags >> 32) as u32,
        ..InitIn::default()
    };
    let r = f.call(INIT, 0, &[init.as_bytes()]);
    if r.error != 0 {
        return Err(-r.error);
    }
    let o = InitOut::read_from_prefix(&r.body).unwrap().0;
    Ok(u64::from(o.flags) | u64::from(o.flags2) << 32)
}

#[test]
fn init_grants_what_both_sides_offer_per_cache_mode() {
    use vsnap_fs::abi::init::*;
    use vsnap_fs::passthrough::CacheMode;
    let guest = ASYNC_READ
        | DO_READDIRPLUS
        | READDIRPLUS_AUTO
        | WRITEBACK_CACHE
        | PARALLEL_DIROPS
        | (1 << 1);
    let dev = Dev::start(FsConfig::default());
    let got = init_flags(&dev, 38, guest).unwrap();
    assert_eq!(
        got,
        ASYNC_READ | DO_READDIRPLUS | READDIRPLUS_AUTO | PARALLEL_DIROPS,
        "no locks, no writeback unless asked"
    );
    assert_eq!(init_flags(&dev, 26, guest), Err(libc::EPROTO), "too old");
    drop(dev);
    let dev = Dev::start(FsConfig {
        writeback: true,
        ..FsConfig::default()
    });
    assert_ne!(init_flags(&dev, 38, guest).unwrap() & WRITEBACK_CACHE, 0);
    drop(dev);
    let dev = Dev::start(FsConfig {
        cache: CacheMode::Never,
        writeback: true,
        ..FsConfig::default()
    });
    let got = init_flags(&dev, 38, guest).unwrap();
    assert_eq!(
        got & (DO_READDIRPLUS | WRITEBACK_CACHE),
        0,
        "nothing cached with --cache never"
    );
}

#[test]
fn a_thread_pool_serves_the_same_requests() {
    let dev = Dev::start_with(
        FsConfig::default(),
        FsOptions {
            thread_pool_size: 3,
            ..FsOptions::default()
        },
    );
    let mut f = dev.client();
    for i in 0..200 {
        let n = format!("p{i}");
        let c = create(&mut f, ROOT, &n);
        let e = entry(&c);
        let h = OpenOut::read_from_prefix(&c.body[size_of::<EntryOut>()..])
            .unwrap()
            .0
            .fh;
        let w = ReadIn {
            fh: h,
            size: 4,
            ..ReadIn::default()
        };
        assert_eq!(f.call(WRITE, e.nodeid, &[w.as_bytes(), b"data"]).error, 0);
        assert_eq!(read(&mut f, e.nodeid, h, 10).body, b"data");
    }
    assert_eq!(readdir_names(&mut f, ROOT).len(), 206);
}

/// A MKDIR as `uid`/`gid`, with the supplementary-group extension when `group` is given.
fn mkdir_as(f: &mut Fuse, parent: u64, n: &str, uid: u32, gid: u32, group: Option<u32>) -> Reply {
    let mut args = MkdirIn {
        mode: 0o755,
        umask: 0,
    }
    .as_bytes()
    .to_vec();
    args.extend_from_slice(&name(n));
    let ext = match group {
        // fuse_ext_header { size 16, type FUSE_EXT_GROUPS } + fuse_supp_groups { 1, [group] }
        Some(g) => [16u32, EXT_GROUPS, 1, g]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        None => Vec::new(),
    };
    let len = (IN_HEADER_LEN + args.len() + ext.len()) as u32;
    let unique = f.next_unique();
    let mut msg = in_header(len, MKDIR, unique, parent, uid, gid);
    msg[36..38].copy_from_slice(&((ext.len() / 8) as u16).to_le_bytes());
    msg.extend_from_slice(&args);
    msg.extend_from_slice(&ext);
    f.send_raw(1, &msg, BUF_LEN)
}

#[test]
fn creations_run_as_the_caller_with_only_the_group_the_guest_vouched_for() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: credentials are switched only as root");
        return;
    }
    let dev = Dev::start(FsConfig::default());
    // A directory only members of group 4242 may write to.
    let team = dev.share.join("team");
    std::fs::create_dir(&team).unwrap();
    std::os::unix::fs::chown(&team, Some(0), Some(4242)).unwrap();
    std::fs::set_permissions(&team, PermissionsExt::from_mode(0o770)).unwrap();
    let mut f = dev.client();
    let node = entry(&lookup(&mut f, ROOT, "team")).nodeid;
    // Not a member: refused by the host as the caller (never with the daemon's own groups).
    assert_eq!(
        mkdir_as(&mut f, node, "a", 1000, 1000, None).error,
        -libc::EACCES
    );
    // The guest kernel vouches for 4242: allowed, and the new directory is the caller's.
    let e = entry(&mkdir_as(&mut f, node, "b", 1000, 1000, Some(4242)));
    assert_eq!((e.attr.uid, e.attr.gid), (1000, 1000));
    let m = std::fs::metadata(team.join("b")).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    // The group does not stick to the thread: the next request without it is refused again.
    assert_eq!(
        mkdir_as(&mut f, node, "c", 1000, 1000, None).error,
        -libc::EACCES
    );
}

#[test]
fn a_readonly_share_refuses_every_change() {
    let dev = Dev::start(FsConfig {
        readonly: true,
        xattr: true,
        ..FsConfig::default()
    });
    let before = std::fs::read_dir(&dev.share).unwrap().count();
    let mut f = dev.client();
    let file = entry(&lookup(&mut f, ROOT, "file")).nodeid;
    // Reading works.
    let h = fh(&open(&mut f, file, libc::O_RDONLY));
    assert_eq!(read(&mut f, file, h, 10).body, b"0123456789");
    // Every change is EROFS.
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            open(&mut f, file, flags).error,
            -libc::EROFS,
            "open {flags:#x}"
        );
    }
    let write = ReadIn {
        fh: h,
        size: 3,
        ..ReadIn::default()
    };
    let erofs = [
        f.call(WRITE, file, &[write.as_bytes(), b"abc"]),
        create(&mut f, ROOT, "new"),
        f.call(
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
        f.call(UNLINK, ROOT, &[&name("file")]),
        f.call(
            RENAME,
            ROOT,
            &[
                RenameIn { newdir: ROOT }.as_bytes(),
                &name("file"),
                &name("moved"),
            ],
        ),
        f.call(
            SETATTR,
            file,
            &[SetattrIn {
                valid: fattr::SIZE,
                ..SetattrIn::default()
            }
            .as_bytes()],
        ),
        f.call(
            SETXATTR,
            file,
            &[
                SetxattrIn {
                    size: 1,
                    ..SetxattrIn::default()
                }
                .as_bytes(),
                &name("user.x"),
                b"v",
            ],
        ),
    ];
    for (i, r) in erofs.iter().enumerate() {
        assert_eq!(r.error, -libc::EROFS, "change {i}");
    }
    assert_eq!(
        std::fs::read(dev.share.join("file")).unwrap(),
        b"0123456789"
    );
    assert_eq!(std::fs::read_dir(&dev.share).unwrap().count(), before);
}

/// A READ or WRITE message: header, `fuse_read_in`/`fuse_write_in`, payload.
fn rw_msg(
    opcode: u32,
    unique: u64,
    node: u64,
    fh: u64,
    offset: u64,
    size: u32,
    data: &[u8],
) -> Vec<u8> {
    let a = ReadIn {
        fh,
        offset,
        size,
        ..ReadIn::default()
    };
    let len = IN_HEADER_LEN + size_of::<ReadIn>() + data.len();
    let mut m = in_header(len as u32, opcode, unique, node, 0, 0);
    m.extend_from_slice(a.as_bytes());
    m.extend_from_slice(data);
    m
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn reads_and_writes_move_data_through_any_descriptor_layout() {
    let dev = Dev::start(FsConfig::default());
    let content = pattern(300_000, 7);
    std::fs::write(dev.share.join("big"), &content).unwrap();
    let mut f = dev.client();
    let node = entry(&lookup(&mut f, ROOT, "big")).nodeid;
    let h = fh(&open(&mut f, node, libc::O_RDWR));
    let faults = || {
        dev.backend
            .faults
            .total
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // 128 KiB read into pieces of every size, the reply header itself split in two.
    let m = rw_msg(READ, 10, node, h, 1000, 128 << 10, &[]);
    let lens = [7, 9, 1, 4095, 3, 65536, 61437];
    assert_eq!(lens.iter().sum::<u32>(), 16 + (128 << 10));
    let (r, intact) = f.send_split(&m, &[5, 40, 41], &lens);
    assert!(intact, "written outside the descriptors");
    assert_eq!(
        (r.error, r.unique, r.used, r.len),
        (0, 10, 16 + (128 << 10), 16 + (128 << 10))
    );
    assert_eq!(r.body, &content[1000..1000 + (128 << 10)]);

    // Near the end of the file: what is there, however little room was given beyond it.
    let end = content.len() as u64;
    let m = rw_msg(READ, 12, node, h, end - 100, 4096, &[]);
    let (r, intact) = f.send_split(&m, &[], &[16, 50, 50]);
    assert!(intact);
    assert_eq!((r.error, r.used), (0, 116));
    assert_eq!(r.body, &content[content.len() - 100..]);
    // Room for less than the file holds there: EIO (the reply would not fit), counted.
    let before = faults();
    let (r, intact) = f.send_split(&m, &[], &[16, 99]);
    assert!(intact);
    assert_eq!((r.error, r.used, r.unique), (-libc::EIO, 16, 12));
    assert_eq!(faults(), before + 1);
    // Not even room for the reply header: completed with length 0.
    let (r, intact) = f.send_split(&m, &[], &[8, 4]);
    assert!(intact);
    assert_eq!(r.used, 0);
    // Past the end: an empty reply.
    let m = rw_msg(READ, 14, node, h, end + 5, 4096, &[]);
    let (r, _) = f.send_split(&m, &[], &[16, 4096]);
    assert_eq!((r.error, r.used), (0, 16));

    // A write whose header, argument and payload are cut anywhere, the payload across
    // descriptors of one byte and of pages.
    let data = pattern(70_000, 99);
    let m = rw_msg(WRITE, 16, node, h, 5000, data.len() as u32, &data);
    let (r, intact) = f.send_split(&m, &[13, 40, 79, 80, 81, 4177, 4178, 40_000], &[24]);
    assert!(intact);
    assert_eq!((r.error, r.used), (0, 24));
    assert_eq!(WriteOut::read_from_prefix(&r.body).unwrap().0.size, 70_000);
    let on_disk = std::fs::read(dev.share.join("big")).unwrap();
    assert_eq!(&on_disk[5000..75_000], &data[..]);
    assert_eq!(&on_disk[..5000], &content[..5000]);
    assert_eq!(&on_disk[75_000..], &content[75_000..]);
    // Bytes past the payload (the header's length covers them) are not written.
    let mut m = rw_msg(WRITE, 18, node, h, 0, 3, b"abc");
    m.extend_from_slice(b"junk");
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_le_bytes());
    let (r, _) = f.send_split(&m, &[41], &[16, 8]);
    assert_eq!(r.error, 0);
    assert_eq!(WriteOut::read_from_prefix(&r.body).unwrap().0.size, 3);
    let on_disk = std::fs::read(dev.share.join("big")).unwrap();
    assert_eq!(
        (&on_disk[..3], &on_disk[3..8]),
        (&b"abc"[..], &content[3..8])
    );
    // A write that carries less than it says, and one whose reply does not fit.
    let m = rw_msg(WRITE, 20, node, h, 0, 100, b"short");
    let (r, _) = f.send_split(&m, &[50], &[24]);
    assert_eq!((r.error, r.unique), (-libc::EINVAL, 20));
    let m = rw_msg(WRITE, 22, node, h, 0, 2, b"xy");
    let (r, intact) = f.send_split(&m, &[], &[20]);
    assert!(intact);
    assert_eq!((r.error, r.used), (-libc::EIO, 16));
    // A read whose data goes nowhere the guest can see (no writable descriptor at all).
    let m = rw_msg(READ, 23, node, h, 0, 4, &[]);
    assert_eq!(f.send_split(&m, &[], &[]).0.used, 0);
    // Read back through the data path what the last writes left.
    let m = rw_msg(READ, 24, node, h, 0, 4, &[]);
    let (r, _) = f.send_split(&m, &[], &[16, 1, 1, 1, 1]);
    // The write was done before its reply was found too large, as any request is.
    assert_eq!((&r.body[..3], r.body[3]), (&b"xyc"[..], content[3]));
}
