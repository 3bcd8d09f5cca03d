//! Property tests of the on-disk and wire codecs, through the public API only.

use proptest::prelude::*;
use std::collections::BTreeSet;
use vhost_user_md::md::bitmap::{
    BitmapBits, BitmapGeometry, BitmapSuper, BITMAP_SB_LEN, SLOT_ALIGN, VERSION_CLUSTERED,
    VERSION_PLAIN, WRITE_BEHIND_MAX,
};
use vhost_user_md::md::layout::{self, CreateRequest, LayoutError};
use vhost_user_md::md::message::{ClusterMsg, MsgType, K64_LEN, U32_LEN};
use vhost_user_md::md::superblock::{
    checksum, feature, Superblock, SuperblockError, MAX_DEVS, SB_BLOCK_LEN, SB_FIXED_LEN,
};
use vhost_user_md::md::Uuid;
use vhost_user_md::raid1::metadata::{create_array, LegMetadata, NewArray};
use vhost_user_md::storage::{Leg, MemLeg};

/// Largest sector number the codecs accept (`u64::MAX >> 9`).
const LIMIT: u64 = u64::MAX >> 9;

fn uuid() -> impl Strategy<Value = Uuid> {
    any::<[u8; 16]>().prop_map(Uuid)
}

/// A sector number biased towards small values and the edges.
fn sector() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4096,
        0u64..(1 << 40),
        Just(LIMIT),
        any::<u64>().prop_map(|v| v % (LIMIT + 1)),
    ]
}

fn feature_map() -> impl Strategy<Value = u32> {
    (0u32..=feature::ALL).prop_map(|f| {
        if f & feature::PPL != 0 {
            f & !(feature::BITMAP_OFFSET | feature::JOURNAL)
        } else {
            f
        }
    })
}

/// `dev_roles[]` of any allowed length; most cases are short.
fn dev_roles() -> impl Strategy<Value = Vec<u16>> {
    prop_oneof![
        3 => prop::collection::vec(any::<u16>(), 0..=200),
        1 => prop::collection::vec(any::<u16>(), 0..=MAX_DEVS as usize),
    ]
}

/// `(super_offset, data_offset, data_size)` that `Superblock::validate` accepts for a
/// superblock of `sb_len` bytes: either the data area follows the superblock, or it
/// ends before it.
fn placement(sb_len: usize) -> impl Strategy<Value = (u64, u64, u64)> {
    let sb_sectors = (sb_len as u64).div_ceil(512);
    (any::<bool>(), sector(), sector(), sector()).prop_map(move |(after, a, b, c)| {
        if after {
            // super_offset + sb_sectors <= data_offset, data_offset + data_size <= LIMIT.
            let super_offset = a % (LIMIT - 10 - sb_sectors + 1);
            let lo = super_offset + sb_sectors;
            let data_offset = lo + b % (LIMIT - 10 - lo + 1);
            let data_size = 10 + c % (LIMIT - data_offset - 10 + 1);
            (super_offset, data_offset, data_size)
        } else {
            // data_offset + data_size <= super_offset <= LIMIT - 8.
            let super_offset = 10 + a % (LIMIT - 8 - 10 + 1);
            let data_offset = b % (super_offset - 10 + 1);
            let data_size = 10 + c % (super_offset - data_offset - 10 + 1);
            (super_offset, data_offset, data_size)
        }
    })
}

fn superblock() -> impl Strategy<Value = Superblock> {
    dev_roles().prop_flat_map(|roles| {
        let sb_len = SB_FIXED_LEN + 2 * roles.len();
        let head = (
            feature_map(),
            uuid(),
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<i32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<i32>(),
            any::<u32>(),
            any::<u64>(),
        );
        let mid = (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<i32>(),
            placement(sb_len),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            uuid(),
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
        );
        let tail = (any::<i32>(), any::<u64>(), any::<u64>(), any::<u64>());
        (Just(roles), head, mid, tail).prop_map(|(dev_roles, h, m, t)| Superblock {
            feature_map: h.0,
            set_uuid: h.1,
            set_name: h.2,
            ctime: h.3,
            level: h.4,
            layout: h.5,
            size: h.6,
            chunksize: h.7,
            raid_disks: h.8,
            bitmap_offset: h.9,
            new_level: h.10,
            reshape_position: h.11,
            delta_disks: m.0,
            new_layout: m.1,
            new_chunk: m.2,
            new_offset: m.3,
            super_offset: m.4 .0,
            data_offset: m.4 .1,
            data_size: m.4 .2,
            recovery_offset: m.5,
            dev_number: m.6,
            cnt_corrected_read: m.7,
            device_uuid: m.8,
            devflags: m.9,
            bblog_shift: m.10,
            bblog_size: m.11,
            bblog_offset: t.0,
            utime: t.1,
            events: t.2,
            resync_offset: t.3,
            sb_csum: 0,
            dev_roles,
        })
    })
}

