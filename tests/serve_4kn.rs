//! Legs with 4 KiB logical blocks: the guest is told 4 KiB blocks (as QEMU tells it
//! for a 4Kn host device), so no write is smaller than a leg's block; a request
//! that is not whole blocks fails alone, without a read-modify-write of the block
//! under another queue's write.

mod common;

use common::{bin, pattern, Client, Loop, Serve};
use std::path::PathBuf;

const MIB: usize = 1 << 20;

#[test]
fn a_guest_on_4k_sector_legs_is_told_4k_blocks_and_partial_blocks_fail_alone() {
    let d = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = ["a.img", "b.img"]
        .iter()
        .map(|n| d.path().join(n))
        .collect();
    for f in &files {
        std::fs::File::create(f).unwrap().set_len(64 << 20).unwrap();
    }
    let loops: Vec<Loop> = files.iter().map(|f| Loop::attach_4k(f)).collect();
    let devs: Vec<&str> = loops.iter().map(|l| l.dev.to_str().unwrap()).collect();
    let out = bin()
        .args(["create", "--assume-clean", "--bitmap-chunk", "1M"])
        .args(&devs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serve = Serve::start(
        &d.path().join("vm.sock"),
        &[&["--queues", "2"][..], &devs].concat(),
    );
    let mut c = Client::connect(&serve.socket, 2, 4 * MIB);
    assert_eq!(
        c.blkio.get_i32("request-alignment").unwrap(),
        4096,
        "the guest is told the legs' 4 KiB blocks"
    );
    // Whole blocks from both queues at once, interleaved in one region.
    let reqs0: Vec<(bool, u64, usize, usize)> = (0..64)
        .map(|i| (true, (2 * i) as u64 * 4096, 2 * i * 4096, 4096))
        .collect();
    let reqs1: Vec<(bool, u64, usize, usize)> = (0..64)
        .map(|i| (true, (2 * i + 1) as u64 * 4096, (2 * i + 1) * 4096, 4096))
        .collect();
    let data = pattern(4, 0, 128 * 4096);
    c.buf()[..data.len()].copy_from_slice(&data);
    for (_, r) in c.batch(0, &reqs0) {
        assert_eq!(r, 0);
    }
    for (_, r) in c.batch(1, &reqs1) {
        assert_eq!(r, 0);
    }
    assert_eq!(c.read(0, 0, 2 * MIB, 128 * 4096), 0);
    assert!(
        c.buf()[2 * MIB..2 * MIB + data.len()] == data[..],
        "read back"
    );
    // Half a block: refused, not a read-modify-write of the block.
    c.buf()[..512].fill(0xee);
    assert_ne!(
        c.write(0, 512, 0, 512),
        0,
        "a 512-byte write on 4 KiB blocks was served"
    );
    assert_eq!(c.read(1, 0, 0, 4096), 0);
    assert!(c.buf()[..4096] == data[..4096], "the block is as it was");
    let s = serve.status();
    assert_eq!(s["degraded"], false, "{s}");
}
