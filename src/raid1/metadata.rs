//! Reading and writing a leg's md metadata: the v1.2 superblock and every node's
//! write-intent bitmap, through a [`Leg`].

use crate::md::bitmap::{BitmapBits, BitmapError, BitmapGeometry, BitmapSuper, BITMAP_SB_LEN};
use crate::md::layout::{self, CreateRequest, Geometry, LayoutError};
use crate::md::superblock::{
    self, feature, role, Superblock, SuperblockError, SB_BLOCK_LEN, SB_BYTE_OFFSET, SB_OFFSET_V12,
};
use crate::md::{Uuid, MAX_SECTOR};
use crate::storage::{read_vec, Leg};
use std::io;

/// What went wrong with one leg's metadata. The caller adds the leg's name.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// An I/O error.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The superblock is bad.
    #[error("{0}")]
    Superblock(#[from] SuperblockError),
    /// The superblock is fine but has no internal bitmap.
    #[error(
        "field feature_map has no internal bitmap (bit 0x1): a write-intent bitmap is required"
    )]
    NoBitmap,
    /// A node's bitmap is bad.
    #[error("bitmap of node slot {slot}: {source}")]
    Bitmap {
        /// The slot.
        slot: u32,
        /// The error.
        #[source]
        source: BitmapError,
    },
    /// A node's bitmap belongs to another array.
    #[error("bitmap of node slot {slot}: field uuid is {found}, but the array uuid is {expected}")]
    BitmapUuid {
        /// The slot.
        slot: u32,
        /// uuid in the bitmap.
        found: Uuid,
        /// uuid of the superblock.
        expected: Uuid,
    },
    /// The bitmaps do not fit before the data.
    #[error("field nodes is {nodes}: {nodes} bitmaps of {slot_len} bytes reach past data_offset {data_offset}")]
    BitmapPlacement {
        /// Slots.
        nodes: u32,
        /// Bytes per slot.
        slot_len: u64,
        /// Data offset in sectors.
        data_offset: u64,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MetaError {
    let what = what.into();
    move |source| MetaError::Io { what, source }
}

/// One node slot's bitmap as read from a leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBitmap {
    /// The slot number (0-based).
    pub slot: u32,
    /// Its superblock.
    pub sb: BitmapSuper,
    /// Its bits.
    pub bits: BitmapBits,
}

/// Everything md keeps on one leg before the data area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegMetadata {
    /// The md superblock.
    pub sb: Superblock,
    /// Each node's bitmap (one for a plain bitmap).
    pub bitmaps: Vec<SlotBitmap>,
}

impl LegMetadata {
    /// The common bitmap superblock (slot 0's), which says whether the array is
    /// clustered and how many slots exist.
    pub fn bitmap(&self) -> &BitmapSuper {
        &self.bitmaps[0].sb
    }

    /// Reads and validates the superblock and every node's bitmap of `leg`.
    pub fn load(leg: &dyn Leg) -> Result<LegMetadata, MetaError> {
        let sb = read_superblock(leg)?;
        if sb.feature_map & feature::BITMAP_OFFSET == 0 {
            return Err(MetaError::NoBitmap);
        }
        let first = load_slot(leg, &sb, None, 0)?;
        let geometry = first.sb.geometry();
        let slots = first.sb.slots();
        let end = geometry
            .slot_offset(sb.super_offset, sb.bitmap_offset, slots)
            .unwrap_or(u64::MAX);
        if end > sb.data_offset.saturating_mul(512) && sb.data_offset > sb.super_offset {
            return Err(MetaError::BitmapPlacement {
                nodes: slots,
                slot_len: geometry.slot_len(),
                data_offset: sb.data_offset,
            });
        }
        let mut bitmaps = vec![first];
        for slot in 1..slots {
            bitmaps.push(load_slot(leg, &sb, Some(geometry), slot)?);
        }
        Ok(LegMetadata { sb, bitmaps })
    }
}

/// Reads, decodes and checks the v1.2 superblock of `leg` against the leg's size.
pub fn read_superblock(leg: &dyn Leg) -> Result<Superblock, MetaError> {
    let need = SB_BYTE_OFFSET + SB_BLOCK_LEN as u64;
    if leg.size() < need {
        return Err(SuperblockError::Truncated {
            len: leg.size().saturating_sub(SB_BYTE_OFFSET) as usize,
            need: SB_BLOCK_LEN,
        }
        .into());
    }
    let buf = read_vec(leg, SB_BYTE_OFFSET, SB_BLOCK_LEN).map_err(io_err("read the superblock"))?;
    let sb = Superblock::decode(&buf)?;
    sb.check_device(SB_OFFSET_V12, leg.size() / 512)?;
    Ok(sb)
}

