//! Benchmark: how fast a resync and a rebuild copy allocated data, against a raw
//! copy between the same files, and what a guest's writes see meanwhile.
//!
//! cargo bench --bench resync_rate -- [--size-mib N] [--dir PATH] [--rate-mib N] [--qd N] [--dd-bs-mib N]
//!
//! Two leg files of `--size-mib` MiB (default 1024) are filled with data (so that
//! every block is allocated: a copy of holes proves nothing), then:
//! 1. raw copy: `dd iflag=direct oflag=direct bs=--dd-bs-mib M` (default 1) of the
//!    data area from the first leg to the second, timed, three times; twice more at
//!    the end (the median of the five is the reference);
//! 2. resync: `create` without `--assume-clean` (the first assembly resyncs the
//!    whole array), `serve`, and the time from "resync of N chunks starts" to
//!    "resync pass complete" in its log; no guest;
//! 3. the same with a client writing 4 KiB blocks at random offsets at depth `--qd`
//!    (default 8) throughout, then 3 s more once the resync ended (the baseline);
//! 4. the same with `--resync-max-rate` (`--rate-mib`, default a quarter of the raw
//!    copy's rate): the rate held, and the guest's latencies;
//! 5. rebuild: a clean array, one leg failed and removed, a third (filled) file
//!    added as a blank leg: the time of the full recovery.
//!
//! `VUMD_BIN=PATH` measures another build of vhost-user-md.
//!
//! Prints the copy rates, their ratio to the raw copy, and the guest's write
//! latencies (p50, p99, p99.9, max) per phase.

use std::io::{BufRead, Write};
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;

