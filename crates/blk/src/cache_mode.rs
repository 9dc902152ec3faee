//! The write-cache mode the guest chose (`CONFIG_WCE`), kept in a file so that a restarted
//! daemon serves the guest in the mode it set: a reconnecting VMM does not set it again, and a
//! guest that chose write-through but is served write-back can lose writes it believes durable.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const WRITE_BACK: &str = "write-back\n";
const WRITE_THROUGH: &str = "write-through\n";

#[derive(Clone, Debug)]
pub struct CacheModeFile {
    path: PathBuf,
}

impl CacheModeFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CacheModeFile { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved mode: `Some(true)` write-back, `Some(false)` write-through, `None` if the
    /// guest never chose.
    pub fn load(&self) -> io::Result<Option<bool>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) if s == WRITE_BACK => Ok(Some(true)),
            Ok(s) if s == WRITE_THROUGH => Ok(Some(false)),
            Ok(s) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: unknown cache mode {s:?}", self.path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Saves the mode durably before returning: a new file, synced, renamed over the old one,
    /// and the directory synced.
    pub fn store(&self, writeback: bool) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp)?;
        f.write_all(if writeback { WRITE_BACK } else { WRITE_THROUGH }.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_garbage() {
        let d = tempfile::tempdir().unwrap();
        let f = CacheModeFile::new(d.path().join("cache-mode"));
        assert_eq!(f.load().unwrap(), None);
        f.store(false).unwrap();
        assert_eq!(f.load().unwrap(), Some(false));
        f.store(true).unwrap();
        assert_eq!(f.load().unwrap(), Some(true));
        assert!(!d.path().join("cache-mode.tmp").exists());
        std::fs::write(f.path(), "maybe\n").unwrap();
        assert_eq!(f.load().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
