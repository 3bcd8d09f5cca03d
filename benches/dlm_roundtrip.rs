//! Benchmark: lock-manager round trips (NL→EX convert + EX→NL convert, and
//! lock + unlock) per second and their latency, on the in-process lock manager
//! and on `lockd`.
//!
//! cargo bench --bench dlm_roundtrip -- [--seconds N]

use std::time::{Duration, Instant};
use vhost_user_md::dlm::local::LocalDlm;
use vhost_user_md::dlm::lockd::LockdMember;
use vhost_user_md::dlm::{flags, Event, LockId, LockSpace, Mode, Status};

fn wait(rx: &crossbeam_channel::Receiver<Event>, lock: LockId) -> Status {
    loop {
        if let Ok(Event::Ast {
            lock: l, status, ..
        }) = rx.recv_timeout(Duration::from_secs(5))
        {
            if l == lock {
                return status;
            }
        }
    }
}

fn pct(v: &mut [u32], p: f64) -> u32 {
    v.sort_unstable();
    v.get(((v.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(0)
}

/// Runs `op` repeatedly for `secs`; prints ops/s and p50/p99 in µs.
fn measure(label: &str, secs: u64, mut op: impl FnMut()) {
    let end = Instant::now() + Duration::from_secs(secs);
    let mut lat = Vec::new();
    let start = Instant::now();
    while Instant::now() < end {
        let t = Instant::now();
        op();
        lat.push(t.elapsed().as_micros() as u32);
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    println!("| {label} | {rate:.0} | {p50} | {p99} |");
}

fn run(kind: &str, m: &dyn LockSpace, secs: u64) {
    let rx = m.events();
    let id = m.lock(b"bench", Mode::Nl, flags::EXPEDITE, None).unwrap();
    assert_eq!(wait(&rx, id), Status::Granted);
    measure(
        &format!("{kind}: convert NL→EX→NL (2 round trips)"),
        secs,
        || {
            m.convert(id, Mode::Ex, flags::CONVERT, None).unwrap();
            assert_eq!(wait(&rx, id), Status::Granted);
            m.convert(id, Mode::Nl, flags::CONVERT, None).unwrap();
            assert_eq!(wait(&rx, id), Status::Granted);
        },
    );
    measure(
        &format!("{kind}: lock EX + unlock (2 round trips)"),
        secs,
        || {
            let l = m.lock(b"other", Mode::Ex, 0, None).unwrap();
            assert_eq!(wait(&rx, l), Status::Granted);
            m.unlock(l, 0, None).unwrap();
            assert_eq!(wait(&rx, l), Status::Unlocked);
        },
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    println!("| operation | per second | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    let dlm = LocalDlm::new();
    let m = dlm.join("bench", 32);
    run("local", &m, secs);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("lockd.sock");
    let mut d = std::process::Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
        .arg("lockd")
        .arg("--socket")
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let m = LockdMember::connect(&sock, "bench", 32).unwrap();
    run("lockd", &m, secs);
    drop(m);
    let _ = d.kill();
    let _ = d.wait();
}
