use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use vsnap_control::http::call;

#[derive(Args)]
pub struct CtlArgs {
    /// The daemon's control socket (`vsnap blk --api-socket`).
    #[arg(long)]
    api_socket: PathBuf,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Device, capacity, queues, connection, generation.
    Info,
    /// Request counters, block states, allocation.
    Stats,
    /// Prometheus text metrics.
    Metrics,
    /// Cut a snapshot consistency point now.
    Cut {
        /// fsync the frozen generation before the cut returns (the guest resumes first).
        #[arg(long)]
        durable: bool,
    },
    /// List generations (layers) with their export state.
    Generations,
    /// Export a frozen generation as a vsnap diff or a qcow2 overlay.
    Export {
        generation: u64,
        #[arg(long)]
        path: PathBuf,
        #[arg(long, default_value = "vsnap", value_parser = ["vsnap", "qcow2"])]
        format: String,
        /// qcow2 only: the overlay's backing file (the parent image).
        #[arg(long)]
        backing: Option<PathBuf>,
        /// `none` or `zstd[:LEVEL]` (vsnap format).
        #[arg(long, default_value_t = vsnap_block::diff::Compression::DEFAULT)]
        compression: vsnap_block::diff::Compression,
        /// Raw bytes per frame, a multiple of the block size (vsnap format) [default: 1 MiB].
        #[arg(long)]
        frame_size: Option<u32>,
        /// Store every block as data, even those the parent state holds (vsnap format).
        #[arg(long)]
        no_dedupe: bool,
        /// Wait until the export finishes (polls its progress).
        #[arg(long)]
        wait: bool,
    },
    /// Progress of a generation's export.
    ExportStatus { generation: u64 },
    /// Cancel a running export.
    Cancel { generation: u64 },
    /// Fold a frozen generation into the one below it.
    Fold {
        generation: u64,
        #[arg(long)]
        force: bool,
    },
}

fn request(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, body) = call(sock, method, path, body.as_ref())
        .with_context(|| format!("connect to {}", sock.display()))?;
    let text = String::from_utf8_lossy(&body);
    if status >= 400 {
        let msg = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        anyhow::bail!("{method} {path}: HTTP {status}: {msg}");
    }
    Ok(serde_json::from_slice(&body).unwrap_or(Value::String(text.into_owned())))
}

fn human_bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub fn run(a: CtlArgs) -> anyhow::Result<()> {
    let s = &a.api_socket;
    let v = match &a.cmd {
        CtlCmd::Info => request(s, "GET", "/api/v1/info", None)?,
        CtlCmd::Stats => request(s, "GET", "/api/v1/stats", None)?,
        CtlCmd::Metrics => {
            let (_, body) = call(s, "GET", "/metrics", None)?;
            print!("{}", String::from_utf8_lossy(&body));
            return Ok(());
        }
        CtlCmd::Cut { durable } => request(
            s,
            "POST",
            "/api/v1/cut",
            Some(json!({ "durable": durable })),
        )?,
        CtlCmd::Generations => request(s, "GET", "/api/v1/generations", None)?,
        CtlCmd::Export {
            generation,
            path,
            format,
            backing,
            compression,
            frame_size,
            no_dedupe,
            wait,
        } => {
            // A URL (object storage) goes as it is; a path is made absolute for the daemon.
            let path = match path.to_str() {
                Some(url) if vsnap_remote::is_url(url) => path.clone(),
                _ => std::path::absolute(path)?,
            };
            let mut body = json!({ "path": path, "format": format, "compression": compression });
            if let Some(f) = frame_size {
                body["frame_size"] = json!(f);
            }
            if *no_dedupe {
                body["dedupe"] = json!(false);
            }
            if let Some(b) = backing {
                body["backing"] = json!(std::path::absolute(b)?);
            }
            let mut v = request(
                s,
                "POST",
                &format!("/api/v1/generations/{generation}/export"),
                Some(body),
            )?;
            while *wait && v["state"] == "running" {
                std::thread::sleep(Duration::from_millis(100));
                v = request(
                    s,
                    "GET",
                    &format!("/api/v1/generations/{generation}/export"),
                    None,
                )?;
            }
            if v["state"] == "failed" {
                anyhow::bail!("export failed: {}", v["error"].as_str().unwrap_or("?"));
            }
            v
        }
        CtlCmd::ExportStatus { generation } => request(
            s,
            "GET",
            &format!("/api/v1/generations/{generation}/export"),
            None,
        )?,
        CtlCmd::Cancel { generation } => request(
            s,
            "DELETE",
            &format!("/api/v1/generations/{generation}/export"),
            None,
        )?,
        CtlCmd::Fold { generation, force } => request(
            s,
            "POST",
            &format!("/api/v1/generations/{generation}/fold"),
            Some(json!({ "force": force })),
        )?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match &a.cmd {
        CtlCmd::Info => println!(
            "{} {} bytes, block {} B, {} queues, {}, generation {}{}",
            v["device"].as_str().unwrap_or("?"),
            v["capacity"],
            v["block_size"],
            v["queues"],
            if v["connected"] == true { "connected" } else { "not connected" },
            v["generation"],
            if v["readonly"] == true { ", read-only" } else { "" },
        ),
        CtlCmd::Stats => {
            let r = &v["requests"];
            println!("generation {}: {} dirty, {} zero, {} untouched blocks; layer holds {}; reclaimed {}",
                v["generation"], v["dirty_blocks"], v["zero_blocks"], v["untouched_blocks"],
                human_bytes(v["layer_allocated_bytes"].as_u64().unwrap_or(0)), human_bytes(v["reclaimed_bytes"].as_u64().unwrap_or(0)));
            println!("requests: {} reads, {} writes, {} write-zeroes, {} discards, {} flushes; {} faults",
                r["reads"], r["writes"], r["write_zeroes"], r["discards"], r["flushes"], v["faults_total"]);
        }
        CtlCmd::Cut { .. } => println!(
            "froze generation {} ({} in flight drained in {} µs, guest paused {} µs); active generation {}",
            v["generation"], v["drained"], v["drain_us"], v["pause_us"], v["active_generation"]
        ),
        CtlCmd::Generations | CtlCmd::Fold { .. } => {
            for l in v.as_array().into_iter().flatten() {
                println!("generation {:>4} {:<7} {:>9} dirty {:>9} zero  export: {}{}",
                    l["generation"], if l["active"] == true { "active" } else { "frozen" },
                    l["dirty_blocks"], l["zero_blocks"], l["export"].as_str().unwrap_or("?"),
                    l["export_path"].as_str().map(|p| format!(" {p}")).unwrap_or_default());
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(())
}
