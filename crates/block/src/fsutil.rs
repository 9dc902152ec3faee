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
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
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