/// Reads node `slot`'s bitmap from `leg`, using slot 0's geometry for placement.
pub fn read_slot(
    leg: &dyn Leg,
    sb: &Superblock,
    geometry: BitmapGeometry,
    slot: u32,
) -> Result<SlotBitmap, MetaError> {
    load_slot(leg, sb, Some(geometry), slot)
}

fn load_slot(
    leg: &dyn Leg,
    sb: &Superblock,
    geometry: Option<BitmapGeometry>,
    slot: u32,
) -> Result<SlotBitmap, MetaError> {
    let bad = |source| MetaError::Bitmap { slot, source };
    // Slot 0 is found from the superblock alone; the others need its geometry.
    let off = match geometry {
        Some(g) => g.slot_offset(sb.super_offset, sb.bitmap_offset, slot),
        None => sb
            .super_offset
            .checked_add_signed(i64::from(sb.bitmap_offset))
            .and_then(|s| s.checked_mul(512)),
    };
    let off = off.filter(|&o| {
        o >= SB_BYTE_OFFSET + 512 || o.saturating_add(BITMAP_SB_LEN as u64) <= SB_BYTE_OFFSET
    });
    let Some(off) = off else {
        return Err(SuperblockError::Field {
            field: "bitmap_offset",
            value: sb.bitmap_offset.to_string(),
            why: "places the bitmap on top of the superblock or outside the leg",
        }
        .into());
    };
    let head = read_vec(leg, off, BITMAP_SB_LEN)
        .map_err(io_err(format!("read the bitmap of node slot {slot}")))?;
    let bsb = BitmapSuper::decode(&head).map_err(bad)?;
    // Slots are spaced by slot 0's geometry; the bits of a later slot must not run
    // into the next slot.
    if let Some(g) = geometry {
        if BITMAP_SB_LEN as u64 + bsb.geometry().bits_len() > g.slot_len() {
            return Err(slot_overflow(slot, &bsb));
        }
    }
    if bsb.uuid != sb.set_uuid {
        return Err(MetaError::BitmapUuid {
            slot,
            found: bsb.uuid,
            expected: sb.set_uuid,
        });
    }
    let g = bsb.geometry();
    let body = read_vec(leg, off + BITMAP_SB_LEN as u64, g.bits_len() as usize)
        .map_err(io_err(format!("read the bitmap of node slot {slot}")))?;
    let bits = BitmapBits::from_bytes(&body, g.chunks()).map_err(bad)?;
    Ok(SlotBitmap {
        slot,
        sb: bsb,
        bits,
    })
}

fn slot_overflow(slot: u32, bsb: &BitmapSuper) -> MetaError {
    MetaError::Bitmap {
        slot,
        source: BitmapError::Field {
            field: "sync_size",
            value: bsb.sync_size.to_string(),
            why: "with this chunksize the bits do not fit in the space slot 0's geometry gives each node",
        },
    }
}

/// Where an existing md superblock was found on a leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExistingMd {
    /// Metadata version ("1.2", "1.1", "1.0", "0.90").
    pub version: &'static str,
    /// Array uuid when readable.
    pub uuid: Option<Uuid>,
}

