//! One frame of the data section: a run of consecutive dirty blocks (in rank order), stored raw
//! or as one zstd frame, with CRC-32C of the stored and of the raw bytes. Both versions read
//! through it: a version-1 chunk is a raw frame whose two checksums are the chunk's one. A
//! version-2 reference entry is a frame too: its blocks are copies of parent-state blocks, and
//! what it stores is their checksums.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use super::DiffError;

/// How a frame's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The raw bytes themselves.
    Stored,
    /// One or more zstd frames that decompress to exactly the raw bytes.
    Zstd,
}

impl Codec {
    /// The codec byte of a version-2 index entry.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Codec::Stored),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            Codec::Stored => 0,
            Codec::Zstd => 1,
        }
    }
}

/// Where a frame lies in the raw data stream and in the file, and its checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Offset of the frame's first byte in the raw data (dirty rank × block size).
    pub raw_offset: u64,
    pub raw_len: u32,
    /// Offset of the stored bytes in the file.
    pub stored_offset: u64,
    pub stored_len: u32,
    pub codec: Codec,
    pub stored_crc: u32,
    pub raw_crc: u32,
    /// A reference entry: the first of the parent-state blocks (the disk exactly as it is below
    /// the diff) that this entry's blocks are copies of, in order. Its stored bytes are the
    /// CRC-32C of each block (4 bytes, little-endian), its raw checksum theirs combined.
    /// `None`: the blocks' bytes are stored here.
    pub reference: Option<u64>,
}

impl Frame {
    pub fn raw_end(&self) -> u64 {
        self.raw_offset + u64::from(self.raw_len)
    }
}

/// The CRC-32C of the concatenation of blocks of `block_size` bytes whose own CRC-32C are
/// `crcs`, in order (what a reference entry's raw checksum is).
pub fn combine_crcs(crcs: impl IntoIterator<Item = u32>, block_size: u64) -> u32 {
    let mut it = crcs.into_iter();
    let Some(first) = it.next() else {
        return crc32c::crc32c(&[]);
    };
    it.fold(first, |acc, c| {
        crc32c::crc32c_combine(acc, c, block_size as usize)
    })
}

/// What a writer does to each frame's raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Frames are stored raw.
    None,
    /// Each frame is compressed with zstd at this level (kept raw when that does not shrink it).
    Zstd(i32),
}

impl Compression {
    /// What exports use unless told otherwise.
    pub const DEFAULT: Compression = Compression::Zstd(3);
}

impl Default for Compression {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// `none`, `zstd` (level 3) or `zstd:LEVEL` (1 ..= 22, or a negative fast level).
impl FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let level = match s.split_once(':') {
            None if s == "none" => return Ok(Compression::None),
            None if s == "zstd" => 3,
            Some(("zstd", l)) => l
                .parse::<i32>()
                .map_err(|_| format!("zstd level {l:?} is not a number"))?,
            _ => {
                return Err(format!(
                    "unknown compression {s:?} (none, zstd or zstd:LEVEL)"
                ))
            }
        };
        let range = zstd::compression_level_range();
        if level == 0 || !range.contains(&level) {
            return Err(format!(
                "zstd level {level} outside {}..={} (0 excluded)",
                range.start(),
                range.end()
            ));
        }
        Ok(Compression::Zstd(level))
    }
}

impl serde::Serialize for Compression {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Compresses frames for a writer: the stored bytes and their codec.
pub(crate) struct FrameEncoder {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
}

impl FrameEncoder {
    pub fn new(c: Compression, max_frame: usize) -> Result<Self, DiffError> {
        let zstd = match c {
            Compression::None => None,
            Compression::Zstd(level) => {
                let mut z = zstd::bulk::Compressor::new(level).map_err(zstd_err)?;
                // The frame index carries CRC-32C of the raw bytes: zstd's own checksum and
                // the content size would only repeat it.
                z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))
                    .map_err(zstd_err)?;
                Some(z)
            }
        };
        let out = match zstd {
            Some(_) => vec![0u8; zstd::zstd_safe::compress_bound(max_frame)],
            None => Vec::new(),
        };
        Ok(Self { zstd, out })
    }

    /// Compresses `raw` into the encoder's buffer and returns the compressed length, or `None`
    /// when the frame is to be stored raw (no compression, or zstd does not make it smaller).
    pub fn compress(&mut self, raw: &[u8]) -> Result<Option<usize>, DiffError> {
        let Some(z) = self.zstd.as_mut() else {
            return Ok(None);
        };
        let n = z
            .compress_to_buffer(raw, &mut self.out[..])
            .map_err(zstd_err)?;
        Ok((n < raw.len()).then_some(n))
    }

    /// The first `n` bytes [`FrameEncoder::compress`] produced.
    pub fn output(&self, n: usize) -> &[u8] {
        &self.out[..n]
    }
}

