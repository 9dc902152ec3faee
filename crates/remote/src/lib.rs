//! Where a diff lives: a local path, or an object in object storage (`s3://`, `gs://`, `az://`,
//! through the `object_store` crate), behind one blocking API for commands that are not async.
//!
//! - Plain paths and `file://` URLs stay local and need no configuration.
//! - Credentials and endpoints come from the environment variables each store's SDK reads
//!   (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
//!   `AWS_ALLOW_HTTP`; `GOOGLE_SERVICE_ACCOUNT`; `AZURE_STORAGE_ACCOUNT_NAME`, ...).
//! - Uploads are multipart: an object appears only when the upload completes, so an
//!   interrupted one leaves nothing that could be taken for a diff.
//! - A remote diff is read through a local copy ([`local_copy`]), kept in a cache directory
//!   and named by URL and entity tag, so a chain is downloaded once.

use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::runtime::Runtime;
use url::Url;

#[cfg(feature = "test-server")]
pub mod test_server;

/// Multipart part size: above S3's 5 MiB minimum, small enough to show progress.
const PART: usize = 8 << 20;
/// Parts uploaded at once.
const PARTS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{0}: not a usable location: {1}")]
    BadUrl(String, String),
    #[error("{url}: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{url}: {got} bytes read, the object has {want}")]
    Short { url: String, got: u64, want: u64 },
    #[error("{0}: the object changed while it was copied")]
    Changed(String),
    #[error("async runtime: {0}")]
    Runtime(io::Error),
}

pub type Result<T> = std::result::Result<T, RemoteError>;

fn runtime() -> Result<&'static Runtime> {
    static RT: OnceLock<Runtime> = OnceLock::new();
    if let Some(rt) = RT.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vsnap-remote")
        .enable_all()
        .build()
        .map_err(RemoteError::Runtime)?;
    Ok(RT.get_or_init(|| rt))
}

/// Whether `s` names an object-storage location rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.contains("://") && !s.starts_with("file://")
}

/// A diff's location, as given on a command line or in an API request.
pub enum Location {
    Local(PathBuf),
    Object(Object),
}

impl Location {
    /// A plain path, a `file://` URL, or a storage URL whose store is configured from the
    /// environment.
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_with(s, std::env::vars())
    }

    /// [`Location::parse`] with the store configured from `env` (name, value) pairs instead of
    /// the process environment.
    pub fn parse_with<I, K, V>(s: &str, env: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        if !s.contains("://") {
            return Ok(Location::Local(PathBuf::from(s)));
        }
        let bad = |why: String| RemoteError::BadUrl(s.to_owned(), why);
        let url = Url::parse(s).map_err(|e| bad(e.to_string()))?;
        if url.scheme() == "file" {
            let path = url
                .to_file_path()
                .map_err(|()| bad("not an absolute local path".into()))?;
            return Ok(Location::Local(path));
        }
        Object::new(url, env).map(Location::Object)
    }

    pub fn display(&self) -> String {
        match self {
            Location::Local(p) => p.display().to_string(),
            Location::Object(o) => o.url.to_string(),
        }
    }
}

/// What a store says about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The object's name below the listed prefix (the whole path for `head`).
    pub name: String,
    pub size: u64,
    pub e_tag: Option<String>,
}

/// One object (or prefix) in a store.
#[derive(Clone)]
pub struct Object {
    url: Url,
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
}

impl Object {
    fn new<I, K, V>(url: Url, env: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let (store, path) = object_store::parse_url_opts(&url, env)
            .map_err(|e| RemoteError::BadUrl(url.to_string(), e.to_string()))?;
        Ok(Object {
            url,
            store: Arc::from(store),
            path,
        })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    fn store_err(&self, source: object_store::Error) -> RemoteError {
        RemoteError::Store {
            url: self.url.to_string(),
            source,
        }
    }

    /// The object `name` below this one, as a directory.
    pub fn child(&self, name: &str) -> Result<Object> {
        let mut url = self.url.clone();
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        let url = url
            .join(name)
            .map_err(|e| RemoteError::BadUrl(format!("{}{name}", self.url), e.to_string()))?;
        Ok(Object {
            path: self.path.clone().join(name),
            url,
            store: self.store.clone(),
        })
    }

    /// Uploads `src` as this object, calling `progress` with the bytes sent so far. Multipart:
    /// the object appears, whole, only when the last part is in; a failed upload is aborted.
    pub fn upload(&self, src: &Path, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let io_err = |source| RemoteError::Io {
            path: src.to_owned(),
            source,
        };
        let mut file = File::open(src).map_err(io_err)?;
        let rt = runtime()?;
        rt.block_on(async {
            let upload = self
                .store
                .put_multipart(&self.path)
                .await
                .map_err(|e| self.store_err(e))?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; PART];
            let mut sent = 0u64;
            let r: Result<()> = async {
                loop {
                    let n = read_full(&mut file, &mut buf).map_err(io_err)?;
                    if n == 0 {
                        return Ok(());
                    }
                    w.wait_for_capacity(PARTS_IN_FLIGHT)
                        .await
                        .map_err(|e| self.store_err(e))?;
                    w.write(&buf[..n]);
                    sent += n as u64;
                    progress(sent);
                }
            }
            .await;
            match r {
                Ok(()) => {
                    w.finish().await.map_err(|e| self.store_err(e))?;
                    Ok(sent)
                }
                Err(e) => {
                    if let Err(abort) = w.abort().await {
                        tracing::warn!(url = %self.url, error = %abort, "aborting an upload");
                    }
                    Err(e)
                }
            }
        })
    }

