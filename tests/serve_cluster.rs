//! Two `serve` processes on one host serve one clustered mirror as two md-cluster
//! nodes over `lockd`: each writes its own bitmap slot, data written through one
//! reads back through the other, and when one is killed the other recovers its
//! slot, resyncing exactly the chunks it left dirty.
//!
//! Long file: the process scenarios of one setup (two nodes over one lockd) share
//! its helpers; each test is short.

mod common;

use common::vring::{connect, header, regions, set_up_vring, Guest, HIGH, T_OUT};
use common::{bin, data_area, leg_state, pattern, Client, Lockd, Serve};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const BLOCK: usize = 64 * 1024;

/// Creates a clustered array of `legs` legs of `size` with 1 MiB bitmap chunks.
fn clustered(dir: &Path, legs: usize, size: &str) -> Vec<PathBuf> {
    let paths: Vec<PathBuf> = (0..legs).map(|i| dir.join(format!("leg{i}.img"))).collect();
    let out = bin()
        .args([
            "create",
            "--assume-clean",
            "--cluster-name",
            "host1",
            "--size",
            size,
            "--bitmap-chunk",
            "1M",
        ])
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    paths
}

/// A node whose guests write together with the other nodes' (`--shared-writes`).
fn node(dir: &Path, name: &str, lockd: &Lockd, legs: &[PathBuf], extra: &[&str]) -> Serve {
    let lm = format!("lockd:{}", lockd.socket.display());
    let mut args: Vec<&str> = vec!["--lock-manager", &lm, "--shared-writes"];
    args.extend_from_slice(extra);
    args.extend(legs.iter().map(|p| p.to_str().unwrap()));
    Serve::start(&dir.join(format!("{name}.sock")), &args)
}

/// Fails and removes leg 1 through `n`, and makes a blank replacement next to the
/// legs (so every node can find it). Returns its path.
fn take_out_and_replace(dir: &Path, n: &Serve, legs: &[PathBuf]) -> PathBuf {
    for op in ["fail", "remove"] {
        let (ok, out) = n.manage(op, &legs[1]);
        assert!(ok, "{op}: {out}");
    }
    let new = dir.join("leg-new.img");
    std::fs::File::create(&new)
        .unwrap()
        .set_len(std::fs::metadata(&legs[0]).unwrap().len())
        .unwrap();
    new
}

/// Overwrites the first `len` bytes of leg 1's data area with pattern `seed`:
/// the legs then differ there, as a crash between the legs' writes leaves them.
fn scribble_on_leg1(legs: &[PathBuf], seed: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&legs[1])
        .unwrap();
    let sb = vhost_user_md::md::Superblock::decode(&std::fs::read(&legs[0]).unwrap()[4096..8192])
        .unwrap();
    f.write_all_at(&pattern(seed, 0, len as usize), sb.data_offset * 512)
        .unwrap();
}

/// Writes `len` bytes of pattern `seed` at `off` in BLOCK pieces.
fn write_pattern(c: &mut Client, seed: u64, off: u64, len: u64) {
    for o in (off..off + len).step_by(BLOCK) {
        let data = pattern(seed, o, BLOCK);
        c.buf()[..BLOCK].copy_from_slice(&data);
        assert_eq!(c.write(0, o, 0, BLOCK), 0, "write at {o}");
    }
}

/// Reads `len` bytes at `off` and checks them against pattern `seed`.
fn check_pattern(c: &mut Client, seed: u64, off: u64, len: u64, who: &str) {
    for o in (off..off + len).step_by(BLOCK) {
        assert_eq!(c.read(0, o, 0, BLOCK), 0, "{who}: read at {o}");
        assert!(
            c.buf()[..BLOCK] == pattern(seed, o, BLOCK)[..],
            "{who}: data at {o} is not pattern {seed}"
        );
    }
}

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
        (Some(1), Some(2)),
        "slot 0 is taken last"
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
    let dirty = v["legs"][0]["bitmap"]["slots"][1]["dirty"]
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
        v["legs"][0]["bitmap"]["slots"][1]["dirty"], 0,
        "node 1's slot was cleared"
    );
}

