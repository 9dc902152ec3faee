//! Thin wrappers over the file system calls the layers need.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Deallocates `[offset, offset + len)`; the range reads back as zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Punches a hole, or writes zeros where the file system cannot punch.
pub fn punch_or_zero(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match punch_hole(file, offset, len) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(file, offset, len),
        r => r,
    }
}

pub fn write_zeros(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
pub fn read_at_or_zero(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies the allocated extents of `src[0, len)` to the same offsets of `dst` (holes stay
/// holes), with `copy_file_range`, which reflinks where the file system can.
pub fn copy_data_extents(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(src, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= len {
            break;
        }
        let hole = seek(src, data, libc::SEEK_HOLE)?.min(len);
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

/// The first extent of data of `file` at or after `from`, as `[start, end)` clipped to `len`;
/// `None` when only holes remain. File systems without `SEEK_DATA` report all of it as data.
pub fn next_data(file: &File, from: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if from >= len {
        return Ok(None);
    }
    let data = match seek(file, from, libc::SEEK_DATA) {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((from, len))),
        Err(e) => return Err(e),
    };
    if data >= len {
        return Ok(None);
    }
    Ok(Some((data, seek(file, data, libc::SEEK_HOLE)?.min(len))))
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Copies `[off, off + len)` of `src` to the same offset of `dst`.
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let (mut i, mut o) = (off as libc::loff_t, off as libc::loff_t);
    let end = off + len;
    while (i as u64) < end {
        let n = (end - i as u64).min(1 << 30) as usize;
        // SAFETY: valid fds and offsets owned by this frame.
        let r = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut i, dst.as_raw_fd(), &mut o, n, 0)
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    return copy_range_slow(src, dst, i as u64, end - i as u64);
                }
                _ => return Err(e),
            }
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source ended early",
            ));
        }
    }
    Ok(())
}

fn copy_range_slow(src: &File, dst: &File, mut off: u64, len: u64) -> io::Result<()> {
    let end = off + len;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    while off < end {
        let n = (end - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Bytes the file system has allocated for the file.
pub fn allocated_bytes(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.blocks() * 512)
}

pub fn fdatasync(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// A file that appears at `path` only when `commit` runs: written under a temporary name in the
/// same directory, fsynced, renamed, directory fsynced. Dropped without commit, it is removed,
/// so an error or a cancel never leaves a half-written file at `path`.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
}

impl AtomicFile {
    /// Fails if `path` exists, unless `overwrite`.
    pub fn create(path: &Path, overwrite: bool) -> io::Result<Self> {
        if !overwrite && fs::symlink_metadata(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        let dir = parent_dir(path);
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let tmp = dir.join(format!(
            "{}{}-{}",
            partial_prefix(&name.to_string_lossy()),
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        Ok(Self {
            file: Some(file),
            tmp,
            path: path.to_owned(),
        })
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The slow half of a two-step commit: makes the content durable under the temporary name.
    pub fn sync(&self) -> io::Result<()> {
        self.file().sync_all()
    }

    /// The fast half: one rename puts the (synced) file in place. Its directory is not synced:
    /// call [`sync_parent`] after, outside whatever pause needed the rename short.
    pub fn install(mut self) -> io::Result<()> {
        drop(self.file.take());
        fs::rename(&self.tmp, &self.path).inspect_err(|_| {
            let _ = fs::remove_file(&self.tmp);
        })
    }

    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("file present until commit");
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.path)?;
        File::open(parent_dir(&self.path))?.sync_all()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Makes a rename or creation in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

/// Writes `bytes` to `path` atomically (see [`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let f = AtomicFile::create(path, true)?;
    f.file().write_all_at(bytes, 0)?;
    f.commit()
}

impl Write for &AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut f = self.file();
        f.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The name prefix of [`AtomicFile`]'s temporary files for a target named `name`: hidden, next
/// to the target, and saying what it is, so a person (or a restarted daemon) can tell a
/// half-written export from anything else.
fn partial_prefix(name: &str) -> String {
    format!(".{name}.vsnap-partial-")
}

/// Removes the temporary files an interrupted [`AtomicFile`] for `target` left next to it (and
/// only those). Returns how many bytes they held.
pub fn remove_partials(target: &Path) -> io::Result<u64> {
    let Some(name) = target.file_name() else {
        return Ok(0);
    };
    let prefix = partial_prefix(&name.to_string_lossy());
    let mut freed = 0;
    let rd = match fs::read_dir(parent_dir(target)) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for f in rd.flatten() {
        if !f.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        // symlink_metadata: a symlink with a matching name is removed, never followed.
        let len = fs::symlink_metadata(f.path()).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(f.path()) {
            Ok(()) => freed += len,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(freed)
}

/// Takes an advisory lock on `file` without waiting: exclusive, or shared. `Ok(false)` when
/// another open file description holds a conflicting one. The lock lives as long as the file
/// description (every fd duplicated from it), and dies with the process.
pub fn try_flock(file: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Reserves `[offset, offset + len)` of `file` (allocates without changing what reads back), so
/// later writes there cannot fail for want of space. File systems without fallocate are left as
/// they are.
pub fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        e => Err(e),
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let f = AtomicFile::create(&p, false).unwrap();
        f.file().write_all_at(b"abc", 0).unwrap();
        drop(f);
        assert!(!p.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "temp removed");
        let f = AtomicFile::create(&p, false).unwrap();
        f.file().write_all_at(b"abc", 0).unwrap();
        f.commit().unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert!(AtomicFile::create(&p, false).is_err());
        assert!(AtomicFile::create(&p, true).is_ok());
    }

    #[test]
    fn interrupted_atomic_files_are_found_and_only_they() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g1.diff");
        let f = AtomicFile::create(&p, false).unwrap();
        f.file().write_all_at(b"half", 0).unwrap();
        let name = f
            .temp_path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.contains("vsnap-partial"), "{name}");
        std::mem::forget(f); // as a kill would leave it
        fs::write(dir.path().join("g1.diff.keep"), b"x").unwrap();
        fs::write(dir.path().join(".g2.diff.vsnap-partial-1-2"), b"x").unwrap();
        assert_eq!(remove_partials(&p).unwrap(), 4);
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".g2.diff.vsnap-partial-1-2", "g1.diff.keep"]);
    }

    #[test]
    fn flock_conflicts_between_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = File::create(&p).unwrap();
        let b = File::open(&p).unwrap();
        assert!(try_flock(&a, true).unwrap());
        assert!(!try_flock(&b, false).unwrap());
        drop(a);
        assert!(try_flock(&b, false).unwrap());
        let c = File::open(&p).unwrap();
        assert!(try_flock(&c, false).unwrap(), "shared locks coexist");
        assert!(!try_flock(&File::open(&p).unwrap(), true).unwrap());
    }

    #[test]
    fn punch_frees_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all_at(&vec![7u8; 1 << 20], 0).unwrap();
        f.sync_all().unwrap();
        let before = allocated_bytes(&f).unwrap();
        punch_or_zero(&f, 0, 1 << 19).unwrap();
        let mut b = vec![1u8; 1 << 19];
        read_at_or_zero(&f, &mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(allocated_bytes(&f).unwrap() < before);
        let mut tail = [9u8; 16];
        read_at_or_zero(&f, &mut tail, (1 << 20) - 8).unwrap();
        assert_eq!(tail, [7, 7, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
}
