//! Multi-host protection of an array served alone (`--lock-manager local`): a
//! second "host" that cannot see the first one's locks (the same image files
//! reached through two loop devices with direct I/O, as two hosts reach one LUN,
//! and the first host's process in a pid namespace of its own, so that the second
//! cannot tell whether it lives) is refused while the first serves, and accepted
//! within the documented wait once the first died; a host forced in fences the
//! first. mdadm still reads the legs with the heartbeat on them.

mod common;

use common::{bin, pattern, Client, Loop, Serve};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const INTERVAL_MS: u64 = 200;

fn array(dir: &Path) -> Vec<PathBuf> {
    common::create_array(dir, &["a.img", "b.img"], "64M", None)
}

fn strs(p: &[PathBuf]) -> Vec<String> {
    p.iter().map(|p| p.display().to_string()).collect()
}

fn host(dir: &Path, name: &str, legs: &[PathBuf], extra: &[&str]) -> Serve {
    let iv = format!("{INTERVAL_MS}ms");
    let mut args: Vec<String> = vec!["--heartbeat-interval".into(), iv];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(strs(legs));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Serve::start(&dir.join(format!("{name}.sock")), &a)
}

/// A host in a pid namespace of its own (`unshare --pid --fork`): its pid means
/// nothing to the others, as on another host. Killing it kills its `serve`.
fn host_in_own_pid_ns(dir: &Path, name: &str, legs: &[PathBuf]) -> Serve {
    let mut unshare = Command::new("unshare");
    unshare
        .args(["--pid", "--fork", "--kill-child=SIGKILL"])
        .arg(env!("CARGO_BIN_EXE_vhost-user-md"));
    let s = serve_host(unshare, dir, name, legs);
    let start = Instant::now();
    while !s.log_text().contains("serving array") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

/// Runs a `serve` that must be refused within `limit`; returns (stderr, time).
fn refused(dir: &Path, legs: &[PathBuf], limit: Duration) -> (String, Duration) {
    let start = Instant::now();
    let mut cmd = bin();
    cmd.arg("serve")
        .arg("--socket")
        .arg(dir.join("refused.sock"))
        .args(["--heartbeat-interval", &format!("{INTERVAL_MS}ms")])
        .args(legs)
        .env_remove("RUST_LOG");
    let err = common::refused(cmd, limit, "a second host");
    (err, start.elapsed())
}

/// The documented wait of a start that finds a live-looking heartbeat written
/// with our interval (README, "Running on shared LUNs"): 5 intervals + 1 s, then
/// two intervals to check its own.
fn documented_wait() -> Duration {
    Duration::from_millis(5 * INTERVAL_MS + 1000 + 2 * INTERVAL_MS)
}

/// What a start takes besides the documented wait, at most: the process starting,
/// assembling the legs, its sockets, and the test seeing its announcement (polled
/// every 25 ms), on a loaded 2-core machine running other builds and tests.
const START_ALLOWANCE: Duration = Duration::from_millis(1500);

#[test]
fn a_second_host_is_refused_while_the_first_serves_and_accepted_after_it_died() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path());
    let luns: Vec<Loop> = legs.iter().map(|p| Loop::attach_rw(p)).collect();
    let other: Vec<PathBuf> = luns.iter().map(|l| l.dev.clone()).collect();
    let mut first = host_in_own_pid_ns(dir.path(), "first", &legs);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();

    let (err, took) = refused(dir.path(), &other, Duration::from_secs(20));
    assert!(
        err.contains(&format!("host {} (pid ", hostname.trim())),
        "{err}"
    );
    assert!(err.contains("heartbeat moved"), "{err}");
    assert!(err.contains(other[0].to_str().unwrap()), "{err}");
    common::one_error_line(&err);
    assert!(took < documented_wait(), "refused only after {took:?}");
    eprintln!("second host refused after {took:?}");
    // The first host still serves.
    let mut c = Client::connect(&first.socket, 1, 4096);
    c.buf().copy_from_slice(&pattern(1, 0, 4096));
    assert_eq!(c.write(0, 0, 0, 4096), 0);
    drop(c);

    // mdadm reads the legs with the heartbeat on them (block devices, as it
    // takes an image file for an external bitmap file) as the array they are.
    let uuid = first.status()["uuid"].as_str().unwrap().to_string();
    for dev in &other {
        let e = common::mdadm(&["-E"], dev);
        let kv = common::key_values(&e);
        assert_eq!(common::value(&kv, "Raid Level"), Some("raid1"), "{e}");
        assert_eq!(common::value(&kv, "Array UUID"), Some(uuid.as_str()), "{e}");
        let x = common::mdadm(&["-X"], dev);
        let kv = common::key_values(&x);
        assert_eq!(common::value(&kv, "Magic"), Some("6d746962"), "{x}");
        assert_eq!(common::value(&kv, "UUID"), Some(uuid.as_str()), "{x}");
    }

    // The first host dies: the second starts within the documented wait.
    first.kill9();
    let start = Instant::now();
    let second = host(dir.path(), "second", &other, &[]);
    let took = start.elapsed();
    eprintln!(
        "second host started {took:?} after the first died (documented wait {:?})",
        documented_wait()
    );
    assert!(
        took >= Duration::from_millis(5 * INTERVAL_MS + 1000),
        "the heartbeat was not watched: {took:?}"
    );
    assert!(
        took < documented_wait() + START_ALLOWANCE,
        "accepted only {took:?} after the first died: more than the documented wait ({:?}) and {START_ALLOWANCE:?} to start",
        documented_wait()
    );
    let log = second.log_text();
    assert!(log.contains("stood still"), "{log}");
    drop(second);

    // A host whose dead serve ran in the same boot and pid namespace needs no
    // watch: its pid says it is gone.
    let third = host(dir.path(), "third", &legs, &[]);
    let pid = third.child.as_ref().unwrap().id();
    let mut third = third;
    third.kill9();
    let start = Instant::now();
    let fourth = host(dir.path(), "fourth", &legs, &[]);
    let took = start.elapsed();
    let log = fourth.log_text();
    assert!(
        log.contains(&format!(
            "the heartbeat is of pid {pid} of this host, which is gone"
        )),
        "{log}"
    );
    assert!(!log.contains("watching it"), "{log}");
    assert!(
        took < Duration::from_millis(5 * INTERVAL_MS + 1000),
        "{took:?}"
    );
    // It serves what the first acknowledged.
    let mut c = Client::connect(&fourth.socket, 1, 4096);
    assert_eq!(c.read(0, 0, 0, 4096), 0, "{}", fourth.log_text());
    assert_eq!(c.buf(), &pattern(1, 0, 4096)[..]);
}

