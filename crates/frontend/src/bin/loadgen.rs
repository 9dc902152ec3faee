//! vsnap-loadgen: drives any vhost-user-blk backend over its socket (no VM) and reports IOPS,
//! latency percentiles and the backend's CPU time per I/O. One thread per queue, each keeping
//! `--qd` requests in flight.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::Serialize;
use vsnap_frontend::blk::{self, place, Bufs, Layout};
use vsnap_frontend::procstat::cpu_seconds;
use vsnap_frontend::{Frontend, GuestMem, Queue, Rng, Setup};

#[derive(Clone, Copy, Debug, ValueEnum, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Pattern {
    Randread,
    Randwrite,
    Read,
    Write,
}

#[derive(Parser)]
#[command(about = "Load generator for vhost-user-blk backends")]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    rw: Pattern,
    /// Request size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    qd: u16,
    #[arg(long, default_value_t = 1)]
    queues: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Limit offsets to the first SPAN bytes of the device (default: all of it).
    #[arg(long)]
    span: Option<u64>,
    /// Backend process whose CPU time (/proc/PID/stat) is charged to the I/Os.
    #[arg(long)]
    pid: Option<u32>,
    /// Label put in the JSON output.
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Serialize)]
struct Report {
    label: String,
    rw: Pattern,
    bs: u32,
    qd: u16,
    queues: usize,
    span: u64,
    seconds: f64,
    ios: u64,
    errors: u64,
    iops: f64,
    mib_s: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    backend_cpu_s: Option<f64>,
    backend_cpu_us_per_io: Option<f64>,
}

fn run_queue(
    q: &mut Queue,
    mem: &GuestMem,
    a: &Args,
    blocks: u64,
    seed: u64,
    stop: &AtomicBool,
) -> (Vec<u32>, u64) {
    let qd = usize::from(a.qd);
    let bufs: Vec<Bufs> = (0..qd).map(|_| Bufs::new(mem, a.bs)).collect();
    let write = matches!(a.rw, Pattern::Randwrite | Pattern::Write);
    let mut rng = Rng(seed | 1);
    // Non-zero, incompressible-looking data: a backend must not get the zero fast path.
    let data: Vec<u8> = (0..a.bs).map(|_| (rng.next() as u8) | 1).collect();
    let mut seq = seed % blocks;
    let mut next_block = |rng: &mut Rng| match a.rw {
        Pattern::Randread | Pattern::Randwrite => rng.next() % blocks,
        Pattern::Read | Pattern::Write => {
            seq = (seq + 1) % blocks;
            seq
        }
    };
    let mut started = vec![Instant::now(); usize::from(q.size)];
    let mut slot_of = vec![0usize; usize::from(q.size)];
    let mut lat = Vec::with_capacity(1 << 20);
    let mut errors = 0u64;
    let submit = |q: &mut Queue,
                  slot: usize,
                  block: u64,
                  started: &mut Vec<Instant>,
                  slot_of: &mut Vec<usize>| {
        let sector = block * u64::from(a.bs) / 512;
        let p = if write {
            place(
                q,
                mem,
                bufs[slot],
                blk::T_OUT,
                sector,
                &data,
                0,
                Layout::Simple,
                false,
            )
        } else {
            place(
                q,
                mem,
                bufs[slot],
                blk::T_IN,
                sector,
                &[],
                a.bs,
                Layout::Simple,
                false,
            )
        }
        .expect("ring has room");
        started[usize::from(p.head)] = Instant::now();
        slot_of[usize::from(p.head)] = slot;
    };
    for slot in 0..qd {
        let b = next_block(&mut rng);
        submit(q, slot, b, &mut started, &mut slot_of);
    }
    q.publish(mem);
    let mut in_flight = qd;
    while in_flight > 0 {
        let done = q.wait_used(mem, 1, Duration::from_secs(5));
        if done.is_empty() {
            eprintln!("vsnap-loadgen: no completion in 5 s on queue {}", q.index);
            break;
        }
        let stopping = stop.load(Ordering::Relaxed);
        for (head, _) in done {
            let now = Instant::now();
            lat.push(now.duration_since(started[usize::from(head)]).as_nanos() as u32);
            let slot = slot_of[usize::from(head)];
            let st = mem.read_vec(bufs[slot].status_addr(a.bs), 1)[0];
            if st != 0 {
                errors += 1;
            }
            if stopping {
                in_flight -= 1;
            } else {
                let b = next_block(&mut rng);
                submit(q, slot, b, &mut started, &mut slot_of);
            }
        }
        if !stopping {
            q.publish(mem);
        }
    }
    (lat, errors)
}

fn main() {
    let a = Args::parse();
    if a.bs % 512 != 0 || a.qd == 0 {
        eprintln!("vsnap-loadgen: --bs must be a multiple of 512 and --qd at least 1");
        std::process::exit(2);
    }
    let mem_size = (a.queues as u64 * u64::from(a.qd) * (u64::from(a.bs) + 8192) + (16 << 20))
        .next_power_of_two();
    let setup = Setup {
        num_queues: a.queues,
        queue_size: (a.qd.max(2)).next_power_of_two().max(128),
        mem_size,
        ..Setup::default()
    };
    let mut fe = Frontend::connect(&a.socket, &setup).unwrap_or_else(|e| {
        eprintln!("vsnap-loadgen: connect {}: {e}", a.socket.display());
        std::process::exit(1);
    });
    let cfg = fe.get_config(0, 8).expect("config");
    let capacity = u64::from_le_bytes(cfg[0..8].try_into().expect("8 bytes")) * 512;
    let span = a.span.unwrap_or(capacity).min(capacity);
    let blocks = span / u64::from(a.bs);
    let stop = AtomicBool::new(false);
    let cpu0 = a.pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    let mut queues = std::mem::take(&mut fe.queues);
    let results: Vec<(Vec<u32>, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let (mem, a, stop) = (&fe.mem, &a, &stop);
                s.spawn(move || {
                    run_queue(
                        q,
                        mem,
                        a,
                        blocks,
                        0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 7919),
                        stop,
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(a.seconds));
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread"))
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = a.pid.and_then(cpu_seconds);
    let mut lat: Vec<u32> = results.iter().flat_map(|r| r.0.iter().copied()).collect();
    let errors = results.iter().map(|r| r.1).sum();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |&n| f64::from(n) / 1000.0)
    };
    let ios = lat.len() as u64;
    let backend_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let r = Report {
        label: a.label.clone(),
        rw: a.rw,
        bs: a.bs,
        qd: a.qd,
        queues: a.queues,
        span,
        seconds: elapsed,
        ios,
        errors,
        iops: ios as f64 / elapsed,
        mib_s: ios as f64 * f64::from(a.bs) / elapsed / f64::from(1 << 20),
        lat_p50_us: pct(0.50),
        lat_p99_us: pct(0.99),
        backend_cpu_s,
        backend_cpu_us_per_io: backend_cpu_s.map(|c| c * 1e6 / ios.max(1) as f64),
    };
    println!("{}", serde_json::to_string(&r).expect("serialise"));
    if errors > 0 {
        std::process::exit(1);
    }
}
