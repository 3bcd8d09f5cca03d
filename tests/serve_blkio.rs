//! `serve` driven by libblkio (an independent vhost-user-blk client): data written
//! through several queues reads back, lands identically on both legs, and FLUSH,
//! DISCARD and WRITE_ZEROES work.

mod common;

use common::{data_area, pattern, Client, Serve};

const MIB: usize = 1 << 20;

#[test]
fn whole_disk_pattern_on_two_queues_lands_on_both_legs() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "64M",
            "--queues",
            "2",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect(&sock, 2, 8 * MIB);
    assert_eq!(c.capacity, 129_024 * 512);
    let cap = c.capacity;
    // Write the whole disk in 1 MiB requests, 4 at a time, alternating queues.
    let step = MIB as u64;
    let mut off = 0;
    let mut q = 0;
    while off < cap {
        let mut reqs = Vec::new();
        for k in 0..4 {
            let o = off + k * step;
            if o >= cap {
                break;
            }
            let len = step.min(cap - o) as usize;
            let data = pattern(1, o, len);
            c.buf()[k as usize * MIB..k as usize * MIB + len].copy_from_slice(&data);
            reqs.push((true, o, k as usize * MIB, len));
        }
        for (i, ret) in c.batch(q, &reqs) {
            assert_eq!(ret, 0, "write {i} at {off} failed");
        }
        off += 4 * step;
        q ^= 1;
    }
    assert_eq!(c.flush(0), 0);
    // Read back everything on the other queue pattern, verify (1 MiB a request:
    // the device's size_max, which a client must not exceed in one segment).
    let mut off = 0;
    let mut q = 1;
    while off < cap {
        let len = step.min(cap - off) as usize;
        assert_eq!(c.read(q, off, 0, len), 0);
        assert!(
            c.buf()[..len] == pattern(1, off, len)[..],
            "mismatch at {off}"
        );
        off += len as u64;
        q ^= 1;
    }
    // Discard 2 MiB and zero 1 MiB (unaligned to chunks), both must read as zeroes.
    assert_eq!(c.discard(0, 8 * step, 2 * step), 0);
    assert_eq!(c.write_zeroes(1, 20 * step + 4096, step), 0);
    assert_eq!(c.flush(1), 0);
    for (o, l) in [(8 * step, MIB), (9 * step, MIB), (20 * step + 4096, MIB)] {
        assert_eq!(c.read(0, o, 0, l), 0);
        assert!(
            c.buf()[..l].iter().all(|&x| x == 0),
            "range at {o} not zero"
        );
    }
    // Neighbours are untouched.
    assert_eq!(c.read(0, 10 * step, 0, 4096), 0);
    assert!(c.buf()[..4096] == pattern(1, 10 * step, 4096)[..]);
    // Out-of-range I/O fails cleanly and the device keeps serving.
    assert_ne!(c.read(0, cap - 512, 0, 4096), 0);
    assert_eq!(c.read(0, cap - 4096, 0, 4096), 0);
    drop(c);
    let st = serve.stop();
    assert!(st.success(), "serve exit: {st}: {}", serve.log_text());
    let (da, db) = (data_area(&a), data_area(&b));
    assert!(da == db, "legs differ after a clean stop");
    assert!(
        serve.log_text().contains("array marked clean"),
        "{}",
        serve.log_text()
    );
    // The array is clean on disk: no dirty chunk, clean state.
    let ex = common::bin()
        .args(["examine", "--json"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    assert_eq!(v["array"]["consistent"], true);
    assert_eq!(v["legs"][0]["superblock"]["state"], "clean");
    assert_eq!(v["legs"][0]["bitmap"]["slots"][0]["dirty"], 0);
}

/// A front-end that closes its connection (a VM shut down, the source of a
/// migration) is an ordinary end: logged as a disconnection, not as a warning,
/// and the next front-end is served.
#[test]
fn a_front_end_that_disconnects_is_logged_as_such_not_as_a_warning() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "16M",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    for round in 1..=2 {
        let mut c = Client::connect(&sock, 1, MIB);
        assert_eq!(c.read(0, 0, 0, 4096), 0);
        drop(c);
        let start = std::time::Instant::now();
        while serve.log_text().matches("front-end disconnected").count() < round {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "no disconnection logged: {}",
                serve.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
    }
    let log = serve.log_text();
    assert!(
        !log.lines().any(|l| l.contains("WARN")),
        "a warning for an ordinary disconnection: {log}"
    );
    assert!(serve.stop().success());
}