#[test]
fn three_nodes_write_disjoint_and_overlapping_ranges_and_agree() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let nodes: Vec<Serve> = (1..=3)
        .map(|i| node(d.path(), &format!("n{i}"), &lockd, &legs, &[]))
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        let c = n.status()["cluster"].clone();
        assert_eq!(c["slot"], i as u64 + 1, "{c}");
        let want: Vec<u64> = (1..4).filter(|&s| s != i as u64 + 1).collect();
        assert_eq!(
            c["peers"],
            serde_json::json!(want),
            "node {i} watches the others"
        );
    }
    let mut clients: Vec<Client> = nodes
        .iter()
        .map(|n| Client::connect(&n.socket, 1, BLOCK))
        .collect();
    // Disjoint: node i owns MiB 8i..8i+4.
    for (i, c) in clients.iter_mut().enumerate() {
        write_pattern(c, 10 + i as u64, 8 * i as u64 * MIB, 4 * MIB);
    }
    // Overlapping, one writer at a time: MiB 40..44 by node 1, then MiB 41..43 by
    // node 2, then MiB 42..42.5 by node 3 (as a VM moving between hosts would).
    write_pattern(&mut clients[0], 20, 40 * MIB, 4 * MIB);
    write_pattern(&mut clients[1], 21, 41 * MIB, 2 * MIB);
    write_pattern(&mut clients[2], 22, 42 * MIB, MIB / 2);
    let expect = |o: u64| -> Vec<u8> {
        let seed = match o {
            _ if (42 * MIB..42 * MIB + MIB / 2).contains(&o) => 22,
            _ if (41 * MIB..43 * MIB).contains(&o) => 21,
            _ if (40 * MIB..44 * MIB).contains(&o) => 20,
            _ => 10 + o / (8 * MIB),
        };
        pattern(seed, o, BLOCK)
    };
    let ranges: Vec<(u64, u64)> = vec![(0, 4), (8, 12), (16, 20), (40, 44)];
    for (i, c) in clients.iter_mut().enumerate() {
        for &(lo, hi) in &ranges {
            for o in (lo * MIB..hi * MIB).step_by(BLOCK) {
                assert_eq!(c.read(0, o, 0, BLOCK), 0);
                assert!(c.buf()[..BLOCK] == expect(o)[..], "node {i} reads {o}");
            }
        }
    }
    drop(clients);
    for mut n in nodes {
        assert!(n.stop().success());
    }
    let (a, b) = (data_area(&legs[0]), data_area(&legs[1]));
    assert!(a == b, "legs identical");
    for &(lo, hi) in &ranges {
        for o in (lo * MIB..hi * MIB).step_by(BLOCK) {
            assert!(
                a[o as usize..o as usize + BLOCK] == expect(o)[..],
                "leg data at {o}"
            );
        }
    }
}

#[test]
fn a_leg_failed_on_one_node_is_failed_everywhere_and_re_added_from_another() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let n1 = node(d.path(), "n1", &lockd, &legs, &[]);
    let n2 = node(d.path(), "n2", &lockd, &legs, &[]);
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    write_pattern(&mut c1, 1, 0, 2 * MIB);

    let (ok, out) = n1.manage("fail", &legs[1]);
    assert!(ok, "{out}");
    // `manage` returns after the other node acknowledged the metadata update.
    let st2 = n2.status();
    assert_eq!(leg_state(&st2, &legs[1]), "faulty", "{st2}");
    assert_eq!(st2["degraded"], true);
    let st1 = n1.status();
    assert_eq!(
        st2["events"],
        st1["events"],
        "both nodes count the update\n{st1}\n{st2}\nnode 1:\n{}\nnode 2:\n{}",
        n1.log_text(),
        n2.log_text()
    );

    // Node 2's writes go to leg 0 only now.
    write_pattern(&mut c2, 2, 8 * MIB, 2 * MIB);
    let b = data_area(&legs[1]);
    assert!(
        b[8 * MIB as usize..10 * MIB as usize]
            .iter()
            .all(|&x| x == 0),
        "node 2 no longer writes the failed leg"
    );
    write_pattern(&mut c1, 3, 12 * MIB, MIB);

    // Node 2 re-adds it; node 1 keeps writing during the rebuild.
    let (ok, out) = n2.manage("re-add", &legs[1]);
    assert!(ok, "{out}");
    write_pattern(&mut c1, 4, 30 * MIB, 4 * MIB);
    for n in [&n1, &n2] {
        n.wait_for("leg back in sync", |s| {
            leg_state(s, &legs[1]) == "in-sync" && s["degraded"] == false
        });
    }
    let copied = n2.status()["resync"]["bytes_copied"].as_u64().unwrap();
    assert!(
        (3 * MIB..=5 * MIB).contains(&copied),
        "only the chunks written while the leg was out (3 to 5 MiB), not the disk: {copied}"
    );
    let by_n1 = n1.status()["resync"]["bytes_copied"].as_u64().unwrap();
    assert!(
        by_n1 <= MIB,
        "node 1 copies at most the chunk it wrote while the leg was out: {by_n1}"
    );
    for (c, who) in [(&mut c1, "node 1"), (&mut c2, "node 2")] {
        check_pattern(c, 1, 0, 2 * MIB, who);
        check_pattern(c, 2, 8 * MIB, 2 * MIB, who);
        check_pattern(c, 3, 12 * MIB, MIB, who);
        check_pattern(c, 4, 30 * MIB, 4 * MIB, who);
    }
    drop((c1, c2));
    for mut n in [n1, n2] {
        assert!(n.stop().success());
    }
    assert!(data_area(&legs[0]) == data_area(&legs[1]), "legs identical");
}

