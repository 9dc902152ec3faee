//! The seccomp allow-list (`--seccomp`), compiled with rust-vmm's `seccompiler` and installed on
//! every thread at once (TSYNC) as the last step before serving.
//!
//! The list is what the daemon calls once serving, found by running its code paths under
//! `strace -f` and `--seccomp log` (tests/fs_sandbox.rs and the real-guest test): the
//! vhost-user connection and its epoll loops, guest memory mappings, the worker threads, the
//! passthrough's file system calls, the stop-signal handler and logging. Everything that only
//! happens before (opening the share, mounts, capabilities, signal handlers) is left out.
//! Absent on purpose: ioctl, socket, connect, bind, execve, ptrace, the mount API, chroot,
//! pivot_root, unshare, setns, setuid-family calls other than setfsuid/setfsgid/setgroups, bpf,
//! and the path-based xattr calls (the passthrough uses the fd ones only).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{sys, Error};

/// What a call outside the list does (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// No filter.
    None,
    /// Allowed, and logged by the kernel (audit / dmesg): for finding what a new code path needs.
    Log,
    /// The process is killed by SIGSYS.
    Kill,
    /// SIGSYS with a handler that names the call on stderr, then the process dies of it.
    Trap,
}

macro_rules! calls {
    ($($name:ident),* $(,)?) => { &[$(libc::$name),*] };
}

/// Allowed with any arguments, on every architecture.
const ALLOWED: &[libc::c_long] = calls![
    // Memory (mmap and mprotect are below, without PROT_EXEC). brk and mremap: malloc and
    // realloc of large buffers.
    SYS_brk,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    // Threads: the vhost-user queue workers start per connection. clone3's flags sit in a
    // struct seccomp cannot read; glibc uses it whenever the kernel has it (Linux 5.3+). The
    // thread start-up and exit of glibc and Rust std: robust futex list, rseq, the alternate
    // signal stack for stack-overflow reports, the affinity read of pthread_getattr_np.
    // sched_yield: spin-then-yield loops (signal-hook's registry when handlers change);
    // getrusage: a queue worker's own preemption count (vsnap_vhost::pacing), a read of this
    // thread's counters.
    SYS_clone3,
    SYS_futex,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sigaltstack,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_getrusage,
    SYS_exit,
    SYS_exit_group,
    // Signals: the stop handler runs and returns; rt_sigaction, getpid and gettid are abort()'s
    // (with tgkill, below), so a panic that aborts dies of SIGABRT rather than of the filter.
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigaction,
    SYS_getpid,
    SYS_gettid,
    // Time (normally the vDSO) and the hasher seeds of new threads.
    SYS_clock_gettime,
    SYS_getrandom,
    // thread::sleep: vsnap-vhost polls for idle queues on stop and disconnect.
    SYS_clock_nanosleep,
    // The vhost-user socket: accept4 on the listener, messages with fds both ways, shutdown on
    // stop, and vhost's getsockname of the listener for the log line. sendto and recvfrom are
    // signal-hook's self-pipe (a socketpair made before the filter): the handler's send() and
    // the signal thread's read().
    SYS_accept4,
    SYS_getsockname,
    SYS_recvmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_shutdown,
    // Event loops: the queue kicks and the exit events are eventfds.
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_eventfd2,
    SYS_read,
    SYS_write,
    // File data; the vectored pair moves READ and WRITE data to and from guest memory.
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_lseek,
    SYS_copy_file_range,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_syncfs,
    // Names and attributes, all relative to held fds or workdir links. fcntl: F_DUPFD_CLOEXEC
    // (fd clones) and status flags. faccessat is glibc's fallback where faccessat2 is missing
    // (Linux < 5.8).
    SYS_openat,
    SYS_close,
    SYS_fcntl,
    SYS_newfstatat,
    SYS_statx,
    SYS_fstatfs,
    SYS_getdents64,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_symlinkat,
    SYS_linkat,
    SYS_renameat2,
    SYS_unlinkat,
    SYS_readlinkat,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchownat,
    SYS_utimensat,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fgetxattr,
    SYS_fsetxattr,
    SYS_flistxattr,
    SYS_fremovexattr,
    // File handles for directories (open_by_handle_at also needs CAP_DAC_READ_SEARCH).
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    // Per request, per thread: the caller's fsuid/fsgid, and its supplementary group for
    // creations (raw SYS_setgroups, which unlike glibc's setgroups() is per thread).
    SYS_setfsuid,
    SYS_setfsgid,
    SYS_setgroups,
];

