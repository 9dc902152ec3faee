//! vsnap: a vhost-user block device daemon with zero-aware snapshot diffs, and its tools.

use clap::{Parser, Subcommand};
use vsnap::cmd;

#[derive(Parser)]
#[command(
    name = "vsnap",
    version,
    about = "vhost-user disks with snapshot diffs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a disk to a VMM as a vhost-user-blk device.
    Blk(cmd::blk::BlkArgs),
    /// Serve a host directory to a VMM as a vhost-user-fs device (virtiofsd's flags).
    Fs(cmd::fs::FsArgs),
    /// Talk to a running daemon's control socket: info, stats, cut, export, fold.
    Ctl(cmd::ctl::CtlArgs),
    /// Inspect, apply, squash and convert snapshot diffs.
    #[command(subcommand)]
    Diff(cmd::diff::DiffCmd),
    /// Create disk images and report their allocation.
    #[command(subcommand)]
    Image(cmd::image::ImageCmd),
    /// Write the disk of a state directory as the guest last saw it (base + layers) to a raw image.
    Materialize(cmd::diff::MaterializeArgs),
}

fn main() {
    let cli = Cli::parse();
    let logging = match &cli.cmd {
        Cmd::Blk(a) => vsnap::service::log::init(&a.service.log),
        Cmd::Fs(a) => vsnap::service::log::init(&a.service.log),
        _ => {
            vsnap::init_logging("info");
            Ok(())
        }
    };
    if let Err(e) = logging {
        eprintln!("vsnap: error: {e}");
        std::process::exit(1);
    }
    let r = match cli.cmd {
        Cmd::Blk(a) => cmd::blk::run(a),
        Cmd::Ctl(a) => cmd::ctl::run(a),
        Cmd::Fs(a) => cmd::fs::run(a),
        Cmd::Diff(c) => cmd::diff::run(c),
        Cmd::Image(c) => cmd::image::run(c),
        Cmd::Materialize(a) => cmd::diff::materialize(a),
    };
    if let Err(e) = r {
        eprintln!("vsnap: error: {e:#}");
        std::process::exit(1);
    }
}
