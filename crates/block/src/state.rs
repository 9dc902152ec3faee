//! The state directory: a manifest naming the base image (and its identity) and the diff chain
//! below the layers; per layer a meta file (generation, id, parent, export) beside its data and
//! bitmap files; the lock; records of exports under way.
//!
//! A layer belongs to the stack exactly when its meta file exists, so changing the stack is one
//! rename: a cut installs the new layer's meta, a fold installs the folded layer's, which names
//! the layers it replaces. The cost of a cut does not grow with the number of generations.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{BlockError, IoContext, Result};
use crate::fsutil;
use crate::geometry::Geometry;

pub const MANIFEST: &str = "vsnap-state.json";
/// Format 1 listed the layers in the manifest; format 2 keeps them in meta files. Format 1 is
/// still read (and converted at the first writable open).
const FORMAT: u32 = 2;
const META_SUFFIX: &str = ".meta";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub geometry: Geometry,
    pub base: Option<PathBuf>,
    /// What the base was when the disk was made on it; checked at every open, so a base that
    /// shrank, grew or was replaced under the same path is refused instead of served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_identity: Option<BaseIdentity>,
    /// Diffs between the base and the first layer, oldest first.
    pub chain: Vec<PathBuf>,
    /// Format 1 only: the layers, oldest first (format 2 keeps them in meta files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerMeta>,
    /// False while a daemon has the disk open; found false at open means it did not close cleanly.
    pub clean: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerMeta {
    pub generation: u64,
    pub id: Uuid,
    /// The layer (or chain diff) below; nil when it lies directly on the base.
    pub parent: Uuid,
    /// File name stem of the layer's `.data` and `.bitmap` files.
    pub stem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exported: Option<PathBuf>,
    /// A folded layer: the stems of the two layers it stands for. Once this meta exists they
    /// are gone from the stack, whatever of their files a crash left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<String>,
}

impl LayerMeta {
    pub fn path(dir: &Path, stem: &str) -> PathBuf {
        dir.join(format!("{stem}{META_SUFFIX}"))
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("layer meta serialises")
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir, &self.stem);
        fsutil::write_atomic(&path, &self.bytes()).ctx(|| format!("write {}", path.display()))
    }

    /// Writes and syncs the meta under a temporary name: [`fsutil::AtomicFile::install`] adds
    /// the layer to the stack with one rename (inside a cut's pause).
    pub fn prepare(&self, dir: &Path) -> Result<fsutil::AtomicFile> {
        let path = Self::path(dir, &self.stem);
        let ctx = || format!("write {}", path.display());
        let f = fsutil::AtomicFile::create(&path, true).ctx(ctx)?;
        std::os::unix::fs::FileExt::write_all_at(f.file(), &self.bytes(), 0).ctx(ctx)?;
        f.sync().ctx(ctx)?;
        Ok(f)
    }

    /// The stack the meta files in `dir` describe, oldest first, checked: folded-away layers
    /// dropped, one layer per generation, each lying on the one below and the oldest on
    /// `bottom` (the newest chain diff, or nil for the base). Also returns the stems of the
    /// layers folded away (their files are leftovers).
    pub fn load_stack(dir: &Path, bottom: uuid::Uuid) -> Result<(Vec<Self>, Vec<String>)> {
        let bad = |msg: String| BlockError::State {
            path: dir.to_owned(),
            msg,
        };
        let mut metas = Vec::new();
        let rd = std::fs::read_dir(dir).ctx(|| format!("list {}", dir.display()))?;
        for f in rd {
            let f = f.ctx(|| format!("list {}", dir.display()))?;
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(META_SUFFIX) {
                continue;
            }
            let bytes = std::fs::read(f.path()).ctx(|| format!("read {}", f.path().display()))?;
            let m: Self = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("unreadable layer meta {name}: {e}")))?;
            if format!("{}{META_SUFFIX}", m.stem) != name {
                return Err(bad(format!("{name} names layer {:?}", m.stem)));
            }
            metas.push(m);
        }
        let replaced: Vec<String> = metas.iter().flat_map(|m| m.replaces.clone()).collect();
        metas.retain(|m| !replaced.contains(&m.stem));
        metas.sort_by_key(|m| m.generation);
        if metas.is_empty() {
            return Err(bad("no layers".into()));
        }
        let mut below = bottom;
        for (i, m) in metas.iter().enumerate() {
            if i > 0 && metas[i - 1].generation == m.generation {
                return Err(bad(format!("two layers of generation {}", m.generation)));
            }
            if m.parent != below {
                return Err(bad(format!(
                    "layer {} (generation {}) lies on {}, but below it is {below}{}",
                    m.stem,
                    m.generation,
                    m.parent,
                    if i == 0 {
                        " (the chain's end, or the base)"
                    } else {
                        ""
                    }
                )));
            }
            below = m.id;
        }
        Ok((metas, replaced))
    }
}