fn zstd_err(e: std::io::Error) -> DiffError {
    DiffError::Io {
        context: "zstd compressor".into(),
        source: e,
    }
}

/// zstd's magic number, which starts every zstd frame (skippable frames are not accepted).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The largest window a frame may ask for: no frame holds more than `MAX_FRAME_SIZE` bytes.
const ZSTD_WINDOW_LOG_MAX: u32 = 26;

thread_local! {
    /// A decompression context per thread (readers decode on the vhost worker threads).
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Checks `stored` against the frame's checksums and returns its raw bytes: `stored` itself for
/// a raw frame, else decompressed into `scratch` (at least `f.raw_len` long). `index` names the
/// frame in errors.
pub(crate) fn decode_frame<'a>(
    index: usize,
    f: &Frame,
    stored: &'a [u8],
    scratch: &'a mut [u8],
) -> Result<&'a [u8], DiffError> {
    let bad = |problem| DiffError::Frame {
        frame: index,
        raw_offset: f.raw_offset,
        problem,
    };
    debug_assert_eq!(stored.len(), f.stored_len as usize);
    if crc32c::crc32c(stored) != f.stored_crc {
        return Err(bad(FrameProblem::StoredChecksum));
    }
    // A raw frame's two checksums are one (the index reader checks they are equal).
    if f.codec == Codec::Stored {
        return Ok(stored);
    }
    if stored.len() < 4 || stored[..4] != ZSTD_MAGIC {
        return Err(bad(FrameProblem::Decompress("not a zstd frame".into())));
    }
    // The writer declares every frame's size: a frame that disagrees with the index is refused
    // before any work, and the output buffer bounds what it could produce.
    let declared = zstd::zstd_safe::get_frame_content_size(stored)
        .map_err(|_| bad(FrameProblem::Decompress("bad zstd frame header".into())))?
        .ok_or_else(|| {
            bad(FrameProblem::Decompress(
                "the zstd frame does not declare its size".into(),
            ))
        })?;
    if declared != u64::from(f.raw_len) {
        return Err(bad(FrameProblem::Size {
            expected: u64::from(f.raw_len),
            found: declared,
        }));
    }
    if zstd::zstd_safe::find_frame_compressed_size(stored).ok() != Some(stored.len()) {
        return Err(bad(FrameProblem::Decompress(
            "not exactly one zstd frame".into(),
        )));
    }
    let raw = &mut scratch[..f.raw_len as usize];
    let n = DCTX
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                let mut z = zstd::bulk::Decompressor::new()?;
                z.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))?;
                *d = Some(z);
            }
            d.as_mut()
                .expect("set above")
                .decompress_to_buffer(stored, &mut *raw)
        })
        .map_err(|e| bad(FrameProblem::Decompress(e.to_string())))?;
    if n != raw.len() {
        return Err(bad(FrameProblem::Size {
            expected: u64::from(f.raw_len),
            found: n as u64,
        }));
    }
    if crc32c::crc32c(raw) != f.raw_crc {
        return Err(bad(FrameProblem::RawChecksum));
    }
    Ok(raw)
}

