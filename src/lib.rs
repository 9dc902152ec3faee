//! The vsnap command line, shared by its executables: `vsnap` (every subcommand) and
//! `vsnap-virtiofsd` (`vsnap fs` behind virtiofsd's command line, for libvirt and scripts).

pub mod cmd;
pub mod progress;
pub mod remote;
pub mod service;
pub mod size;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), coloured on a terminal. The daemons
/// take `--log-level` and `--syslog` too: [`service::log::init`].
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