    /// Writes the object into `dst` (created, must not exist), calling `progress` with the
    /// bytes received so far; returns the object's metadata.
    pub fn download(&self, dst: &Path, progress: &mut dyn FnMut(u64)) -> Result<Meta> {
        let io_err = |source| RemoteError::Io {
            path: dst.to_owned(),
            source,
        };
        let mut out = File::options()
            .write(true)
            .create_new(true)
            .open(dst)
            .map_err(io_err)?;
        let rt = runtime()?;
        let meta = rt.block_on(async {
            let got = self
                .store
                .get(&self.path)
                .await
                .map_err(|e| self.store_err(e))?;
            let meta = Meta {
                name: got.meta.location.to_string(),
                size: got.meta.size,
                e_tag: got.meta.e_tag.clone(),
            };
            let mut stream = got.into_stream();
            let mut n = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.store_err(e))?;
                out.write_all(&chunk).map_err(io_err)?;
                n += chunk.len() as u64;
                progress(n);
            }
            if n != meta.size {
                return Err(RemoteError::Short {
                    url: self.url.to_string(),
                    got: n,
                    want: meta.size,
                });
            }
            Ok(meta)
        })?;
        out.sync_all().map_err(io_err)?;
        Ok(meta)
    }

    /// Bytes `range` of the object.
    pub fn read_range(&self, range: Range<u64>) -> Result<Vec<u8>> {
        let rt = runtime()?;
        let b = rt
            .block_on(self.store.get_range(&self.path, range))
            .map_err(|e| self.store_err(e))?;
        Ok(b.to_vec())
    }

    pub fn head(&self) -> Result<Meta> {
        let rt = runtime()?;
        let m = rt
            .block_on(self.store.head(&self.path))
            .map_err(|e| self.store_err(e))?;
        Ok(Meta {
            name: m.location.to_string(),
            size: m.size,
            e_tag: m.e_tag,
        })
    }

    /// The objects below this URL taken as a prefix (a "directory"), by name.
    pub fn list(&self) -> Result<Vec<Meta>> {
        let rt = runtime()?;
        let prefix = self.path.clone();
        let mut v = rt.block_on(async {
            let mut s = self.store.list(Some(&prefix));
            let mut v = Vec::new();
            while let Some(m) = s.next().await {
                let m = m.map_err(|e| self.store_err(e))?;
                let name = m
                    .location
                    .prefix_match(&prefix)
                    .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect::<Vec<_>>())
                    .map_or_else(|| m.location.to_string(), |p| p.join("/"));
                v.push(Meta {
                    name,
                    size: m.size,
                    e_tag: m.e_tag,
                });
            }
            Ok::<_, RemoteError>(v)
        })?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    pub fn delete(&self) -> Result<()> {
        let rt = runtime()?;
        rt.block_on(self.store.delete(&self.path))
            .map_err(|e| self.store_err(e))
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The diff at `loc` as a local file: the path itself, or a copy of the object kept in `cache`
/// under a name made of the URL and the object's entity tag (a changed object is fetched
/// again). The copy is made under a temporary name and renamed, so a cache entry is always
/// whole.
pub fn local_copy(loc: &Location, cache: &Path, progress: &mut dyn FnMut(u64)) -> Result<PathBuf> {
    let obj = match loc {
        Location::Local(p) => return Ok(p.clone()),
        Location::Object(o) => o,
    };
    let io_err = |path: &Path, source| RemoteError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(cache).map_err(|e| io_err(cache, e))?;
    let meta = obj.head()?;
    let tag = meta
        .e_tag
        .as_deref()
        .unwrap_or("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>();
    let url = obj.url.as_str();
    let leaf = url.rsplit('/').next().unwrap_or("object");
    let leaf: String = leaf
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!(
        "{:08x}-{}-{tag}-{leaf}",
        crc32c::crc32c(url.as_bytes()),
        meta.size
    );
    let path = cache.join(&name);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == meta.size) {
        return Ok(path);
    }
    let tmp = cache.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let r = obj.download(&tmp, progress).and_then(|got| {
        if got.e_tag != meta.e_tag {
            return Err(RemoteError::Changed(url.to_owned()));
        }
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map(|()| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_local_and_urls_are_parsed() {
        assert!(matches!(
            Location::parse("dir/gen-1.diff").unwrap(),
            Location::Local(p) if p == Path::new("dir/gen-1.diff")
        ));
        assert!(matches!(
            Location::parse("file:///var/lib/d.diff").unwrap(),
            Location::Local(p) if p == Path::new("/var/lib/d.diff")
        ));
        assert!(matches!(
            Location::parse("s3://bucket/a/b.diff").unwrap(),
            Location::Object(o) if o.path.as_ref() == "a/b.diff"
        ));
        assert!(Location::parse("nope://x/y").is_err());
        assert!(Location::parse("file://relative").is_err());
        assert!(is_url("gs://b/k") && !is_url("/a/b") && !is_url("file:///a"));
    }

    #[test]
    fn children_are_below_their_parent() {
        let Location::Object(o) = Location::parse("s3://bucket/vm1").unwrap() else {
            panic!()
        };
        let c = o.child("gen-2.diff").unwrap();
        assert_eq!(c.url().as_str(), "s3://bucket/vm1/gen-2.diff");
        assert_eq!(c.path.as_ref(), "vm1/gen-2.diff");
    }
}
