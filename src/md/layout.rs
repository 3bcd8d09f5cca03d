//! Geometry of a new array, chosen the way `mdadm --create --metadata=1.2` chooses it:
//! data offset, array size, bitmap chunk, and room for every node's bitmap.

use super::bitmap::{BitmapGeometry, BITMAP_SB_LEN};
use super::superblock::{MAX_DEVS, SB_OFFSET_V12};

/// Sectors from the superblock to the first bitmap superblock (mdadm's `+8`).
pub const BITMAP_OFFSET: i32 = 8;
/// mdadm's default number of node slots for a clustered bitmap.
pub const DEFAULT_NODES: u32 = 4;
/// mdadm's default bitmap chunk (64 MiB) unless the bitmap space forces a larger one.
pub const DEFAULT_BITMAP_CHUNK: u64 = 64 << 20;
/// Smallest bitmap chunk mdadm creates.
pub const MIN_BITMAP_CHUNK: u64 = 4096;
/// RAID1 array sizes are rounded down to 64 KiB (128 sectors), as mdadm does.
pub const SIZE_ROUNDING: u64 = 128;
/// Longest cluster name (the 64-byte field keeps a NUL).
pub const MAX_CLUSTER_NAME: usize = 63;

/// What the caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    /// Size of each leg in sectors.
    pub leg_sectors: Vec<u64>,
    /// `Some(n)`: clustered bitmap with `n` node slots; `None`: plain bitmap.
    pub nodes: Option<u32>,
    /// Bitmap chunk in bytes, or mdadm's default.
    pub bitmap_chunk: Option<u64>,
}

/// The chosen geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Sector of the superblock (8).
    pub super_offset: u64,
    /// Sectors from the superblock to the first bitmap.
    pub bitmap_offset: i32,
    /// Sector where data starts (same on every leg).
    pub data_offset: u64,
    /// Array size in sectors (the `size` field).
    pub size: u64,
    /// Bitmap geometry (sync size = array size).
    pub bitmap: BitmapGeometry,
    /// Number of bitmaps (nodes, or 1).
    pub slots: u32,
    /// `dev_roles[]` entries.
    pub max_dev: u32,
}

/// Why the requested array cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// RAID1 here needs at least two legs.
    #[error("a mirror needs at least 2 legs, {0} given")]
    TooFewLegs(usize),
    /// More legs than a superblock can describe.
    #[error("at most {MAX_DEVS} legs are possible, {0} given")]
    TooManyLegs(usize),
    /// A clustered bitmap needs at least two node slots.
    #[error("--nodes must be at least 2 for a clustered array, {0} given")]
    TooFewNodes(u32),
    /// The leg cannot hold metadata and data.
    #[error("leg {leg} has {sectors} sectors, too small: data starts at sector {data_offset}")]
    LegTooSmall {
        /// Index of the leg.
        leg: usize,
        /// Its size.
        sectors: u64,
        /// Where data would start.
        data_offset: u64,
    },
    /// The requested chunk is unusable.
    #[error("bitmap chunk {chunk} bytes: {why}")]
    BadChunk {
        /// The chunk asked for.
        chunk: u64,
        /// What is wrong.
        why: String,
    },
    /// The per-node bitmaps do not fit before the data.
    #[error("{slots} bitmaps of {slot_len} bytes do not fit before the data (room for {fits}); use a larger --bitmap-chunk or fewer --nodes")]
    NoRoomForBitmaps {
        /// Slots requested.
        slots: u32,
        /// Bytes per slot.
        slot_len: u64,
        /// Slots that fit.
        fits: u64,
    },
}

/// mdadm's bitmap space for a device of `dev_sectors` sectors.
pub fn choose_bm_space(dev_sectors: u64) -> u64 {
    if dev_sectors < 128 {
        0
    } else if dev_sectors - 128 >= 200 * 1024 * 1024 * 2 {
        256
    } else if dev_sectors - 8 > 8 * 1024 * 1024 * 2 {
        128
    } else {
        8
    }
}

/// mdadm's data offset for a v1.2 leg of `dev_sectors`: room for superblock and
/// bitmap plus ~0.1 % headroom (at most 128 MiB), rounded up to 1 MiB.
pub fn default_data_offset(dev_sectors: u64) -> u64 {
    let mut headroom: u64 = 128 * 1024 * 2;
    while (headroom << 10) > dev_sectors && headroom > 0 {
        headroom >>= 1;
    }
    (24 + choose_bm_space(dev_sectors) + headroom).div_ceil(2048) * 2048
}

/// `max_dev` for `n` devices: the role table padded so the superblock is a whole
/// number of 512-byte sectors.
pub fn max_dev_for(n: u32) -> u32 {
    ((256 + 2 * n).div_ceil(512) * 512 - 256) / 2
}