/// Starts `serve` on `legs` as a host that logs to `NAME.log` in `dir`, without
/// waiting for it.
fn spawn_host(dir: &Path, name: &str, legs: &[PathBuf]) -> Serve {
    serve_host(bin(), dir, name, legs)
}

/// Runs `serve` on `legs` through `cmd` (the binary, or a wrapper that ends with
/// it) as a host that logs to `NAME.log` in `dir`, without waiting for it.
fn serve_host(mut cmd: Command, dir: &Path, name: &str, legs: &[PathBuf]) -> Serve {
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = cmd
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--heartbeat-interval", &format!("{INTERVAL_MS}ms")])
        .args(legs)
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("serve (or the command wrapping it)");
    Serve {
        child: Some(child),
        socket,
        log,
    }
}

/// Waits until `host` logs `text` (20 s at most).
fn wait_for_log(host: &Serve, text: &str) {
    let start = Instant::now();
    while !host.log_text().contains(text) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {text:?} in: {}",
            host.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGHUP, then SIGUSR1, to `host` while it starts.
fn hang_up(host: &Serve) {
    let pid = host.child.as_ref().unwrap().id() as i32;
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: plain kill(2) on our child's pid.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGHUP and SIGUSR1 sent while a start watches another host's heartbeat (the
/// longest wait of a start) change nothing: the start ends as it would have.
#[test]
fn hangup_and_usr1_during_the_heartbeat_watch_do_not_stop_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path());
    let luns: Vec<Loop> = legs.iter().map(|p| Loop::attach_rw(p)).collect();
    let other: Vec<PathBuf> = luns.iter().map(|l| l.dev.clone()).collect();
    let mut first = host_in_own_pid_ns(dir.path(), "first", &legs);

    // While the first serves: the second is refused, with its one line, and
    // leaves neither of its sockets.
    let mut second = spawn_host(dir.path(), "second", &other);
    wait_for_log(&second, "watching it for");
    hang_up(&second);
    let st = second.child.as_mut().unwrap().wait().unwrap();
    second.child = None;
    let log = second.log_text();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        common::one_error_line(&log).contains("heartbeat moved"),
        "{log}"
    );
    assert!(log.contains("SIGHUP ignored"), "{log}");
    assert!(!second.socket.exists(), "the vhost-user socket was left");
    assert!(
        !dir.path().join("second.sock.ctl").exists(),
        "the control socket was left"
    );

    // Once the first died: the third takes the legs over and serves.
    first.kill9();
    let mut third = spawn_host(dir.path(), "third", &other);
    wait_for_log(&third, "watching it for");
    hang_up(&third);
    wait_for_log(&third, "serving array");
    assert!(
        third.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "{}",
        third.log_text()
    );
    assert_eq!(third.status()["raid_disks"], 2);
    assert!(third.stop().success(), "{}", third.log_text());
    assert!(!third.socket.exists());
    assert!(!dir.path().join("third.sock.ctl").exists());
}

