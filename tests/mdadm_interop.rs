//! `mdadm --examine` and `mdadm --examine-bitmap` (Debian's mdadm) accept what
//! `vhost-user-md create` writes, clustered and plain, and show what was asked for.

mod common;

use common::{bin, key_values, mdadm, value, values, Loop};
use std::path::PathBuf;

struct Case {
    legs: usize,
    size: &'static str,
    cluster: Option<(&'static str, u32)>,
    chunk: Option<&'static str>,
    /// What mdadm must print.
    array_kib: u64,
    data_offset: u64,
    chunk_text: &'static str,
}

fn run_case(c: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let legs: Vec<PathBuf> = (0..c.legs)
        .map(|i| dir.path().join(format!("leg{i}.img")))
        .collect();
    let mut cmd = bin();
    cmd.arg("create")
        .args(["--size", c.size, "--name", "interop"]);
    if let Some((name, nodes)) = c.cluster {
        cmd.args(["--cluster-name", name, "--nodes", &nodes.to_string()]);
    }
    if let Some(chunk) = c.chunk {
        cmd.args(["--bitmap-chunk", chunk]);
    }
    let out = cmd.args(&legs).output().unwrap();
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let json = bin()
        .arg("examine")
        .arg("--json")
        .args(&legs)
        .output()
        .unwrap();
    assert!(json.status.success());
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["array"]["consistent"], true, "{report}");
    let uuid = report["legs"][0]["superblock"]["array_uuid"]
        .as_str()
        .unwrap()
        .to_string();

    for (i, leg) in legs.iter().enumerate() {
        let lo = Loop::attach(leg);
        let e = mdadm(&["--examine"], &lo.dev);
        let x = mdadm(&["--examine-bitmap"], &lo.dev);
        let ekv = key_values(&e);
        let xkv = key_values(&x);
        let what = format!("{:?} leg {i}", c.cluster);
        assert_eq!(
            value(&ekv, "Array UUID"),
            Some(uuid.as_str()),
            "{what}\n{e}"
        );
        assert_eq!(value(&ekv, "Version"), Some("1.2"));
        assert_eq!(value(&ekv, "Raid Level"), Some("raid1"));
        assert_eq!(
            value(&ekv, "Raid Devices"),
            Some(c.legs.to_string().as_str())
        );
        let array_size = value(&ekv, "Array Size").unwrap();
        assert!(
            array_size.starts_with(&format!("{} KiB", c.array_kib)),
            "{what}: {array_size}"
        );
        assert_eq!(
            value(&ekv, "Data Offset"),
            Some(format!("{} sectors", c.data_offset).as_str())
        );
        assert!(
            value(&ekv, "Checksum").unwrap().ends_with("- correct"),
            "{e}"
        );
        assert_eq!(
            value(&ekv, "Device Role"),
            Some(format!("Active device {i}").as_str())
        );
        assert_eq!(
            value(&ekv, "Array State").map(|s| &s[..c.legs]),
            Some("A".repeat(c.legs).as_str())
        );
        assert_eq!(value(&xkv, "UUID"), Some(uuid.as_str()));
        assert_eq!(value(&xkv, "Chunksize"), Some(c.chunk_text));
        assert_eq!(
            value(&xkv, "Sync Size").map(|s| s.split(' ').next().unwrap()),
            Some(c.array_kib.to_string().as_str())
        );
        match c.cluster {
            Some((name, nodes)) => {
                assert_eq!(value(&ekv, "Feature Map"), Some("0x101"));
                assert_eq!(value(&ekv, "Cluster Name"), Some(name));
                assert_eq!(value(&xkv, "Version"), Some("5"));
                assert_eq!(
                    value(&xkv, "Cluster nodes"),
                    Some(nodes.to_string().as_str())
                );
                assert_eq!(value(&xkv, "Cluster name"), Some(name));
                let slots: Vec<String> = (0..nodes).map(|n| n.to_string()).collect();
                assert_eq!(values(&xkv, "Node Slot"), slots);
                assert_eq!(values(&xkv, "Events"), vec!["0"; nodes as usize]);
                assert!(values(&xkv, "State").iter().all(|s| *s == "OK"));
                // Slot 0 starts all dirty (initial resync), the other slots clean.
                let bitmaps = values(&xkv, "Bitmap");
                assert!(bitmaps[0].contains("(100.0%)"), "{x}");
                assert!(bitmaps[1..].iter().all(|b| b.contains(" 0 dirty")), "{x}");
            }
            None => {
                assert_eq!(value(&ekv, "Feature Map"), Some("0x1"));
                assert_eq!(value(&xkv, "Version"), Some("4"));
                assert_eq!(value(&xkv, "Cluster nodes"), None);
                assert_eq!(value(&xkv, "Events"), Some("0"));
            }
        }
        // And our own examine prints every line mdadm prints, the same way.
        let ours = bin().arg("examine").arg(leg).output().unwrap();
        let ours = String::from_utf8_lossy(&ours.stdout).replace(
            &format!("Filename : {}", leg.display()),
            &format!("Filename : {}", lo.dev.display()),
        );
        // mdadm adds "  (local to host H)" after a name that starts with this host's name.
        let theirs: String = e
            .lines()
            .map(|l| l.split("  (local to host ").next().unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        common::assert_same_lines(&format!("{theirs}{x}"), &ours, &what);
    }
}

#[test]
fn clustered_four_nodes_default_chunk() {
    run_case(&Case {
        legs: 2,
        size: "64M",
        cluster: Some(("prod", 4)),
        chunk: None,
        array_kib: 64512,
        data_offset: 2048,
        chunk_text: "64 MB",
    });
}

#[test]
fn clustered_two_nodes_1m_chunk_1g() {
    run_case(&Case {
        legs: 2,
        size: "1G",
        cluster: Some(("vmhclu", 2)),
        chunk: Some("1M"),
        array_kib: 1_046_528,
        data_offset: 4096,
        chunk_text: "1 MB",
    });
}

#[test]
fn clustered_eight_nodes_three_legs_small_chunk() {
    // 3 GiB: 24576 bits of 128 KiB = 3 KiB of bits per node, 8 nodes.
    run_case(&Case {
        legs: 3,
        size: "3G",
        cluster: Some(("a-cluster-name-of-some-length", 8)),
        chunk: Some("128K"),
        array_kib: 3_142_656,
        data_offset: 6144,
        chunk_text: "128 KB",
    });
}

#[test]
fn plain_internal_bitmap() {
    run_case(&Case {
        legs: 2,
        size: "64M",
        cluster: None,
        chunk: None,
        array_kib: 64512,
        data_offset: 2048,
        chunk_text: "64 MB",
    });
}

#[test]
fn plain_three_legs_20g_sparse() {
    run_case(&Case {
        legs: 3,
        size: "20G",
        cluster: None,
        chunk: Some("4M"),
        array_kib: 20_954_112,
        data_offset: 34816,
        chunk_text: "4 MB",
    });
}
