//! The bounded, seeded run of a harness on the stable toolchain (`cargo test`): N mutated inputs
//! from the target's seed corpus, each under a watchdog. A panic, an input that runs longer than
//! [`HANG`], or one that makes a single allocation larger than [`MAX_ALLOC`] (with
//! [`TrackingAlloc`] as the test binary's allocator: an allocation sized by an unchecked field,
//! which libFuzzer reports as out-of-memory) fails the run with the input hex-dumped and saved
//! to a file that `cargo fuzz run <target> <file>` (or [`reproduce`]) replays.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::mutate::Mutator;
use crate::Target;

/// One input taking longer than this is a hang. Generous: inputs take milliseconds, a loaded
/// machine can stall a test thread for seconds, and a real hang never ends.
pub const HANG: Duration = Duration::from_secs(20);
/// No input needs a single allocation larger than this (the largest legitimate buffers are the
/// 1 MiB FUSE reads and writes and virtio-blk chunks).
pub const MAX_ALLOC: usize = 64 << 20;

thread_local! {
    /// The largest single allocation of this thread since the runner last looked (per thread,
    /// so tests running side by side do not see each other's).
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the allocator also runs while a thread's locals are being torn down.
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

/// The system allocator, noting the largest allocation for the runner. Install it in the test
/// binary: `#[global_allocator] static A: TrackingAlloc = TrackingAlloc;`.
pub struct TrackingAlloc;

// SAFETY: every call is forwarded unchanged to `System`, which upholds the contract; the only
// addition is a thread-local maximum, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// How many inputs, from which seed. `VSNAP_FUZZ_ITERS` and `VSNAP_FUZZ_SEED` (decimal or 0x
/// hex) override the defaults.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub iters: u64,
    pub seed: u64,
    /// An input running longer than this fails the run ([`HANG`] by default).
    pub hang: Duration,
}