/// Node 1 writes MiB 0..40 with pattern `seed` and is killed with those bits set;
/// leg 1 then gets other data there (a crash between the legs' writes, at its
/// worst). Node 1 comes back (same slot, its own bits) and resyncs slowly at
/// 4 MiB/s; node 2 joins.
fn slow_resync_of_a_crashed_node(
    d: &Path,
    lockd: &Lockd,
    seed: u64,
) -> (Vec<PathBuf>, Serve, Serve) {
    let legs = clustered(d, 2, "64M");
    let mut n1 = node(d, "n1", lockd, &legs, &[]);
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, seed, 0, 40 * MIB);
    drop(c1);
    n1.kill9();
    scribble_on_leg1(&legs, seed + 100, 40 * MIB);
    let n1 = node(d, "n1", lockd, &legs, &["--resync-max-rate", "4M"]);
    let n2 = node(d, "n2", lockd, &legs, &[]);
    (legs, n1, n2)
}

#[test]
fn reads_during_another_nodes_resync_never_return_the_stale_leg() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let (legs, n1, n2) = slow_resync_of_a_crashed_node(d.path(), &lockd, 5);
    let st = n2.wait_for("node 1's resync window", |s| {
        !s["cluster"]["suspended"].as_array().unwrap().is_empty()
    });
    assert_eq!(st["cluster"]["resync_holder"], 1, "{st}");
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    let mut written: Option<(u64, Vec<u8>)> = None;
    let mut rounds = 0u64;
    loop {
        let active = n1.status()["resync"]["active"] == true;
        for (c, who) in [(&mut c1, "node 1"), (&mut c2, "node 2")] {
            for o in (0..40 * MIB).step_by(4 * MIB as usize) {
                let o = o + (rounds % 4) * MIB;
                assert_eq!(c.read(0, o, 0, BLOCK), 0);
                let want = match &written {
                    Some((t, data)) if *t == o => data.clone(),
                    _ => pattern(5, o, BLOCK),
                };
                assert!(c.buf()[..BLOCK] == want[..], "{who} read stale data at {o}");
            }
        }
        rounds += 1;
        if rounds == 10 {
            // Node 2 writes into the window being resynced: it waits for the window
            // to move on, then lands on both legs (the resync does not undo it).
            let st = n2.status();
            if let Some(w) = st["cluster"]["suspended"].as_array().unwrap().first() {
                let target = w[0].as_u64().unwrap() * 512 + MIB;
                let data = pattern(7, target, BLOCK);
                c2.buf()[..BLOCK].copy_from_slice(&data);
                assert_eq!(c2.write(0, target, 0, BLOCK), 0);
                let after = n2.status();
                assert!(
                    after["cluster"]["suspended"] != st["cluster"]["suspended"],
                    "the write waited for the window to move on: {after}"
                );
                written = Some((target, data));
            }
        }
        if !active {
            break;
        }
    }
    assert!(rounds > 10, "reads ran during the resync ({rounds} rounds)");
    let (target, data) = written.expect("a write went into a resync window");
    let st = n1.wait_for("resync done", |s| {
        s["resync"]["active"] == false && s["resync"]["remaining_chunks"] == 0
    });
    assert_eq!(
        st["resync"]["bytes_copied"].as_u64().unwrap(),
        40 * MIB,
        "exactly node 1's dirty chunks"
    );
    drop((c1, c2));
    for mut n in [n1, n2] {
        assert!(n.stop().success());
    }
    let (a, b) = (data_area(&legs[0]), data_area(&legs[1]));
    assert!(a == b, "legs identical");
    let t = target as usize;
    assert!(
        a[t..t + BLOCK] == data[..],
        "node 2's write survived the resync"
    );
}