/// Calls that exist only on x86_64 and that glibc uses there: epoll_wait (elsewhere
/// epoll_pwait), and renameat, which glibc's renameat2() makes when the flags are 0.
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: &[libc::c_long] = calls![SYS_epoll_wait, SYS_renameat];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_ARCH: &[libc::c_long] = calls![SYS_epoll_pwait];

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompRule, Error> {
    let len = SeccompCmpArgLen::Qword;
    Ok(SeccompRule::new(vec![SeccompCondition::new(
        index, len, op, value,
    )?])?)
}

/// Allowed only with some arguments.
fn restricted() -> Result<Vec<(libc::c_long, Vec<SeccompRule>)>, Error> {
    let no_exec = || arg(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0);
    let thread = libc::CLONE_THREAD as u64;
    // SAFETY: plain syscall.
    let me = unsafe { libc::getpid() } as u64;
    Ok(vec![
        // abort()'s raise(), to this process only: outside a PID namespace, a tgkill of any
        // process with the same uid would be allowed by the kernel.
        (libc::SYS_tgkill, vec![arg(0, SeccompCmpOp::Eq, me)?]),
        // No new executable memory: the daemon loads no code once running.
        (libc::SYS_mmap, vec![no_exec()?]),
        (libc::SYS_mprotect, vec![no_exec()?]),
        // Threads only, for C libraries that use clone (musl; glibc without clone3): no fork.
        (
            libc::SYS_clone,
            vec![arg(0, SeccompCmpOp::MaskedEq(thread), thread)?],
        ),
        // Thread names; nothing else prctl can do is needed once serving.
        (
            libc::SYS_prctl,
            vec![arg(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?],
        ),
    ])
}

fn arch() -> Result<TargetArch, Error> {
    Ok(TargetArch::try_from(std::env::consts::ARCH)?)
}

/// The compiled filter for `mode` (None for [`SeccompMode::None`]).
fn program(mode: SeccompMode) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Trap => SeccompAction::Trap,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .chain(ALLOWED_ARCH)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    for (nr, r) in restricted()? {
        let old = rules.insert(nr, r);
        debug_assert!(old.is_none(), "syscall {nr} listed twice");
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch()?)?;
    Ok(Some(filter.try_into()?))
}

/// Installs the filter on every thread of the process.
pub(super) fn install(mode: SeccompMode) -> Result<(), Error> {
    let Some(prog) = program(mode)? else {
        return Ok(());
    };
    if mode == SeccompMode::Trap {
        install_sigsys_handler()?;
    }
    seccompiler::apply_filter_all_threads(&prog)?;
    tracing::info!(mode = ?mode, "seccomp filter installed");
    Ok(())
}