#[test]
fn after_a_clean_stop_the_next_host_starts_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path());
    let luns: Vec<Loop> = legs.iter().map(|p| Loop::attach_rw(p)).collect();
    let other: Vec<PathBuf> = luns.iter().map(|l| l.dev.clone()).collect();
    let mut first = host(dir.path(), "first", &legs, &[]);
    assert!(first.stop().success());
    let start = Instant::now();
    let second = host(dir.path(), "second", &other, &[]);
    let took = start.elapsed();
    let log = second.log_text();
    assert!(!log.contains("watching it"), "{log}");
    assert!(
        took < Duration::from_millis(5 * INTERVAL_MS + 1000),
        "waited {took:?} after a clean stop"
    );
}

#[test]
fn a_host_forced_in_fences_the_one_that_served() {
    let dir = tempfile::tempdir().unwrap();
    let legs = array(dir.path());
    let luns: Vec<Loop> = legs.iter().map(|p| Loop::attach_rw(p)).collect();
    let other: Vec<PathBuf> = luns.iter().map(|l| l.dev.clone()).collect();
    let first = host(dir.path(), "first", &legs, &[]);
    let forced = host(dir.path(), "forced", &other, &["--force"]);
    // The forced start overwrote the heartbeat: the host that served finds it at
    // its next beat and stops writing. (Should the forced host's write fall
    // between the first's check and its write, the forced one is fenced instead:
    // one of the two writes, never both.)
    let start = Instant::now();
    let (fenced, status, serving) = loop {
        let a = first.status();
        let b = forced.status();
        match (a["writer_role"] == "fenced", b["writer_role"] == "fenced") {
            (true, false) => break (&first, a, &forced),
            (false, true) => break (&forced, b, &first),
            (true, true) => panic!("both fenced: {a} {b}"),
            (false, false) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nobody fenced: {a} {b}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status["fenced"]
            .as_str()
            .unwrap_or("")
            .contains("overwrote"),
        "{status}"
    );
    // The fenced host says why in its log, and writes nothing more.
    let log = fenced.log_text();
    assert!(
        log.lines().any(|l| l.contains("fenced: leg ")
            && l.contains(
                "overwrote this node's multi-host heartbeat: another host serves these legs"
            )
            && l.ends_with("this node writes nothing until it has rejoined")),
        "no fencing by an overwritten heartbeat in the log: {log}"
    );
    let mut c = Client::connect(&fenced.socket, 1, 4096);
    c.buf().copy_from_slice(&pattern(2, 4096, 4096));
    assert_ne!(
        c.write(0, 4096, 0, 4096),
        0,
        "a fenced host acknowledged a write"
    );
    drop(c);
    // The other one (the forced-in host, unless the start raced a beat) writes.
    let mut c = Client::connect(&serving.socket, 1, 4096);
    c.buf().copy_from_slice(&pattern(3, 8192, 4096));
    assert_eq!(c.write(0, 8192, 0, 4096), 0, "{}", serving.log_text());
    assert_eq!(c.flush(0), 0);
    c.buf().fill(0);
    assert_eq!(c.read(0, 8192, 0, 4096), 0);
    assert_eq!(c.buf(), &pattern(3, 8192, 4096)[..]);
    drop(c);
    assert_ne!(serving.status()["writer_role"], "fenced");
    for leg in &legs {
        let data = common::data_area(leg);
        assert_eq!(
            &data[8192..12288],
            &pattern(3, 8192, 4096)[..],
            "{} lacks the serving host's write",
            leg.display()
        );
        assert_ne!(
            &data[4096..8192],
            &pattern(2, 4096, 4096)[..],
            "the fenced host wrote {}",
            leg.display()
        );
    }
}