impl Config {
    pub fn from_env(default_iters: u64) -> Self {
        let num = |var: &str| {
            std::env::var(var).ok().map(|v| {
                let v = v.trim();
                let r = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                r.unwrap_or_else(|_| panic!("{var}={v} is not a number"))
            })
        };
        Config {
            iters: num("VSNAP_FUZZ_ITERS").unwrap_or(default_iters),
            seed: num("VSNAP_FUZZ_SEED").unwrap_or(0x5eed_f00d),
            hang: HANG,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub inputs: u64,
    pub elapsed: Duration,
}

/// What the watchdog sees of the worker: the input being run and since when.
struct Current {
    index: u64,
    started: Instant,
    input: Vec<u8>,
}

enum Outcome {
    Done(u64),
    /// A panic, or an allocation past [`MAX_ALLOC`].
    Failed {
        index: u64,
        input: Vec<u8>,
        message: String,
    },
}

/// Runs `cfg.iters` inputs through `target` and returns how many ran. Panics (failing the test)
/// on the first harness panic or hang, with the input.
pub fn run(target: &Target, cfg: Config) -> Summary {
    let start = Instant::now();
    // Each target gets its own stream from one seed.
    let stream = cfg.seed ^ fnv1a(target.name.as_bytes());
    let cur = Arc::new(Mutex::new(Current {
        index: 0,
        started: Instant::now(),
        input: Vec::new(),
    }));
    let (tx, rx) = mpsc::channel();
    let worker = {
        let (cur, t) = (cur.clone(), *target);
        std::thread::Builder::new()
            .name(format!("fuzz-{}", t.name))
            .spawn(move || {
                let seeds = (t.seeds)();
                let mut m = Mutator::new(&seeds, t.dict, t.max_len, stream);
                let mut input = Vec::new();
                for index in 0..cfg.iters {
                    m.next_into(&mut input);
                    {
                        let mut c = cur.lock().unwrap_or_else(PoisonError::into_inner);
                        c.index = index;
                        c.started = Instant::now();
                        c.input.clone_from(&input);
                    }
                    LARGEST.set(0);
                    let r = catch_unwind(AssertUnwindSafe(|| (t.run)(&input)));
                    let largest = LARGEST.get();
                    let message = match r {
                        Err(p) => p
                            .downcast_ref::<String>()
                            .map(|s| format!("panicked: {s}"))
                            .or_else(|| p.downcast_ref::<&str>().map(|s| format!("panicked: {s}")))
                            .unwrap_or_else(|| "panicked".into()),
                        Ok(()) if largest > MAX_ALLOC => {
                            format!("allocated {largest} bytes at once (more than {MAX_ALLOC})")
                        }
                        Ok(()) => continue,
                    };
                    let _ = tx.send(Outcome::Failed {
                        index,
                        input,
                        message,
                    });
                    return;
                }
                let _ = tx.send(Outcome::Done(cfg.iters));
            })
            .expect("spawn the fuzz worker")
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Outcome::Done(inputs)) => {
                worker.join().expect("worker finished");
                return Summary {
                    inputs,
                    elapsed: start.elapsed(),
                };
            }
            Ok(Outcome::Failed {
                index,
                input,
                message,
            }) => fail(target.name, cfg, index, &input, &message),
            Err(RecvTimeoutError::Timeout) => {
                let c = cur.lock().unwrap_or_else(PoisonError::into_inner);
                if c.started.elapsed() > cfg.hang {
                    // The worker is stuck in a syscall we cannot interrupt; it is left behind.
                    fail(
                        target.name,
                        cfg,
                        c.index,
                        &c.input,
                        &format!("hung: no result after {:?}", cfg.hang),
                    );
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!("fuzz worker for {} died without a result", target.name)
            }
        }
    }
}

fn fail(name: &str, cfg: Config, index: u64, input: &[u8], what: &str) -> ! {
    let saved = save(name, cfg.seed, index, input);
    panic!(
        "{name}: input #{index} (VSNAP_FUZZ_SEED={:#x}) {what}\nsaved to {}\n{} bytes:\n{}",
        cfg.seed,
        saved.display(),
        input.len(),
        hexdump(input)
    );
}

/// Writes a failing input where `cargo fuzz run` can replay it.
fn save(name: &str, seed: u64, index: u64, input: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vsnap-fuzz-{name}-{seed:x}-{index}.bin"));
    if let Err(e) = std::fs::write(&p, input) {
        return PathBuf::from(format!("(not saved: {e})"));
    }
    p
}

/// Runs one saved input through `target` (the harness panics if it still fails).
pub fn reproduce(target: &Target, input: &[u8]) {
    (target.run)(input)
}

/// `offset: hex bytes  ascii`, 16 bytes a line, the first 4 KiB.
pub fn hexdump(b: &[u8]) -> String {
    const SHOWN: usize = 4096;
    let mut s = String::new();
    for (i, line) in b[..b.len().min(SHOWN)].chunks(16).enumerate() {
        let _ = write!(s, "{:06x}: ", i * 16);
        for x in line {
            let _ = write!(s, "{x:02x} ");
        }
        for _ in line.len()..16 {
            s.push_str("   ");
        }
        s.push(' ');
        s.extend(line.iter().map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                c as char
            } else {
                '.'
            }
        }));
        s.push('\n');
    }
    if b.len() > SHOWN {
        let _ = writeln!(s, "... {} more bytes (see the saved file)", b.len() - SHOWN);
    }
    s
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ u64::from(c)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> Vec<Vec<u8>> {
        vec![b"ok".to_vec()]
    }

    fn panics_on_bang(d: &[u8]) {
        assert!(!d.contains(&b'!'), "found a bang");
    }

    #[test]
    fn a_panicking_input_fails_the_run_with_its_bytes() {
        let t = Target {
            name: "bang",
            run: panics_on_bang,
            seeds,
            dict: &[b"!"],
            max_len: 64,
        };
        let r = catch_unwind(|| {
            run(
                &t,
                Config {
                    iters: 100_000,
                    seed: 1,
                    hang: HANG,
                },
            )
        });
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("panicked: found a bang"), "{msg}");
        assert!(msg.contains(" 21 "), "the hex dump shows the '!': {msg}");
    }

    fn sleeps_on_z(d: &[u8]) {
        if d.contains(&b'z') {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    #[test]
    fn a_hanging_input_fails_the_run() {
        let t = Target {
            name: "hang",
            run: sleeps_on_z,
            seeds,
            dict: &[b"z"],
            max_len: 64,
        };
        let r = catch_unwind(|| {
            run(
                &t,
                Config {
                    iters: 100_000,
                    seed: 1,
                    hang: Duration::from_millis(300),
                },
            )
        });
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("hung"), "{msg}");
    }

    #[global_allocator]
    static ALLOC: TrackingAlloc = TrackingAlloc;

    fn allocates_on_a(d: &[u8]) {
        if d.contains(&b'a') {
            let v = vec![1u8; MAX_ALLOC + 1];
            assert_eq!(v.len(), MAX_ALLOC + 1);
        }
    }

    #[test]
    fn a_huge_allocation_fails_the_run() {
        let t = Target {
            name: "alloc",
            run: allocates_on_a,
            seeds,
            dict: &[b"a"],
            max_len: 64,
        };
        let r = catch_unwind(|| {
            run(
                &t,
                Config {
                    iters: 100_000,
                    seed: 1,
                    hang: HANG,
                },
            )
        });
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("bytes at once"), "{msg}");
    }

    #[test]
    fn hexdump_format() {
        assert_eq!(
            hexdump(b"AB\x00"),
            "000000: 41 42 00                                         AB.\n"
        );
    }
}
