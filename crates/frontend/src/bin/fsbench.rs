//! vsnap-fsbench: drives any vhost-user-fs backend (vsnap fs, virtiofsd) over its socket as a
//! guest's virtiofs driver would, one request at a time, and reports per-operation round trips
//! and the backend's CPU time per operation, fds and RSS. The shared dir must hold the tree
//! bench/fs.sh makes: many/dN/fM (100 x 1,000 files), deep/c1/.../c63, data.bin (64 MiB).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};
use vsnap_frontend::fs::Fuse;
use vsnap_frontend::procstat::{cpu_seconds, open_fds, rss_kib};

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
    /// Which part to run: `hold` (look up and hold many/, report fds and RSS) or `ops` (the
    /// per-operation costs). Run each against a fresh daemon: a backend that ran out of fds
    /// while holding may not recover.
    #[arg(long, value_parser = ["hold", "ops"])]
    phase: String,
}

/// Runs `f` `n` times: (wall µs per op, backend CPU µs per op).
fn measure(pid: u32, n: usize, mut f: impl FnMut(usize)) -> (f64, f64) {
    let c0 = cpu_seconds(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    for i in 0..n {
        f(i);
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - c0;
    (wall * 1e6 / n as f64, cpu * 1e6 / n as f64)
}

fn op(wall_cpu: (f64, f64)) -> Value {
    json!({ "wall_us": (wall_cpu.0 * 100.0).round() / 100.0, "cpu_us": (wall_cpu.1 * 100.0).round() / 100.0 })
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
    let mut f = Fuse::connect(&a.socket).map_err(|e| e.to_string())?;
    f.init().map_err(|e| format!("INIT: errno {e}"))?;
    if a.phase == "hold" {
        return hold(&mut f, &a);
    }
    ops(&mut f, &a)
}

fn hold(f: &mut Fuse, a: &Args) -> Result<(), String> {
    let pid = a.pid;
    let fds0 = open_fds(pid);
    let rss0 = rss_kib(pid);

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
    let first_lookup = (
        t0.elapsed().as_secs_f64() * 1e6 / lookups as f64,
        (cpu_seconds(pid).unwrap_or(0.0) - c0) * 1e6 / lookups as f64,
    );
    let (fds1, rss1) = (open_fds(pid), rss_kib(pid));
    f.batch_forget(&held);
    let report = json!({
        "label": a.label,
        "held_inodes": lookups,
        "lookup_error": lookup_error,
        "fds_idle": fds0,
        "fds_holding": fds1,
        "rss_kib_idle": rss0,
        "rss_kib_holding": rss1,
        "first_lookup": op(first_lookup),
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
        let (wall, cpu) = measure(pid, n, |_| {
            let mut node = ROOT;
            for c in &comps[..d] {
                node = f.lookup(node, c).expect("lookup");
                ids.push((node, 1));
            }
        });
        f.batch_forget(&ids);
        depth.insert(d.to_string(), op((wall, cpu)));
        points.push((d as f64, wall, cpu));
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
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for bs in [4096u32, 128 << 10] {
        let slots = (64u64 << 20) / u64::from(bs);
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % slots) * u64::from(bs)
        };
        let n = if bs == 4096 { a.iters } else { a.iters / 8 };
        let r = measure(pid, n, |_| {
            let got = f.read(data, fh, next(), bs).expect("read");
            assert_eq!(got, bs as usize);
        });
        let buf = vec![0x5au8; bs as usize];
        let w = measure(pid, n, |_| f.write(data, fh, next(), &buf).expect("write"));
        rw.insert(format!("read_{}k", bs / 1024), op(r));
        rw.insert(format!("write_{}k", bs / 1024), op(w));
    }
    f.release(data, fh)
        .map_err(|e| format!("release: errno {e}"))?;

    let report = json!({
        "label": a.label,
        "getattr": op(getattr),
        "lookup_path_depth": depth,
        "lookup_fit": {
            "wall_us": { "constant": (wall_fit.0 * 100.0).round() / 100.0, "per_component": (wall_fit.1 * 100.0).round() / 100.0 },
            "cpu_us": { "constant": (cpu_fit.0 * 100.0).round() / 100.0, "per_component": (cpu_fit.1 * 100.0).round() / 100.0 },
        },
        "create_release_unlink": op(create_unlink),
        "io": rw,
    });
    println!("{report}");
    Ok(())
}