/// Looks for an md superblock of any version at its standard places.
pub fn find_existing_md(leg: &dyn Leg) -> io::Result<Option<ExistingMd>> {
    let size = leg.size();
    let sectors = size / 512;
    let mut places: Vec<(&'static str, u64)> = vec![("1.2", SB_BYTE_OFFSET), ("1.1", 0)];
    if sectors >= 16 {
        places.push(("1.0", ((sectors - 16) & !7) * 512));
    }
    if size >= 128 << 10 {
        places.push(("0.90", (size & !0xffff) - 0x10000));
    }
    for (version, off) in places {
        if off + 512 > size {
            continue;
        }
        let buf = read_vec(leg, off, 512)?;
        if buf[0..4] == superblock::SB_MAGIC.to_le_bytes() {
            let uuid = if version == "0.90" {
                None
            } else {
                let mut u = [0u8; 16];
                u.copy_from_slice(&buf[16..32]);
                Some(Uuid(u))
            };
            return Ok(Some(ExistingMd { version, uuid }));
        }
    }
    Ok(None)
}

/// Options of a new array beyond its geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewArray {
    /// Array name as stored ("homehost:name").
    pub name: String,
    /// Cluster name for a clustered array (`None`: plain bitmap).
    pub cluster_name: Option<String>,
    /// Node slots for a clustered array.
    pub nodes: u32,
    /// Bitmap chunk in bytes, or the default.
    pub bitmap_chunk: Option<u64>,
    /// Legs are known identical (e.g. fresh zeroed images): no initial resync.
    pub assume_clean: bool,
    /// Creation time (seconds since the epoch).
    pub now: u64,
    /// Array uuid (random if `None`).
    pub uuid: Option<Uuid>,
}

/// Why an array could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The geometry is impossible.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The cluster name is too long or empty.
    #[error("cluster name {0:?} must be 1 to 63 bytes")]
    ClusterName(String),
    /// Writing a leg failed.
    #[error("leg {leg}: {source}")]
    Leg {
        /// The leg's name.
        leg: String,
        /// What failed.
        #[source]
        source: MetaError,
    },
    /// No randomness for the uuids.
    #[error("cannot make a uuid: {0}")]
    Random(io::Error),
}

/// The superblocks and bitmaps a new array gets, one entry per leg (pure).
pub fn build_new_array(
    leg_sizes: &[u64],
    opts: &NewArray,
    device_uuids: &[Uuid],
    set_uuid: Uuid,
) -> Result<(Geometry, Vec<LegMetadata>), CreateError> {
    if let Some(name) = &opts.cluster_name {
        if name.is_empty() || name.len() > layout::MAX_CLUSTER_NAME {
            return Err(CreateError::ClusterName(name.clone()));
        }
    }
    let clustered = opts.cluster_name.is_some();
    let geometry = layout::plan(&CreateRequest {
        leg_sectors: leg_sizes.iter().map(|b| b / 512).collect(),
        nodes: clustered.then_some(opts.nodes),
        bitmap_chunk: opts.bitmap_chunk,
    })?;
    let n = leg_sizes.len();
    let mut roles = vec![role::SPARE; geometry.max_dev as usize];
    for (i, r) in roles.iter_mut().enumerate().take(n) {
        *r = i as u16;
    }
    let mut bsb = BitmapSuper {
        version: if clustered {
            crate::md::bitmap::VERSION_CLUSTERED
        } else {
            crate::md::bitmap::VERSION_PLAIN
        },
        uuid: set_uuid,
        events: 0,
        events_cleared: 0,
        sync_size: geometry.size,
        state: 0,
        chunksize: geometry.bitmap.chunksize,
        daemon_sleep: crate::md::bitmap::DEFAULT_DAEMON_SLEEP,
        write_behind: 0,
        sectors_reserved: 0,
        nodes: if clustered { opts.nodes } else { 0 },
        cluster_name: [0; 64],
    };
    if let Some(name) = &opts.cluster_name {
        bsb.set_cluster_name(name);
    }
    let chunks = geometry.bitmap.chunks();
    let bitmaps: Vec<SlotBitmap> = (0..geometry.slots)
        .map(|slot| {
            let mut bits = BitmapBits::new(chunks);
            // Like mdadm: slot 0 starts all dirty so the first assembly resyncs
            // everything, unless the legs are known to be identical.
            if slot == 0 && !opts.assume_clean {
                bits.set_all();
            }
            SlotBitmap {
                slot,
                sb: bsb.clone(),
                bits,
            }
        })
        .collect();
    let mut feature_map = feature::BITMAP_OFFSET;
    if clustered {
        feature_map |= feature::CLUSTERED;
    }
    let legs = leg_sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| {
            let mut sb = Superblock {
                feature_map,
                set_uuid,
                set_name: [0; 32],
                ctime: opts.now,
                level: 1,
                layout: 0,
                size: geometry.size,
                chunksize: 0,
                raid_disks: n as u32,
                bitmap_offset: geometry.bitmap_offset,
                new_level: 0,
                reshape_position: 0,
                delta_disks: 0,
                new_layout: 0,
                new_chunk: 0,
                new_offset: 0,
                data_offset: geometry.data_offset,
                data_size: bytes / 512 - geometry.data_offset,
                super_offset: geometry.super_offset,
                recovery_offset: 0,
                dev_number: i as u32,
                cnt_corrected_read: 0,
                device_uuid: device_uuids[i],
                devflags: 0,
                bblog_shift: 0,
                bblog_size: 0,
                bblog_offset: 0,
                utime: opts.now,
                events: 0,
                resync_offset: if opts.assume_clean { MAX_SECTOR } else { 0 },
                sb_csum: 0,
                dev_roles: roles.clone(),
            };
            sb.set_name_str(&opts.name);
            LegMetadata {
                sb,
                bitmaps: bitmaps.clone(),
            }
        })
        .collect();
    Ok((geometry, legs))
}

