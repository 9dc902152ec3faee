//! vsnap-fsbench: drives any vhost-user-fs backend (vsnap fs, virtiofsd) over its socket as a
//! guest's virtiofs driver would and reports per-operation round trips, the backend's CPU time
//! and context switches per operation, fds and RSS. Phases: `hold` (fds, RSS and the kernel
//! slab growth holding many inodes), `ops` (one request at a time: getattr, path lookups, create/unlink, reads and
//! writes) and `io` (reads and writes with 1 and 16 requests in flight, for a fixed time). The
//! shared dir must hold the tree bench/fs.sh makes: many/dN/fM (`--dirs` x `--files`),
//! deep/c1/.../c63, data.bin (64 MiB).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use vsnap_frontend::fs::{in_header, op as fuse_op, Fuse, IN_HEADER_LEN, OUT_HEADER_LEN};
use vsnap_frontend::procstat::{
    cpu_seconds, machine_busy_seconds, open_fds, own_usage, rss_kib, slab_bytes, switches_since,
    thread_switches, ThreadSwitches,
};
use vsnap_frontend::{Desc, GuestMem, Queue, Rng};

const ROOT: u64 = 1;

#[derive(Parser)]
#[command(about = "Round-trip benchmark for vhost-user-fs backends")]
struct Args {
    #[arg(long)]
    socket: PathBuf,
    /// The backend's pid (CPU time, fds and RSS are read from /proc).
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value = "")]
    label: String,
    /// Directories x files under many/.
    #[arg(long, default_value_t = 100)]
    dirs: usize,
    #[arg(long, default_value_t = 1000)]
    files: usize,
    /// Iterations of the per-operation measurements.
    #[arg(long, default_value_t = 20000)]
    iters: usize,
    /// Which part to run: `hold` (look up and hold many/, report fds and RSS), `ops` (the
    /// per-operation costs, one request at a time) or `io` (reads and writes at 1 and 16 in
    /// flight). Run each against a fresh daemon: a backend that ran out of fds while holding
    /// may not recover.
    #[arg(long, value_parser = ["hold", "ops", "io"])]
    phase: String,
    /// Seconds per case of the `io` phase.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Only this case of the `io` phase (e.g. `read_4k_qd16`), to reproduce one figure.
    #[arg(long)]
    case: Option<String>,
    /// Request queues to ask the device for (besides hiprio). The `io` phase shares each case's
    /// requests in flight out among them, and skips a case whose count they do not divide.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    request_queues: u16,
}

/// Rounded to 2 decimals for the report.
fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What one measured stretch cost: wall and backend CPU µs per op, the backend's context
/// switches per op (each thread's, and their sum), and the frontend's own wake-ups per op.
struct Cost {
    wall_us: f64,
    cpu_us: f64,
    /// The frontend's own CPU per op: when it nears `wall_us`, the frontend, not the backend,
    /// sets the pace.
    frontend_cpu_us: f64,
    /// Cores' worth of CPU the rest of the machine used meanwhile: ~0 on a quiet machine.
    background_cpus: f64,
    threads: Vec<ThreadSwitches>,
    frontend_vcs: u64,
    ops: usize,
}

/// Reads the counters before a stretch; [`Meter::stop`] after it.
struct Meter {
    pid: u32,
    cpu: f64,
    own_cpu: f64,
    machine: f64,
    threads: Vec<ThreadSwitches>,
    own_vcs: u64,
    t0: Instant,
}

impl Meter {
    fn start(pid: u32) -> Self {
        let (own_cpu, own_vcs) = own_usage();
        Meter {
            pid,
            threads: thread_switches(pid),
            own_vcs,
            cpu: cpu_seconds(pid).unwrap_or(0.0),
            own_cpu,
            machine: machine_busy_seconds().unwrap_or(0.0),
            t0: Instant::now(),
        }
    }

