//! The control socket answers each connection on its own: idle connections, a
//! client that trickles its request and a client that sends an endless line do not
//! keep `status` from answering, and an endless line is not buffered.

mod common;

use common::{bin, leg_state, Serve};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A plain two-leg array of image files, served.
fn served(dir: &Path) -> (Serve, PathBuf, PathBuf) {
    let legs = common::create_array(dir, &["a.img", "b.img"], "64M", None);
    let (a, b) = (legs[0].clone(), legs[1].clone());
    let s = Serve::start(
        &dir.join("vm.sock"),
        &[a.to_str().unwrap(), b.to_str().unwrap()],
    );
    (s, a, b)
}

fn control(s: &Serve) -> PathBuf {
    let mut p = s.socket.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// Runs `vhost-user-md status` and waits `limit` at most: the status, or why not.
fn status_within(s: &Serve, limit: Duration) -> Result<serde_json::Value, String> {
    let mut child = bin()
        .args(["status", "--format", "json"])
        .arg(&s.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            return serde_json::from_slice(&out.stdout).map_err(|e| e.to_string());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `/proc/PID/status` value in KiB.
fn proc_kib(pid: u32, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

#[test]
fn idle_connections_do_not_hold_up_status() {
    let d = tempfile::tempdir().unwrap();
    let (s, _, _) = served(d.path());
    let idle: Vec<UnixStream> = (0..16)
        .map(|_| UnixStream::connect(control(&s)).unwrap())
        .collect();
    let t = Instant::now();
    let st = status_within(&s, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("status with {} idle connections: {e}", idle.len()));
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st}");
    eprintln!(
        "status answered in {:?} beside 16 idle connections",
        t.elapsed()
    );
    // An idle connection is closed after the request timeout, with an answer.
    let mut first = BufReader::new(idle.into_iter().next().unwrap());
    first
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut line = String::new();
    first.read_line(&mut line).unwrap();
    assert!(
        line.contains("\"ok\":false"),
        "idle connection got {line:?}"
    );
}

#[test]
fn connections_beyond_the_cap_are_refused_at_once() {
    let d = tempfile::tempdir().unwrap();
    let (s, _, _) = served(d.path());
    let _idle: Vec<UnixStream> = (0..32)
        .map(|_| UnixStream::connect(control(&s)).unwrap())
        .collect();
    // Wait until the server has accepted them all, then one more is refused.
    std::thread::sleep(Duration::from_millis(500));
    let extra = UnixStream::connect(control(&s)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&extra).read_line(&mut line).unwrap();
    assert!(
        line.contains("\"ok\":false") && line.contains("busy"),
        "33rd connection got {line:?}"
    );
}

#[test]
fn a_trickling_client_does_not_hold_up_status() {
    let d = tempfile::tempdir().unwrap();
    let (s, _, _) = served(d.path());
    let mut slow = UnixStream::connect(control(&s)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    // One byte a second of a request that never ends.
    let trickler = std::thread::spawn(move || {
        let start = Instant::now();
        slow.write_all(b"{").unwrap();
        while !done2.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(40) {
            std::thread::sleep(Duration::from_secs(1));
            if slow.write_all(b" ").is_err() {
                return Some(start.elapsed());
            }
        }
        None
    });
    std::thread::sleep(Duration::from_millis(2500));
    let r = status_within(&s, Duration::from_secs(5));
    let st = r.unwrap_or_else(|e| {
        done.store(true, Ordering::SeqCst);
        panic!("status beside a trickling client: {e}")
    });
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st}");
    // The trickler itself is cut off once its request took too long.
    let cut = trickler.join().unwrap();
    let cut = cut.expect("the trickling client was never cut off");
    assert!(cut < Duration::from_secs(20), "cut off after {cut:?}");
    eprintln!("trickling client cut off after {cut:?}");
}

#[test]
fn an_endless_line_is_refused_without_being_buffered() {
    let d = tempfile::tempdir().unwrap();
    let (s, _, _) = served(d.path());
    let pid = s.child.as_ref().unwrap().id();
    // Let start-up settle, then note the peak so far.
    status_within(&s, Duration::from_secs(10)).unwrap();
    let hwm0 = proc_kib(pid, "VmHWM");
    const LINE: usize = 100 << 20;
    let mut conn = UnixStream::connect(control(&s)).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    let mut cut = false;
    while sent < LINE {
        match conn.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => {
                eprintln!("the line was cut off after {sent} bytes: {e}");
                cut = true;
                break;
            }
        }
    }
    if !cut {
        let _ = conn.write_all(b"\n");
    }
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = BufReader::new(&conn).read_line(&mut answer);
    assert!(
        answer.is_empty() || answer.contains("\"ok\":false"),
        "answer to a {LINE}-byte line: {answer:?}"
    );
    let (rss, hwm) = (proc_kib(pid, "VmRSS"), proc_kib(pid, "VmHWM"));
    eprintln!(
        "sent {sent} bytes; answer {:?}; serve RSS {rss} KiB, peak {hwm0} -> {hwm} KiB",
        answer.trim()
    );
    assert!(
        hwm < hwm0 + 16 * 1024,
        "serve's peak RSS grew from {hwm0} KiB to {hwm} KiB for a {LINE}-byte line"
    );
    let st = status_within(&s, Duration::from_secs(5)).unwrap();
    assert_eq!(st["legs"].as_array().unwrap().len(), 2, "{st}");
}

#[test]
fn two_fails_at_once_leave_an_in_sync_leg() {
    let d = tempfile::tempdir().unwrap();
    let (s, a, b) = served(d.path());
    let fail = |leg: &Path| {
        bin()
            .arg("manage")
            .arg(&s.socket)
            .arg("fail")
            .arg(leg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (fail(&a), fail(&b));
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    assert!(
        oa.status.success() != ob.status.success(),
        "exactly one fail must succeed: {} / {}",
        String::from_utf8_lossy(&oa.stderr),
        String::from_utf8_lossy(&ob.stderr)
    );
    let st = status_within(&s, Duration::from_secs(5)).unwrap();
    let states = [leg_state(&st, &a), leg_state(&st, &b)];
    assert_eq!(
        states.iter().filter(|s| *s == "in-sync").count(),
        1,
        "{states:?}"
    );
}
