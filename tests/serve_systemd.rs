//! `serve` under systemd: a `Type=notify` unit is told READY only once the
//! vhost-user socket serves, gets a STATUS line and the watchdog's keep-alive while
//! it runs, and STOPPING when it stops; a unit's config file is read by
//! `serve --config`, and a broken one is one line naming the key.

mod common;

use common::{bin, Serve};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

/// The datagrams a `serve` sends to its NOTIFY_SOCKET.
struct Notifications {
    sock: UnixDatagram,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notifications { sock }
    }

    /// The next datagram within `limit`, as text.
    fn next(&self, limit: Duration) -> Option<String> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < limit {
            if let Ok(n) = self.sock.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// Datagrams until one has the line `line` (within `limit`): all of them.
    fn until(&self, line: &str, limit: Duration) -> Vec<String> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while start.elapsed() < limit {
            if let Some(m) = self.next(Duration::from_millis(200)) {
                let done = m.lines().any(|l| l == line);
                seen.push(m);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {line} within {limit:?}; got {seen:?}");
    }
}

#[test]
fn a_notify_unit_is_told_ready_once_the_socket_serves_kept_alive_and_told_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let notes = Notifications::bind(&dir.path().join("notify"));
    let socket = dir.path().join("vm.sock");
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut child = bin()
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .args(["--heartbeat-interval", "100ms"])
        .args(&legs)
        .env("NOTIFY_SOCKET", dir.path().join("notify"))
        // The watchdog as systemd sets it for `WatchdogSec=1`.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let before = notes.until("READY=1", Duration::from_secs(30));
    let ready = before.last().unwrap();
    // Told ready only when a front-end can connect and be served.
    let mut c = common::Client::connect(&socket, 1, 4096);
    assert_eq!(c.read(0, 0, 0, 4096), 0, "READY before the device serves");
    drop(c);
    let log_text = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(
        log_text.contains("serving on"),
        "READY before the start ended: {log_text}"
    );
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS with READY: {ready:?}"));
    assert!(status.contains("2/2 legs in sync"), "{status}");
    // The keep-alive: more than one WATCHDOG=1 within two watchdog intervals.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(2) {
        if let Some(m) = notes.next(Duration::from_millis(200)) {
            if m.lines().any(|l| l == "WATCHDOG=1") {
                pings += 1;
            }
        }
    }
    assert!(
        pings >= 2,
        "{pings} watchdog keep-alives in 2 s with WatchdogSec=1"
    );
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    notes.until("STOPPING=1", Duration::from_secs(30));
    assert!(child.wait().unwrap().success());
    // Stopped cleanly: the array is clean.
    let out = bin()
        .arg("examine")
        .arg("--json")
        .args(&legs)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for leg in v["legs"].as_array().unwrap() {
        assert_eq!(leg["superblock"]["state"], "clean", "{leg}");
    }
}

#[test]
fn serve_reads_its_options_from_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let conf = dir.path().join("disk1.conf");
    std::fs::write(
        &conf,
        format!(
            "# disk1\nlegs = [{:?}, {:?}]\nqueues = 3\nread-only = true\n",
            legs[0], legs[1]
        ),
    )
    .unwrap();
    let s = Serve::start(
        &dir.path().join("vm.sock"),
        &["--config", conf.to_str().unwrap()],
    );
    let log = s.log_text();
    assert!(log.contains("num-queues=3"), "{log}");
    let mut c = common::Client::connect_with(&s.socket, 3, 4096, true);
    assert_eq!(c.read(2, 0, 0, 4096), 0, "a read on the third queue");
}

#[test]
fn a_broken_config_file_is_one_line_naming_the_key_and_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let before: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    let conf = dir.path().join("disk2.conf");
    std::fs::write(
        &conf,
        format!(
            "socket = {:?}\nlegs = [{:?}, {:?}]\nqueus = 2\n",
            dir.path().join("vm.sock"),
            legs[0],
            legs[1]
        ),
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--config"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "vhost-user-md: config {}: line 3: unknown key \"queus\"",
            conf.display()
        )),
        "{err}"
    );
    let after: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    assert!(before == after, "a refused start wrote to a leg");
    assert!(!dir.path().join("vm.sock").exists());
}