#[test]
fn a_node_killed_in_the_middle_of_its_resync_is_finished_by_a_survivor() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let (legs, mut n1, n2) = slow_resync_of_a_crashed_node(d.path(), &lockd, 8);
    let st = n2.wait_for("node 1's resync window", |s| {
        !s["cluster"]["suspended"].as_array().unwrap().is_empty()
    });
    let lo = st["cluster"]["suspended"][0][0].as_u64().unwrap() * 512;
    n1.kill9();
    // The window of the dead node holds no write: this one completes, and node 2
    // finishes the resync node 1 started.
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    let target = lo + 2 * MIB;
    let data = pattern(9, target, BLOCK);
    c2.buf()[..BLOCK].copy_from_slice(&data);
    assert_eq!(c2.write(0, target, 0, BLOCK), 0);
    let st = n2.wait_for("node 1's slot recovered", |s| {
        s["resync"]["bytes_copied"].as_u64().unwrap() > 0
            && s["resync"]["active"] == false
            && s["resync"]["remaining_chunks"] == 0
            && s["cluster"]["peers"].as_array().unwrap().is_empty()
    });
    assert!(
        st["cluster"]["suspended"].as_array().unwrap().is_empty(),
        "{st}"
    );
    for o in (0..40 * MIB).step_by(BLOCK) {
        assert_eq!(c2.read(0, o, 0, BLOCK), 0);
        let want = if o == target {
            data.clone()
        } else {
            pattern(8, o, BLOCK)
        };
        assert!(c2.buf()[..BLOCK] == want[..], "data at {o}");
    }
    drop(c2);
    let mut n2 = n2;
    assert!(n2.stop().success());
    assert!(data_area(&legs[0]) == data_area(&legs[1]), "legs identical");
}

/// Status field `writer_role` of a node.
fn role(n: &Serve) -> String {
    n.status()["writer_role"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

#[test]
fn one_node_writes_at_a_time_and_the_role_follows_the_front_end() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let lm = format!("lockd:{}", lockd.socket.display());
    let start = |name: &str| {
        let mut args = vec!["--lock-manager", lm.as_str()];
        args.extend(legs.iter().map(|p| p.to_str().unwrap()));
        Serve::start(&d.path().join(format!("{name}.sock")), &args)
    };
    let mut n1 = start("n1");
    let n2 = start("n2");
    assert_eq!((role(&n1), role(&n2)), ("idle".into(), "idle".into()));

    // A read-only node serves reads and never takes the role.
    let ro = {
        let mut args = vec!["--lock-manager", lm.as_str(), "--read-only"];
        args.extend(legs.iter().map(|p| p.to_str().unwrap()));
        Serve::start(&d.path().join("ro.sock"), &args)
    };
    let mut c3 = Client::connect_with(&ro.socket, 1, BLOCK, true);
    assert_eq!(c3.read(0, 0, 0, BLOCK), 0);
    assert_eq!(role(&ro), "idle");

    // Node 1's front-end starts first: it writes.
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, 1, 0, MIB);
    assert_eq!(role(&n1), "held");
    check_pattern(&mut c3, 1, 0, MIB, "the read-only node");
    drop(c3);
    let mut ro = ro;
    assert!(ro.stop().success());

    // Node 2's front-end starts while node 1 writes: its writes fail, its reads work.
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    c2.buf()[..BLOCK].copy_from_slice(&pattern(2, 0, BLOCK));
    assert_ne!(
        c2.write(0, 0, 0, BLOCK),
        0,
        "node 2 writes while node 1 holds the role"
    );
    assert_ne!(
        c2.write_zeroes(0, 4 * MIB, BLOCK as u64),
        0,
        "write-zeroes too"
    );
    check_pattern(&mut c2, 1, 0, MIB, "node 2 without the role");
    let s2 = n2.status();
    assert_eq!(s2["writer_role"], "refused");
    assert!(s2["writes_refused"].as_u64() >= Some(2), "{s2}");
    check_pattern(&mut c1, 1, 0, MIB, "node 1 after node 2's refused writes");

    // Node 1's front-end leaves: the role is free, but node 2 stays refused until
    // its front-end starts the vrings again (a stale writer never comes back).
    drop(c1);
    n1.wait_for("node 1 gives the role back", |s| s["writer_role"] == "idle");
    assert_ne!(
        c2.write(0, 0, 0, BLOCK),
        0,
        "still refused without a restart"
    );
    drop(c2);
    n2.wait_for("node 2 forgets the refusal", |s| s["writer_role"] == "idle");
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    write_pattern(&mut c2, 3, 0, MIB);
    assert_eq!(role(&n2), "held");

    // Now node 1 is the one refused.
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    c1.buf()[..BLOCK].copy_from_slice(&pattern(4, 0, BLOCK));
    assert_ne!(
        c1.write(0, 0, 0, BLOCK),
        0,
        "node 1 writes while node 2 holds the role"
    );
    check_pattern(&mut c1, 3, 0, MIB, "node 1 reads node 2's data");
    assert_eq!(role(&n1), "refused");
    drop(c1);

    // Node 2 dies holding the role: the lock manager frees it for node 1.
    drop(c2);
    let mut n2 = n2;
    let mut c2b = Client::connect(&n2.socket, 1, BLOCK);
    write_pattern(&mut c2b, 5, MIB, MIB);
    assert_eq!(role(&n2), "held");
    n2.kill9();
    drop(c2b);
    n1.wait_for("node 1 sees node 2 die", |s| {
        s["cluster"]["peers"]
            .as_array()
            .is_some_and(|p| p.is_empty())
    });
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, 6, 2 * MIB, MIB);
    assert_eq!(role(&n1), "held");
    check_pattern(&mut c1, 3, 0, MIB, "node 2's first data");
    check_pattern(&mut c1, 5, MIB, MIB, "node 2's data before it died");
    check_pattern(&mut c1, 6, 2 * MIB, MIB, "node 1's data");
    drop(c1);
    assert!(n1.stop().success());
    let (a, b) = (&legs[0], &legs[1]);
    assert!(data_area(a) == data_area(b), "legs identical");
    assert!(
        data_area(a)[..BLOCK] == pattern(3, 0, BLOCK)[..],
        "no refused write reached the legs"
    );
}

