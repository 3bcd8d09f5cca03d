//! A node whose lock manager goes away is fenced: it writes nothing from then on
//! (its slot and writer role are gone with the lock manager, and a node joining
//! the restarted one may be granted them) within a bound of the loss, says so in
//! its log and in `status`, and rejoins once the lock manager is back. A clustered array refuses the local lock manager.

mod common;

use common::{bin, pattern, Client, Serve};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The bound asserted on the time from the lock manager's death to the first
/// refused write: far above what is measured (about 2 ms), for a loaded 2-core
/// machine running other builds and tests.
const FIRST_REFUSAL_BOUND: Duration = Duration::from_millis(500);

/// How long writes go on after the first refused one (each must be refused).
const REFUSING_FOR: Duration = Duration::from_millis(200);

/// The time of a log line (`[2026-01-31T12:34:56.789Z LEVEL target] ...`, UTC).
fn log_time(line: &str) -> SystemTime {
    let stamp = line
        .strip_prefix('[')
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no time in {line:?}"));
    let num = |r: std::ops::Range<usize>| -> u64 {
        stamp
            .get(r)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad time in {line:?}"))
    };
    let (y, mo, d) = (num(0..4) as i64, num(5..7) as i64, num(8..10) as i64);
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((mo + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days as u64 * 86_400 + num(11..13) * 3600 + num(14..16) * 60 + num(17..19);
    UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(num(20..23))
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

    // The lock manager dies while the guest writes, one write at a time.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let wall = SystemTime::now();
        ld.kill().unwrap();
        let at = Instant::now();
        ld.wait().unwrap();
        (wall, at)
    });
    // (wall-clock time of submission, time of answer)
    let mut acked: Vec<(SystemTime, Instant)> = Vec::new();
    let mut refused: Vec<(SystemTime, Instant)> = Vec::new();
    let begin = Instant::now();
    let mut i = 0u64;
    // Until a write is refused, and for a while more.
    while refused.first().is_none_or(|r| r.1.elapsed() < REFUSING_FOR) {
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "writes still succeed 10 s after lockd died"
        );
        let off = MIB + (i % 64) * BLOCK as u64;
        ca.buf().copy_from_slice(&pattern(2, off, BLOCK));
        let submitted = SystemTime::now();
        let ret = ca.write(0, off, 0, BLOCK);
        let at = (submitted, Instant::now());
        if ret == 0 {
            acked.push(at);
        } else {
            refused.push(at);
        }
        i += 1;
    }
    let (killed_wall, killed) = killer.join().unwrap();
    let after_kill = |t: Instant| t.saturating_duration_since(killed);
    let first_refusal = after_kill(refused[0].1);
    let acked_after: Vec<Duration> = acked
        .iter()
        .filter(|a| a.1 > killed)
        .map(|a| after_kill(a.1))
        .collect();
    eprintln!(
        "lock manager killed: first refused write {first_refusal:?} after; {} writes acknowledged before the kill, {} after it (answered {acked_after:?} after); {} refused",
        acked.len() - acked_after.len(),
        acked_after.len(),
        refused.len()
    );
    assert!(
        first_refusal < FIRST_REFUSAL_BOUND,
        "the first write was refused only {first_refusal:?} after lockd died"
    );
    // The node says so in its log; from that moment on (the log's millisecond,
    // rounded up) no write is acknowledged, and every one is refused.
    let log = a.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("fenced: lock manager lost"))
        .unwrap_or_else(|| panic!("no fencing in the log: {log}"));
    assert!(
        line.contains("this node writes nothing until it has rejoined"),
        "{line}"
    );
    let reported = log_time(line) + Duration::from_millis(1);
    assert!(
        killed_wall < reported && reported <= SystemTime::now() + Duration::from_millis(1),
        "the loss logged at {line:?} is not between the kill and now"
    );
    for (submitted, answered) in &acked {
        assert!(
            *submitted < reported,
            "a write submitted after the node reported the loss was acknowledged ({:?} after the kill)",
            after_kill(*answered)
        );
    }
    assert!(
        acked.iter().all(|a| a.1 < refused[0].1),
        "a write was acknowledged after one was refused"
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

/// A node started from a config file rejoins with the options it started with,
/// even when the file was broken meanwhile (an operator halfway through an edit):
/// the restart does not read the file again.
#[test]
fn a_node_started_from_a_config_file_rejoins_with_its_options_whatever_the_file_says_by_then() {
    let dir = tempfile::tempdir().unwrap();
    let legs = clustered(dir.path());
    let lsock = dir.path().join("lockd.sock");
    let mut ld = lockd(&lsock);
    let conf = dir.path().join("a.conf");
    std::fs::write(
        &conf,
        format!(
            "lock-manager = \"lockd:{}\"\nqueues = 2\nlegs = [{:?}, {:?}]\n",
            lsock.display(),
            legs[0],
            legs[1]
        ),
    )
    .unwrap();
    let a = Serve::start(
        &dir.path().join("a.sock"),
        &["--config", conf.to_str().unwrap()],
    );
    let pid = a.child.as_ref().unwrap().id();
    ld.kill().unwrap();
    ld.wait().unwrap();
    let start = Instant::now();
    while try_status(&a).is_none_or(|st| st["writer_role"] != "fenced") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not fenced: {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&conf, "queus = 2\n").unwrap();
    let mut ld = lockd(&lsock);
    let start = Instant::now();
    loop {
        if let Some(st) = try_status(&a) {
            if st["writer_role"] != "fenced" && st["cluster"].is_object() {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node a did not rejoin: {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // Both queues of the start serve.
    let mut c = Client::connect(&a.socket, 2, BLOCK);
    assert_eq!(c.read(1, 0, 0, BLOCK), 0);
    drop(c);
    drop(a);
    let _ = ld.kill();
    let _ = ld.wait();
}
