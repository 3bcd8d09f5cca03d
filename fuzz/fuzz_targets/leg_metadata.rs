//! `LegMetadata::load` on a leg whose metadata area comes from the input.
//!
//! The first input byte chooses how the leg is made:
//! - bits 0-1: 0 = a zeroed leg with the rest of the input written at the
//!   superblock's place (byte 4096); 1-3 = a valid metadata image (plain bitmap,
//!   clustered with 4 nodes, clustered with 2 nodes and one-chunk bitmaps) patched
//!   by the rest of the input, read as records `offset: u16le, len: u8 (low 4 bits),
//!   len bytes`;
//! - bit 2: recompute the superblock checksum after writing the input;
//! - bits 3-4: the leg size (2 MiB, 1 MiB, 64 KiB or 9 KiB).
//!
//! Whatever loads must survive being written to a fresh leg and loaded again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use vhost_user_md::md::superblock::{checksum, MAX_DEVS, SB_BLOCK_LEN, SB_BYTE_OFFSET};
use vhost_user_md::md::Uuid;
use vhost_user_md::raid1::metadata::{build_new_array, write_leg_metadata, LegMetadata, NewArray};
use vhost_user_md::storage::{Leg, MemLeg};

const TEMPLATE_LEG: u64 = 2 << 20;
const LEG_SIZES: [u64; 4] = [TEMPLATE_LEG, 1 << 20, 64 << 10, 9 << 10];

/// The metadata prefix (superblock and bitmaps) of a freshly created leg.
fn template(cluster: Option<u32>, chunk: Option<u64>) -> Vec<u8> {
    let opts = NewArray {
        name: "host:fuzz".into(),
        cluster_name: cluster.map(|_| "fuzz".into()),
        nodes: cluster.unwrap_or(0),
        bitmap_chunk: chunk,
        assume_clean: false,
        now: 1_700_000_000,
        uuid: None,
    };
    let sizes = [TEMPLATE_LEG, TEMPLATE_LEG];
    let (g, metas) = build_new_array(
        &sizes,
        &opts,
        &[Uuid([1; 16]), Uuid([2; 16])],
        Uuid([3; 16]),
    )
    .expect("template geometry");
    let leg = MemLeg::new("template", TEMPLATE_LEG);
    write_leg_metadata(&leg, &metas[0]).expect("template write");
    let end = g
        .bitmap
        .slot_offset(g.super_offset, g.bitmap_offset, g.slots)
        .expect("template slots");
    leg.contents()[..end as usize].to_vec()
}

fn templates() -> &'static [Vec<u8>; 3] {
    static T: OnceLock<[Vec<u8>; 3]> = OnceLock::new();
    T.get_or_init(|| {
        [
            template(None, Some(4096)),
            template(Some(4), Some(4096)),
            template(Some(2), None),
        ]
    })
}

/// One leg per size, and one to write loaded metadata back to, reused across runs
/// (allocating megabytes per run would dominate the run time).
fn legs() -> &'static ([MemLeg; 4], [MemLeg; 4]) {
    static L: OnceLock<([MemLeg; 4], [MemLeg; 4])> = OnceLock::new();
    L.get_or_init(|| {
        let make = |name| LEG_SIZES.map(|size| MemLeg::new(name, size));
        (make("fuzz"), make("copy"))
    })
}

/// Zeroes the first `len` bytes of `leg`.
fn clear(leg: &MemLeg, len: u64) {
    static ZEROS: OnceLock<Vec<u8>> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| vec![0; TEMPLATE_LEG as usize]);
    let len = len.min(leg.size()) as usize;
    leg.write_at(&zeros[..len], 0).unwrap();
}

fn write_clipped(leg: &MemLeg, buf: &[u8], off: u64) {
    let end = (off + buf.len() as u64).min(leg.size());
    if off < end {
        leg.write_at(&buf[..(end - off) as usize], off).unwrap();
    }
}

fn fix_checksum(leg: &MemLeg) {
    if leg.size() < SB_BYTE_OFFSET + SB_BLOCK_LEN as u64 {
        return;
    }
    let mut sb = vec![0u8; SB_BLOCK_LEN];
    leg.read_at(&mut sb, SB_BYTE_OFFSET).unwrap();
    let max_dev = u32::from_le_bytes([sb[220], sb[221], sb[222], sb[223]]);
    if max_dev <= MAX_DEVS {
        let csum = checksum(&sb, max_dev);
        leg.write_at(&csum.to_le_bytes(), SB_BYTE_OFFSET + 216)
            .unwrap();
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let which = usize::from(mode >> 3) & 3;
    let (leg, copy) = (&legs().0[which], &legs().1[which]);
    // Everything the input can reach: 64 KiB of patches, or the raw bytes.
    clear(leg, (SB_BYTE_OFFSET + rest.len() as u64).max(0x10000 + 16));
    match mode & 3 {
        0 => write_clipped(leg, rest, SB_BYTE_OFFSET),
        t => {
            write_clipped(leg, &templates()[usize::from(t) - 1], 0);
            let mut rest = rest;
            while let [a, b, n, tail @ ..] = rest {
                let n = usize::from(n & 15).min(tail.len());
                write_clipped(leg, &tail[..n], u64::from(u16::from_le_bytes([*a, *b])));
                rest = &tail[n..];
            }
        }
    }
    if mode & 4 != 0 {
        fix_checksum(leg);
    }
    let Ok(m) = LegMetadata::load(leg) else {
        return;
    };
    assert_eq!(m.bitmaps.len() as u32, m.bitmap().slots());
    let sb = &m.sb;
    let _ = (sb.check_raid1(), sb.role(), sb.name(), sb.array_state());
    for b in &m.bitmaps {
        assert!(b.bits.count_dirty() <= b.bits.chunks());
    }
    // The metadata lies before the data area.
    clear(
        copy,
        m.sb.data_offset.saturating_mul(512).max(2 * SB_BYTE_OFFSET),
    );
    write_leg_metadata(copy, &m).expect("loaded metadata can be written back");
    let again = LegMetadata::load(copy).expect("written metadata loads");
    let mut want = m.clone();
    want.sb.sb_csum = again.sb.sb_csum;
    assert_eq!(again, want);
});
