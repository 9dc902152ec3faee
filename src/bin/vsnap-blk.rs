//! `vsnap-blk`: `vsnap blk` under the name and options of the vhost-user spec's "Backend program
//! conventions" for a `block` backend (QEMU `docs/interop/vhost-user.rst`), for the JSON
//! descriptor `50-vsnap-blk.json`: `--socket-path` or `--fd`, `--print-capabilities`,
//! `--blk-file` (the base image, never written: the guest's writes go to the state directory's
//! layers) and `--read-only`. Every other `vsnap blk` option works too. Exit status 0, or 1 on
//! an error (2 for a command line clap refuses).

use clap::Parser;
use vsnap::cmd::blk;

#[derive(Parser)]
#[command(
    name = "vsnap-blk",
    version,
    about = "vsnap blk under the vhost-user backend program conventions"
)]
struct Cli {
    /// Print the backend's capabilities as the vhost-user spec's JSON and exit; every other
    /// option is ignored.
    #[arg(long)]
    print_capabilities: bool,
    #[command(flatten)]
    blk: blk::BlkArgs,
}

fn main() {
    // Before parsing: the convention is that the other options are ignored, so a command line
    // missing what serving needs still gets an answer.
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--print-capabilities")
    {
        println!("{}", blk::CAPABILITIES);
        return;
    }
    let cli = Cli::parse();
    if let Err(e) = vsnap::service::log::init(&cli.blk.service.log) {
        eprintln!("vsnap-blk: error: {e}");
        std::process::exit(1);
    }
    if let Err(e) = blk::run(cli.blk) {
        eprintln!("vsnap-blk: error: {e:#}");
        std::process::exit(1);
    }
}
