//! Benchmark: guest writes on a surviving node while it recovers a dead node.
//!
//! cargo bench --bench cluster_recovery -- [--size-mib N] [--dirty-mib N] [--seconds N] [--qd N] [--dir PATH] [--three-nodes]
//!     [--nodes N [--writers K] [--burst CHUNKS] [--log RUST_LOG]] [--keep]
//!
//! Two `serve` nodes share a clustered mirror over `lockd`. Node 1 writes into
//! `--dirty-mib` chunks (1 MiB each) and is killed with SIGKILL, its bits set. Node 2
//! sees the death, takes over node 1's bitmap slot and resyncs those chunks. A client
//! on node 2 keeps writing 4 KiB blocks at random offsets outside node 1's dirty
//! chunks, at queue depth `--qd`, for `--seconds` before the kill (baseline) and
//! until the recovery ends. Prints the write latencies (p50, p99, max) of both
//! phases, and the recovery's size, duration and rate.
//!
//! `--three-nodes`: a third node joins, and node 1's death is seen by two
//! survivors; whichever takes the slot over resyncs (node 2, which watched first).
//! A client on node 3 writes 4 KiB blocks at random offsets *inside* node 1's dirty
//! chunks, at depth 1, in both phases: while node 2 resyncs they wait whenever they
//! fall in node 2's announced window (at most 32 MiB).
//!
//! `--nodes N` (2 to 32): an array with N node slots; N nodes start at once, join,
//! write disjoint ranges, node 1 dies and the rest recover. Join time, recovery time
//! and the write latency of `--writers K` survivors (default 3) are printed; see
//! `cluster_recovery/many.rs`. `--keep` keeps the images and the nodes' logs
//! (`nK.log`, at `--log`, default info).

#[path = "cluster_recovery/many.rs"]
mod many;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BS: usize = 4096;
/// The most nodes `--nodes` starts.
const MAX_NODES: usize = 32;

