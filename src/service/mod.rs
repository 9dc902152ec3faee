//! What the daemons need to run as services (docs/service.md): `--pidfile`, `--log-level`,
//! `--syslog`. The socket side (`--socket-group`, `--fd`, socket activation) is in
//! `vsnap_vhost::listen`.

pub mod log;
pub mod pidfile;

use std::path::PathBuf;

use clap::Args;

pub use log::{LogArgs, LogLevel};
pub use pidfile::{Pidfile, PidfileError};

/// The service options `vsnap blk` and `vsnap fs` share.
#[derive(Args, Clone, Debug, Default)]
pub struct ServiceArgs {
    /// Write the daemon's pid to this file once it listens; refuse to start while another live
    /// daemon holds the file (it is locked, not just written); removed at a clean exit.
    #[arg(long)]
    pub pidfile: Option<PathBuf>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl ServiceArgs {
    /// Locks the pidfile, if one was asked for (before anything is bound or opened, so that a
    /// second daemon stops first).
    pub fn lock_pidfile(&self) -> Result<Option<Pidfile>, PidfileError> {
        self.pidfile.as_deref().map(Pidfile::lock).transpose()
    }
}
