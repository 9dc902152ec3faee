pub mod blk;
pub mod ctl;
pub mod diff;
pub mod fs;
pub mod image;
pub mod virtiofsd;

/// A stopper that SIGINT or SIGTERM triggers: the server finishes in-flight requests and returns.
pub fn stop_on_signals() -> anyhow::Result<vsnap_vhost::Stopper> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stopper = vsnap_vhost::Stopper::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let s = stopper.clone();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping: finishing in-flight requests");
            s.stop();
        }
    });
    Ok(stopper)
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
