//! Runs a long operation on a worker thread while the main thread reports its progress: a bar
//! on a terminal, JSON lines on stderr otherwise. SIGINT/SIGTERM cancel the job, which then
//! cleans up after itself (no partial output is left).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use vsnap_block::Job;

const TEMPLATE: &str = "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}";

/// A byte-count bar on a terminal (hidden otherwise), for transfers that report their own
/// progress; `total` 0 if unknown.
pub fn bytes(what: &str, total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(TEMPLATE)
            .expect("static template")
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

pub fn run<T: Send>(what: &str, job: &Job, work: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    let tty = std::io::stderr().is_terminal();
    let bar = tty.then(|| bytes(what, 0));
    let mut last_json = std::time::Instant::now();
    let out = std::thread::scope(|s| {
        let h = s.spawn(work);
        while !h.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
            if interrupted.load(Ordering::Relaxed) {
                job.cancel();
            }
            let (done, total) = job.progress();
            if let Some(b) = &bar {
                b.set_length(total);
                b.set_position(done);
            } else if last_json.elapsed() >= Duration::from_secs(1) && total > 0 {
                eprintln!(r#"{{"progress":"{what}","done":{done},"total":{total}}}"#);
                last_json = std::time::Instant::now();
            }
        }
        h.join().expect("worker thread panicked")
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if interrupted.load(Ordering::Relaxed) {
        anyhow::bail!("{what}: interrupted, nothing written");
    }
    Ok(out)
}
