use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;
use vsnap_block::diff::{self, Compression, DiffFile, WriteOptions};
use vsnap_block::tracker::runs;
use vsnap_block::{Disk, DiskOptions, Job};

use super::print_json;
use crate::remote;
use crate::size::parse_size;

/// Diff arguments may be object-storage URLs (`s3://`, `gs://`, `az://`): inputs are read
/// through a local cache (`$VSNAP_CACHE_DIR`, else `~/.cache/vsnap`), a squash output is
/// uploaded once written.
#[derive(Subcommand)]
pub enum DiffCmd {
    /// List the diffs in a directory or under an object-storage prefix, with their sizes.
    List {
        location: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show a diff's header, counts, storage (version, stored and raw bytes, compression ratio,
    /// frames, blocks stored as references to its parent) and block ranges (validates every
    /// checksum the diff holds; references are checked against the parent when applied).
    Inspect {
        diff: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Apply diffs (oldest first) to a base image, writing the disk as it was at the last cut.
    Apply {
        #[arg(long)]
        base: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        diffs: Vec<PathBuf>,
        #[arg(long)]
        force: bool,
        /// Accept a first diff that does not lie on the base image (its parent is another diff):
        /// for a base that already holds that parent, e.g. one materialised from it.
        #[arg(long)]
        allow_foreign_parent: bool,
    },
    /// Squash chained diffs (oldest first) into one; the newest state of each block wins.
    Squash {
        #[arg(long)]
        out: PathBuf,
        #[arg(required = true)]
        diffs: Vec<PathBuf>,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Convert a diff into a qcow2 overlay whose backing file is the diff's parent image.
    ToQcow2 {
        #[arg(long)]
        backing: PathBuf,
        /// A raw image of the diff's parent, to read the blocks the diff stores as copies of
        /// its parent (parent dedupe) from: by default the backing file, when it is raw.
        #[arg(long)]
        parent: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        diff: PathBuf,
        #[arg(long)]
        force: bool,
        /// Accept a diff whose parent is another diff: BACKING then must hold that parent (its
        /// overlay or image), not the base.
        #[arg(long)]
        allow_foreign_parent: bool,
    },
}

/// How a diff is written.
#[derive(Args)]
pub struct WriteArgs {
    /// none, zstd (level 3) or zstd:LEVEL; frames zstd does not shrink are stored raw.
    #[arg(long, default_value_t = Compression::DEFAULT)]
    compression: Compression,
    /// Raw bytes per frame (a multiple of the block size): one block read decodes one frame.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    frame_size: u64,
    /// Threads compressing frames at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: u16,
}

impl WriteArgs {
    fn options(&self) -> anyhow::Result<WriteOptions> {
        Ok(WriteOptions {
            compression: self.compression,
            frame_size: u32::try_from(self.frame_size)
                .map_err(|_| anyhow::anyhow!("--frame-size {} is too large", self.frame_size))?,
            threads: usize::from(self.threads),
            ..WriteOptions::default()
        })
    }
}

fn root(allow_foreign_parent: bool) -> diff::ChainRoot {
    if allow_foreign_parent {
        diff::ChainRoot::Foreign
    } else {
        diff::ChainRoot::Base
    }
}

#[derive(Args)]
pub struct MaterializeArgs {
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    force: bool,
}

#[derive(Serialize)]
struct Inspect {
    version: u32,
    id: String,
    parent: Option<String>,
    generation: u64,
    block_size: u32,
    device_size: u64,
    blocks: u64,
    dirty_blocks: u64,
    zero_blocks: u64,
    untouched_blocks: u64,
    /// Raw bytes of the dirty blocks (same as raw_bytes).
    data_bytes: u64,
    zero_bytes: u64,
    file_bytes: u64,
    /// File offset of the data section (the frames' stored bytes follow back to back).
    data_offset: u64,
    raw_bytes: u64,
    /// Bytes the dirty blocks take in the file.
    stored_bytes: u64,
    /// raw_bytes / stored_bytes (1 when nothing is stored): compression and references.
    compression_ratio: f64,
    frames: u64,
    /// Frames stored compressed; the others are raw or references.
    zstd_frames: u64,
    /// Dirty blocks stored as copies of blocks of the parent (parent dedupe): 4 bytes each
    /// here, their bytes read from the disk below the diff.
    referenced_blocks: u64,
    /// Raw bytes of those blocks.
    referenced_bytes: u64,
    /// Index entries that are references.
    reference_frames: u64,
    /// Raw bytes per frame (version 1: per checksum chunk).
    frame_size: u32,
    checksums: &'static str,
    /// Runs of blocks, [start, end) in block indices.
    dirty_ranges: Vec<(u32, u64)>,
    zero_ranges: Vec<(u32, u64)>,
}

pub fn run(cmd: DiffCmd) -> anyhow::Result<()> {
    let cache = remote::cache_dir();
    match cmd {
        DiffCmd::List { location, json } => {
            let entries = remote::list(&location)?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|(name, size)| serde_json::json!({ "name": name, "size": size }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (name, size) in entries {
                    println!("{size:>14}  {name}");
                }
            }
            Ok(())
        }
        DiffCmd::Inspect { diff, json } => inspect(remote::input(&diff, &cache)?, json),
        DiffCmd::Apply {
            base,
            out,
            diffs,
            force,
            allow_foreign_parent,
        } => {
            let diffs = remote::inputs(&diffs, &cache)?;
            let job = Job::new();
            let g = crate::progress::run("apply", &job, || {
                let root = root(allow_foreign_parent);
                diff::apply_to(base.as_deref(), &diffs, &out, force, root, &job)
            })??;
            eprintln!("wrote {} ({} bytes)", out.display(), g.size);
            Ok(())
        }
        DiffCmd::Squash {
            out,
            diffs,
            force,
            write,
        } => {
            let diffs = remote::inputs(&diffs, &cache)?;
            let target = remote::Output::new(&out)?;
            let job = Job::new();
            let opts = write.options()?;
            let h = crate::progress::run("squash", &job, || {
                diff::squash_with(&diffs, target.path(), force, &opts, &job)
            })??;
            target.finish()?;
            eprintln!(
                "wrote {}: {} dirty, {} zero blocks",
                out.display(),
                h.dirty_blocks,
                h.zero_blocks
            );
            Ok(())
        }
        DiffCmd::ToQcow2 {
            backing,
            parent,
            out,
            diff,
            force,
            allow_foreign_parent,
        } => {
            let diff = remote::input(&diff, &cache)?;
            let job = Job::new();
            crate::progress::run("to-qcow2", &job, || {
                let root = root(allow_foreign_parent);
                let parent = parent.as_deref();
                diff::qcow2::to_qcow2_with(&diff, &backing, parent, root, &out, force, &job)
            })??;
            eprintln!("wrote {}", out.display());
            Ok(())
        }
    }
}

fn inspect(path: PathBuf, json: bool) -> anyhow::Result<()> {
    let d = DiffFile::open(&path)?;
    d.verify(&Job::new())?;
    let h = &d.header;
    let g = h.geometry;
    let st = d.data_stats();
    let info = Inspect {
        version: h.version,
        id: h.id.to_string(),
        parent: (!h.parent.is_nil()).then(|| h.parent.to_string()),
        generation: h.generation,
        block_size: g.block_size,
        device_size: g.size,
        blocks: g.blocks(),
        dirty_blocks: h.dirty_blocks,
        zero_blocks: h.zero_blocks,
        untouched_blocks: g.blocks() - h.dirty_blocks - h.zero_blocks,
        data_bytes: h.data_len(),
        zero_bytes: h.zero_blocks * g.bs(),
        file_bytes: d.file_len(),
        data_offset: h.data_offset(),
        raw_bytes: st.raw_bytes,
        stored_bytes: st.stored_bytes,
        compression_ratio: st.compression_ratio(),
        frames: st.frames,
        zstd_frames: st.zstd_frames,
        referenced_blocks: st.referenced_blocks,
        referenced_bytes: st.referenced_blocks * g.bs(),
        reference_frames: st.reference_frames,
        frame_size: h.frame_size,
        checksums: "ok",
        dirty_ranges: runs(d.tracker().dirty()).collect(),
        zero_ranges: runs(d.tracker().zero()).collect(),
    };
    if json {
        return print_json(&info);
    }
    println!("vsnap diff v{}  {}", info.version, path.display());
    println!("id:          {}", info.id);
    println!(
        "parent:      {}",
        info.parent.as_deref().unwrap_or("(base image)")
    );
    println!("generation:  {}", info.generation);
    println!(
        "device:      {} bytes, {} blocks of {}",
        info.device_size, info.blocks, info.block_size
    );
    println!(
        "dirty:       {} blocks, {} bytes of data",
        info.dirty_blocks, info.data_bytes
    );
    println!(
        "zero:        {} blocks ({} bytes, no data)",
        info.zero_blocks, info.zero_bytes
    );
    println!("untouched:   {} blocks", info.untouched_blocks);
    println!(
        "stored:      {} bytes for {} raw (ratio {:.3}); frames: {} ({} zstd), up to {} raw bytes each",
        info.stored_bytes,
        info.raw_bytes,
        info.compression_ratio,
        info.frames,
        info.zstd_frames,
        info.frame_size
    );
    println!(
        "references:  {} blocks ({} bytes) stored as copies of the parent, in {} entries",
        info.referenced_blocks, info.referenced_bytes, info.reference_frames
    );
    println!(
        "file:        {} bytes, checksums {}",
        info.file_bytes, info.checksums
    );
    for (name, ranges) in [("dirty", &info.dirty_ranges), ("zero", &info.zero_ranges)] {
        let shown: Vec<String> = ranges
            .iter()
            .take(16)
            .map(|(s, e)| format!("{s}-{}", e - 1))
            .collect();
        let more = ranges.len().saturating_sub(16);
        let tail = if more > 0 {
            format!(" … (+{more} ranges)")
        } else {
            String::new()
        };
        println!(
            "{name} ranges: {}{tail}",
            if shown.is_empty() {
                "-".into()
            } else {
                shown.join(", ")
            }
        );
    }
    Ok(())
}

pub fn materialize(a: MaterializeArgs) -> anyhow::Result<()> {
    let mut o = DiskOptions::new(&a.state_dir);
    o.readonly = true;
    let disk = Disk::open(&o)?;
    let job = Job::new();
    crate::progress::run("materialize", &job, || {
        disk.materialize(&a.out, a.force, &job)
    })??;
    eprintln!("wrote {} ({} bytes)", a.out.display(), disk.geometry().size);
    Ok(())
}