/// What is wrong with one frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameProblem {
    #[error("checksum mismatch in the data (stored bytes)")]
    StoredChecksum,
    #[error("checksum mismatch in the data (decompressed bytes)")]
    RawChecksum,
    #[error("decompresses to {found} bytes, the index says {expected}")]
    Size { expected: u64, found: u64 },
    #[error("does not decompress: {0}")]
    Decompress(String),
    #[error("its block checksums do not combine to its raw checksum")]
    BlockChecksums,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(raw: &[u8], c: Compression) -> (Frame, Vec<u8>) {
        let mut e = FrameEncoder::new(c, raw.len()).unwrap();
        let (codec, stored) = match e.compress(raw).unwrap() {
            Some(n) => (Codec::Zstd, e.output(n)),
            None => (Codec::Stored, raw),
        };
        let f = Frame {
            raw_offset: 0,
            raw_len: raw.len() as u32,
            stored_offset: 0,
            stored_len: stored.len() as u32,
            codec,
            stored_crc: crc32c::crc32c(stored),
            raw_crc: crc32c::crc32c(raw),
            reference: None,
        };
        (f, stored.to_vec())
    }

    fn text(n: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog\n"
            .iter()
            .cycle()
            .take(n)
            .copied()
            .collect()
    }

    #[test]
    fn compression_parses_and_prints() {
        for (s, c) in [
            ("none", Compression::None),
            ("zstd", Compression::Zstd(3)),
            ("zstd:1", Compression::Zstd(1)),
            ("zstd:19", Compression::Zstd(19)),
            ("zstd:-5", Compression::Zstd(-5)),
        ] {
            assert_eq!(s.parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
        }
        for bad in [
            "", "gzip", "zstd:", "zstd:x", "zstd:0", "zstd:23", "none:1", "zstd:3:1",
        ] {
            assert!(bad.parse::<Compression>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(Compression::default().to_string(), "zstd:3");
    }

    #[test]
    fn frames_round_trip_and_incompressible_ones_stay_raw() {
        let t = text(256 << 10);
        let (f, stored) = frame_of(&t, Compression::Zstd(3));
        assert_eq!(f.codec, Codec::Zstd);
        assert!(stored.len() < t.len() / 10);
        let mut raw = vec![0u8; t.len()];
        assert_eq!(decode_frame(0, &f, &stored, &mut raw).unwrap(), t);

        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (f, stored) = frame_of(&noise, Compression::Zstd(3));
        assert_eq!((f.codec, &stored), (Codec::Stored, &noise));
        let (f, _) = frame_of(&t, Compression::None);
        assert_eq!(f.codec, Codec::Stored);
    }

    #[test]
    fn damaged_frames_are_refused_by_kind() {
        let t = text(64 << 10);
        let (f, stored) = frame_of(&t, Compression::Zstd(1));
        let mut raw = vec![0u8; t.len()];
        let problem = |f: &Frame, s: &[u8], raw: &mut [u8]| match decode_frame(7, f, s, raw) {
            Ok(_) => panic!("damage accepted"),
            Err(DiffError::Frame {
                frame: 7, problem, ..
            }) => problem,
            Err(e) => panic!("expected a frame error, got {e:?}"),
        };
        // A flipped stored byte: caught before the decompressor sees it.
        let mut s = stored.clone();
        let mid = s.len() / 2;
        s[mid] ^= 1;
        assert_eq!(problem(&f, &s, &mut raw), FrameProblem::StoredChecksum);
        // The index claims fewer or more raw bytes than the frame holds.
        let short = Frame {
            raw_len: f.raw_len - 512,
            ..f
        };
        let p = problem(&short, &stored, &mut raw[..short.raw_len as usize]);
        assert_eq!(
            p,
            FrameProblem::Size {
                expected: u64::from(short.raw_len),
                found: u64::from(f.raw_len)
            }
        );
        let long = Frame {
            raw_len: f.raw_len + 512,
            ..f
        };
        let mut big = vec![0u8; long.raw_len as usize];
        let p = problem(&long, &stored, &mut big);
        assert_eq!(
            p,
            FrameProblem::Size {
                expected: u64::from(long.raw_len),
                found: u64::from(f.raw_len)
            }
        );
        // The right size but other bytes than were checksummed.
        let wrong = Frame {
            raw_crc: f.raw_crc ^ 1,
            ..f
        };
        assert_eq!(
            problem(&wrong, &stored, &mut raw),
            FrameProblem::RawChecksum
        );
        // Garbage with a matching checksum is not a zstd frame.
        let junk = vec![7u8; 100];
        let j = Frame {
            stored_len: 100,
            stored_crc: crc32c::crc32c(&junk),
            ..f
        };
        assert!(matches!(
            problem(&j, &junk, &mut raw),
            FrameProblem::Decompress(_)
        ));
    }

    #[test]
    fn block_checksums_combine_to_the_checksum_of_their_concatenation() {
        let t = text(5 * 512);
        let crcs = t.chunks(512).map(crc32c::crc32c);
        assert_eq!(combine_crcs(crcs, 512), crc32c::crc32c(&t));
        assert_eq!(combine_crcs([], 512), crc32c::crc32c(&[]));
    }
}