/// mdadm's bitmap chunk choice for an array of `size` sectors.
fn choose_chunk(size: u64, requested: Option<u64>) -> Result<u64, LayoutError> {
    let room = choose_bm_space(size).min(256);
    if room <= 1 {
        return Err(LayoutError::BadChunk {
            chunk: requested.unwrap_or(0),
            why: "the array is too small for a write-intent bitmap".into(),
        });
    }
    let max_bits = (room * 512 - BITMAP_SB_LEN as u64) * 8;
    let mut min_chunk = MIN_BITMAP_CHUNK;
    let mut bits = size * 512 / min_chunk + 1;
    while bits > max_bits {
        min_chunk *= 2;
        bits = bits.div_ceil(2);
    }
    match requested {
        None => Ok(min_chunk.max(DEFAULT_BITMAP_CHUNK)),
        Some(c) if !c.is_power_of_two() || c < 512 || c > u64::from(u32::MAX / 2 + 1) => {
            Err(LayoutError::BadChunk {
                chunk: c,
                why: "must be a power of two between 512 bytes and 2 GiB".into(),
            })
        }
        Some(c) if c < min_chunk => Err(LayoutError::BadChunk {
            chunk: c,
            why: format!("too small for this array size, at least {min_chunk} bytes needed"),
        }),
        Some(c) => Ok(c),
    }
}

/// Chooses the geometry of a new array.
pub fn plan(req: &CreateRequest) -> Result<Geometry, LayoutError> {
    let n = req.leg_sectors.len();
    if n < 2 {
        return Err(LayoutError::TooFewLegs(n));
    }
    if n > MAX_DEVS as usize {
        return Err(LayoutError::TooManyLegs(n));
    }
    if let Some(nodes) = req.nodes {
        if nodes < 2 {
            return Err(LayoutError::TooFewNodes(nodes));
        }
    }
    let smallest = req.leg_sectors.iter().copied().min().unwrap_or(0);
    let data_offset = default_data_offset(smallest);
    let mut size = u64::MAX;
    for (leg, &sectors) in req.leg_sectors.iter().enumerate() {
        let usable = sectors.saturating_sub(data_offset) / SIZE_ROUNDING * SIZE_ROUNDING;
        if usable == 0 {
            return Err(LayoutError::LegTooSmall {
                leg,
                sectors,
                data_offset,
            });
        }
        size = size.min(usable);
    }
    let chunk = choose_chunk(size, req.bitmap_chunk)?;
    let bitmap = BitmapGeometry {
        sync_size: size,
        chunksize: chunk as u32,
    };
    let slots = req.nodes.unwrap_or(1);
    // The bitmaps live between the superblock block and the data.
    let room = (data_offset - SB_OFFSET_V12) * 512 - 4096;
    let fits = room / bitmap.slot_len();
    if u64::from(slots) > fits {
        return Err(LayoutError::NoRoomForBitmaps {
            slots,
            slot_len: bitmap.slot_len(),
            fits,
        });
    }
    Ok(Geometry {
        super_offset: SB_OFFSET_V12,
        bitmap_offset: BITMAP_OFFSET,
        data_offset,
        size,
        bitmap,
        slots,
        max_dev: max_dev_for(n as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_mdadm_for_the_fixture_size() {
        // 64 MiB legs, as in the kernel-made fixtures: data offset 2048, size 129024.
        let g = plan(&CreateRequest {
            leg_sectors: vec![131_072, 131_072],
            nodes: Some(4),
            bitmap_chunk: None,
        })
        .unwrap();
        assert_eq!(g.data_offset, 2048);
        assert_eq!(g.size, 129_024);
        assert_eq!(g.bitmap.chunksize, 64 << 20);
        assert_eq!(g.max_dev, 128);
        assert_eq!(g.bitmap.slot_offset(8, 8, 1), Some(12288));
        let g = plan(&CreateRequest {
            leg_sectors: vec![131_072, 131_072],
            nodes: Some(4),
            bitmap_chunk: Some(1 << 20),
        })
        .unwrap();
        assert_eq!(g.bitmap.chunks(), 63);
    }

    #[test]
    fn spec_data_offsets() {
        assert_eq!(default_data_offset(2 * 1024 * 1024), 4096); // 1 GiB
        assert_eq!(default_data_offset(128 << 21), 264_192); // 128 GiB
        assert_eq!(default_data_offset(300 << 21), 264_192);
    }

    #[test]
    fn refuses_impossible_requests() {
        let legs = vec![131_072, 131_072];
        let r = |nodes, chunk| {
            plan(&CreateRequest {
                leg_sectors: legs.clone(),
                nodes,
                bitmap_chunk: chunk,
            })
        };
        assert!(matches!(r(Some(1), None), Err(LayoutError::TooFewNodes(1))));
        assert!(matches!(
            r(None, Some(3000)),
            Err(LayoutError::BadChunk { .. })
        ));
        // 4 KiB chunks need one 4 KiB block per node; 2048 sectors hold 254 of them.
        assert!(matches!(
            r(Some(300), Some(4096)),
            Err(LayoutError::NoRoomForBitmaps { .. })
        ));
        assert!(matches!(
            plan(&CreateRequest {
                leg_sectors: vec![131_072],
                nodes: None,
                bitmap_chunk: None
            }),
            Err(LayoutError::TooFewLegs(1))
        ));
        assert!(matches!(
            plan(&CreateRequest {
                leg_sectors: vec![131_072, 2000],
                nodes: None,
                bitmap_chunk: None
            }),
            Err(LayoutError::LegTooSmall { leg: 1, .. })
        ));
    }
}