struct Opts {
    size_mib: u64,
    dir: PathBuf,
    rate_mib: Option<u64>,
    qd: usize,
    dd_bs_mib: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        size_mib: 1024,
        dir: PathBuf::from("/var/tmp/vumd-resync-bench"),
        rate_mib: None,
        qd: 8,
        dd_bs_mib: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--size-mib" => o.size_mib = v.parse().unwrap(),
            "--dir" => o.dir = PathBuf::from(v),
            "--rate-mib" => o.rate_mib = Some(v.parse().unwrap()),
            "--qd" => o.qd = v.parse().unwrap(),
            "--dd-bs-mib" => o.dd_bs_mib = v.parse().unwrap(),
            "--bench" => {
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    o
}

/// The binary under test: `VUMD_BIN` if set (another build), else this one.
fn bin() -> Command {
    match std::env::var_os("VUMD_BIN") {
        Some(p) => Command::new(p),
        None => Command::new(env!("CARGO_BIN_EXE_vhost-user-md")),
    }
}

/// Writes `bytes` of non-zero data (every block allocated) and syncs.
fn fill(path: &Path, bytes: u64, seed: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    for i in 0..bytes / MIB {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn create(legs: &[&Path], assume_clean: bool) -> u64 {
    let mut c = bin();
    c.arg("create").arg("--force");
    if assume_clean {
        c.arg("--assume-clean");
    }
    let out = c.args(legs).output().unwrap();
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "data offset N sectors"
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let after = text.split("data offset ").nth(1).expect("data offset");
    after
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 512
}

struct Serve {
    child: Child,
    sock: PathBuf,
    /// (log line, when it was read)
    lines: Arc<std::sync::Mutex<Vec<(String, Instant)>>>,
}

fn serve(dir: &Path, legs: &[&Path], extra: &[&str]) -> Serve {
    let sock = dir.join("s.sock");
    let mut child = bin()
        .arg("serve")
        .arg("--socket")
        .arg(&sock)
        .args(extra)
        .args(legs)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let err = child.stderr.take().unwrap();
    let l2 = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            l2.lock().unwrap().push((line, Instant::now()));
        }
    });
    let ctl = PathBuf::from(format!("{}.ctl", sock.display()));
    for _ in 0..800 {
        if ctl.exists() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("serve exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Serve { child, sock, lines }
}

impl Serve {
    /// When a line containing `what` was logged (waits up to `limit`).
    fn wait_line(&self, what: &str, limit: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if let Some((_, t)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(l, _)| l.contains(what))
            {
                return *t;
            }
            assert!(start.elapsed() < limit, "no log line with {what:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The copy's duration from the log's timestamps (milliseconds), of the pass
    /// of `kind` ("resync" or "recovery").
    fn pass_secs(&self, kind: &str) -> f64 {
        let lines = self.lines.lock().unwrap();
        let stamp = |what: &str| -> f64 {
            let l = &lines.iter().find(|(l, _)| l.contains(what)).expect(what).0;
            // [2026-12-02T16:27:03.600Z ...
            let t = &l[1..24];
            let hms: Vec<f64> = t[11..].split(':').map(|x| x.parse().unwrap()).collect();
            hms[0] * 3600.0 + hms[1] * 60.0 + hms[2]
        };
        stamp(&format!("{kind} pass complete")) - stamp(&format!("{kind} of "))
    }

    fn run(&self, args: &[&str]) {
        let out = bin().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn stop(mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Random 4 KiB writes over `[0, size)` at depth `qd` until `stop`; latencies in µs
/// and when each ended.
fn write_until(sock: &Path, size: u64, qd: usize, stop: &AtomicBool) -> Vec<(Instant, u32)> {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let region = b.alloc_mem_region(qd * BS).unwrap();
    b.map_mem_region(&region).unwrap();
    let mut q = out.queues.remove(0);
    let blocks = size / BS as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut start = vec![Instant::now(); qd];
    let mut lat = Vec::new();
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let submit = |q: &mut blkio::Blkioq, slot: usize, rng: &mut u64| {
        let off = (xorshift(rng) % blocks) * BS as u64;
        let ptr = (region.addr + slot * BS) as *mut u8;
        q.write(off, ptr, BS, slot, blkio::ReqFlags::empty());
    };
    for (slot, s) in start.iter_mut().enumerate() {
        *s = Instant::now();
        submit(&mut q, slot, &mut rng);
    }
    let mut inflight = qd;
    while inflight > 0 {
        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
        let now = Instant::now();
        let stopping = stop.load(Ordering::Relaxed);
        for cp in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let cp = unsafe { cp.as_ptr().read() };
            assert_eq!(cp.ret, 0, "write failed: {}", cp.ret);
            let slot = cp.user_data;
            lat.push((now, (now - start[slot]).as_micros() as u32));
            if stopping {
                inflight -= 1;
            } else {
                start[slot] = Instant::now();
                submit(&mut q, slot, &mut rng);
            }
        }
    }
    lat
}

fn pct_row(name: &str, lat: &[u32], secs: f64) -> String {
    let mut lat = lat.to_vec();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    format!(
        "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
        lat.len(),
        lat.len() as f64 / secs.max(1e-9),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    )
}

fn dd(from: &Path, to: &Path, offset: u64, bytes: u64, bs_mib: u64) -> f64 {
    let bs = bs_mib * MIB;
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", from.display()))
        .arg(format!("of={}", to.display()))
        .arg(format!("bs={bs}"))
        .arg(format!("skip={offset}"))
        .arg(format!("seek={offset}"))
        .arg(format!("count={bytes}"))
        .arg("iflag=direct,skip_bytes,count_bytes")
        .arg("oflag=direct,seek_bytes")
        .arg("conv=notrunc")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

/// A resync of the whole array with a client writing throughout (if `qd` > 0);
/// returns (copy seconds, latencies during the copy, latencies in the 3 s after).
fn resync_with_guest(
    o: &Opts,
    legs: &[&Path],
    extra: &[&str],
    size: u64,
) -> (f64, Vec<u32>, Vec<u32>, f64) {
    create(legs, false);
    let s = serve(&o.dir, legs, extra);
    let stop = Arc::new(AtomicBool::new(false));
    let sock = s.sock.clone();
    let (stop2, qd) = (stop.clone(), o.qd);
    let client = std::thread::spawn(move || write_until(&sock, size, qd, &stop2));
    let begun = s.wait_line("resync of ", Duration::from_secs(60));
    let ended = s.wait_line("resync pass complete", Duration::from_secs(3600));
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let lat = client.join().unwrap();
    let after = Instant::now() - Duration::from_secs(3);
    let during: Vec<u32> = lat
        .iter()
        .filter(|(t, _)| *t >= begun && *t <= ended)
        .map(|&(_, l)| l)
        .collect();
    let base: Vec<u32> = lat
        .iter()
        .filter(|(t, _)| {
            *t > ended + Duration::from_millis(200) && *t <= after + Duration::from_secs(3)
        })
        .map(|&(_, l)| l)
        .collect();
    let secs = s.pass_secs("resync");
    s.stop();
    (secs, during, base, (ended - begun).as_secs_f64())
}

fn main() {
    let o = opts();
    std::fs::create_dir_all(&o.dir).unwrap();
    let (a, b, c) = (
        o.dir.join("a.img"),
        o.dir.join("b.img"),
        o.dir.join("c.img"),
    );
    let bytes = o.size_mib * MIB;
    eprintln!(
        "filling three {} MiB leg files in {}",
        o.size_mib,
        o.dir.display()
    );
    fill(&a, bytes, 1);
    fill(&b, bytes, 2);
    fill(&c, bytes, 3);
    let legs = [a.as_path(), b.as_path()];
    let data_off = create(&legs, false);
    let data = bytes - data_off;
    let mib = |secs: f64| data as f64 / MIB as f64 / secs;

    // 1. raw copy (three times: the device's pace moves).
    let mut raw_secs: Vec<f64> = (0..3)
        .map(|_| dd(&a, &b, data_off, data, o.dd_bs_mib))
        .collect();
    let dd1 = raw_secs[0];
    eprintln!("raw copy: {:.1} s, {:.0} MiB/s", dd1, mib(dd1));

    // 2. resync, nobody writing.
    create(&legs, false);
    let s = serve(&o.dir, &legs, &[]);
    s.wait_line("resync pass complete", Duration::from_secs(3600));
    let r_alone = s.pass_secs("resync");
    s.stop();
    eprintln!("resync alone: {:.1} s, {:.0} MiB/s", r_alone, mib(r_alone));

    // 3. resync at full rate with a guest writing.
    let size = data;
    let (r_full, lat_full, lat_base, _) = resync_with_guest(&o, &legs, &[], size);
    eprintln!(
        "resync with a guest: {:.1} s, {:.0} MiB/s",
        r_full,
        mib(r_full)
    );

    // 4. limited rate.
    let rate_mib = o.rate_mib.unwrap_or(((mib(dd1) / 4.0) as u64).max(1));
    let rate_arg = format!("{}M", rate_mib);
    let (r_lim, lat_lim, _, _) =
        resync_with_guest(&o, &legs, &["--resync-max-rate", &rate_arg], size);
    eprintln!(
        "resync limited to {rate_mib} MiB/s: {:.1} s, {:.1} MiB/s",
        r_lim,
        mib(r_lim)
    );

    // 5. rebuild: a clean array, leg b failed and removed, c added blank.
    create(&legs, true);
    let s = serve(&o.dir, &legs, &[]);
    let ctl = s.sock.to_str().unwrap().to_string();
    s.run(&["manage", &ctl, "fail", b.to_str().unwrap()]);
    s.run(&["manage", &ctl, "remove", b.to_str().unwrap()]);
    s.run(&["manage", &ctl, "add", c.to_str().unwrap()]);
    s.wait_line("recovery pass complete", Duration::from_secs(3600));
    let rebuild = s.pass_secs("recovery");
    s.stop();
    eprintln!("rebuild: {:.1} s, {:.0} MiB/s", rebuild, mib(rebuild));

    // 1 again, twice.
    raw_secs.extend((0..2).map(|_| dd(&a, &b, data_off, data, o.dd_bs_mib)));
    let rates: Vec<String> = raw_secs.iter().map(|&t| format!("{:.0}", mib(t))).collect();
    raw_secs.sort_by(f64::total_cmp);
    let raw = mib(raw_secs[raw_secs.len() / 2]);
    println!(
        "\n{} MiB of data per leg, legs in {}; raw copy `dd iflag=direct oflag=direct bs={}M`, three times before and twice after: {} MiB/s (median {:.0})\n",
        data / MIB,
        o.dir.display(),
        o.dd_bs_mib,
        rates.join(", "),
        raw
    );
    println!("| copy | seconds | MiB/s | of the raw copy (median) |");
    println!("|---|---:|---:|---:|");
    for (name, secs) in [
        ("resync, no guest", r_alone),
        ("resync, guest writing at QD 8", r_full),
        ("rebuild (recovery of a blank leg), no guest", rebuild),
    ] {
        println!(
            "| {name} | {secs:.2} | {:.0} | {:.0}% |",
            mib(secs),
            100.0 * mib(secs) / raw
        );
    }
    println!(
        "| resync, --resync-max-rate {rate_mib}M, guest writing | {r_lim:.2} | {:.1} | (limit held to {:+.1}%) |",
        mib(r_lim),
        100.0 * (mib(r_lim) - rate_mib as f64) / rate_mib as f64
    );
    println!("\n| guest 4 KiB random writes, QD {} | writes | IOPS | p50 ms | p99 ms | p99.9 ms | max ms |", o.qd);
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!("{}", pct_row("no resync (3 s after it)", &lat_base, 3.0));
    println!(
        "{}",
        pct_row("during a full-rate resync", &lat_full, r_full)
    );
    println!(
        "{}",
        pct_row(
            &format!("during a resync limited to {rate_mib} MiB/s"),
            &lat_lim,
            r_lim
        )
    );
    for p in [&a, &b, &c] {
        let _ = std::fs::remove_file(p);
    }
}
