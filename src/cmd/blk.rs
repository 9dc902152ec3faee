use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use vsnap_blk::{BlkBackend, BlkOptions, CacheModeFile};
use vsnap_block::{Disk, DiskOptions};
use vsnap_vhost::listen::{self, SocketFile};
use vsnap_vhost::serve_listener;

use crate::service::ServiceArgs;
use crate::size::parse_size;

/// `vsnap-blk --print-capabilities` (the vhost-user spec's "Backend program conventions"):
/// `--blk-file` is `--base`, `--read-only` is `--readonly`.
pub const CAPABILITIES: &str =
    "{\n  \"type\": \"block\",\n  \"features\": [\n    \"blk-file\",\n    \"read-only\"\n  ]\n}";

#[derive(Args)]
pub struct BlkArgs {
    /// vhost-user socket to listen on (the VMM connects to it). Not needed with --fd or under
    /// systemd socket activation when --state-dir is given.
    #[arg(long, alias = "socket")]
    socket_path: Option<PathBuf>,
    /// Give the socket to this group (a name or a number) with mode 0660, so that a VMM
    /// running in it may connect.
    #[arg(long, requires = "socket_path", conflicts_with = "fd")]
    socket_group: Option<String>,
    /// Serve on this inherited listening socket (a manager bound it) instead of binding. Under
    /// systemd socket activation (LISTEN_FDS) the passed socket is used.
    #[arg(long)]
    fd: Option<i32>,
    /// Read-only base image (raw); `--blk-file` is the vhost-user convention's name for it. The
    /// image is never written: the guest's writes go to layers in the state directory. Omit
    /// together with --size for a blank disk.
    #[arg(long, visible_alias = "blk-file")]
    base: Option<PathBuf>,
    /// Size of a blank disk (e.g. 10G) when there is no base image.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Where layers and their bitmaps live [default: SOCKET.state next to the socket].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Diffs to start from, oldest first, applied over the base (when the state dir is new):
    /// paths or object-storage URLs (s3://, gs://, az://; fetched once into the state dir).
    #[arg(long = "chain")]
    chain: Vec<PathBuf>,
    /// Accept a first --chain diff that does not lie on the base (its parent is another diff):
    /// for a base that already holds that parent, e.g. one materialised from it.
    #[arg(long)]
    allow_foreign_parent: bool,
    /// Serve the disk read-only (the guest sees VIRTIO_BLK_F_RO).
    #[arg(long, visible_alias = "read-only")]
    readonly: bool,
    /// Number of virtqueues. QEMU's vhost-user-blk-pci asks for one per vCPU and refuses a device
    /// with fewer, so the default is generous; unused queues cost an idle thread.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    num_queues: u16,
    /// The ring size the VMM sets (QEMU's `queue-size`, cloud-hypervisor's `queue_size`; 128
    /// in both by default). The config space's seg_max is derived from it, because the VMM reads
    /// that before sizing any ring; larger rings are accepted (up to 32768), a smaller one is
    /// warned about (docs/interop.md).
    #[arg(long, default_value_t = 128, value_parser = parse_queue_size)]
    queue_size: u16,
    /// The longest a queue's worker keeps looking at its empty ring before it sleeps, in µs:
    /// the look adapts between 0 and this and backs off when it finds nothing or the CPU is
    /// contended (QEMU's `poll-max-ns`). 0: never look, sleep at once (least CPU, a wake-up per
    /// idle gap).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(0..=1000))]
    poll_max_us: u64,
    /// Tracking block size in bytes (power of two, 512..1M); advertised to the guest as the
    /// physical block size and I/O granularity.
    #[arg(long, default_value_t = vsnap_block::DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Logical block size the guest sees (512 or up to the tracking block size).
    #[arg(long, default_value_t = 512)]
    logical_block_size: u32,
    /// Control API socket (HTTP/JSON; see docs/api.md), created mode 0600.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serial number the guest reads with GET_ID (at most 20 bytes) [default: derived from the
    /// state directory].
    #[arg(long)]
    serial: Option<String>,
    #[command(flatten)]
    pub service: ServiceArgs,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let v: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_power_of_two() && v <= 32768 {
        Ok(v)
    } else {
        Err("queue size must be a power of two up to 32768".into())
    }
}

/// A stable serial for a state directory: "vsnap" and 15 hex digits of a hash of its path.
fn default_serial(state_dir: &Path) -> String {
    let path = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let h = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    format!("vsnap{:015x}", h >> 4)
}

fn device_status(backend: Arc<BlkBackend>, socket: PathBuf) -> vsnap_control::StatusFn {
    Arc::new(move || vsnap_control::DeviceStatus {
        kind: "virtio-blk".into(),
        socket: socket.clone(),
        queues: backend.options().num_queues,
        connected: backend.connected.load(std::sync::atomic::Ordering::SeqCst),
        serial: backend.options().serial.clone(),
        faults: backend.faults.snapshot().into_iter().collect(),
    })
}