/// Writes a leg's superblock and bitmaps and makes them durable.
pub fn write_leg_metadata(leg: &dyn Leg, meta: &LegMetadata) -> Result<(), MetaError> {
    let sb = &meta.sb;
    let g = meta.bitmap().geometry();
    for b in &meta.bitmaps {
        let off = g
            .slot_offset(sb.super_offset, sb.bitmap_offset, b.slot)
            .ok_or_else(|| SuperblockError::Field {
                field: "bitmap_offset",
                value: sb.bitmap_offset.to_string(),
                why: "places the bitmap outside the leg",
            })?;
        let mut buf = vec![0u8; g.slot_len() as usize];
        buf[..BITMAP_SB_LEN].copy_from_slice(&b.sb.encode());
        let bits = b.bits.as_bytes();
        let Some(dst) = buf.get_mut(BITMAP_SB_LEN..BITMAP_SB_LEN + bits.len()) else {
            return Err(slot_overflow(b.slot, &b.sb));
        };
        dst.copy_from_slice(bits);
        leg.write_at(&buf, off)
            .map_err(io_err(format!("write the bitmap of node slot {}", b.slot)))?;
    }
    leg.write_at(&sb.encode(), sb.super_offset * 512)
        .map_err(io_err("write the superblock"))?;
    leg.flush().map_err(io_err("flush the metadata"))
}