/// A base image's size and a content fingerprint: FNV-1a (64-bit) over its first and last MiB
/// and 64 blocks of 4 KiB spread evenly between (the whole file when it is small). Cheap at
/// every start, independent of mtime (a copy of the same image matches), and a replaced image
/// only matches if it agrees in every sampled byte.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseIdentity {
    pub size: u64,
    pub fingerprint: String,
}

impl BaseIdentity {
    const EDGE: u64 = 1 << 20;
    const SAMPLES: u64 = 64;
    const SAMPLE: u64 = 4096;

    pub fn of(path: &Path) -> Result<Self> {
        let ctx = || format!("fingerprint base image {}", path.display());
        let f = std::fs::File::open(path).ctx(ctx)?;
        let size = f.metadata().ctx(ctx)?.len();
        let mut h = Fnv::default();
        let mut buf = vec![0u8; Self::EDGE as usize];
        let mut region = |off: u64, len: u64, h: &mut Fnv| -> Result<()> {
            let b = &mut buf[..len as usize];
            fsutil::read_at_or_zero(&f, b, off).ctx(ctx)?;
            h.update(b);
            Ok(())
        };
        if size <= 2 * Self::EDGE + Self::SAMPLES * Self::SAMPLE {
            let mut off = 0;
            while off < size {
                let n = (size - off).min(Self::EDGE);
                region(off, n, &mut h)?;
                off += n;
            }
        } else {
            region(0, Self::EDGE, &mut h)?;
            let span = size - 2 * Self::EDGE - Self::SAMPLE;
            for i in 0..Self::SAMPLES {
                let off = Self::EDGE + span * i / (Self::SAMPLES - 1);
                region(off, Self::SAMPLE, &mut h)?;
            }
            region(size - Self::EDGE, Self::EDGE, &mut h)?;
        }
        Ok(Self {
            size,
            fingerprint: format!("fnv1a64:{:016x}", h.0),
        })
    }
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    /// FNV-1a over 8-byte words (the tail byte-wise): fast enough for a few MiB at every start.
    fn update(&mut self, b: &[u8]) {
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.0 = (self.0 ^ u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .wrapping_mul(0x100_0000_01b3);
        }
        for &x in words.remainder() {
            self.0 = (self.0 ^ u64::from(x)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// The lock on a state directory: `lock` in it, flocked exclusive by a writer (the daemon, for
/// its whole life, or an offline command that writes) and shared by readers. A second writer,
/// or a reader while a writer runs, is refused. The kernel drops the lock when the process
/// dies, however it dies, so a crash never leaves the directory locked.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

pub const LOCK: &str = "lock";

impl StateLock {
    pub fn acquire(dir: &Path, exclusive: bool) -> Result<Self> {
        let path = dir.join(LOCK);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(exclusive)
            .create(exclusive)
            .truncate(false)
            .open(&path);
        let file = match file {
            // A read-only open of a directory no writer ever locked: nothing to conflict with.
            Err(e) if !exclusive && e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::File::open(dir).ctx(|| format!("open {}", dir.display()))?
            }
            r => r.ctx(|| format!("open {}", path.display()))?,
        };
        if !fsutil::try_flock(&file, exclusive).ctx(|| format!("lock {}", path.display()))? {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(BlockError::Locked {
                path: dir.to_owned(),
                holder: if holder.is_empty() {
                    "another process".into()
                } else {
                    format!("process {holder}")
                },
            });
        }
        if exclusive {
            // Who holds it, for the message the next one gets (advisory; the flock decides).
            let _ = file.set_len(0);
            let _ = std::os::unix::fs::FileExt::write_all_at(
                &file,
                format!("{}\n", std::process::id()).as_bytes(),
                0,
            );
        }
        Ok(Self { _file: file })
    }
}

/// Exports under way, recorded in the state directory (`export-<generation>.pending`, holding
/// the target path) before their temporary file is created, so a daemon restarted after a kill
/// removes exactly the temporary files its own interrupted exports left.
pub struct PendingExports;

impl PendingExports {
    const PREFIX: &'static str = "export-";
    const SUFFIX: &'static str = ".pending";

    fn record(dir: &Path, generation: u64) -> PathBuf {
        dir.join(format!("{}{generation}{}", Self::PREFIX, Self::SUFFIX))
    }

    pub fn add(dir: &Path, generation: u64, target: &Path) -> Result<()> {
        let p = Self::record(dir, generation);
        fsutil::write_atomic(&p, target.as_os_str().as_encoded_bytes())
            .ctx(|| format!("write {}", p.display()))
    }

    /// Called once the export's temporary file is gone (committed or removed).
    pub fn remove(dir: &Path, generation: u64) {
        let _ = std::fs::remove_file(Self::record(dir, generation));
    }

    /// Removes what interrupted exports left; returns (exports, bytes) cleaned up.
    pub fn clean_up(dir: &Path) -> (u64, u64) {
        let (mut n, mut bytes) = (0, 0);
        let Ok(rd) = std::fs::read_dir(dir) else {
            return (0, 0);
        };
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(Self::PREFIX) && name.ends_with(Self::SUFFIX)) {
                continue;
            }
            if let Ok(target) = std::fs::read(f.path()) {
                use std::os::unix::ffi::OsStringExt;
                let target = PathBuf::from(std::ffi::OsString::from_vec(target));
                match fsutil::remove_partials(&target) {
                    Ok(b) => bytes += b,
                    Err(e) => {
                        tracing::warn!(target = %target.display(), error = %e, "cannot remove an interrupted export's temporary files");
                        continue;
                    }
                }
                n += 1;
            }
            let _ = std::fs::remove_file(f.path());
        }
        (n, bytes)
    }
}

impl Manifest {
    pub fn new(geometry: Geometry, base: Option<PathBuf>, chain: Vec<PathBuf>) -> Self {
        Self {
            format: FORMAT,
            geometry,
            base,
            base_identity: None,
            chain,
            layers: Vec::new(),
            clean: true,
        }
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST)
    }

