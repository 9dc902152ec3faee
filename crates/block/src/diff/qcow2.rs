//! Export a diff as a qcow2 (version 3) overlay over its parent: dirty blocks become allocated
//! data clusters, zero blocks zero clusters (reads as zero, nothing allocated), untouched blocks
//! unallocated (read from the backing file). The cluster size is the diff's block size, so every
//! block maps to exactly one cluster. A qcow2 cluster cannot point into the backing file, so a
//! diff's references are resolved: their bytes are read from a raw image of the diff's parent
//! (the backing file itself when it is raw) and written as data.
//!
//! Layout, computed up front so the file is written front to back:
//! header (+ extensions, backing name) | L1 | refcount table | refcount blocks | L2s | data.
//! Every cluster is referenced exactly once, so every refcount is 1.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use roaring::RoaringBitmap;

use super::{ChainRoot, DiffError, DiffFile, DiffIo, ImageParent, RefProblem};
use crate::fsutil::AtomicFile;
use crate::job::Job;
use crate::tracker::runs;

const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_ZERO: u64 = 1;
const HEADER_LEN: u64 = 104;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts

/// What the backing file is, as qemu must be told.
pub fn probe_format(path: &Path) -> Result<(&'static str, u64), DiffError> {
    let mut f = File::open(path).dctx(|| format!("open {}", path.display()))?;
    let mut h = [0u8; 32];
    let n = f.read(&mut h).dctx(|| format!("read {}", path.display()))?;
    if n >= 32 && &h[..4] == QCOW_MAGIC {
        return Ok((
            "qcow2",
            u64::from_be_bytes(h[24..32].try_into().expect("8 bytes")),
        ));
    }
    let len = f
        .seek(SeekFrom::End(0))
        .dctx(|| format!("stat {}", path.display()))?;
    Ok(("raw", len))
}

/// Writes `diff` as a qcow2 overlay over `backing` to `out`. The diff must lie on the base image
/// (parent nil), which `backing` is taken to be; see [`to_qcow2_over`].
pub fn to_qcow2(
    diff: &Path,
    backing: &Path,
    out: &Path,
    overwrite: bool,
    job: &Job,
) -> Result<(), DiffError> {
    to_qcow2_over(diff, backing, ChainRoot::Base, out, overwrite, job)
}

/// [`to_qcow2`] with the diff's parent checked as `root` says: [`ChainRoot::Foreign`] when
/// `backing` holds the diff's parent (an overlay or image of it) rather than the base.
pub fn to_qcow2_over(
    diff: &Path,
    backing: &Path,
    root: ChainRoot,
    out: &Path,
    overwrite: bool,
    job: &Job,
) -> Result<(), DiffError> {
    to_qcow2_with(diff, backing, None, root, out, overwrite, job)
}