    fn stop(self, ops: usize) -> Cost {
        let wall = self.t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds(self.pid).unwrap_or(0.0) - self.cpu;
        let (own_cpu, own_vcs) = own_usage();
        let own = own_cpu - self.own_cpu;
        let machine = machine_busy_seconds().unwrap_or(0.0) - self.machine;
        let background_cpus = ((machine - cpu - own) / wall).max(0.0);
        let threads = switches_since(&self.threads, &thread_switches(self.pid));
        let n = ops.max(1) as f64;
        Cost {
            wall_us: wall * 1e6 / n,
            cpu_us: cpu * 1e6 / n,
            frontend_cpu_us: own * 1e6 / n,
            background_cpus,
            threads,
            frontend_vcs: own_vcs - self.own_vcs,
            ops,
        }
    }
}

impl Cost {
    fn json(&self) -> Value {
        let n = self.ops.max(1) as f64;
        let per = |x: u64| (x as f64 / n * 1000.0).round() / 1000.0;
        // Busiest first: the request queue's worker leads.
        let mut threads = self.threads.clone();
        threads.sort_by_key(|t| std::cmp::Reverse(t.voluntary + t.involuntary));
        json!({
            "wall_us": r2(self.wall_us),
            "cpu_us": r2(self.cpu_us),
            "frontend_cpu_us": r2(self.frontend_cpu_us),
            "background_cpus": r2(self.background_cpus),
            "vcs_per_op": per(self.threads.iter().map(|t| t.voluntary).sum()),
            "ivcs_per_op": per(self.threads.iter().map(|t| t.involuntary).sum()),
            "threads": threads.iter().map(|t| json!({
                "tid": t.tid,
                "name": t.name,
                "vcs_per_op": per(t.voluntary),
                "ivcs_per_op": per(t.involuntary),
            })).collect::<Vec<_>>(),
            "frontend_vcs_per_op": per(self.frontend_vcs),
        })
    }
}

/// Runs `f` `n` times and says what it cost.
fn measure(pid: u32, n: usize, mut f: impl FnMut(usize)) -> Cost {
    let m = Meter::start(pid);
    for i in 0..n {
        f(i);
    }
    m.stop(n)
}

/// Least squares y = a + b x: (a, b).
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let b = sxy / sxx;
    (my - b * mx, b)
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    let mut f = Fuse::connect_queues(&a.socket, usize::from(a.request_queues))
        .map_err(|e| e.to_string())?;
    f.init().map_err(|e| format!("INIT: errno {e}"))?;
    match a.phase.as_str() {
        "hold" => hold(&mut f, &a),
        "io" => io(&mut f, &a),
        _ => ops(&mut f, &a),
    }
}

fn hold(f: &mut Fuse, a: &Args) -> Result<(), String> {
    let pid = a.pid;
    let fds0 = open_fds(pid);
    let rss0 = rss_kib(pid);
    let slab0 = slab_bytes();

    // Look up every file of many/ and hold them, as a guest's dentry cache does.
    let many = f
        .lookup(ROOT, "many")
        .map_err(|e| format!("many: errno {e}"))?;
    let mut held = Vec::with_capacity(a.dirs * (a.files + 1));
    let t0 = Instant::now();
    let c0 = cpu_seconds(pid).unwrap_or(0.0);
    // A backend that holds an fd per inode fails once its open-file limit is reached.
    let mut lookup_error = None;
    let mut look = |f: &mut Fuse, parent: u64, name: String, held: &mut Vec<(u64, u64)>| match f
        .lookup(parent, &name)
    {
        Ok(n) => {
            held.push((n, 1));
            Some(n)
        }
        Err(e) => {
            lookup_error = Some(format!("errno {} after {} inodes", -e, held.len()));
            None
        }
    };
    'dirs: for d in 0..a.dirs {
        let Some(dn) = look(f, many, format!("d{d}"), &mut held) else {
            break;
        };
        for i in 0..a.files {
            if look(f, dn, format!("f{i}"), &mut held).is_none() {
                break 'dirs;
            }
        }
    }
    let lookups = held.len();
    let first_lookup = json!({
        "wall_us": r2(t0.elapsed().as_secs_f64() * 1e6 / lookups as f64),
        "cpu_us": r2((cpu_seconds(pid).unwrap_or(0.0) - c0) * 1e6 / lookups as f64),
    });
    let (fds1, rss1) = (open_fds(pid), rss_kib(pid));
    let kernel_per_inode = slab0
        .zip(slab_bytes())
        .map(|(a, b)| r2(b.saturating_sub(a) as f64 / lookups.max(1) as f64));
    f.batch_forget(&held);
    let report = json!({
        "label": a.label,
        "held_inodes": lookups,
        "lookup_error": lookup_error,
        "fds_idle": fds0,
        "fds_holding": fds1,
        "rss_kib_idle": rss0,
        "rss_kib_holding": rss1,
        "kernel_slab_bytes_per_inode": kernel_per_inode,
        "first_lookup": first_lookup,
    });
    println!("{report}");
    Ok(())
}