/// Node 1's front-end (a migration source) stops its ring while one of its writes
/// is stalled on leg 1 (a device that stopped answering): GET_VRING_BASE waits for
/// that write however long it takes (well past 30 s), node 1 keeps the writer role
/// all that time, and node 2 (the destination) is refused it until the write landed.
#[test]
fn the_writer_role_stays_with_a_stopped_ring_until_its_last_write_landed() {
    const LEN: usize = 16 << 10;
    const STATUS: u64 = 0x2_0000;
    const AT: u64 = 40 * MIB;
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let lm = format!("lockd:{}", lockd.socket.display());
    let release = d.path().join("release-stall");
    // Leg 1 bytes from 32 MiB on: past the metadata, before array byte AT.
    let fault = format!(
        "1:stall-writes-from={},stall-until-file={}",
        32 * MIB,
        release.display()
    );
    let mut args = vec!["--lock-manager", lm.as_str(), "--queues", "1"];
    args.extend(legs.iter().map(|p| p.to_str().unwrap()));
    let n2 = Serve::start(&d.path().join("n2.sock"), &args);
    args.splice(0..0, ["--inject-fault", fault.as_str()]);
    let n1 = Serve::start(&d.path().join("n1.sock"), &args);

    let proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    let (mut fe, _) = connect(&n1.socket, proto);
    let mut g = Guest::new();
    let (low, high) = regions(&g);
    fe.set_mem_table(&[low, high]).unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    set_up_vring(&mut fe, &g, 0, &kick, &call);
    fe.set_vring_enable(0, true).unwrap();
    assert_eq!(role(&n1), "held");

    let buf = HIGH + 0x4_0000;
    g.put(buf, &pattern(7, AT, LEN));
    g.put(STATUS, &[0xff]);
    let chain = vec![
        (header(&g, 0, T_OUT, AT / 512), 16, false),
        (buf, LEN as u32, false),
        (STATUS, 1, true),
    ];
    g.publish(0, &[chain]);
    kick.write(1).unwrap();
    let start = Instant::now();
    while !n1.log_text().contains("stalls until") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            n1.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(g.used_idx(), 0, "the stalled write completed");

    // The source stops its ring (GET_VRING_BASE answers once the ring is idle).
    let stop = std::thread::spawn(move || {
        let base = fe.get_vring_base(0);
        (fe, base)
    });
    let stopped_at = Instant::now();
    let refused = |when: &str| {
        let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
        c2.buf()[..BLOCK].copy_from_slice(&pattern(8, 0, BLOCK));
        assert_ne!(
            c2.write(0, 0, 0, BLOCK),
            0,
            "{when}: node 2 writes while node 1's write is in flight"
        );
        assert_eq!(role(&n2), "refused", "{when}");
        drop(c2);
        n2.wait_for("node 2 forgets the refusal", |s| s["writer_role"] == "idle");
    };
    refused("at once");
    // Longer than any time limit the back-end might put on the wait.
    std::thread::sleep(Duration::from_secs(31).saturating_sub(stopped_at.elapsed()));
    assert!(
        !stop.is_finished(),
        "GET_VRING_BASE answered with a write in flight"
    );
    refused("after 31 s");
    assert_eq!(role(&n1), "held");
    assert_eq!(g.used_idx(), 0);

    // The leg answers: the write lands, completes, and only then does the role go.
    std::fs::File::create(&release).unwrap();
    let (_fe, base) = stop.join().unwrap();
    let held = stopped_at.elapsed();
    assert_eq!(base.unwrap(), 1);
    assert_eq!(g.used_idx(), 1, "the write completed before GET_VRING_BASE");
    assert_eq!(g.get(STATUS, 1)[0], 0, "the write succeeded");
    let sb = vhost_user_md::md::Superblock::decode(&std::fs::read(&legs[1]).unwrap()[4096..8192])
        .unwrap();
    let on_leg1 = std::fs::read(&legs[1]).unwrap();
    let at = (sb.data_offset * 512 + AT) as usize;
    assert!(
        on_leg1[at..at + LEN] == pattern(7, AT, LEN)[..],
        "the stalled write is on leg 1 when GET_VRING_BASE answers"
    );
    n1.wait_for("node 1 gives the role back", |s| s["writer_role"] == "idle");
    assert!(
        n1.log_text()
            .contains("GET_VRING_BASE: still waiting for requests in flight (1) after 30 s"),
        "{}",
        n1.log_text()
    );
    eprintln!("node 1 held the role {held:?} after GET_VRING_BASE");

    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    assert_eq!(c2.read(0, AT, 0, LEN), 0);
    assert!(
        c2.buf()[..LEN] == pattern(7, AT, LEN)[..],
        "node 2 reads node 1's last write"
    );
    write_pattern(&mut c2, 9, 0, MIB);
    assert_eq!(role(&n2), "held");
}

