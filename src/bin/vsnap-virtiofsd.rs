//! `vsnap-virtiofsd`: `vsnap fs` behind virtiofsd's command line (Rust virtiofsd 1.14's options
//! and the legacy `-o` forms), so libvirt's `<binary path=...>`, the vhost-user JSON descriptor
//! and scripts written for virtiofsd run vsnap unchanged. Exit status 0, or 1 on an error, as
//! virtiofsd.

use clap::{CommandFactory, Parser};
use vsnap::cmd::{fs, virtiofsd};

/// The `vsnap fs` arguments the translation produces.
#[derive(Parser)]
#[command(
    name = "vsnap-virtiofsd",
    version,
    about = "vsnap fs with virtiofsd's command line"
)]
struct Cli {
    #[command(flatten)]
    fs: fs::FsArgs,
}

fn main() {
    let plan = match virtiofsd::translate(std::env::args_os().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vsnap-virtiofsd: error: {e}");
            std::process::exit(1);
        }
    };
    let (args, warnings) = match plan {
        virtiofsd::Plan::PrintCapabilities => {
            println!("{}", virtiofsd::CAPABILITIES);
            return;
        }
        virtiofsd::Plan::Version => {
            println!("vsnap-virtiofsd {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        virtiofsd::Plan::Help => {
            println!(
                "vsnap-virtiofsd takes virtiofsd's options; what vsnap does with each:\n\n{}",
                virtiofsd::options_table()
            );
            let _ = Cli::command().print_help();
            return;
        }
        virtiofsd::Plan::Serve { args, warnings } => (args, warnings),
    };
    // virtiofsd serves one frontend and exits when it leaves.
    let cli = Cli::try_parse_from(
        std::iter::once("vsnap-virtiofsd".into())
            .chain(args)
            .chain(std::iter::once("--exit-after-disconnect".into())),
    )
    .unwrap_or_else(|e| {
        eprintln!("vsnap-virtiofsd: error: {e}");
        std::process::exit(1);
    });
    // --log-level (or -d) and --syslog, as translated.
    if let Err(e) = vsnap::service::log::init(&cli.fs.service.log) {
        eprintln!("vsnap-virtiofsd: error: {e}");
        std::process::exit(1);
    }
    for w in warnings {
        tracing::warn!("{w}");
    }
    if let Err(e) = fs::run(cli.fs) {
        eprintln!("vsnap-virtiofsd: error: {e:#}");
        std::process::exit(1);
    }
}