fn ops(f: &mut Fuse, a: &Args) -> Result<(), String> {
    let pid = a.pid;

    let data = f
        .lookup(ROOT, "data.bin")
        .map_err(|e| format!("data.bin: errno {e}"))?;
    let getattr = measure(pid, a.iters, |_| f.getattr(data).expect("getattr"));

    // Path resolution: one LOOKUP per component, from the root.
    let mut comps = vec!["deep".to_string()];
    comps.extend((1..64).map(|i| format!("c{i}")));
    let mut depth = serde_json::Map::new();
    let mut points = Vec::new();
    for d in [1usize, 2, 4, 8, 16, 64] {
        let n = (a.iters / d).max(200);
        let mut ids = Vec::new();
        let c = measure(pid, n, |_| {
            let mut node = ROOT;
            for c in &comps[..d] {
                node = f.lookup(node, c).expect("lookup");
                ids.push((node, 1));
            }
        });
        f.batch_forget(&ids);
        points.push((d as f64, c.wall_us, c.cpu_us));
        depth.insert(d.to_string(), c.json());
    }
    let wall_fit = fit(&points.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
    let cpu_fit = fit(&points.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>());

    let create_unlink = measure(pid, a.iters / 10, |i| {
        let name = format!("bench-{i}");
        let (node, fh) = f.create(ROOT, &name, libc::O_RDWR as u32).expect("create");
        f.release(node, fh).expect("release");
        f.unlink(ROOT, &name).expect("unlink");
        f.batch_forget(&[(node, 1)]);
    });

    let fh = f
        .open(data, libc::O_RDWR as u32)
        .map_err(|e| format!("open: errno {e}"))?;
    let mut rw = serde_json::Map::new();
    let seed = 0x9e37_79b9_7f4a_7c15u64;
    for bs in [4096u32, 128 << 10] {
        let slots = (64u64 << 20) / u64::from(bs);
        let mut rng = Rng(seed);
        let mut next = move || (rng.next() % slots) * u64::from(bs);
        let n = if bs == 4096 { a.iters } else { a.iters / 8 };
        let r = measure(pid, n, |_| {
            let got = f.read(data, fh, next(), bs).expect("read");
            assert_eq!(got, bs as usize);
        });
        let buf = vec![0x5au8; bs as usize];
        let w = measure(pid, n, |_| f.write(data, fh, next(), &buf).expect("write"));
        rw.insert(format!("read_{}k", bs / 1024), r.json());
        rw.insert(format!("write_{}k", bs / 1024), w.json());
    }
    f.release(data, fh)
        .map_err(|e| format!("release: errno {e}"))?;

    let report = json!({
        "label": a.label,
        "getattr": getattr.json(),
        "lookup_path_depth": depth,
        "lookup_fit": {
            "wall_us": { "constant": (wall_fit.0 * 100.0).round() / 100.0, "per_component": (wall_fit.1 * 100.0).round() / 100.0 },
            "cpu_us": { "constant": (cpu_fit.0 * 100.0).round() / 100.0, "per_component": (cpu_fit.1 * 100.0).round() / 100.0 },
        },
        "create_release_unlink": create_unlink.json(),
        "io": rw,
    });
    println!("{report}");
    Ok(())
}

/// One request slot of the `io` phase: its request and reply buffers in guest memory.
#[derive(Clone, Copy)]
struct Slot {
    /// `fuse_in_header` + `fuse_read_in`/`fuse_write_in`.
    req: u64,
    /// WRITE payload.
    data: u64,
    /// `fuse_out_header`, then (READ) the data.
    rep: u64,
}

/// One case of the `io` phase.
#[derive(Clone, Copy)]
struct IoCase {
    write: bool,
    bs: u32,
    qd: usize,
    seconds: f64,
}

/// `qd` requests of `bs` bytes in flight for `seconds`, as the Linux driver lays them out:
/// header and arguments in one device-readable descriptor, a WRITE's payload in the next, the
/// reply header and a READ's data in two device-writable ones. Each request is made available
/// as it is submitted, with a kick if the device asked for one, as virtio-fs submits each
/// request on its own (`virtio_fs_enqueue_req`); completions are collected as they come. With
/// several request queues the requests in flight are shared out among them, each driven by a
/// thread of its own, as a guest's vCPUs each submit on the queue mapped to them.
fn io_case(
    f: &mut Fuse,
    pid: u32,
    file: (u64, u64),
    c: IoCase,
    slots: &[Slot],
) -> Result<Value, String> {
    let fe = &mut f.fe;
    let (mem, queues) = (&fe.mem, &mut fe.queues[1..]);
    let n = queues.len();
    let per_queue = c.qd / n;
    if c.write {
        let payload: Vec<u8> = (0..c.bs).map(|i| (i as u8) | 1).collect();
        for s in &slots[..c.qd] {
            mem.write(s.data, &payload);
        }
    }
    let notes0: Vec<_> = queues.iter().map(|q| q.notifications()).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(c.seconds);
    let meter = Meter::start(pid);
    let driven: Vec<Result<(Vec<u32>, u64), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(slots[..per_queue * n].chunks(per_queue))
            .enumerate()
            .map(|(i, (q, slots))| s.spawn(move || drive(q, mem, file, c, slots, i, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("queue thread panicked".into()))
            })
            .collect()
    });
    let mut lat = Vec::new();
    let mut errors = 0u64;
    for d in driven {
        let (l, e) = d?;
        lat.extend(l);
        errors += e;
    }
    if errors > 0 {
        return Err(format!("{errors} of {} requests failed", lat.len()));
    }
    let ops = lat.len();
    let elapsed = meter.t0.elapsed().as_secs_f64();
    let cost = meter.stop(ops);
    let notes = queues.iter().zip(&notes0).fold((0, 0), |(i, k), (q, n0)| {
        let n = q.notifications();
        (i + n.0 - n0.0, k + n.1 - n0.1)
    });
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&n| r2(f64::from(n) / 1000.0))
    };
    let mut v = cost.json();
    let o = v.as_object_mut().expect("object");
    o.insert("ops".into(), json!(ops));
    o.insert("errors".into(), json!(errors));
    o.insert("request_queues".into(), json!(n));
    o.insert("iops".into(), json!((ops as f64 / elapsed).round()));
    o.insert(
        "mib_s".into(),
        json!(r2(ops as f64 * f64::from(c.bs)
            / elapsed
            / f64::from(1 << 20))),
    );
    let per = |n: u64| r2(n as f64 / ops.max(1) as f64);
    o.insert("interrupts_per_op".into(), json!(per(notes.0)));
    o.insert("kicks_per_op".into(), json!(per(notes.1)));
    o.insert("lat_p50_us".into(), json!(pct(0.5)));
    o.insert("lat_p99_us".into(), json!(pct(0.99)));
    Ok(v)
}

