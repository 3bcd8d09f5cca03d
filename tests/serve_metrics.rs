//! `serve --metrics`: what a Prometheus server scrapes, parsed with a Prometheus
//! text parser, counts the requests a client made (per queue and kind, bytes,
//! errors) and says what `status --json` says (legs, degradation, bitmap, events).

mod common;

use common::{Client, Serve};
use prometheus_parse::{Sample, Scrape, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The address the metrics endpoint of `s` said it listens on.
fn metrics_addr(s: &Serve) -> String {
    let start = Instant::now();
    loop {
        let log = s.log_text();
        if let Some(rest) = log.split("metrics on http://").nth(1) {
            return rest.split('/').next().unwrap().to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no metrics address: {log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `path` over HTTP; (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn scrape(addr: &str) -> Vec<Sample> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.0 200 OK");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    Scrape::parse(lines).unwrap().samples
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        other => panic!("not a number: {other:?}"),
    }
}

/// The value of the sample `name` whose labels include `labels` (0 if none).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| number(&s.value))
        .sum()
}

/// Requests per (queue, kind) from a scrape.
fn requests(samples: &[Sample]) -> BTreeMap<(String, String), f64> {
    samples
        .iter()
        .filter(|s| s.metric == "vhost_user_md_requests_total")
        .map(|s| {
            let k = (
                s.labels.get("queue").unwrap_or_default().to_string(),
                s.labels.get("kind").unwrap_or_default().to_string(),
            );
            (k, number(&s.value))
        })
        .collect()
}

#[test]
fn the_metrics_count_the_requests_made_and_say_what_status_says() {
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let mut args: Vec<&str> = vec!["--queues", "2", "--metrics", "127.0.0.1:0"];
    args.extend(legs.iter().map(|l| l.to_str().unwrap()));
    let s = Serve::start(&dir.path().join("vm.sock"), &args);
    let addr = metrics_addr(&s);
    assert_eq!(get(&addr, "/nothing").0, "HTTP/1.0 404 Not Found");

    let mut c = Client::connect(&s.socket, 2, 1 << 20);
    let before = requests(&scrape(&addr));
    // Queue 0: 3 writes of 8 KiB and 2 reads of 4 KiB; queue 1: 1 write of 64 KiB,
    // a flush, and a read beyond the end (an error).
    for i in 0..3 {
        assert_eq!(c.write(0, i * 8192, 0, 8192), 0);
    }
    for i in 0..2 {
        assert_eq!(c.read(0, i * 4096, 0, 4096), 0);
    }
    assert_eq!(c.write(1, 1 << 20, 0, 65536), 0);
    assert_eq!(c.flush(1), 0);
    let beyond = c.capacity;
    assert_ne!(c.read(1, beyond, 0, 4096), 0, "a read beyond the end fails");

    let after = scrape(&addr);
    let now = requests(&after);
    let delta = |q: &str, k: &str| {
        let key = (q.to_string(), k.to_string());
        now.get(&key).copied().unwrap_or(0.0) - before.get(&key).copied().unwrap_or(0.0)
    };
    assert_eq!(delta("0", "write"), 3.0);
    assert_eq!(delta("0", "read"), 2.0);
    assert_eq!(delta("1", "write"), 1.0);
    assert_eq!(delta("1", "flush"), 1.0);
    assert_eq!(delta("1", "read"), 1.0);
    let bytes = |q, k| {
        value(
            &after,
            "vhost_user_md_request_bytes_total",
            &[("queue", q), ("kind", k)],
        )
    };
    assert_eq!(bytes("0", "write"), 3.0 * 8192.0);
    assert_eq!(bytes("1", "write"), 65536.0);
    assert!(bytes("0", "read") >= 2.0 * 4096.0);
    assert_eq!(
        value(
            &after,
            "vhost_user_md_request_errors_total",
            &[("queue", "1"), ("kind", "read"), ("status", "ioerr")]
        ),
        1.0
    );
    // Latency histograms: one observation per request, in the count.
    assert_eq!(
        value(
            &after,
            "vhost_user_md_request_duration_seconds_count",
            &[("queue", "0"), ("kind", "write")]
        ),
        now[&("0".to_string(), "write".to_string())]
    );

    // What status --json says, once the bitmap daemon has cleared the bits.
    let st = s.wait_for("a clean bitmap", |st| st["bitmap_dirty"] == 0);
    let m = scrape(&addr);
    let st2 = s.status();
    let total: f64 = requests(&m).values().sum();
    assert_eq!(total, st["requests_completed"].as_f64().unwrap());
    assert_eq!(total, st2["requests_completed"].as_f64().unwrap());
    assert_eq!(
        value(&m, "vhost_user_md_requests_completed_total", &[]),
        total
    );
    assert_eq!(value(&m, "vhost_user_md_bitmap_dirty_chunks", &[]), 0.0);
    assert_eq!(
        value(&m, "vhost_user_md_bitmap_chunks", &[]),
        st["bitmap_chunks"].as_f64().unwrap()
    );
    assert_eq!(
        value(&m, "vhost_user_md_array_events", &[]),
        st2["events"].as_f64().unwrap()
    );
    assert_eq!(
        value(&m, "vhost_user_md_array_size_bytes", &[]),
        st["size_sectors"].as_f64().unwrap() * 512.0
    );
    assert_eq!(value(&m, "vhost_user_md_array_degraded", &[]), 0.0);
    let uuid = st["uuid"].as_str().unwrap();
    assert_eq!(
        value(&m, "vhost_user_md_array_info", &[("uuid", uuid)]),
        1.0
    );
    for leg in st["legs"].as_array().unwrap() {
        let name = leg["name"].as_str().unwrap();
        let state = leg["state"].as_str().unwrap();
        assert_eq!(state, "in-sync");
        assert_eq!(
            value(
                &m,
                "vhost_user_md_leg_state",
                &[("leg", name), ("state", state)]
            ),
            1.0
        );
    }
    let role = st2["writer_role"].as_str().unwrap();
    assert_eq!(
        value(&m, "vhost_user_md_writer_role", &[("state", role)]),
        1.0
    );

    // A failed leg shows at the next scrape, as status shows it.
    let (ok, out) = s.manage("fail", &legs[1]);
    assert!(ok, "{out}");
    let st = s.status();
    let m = scrape(&addr);
    assert_eq!(st["degraded"], true);
    assert_eq!(value(&m, "vhost_user_md_array_degraded", &[]), 1.0);
    assert_eq!(value(&m, "vhost_user_md_array_legs_in_sync", &[]), 1.0);
    let failed = legs[1].to_str().unwrap();
    assert_eq!(common::leg_state(&st, &legs[1]), "faulty", "status: {st}");
    assert_eq!(
        value(
            &m,
            "vhost_user_md_leg_state",
            &[("leg", failed), ("state", "faulty")]
        ),
        1.0
    );
    assert_eq!(
        value(&m, "vhost_user_md_array_events", &[]),
        st["events"].as_f64().unwrap()
    );
}

#[test]
fn a_metrics_address_in_use_refuses_the_start_and_touches_no_leg() {
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let before: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    let out = common::bin()
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("vm.sock"))
        .args(["--metrics", &addr])
        .args(&legs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("metrics address {addr}")), "{err}");
    let after: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    assert!(before == after, "a refused start wrote to a leg");
}

#[test]
fn a_client_that_sends_nothing_does_not_stop_the_scrapes() {
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let mut args: Vec<&str> = vec!["--metrics", "127.0.0.1:0"];
    args.extend(legs.iter().map(|l| l.to_str().unwrap()));
    let s = Serve::start(&dir.path().join("vm.sock"), &args);
    let addr = metrics_addr(&s);
    // Connections that never finish their request, one sending half a line.
    let _idle = TcpStream::connect(&addr).unwrap();
    let mut half = TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /metr").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let a = addr.clone();
    std::thread::spawn(move || {
        let _ = tx.send(get(&a, "/metrics").0);
    });
    // Each stalled client is given 2 s; the scrape behind them is answered.
    let status = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a scrape behind stalled clients was never answered");
    assert_eq!(status, "HTTP/1.0 200 OK");
    // An endless request head is cut off (answered 400, or reset when the
    // connection is closed with the rest unread), and the next scrape is answered.
    let mut endless = TcpStream::connect(&addr).unwrap();
    let junk = vec![b'x'; 64 << 10];
    let _ = endless.write_all(&junk);
    let mut answer = String::new();
    let _ = endless.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.0 400"),
        "{answer:?}"
    );
    assert_eq!(get(&addr, "/metrics").0, "HTTP/1.0 200 OK");
}

#[test]
fn metrics_on_a_unix_socket_answer_and_the_path_goes_with_the_node() {
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let legs = common::create_array(dir.path(), &["a.img", "b.img"], "64M", None);
    let path = dir.path().join("vm.metrics");
    let spec = format!("unix:{}", path.display());
    let mut args: Vec<&str> = vec!["--metrics", &spec];
    args.extend(legs.iter().map(|l| l.to_str().unwrap()));
    let mut s = Serve::start(&dir.path().join("vm.sock"), &args);
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    let samples = Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap()
        .samples;
    assert_eq!(
        value(&samples, "vhost_user_md_array_legs_in_sync", &[]),
        2.0
    );
    assert!(s.stop().success());
    assert!(!path.exists(), "the metrics socket is left behind");
}
