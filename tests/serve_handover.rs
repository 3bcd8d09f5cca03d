//! Handover from kernel md-cluster nodes: an array the kernel left with dirty
//! per-node bitmaps is served here (by a node of ours over lockd: a clustered
//! array is never served with the local lock manager), and exactly the chunks
//! dirty in any node's bitmap are resynced; afterwards every node slot is clean.

mod common;

use common::{bin, Lockd, Serve};
use flate2::read::GzDecoder;
use std::io::Read;
use std::time::{Duration, Instant};

#[test]
fn dirty_bitmaps_of_kernel_nodes_are_resynced_then_cleared() {
    let d = tempfile::tempdir().unwrap();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/mdadm-clustered/clustered-chunk1M-2node-writing");
    let mut legs = Vec::new();
    for name in ["legA", "legB"] {
        let gz = std::fs::read(data.join(format!("{name}-first1024KiB.img.gz"))).unwrap();
        let mut cut = Vec::new();
        GzDecoder::new(&gz[..]).read_to_end(&mut cut).unwrap();
        let path = d.path().join(format!("{name}.img"));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &cut, 0).unwrap();
        legs.push(path);
    }
    // node1 (slot 0) had MiB 0-7 dirty, node2 (slot 1) MiB 32-35: 12 chunks of 1 MiB.
    let sock = d.path().join("vm.sock");
    let lockd = Lockd::start();
    let lm = format!("lockd:{}", lockd.socket.display());
    let mut serve = Serve::start(
        &sock,
        &[
            "--lock-manager",
            &lm,
            legs[0].to_str().unwrap(),
            legs[1].to_str().unwrap(),
        ],
    );
    let start = Instant::now();
    let s = loop {
        let s = serve.status();
        if s["resync"]["remaining_chunks"] == 0 && s["resync"]["active"] == false {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["resync"]["bytes_copied"].as_u64().unwrap(), 12 << 20);
    // Our node claims slot 1 (node2's, 4 dirty chunks, resynced as its own) and
    // takes over free slot 0 (node1's 8 chunks).
    assert_eq!(s["node_slot"], 1, "{s}");
    assert!(
        serve
            .log_text()
            .contains("took over 8 dirty chunks of free node slot 0"),
        "{}",
        serve.log_text()
    );
    assert!(serve.stop().success());
    let out = bin()
        .args(["examine", "--json"])
        .args(&legs)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["array"]["consistent"], true, "{v}");
    for leg in 0..2 {
        for slot in v["legs"][leg]["bitmap"]["slots"].as_array().unwrap() {
            assert_eq!(slot["dirty"], 0, "{slot}");
        }
    }
}
