//! What a benchmark reads about the backend process from /proc: CPU time, RSS, open fds, and
//! each thread's context switches (how often it slept and was woken).

/// CPU seconds process `pid` has run: the sum of its threads' run time in nanoseconds
/// (`/proc/PID/task/*/schedstat`), else user + system time in clock ticks (`/proc/PID/stat`,
/// 10 ms steps: too coarse for short runs).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_seconds_precise(pid).or_else(|| cpu_seconds_ticks(pid))
}

fn cpu_seconds_precise(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = e.ok()?.path().join("schedstat");
        // A thread that ended meanwhile has no file any more: it no longer counts.
        let Ok(s) = std::fs::read_to_string(path) else {
            continue;
        };
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// User + system CPU seconds of process `pid`, from `/proc/PID/stat`.
pub fn cpu_seconds_ticks(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks as f64 / hz)
}

/// Resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes of kernel slab objects in use, machine-wide (`/proc/slabinfo`: active objects times
/// object size, every cache; root only). What a daemon makes the kernel keep per inode it
/// holds (a `struct file` per fd, a dentry per workdir link) shows as its growth.
pub fn slab_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/slabinfo").ok()?;
    Some(info.lines().filter_map(slab_line_bytes).sum())
}

/// `name active_objs num_objs objsize ...` -> active_objs * objsize (headers give `None`).
fn slab_line_bytes(line: &str) -> Option<u64> {
    let mut f = line.split_whitespace().skip(1);
    let active: u64 = f.next()?.parse().ok()?;
    let _total = f.next()?;
    let size: u64 = f.next()?.parse().ok()?;
    Some(active * size)
}

/// Number of fds process `pid` has open.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// One thread's name and context-switch counts (`/proc/PID/task/TID/status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadSwitches {
    pub tid: u32,
    pub name: String,
    /// The thread slept (blocked) and was woken: one wake-up each.
    pub voluntary: u64,
    /// The thread was preempted while runnable.
    pub involuntary: u64,
}

/// The context-switch counts of every thread of process `pid`, by thread id.
pub fn thread_switches(pid: u32) -> Vec<ThreadSwitches> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut v: Vec<ThreadSwitches> = dir
        .filter_map(|e| {
            let tid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::trim)
            };
            Some(ThreadSwitches {
                tid,
                name: field("Name:")?.to_string(),
                voluntary: field("voluntary_ctxt_switches:")?.parse().ok()?,
                involuntary: field("nonvoluntary_ctxt_switches:")?.parse().ok()?,
            })
        })
        .collect();
    v.sort_by_key(|t| t.tid);
    v
}

/// What each thread of `after` switched since `before` (threads that did not switch are left
/// out; a thread born in between counts from zero).
pub fn switches_since(before: &[ThreadSwitches], after: &[ThreadSwitches]) -> Vec<ThreadSwitches> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.tid == a.tid);
            ThreadSwitches {
                tid: a.tid,
                name: a.name.clone(),
                voluntary: a.voluntary - b.map_or(0, |b| b.voluntary.min(a.voluntary)),
                involuntary: a.involuntary - b.map_or(0, |b| b.involuntary.min(a.involuntary)),
            }
        })
        .filter(|d| d.voluntary + d.involuntary > 0)
        .collect()
}

/// This process's CPU seconds and voluntary context switches (`getrusage(RUSAGE_SELF)`),
/// threads that have ended included, unlike what `/proc/self/task` lists.
pub fn own_usage() -> (f64, u64) {
    // SAFETY: rusage is plain old data; getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail or touch other memory.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime) + secs(ru.ru_stime), ru.ru_nvcsw as u64)
}

/// CPU seconds every process of the machine has run (`/proc/stat`: user, nice, system, irq,
/// softirq and steal of all CPUs), in clock ticks. Less what the daemon and the benchmark
/// themselves ran, it says how busy the rest of the machine was meanwhile.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(busy as f64 / hz)
}

#[cfg(test)]
mod tests {
    use super::slab_line_bytes;

    #[test]
    fn slabinfo_lines_give_active_bytes_and_headers_nothing() {
        assert_eq!(
            slab_line_bytes("dentry 1000 1200 192 21 1 : tunables 0 0 0 : slabdata 57 57 0"),
            Some(192_000)
        );
        assert_eq!(slab_line_bytes("slabinfo - version: 2.1"), None);
        assert_eq!(
            slab_line_bytes("# name <active_objs> <num_objs> <objsize> <objperslab>"),
            None
        );
    }
}