#[test]
fn a_replacement_leg_added_on_one_node_is_found_and_written_by_the_other() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let n1 = node(d.path(), "n1", &lockd, &legs, &[]);
    let n2 = node(d.path(), "n2", &lockd, &legs, &[]);
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, 11, 0, 8 * MIB);
    let new = take_out_and_replace(d.path(), &n1, &legs);
    assert_eq!(leg_state(&n2.status(), &legs[1]), "removed");
    let (ok, out) = n2.manage("add", &new);
    assert!(ok, "{out}");
    let st1 = n1.status();
    assert!(
        ["recovering", "in-sync"].contains(&leg_state(&st1, &new).as_str()),
        "node 1 knows the new leg at once: {st1}"
    );
    write_pattern(&mut c1, 12, 20 * MIB, 4 * MIB);
    for n in [&n1, &n2] {
        n.wait_for("new leg in sync", |s| {
            leg_state(s, &new) == "in-sync" && s["degraded"] == false
        });
    }
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    for (c, who) in [(&mut c1, "node 1"), (&mut c2, "node 2")] {
        check_pattern(c, 11, 0, 8 * MIB, who);
        check_pattern(c, 12, 20 * MIB, 4 * MIB, who);
    }
    drop((c1, c2));
    for mut n in [n1, n2] {
        assert!(n.stop().success());
    }
    assert!(
        data_area(&legs[0]) == data_area(&new),
        "the new leg is a full copy"
    );
}

#[test]
fn a_node_joining_during_a_rebuild_does_not_trust_the_half_built_leg() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let n1 = node(d.path(), "n1", &lockd, &legs, &["--resync-max-rate", "4M"]);
    let n2 = node(d.path(), "n2", &lockd, &legs, &[]);
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, 13, 0, 32 * MIB);
    let new = take_out_and_replace(d.path(), &n1, &legs);
    let (ok, out) = n1.manage("add", &new);
    assert!(ok, "{out}");
    n1.wait_for("part of the rebuild", |s| {
        s["resync"]["bytes_copied"].as_u64().unwrap() >= 2 * MIB
    });
    // Node 3 joins while the new leg is half built (its superblock says so).
    let n3 = node(d.path(), "n3", &lockd, &[legs[0].clone(), new.clone()], &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    for n in [&n1, &n2, &n3] {
        let s = n.status();
        assert_eq!(leg_state(&s, &new), "recovering", "{s}");
    }
    let mut c3 = Client::connect(&n3.socket, 1, BLOCK);
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    check_pattern(&mut c3, 13, 0, 32 * MIB, "node 3");
    check_pattern(&mut c2, 13, 0, 32 * MIB, "node 2");
    drop((c1, c2, c3));
    for mut n in [n1, n2, n3] {
        assert!(n.stop().success());
    }
}