    /// `Ok(None)` when the directory holds no disk yet.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("read {}", path.display())),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| BlockError::State {
            path: path.clone(),
            msg: format!("unreadable manifest: {e}"),
        })?;
        let bad = |msg: &str| BlockError::State {
            path: path.clone(),
            msg: msg.into(),
        };
        if m.format != FORMAT && m.format != 1 {
            return Err(bad(&format!("unsupported state format {}", m.format)));
        }
        Geometry::new(m.geometry.size, m.geometry.block_size).map_err(|e| bad(&e.to_string()))?;
        if m.format == 1 && m.layers.is_empty() {
            return Err(bad("no layers"));
        }
        if m.layers
            .iter()
            .any(|l| l.stem.contains('/') || l.stem.starts_with('.'))
        {
            return Err(bad("layer file stem is not a plain name"));
        }
        Ok(Some(m))
    }

    /// Writes the manifest (format 2: without layers) atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let mut m = self.clone();
        m.format = FORMAT;
        m.layers.clear();
        let bytes = serde_json::to_vec_pretty(&m).expect("manifest serialises");
        fsutil::write_atomic(&path, &bytes).ctx(|| format!("write {}", path.display()))
    }

    /// Converts a format-1 manifest: its layers get meta files (before the manifest stops
    /// listing them, so a crash in between loses nothing).
    pub fn upgrade(&mut self, dir: &Path) -> Result<()> {
        if self.format == 1 {
            for l in &self.layers {
                l.save(dir)?;
            }
            self.save(dir)?;
            self.format = FORMAT;
            self.layers.clear();
        }
        Ok(())
    }
}