/// The listening socket: systemd's, an inherited `--fd`, or `--socket-path` bound unless a live
/// daemon serves it. Returns the socket file to remove at exit when we bound it.
fn listen(a: &BlkArgs) -> anyhow::Result<(UnixListener, Option<SocketFile>)> {
    if let Some(l) = listen::from_systemd()? {
        if a.socket_group.is_some() {
            bail!(
                "--socket-group: systemd passed the socket; set SocketGroup= in its .socket unit"
            );
        }
        return Ok((l, None));
    }
    if let Some(fd) = a.fd {
        // SAFETY: the manager handed us this fd at exec; nothing else in the process takes it.
        return Ok((unsafe { listen::from_fd(fd) }?, None));
    }
    let Some(path) = &a.socket_path else {
        bail!("--socket-path, --fd or systemd socket activation is needed");
    };
    let mut bound = listen::bind_exclusive(path)?;
    if let Some(g) = &a.socket_group {
        if let Err(e) = bound.set_group(g) {
            bound.file.remove();
            return Err(e.into());
        }
    }
    let (l, f) = bound.into_parts();
    Ok((l, Some(f)))
}

pub fn run(a: BlkArgs) -> anyhow::Result<()> {
    // Before anything is bound or opened: a second daemon on the same pidfile stops here.
    let mut pidfile = a.service.lock_pidfile()?;
    // Then the socket, before any thread runs (from_systemd edits the environment) and before
    // the disk is opened (a second daemon on a live socket stops here).
    let r = listen(&a).and_then(|(listener, socket_file)| {
        let r = run_on(a, listener, pidfile.as_mut());
        if let Some(f) = &socket_file {
            f.remove();
        }
        r
    });
    if let Some(p) = pidfile {
        p.remove();
    }
    r
}

fn run_on(
    a: BlkArgs,
    listener: UnixListener,
    pidfile: Option<&mut crate::service::Pidfile>,
) -> anyhow::Result<()> {
    if a.serial.as_ref().is_some_and(|s| s.len() > 20) {
        anyhow::bail!("--serial is longer than 20 bytes");
    }
    if !a.logical_block_size.is_power_of_two()
        || a.logical_block_size < 512
        || a.logical_block_size > a.block_size
    {
        anyhow::bail!("--logical-block-size must be a power of two from 512 to --block-size");
    }
    let state_dir = match (&a.state_dir, &a.socket_path) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => {
            let mut s = p.clone().into_os_string();
            s.push(".state");
            PathBuf::from(s)
        }
        (None, None) => bail!("--state-dir is needed when there is no --socket-path"),
    };
    // What the control API reports: the path given, else the one the socket is bound to.
    let socket = a
        .socket_path
        .clone()
        .or_else(|| {
            let addr = listener.local_addr().ok()?;
            addr.as_pathname().map(Path::to_owned)
        })
        .unwrap_or_default();
    let mut o = DiskOptions::new(&state_dir);
    o.base = a.base.clone();
    o.size = a.size;
    o.block_size = a.block_size;
    // Diffs in object storage are read through copies kept in the state dir.
    o.chain = crate::remote::inputs(&a.chain, &state_dir.join("remote-cache"))?;
    o.readonly = a.readonly;
    if a.allow_foreign_parent {
        o.chain_root = vsnap_block::diff::ChainRoot::Foreign;
    }
    if a.readonly && !state_dir.exists() {
        // A read-only disk leaves its state directory untouched, so it needs one: a new one
        // holds just the base (or the blank size) and the chain, as a read-write start would.
        let mut create = o.clone();
        create.readonly = false;
        Disk::open(&create)
            .and_then(|d| d.close())
            .with_context(|| format!("create the disk in {}", state_dir.display()))?;
        tracing::info!(state_dir = %state_dir.display(), "state directory created for a read-only disk");
    }
    let disk = Arc::new(
        Disk::open(&o).with_context(|| format!("open the disk in {}", state_dir.display()))?,
    );
    let g = disk.geometry();
    tracing::info!(
        state_dir = %state_dir.display(),
        capacity = g.size,
        block_size = g.block_size,
        generation = disk.info().generation,
        readonly = a.readonly,
        "disk open"
    );
    let serial = a
        .serial
        .clone()
        .unwrap_or_else(|| default_serial(&state_dir));
    let backend = Arc::new(
        BlkBackend::new(
            disk.clone(),
            BlkOptions {
                num_queues: a.num_queues,
                queue_size: a.queue_size,
                serial,
                logical_block_size: a.logical_block_size,
                poll_max: std::time::Duration::from_micros(a.poll_max_us),
            },
        )
        // What the guest set and a reconnecting VMM will not set again.
        .with_cache_mode_file(CacheModeFile::new(state_dir.join("cache-mode")))
        .context("the saved cache mode")?,
    );
    let stop_api = match &a.api_socket {
        Some(p) => {
            let status = device_status(backend.clone(), socket);
            let api = vsnap_control::Api::new(disk.clone(), status)
                .with_upload_dir(state_dir.join("uploads"));
            let stop = vsnap_control::spawn(p, api)
                .with_context(|| format!("control socket {}", p.display()))?;
            tracing::info!(api_socket = %p.display(), "control API listening");
            Some(stop)
        }
        None => None,
    };
    let stopper = super::stop_on_signals()?;
    // Ready: whoever reads the pid may signal it, and the stop is handled from here on.
    if let Some(p) = pidfile {
        p.write_pid(std::process::id())?;
    }
    // `serve` removes the socket file it bound (and only that: a refused second daemon must not
    // remove the first one's).
    let served = serve_listener(backend, listener, &stopper);
    if let Some(stop) = stop_api {
        stop();
    }
    disk.close().context("persist the disk state")?;
    tracing::info!("disk state persisted; exiting");
    served.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
