//! A virtio-blk request parsed apart from its execution: the typed [`Request`] the device runs,
//! built from the 16-byte request header, the lengths of the chain's data and, for DISCARD and
//! WRITE_ZEROES, the segment payload. Pure (no guest memory, no disk): every check a request
//! must pass before a byte moves lives here, so it is unit-tested and fuzzed on its own.
//! Constants come from `virtio-bindings` (virtio 1.3 §5.2.6).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_BARRIER, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use crate::config::Limits;

pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// The GET_ID reply: a serial of up to 20 bytes, NUL-padded.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// `struct virtio_blk_outhdr`: type, ioprio, sector.
pub const HEADER_LEN: u64 = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
pub const SEGMENT_LEN: u64 = 16;
/// The legacy name of FLUSH (`VIRTIO_BLK_T_FLUSH_OUT`), which Linux's headers no longer carry.
const T_FLUSH_OUT: u32 = 5;
const SECTOR: u64 = 512;

/// What the device knows when it parses: its size, whether it is read-only, and the limits it
/// advertised in the config space.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub capacity: u64,
    pub readonly: bool,
    pub limits: Limits,
}

/// Why a request is answered without being executed: the status byte and a short label for
/// the once-per-kind log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: u8,
    pub why: &'static str,
}

fn ioerr<T>(why: &'static str) -> Result<T, Refused> {
    Err(Refused {
        status: S_IOERR,
        why,
    })
}

fn unsupp<T>(why: &'static str) -> Result<T, Refused> {
    Err(Refused {
        status: S_UNSUPP,
        why,
    })
}

/// The request header: its type (the legacy barrier flag masked off, as QEMU does) and sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub sector: u64,
}