fn bitmap_super() -> impl Strategy<Value = BitmapSuper> {
    (
        prop_oneof![Just(VERSION_PLAIN), Just(VERSION_CLUSTERED)],
        uuid(),
        any::<u64>(),
        any::<u64>(),
        0..=LIMIT,
        any::<u32>(),
        (9u32..=31).prop_map(|s| 1u32 << s),
        1u32..=86_400 * 365,
        0..=WRITE_BEHIND_MAX,
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 64),
    )
        .prop_map(|f| {
            let mut cluster_name = [0u8; 64];
            cluster_name.copy_from_slice(&f.11);
            BitmapSuper {
                version: f.0,
                uuid: f.1,
                events: f.2,
                events_cleared: f.3,
                sync_size: f.4,
                state: f.5,
                chunksize: f.6,
                daemon_sleep: f.7,
                write_behind: f.8,
                sectors_reserved: f.9,
                nodes: f.10,
                cluster_name,
            }
        })
}

fn msg_type() -> impl Strategy<Value = MsgType> {
    prop_oneof![
        Just(MsgType::MetadataUpdated),
        Just(MsgType::Resyncing),
        Just(MsgType::NewDisk),
        Just(MsgType::Remove),
        Just(MsgType::ReAdd),
        Just(MsgType::BitmapNeedsSync),
        Just(MsgType::ChangeCapacity),
        Just(MsgType::BitmapResize),
        Just(MsgType::ResyncingStart),
        Just(MsgType::NodeJoined),
        Just(MsgType::NodeLeaving),
        // `Unknown(v)` only for values that are not a known type, as decoding makes them.
        any::<u32>().prop_map(MsgType::from_u32),
    ]
}