/// One request queue's share of an [`io_case`]: a request in flight per slot until `deadline`.
/// Returns each request's round trip (ns) and how many failed.
fn drive(
    queue: &mut Queue,
    mem: &GuestMem,
    (node, fh): (u64, u64),
    c: IoCase,
    slots: &[Slot],
    index: usize,
    deadline: Instant,
) -> Result<(Vec<u32>, u64), String> {
    let IoCase { write, bs, .. } = c;
    let opcode = if write { fuse_op::WRITE } else { fuse_op::READ };
    let span = (64u64 << 20) / u64::from(bs);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15u64 ^ u64::from(bs) ^ u64::from(write) ^ index as u64);
    let mut unique = (1u64 << 40) | ((index as u64) << 36);
    let mut submit = |queue: &mut Queue, s: &Slot| -> Result<u16, String> {
        unique += 2;
        let len = IN_HEADER_LEN as u32 + 40 + if write { bs } else { 0 };
        let mut msg = in_header(len, opcode, unique, node, 0, 0);
        msg.extend_from_slice(&Fuse::rw_in(fh, (rng.next() % span) * u64::from(bs), bs, 0));
        mem.write(s.req, &msg);
        mem.write(s.rep, &[0u8; OUT_HEADER_LEN]);
        let descs = if write {
            vec![
                Desc::r(s.req, msg.len() as u32),
                Desc::r(s.data, bs),
                // fuse_out_header + fuse_write_out.
                Desc::w(s.rep, OUT_HEADER_LEN as u32 + 8),
            ]
        } else {
            vec![
                Desc::r(s.req, msg.len() as u32),
                Desc::w(s.rep, OUT_HEADER_LEN as u32),
                Desc::w(s.rep + OUT_HEADER_LEN as u64, bs),
            ]
        };
        let head = queue.add(mem, &descs).ok_or("ring full")?;
        queue.publish(mem);
        Ok(head)
    };
    let mut started: HashMap<u16, (usize, Instant)> = HashMap::new();
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    for (k, s) in slots.iter().enumerate() {
        started.insert(submit(queue, s)?, (k, Instant::now()));
    }
    let mut errors = 0u64;
    while !started.is_empty() {
        let done = queue.wait_used(mem, 1, Duration::from_secs(10));
        if done.is_empty() {
            return Err(format!("{} requests unanswered for 10 s", started.len()));
        }
        let now = Instant::now();
        let more = now < deadline;
        for (head, _) in done {
            let Some((k, t)) = started.remove(&head) else {
                return Err(format!("completion of unknown head {head}"));
            };
            lat.push(now.duration_since(t).as_nanos().min(u128::from(u32::MAX)) as u32);
            let out = mem.read_vec(slots[k].rep, OUT_HEADER_LEN);
            let (len, error) = (
                u32::from_le_bytes(out[0..4].try_into().expect("4")),
                i32::from_le_bytes(out[4..8].try_into().expect("4")),
            );
            let want = OUT_HEADER_LEN as u32 + if write { 8 } else { bs };
            if error != 0 || len != want {
                errors += 1;
            }
            if more {
                started.insert(submit(queue, &slots[k])?, (k, Instant::now()));
            }
        }
    }
    Ok((lat, errors))
}