impl Header {
    pub fn parse(b: &[u8; HEADER_LEN as usize]) -> Self {
        Header {
            kind: u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & !VIRTIO_BLK_T_BARRIER,
            sector: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// A request the device will execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at byte `offset` into the device-writable data.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the `len` device-readable bytes after the header at byte `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    GetId,
    /// DISCARD or WRITE_ZEROES: `count` segments follow the header; see [`segments`].
    Ranges {
        discard: bool,
        count: u64,
    },
}

impl Request {
    /// Whether the request changes the disk (refused on a read-only one; made durable before
    /// completion in write-through mode).
    pub fn writes(&self) -> bool {
        matches!(self, Request::Write { .. } | Request::Ranges { .. })
    }
}

/// The byte range of `len` bytes at `sector`, refused unless whole sectors inside the disk. A
/// zero-length transfer past the end is refused too, as QEMU does.
fn range(dev: &Device, sector: u64, len: u64) -> Result<u64, Refused> {
    if !len.is_multiple_of(SECTOR) {
        return ioerr("data length not a multiple of 512");
    }
    let Some(offset) = sector.checked_mul(SECTOR) else {
        return ioerr("request past capacity");
    };
    match offset.checked_add(len) {
        Some(end) if end <= dev.capacity => Ok(offset),
        _ => ioerr("request past capacity"),
    }
}

/// Parses a request from its header, the device-readable bytes after the header (`out_len`)
/// and the device-writable bytes before the status byte (`in_len`).
pub fn parse(dev: &Device, h: Header, out_len: u64, in_len: u64) -> Result<Request, Refused> {
    let req = match h.kind {
        VIRTIO_BLK_T_IN => Request::Read {
            offset: range(dev, h.sector, in_len)?,
            len: in_len,
        },
        VIRTIO_BLK_T_OUT => Request::Write {
            offset: range(dev, h.sector, out_len)?,
            len: out_len,
        },
        VIRTIO_BLK_T_FLUSH | T_FLUSH_OUT => Request::Flush,
        VIRTIO_BLK_T_GET_ID if in_len < ID_LEN as u64 => {
            return ioerr("GET_ID buffer shorter than 20 bytes")
        }
        VIRTIO_BLK_T_GET_ID => Request::GetId,
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = h.kind == VIRTIO_BLK_T_DISCARD;
            if out_len == 0 || !out_len.is_multiple_of(SEGMENT_LEN) {
                return ioerr("discard/write-zeroes payload not a multiple of 16 bytes");
            }
            let max = if discard {
                dev.limits.max_discard_seg
            } else {
                dev.limits.max_write_zeroes_seg
            };
            let count = out_len / SEGMENT_LEN;
            if count > u64::from(max) {
                return ioerr("more discard/write-zeroes segments than advertised");
            }
            Request::Ranges { discard, count }
        }
        _ => return unsupp("unsupported request type"),
    };
    if req.writes() && dev.readonly {
        return ioerr("write to a read-only disk");
    }
    Ok(req)
}

/// One DISCARD or WRITE_ZEROES segment, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// Parses the segment payload of a [`Request::Ranges`]. Every segment is checked before any
/// is executed: a request is refused whole or run whole.
pub fn segments(dev: &Device, discard: bool, payload: &[u8]) -> Result<Vec<Segment>, Refused> {
    let max_sectors = if discard {
        dev.limits.max_discard_sectors
    } else {
        dev.limits.max_write_zeroes_sectors
    };
    let mut out = Vec::with_capacity(payload.len() / SEGMENT_LEN as usize);
    for s in payload.chunks_exact(SEGMENT_LEN as usize) {
        let sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
        let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return unsupp("unknown discard/write-zeroes flags");
        }
        if discard && flags != 0 {
            return unsupp("unmap flag on discard");
        }
        if sectors > max_sectors {
            return ioerr("discard/write-zeroes segment above the advertised maximum");
        }
        let len = u64::from(sectors) * SECTOR;
        out.push(Segment {
            offset: range(dev, sector, len)?,
            len,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u64 = 1 << 20;

    fn dev(readonly: bool) -> Device {
        Device {
            capacity: CAP,
            readonly,
            limits: Limits::for_queue_size(256),
        }
    }

    fn hdr(kind: u32, sector: u64) -> Header {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        Header::parse(&b)
    }

    fn seg(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
        let mut v = sector.to_le_bytes().to_vec();
        v.extend_from_slice(&sectors.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v
    }

    fn status(r: Result<impl Sized, Refused>) -> u8 {
        r.map_or_else(|e| e.status, |_| S_OK)
    }

    #[test]
    fn reads_and_writes_are_whole_sectors_inside_the_disk() {
        let d = dev(false);
        assert_eq!(
            parse(&d, hdr(VIRTIO_BLK_T_IN, 2), 0, 4096),
            Ok(Request::Read {
                offset: 1024,
                len: 4096
            })
        );
        assert_eq!(
            parse(&d, hdr(VIRTIO_BLK_T_OUT, 0), 512, 0),
            Ok(Request::Write {
                offset: 0,
                len: 512
            })
        );
        // The last sector, and a zero-length transfer at the very end, are fine.
        let last = CAP / 512 - 1;
        assert_eq!(status(parse(&d, hdr(VIRTIO_BLK_T_IN, last), 0, 512)), S_OK);
        assert_eq!(
            status(parse(&d, hdr(VIRTIO_BLK_T_IN, CAP / 512), 0, 0)),
            S_OK
        );
        for (sector, len) in [
            (last, 1024),              // runs past the end
            (CAP / 512 + 1, 0),        // zero bytes, but past the end (QEMU refuses it too)
            (u64::MAX / 512 + 1, 512), // the byte offset overflows
            (u64::MAX / 512, 512),     // the end overflows
            (0, 100),                  // not whole sectors
        ] {
            assert_eq!(
                status(parse(&d, hdr(VIRTIO_BLK_T_IN, sector), 0, len)),
                S_IOERR,
                "sector {sector} len {len}"
            );
        }
    }

    #[test]
    fn types_flags_and_read_only() {
        let d = dev(false);
        // The legacy barrier flag is masked; type 5 is the legacy FLUSH.
        assert_eq!(
            parse(&d, hdr(VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_BARRIER, 0), 0, 0),
            Ok(Request::Flush)
        );
        assert_eq!(parse(&d, hdr(5, 0), 0, 0), Ok(Request::Flush));
        assert_eq!(
            parse(&d, hdr(VIRTIO_BLK_T_GET_ID, 0), 0, 20),
            Ok(Request::GetId)
        );
        assert_eq!(
            status(parse(&d, hdr(VIRTIO_BLK_T_GET_ID, 0), 0, 19)),
            S_IOERR
        );
        for unknown in [2, 3, 14, 15, 0x7fff_ffff] {
            assert_eq!(status(parse(&d, hdr(unknown, 0), 0, 0)), S_UNSUPP);
        }
        let ro = dev(true);
        assert_eq!(
            status(parse(&ro, hdr(VIRTIO_BLK_T_OUT, 0), 512, 0)),
            S_IOERR
        );
        assert_eq!(
            status(parse(&ro, hdr(VIRTIO_BLK_T_DISCARD, 0), 16, 0)),
            S_IOERR
        );
        assert_eq!(status(parse(&ro, hdr(VIRTIO_BLK_T_IN, 0), 0, 512)), S_OK);
        assert_eq!(status(parse(&ro, hdr(VIRTIO_BLK_T_FLUSH, 0), 0, 0)), S_OK);
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let d = dev(false);
        let max = d.limits.max_discard_seg;
        assert_eq!(
            parse(&d, hdr(VIRTIO_BLK_T_DISCARD, 0), 32, 0),
            Ok(Request::Ranges {
                discard: true,
                count: 2
            })
        );
        for len in [0, 15, 17] {
            assert_eq!(
                status(parse(&d, hdr(VIRTIO_BLK_T_DISCARD, 0), len, 0)),
                S_IOERR
            );
        }
        let too_many = u64::from(max + 1) * 16;
        assert_eq!(
            status(parse(&d, hdr(VIRTIO_BLK_T_DISCARD, 0), too_many, 0)),
            S_IOERR
        );

        let p = [seg(0, 8, 0), seg(16, 1, 0)].concat();
        assert_eq!(
            segments(&d, true, &p),
            Ok(vec![
                Segment {
                    offset: 0,
                    len: 4096
                },
                Segment {
                    offset: 8192,
                    len: 512
                }
            ])
        );
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(segments(&d, false, &seg(0, 8, unmap)).unwrap().len(), 1);
        assert_eq!(status(segments(&d, true, &seg(0, 8, unmap))), S_UNSUPP);
        assert_eq!(status(segments(&d, false, &seg(0, 8, 2))), S_UNSUPP);
        let big = d.limits.max_discard_sectors + 1;
        assert_eq!(status(segments(&d, true, &seg(0, big, 0))), S_IOERR);
        assert_eq!(status(segments(&d, false, &seg(CAP / 512, 1, 0))), S_IOERR);
        // One bad segment refuses the request whole, wherever it stands.
        let p = [seg(0, 8, 0), seg(u64::MAX, 1, 0)].concat();
        assert_eq!(status(segments(&d, true, &p)), S_IOERR);
    }
}
