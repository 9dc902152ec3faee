//! vsnap-fsfloor: what one LOOKUP round trip costs a backend at the least, on this machine, so
//! that the per-component lookup CPU `vsnap-fsbench` reports for each daemon can be read
//! against it.
//!
//! A "null daemon" thread does per request only what no passthrough can spare: it sleeps on
//! its kick eventfd, reads the kick, `fstatat`s the looked-up name in an open directory (the
//! name must be checked on the host every time) and writes the call eventfd to wake the
//! driver. A driver thread kicks it and sleeps on the call eventfd, one request at a time, as
//! `vsnap-fsbench` does. No virtqueue, no FUSE parsing, no inode table: a real daemon's CPU per
//! component can only be above the null daemon's, and a daemon that polls instead of sleeping
//! spends the whole round trip.
//!
//! With `--data`, also what the kernel alone charges one thread for a random 4k `pread` and
//! `pwrite` of that file (page cache, as the shares of the benchmark are): no daemon serving
//! one queue with one thread can do READs or WRITEs faster than one per that much CPU.
//!
//! Prints one JSON line: the null daemon's CPU and the wall time per round trip, what the
//! `fstatat` alone costs, and the 4k I/O costs.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::json;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Parser)]
#[command(about = "The least CPU a vhost-user-fs backend can spend per LOOKUP round trip")]
struct Args {
    /// A directory to look a name up in (the deep/ tree of bench/fs.sh's share).
    #[arg(long)]
    dir: PathBuf,
    /// The name looked up.
    #[arg(long)]
    name: String,
    #[arg(long, default_value_t = 20000)]
    iters: u32,
    /// A file of at least 4 KiB to time 4k reads and writes on (its bytes get overwritten).
    #[arg(long)]
    data: Option<PathBuf>,
    /// What bench/fs.sh calls the machine's condition (quiet, busy); copied to the output.
    #[arg(long, default_value = "")]
    condition: String,
}

/// This thread's CPU time, in µs.
fn thread_cpu_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: one valid out pointer; CLOCK_THREAD_CPUTIME_ID exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// Sleeps until `fd` is readable, then consumes it.
fn wait(fd: &EventFd) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    while unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {}
    let _ = fd.read();
}

fn stat(dir: &OwnedFd, name: &CString) -> bool {
    // SAFETY: `stat` is plain integers, for which all-zero bytes are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid directory fd, C string and out pointer.
    unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) == 0
    }
}

/// CPU µs per random 4k (pread, pwrite) of `path`, `n` of each.
fn io_floor(path: &PathBuf, n: u32) -> Result<(f64, f64), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let blocks = f.metadata().map_err(|e| e.to_string())?.len() / 4096;
    if blocks == 0 {
        return Err(format!("{}: shorter than 4 KiB", path.display()));
    }
    let mut rng = vsnap_frontend::Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0x5au8; 4096];
    let mut time = |write: bool, buf: &mut [u8]| -> Result<f64, String> {
        let t = thread_cpu_us();
        for _ in 0..n {
            let off = rng.next() % blocks * 4096;
            let r = if write {
                f.write_at(buf, off)
            } else {
                f.read_at(buf, off)
            };
            r.map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok((thread_cpu_us() - t) / f64::from(n))
    };
    // Once over to fault the pages in, then measured.
    time(false, &mut buf)?;
    Ok((time(false, &mut buf)?, time(true, &mut buf)?))
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    let path = CString::new(a.dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let name = CString::new(a.name.as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid C string; the fd returned is checked and owned below.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
    if raw < 0 {
        return Err(format!(
            "{}: {}",
            a.dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `raw` is an fd we just opened and nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(raw) };
    if !stat(&dir, &name) {
        return Err(format!("{}/{}: not found", a.dir.display(), a.name));
    }
    let n = a.iters.max(1);

    let t = thread_cpu_us();
    for _ in 0..n {
        stat(&dir, &name);
    }
    let fstatat_us = (thread_cpu_us() - t) / f64::from(n);

    let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let call = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let (k, c) = (
        kick.try_clone().map_err(|e| e.to_string())?,
        call.try_clone().map_err(|e| e.to_string())?,
    );
    let daemon = std::thread::spawn(move || {
        let t = thread_cpu_us();
        for _ in 0..n {
            wait(&k);
            stat(&dir, &name);
            let _ = c.write(1);
        }
        thread_cpu_us() - t
    });
    let w = Instant::now();
    let driver_t = thread_cpu_us();
    for _ in 0..n {
        let _ = kick.write(1);
        wait(&call);
    }
    let driver_us = thread_cpu_us() - driver_t;
    let wall_us = w.elapsed().as_secs_f64() * 1e6;
    let daemon_us = daemon.join().map_err(|_| "the null daemon panicked")?;
    let io = a.data.as_ref().map(|p| io_floor(p, n)).transpose()?;
    let per = |x: f64| (x / f64::from(n) * 100.0).round() / 100.0;
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "label": "null-daemon",
            "condition": a.condition,
            "phase": "floor",
            "round_trip": {
                "wall_us": per(wall_us),
                "cpu_us": per(daemon_us),
                "driver_cpu_us": per(driver_us),
            },
            "fstatat_cpu_us": r2(fstatat_us),
            "pread_4k_cpu_us": io.map(|(r, _)| r2(r)),
            "pwrite_4k_cpu_us": io.map(|(_, w)| r2(w)),
        })
    );
    Ok(())
}