fn cluster_msg() -> impl Strategy<Value = ClusterMsg> {
    (
        msg_type(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        uuid(),
        any::<u32>(),
    )
        .prop_map(|(kind, slot, low, high, uuid, raid_slot)| ClusterMsg {
            kind,
            slot,
            low,
            high,
            uuid,
            raid_slot,
        })
}

/// The decoded form of `sb`: identical except for the checksum read back.
fn decoded_equals(sb: &Superblock, bytes: &[u8]) -> Result<Superblock, SuperblockError> {
    let d = Superblock::decode(bytes)?;
    let mut want = sb.clone();
    want.sb_csum = d.sb_csum;
    assert_eq!(d, want);
    Ok(d)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn superblock_round_trip(sb in superblock()) {
        prop_assert!(sb.validate().is_ok(), "generator made an invalid superblock");
        let bytes = sb.encode();
        prop_assert_eq!(bytes.len(), SB_BLOCK_LEN);
        let d = decoded_equals(&sb, &bytes).unwrap();
        prop_assert_eq!(d.sb_csum, checksum(&bytes, sb.max_dev()));
        prop_assert_eq!(d.encode(), bytes);
    }

    /// Bytes after `dev_roles[max_dev - 1]` are outside the checksum and ignored.
    #[test]
    fn superblock_ignores_bytes_after_roles(
        sb in superblock(),
        pos in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        let mut bytes = sb.encode();
        let free = SB_BLOCK_LEN - sb.sb_len();
        prop_assume!(free > 0);
        let i = sb.sb_len() + pos.index(free);
        bytes[i] ^= x;
        decoded_equals(&sb, &bytes).unwrap();
    }

    /// A single changed byte in the checksummed range is always refused, except in
    /// `max_dev` (bytes 220..224), which also moves the end of the checksummed range:
    /// there a change may decode, but never to the original superblock.
    #[test]
    fn superblock_single_byte_flip_is_detected(
        sb in superblock(),
        pos in any::<prop::sample::Index>(),
        x in 1u8..=255,
    ) {
        let mut bytes = sb.encode();
        let mut i = pos.index(sb.sb_len() - 4);
        if i >= 216 {
            i += 4; // skip sb_csum
        }
        bytes[i] ^= x;
        match Superblock::decode(&bytes) {
            Err(_) => {}
            Ok(d) => {
                prop_assert!((220..224).contains(&i), "flip at byte {} went unnoticed", i);
                prop_assert_ne!(d.dev_roles.len(), sb.dev_roles.len());
            }
        }
    }

    #[test]
    fn bitmap_super_round_trip(b in bitmap_super()) {
        let bytes = b.encode();
        prop_assert_eq!(bytes.len(), BITMAP_SB_LEN);
        prop_assert_eq!(BitmapSuper::decode(&bytes).unwrap(), b.clone());
        // Trailing bytes (the bit array) do not matter.
        let mut long = bytes.to_vec();
        long.extend_from_slice(&[0xa5; 300]);
        prop_assert_eq!(BitmapSuper::decode(&long).unwrap(), b);
        prop_assert!(BitmapSuper::decode(&bytes[..BITMAP_SB_LEN - 1]).is_err());
    }

    #[test]
    fn msg_type_wire_value_round_trips(v in any::<u32>()) {
        prop_assert_eq!(MsgType::from_u32(v).to_u32(), v);
    }

    #[test]
    fn cluster_msg_k64_round_trip(m in cluster_msg()) {
        let b = m.encode_k64();
        prop_assert_eq!(b.len(), K64_LEN);
        prop_assert_eq!(ClusterMsg::decode_k64(&b).unwrap(), m);
        prop_assert!(ClusterMsg::decode_k64(&b[..K64_LEN - 1]).is_err());
    }

    #[test]
    fn cluster_msg_u32_round_trip(m in cluster_msg()) {
        let b = m.encode_u32();
        prop_assert_eq!(b.len(), U32_LEN);
        let mut want = m;
        if m.kind == MsgType::NewDisk {
            want.low = 0;
            want.high = 0;
        } else {
            want.uuid = Uuid::default();
        }
        prop_assert_eq!(ClusterMsg::decode_u32(&b).unwrap(), want);
        prop_assert!(ClusterMsg::decode_u32(&b[..U32_LEN - 1]).is_err());
    }

    #[test]
    fn bitmap_bits_follow_a_set_model(
        chunks in 0u64..2000,
        ops in prop::collection::vec((0u8..3, 0u64..2100), 0..300),
    ) {
        let mut bits = BitmapBits::new(chunks);
        let mut model = BTreeSet::new();
        for (op, j) in ops {
            match op {
                0 => {
                    bits.set(j);
                    if j < chunks {
                        model.insert(j);
                    }
                }
                1 => {
                    bits.clear(j);
                    model.remove(&j);
                }
                _ => prop_assert_eq!(bits.get(j), model.contains(&j)),
            }
        }
        prop_assert_eq!(bits.count_dirty(), model.len() as u64);
        prop_assert_eq!(bits.dirty().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        for j in 0..chunks + 9 {
            prop_assert_eq!(bits.get(j), model.contains(&j));
        }
        let back = BitmapBits::from_bytes(bits.as_bytes(), chunks).unwrap();
        prop_assert_eq!(back, bits);
    }

    #[test]
    fn bitmap_bits_from_bytes_counts_only_covered_bits(
        raw in prop::collection::vec(any::<u8>(), 0..300),
        chunks in 0u64..2500,
    ) {
        match BitmapBits::from_bytes(&raw, chunks) {
            Err(_) => prop_assert!((raw.len() as u64) < chunks.div_ceil(8)),
            Ok(bits) => {
                let want = (0..chunks)
                    .filter(|&j| raw[(j / 8) as usize] & (1 << (j % 8)) != 0)
                    .count() as u64;
                prop_assert_eq!(bits.count_dirty(), want);
                prop_assert_eq!(bits.dirty().count() as u64, want);
            }
        }
    }

    #[test]
    fn bitmap_bits_merge_is_union(
        chunks in 0u64..1500,
        a in prop::collection::btree_set(0u64..1500, 0..200),
        b in prop::collection::btree_set(0u64..1500, 0..200),
    ) {
        let make = |s: &BTreeSet<u64>| {
            let mut bits = BitmapBits::new(chunks);
            s.iter().for_each(|&j| bits.set(j));
            bits
        };
        let a: BTreeSet<u64> = a.into_iter().filter(|&j| j < chunks).collect();
        let b: BTreeSet<u64> = b.into_iter().filter(|&j| j < chunks).collect();
        let mut merged = make(&a);
        let added = merged.merge(&make(&b));
        let union: BTreeSet<u64> = a.union(&b).copied().collect();
        prop_assert_eq!(added, (union.len() - a.len()) as u64);
        prop_assert_eq!(merged.dirty().collect::<BTreeSet<_>>(), union);
    }

    #[test]
    fn bitmap_geometry_covers_sync_size(
        sync_size in prop_oneof![0u64..1 << 20, 0..=LIMIT],
        shift in 9u32..=31,
    ) {
        let g = BitmapGeometry::new(sync_size, 1 << shift).unwrap();
        let (chunks, cs) = (u128::from(g.chunks()), u128::from(g.chunk_sectors()));
        prop_assert_eq!(cs, 1u128 << (shift - 9));
        prop_assert!(chunks * cs >= u128::from(sync_size));
        if chunks > 0 {
            prop_assert!(u128::from(sync_size) > (chunks - 1) * cs);
        } else {
            prop_assert_eq!(sync_size, 0);
        }
        prop_assert!(g.bits_len() * 8 >= g.chunks());
        prop_assert!(g.bits_len() * 8 < g.chunks() + 8);
        prop_assert_eq!(g.slot_len() % SLOT_ALIGN, 0);
        prop_assert!(g.slot_len() >= BITMAP_SB_LEN as u64 + g.bits_len());
        prop_assert!(g.slot_len() < BITMAP_SB_LEN as u64 + g.bits_len() + SLOT_ALIGN);
    }

    #[test]
    fn bitmap_geometry_refuses_bad_chunks(chunk in any::<u32>()) {
        let ok = chunk >= 512 && chunk.is_power_of_two();
        prop_assert_eq!(BitmapGeometry::new(100, chunk).is_ok(), ok);
    }

    #[test]
    fn layout_plan_fits(
        legs in prop::collection::vec(2048u64..=(16u64 << 31), 2..=4),
        nodes in prop_oneof![Just(None), (2u32..=32).prop_map(Some)],
        chunk in prop_oneof![3 => Just(None), 1 => (9u32..=31).prop_map(|s| Some(1u64 << s))],
    ) {
        let req = CreateRequest { leg_sectors: legs.clone(), nodes, bitmap_chunk: chunk };
        match layout::plan(&req) {
            Err(e) => prop_assert!(
                matches!(
                    e,
                    LayoutError::LegTooSmall { .. }
                        | LayoutError::BadChunk { .. }
                        | LayoutError::NoRoomForBitmaps { .. }
                ),
                "unexpected refusal {:?}", e
            ),
            Ok(g) => {
                prop_assert_eq!(g.slots, nodes.unwrap_or(1));
                prop_assert!(g.size > 0);
                prop_assert_eq!(g.size % layout::SIZE_ROUNDING, 0);
                for &l in &legs {
                    prop_assert!(g.size <= l - g.data_offset);
                }
                prop_assert_eq!(g.bitmap.sync_size, g.size);
                prop_assert!(g.bitmap.chunksize >= 512 && g.bitmap.chunksize.is_power_of_two());
                if let Some(c) = chunk {
                    prop_assert_eq!(u64::from(g.bitmap.chunksize), c);
                }
                prop_assert!(g.max_dev as usize >= legs.len());
                prop_assert_eq!((SB_FIXED_LEN as u32 + 2 * g.max_dev) % 512, 0);
                // The bitmaps start after the superblock's 4 KiB block and end
                // before the data.
                let first = g.bitmap.slot_offset(g.super_offset, g.bitmap_offset, 0).unwrap();
                prop_assert!(first >= g.super_offset * 512 + SB_BLOCK_LEN as u64);
                let end = g.bitmap.slot_offset(g.super_offset, g.bitmap_offset, g.slots).unwrap();
                prop_assert!(end <= g.data_offset * 512);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn created_array_loads_back(
        mib in (8u64..=64, 8u64..=64),
        extra in (0u64..2048, 0u64..2048),
        clustered in any::<bool>(),
        nodes in 2u32..=8,
        chunk in prop_oneof![Just(None), (12u32..=26).prop_map(|s| Some(1u64 << s))],
        assume_clean in any::<bool>(),
        name in "[a-z:]{0,40}",
        now in any::<u64>(),
        set_uuid in prop::option::of(uuid()),
    ) {
        let a = MemLeg::new("a", (mib.0 << 20) + extra.0 * 512);
        let b = MemLeg::new("b", (mib.1 << 20) + extra.1 * 512);
        let opts = NewArray {
            name,
            cluster_name: clustered.then(|| "cluster".to_string()),
            nodes,
            bitmap_chunk: chunk,
            assume_clean,
            now,
            uuid: set_uuid,
        };
        let legs: [&dyn Leg; 2] = [&a, &b];
        let (g, metas) = match create_array(&legs, &opts) {
            Ok(r) => r,
            Err(e) => {
                // Only an explicitly requested chunk may be refused here.
                prop_assert!(chunk.is_some(), "refused: {}", e);
                return Ok(());
            }
        };
        prop_assert_eq!(metas.len(), 2);
        for (leg, want) in legs.iter().zip(&metas) {
            let got = LegMetadata::load(*leg).unwrap();
            let mut want = want.clone();
            want.sb.sb_csum = got.sb.sb_csum;
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(got.bitmaps.len() as u32, g.slots);
            let dirty0 = if assume_clean { 0 } else { g.bitmap.chunks() };
            prop_assert_eq!(got.bitmaps[0].bits.count_dirty(), dirty0);
        }
        if let Some(u) = set_uuid {
            prop_assert_eq!(metas[0].sb.set_uuid, u);
        }
    }
}

/// The claim behind `superblock_single_byte_flip_is_detected`, checked exhaustively on
/// one superblock: every value of every byte outside `sb_csum` and `max_dev` is
/// refused. (A change of one byte changes the 64-bit word sum by d, 0 < |d| < 2^32;
/// the folded 32-bit checksum could only stay equal if d were a non-zero multiple
/// of 2^32 - 1.)
#[test]
fn superblock_every_single_byte_change_is_refused() {
    let mut roles = vec![0xffff; 127];
    roles[0] = 0;
    roles[1] = 1;
    let sb = Superblock {
        feature_map: feature::BITMAP_OFFSET | feature::CLUSTERED,
        set_uuid: Uuid([0x35; 16]),
        set_name: *b"host:name\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ctime: 0xffff_ffff_ffff,
        level: 1,
        layout: 0,
        size: 129_024,
        chunksize: 0,
        raid_disks: 2,
        bitmap_offset: 8,
        new_level: 0,
        reshape_position: 0,
        delta_disks: 0,
        new_layout: 0,
        new_chunk: 0,
        new_offset: 0,
        data_offset: 2048,
        data_size: 129_024,
        super_offset: 8,
        recovery_offset: 0,
        dev_number: 1,
        cnt_corrected_read: 0,
        device_uuid: Uuid([0xee; 16]),
        devflags: 0,
        bblog_shift: 0,
        bblog_size: 0,
        bblog_offset: 0,
        utime: u64::MAX,
        events: 0xffff_ffff,
        resync_offset: u64::MAX,
        sb_csum: 0,
        dev_roles: roles,
    };
    let good = sb.encode();
    decoded_equals(&sb, &good).unwrap();
    for i in (0..sb.sb_len()).filter(|i| !(216..224).contains(i)) {
        for x in 1..=255u8 {
            let mut b = good.clone();
            b[i] ^= x;
            assert!(
                Superblock::decode(&b).is_err(),
                "byte {i} ^ {x:#x} went unnoticed"
            );
        }
    }
}
