//! Arrays made by the Linux kernel and mdadm (2- and 3-node md-cluster, plain) decode
//! field for field as `mdadm -E` / `mdadm -X` printed them.

mod common;

use flate2::read::GzDecoder;
use std::io::Read;
use std::path::PathBuf;
use vhost_user_md::cli::examine::{render_leg, report_leg, verdict};
use vhost_user_md::raid1::metadata::LegMetadata;
use vhost_user_md::storage::{Leg, MemLeg};

/// The legs were 64 MiB; the fixtures keep their first MiB (all the metadata).
const LEG_SIZE: u64 = 64 << 20;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/mdadm-clustered")
}

fn load(set: &str, leg: &str) -> LegMetadata {
    let gz = std::fs::read(
        data_dir()
            .join(set)
            .join(format!("{leg}-first1024KiB.img.gz")),
    )
    .expect("fixture image");
    let mut cut = Vec::new();
    GzDecoder::new(&gz[..]).read_to_end(&mut cut).unwrap();
    assert_eq!(cut.len(), 1 << 20);
    let m = MemLeg::new(leg, LEG_SIZE);
    m.write_at(&cut, 0).unwrap();
    LegMetadata::load(&m).unwrap_or_else(|e| panic!("{set}/{leg}: {e}"))
}

fn mdadm_text(set: &str, leg: &str) -> String {
    let e =
        std::fs::read_to_string(data_dir().join(set).join(format!("{leg}.mdadm-E.txt"))).unwrap();
    let x =
        std::fs::read_to_string(data_dir().join(set).join(format!("{leg}.mdadm-X.txt"))).unwrap();
    format!("{e}{x}")
}

const SETS: &[&str] = &[
    "clustered-2node-assembled",
    "clustered-2node-stopped",
    "clustered-chunk1M-2node-writing",
    "clustered-chunk1M-stopped",
    "clustered-chunk1M-3node-writing",
    "clustered-chunk1M-3node-stopped",
    "plain-chunk1M-writing",
    "plain-chunk1M-stopped",
];

#[test]
fn every_fixture_decodes_as_mdadm_printed_it() {
    for set in SETS {
        for leg in ["legA", "legB"] {
            let m = load(set, leg);
            let ours = render_leg(&report_leg(leg, &m));
            common::assert_same_lines(&mdadm_text(set, leg), &ours, &format!("{set}/{leg}"));
        }
    }
}

#[test]
fn both_legs_of_each_fixture_form_one_array() {
    for set in SETS {
        let legs = vec![
            ("legA".to_string(), load(set, "legA")),
            ("legB".to_string(), load(set, "legB")),
        ];
        let v = verdict(&legs);
        assert!(v.consistent, "{set}: {:?}", v.problems);
        assert_eq!(legs[0].1.sb.role(), 0);
        assert_eq!(legs[1].1.sb.role(), 1);
    }
}

fn dirty(m: &LegMetadata) -> Vec<u64> {
    m.bitmaps.iter().map(|b| b.bits.count_dirty()).collect()
}

#[test]
fn per_node_dirty_bits_are_where_the_nodes_wrote() {
    // node1 wrote MiB 0-7, node2 MiB 32-35 (1 MiB chunks).
    let m = load("clustered-chunk1M-2node-writing", "legA");
    assert_eq!(dirty(&m), vec![8, 4, 0, 0]);
    assert_eq!(
        m.bitmaps[0].bits.dirty().collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    assert_eq!(
        m.bitmaps[1].bits.dirty().collect::<Vec<_>>(),
        vec![32, 33, 34, 35]
    );
    // Three nodes: slot 0 still all dirty from create, node2 MiB 16-19, node3 MiB 32-35.
    let m = load("clustered-chunk1M-3node-writing", "legB");
    assert_eq!(dirty(&m), vec![63, 4, 4, 0]);
    assert_eq!(
        m.bitmaps[1].bits.dirty().collect::<Vec<_>>(),
        vec![16, 17, 18, 19]
    );
    assert_eq!(
        m.bitmaps[2].bits.dirty().collect::<Vec<_>>(),
        vec![32, 33, 34, 35]
    );
    assert_eq!(m.bitmap().cluster_name(), "vmhclu");
    assert_eq!(m.sb.set_uuid.mdadm(), "c7dadcf9:2a658cf6:d0c6eac4:930cc737");
    assert_eq!(
        m.sb.set_uuid.lockspace_name(),
        "c7dadcf9-2a65-8cf6-d0c6-eac4930cc737"
    );
    assert!(!m.sb.is_clean(), "md-cluster leaves the superblock active");
    // Plain internal bitmap: one bitmap, version 4, 8 dirty chunks while writing.
    let m = load("plain-chunk1M-writing", "legA");
    assert_eq!(m.bitmaps.len(), 1);
    assert_eq!(m.bitmap().version, 4);
    assert_eq!(dirty(&m), vec![8]);
    let m = load("plain-chunk1M-stopped", "legA");
    assert!(m.sb.is_clean());
    assert_eq!(dirty(&m), vec![0]);
}

#[test]
fn reencoding_a_kernel_superblock_is_byte_exact() {
    for set in SETS {
        let gz = std::fs::read(data_dir().join(set).join("legA-first1024KiB.img.gz")).unwrap();
        let mut cut = Vec::new();
        GzDecoder::new(&gz[..]).read_to_end(&mut cut).unwrap();
        let m = load(set, "legA");
        let sb_len = m.sb.sb_len();
        assert_eq!(&m.sb.encode()[..sb_len], &cut[4096..4096 + sb_len], "{set}");
        let g = m.bitmap().geometry();
        for b in &m.bitmaps {
            let off = g.slot_offset(8, 8, b.slot).unwrap() as usize;
            assert_eq!(
                &b.sb.encode()[..],
                &cut[off..off + 256],
                "{set} slot {}",
                b.slot
            );
        }
    }
}