#[test]
fn a_survivor_finishes_the_rebuild_a_dead_node_started() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let mut n1 = node(d.path(), "n1", &lockd, &legs, &["--resync-max-rate", "4M"]);
    let n2 = node(d.path(), "n2", &lockd, &legs, &[]);
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, 14, 0, 16 * MIB);
    let new = take_out_and_replace(d.path(), &n1, &legs);
    let (ok, out) = n1.manage("add", &new);
    assert!(ok, "{out}");
    n1.wait_for("part of the rebuild", |s| {
        s["resync"]["bytes_copied"].as_u64().unwrap() >= 2 * MIB
    });
    drop(c1);
    n1.kill9();
    let s = n2.wait_for("node 2 finished the rebuild", |s| {
        leg_state(s, &new) == "in-sync" && s["degraded"] == false
    });
    assert!(
        s["resync"]["bytes_copied"].as_u64().unwrap() >= 60 * MIB,
        "{s}"
    );
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    check_pattern(&mut c2, 14, 0, 16 * MIB, "node 2");
    drop(c2);
    let mut n2 = n2;
    assert!(n2.stop().success());
    assert!(
        data_area(&legs[0]) == data_area(&new),
        "the new leg is a full copy"
    );
}

/// The dirty chunks of node slot `slot` in leg `leg`'s bitmap.
fn slot_dirty(leg: &Path, slot: u64) -> u64 {
    let ex = bin().args(["examine", "--json"]).arg(leg).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&ex.stdout).unwrap();
    v["legs"][0]["bitmap"]["slots"][slot as usize]["dirty"]
        .as_u64()
        .unwrap_or_else(|| panic!("no slot {slot} in {v}"))
}

#[test]
fn a_node_stops_on_sigterm_in_the_middle_of_a_resync_and_leaves_the_rest_dirty() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs: Vec<PathBuf> = ["a.img", "b.img"]
        .iter()
        .map(|n| d.path().join(n))
        .collect();
    // Not --assume-clean: the first node to assemble resyncs every chunk.
    let out = bin()
        .args(["create", "--cluster-name", "host1", "--nodes", "2"])
        .args(["--size", "64M", "--bitmap-chunk", "1M"])
        .args(&legs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 1 MiB chunks at 1 MiB/s: about a minute for the 63 chunks.
    let mut n1 = node(d.path(), "n1", &lockd, &legs, &["--resync-max-rate", "1M"]);
    let st = n1.wait_for("the resync to run", |s| {
        s["resync"]["active"] == true && s["resync"]["bytes_copied"].as_u64() >= Some(MIB)
    });
    let slot = st["node_slot"].as_u64().unwrap();
    let mut child = n1.child.take().unwrap();
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let exit = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve did not stop within 10 s of SIGTERM during a resync: {}",
                n1.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("stopped {:?} after SIGTERM", t.elapsed());
    assert!(exit.success(), "{exit}: {}", n1.log_text());
    let left = slot_dirty(&legs[0], slot);
    assert!(
        left > 0 && left < 63,
        "slot {slot} keeps the chunks not resynced yet dirty: {left}"
    );
    assert_eq!(slot_dirty(&legs[1], slot), left, "both legs' bitmaps agree");
    eprintln!("slot {slot} left with {left} of 63 chunks dirty");
    assert!(
        n1.log_text().contains("resync left off"),
        "{}",
        n1.log_text()
    );

    // A new node finishes the resync.
    let mut n1 = node(d.path(), "n1b", &lockd, &legs, &[]);
    n1.wait_for("the rest of the resync", |s| {
        s["resync"]["active"] == false
            && s["resync"]["remaining_chunks"] == 0
            && s["resync"]["bytes_copied"].as_u64() >= Some(left * MIB)
    });
    assert!(n1.stop().success());
    for slot in 0..2 {
        assert_eq!(
            slot_dirty(&legs[0], slot),
            0,
            "slot {slot} clean at the end"
        );
    }
    assert!(data_area(&legs[0]) == data_area(&legs[1]), "legs identical");
}