struct Opts {
    size_mib: u64,
    dirty_mib: u64,
    seconds: u64,
    qd: usize,
    dir: PathBuf,
    three_nodes: bool,
    /// `--nodes N`: N nodes join at once (0: the two- or three-node modes).
    nodes: usize,
    /// With `--nodes`: how many survivors write at depth `qd` throughout.
    writers: usize,
    /// With `--nodes`: chunks each survivor dirties once all serve (one block each).
    burst: u64,
    /// With `--nodes`: the serve processes' RUST_LOG.
    log: String,
    /// Keep the directory (images, logs) at the end.
    keep: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        size_mib: 1024,
        dirty_mib: 256,
        seconds: 3,
        qd: 8,
        dir: PathBuf::from("/var/tmp"),
        three_nodes: false,
        nodes: 0,
        writers: 3,
        burst: 8,
        log: "info".into(),
        keep: false,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--size-mib" => o.size_mib = val.parse().expect("--size-mib N"),
            "--dirty-mib" => o.dirty_mib = val.parse().expect("--dirty-mib N"),
            "--seconds" => o.seconds = val.parse().expect("--seconds N"),
            "--qd" => o.qd = val.parse().expect("--qd N"),
            "--dir" => o.dir = PathBuf::from(val),
            "--nodes" => o.nodes = val.parse().expect("--nodes N"),
            "--writers" => o.writers = val.parse().expect("--writers N"),
            "--burst" => o.burst = val.parse().expect("--burst N"),
            "--log" => o.log = val,
            "--three-nodes" => {
                o.three_nodes = true;
                i += 1;
                continue;
            }
            "--keep" => {
                o.keep = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    assert!(
        o.dirty_mib * 2 <= o.size_mib,
        "--dirty-mib must be at most half --size-mib"
    );
    if o.nodes > 0 {
        assert!(
            (2..=MAX_NODES).contains(&o.nodes),
            "--nodes must be 2 to {MAX_NODES}"
        );
        assert!(!o.three_nodes, "--nodes or --three-nodes, not both");
        assert!(
            o.writers < o.nodes,
            "--writers must be below --nodes (node 1 dies)"
        );
        // Every survivor gets a range of at least one chunk outside the dirty ones.
        assert!(
            o.size_mib - o.dirty_mib >= (o.nodes as u64 - 1),
            "the array is too small for that many nodes"
        );
    }
    o
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
}

fn prefill(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let buf = vec![0u8; MIB as usize];
    for _ in 0..bytes / MIB {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn wait_path(p: &Path, child: &mut Child) {
    for _ in 0..400 {
        if p.exists() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("process exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no socket {}", p.display());
}

fn serve(sock: &Path, lockd: &Path, legs: &[PathBuf]) -> Child {
    let mut c = bin()
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .arg("--lock-manager")
        .arg(format!("lockd:{}", lockd.display()))
        // Both nodes' clients write while both nodes run.
        .arg("--shared-writes")
        .args(legs)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_path(&PathBuf::from(format!("{}.ctl", sock.display())), &mut c);
    c
}

fn status(sock: &Path) -> serde_json::Value {
    let out = bin()
        .args(["status", "--format", "json"])
        .arg(sock)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

struct Client {
    _b: blkio::Blkio,
    q: blkio::Blkioq,
    base: usize,
}

fn connect(sock: &Path, qd: usize) -> Client {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let region = b.alloc_mem_region(qd * 128 * 1024).unwrap();
    b.map_mem_region(&region).unwrap();
    let q = out.queues.remove(0);
    Client {
        base: region.addr,
        _b: b,
        q,
    }
}

/// Writes `bs` bytes at each offset, `qd` at a time.
fn write_all(c: &mut Client, offsets: &[u64], bs: usize, qd: usize) {
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    for batch in offsets.chunks(qd) {
        for (slot, &off) in batch.iter().enumerate() {
            let ptr = (c.base + slot * bs) as *mut u8;
            c.q.write(off, ptr, bs, slot, blkio::ReqFlags::empty());
        }
        let mut left = batch.len();
        while left > 0 {
            let n = c.q.do_io(&mut comps, 1, None, None).expect("do_io");
            for cp in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let cp = unsafe { cp.as_ptr().read() };
                assert_eq!(cp.ret, 0, "write failed: {}", cp.ret);
            }
            left -= n;
        }
    }
}

/// Random 4 KiB writes in `[lo, hi)` at depth `qd` until `stop`; latencies in µs.
fn write_until(c: &mut Client, lo: u64, hi: u64, qd: usize, stop: &dyn Fn() -> bool) -> Vec<u32> {
    write_until_worst(c, lo, hi, qd, stop).0
}

/// As [`write_until`], and when the slowest write was answered.
fn write_until_worst(
    c: &mut Client,
    lo: u64,
    hi: u64,
    qd: usize,
    stop: &dyn Fn() -> bool,
) -> (Vec<u32>, Instant) {
    let mut worst = (0u32, Instant::now());
    let blocks = (hi - lo) / BS as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut start = vec![Instant::now(); qd];
    let mut lat = Vec::new();
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let submit = |c: &mut Client, slot: usize, rng: &mut u64| {
        let off = lo + (xorshift(rng) % blocks) * BS as u64;
        let ptr = (c.base + slot * BS) as *mut u8;
        c.q.write(off, ptr, BS, slot, blkio::ReqFlags::empty());
    };
    for (slot, s) in start.iter_mut().enumerate() {
        *s = Instant::now();
        submit(c, slot, &mut rng);
    }
    let mut inflight = qd;
    let mut stopping = false;
    while inflight > 0 {
        let n = c.q.do_io(&mut comps, 1, None, None).expect("do_io");
        let now = Instant::now();
        if !stopping && stop() {
            stopping = true;
        }
        for cp in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let cp = unsafe { cp.as_ptr().read() };
            assert_eq!(cp.ret, 0, "write failed: {}", cp.ret);
            let slot = cp.user_data;
            let us = (now - start[slot]).as_micros() as u32;
            if us > worst.0 {
                worst = (us, now);
            }
            lat.push(us);
            if stopping {
                inflight -= 1;
            } else {
                start[slot] = Instant::now();
                submit(c, slot, &mut rng);
            }
        }
    }
    (lat, worst.1)
}

fn summary(name: &str, mut lat: Vec<u32>, secs: f64) -> String {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    format!(
        "| {name} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
        lat.len(),
        lat.len() as f64 / secs.max(1e-9),
        pct(0.50) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    )
}

fn main() {
    let o = opts();
    let dir = tempfile::tempdir_in(&o.dir).unwrap();
    let d = dir.path();
    let legs = vec![d.join("leg-a.img"), d.join("leg-b.img")];
    eprintln!("prefilling 2 x {} MiB in {}", o.size_mib, d.display());
    for l in &legs {
        prefill(l, (o.size_mib + 8) * MIB);
    }
    let out = bin()
        .args([
            "create",
            "--assume-clean",
            "--cluster-name",
            "bench",
            "--bitmap-chunk",
            "1M",
        ])
        .args(if o.nodes > 4 {
            vec!["--nodes".to_string(), o.nodes.to_string()]
        } else {
            Vec::new()
        })
        .args(&legs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lockd_sock = d.join("lockd.sock");
    let mut lockd = bin()
        .args(["lockd", "--socket"])
        .arg(&lockd_sock)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_path(&lockd_sock, &mut lockd);
    if o.nodes > 0 {
        many::many_nodes(&o, d, &legs, &lockd_sock);
        let _ = lockd.kill();
        let _ = lockd.wait();
        if o.keep {
            eprintln!("kept {}", dir.keep().display());
        }
        return;
    }
    let (s1, s2, s3) = (d.join("n1.sock"), d.join("n2.sock"), d.join("n3.sock"));
    let mut n1 = serve(&s1, &lockd_sock, &legs);
    let mut n2 = serve(&s2, &lockd_sock, &legs);
    let mut n3 = o.three_nodes.then(|| serve(&s3, &lockd_sock, &legs));

    // Node 1 dirties the first `dirty_mib` chunks.
    let mut c1 = connect(&s1, o.qd);
    let offsets: Vec<u64> = (0..o.dirty_mib).map(|m| m * MIB).collect();
    write_all(&mut c1, &offsets, BS, o.qd);
    let mut c2 = connect(&s2, o.qd);
    let (lo, hi) = (o.dirty_mib * MIB, o.size_mib * MIB);

    // With three nodes: a writer inside the dirty chunks on each survivor, one
    // phase while node 1 lives, one while its chunks are resynced.
    let base_done = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let inside: Vec<_> = if o.three_nodes {
        // One front-end per socket: node 2's is the client above.
        [s3.clone()]
            .into_iter()
            .map(|sock| {
                let (base_done, done) = (base_done.clone(), done.clone());
                let dirty = o.dirty_mib * MIB;
                std::thread::spawn(move || {
                    let mut c = connect(&sock, 1);
                    let t = Instant::now();
                    let base =
                        write_until(&mut c, 0, dirty, 1, &|| base_done.load(Ordering::SeqCst));
                    let base_secs = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let during = write_until(&mut c, 0, dirty, 1, &|| done.load(Ordering::SeqCst));
                    (base, base_secs, during, t.elapsed().as_secs_f64())
                })
            })
            .collect()
    } else {
        Vec::new()
    };

    let t = Instant::now();
    let base = write_until(&mut c2, lo, hi, o.qd, &|| {
        t.elapsed().as_secs() >= o.seconds
    });
    let base_secs = t.elapsed().as_secs_f64();
    base_done.store(true, Ordering::SeqCst);

    let d2 = done.clone();
    let watched: Vec<PathBuf> = if o.three_nodes {
        vec![s2.clone(), s3.clone()]
    } else {
        vec![s2.clone()]
    };
    let want = o.dirty_mib * MIB;
    let watcher = std::thread::spawn(move || {
        let t = Instant::now();
        loop {
            let all: Vec<serde_json::Value> = watched.iter().map(|s| status(s)).collect();
            let copied: Vec<u64> = all
                .iter()
                .map(|s| s["resync"]["bytes_copied"].as_u64().unwrap_or(0))
                .collect();
            let idle = all
                .iter()
                .all(|s| s["resync"]["active"] == false && s["resync"]["remaining_chunks"] == 0);
            if copied.iter().sum::<u64>() >= want && idle {
                d2.store(true, Ordering::SeqCst);
                return (t.elapsed(), copied);
            }
            let s = &all[0];
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "recovery did not end: {s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    drop(c1);
    n1.kill().unwrap();
    n1.wait().unwrap();
    let t = Instant::now();
    let during = write_until(&mut c2, lo, hi, o.qd, &|| done.load(Ordering::SeqCst));
    let during_secs = t.elapsed().as_secs_f64();
    let (took, copied_by) = watcher.join().unwrap();
    let copied: u64 = copied_by.iter().sum();
    let inside: Vec<_> = inside.into_iter().map(|h| h.join().unwrap()).collect();

    println!(
        "Recovery of a killed node: {} MiB dirty in 1 MiB chunks, array {} MiB, 4 KiB random writes at QD {} outside the dirty chunks on the survivor.\n",
        o.dirty_mib, o.size_mib, o.qd
    );
    println!("| phase | writes | IOPS | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("{}", summary("before the kill", base, base_secs));
    println!("{}", summary("during recovery", during, during_secs));
    if o.three_nodes {
        let resyncing = if copied_by[0] >= copied_by[1] { 0 } else { 1 };
        println!(
            "\n4 KiB random writes at QD 1 inside node 1's dirty chunks, on node 3 ({} resynced them):\n",
            ["node 2", "node 3"][resyncing]
        );
        println!("| node, phase | writes | IOPS | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|---:|---:|");
        for (base, base_secs, during, during_secs) in inside {
            let who = if resyncing == 1 {
                "node 3 (resyncing)"
            } else {
                "node 3 (not resyncing)"
            };
            println!(
                "{}",
                summary(&format!("{who}, before the kill"), base, base_secs)
            );
            println!(
                "{}",
                summary(&format!("{who}, during recovery"), during, during_secs)
            );
        }
    }
    println!(
        "\nrecovery: {} MiB copied in {:.2} s ({:.0} MiB/s), from the kill to the end of the resync",
        copied / MIB,
        took.as_secs_f64(),
        copied as f64 / MIB as f64 / took.as_secs_f64().max(1e-9)
    );
    drop(c2);
    // SAFETY: plain kill(2) on our children.
    unsafe { libc::kill(n2.id() as i32, libc::SIGTERM) };
    let _ = n2.wait();
    if let Some(n3) = n3.as_mut() {
        // SAFETY: plain kill(2) on our children.
        unsafe { libc::kill(n3.id() as i32, libc::SIGTERM) };
        let _ = n3.wait();
    }
    let _ = lockd.kill();
    let _ = lockd.wait();
}
