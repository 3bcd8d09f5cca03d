//! A node whose lock manager goes away is fenced: it writes nothing from then on
//! (its slot and writer role are gone with the lock manager, and a node joining
//! the restarted one may be granted them), says so in `status`, and rejoins once
//! the lock manager is back. A clustered array refuses the local lock manager.

mod common;

use common::{bin, pattern, Client, Serve};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 64 * 1024;

fn clustered(dir: &Path) -> Vec<PathBuf> {
    common::create_array(dir, &["a.img", "b.img"], "64M", Some("fence"))
}

/// A lockd on `socket`, started anew on the same path when needed.
fn lockd(socket: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let c = bin()
        .arg("lockd")
        .arg("--socket")
        .arg(socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lockd did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c
}

fn node(dir: &Path, name: &str, lockd: &Path, legs: &[PathBuf]) -> Serve {
    let lm = format!("lockd:{}", lockd.display());
    let mut args: Vec<&str> = vec!["--lock-manager", &lm, "--shared-writes"];
    args.extend(legs.iter().map(|p| p.to_str().unwrap()));
    Serve::start(&dir.join(format!("{name}.sock")), &args)
}

/// `status`, or `None` while the control socket does not answer (restarting).
fn try_status(s: &Serve) -> Option<serde_json::Value> {
    let out = bin()
        .args(["status", "--format", "json"])
        .arg(&s.socket)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn leg_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let data = common::data_area(path);
    data[off as usize..off as usize + len].to_vec()
}

#[test]
fn a_node_that_loses_its_lock_manager_writes_nothing_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let legs = clustered(dir.path());
    let lsock = dir.path().join("lockd.sock");
    let mut ld = lockd(&lsock);
    let a = node(dir.path(), "a", &lsock, &legs);
    let mut ca = Client::connect(&a.socket, 1, BLOCK);
    ca.buf().copy_from_slice(&pattern(1, 0, BLOCK));
    assert_eq!(ca.write(0, 0, 0, BLOCK), 0);
    let slot_before = a.status()["node_slot"].as_u64().unwrap();

    // The lock manager dies while the guest writes.
    ld.kill().unwrap();
    let killed = Instant::now();
    ld.wait().unwrap();
    let mut last_ok = None;
    let mut first_refusal = None;
    let mut i = 0u64;
    while killed.elapsed() < Duration::from_secs(10) {
        let off = MIB + (i % 64) * BLOCK as u64;
        ca.buf().copy_from_slice(&pattern(2, off, BLOCK));
        let ret = ca.write(0, off, 0, BLOCK);
        if ret == 0 {
            last_ok = Some(killed.elapsed());
        } else {
            first_refusal = Some(killed.elapsed());
            break;
        }
        i += 1;
    }
    let first_refusal = first_refusal.expect("writes still succeed 10 s after lockd died");
    eprintln!(
        "lock manager killed: last acknowledged write {:?} after, first refused write {:?} after ({i} writes acknowledged in between)",
        last_ok, first_refusal
    );
    let st = a.status();
    assert_eq!(st["writer_role"], "fenced", "{st}");
    assert!(
        st["fenced"]
            .as_str()
            .unwrap_or("")
            .contains("lock manager lost"),
        "{st}"
    );
    // What the fenced node is asked to write lands nowhere.
    let off = 8 * MIB;
    ca.buf().copy_from_slice(&pattern(3, off, BLOCK));
    assert_ne!(
        ca.write(0, off, 0, BLOCK),
        0,
        "a fenced node acknowledged a write"
    );
    for leg in &legs {
        assert_ne!(
            leg_bytes(leg, off, BLOCK),
            pattern(3, off, BLOCK),
            "a fenced node wrote {}",
            leg.display()
        );
    }
    // Reads go on.
    assert_eq!(ca.read(0, 0, 0, BLOCK), 0);
    assert_eq!(ca.buf(), &pattern(1, 0, BLOCK)[..]);

    // The lock manager comes back; another node joins it and writes.
    let mut ld = lockd(&lsock);
    let b = node(dir.path(), "b", &lsock, &legs);
    let mut cb = Client::connect(&b.socket, 1, BLOCK);
    let off = 16 * MIB;
    cb.buf().copy_from_slice(&pattern(4, off, BLOCK));
    assert_eq!(cb.write(0, off, 0, BLOCK), 0);

    // Node a rejoins on its own: the same process (pid), a slot of the new lock
    // manager, not fenced, and a front-end that connects anew writes and reads.
    let pid = a.child.as_ref().unwrap().id();
    let start = Instant::now();
    let st = loop {
        if let Some(st) = try_status(&a) {
            if st["writer_role"] != "fenced" && st["cluster"].is_object() {
                break st;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node a did not rejoin: {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "node a rejoined {:?} after the lock manager came back (slot {} before, {} now)",
        start.elapsed(),
        slot_before,
        st["node_slot"]
    );
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert_ne!(
        st["node_slot"],
        b.status()["node_slot"],
        "two nodes share a slot"
    );
    drop(ca);
    let mut ca = Client::connect(&a.socket, 1, BLOCK);
    assert_eq!(ca.read(0, off, 0, BLOCK), 0);
    assert_eq!(
        ca.buf(),
        &pattern(4, off, BLOCK)[..],
        "node a reads node b's write"
    );
    let off = 24 * MIB;
    ca.buf().copy_from_slice(&pattern(5, off, BLOCK));
    assert_eq!(ca.write(0, off, 0, BLOCK), 0);
    assert_eq!(cb.read(0, off, 0, BLOCK), 0);
    assert_eq!(cb.buf(), &pattern(5, off, BLOCK)[..]);
    drop(ca);
    drop(cb);
    drop(a);
    drop(b);
    let _ = ld.kill();
    let _ = ld.wait();
}

#[test]
fn a_clustered_array_refuses_the_local_lock_manager() {
    let dir = tempfile::tempdir().unwrap();
    let legs = clustered(dir.path());
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .args(&legs);
    let err = common::refused(
        cmd,
        Duration::from_secs(10),
        "a local serve of a clustered array",
    );
    assert!(
        common::one_error_line(&err).contains("--lock-manager dlm"),
        "{err}"
    );
    // Nothing was written: both legs are still clean.
    for leg in &legs {
        let e = bin().args(["examine", "--json"]).arg(leg).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
        assert_eq!(v["legs"][0]["superblock"]["state"], "clean", "{v}");
    }
}

/// The front-end leaves while a rejoining node drains its requests (one write is
/// stalled on a leg): the node still hands its listening socket to its new process,
/// so the socket path never stops answering. (Whether the socket was closed before
/// the new process started was a race: ten rounds.)
#[test]
fn a_node_keeps_its_socket_across_a_rejoin_when_the_front_end_leaves_during_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let legs = clustered(dir.path());
    let lsock = dir.path().join("lockd.sock");
    let mut ld = Reaped(lockd(&lsock));
    let release = dir.path().join("release");
    std::fs::File::create(&release).unwrap();
    let lm = format!("lockd:{}", lsock.display());
    // Leg 1 bytes from 32 MiB on stall while `release` is missing.
    let fault = format!(
        "1:stall-writes-from={},stall-until-file={}",
        32 * MIB,
        release.display()
    );
    let mut args: Vec<&str> = vec!["--lock-manager", &lm, "--inject-fault", &fault];
    args.extend(legs.iter().map(|p| p.to_str().unwrap()));
    let a = Serve::start(&dir.path().join("a.sock"), &args);
    let wait_log = |what: &str, n: usize| {
        let start = Instant::now();
        while a.log_text().matches(what).count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "not {n} times {what:?} in the log: {}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for round in 1..=10 {
        let mut c = Client::connect(&a.socket, 1, BLOCK);
        c.buf().copy_from_slice(&pattern(round, 0, BLOCK));
        assert_eq!(c.write(0, 0, 0, BLOCK), 0, "round {round}");
        // A write that stalls on leg 1, left in flight.
        std::fs::remove_file(&release).unwrap();
        let off = 40 * MIB;
        c.buf().copy_from_slice(&pattern(round, off, BLOCK));
        let p = c.buf().as_mut_ptr();
        c.queues[0].write(off, p, BLOCK, 0, blkio::ReqFlags::empty());
        let mut none: [std::mem::MaybeUninit<blkio::Completion>; 0] = [];
        c.queues[0]
            .do_io(&mut none, 0, Some(&mut Duration::from_millis(0)), None)
            .unwrap();
        wait_log("stalls until", round as usize);
        // The lock manager goes and comes back: the node drains (the stalled write
        // holds it), and meanwhile its front-end leaves.
        ld.0.kill().unwrap();
        ld.0.wait().unwrap();
        ld = Reaped(lockd(&lsock));
        wait_log("restarting to rejoin: draining", round as usize);
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
        std::fs::File::create(&release).unwrap();
        wait_log("vhost-user-md: serving array", round as usize + 1);
        let log = a.log_text();
        assert!(
            log.matches("socket kept across the rejoin").count() == round as usize
                && !log.contains("is not a socket listening"),
            "round {round}: the listening socket was not handed over: {log}"
        );
    }
    let mut c = Client::connect(&a.socket, 1, BLOCK);
    assert_eq!(c.read(0, 0, 0, BLOCK), 0);
    assert_eq!(c.buf(), &pattern(10, 0, BLOCK)[..]);
    drop(c);
    drop(a);
    drop(ld);
}

/// A child process killed when dropped (also when a test fails).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