/// The `_sigsys` member of the kernel's `siginfo_t` union (libc does not expose it).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    #[cfg(target_pointer_width = "64")]
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// Writes `vsnap fs: seccomp: system call N is not in the allow-list` to stderr with nothing
/// but `write`, then dies of the signal (the handler is one-shot: SA_RESETHAND).
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a siginfo_t whose _sigsys member is filled for SIGSYS from
    // seccomp; SigsysInfo mirrors its layout.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut buf = [0u8; 96];
    let mut len = 0;
    let mut put = |b: &[u8]| {
        let n = b.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&b[..n]);
        len += n;
    };
    put(b"vsnap fs: seccomp: system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" is not in the allow-list\n");
    // SAFETY: write and raise are async-signal-safe; the buffer is valid for len bytes. The
    // disposition is back to the default (SA_RESETHAND) and SA_NODEFER lets the signal through
    // at once, so the process dies here instead of returning into the failed call.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::raise(libc::SIGSYS);
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn of the SA_SIGINFO
    // signature.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        sys(
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()),
            "install the SIGSYS handler",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Output};

    use super::*;

    const CHILD_ENV: &str = "VSNAP_SECCOMP_CHILD";

    #[test]
    fn every_listed_call_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        let restricted: Vec<_> = restricted()
            .unwrap()
            .into_iter()
            .map(|(nr, _)| nr)
            .collect();
        for nr in ALLOWED
            .iter()
            .chain(ALLOWED_ARCH)
            .copied()
            .chain(restricted)
        {
            assert!(seen.insert(nr), "syscall {nr} listed twice");
        }
        for forbidden in [
            libc::SYS_ioctl,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_unshare,
            libc::SYS_setresuid,
        ] {
            assert!(!seen.contains(&forbidden), "syscall {forbidden} allowed");
        }
    }

    /// Runs [`filter_child`] in a fresh copy of this test binary (a filter cannot be removed
    /// from the process that installed it), with `mode` and the call it makes after the filter.
    fn child(mode: &str, call: &str) -> Output {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox::seccomp::tests::filter_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{mode}:{call}"))
            .output()
            .unwrap()
    }

    /// Only does something in a process [`child`] started: installs the filter, checks that
    /// allowed calls (a thread start included) work, then makes the call it was asked to.
    #[test]
    fn filter_child() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (mode, call) = spec.split_once(':').unwrap();
        let mode = match mode {
            "kill" => SeccompMode::Kill,
            "trap" => SeccompMode::Trap,
            "log" => SeccompMode::Log,
            m => panic!("mode {m}"),
        };
        // No core file from the deaths this is about.
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
        // A thread that exists before the filter: TSYNC covers it too.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let early = std::thread::spawn(move || {
            rx.recv().unwrap();
            // SAFETY: plain syscall; the fd is closed if it was made.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: our fd.
                unsafe { libc::close(fd) };
            }
        });
        // SAFETY: plain syscall (made before the filter, which does not allow it).
        let parent = unsafe { libc::getppid() };
        install(mode).unwrap();
        let t = std::thread::Builder::new()
            .name("allowed".into())
            .spawn(|| std::fs::read_dir("/").map(|d| d.count()))
            .unwrap();
        assert!(t.join().unwrap().unwrap() > 0);
        println!("filter installed");
        // SAFETY: each is a plain syscall whose result is only printed.
        let r = unsafe {
            match call {
                "socket" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as libc::c_long,
                "prctl" => libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) as libc::c_long,
                "exec-mmap" => libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ) as libc::c_long,
                "fork" => {
                    let pid = libc::fork();
                    if pid == 0 {
                        libc::_exit(0);
                    }
                    pid as libc::c_long
                }
                "tgkill-other" => libc::syscall(libc::SYS_tgkill, parent, parent, 0),
                "abort" => {
                    std::process::abort();
                }
                "early-thread" => {
                    tx.send(()).unwrap();
                    early.join().unwrap();
                    0
                }
                c => panic!("call {c}"),
            }
        };
        println!("survived: {r}");
    }

    fn assert_killed(o: &Output, call: &str) {
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("filter installed"), "{call}: {out}");
        assert!(!out.contains("survived"), "{call}: {out}");
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGSYS),
            "{call}: {:?}",
            o.status
        );
    }

    #[test]
    fn kill_mode_kills_the_process_on_a_call_outside_the_list() {
        for call in [
            "socket",
            "prctl",
            "exec-mmap",
            "fork",
            "tgkill-other",
            "early-thread",
        ] {
            assert_killed(&child("kill", call), call);
        }
    }

    /// abort() still dies of SIGABRT: the calls it makes to signal itself are allowed.
    #[test]
    fn abort_is_not_mistaken_for_a_filter_violation() {
        let o = child("kill", "abort");
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{:?}", o.status);
    }

    #[test]
    fn trap_mode_names_the_call_then_dies() {
        let o = child("trap", "socket");
        assert_killed(&o, "socket");
        let err = String::from_utf8_lossy(&o.stderr);
        let want = format!(
            "seccomp: system call {} is not in the allow-list",
            libc::SYS_socket
        );
        assert!(err.contains(&want), "{err}");
    }

    #[test]
    fn log_mode_lets_the_call_through() {
        let o = child("log", "socket");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{:?}\n{out}", o.status);
        assert!(out.contains("survived: "), "{out}");
        assert!(!out.contains("survived: -1"), "{out}");
    }
}