#[test]
fn as_many_nodes_as_slots_started_at_the_same_moment_all_join() {
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let lockd = Lockd::start();
    let lm = format!("lockd:{}", lockd.socket.display());
    // Four node slots (the default), four nodes started at once, three times over.
    for round in 0..3 {
        let mut nodes: Vec<Serve> = (0..4)
            .map(|i| {
                let socket = d.path().join(format!("r{round}n{i}.sock"));
                let log = socket.with_extension("log");
                let out = std::fs::File::create(&log).unwrap();
                let child = bin()
                    .arg("serve")
                    .arg("--socket")
                    .arg(&socket)
                    .args(["--lock-manager", &lm, "--shared-writes"])
                    .args(&legs)
                    .env("RUST_LOG", "info")
                    .stdout(out.try_clone().unwrap())
                    .stderr(out)
                    .spawn()
                    .unwrap();
                Serve {
                    child: Some(child),
                    socket,
                    log,
                }
            })
            .collect();
        let start = std::time::Instant::now();
        for n in &mut nodes {
            while !n.log_text().contains("serving array") {
                if let Some(st) = n.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!(
                        "round {round}: a node did not join ({st}): {}",
                        n.log_text()
                    );
                }
                assert!(
                    start.elapsed() < std::time::Duration::from_secs(60),
                    "{}",
                    n.log_text()
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let mut slots: Vec<u64> = nodes
            .iter()
            .map(|n| n.status()["node_slot"].as_u64().unwrap())
            .collect();
        slots.sort();
        assert_eq!(slots, vec![0, 1, 2, 3], "round {round}");
        // Nobody died: a slot another joiner held to merge it is no dead node's.
        for n in &nodes {
            let log = n.log_text();
            assert!(!log.contains("is gone"), "round {round}: {log}");
        }
        for mut n in nodes {
            assert!(n.stop().success());
        }
    }
}

/// A node that wrote nothing re-adds a failed leg while another node wrote chunks
/// the leg lacks: those chunks, known only once the other slots are gathered
/// (after the metadata update, which a stalled in-sync leg holds up here), are
/// copied to the re-added leg before it counts as in sync, never from it.
#[test]
fn a_leg_re_added_is_not_in_sync_before_the_other_nodes_chunks_are_known() {
    let lockd = Lockd::start();
    let d = tempfile::tempdir().unwrap();
    let legs = clustered(d.path(), 2, "64M");
    let release = d.path().join("release");
    std::fs::File::create(&release).unwrap();
    // Node 2's writes to leg 1 (superblocks included) stall while `release` is missing.
    let fault = format!(
        "1:stall-writes-from=4096,stall-until-file={}",
        release.display()
    );
    let n1 = node(d.path(), "n1", &lockd, &legs, &[]);
    let n2 = node(d.path(), "n2", &lockd, &legs, &["--inject-fault", &fault]);
    let (ok, out) = n1.manage("fail", &legs[0]);
    assert!(ok, "{out}");
    let mut c1 = Client::connect(&n1.socket, 1, BLOCK);
    write_pattern(&mut c1, 31, 0, 4 * MIB);

    std::fs::remove_file(&release).unwrap();
    let r = release.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::File::create(&r).unwrap();
    });
    let (ok, out) = n2.manage("re-add", &legs[0]);
    assert!(ok, "{out}");
    releaser.join().unwrap();
    for n in [&n1, &n2] {
        n.wait_for("leg 0 back in sync", |s| {
            leg_state(s, &legs[0]) == "in-sync"
                && s["degraded"] == false
                && s["resync"]["active"] == false
                && s["resync"]["remaining_chunks"] == 0
        });
    }
    let mut c2 = Client::connect(&n2.socket, 1, BLOCK);
    check_pattern(&mut c2, 31, 0, 4 * MIB, "node 2");
    check_pattern(&mut c1, 31, 0, 4 * MIB, "node 1");
    drop((c1, c2));
    for mut n in [n1, n2] {
        assert!(n.stop().success());
    }
    let a = data_area(&legs[0]);
    assert!(a == data_area(&legs[1]), "legs identical");
    assert!(
        a[..4 * MIB as usize] == pattern(31, 0, 4 * MIB as usize)[..],
        "node 1's writes are on both legs"
    );
}