/// Creates a new array on `legs`: builds and writes every leg's metadata.
pub fn create_array(
    legs: &[&dyn Leg],
    opts: &NewArray,
) -> Result<(Geometry, Vec<LegMetadata>), CreateError> {
    let sizes: Vec<u64> = legs.iter().map(|l| l.size()).collect();
    let set_uuid = match opts.uuid {
        Some(u) => u,
        None => Uuid::random().map_err(CreateError::Random)?,
    };
    let device_uuids = (0..legs.len())
        .map(|_| Uuid::random())
        .collect::<io::Result<Vec<_>>>()
        .map_err(CreateError::Random)?;
    let (geometry, metas) = build_new_array(&sizes, opts, &device_uuids, set_uuid)?;
    // The 4 KiB before the v1.2 superblock hold the multi-host heartbeat of a node
    // serving the array alone: start them blank (a LUN's old partition table there
    // would leave the leg without one).
    let blank = crate::storage::AlignedBuf::zeroed(crate::md::heartbeat::LEN);
    for leg in legs {
        leg.write_at(blank.as_slice(), crate::md::heartbeat::OFFSET)
            .map_err(|e| CreateError::Leg {
                leg: leg.name().to_string(),
                source: MetaError::Io {
                    what: "blank the heartbeat block".into(),
                    source: e,
                },
            })?;
    }
    for (leg, meta) in legs.iter().zip(&metas) {
        write_leg_metadata(*leg, meta).map_err(|source| CreateError::Leg {
            leg: leg.name().to_string(),
            source,
        })?;
    }
    Ok((geometry, metas))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemLeg;

    fn opts(clustered: bool) -> NewArray {
        NewArray {
            name: "host:test".into(),
            cluster_name: clustered.then(|| "prod".to_string()),
            nodes: 4,
            bitmap_chunk: Some(1 << 20),
            assume_clean: false,
            now: 1_700_000_000,
            uuid: None,
        }
    }

    #[test]
    fn created_metadata_reads_back() {
        let a = MemLeg::new("a", 64 << 20);
        let b = MemLeg::new("b", 64 << 20);
        let (g, metas) = create_array(&[&a, &b], &opts(true)).unwrap();
        for (leg, want) in [(&a, &metas[0]), (&b, &metas[1])] {
            let got = LegMetadata::load(leg).unwrap();
            assert_eq!(got.bitmaps.len(), 4);
            assert_eq!(got.bitmaps[0].bits.count_dirty(), g.bitmap.chunks());
            assert_eq!(got.bitmaps[1].bits.count_dirty(), 0);
            assert_eq!(got.sb.set_uuid, want.sb.set_uuid);
            assert_eq!(got.sb.device_uuid, want.sb.device_uuid);
            assert_eq!(got.bitmap().cluster_name(), "prod");
        }
        assert_ne!(metas[0].sb.device_uuid, metas[1].sb.device_uuid);
        assert_eq!(
            find_existing_md(&a).unwrap().unwrap().uuid,
            Some(metas[0].sb.set_uuid)
        );
    }

    #[test]
    fn create_blanks_the_heartbeat_block() {
        let a = MemLeg::new("a", 64 << 20);
        let b = MemLeg::new("b", 64 << 20);
        let mut mbr = vec![0u8; 4096];
        mbr[446..510].fill(0x11);
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        a.write_at(&mbr, 0).unwrap();
        create_array(&[&a, &b], &opts(false)).unwrap();
        let mut got = vec![1u8; 4096];
        a.read_at(&mut got, 0).unwrap();
        assert_eq!(
            crate::md::heartbeat::decode(&got),
            crate::md::heartbeat::Block::Empty
        );
    }

    #[test]
    fn plain_bitmap_has_one_slot() {
        let a = MemLeg::new("a", 64 << 20);
        let b = MemLeg::new("b", 64 << 20);
        create_array(&[&a, &b], &opts(false)).unwrap();
        let m = LegMetadata::load(&a).unwrap();
        assert_eq!(m.bitmaps.len(), 1);
        assert_eq!(m.bitmap().version, 4);
        assert_eq!(m.sb.feature_map, feature::BITMAP_OFFSET);
    }

    #[test]
    fn blank_leg_has_no_md() {
        let a = MemLeg::new("a", 64 << 20);
        assert_eq!(find_existing_md(&a).unwrap(), None);
        assert!(matches!(
            LegMetadata::load(&a),
            Err(MetaError::Superblock(SuperblockError::Magic { found: 0 }))
        ));
    }

    #[test]
    fn bitmap_running_into_the_next_slot_is_refused() {
        // Found by fuzzing: slot 1's sync_size was changed to 629526146603; its
        // bits then reached far past its 4 KiB slot, load accepted it, and writing
        // the loaded metadata back panicked.
        let a = MemLeg::new("a", 64 << 20);
        let b = MemLeg::new("b", 64 << 20);
        let (_, metas) = create_array(&[&a, &b], &opts(true)).unwrap();
        let g = metas[0].bitmap().geometry();
        let mut big = metas[0].bitmaps[1].sb.clone();
        big.sync_size = 629_526_146_603;
        a.write_at(&big.encode(), g.slot_offset(8, 8, 1).unwrap())
            .unwrap();
        let e = LegMetadata::load(&a).unwrap_err();
        assert!(matches!(e, MetaError::Bitmap { slot: 1, .. }), "{e}");
        assert!(e.to_string().contains("sync_size"), "{e}");

        // Inconsistent metadata in memory is refused on write, not a panic.
        let mut meta = metas[1].clone();
        meta.bitmaps[1].sb = big;
        meta.bitmaps[1].bits = BitmapBits::new(1 << 20);
        let e = write_leg_metadata(&b, &meta).unwrap_err();
        assert!(matches!(e, MetaError::Bitmap { slot: 1, .. }), "{e}");
    }

    #[test]
    fn bitmap_of_another_array_is_refused() {
        let a = MemLeg::new("a", 64 << 20);
        let b = MemLeg::new("b", 64 << 20);
        let (_, metas) = create_array(&[&a, &b], &opts(true)).unwrap();
        let mut other = metas[0].bitmaps[2].sb.clone();
        other.uuid = Uuid([9; 16]);
        let off = metas[0].bitmap().geometry().slot_offset(8, 8, 2).unwrap();
        a.write_at(&other.encode(), off).unwrap();
        let e = LegMetadata::load(&a).unwrap_err();
        assert!(matches!(e, MetaError::BitmapUuid { slot: 2, .. }), "{e}");
    }
}
