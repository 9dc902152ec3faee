use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use vsnap_block::image::{self, Prealloc};
use vsnap_block::Job;

use super::print_json;
use crate::size::parse_size;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Create a raw disk image.
    Create(CreateArgs),
    /// Show an image's capacity and how much of it is allocated on the host.
    Info {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Count the blocks of IMAGE that differ from BASE, and the bytes of non-zero changed blocks:
    /// the least data any diff from BASE to IMAGE must carry.
    Compare {
        /// The image IMAGE was derived from (omit for a blank disk).
        #[arg(long)]
        base: Option<PathBuf>,
        image: PathBuf,
        #[arg(long, default_value_t = 4096)]
        block_size: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    path: PathBuf,
    /// Capacity, e.g. 10G, 512M, 1048576.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    #[arg(long, value_enum, default_value = "off")]
    prealloc: PreallocArg,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum PreallocArg {
    /// Sparse: nothing allocated.
    Off,
    /// Reserve the blocks with fallocate.
    Falloc,
    /// Write every byte.
    Full,
}

pub fn run(cmd: ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Create(a) => {
            if a.size % 512 != 0 {
                anyhow::bail!("--size {} is not a multiple of 512", a.size);
            }
            let prealloc = match a.prealloc {
                PreallocArg::Off => Prealloc::Off,
                PreallocArg::Falloc => Prealloc::Falloc,
                PreallocArg::Full => Prealloc::Full,
            };
            let job = Job::new();
            crate::progress::run("create", &job, || {
                image::create(&a.path, a.size, prealloc, a.force, &job)
            })??;
            let info = image::info(&a.path)?;
            eprintln!(
                "created {}: {} bytes, {} allocated",
                a.path.display(),
                info.capacity,
                info.allocated
            );
            Ok(())
        }
        ImageCmd::Info { path, json } => {
            let info = image::info(&path).with_context(|| format!("inspect {}", path.display()))?;
            if json {
                return print_json(&info);
            }
            println!("format:    {}", info.format);
            println!("capacity:  {} bytes", info.capacity);
            println!("allocated: {} bytes", info.allocated);
            println!("file size: {} bytes", info.file_size);
            Ok(())
        }
        ImageCmd::Compare {
            base,
            image,
            block_size,
            json,
        } => {
            let job = Job::new();
            let c = crate::progress::run("compare", &job, || {
                image::compare(base.as_deref(), &image, block_size, &job)
            })??;
            if json {
                return print_json(&c);
            }
            println!("blocks:          {} of {} bytes", c.blocks, c.block_size);
            println!("changed:         {}", c.changed_blocks);
            println!("changed to zero: {}", c.changed_to_zero_blocks);
            println!("min data bytes:  {}", c.min_data_bytes);
            Ok(())
        }
    }
}