/// [`to_qcow2_over`], the diff's references read from `parent`, a raw image of the diff's
/// parent state (by default `backing`, which then must be raw: a diff with references over a
/// qcow2 backing file is refused without one).
pub fn to_qcow2_with(
    diff: &Path,
    backing: &Path,
    parent: Option<&Path>,
    root: ChainRoot,
    out: &Path,
    overwrite: bool,
    job: &Job,
) -> Result<(), DiffError> {
    let d = DiffFile::open(diff)?;
    super::check_root(std::slice::from_ref(&d), root)?;
    let g = d.geometry();
    let (fmt, backing_size) = probe_format(backing)?;
    if backing_size != g.size {
        return Err(DiffError::Mismatch {
            what: "backing image size",
            expected: format!("{} (the diff's device size)", g.size),
            found: format!("{backing_size} in {}", backing.display()),
        });
    }
    // Where references are read: checked before anything is written.
    let parent = match (parent, fmt) {
        (Some(p), _) => Some(p),
        (None, "raw") => Some(backing),
        (None, _) => None,
    };
    let first_reference = d.frames().iter().enumerate().find_map(|(i, f)| {
        let first = f.reference?;
        Some((i, first, first + u64::from(f.raw_len) / g.bs()))
    });
    let parent_file = match (parent, first_reference) {
        (_, None) => None,
        (Some(p), Some(_)) => {
            let (pfmt, psize) = probe_format(p)?;
            if pfmt != "raw" || psize != g.size {
                return Err(DiffError::Mismatch {
                    what: "parent image",
                    expected: format!("a raw image of {} bytes", g.size),
                    found: format!("{pfmt}, {psize} bytes: {}", p.display()),
                });
            }
            Some((File::open(p).dctx(|| format!("open {}", p.display()))?, p))
        }
        (None, Some((frame, first, end))) => {
            return Err(DiffError::Reference {
                frame,
                first,
                end,
                problem: RefProblem::NoParent(format!(
                    "{} stores blocks as copies of its parent, and the backing file {} is {fmt}: give a raw image of the parent to read them from",
                    diff.display(),
                    backing.display()
                )),
            })
        }
    };
    let backing_name = std::fs::canonicalize(backing)
        .dctx(|| format!("resolve {}", backing.display()))?
        .to_string_lossy()
        .into_owned();
    if backing_name.len() > 1023 {
        return Err(DiffError::Corrupt(
            "backing file path longer than qcow2's 1023 bytes".into(),
        ));
    }

    let cluster = g.bs();
    let cluster_bits = g.block_size.trailing_zeros();
    let l2_entries = cluster / 8;
    let (dirty, zero) = (d.tracker().dirty(), d.tracker().zero());
    let l2_tables = l2_indices(dirty, zero, l2_entries);
    let l1_size = g.blocks().div_ceil(l2_entries);

    // Header cluster(s): fixed header, backing-format extension, end extension, backing name.
    let fmt_ext_len = (fmt.len() as u64).div_ceil(8) * 8;
    let backing_off = HEADER_LEN + 8 + fmt_ext_len + 8;
    let header_clusters = (backing_off + backing_name.len() as u64).div_ceil(cluster);
    let l1_clusters = (l1_size * 8).div_ceil(cluster).max(1);
    let fixed = header_clusters + l1_clusters + l2_tables.len() as u64 + dirty.len();
    // Refcount blocks cover themselves and the table: iterate to the fixed point.
    let per_rb = cluster * 8 / (1 << REFCOUNT_ORDER);
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = fixed + rt_clusters + rb_count;
        let rb = total.div_ceil(per_rb);
        let rt = (rb * 8).div_ceil(cluster);
        if rb == rb_count && rt == rt_clusters {
            break;
        }
        (rb_count, rt_clusters) = (rb, rt);
    }
    let total_clusters = fixed + rt_clusters + rb_count;
    let l1_off = header_clusters * cluster;
    let rt_off = l1_off + l1_clusters * cluster;
    let rb_off = rt_off + rt_clusters * cluster;
    let l2_off = rb_off + rb_count * cluster;
    let data_off = l2_off + l2_tables.len() as u64 * cluster;

    let dst = AtomicFile::create(out, overwrite).dctx(|| format!("create {}", out.display()))?;
    let ctx = || format!("write {}", out.display());
    let mut w = BufWriter::with_capacity(1 << 20, dst.file());

    // Header.
    let mut h = vec![0u8; (header_clusters * cluster) as usize];
    h[0..4].copy_from_slice(QCOW_MAGIC);
    put32(&mut h, 4, 3);
    put64(&mut h, 8, backing_off);
    put32(&mut h, 16, backing_name.len() as u32);
    put32(&mut h, 20, cluster_bits);
    put64(&mut h, 24, g.size);
    put32(&mut h, 36, l1_size as u32);
    put64(&mut h, 40, l1_off);
    put64(&mut h, 48, rt_off);
    put32(&mut h, 56, rt_clusters as u32);
    put32(&mut h, 96, REFCOUNT_ORDER);
    put32(&mut h, 100, HEADER_LEN as u32);
    let e = HEADER_LEN as usize;
    put32(&mut h, e, EXT_BACKING_FORMAT);
    put32(&mut h, e + 4, fmt.len() as u32);
    h[e + 8..e + 8 + fmt.len()].copy_from_slice(fmt.as_bytes());
    // The end-of-extensions marker (type 0, length 0) is already zero.
    h[backing_off as usize..backing_off as usize + backing_name.len()]
        .copy_from_slice(backing_name.as_bytes());
    w.write_all(&h).dctx(ctx)?;

    // L1: one entry per L2 table present.
    let mut l1 = vec![0u8; (l1_clusters * cluster) as usize];
    for (i, &t) in l2_tables.iter().enumerate() {
        put64(
            &mut l1,
            t as usize * 8,
            (l2_off + i as u64 * cluster) | OFLAG_COPIED,
        );
    }
    w.write_all(&l1).dctx(ctx)?;

    // Refcount table and blocks: clusters [0, total) have refcount 1.
    let mut rt = vec![0u8; (rt_clusters * cluster) as usize];
    for i in 0..rb_count {
        put64(&mut rt, i as usize * 8, rb_off + i * cluster);
    }
    w.write_all(&rt).dctx(ctx)?;
    let mut rb = vec![0u8; cluster as usize];
    for i in 0..rb_count {
        rb.fill(0);
        let first = i * per_rb;
        for c in first..(first + per_rb).min(total_clusters) {
            let o = ((c - first) * 2) as usize;
            rb[o..o + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        w.write_all(&rb).dctx(ctx)?;
    }

    // L2 tables: data clusters are numbered in ascending block order, as the diff packs them.
    let mut next_data = 0u64;
    let mut l2 = vec![0u8; cluster as usize];
    for &t in &l2_tables {
        l2.fill(0);
        let (lo, hi) = (t * l2_entries, ((t + 1) * l2_entries).min(1 << 32));
        for b in dirty.range(lo as u32..=(hi - 1) as u32) {
            let e = (u64::from(b) - lo) as usize * 8;
            put64(&mut l2, e, (data_off + next_data * cluster) | OFLAG_COPIED);
            next_data += 1;
        }
        for b in zero.range(lo as u32..=(hi - 1) as u32) {
            put64(&mut l2, (u64::from(b) - lo) as usize * 8, OFLAG_ZERO);
        }
        w.write_all(&l2).dctx(ctx)?;
    }

    // Data, streamed (and checksum-verified) from the diff; the last block is zero-padded.
    job.set_total(d.header.data_len());
    let pad = vec![0u8; cluster as usize];
    let mut write = |_: u64, bytes: &[u8]| {
        w.write_all(bytes).dctx(ctx)?;
        let tail = bytes.len() as u64 % cluster;
        if tail != 0 {
            w.write_all(&pad[..(cluster - tail) as usize]).dctx(ctx)?;
        }
        Ok(())
    };
    match &parent_file {
        Some((f, p)) => d.for_each_dirty_run_in(job, &ImageParent::new(f, p), &mut write)?,
        None => d.for_each_dirty_run(job, &mut write)?,
    }
    w.flush().dctx(ctx)?;
    drop(w);
    dst.file().set_len(total_clusters * cluster).dctx(ctx)?;
    dst.commit().dctx(ctx)
}

/// Indices of the L2 tables that hold at least one dirty or zero block, ascending.
fn l2_indices(dirty: &RoaringBitmap, zero: &RoaringBitmap, per_table: u64) -> Vec<u64> {
    let mut v: Vec<u64> = Vec::new();
    for bm in [dirty, zero] {
        for (s, e) in runs(bm) {
            let (first, last) = (u64::from(s) / per_table, (e - 1) / per_table);
            for t in first..=last {
                v.push(t);
            }
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}
