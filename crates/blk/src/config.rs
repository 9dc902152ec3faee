//! The virtio-blk configuration space (virtio 1.3 §5.2.4), built from the device's settings.
//! Every limit of an offered feature is non-zero (zeroed limits crash some guest drivers).

use virtio_bindings::virtio_blk::*;

/// Size of `struct virtio_blk_config` up to and including the zoned fields.
pub const CONFIG_LEN: usize = 96;
/// Offset of the `writeback` byte the guest may write (CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

/// Per-segment and per-request limits this device enforces and advertises.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub size_max: u32,
    pub seg_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

impl Limits {
    pub fn for_queue_size(queue_size: u16) -> Self {
        Self {
            size_max: 1 << 20,
            seg_max: u32::from(queue_size).saturating_sub(2).max(1),
            max_discard_sectors: 1 << 22,
            max_discard_seg: 256,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 256,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BlkConfig {
    pub capacity_sectors: u64,
    pub limits: Limits,
    /// Logical block size the guest must align to (512 unless configured).
    pub logical_block_size: u32,
    /// The tracking block size: advertised as physical block and I/O granularity so guest file
    /// systems align to it and partial-block read-modify-writes stay rare.
    pub tracking_block_size: u32,
    pub num_queues: u16,
    pub writeback: bool,
}

impl BlkConfig {
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let l = &self.limits;
        let sectors = |bytes: u32| (bytes / 512).max(1);
        let phys_exp = (self.tracking_block_size / self.logical_block_size.max(1))
            .max(1)
            .trailing_zeros() as u8;
        put64(&mut c, 0, self.capacity_sectors);
        put32(&mut c, 8, l.size_max);
        put32(&mut c, 12, l.seg_max);
        // geometry (16..20) is not offered.
        put32(&mut c, 20, self.logical_block_size);
        c[24] = phys_exp;
        c[25] = 0; // alignment_offset
        put16(
            &mut c,
            26,
            (self.tracking_block_size / self.logical_block_size.max(1)).max(1) as u16,
        );
        put32(
            &mut c,
            28,
            self.tracking_block_size / self.logical_block_size.max(1),
        );
        c[WRITEBACK_OFFSET] = u8::from(self.writeback);
        put16(&mut c, 34, self.num_queues);
        put32(&mut c, 36, l.max_discard_sectors);
        put32(&mut c, 40, l.max_discard_seg);
        put32(&mut c, 44, sectors(self.tracking_block_size));
        put32(&mut c, 48, l.max_write_zeroes_sectors);
        put32(&mut c, 52, l.max_write_zeroes_seg);
        c[56] = 1; // write_zeroes_may_unmap: zeroed blocks are always deallocated
        c
    }

    /// The bytes `[offset, offset + size)` of the config space; bytes past the struct read as
    /// zero, since frontends ask for the size of their own (growing) struct definition.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let (o, n) = (offset as usize, size as usize);
        (o..o.saturating_add(n))
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }
}

/// Virtio feature bits this device offers.
pub fn device_features(readonly: bool, num_queues: u16) -> u64 {
    let mut f = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE);
    if num_queues > 1 {
        f |= 1 << VIRTIO_BLK_F_MQ;
    }
    if readonly {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BlkConfig {
        BlkConfig {
            capacity_sectors: 2048,
            limits: Limits::for_queue_size(256),
            logical_block_size: 512,
            tracking_block_size: 4096,
            num_queues: 4,
            writeback: true,
        }
    }

    #[test]
    fn layout_and_nonzero_limits() {
        let b = cfg().to_bytes();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32_at(12), 254);
        assert_eq!(u32_at(20), 512);
        assert_eq!(b[24], 3, "physical block 4096 = 512 << 3");
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4);
        for o in [8, 12, 36, 40, 44, 48, 52] {
            assert_ne!(u32_at(o), 0, "limit at {o} is zero");
        }
        assert_eq!(b[56], 1);
        assert_eq!(
            (b[33], &b[57..60]),
            (0, &[0u8, 0, 0][..]),
            "padding is zero"
        );
    }

    #[test]
    fn any_subrange_reads_padded() {
        let c = cfg();
        assert_eq!(c.read(0, 96), c.to_bytes().to_vec());
        assert_eq!(c.read(32, 1), vec![1]);
        assert_eq!(c.read(90, 20).len(), 20);
        assert!(c.read(200, 8).iter().all(|&b| b == 0));
        assert_eq!(c.read(u32::MAX, 4).len(), 4);
    }
}
