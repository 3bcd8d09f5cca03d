//! The virtio-blk structures that cross guest memory and the config space, as
//! `virtio-bindings` defines them, read and written whole through `ByteValued`.
//! Multi-byte fields are little-endian on the wire (virtio 1.x).

use virtio_bindings::virtio_blk::{
    virtio_blk_config, virtio_blk_discard_write_zeroes, virtio_blk_outhdr,
};
use vm_memory::ByteValued;

/// Copies a value out of `bytes`, which must be exactly its size (any alignment:
/// `ByteValued::from_slice` wants the type's).
pub fn copy_from<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut v = T::default();
    if bytes.len() != v.as_slice().len() {
        return None;
    }
    v.as_mut_slice().copy_from_slice(bytes);
    Some(v)
}

/// The request header (`struct virtio_blk_outhdr`).
#[derive(Debug, Default, Clone, Copy)]
#[repr(transparent)]
pub struct OutHdr(pub virtio_blk_outhdr);

// SAFETY: integers only (4 + 4 + 8 bytes, no padding); any bit pattern is valid.
unsafe impl ByteValued for OutHdr {}

impl OutHdr {
    /// The request type.
    pub fn kind(&self) -> u32 {
        u32::from_le(self.0.type_)
    }

    /// The first sector (512 bytes).
    pub fn sector(&self) -> u64 {
        u64::from_le(self.0.sector)
    }
}

/// One discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
#[derive(Debug, Default, Clone, Copy)]
#[repr(transparent)]
pub struct RangeSeg(pub virtio_blk_discard_write_zeroes);

// SAFETY: integers only (8 + 4 + 4 bytes, no padding); any bit pattern is valid.
unsafe impl ByteValued for RangeSeg {}

impl RangeSeg {
    /// The first sector.
    pub fn sector(&self) -> u64 {
        u64::from_le(self.0.sector)
    }

    /// How many sectors.
    pub fn num_sectors(&self) -> u32 {
        u32::from_le(self.0.num_sectors)
    }

    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_*`.
    pub fn flags(&self) -> u32 {
        u32::from_le(self.0.flags)
    }
}

/// The device's config space (`struct virtio_blk_config`).
#[derive(Debug, Default, Clone, Copy)]
#[repr(transparent)]
pub struct BlkConfig(pub virtio_blk_config);

// SAFETY: a packed struct of integers and byte arrays: no padding, any bit
// pattern is valid.
unsafe impl ByteValued for BlkConfig {}

/// The bytes of the config space the device offers: up to the write-zeroes fields
/// (secure erase and zoned devices are not offered).
pub const CONFIG_LEN: usize = std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors);

impl BlkConfig {
    /// The offered bytes.
    pub fn offered(&self) -> Vec<u8> {
        self.as_slice()[..CONFIG_LEN].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_structures_have_the_virtio_layout() {
        assert_eq!(std::mem::size_of::<OutHdr>(), 16);
        assert_eq!(std::mem::size_of::<RangeSeg>(), 16);
        assert_eq!(CONFIG_LEN, 60);
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&11u32.to_le_bytes());
        raw[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        let h: OutHdr = copy_from(&raw).unwrap();
        assert_eq!((h.kind(), h.sector()), (11, 0x0102_0304_0506_0708));
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&42u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        seg[12..16].copy_from_slice(&1u32.to_le_bytes());
        let s: RangeSeg = copy_from(&seg).unwrap();
        assert!(copy_from::<RangeSeg>(&seg[1..]).is_none());
        assert_eq!((s.sector(), s.num_sectors(), s.flags()), (42, 8, 1));
        let mut c = BlkConfig::default();
        c.0.capacity = 0x1122u64.to_le();
        c.0.num_queues = 4u16.to_le();
        c.0.write_zeroes_may_unmap = 1;
        let b = c.offered();
        assert_eq!(b.len(), 60);
        assert_eq!(&b[0..8], &0x1122u64.to_le_bytes());
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(b[56], 1);
    }
}
