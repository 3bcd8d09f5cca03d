//! Two `serve` processes on one host serve one clustered mirror as two md-cluster
//! nodes over `lockd`: each writes its own bitmap slot, data written through one
//! reads back through the other, and when one is killed the other recovers its
//! slot, resyncing exactly the chunks it left dirty.

mod common;

use common::{bin, data_area, pattern, Client, Lockd, Serve};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 64 * 1024;

#[test]
fn two_nodes_share_a_mirror_and_a_survivor_recovers_a_killed_node() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let out = bin()
        .args([
            "create",
            "--assume-clean",
            "--cluster-name",
            "host1",
            "--size",
            "64M",
            "--bitmap-chunk",
            "1M",
        ])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lm = format!("lockd:{}", lockd.socket.display());
    let legs = [a.to_str().unwrap(), b.to_str().unwrap()];
    let (s1, s2) = (d.path().join("n1.sock"), d.path().join("n2.sock"));
    let mut n1 = Serve::start(&s1, &["--lock-manager", &lm, legs[0], legs[1]]);
    let n2 = Serve::start(&s2, &["--lock-manager", &lm, legs[0], legs[1]]);
    let (st1, st2) = (n1.status(), n2.status());
    assert_eq!(
        (st1["node_slot"].as_u64(), st2["node_slot"].as_u64()),
        (Some(0), Some(1))
    );

    // Node 1 writes MiB 0..4, node 2 reads it back.
    let mut c1 = Client::connect(&s1, 1, BLOCK);
    for i in 0..64u64 {
        let off = i * BLOCK as u64;
        let data = pattern(3, off, BLOCK);
        c1.buf()[..BLOCK].copy_from_slice(&data);
        assert_eq!(c1.write(0, off, 0, BLOCK), 0);
    }
    let mut c2 = Client::connect(&s2, 1, BLOCK);
    for i in 0..64u64 {
        let off = i * BLOCK as u64;
        assert_eq!(c2.read(0, off, 0, BLOCK), 0);
        assert!(
            c2.buf()[..BLOCK] == pattern(3, off, BLOCK)[..],
            "node 2 reads node 1's data at {off}"
        );
    }
    // Node 1 writes into MiB 20..23 and is killed with its bits still set.
    for i in 0..48u64 {
        let off = 20 * MIB + i * BLOCK as u64;
        let data = pattern(4, off, BLOCK);
        c1.buf()[..BLOCK].copy_from_slice(&data);
        assert_eq!(c1.write(0, off, 0, BLOCK), 0);
    }
    let ex = bin().args(["examine", "--json"]).arg(&a).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    let dirty = v["legs"][0]["bitmap"]["slots"][0]["dirty"]
        .as_u64()
        .unwrap();
    assert!(dirty >= 3, "node 1's slot has its chunks dirty: {v}");
    drop(c1);
    n1.kill9();
    // Node 2 sees node 1 die (lockd dropped its connection), merges and resyncs.
    let s = n2.wait_for("recovery of node 1's slot", |s| {
        s["resync"]["bytes_copied"].as_u64().unwrap_or(0) >= dirty * MIB
            && s["resync"]["active"] == false
            && s["resync"]["remaining_chunks"] == 0
    });
    assert_eq!(
        s["resync"]["bytes_copied"].as_u64().unwrap(),
        dirty * MIB,
        "exactly node 1's dirty chunks"
    );
    for i in 0..48u64 {
        let off = 20 * MIB + i * BLOCK as u64;
        assert_eq!(c2.read(0, off, 0, BLOCK), 0);
        assert!(c2.buf()[..BLOCK] == pattern(4, off, BLOCK)[..]);
    }
    drop(c2);
    let mut n2 = n2;
    assert!(n2.stop().success());
    assert!(data_area(&a) == data_area(&b), "legs identical");
    let ex = bin().args(["examine", "--json"]).arg(&a).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(
        v["legs"][0]["bitmap"]["slots"][0]["dirty"], 0,
        "node 1's slot was cleared"
    );
}