fn io(f: &mut Fuse, a: &Args) -> Result<(), String> {
    const QDS: [usize; 2] = [1, 16];
    let data = f
        .lookup(ROOT, "data.bin")
        .map_err(|e| format!("data.bin: errno {e}"))?;
    let fh = f
        .open(data, libc::O_RDWR as u32)
        .map_err(|e| format!("open: errno {e}"))?;
    let max = 128u64 << 10;
    let slots: Vec<Slot> = (0..QDS[1])
        .map(|_| Slot {
            req: f.fe.mem.alloc(4096, 4096),
            data: f.fe.mem.alloc(max, 4096),
            rep: f.fe.mem.alloc(max + 4096, 4096),
        })
        .collect();
    let mut cases = serde_json::Map::new();
    for bs in [4096u32, 128 << 10] {
        for write in [false, true] {
            for qd in QDS {
                if qd % usize::from(a.request_queues) != 0 {
                    continue;
                }
                let c = IoCase {
                    write,
                    bs,
                    qd,
                    seconds: a.seconds,
                };
                let rw = if write { "write" } else { "read" };
                let name = format!("{rw}_{}k_qd{qd}", bs / 1024);
                if a.case.as_ref().is_some_and(|only| *only != name) {
                    continue;
                }
                let r = io_case(f, a.pid, (data, fh), c, &slots)?;
                cases.insert(name, r);
            }
        }
    }
    f.release(data, fh)
        .map_err(|e| format!("release: errno {e}"))?;
    println!("{}", json!({ "label": a.label, "qd_io": cases }));
    Ok(())
}
