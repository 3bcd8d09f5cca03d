//! Benchmark: hundreds of disks on one host, and one very large array.
//!
//! cargo bench --bench many_disks -- [--disks N] [--leg-mib M] [--dir PATH] [--idle-seconds S]
//!     [--big-tib T] [--big-dir PATH] [--heartbeat-interval D] [--no-many] [--no-big]
//!
//! Many disks: one `lockd`, `--disks` clustered arrays (two sparse legs of `--leg-mib`
//! MiB each, made with `create --assume-clean`), one `serve --lock-manager lockd:...`
//! per array, each on its own socket, all started at once. A disk serves once a
//! libblkio client connected to its socket and read 4 KiB from it; the clients stay
//! connected (an idle VM per disk). Then everything idles for `--idle-seconds`: the CPU
//! time of all `serve` processes and of `lockd` (utime + stime from /proc/PID/stat, as
//! a percentage of one core; also the live threads' run time from schedstat), their
//! context switches (wake-ups) per second by thread
//! name, RSS (VmRSS), threads and open files per process. Last, the clients disconnect
//! and every `serve` is stopped with SIGTERM; the time until all have exited.
//!
//! Big array: two sparse legs of `--big-tib` TiB (default 15) in `--big-dir` (default
//! `--dir`), `create --assume-clean` (timed), then the time from starting `serve` to
//! the first completed 4 KiB read through libblkio, once as a clustered node over
//! `lockd` and once as a plain array (`--lock-manager local`, whose start writes the
//! multi-host heartbeat and reads it back two intervals later; `--heartbeat-interval`
//! is given to that `serve`).

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;
const BS: usize = 4096;

struct Opts {
    disks: usize,
    leg_mib: u64,
    dir: PathBuf,
    idle_seconds: u64,
    big_tib: u64,
    big_dir: Option<PathBuf>,
    heartbeat: Option<String>,
    many: bool,
    big: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        disks: 200,
        leg_mib: 64,
        dir: PathBuf::from("/var/tmp"),
        idle_seconds: 10,
        big_tib: 15,
        big_dir: None,
        heartbeat: None,
        many: true,
        big: true,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--disks" => o.disks = val.parse().expect("--disks N"),
            "--leg-mib" => o.leg_mib = val.parse().expect("--leg-mib M"),
            "--dir" => o.dir = PathBuf::from(val),
            "--idle-seconds" => o.idle_seconds = val.parse().expect("--idle-seconds S"),
            "--big-tib" => o.big_tib = val.parse().expect("--big-tib T"),
            "--big-dir" => o.big_dir = Some(PathBuf::from(val)),
            "--heartbeat-interval" => o.heartbeat = Some(val),
            "--no-many" | "--no-big" => {
                if args[i] == "--no-many" {
                    o.many = false;
                } else {
                    o.big = false;
                }
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
    assert!(o.leg_mib >= 8, "--leg-mib must be at least 8");
    o
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
}

fn sparse(path: &Path, bytes: u64) -> std::io::Result<()> {
    std::fs::File::create(path)?.set_len(bytes)
}

fn create(legs: &[PathBuf], cluster: bool) -> Duration {
    let t = Instant::now();
    let mut c = bin();
    // --force: the big legs are made twice (clustered, then plain).
    c.args(["create", "--assume-clean", "--force"]);
    if cluster {
        c.args(["--cluster-name", "bench"]);
    }
    let out = c.args(legs).output().unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn wait_path(p: &Path, child: &mut Child) {
    for _ in 0..2000 {
        if p.exists() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("process exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no socket {}", p.display());
}

fn spawn_serve(sock: &Path, lock_manager: &str, legs: &[PathBuf], log: &Path) -> Child {
    spawn_serve_with(sock, lock_manager, &[], legs, log)
}

fn spawn_serve_with(
    sock: &Path,
    lock_manager: &str,
    extra: &[String],
    legs: &[PathBuf],
    log: &Path,
) -> Child {
    bin()
        .arg("serve")
        .arg("--socket")
        .arg(sock)
        .arg("--lock-manager")
        .arg(lock_manager)
        .args(extra)
        .args(legs)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

struct Client {
    _b: blkio::Blkio,
    q: blkio::Blkioq,
    base: usize,
}

/// Connects to `sock` (retrying until the socket is there) and reads 4 KiB at
/// `offset`: the disk serves.
fn connect_and_read(sock: &Path, offset: u64, child: &mut Child, log: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut b = loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "serve {} exited ({st}): {}",
                sock.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{} never served", sock.display());
        if sock.exists() {
            let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
            b.set_str("path", sock.to_str().unwrap()).unwrap();
            if b.connect().is_ok() {
                break b;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    b.set_i32("num-queues", 1).unwrap();
    let mut out = b.start().unwrap();
    let region = b.alloc_mem_region(BS).unwrap();
    b.map_mem_region(&region).unwrap();
    let mut c = Client {
        base: region.addr,
        q: out.queues.remove(0),
        _b: b,
    };
    c.q.read(offset, c.base as *mut u8, BS, 0, blkio::ReqFlags::empty());
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = vec![MaybeUninit::uninit()];
    let n = c.q.do_io(&mut comps, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first completion.
    let cp = unsafe { comps[0].as_ptr().read() };
    assert_eq!(cp.ret, 0, "read from {} failed: {}", sock.display(), cp.ret);
    c
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a process or task, in clock ticks.
fn cpu_ticks(stat_path: &Path) -> u64 {
    let s = std::fs::read_to_string(stat_path).unwrap_or_default();
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14, stime 15.
    let get = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(14) + get(15)
}

fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn count_dir(p: &str) -> u64 {
    std::fs::read_dir(p).map(|d| d.count() as u64).unwrap_or(0)
}

/// Per thread name: (CPU ns from schedstat, context switches), summed over the
/// processes' live threads.
fn by_thread(pids: &[u32]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let p = t.path();
            let comm = std::fs::read_to_string(p.join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string();
            let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
            let sw: u64 = status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            let e = m.entry(comm).or_insert((0, 0));
            e.0 += std::fs::read_to_string(p.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
            e.1 += sw;
        }
    }
    m
}

struct Idle {
    cpu_pct: f64,
    /// The same from the live threads' schedstat (ns-exact; without threads that
    /// came and went in the window).
    threads_pct: f64,
    wakeups: f64,
    threads: Vec<(String, f64, f64)>,
}

/// CPU (% of one core) and wake-ups per second of `pids` over `secs`, with the
/// thread names that cost the most.
fn idle(pids: &[u32], secs: u64) -> Idle {
    let snap = || {
        let cpu: u64 = pids
            .iter()
            .map(|p| cpu_ticks(Path::new(&format!("/proc/{p}/stat"))))
            .sum();
        (cpu, by_thread(pids))
    };
    let (c0, t0) = snap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, t1) = snap();
    let el = start.elapsed().as_secs_f64();
    let mut threads: Vec<(String, f64, f64)> = t1
        .iter()
        .map(|(name, &(c, s))| {
            let (c0, s0) = t0.get(name).copied().unwrap_or((0, 0));
            (
                name.clone(),
                c.saturating_sub(c0) as f64 / 1e9 / el * 100.0,
                s.saturating_sub(s0) as f64 / el,
            )
        })
        .collect();
    threads.sort_by(|a, b| b.2.total_cmp(&a.2));
    Idle {
        cpu_pct: c1.saturating_sub(c0) as f64 / clk_tck() / el * 100.0,
        threads_pct: threads.iter().map(|t| t.1).sum(),
        wakeups: threads.iter().map(|t| t.2).sum(),
        threads,
    }
}

fn median_max(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    (
        v.get(v.len() / 2).copied().unwrap_or(0),
        v.last().copied().unwrap_or(0),
    )
}

fn terminate(pid: u32) {
    // SAFETY: kill has no memory preconditions; pid is our child's.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
}

fn start_lockd(sock: &Path) -> Child {
    let mut lockd = bin()
        .args(["lockd", "--socket"])
        .arg(sock)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_path(sock, &mut lockd);
    lockd
}

fn many(o: &Opts) {
    let dir = tempfile::Builder::new()
        .prefix("vumd-many-")
        .tempdir_in(&o.dir)
        .unwrap();
    let d = dir.path();
    let lockd_sock = d.join("lockd.sock");
    let mut lockd = start_lockd(&lockd_sock);
    let lm = format!("lockd:{}", lockd_sock.display());
    eprintln!(
        "creating {} clustered arrays (2 sparse legs of {} MiB each) in {}",
        o.disks,
        o.leg_mib,
        d.display()
    );
    let t = Instant::now();
    let disks: Vec<(PathBuf, Vec<PathBuf>)> = (0..o.disks)
        .map(|i| {
            let dd = d.join(format!("d{i}"));
            std::fs::create_dir(&dd).unwrap();
            let legs = vec![dd.join("a.img"), dd.join("b.img")];
            for l in &legs {
                sparse(l, o.leg_mib * MIB).unwrap();
            }
            create(&legs, true);
            (dd, legs)
        })
        .collect();
    let create_secs = t.elapsed().as_secs_f64();

    eprintln!("starting {} serve processes", o.disks);
    let t0 = Instant::now();
    let mut children: Vec<Child> = disks
        .iter()
        .map(|(dd, legs)| spawn_serve(&dd.join("s.sock"), &lm, legs, &dd.join("serve.log")))
        .collect();
    let spawned = t0.elapsed().as_secs_f64();
    // The clients' sockets, memory regions and eventfds: several per disk.
    raise_nofile();
    let mut served_at = Vec::new();
    let mut clients = Vec::new();
    for ((dd, _), child) in disks.iter().zip(children.iter_mut()) {
        clients.push(connect_and_read(
            &dd.join("s.sock"),
            0,
            child,
            &dd.join("serve.log"),
        ));
        served_at.push(t0.elapsed().as_secs_f64());
    }
    let all_served = t0.elapsed().as_secs_f64();
    eprintln!(
        "all {} disks serve after {all_served:.2} s; idling {} s",
        o.disks, o.idle_seconds
    );

    // Let start-up work (first bitmap passes, joins of later nodes) settle.
    std::thread::sleep(Duration::from_secs(2));
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let lockd_pid = [lockd.id()];
    let secs = o.idle_seconds;
    let h = std::thread::spawn(move || idle(&lockd_pid, secs));
    let serves = idle(&pids, o.idle_seconds);
    let lk = h.join().unwrap();

    let rss: Vec<u64> = pids.iter().map(|&p| status_field(p, "VmRSS:")).collect();
    let thr: Vec<u64> = pids.iter().map(|&p| status_field(p, "Threads:")).collect();
    let fds: Vec<u64> = pids
        .iter()
        .map(|&p| count_dir(&format!("/proc/{p}/fd")))
        .collect();
    let lp = lockd.id();
    let (lrss, lthr, lfds) = (
        status_field(lp, "VmRSS:"),
        status_field(lp, "Threads:"),
        count_dir(&format!("/proc/{lp}/fd")),
    );
    let (rss_med, rss_max) = median_max(rss.clone());
    let (thr_med, thr_max) = median_max(thr);
    let (fds_med, fds_max) = median_max(fds);
    let rss_total: u64 = rss.iter().sum();

    drop(clients);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    for c in &children {
        terminate(c.id());
    }
    let mut failed = 0;
    for c in children.iter_mut() {
        if !c.wait().unwrap().success() {
            failed += 1;
        }
    }
    let stop_secs = t.elapsed().as_secs_f64();
    terminate(lockd.id());
    lockd.wait().unwrap();

    println!(
        "\nMany disks: {} clustered arrays over one lockd, legs 2 x {} MiB (sparse) in {}, one serve each, one libblkio client connected to each; idle {} s.\n",
        o.disks,
        o.leg_mib,
        o.dir.display(),
        o.idle_seconds
    );
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| create of {} arrays (sequential) | {create_secs:.2} s |",
        o.disks
    );
    println!("| spawn of {} serve processes | {spawned:.2} s |", o.disks);
    println!("| all serving (first 4 KiB read answered on every disk) | {all_served:.2} s |");
    println!(
        "| idle CPU, all serve processes | {:.2} % of one core ({:.3} % each) |",
        serves.cpu_pct,
        serves.cpu_pct / o.disks as f64
    );
    println!(
        "| idle CPU, all serve processes, live threads' schedstat | {:.2} % of one core |",
        serves.threads_pct
    );
    println!("| idle CPU, lockd | {:.2} % of one core |", lk.cpu_pct);
    println!(
        "| idle CPU, total | {:.2} % of one core |",
        serves.cpu_pct + lk.cpu_pct
    );
    println!(
        "| idle wake-ups (context switches), all serve processes | {:.0} /s ({:.1} /s each) |",
        serves.wakeups,
        serves.wakeups / o.disks as f64
    );
    println!("| idle wake-ups, lockd | {:.0} /s |", lk.wakeups);
    println!(
        "| serve RSS, median / max / total | {:.1} / {:.1} / {:.0} MiB |",
        rss_med as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        rss_total as f64 / 1024.0
    );
    println!("| serve threads, median / max | {thr_med} / {thr_max} |");
    println!("| serve open files, median / max | {fds_med} / {fds_max} |");
    println!(
        "| lockd RSS / threads / open files | {:.1} MiB / {lthr} / {lfds} |",
        lrss as f64 / 1024.0
    );
    println!(
        "| stop of all serve processes (SIGTERM to exit) | {stop_secs:.2} s ({failed} failed) |"
    );
    println!("\nIdle, by thread name (all serve processes):\n");
    println!("| thread | CPU % of one core (schedstat) | wake-ups /s |");
    println!("|---|---:|---:|");
    for (name, cpu, w) in serves.threads.iter().filter(|t| t.2 > 0.0 || t.1 > 0.0) {
        println!("| {name} | {cpu:.2} | {w:.1} |");
    }
    drop(dir);
}

/// Starts `serve` and returns the time to the first answered read at `offset`.
fn time_to_first_read(
    sock: &Path,
    lm: &str,
    extra: &[String],
    legs: &[PathBuf],
    offset: u64,
) -> (Duration, Child, Client) {
    let log = sock.with_extension("log");
    let t = Instant::now();
    let mut child = spawn_serve_with(sock, lm, extra, legs, &log);
    let c = connect_and_read(sock, offset, &mut child, &log);
    (t.elapsed(), child, c)
}

fn stop(mut child: Child) -> Duration {
    let t = Instant::now();
    terminate(child.id());
    let st = child.wait().unwrap();
    assert!(st.success(), "serve exited with {st}");
    t.elapsed()
}

fn big(o: &Opts) {
    let base = o.big_dir.clone().unwrap_or_else(|| o.dir.clone());
    let dir = tempfile::Builder::new()
        .prefix("vumd-big-")
        .tempdir_in(&base)
        .unwrap();
    let d = dir.path();
    let bytes = o.big_tib * TIB;
    println!(
        "\nBig array: 2 sparse legs of {} TiB in {}, create --assume-clean, then serve until the first 4 KiB read (at the start and at the end of the disk) is answered.\n",
        o.big_tib,
        base.display()
    );
    let legs = vec![d.join("a.img"), d.join("b.img")];
    for l in &legs {
        if let Err(e) = sparse(l, bytes) {
            println!(
                "the file system of {} refuses a {} TiB file ({e}): give --big-dir on xfs or tmpfs",
                base.display(),
                o.big_tib
            );
            return;
        }
    }
    let lockd_sock = d.join("lockd.sock");
    let mut lockd = start_lockd(&lockd_sock);
    println!("| array | create | serve start to first read | 2nd read (end of disk) | serve RSS | stop | bitmap |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for (name, cluster, lm) in [
        (
            "clustered, lockd",
            true,
            format!("lockd:{}", lockd_sock.display()),
        ),
        ("plain, local", false, "local".to_string()),
    ] {
        let created = create(&legs, cluster);
        let sock = d.join("big.sock");
        let extra: Vec<String> = match (&o.heartbeat, cluster) {
            (Some(h), false) => vec!["--heartbeat-interval".into(), h.clone()],
            _ => Vec::new(),
        };
        let (took, child, mut c) = time_to_first_read(&sock, &lm, &extra, &legs, 0);
        // The last 4 KiB of the array's data.
        let t = Instant::now();
        let (size, chunk, chunks) = array_bytes(&sock);
        read_at(&mut c, size - BS as u64);
        let second = t.elapsed();
        let rss = status_field(child.id(), "VmRSS:");
        drop(c);
        let stopped = stop(child);
        println!(
            "| {name}, {} TiB | {:.3} s | {:.3} s | {:.1} ms | {:.1} MiB | {:.3} s | {chunks} chunks of {} MiB |",
            o.big_tib,
            created.as_secs_f64(),
            took.as_secs_f64(),
            second.as_secs_f64() * 1000.0,
            rss as f64 / 1024.0,
            stopped.as_secs_f64(),
            chunk >> 20
        );
    }
    terminate(lockd.id());
    lockd.wait().unwrap();
}

/// The array's size in bytes and its bitmap chunks (size, count).
fn array_bytes(sock: &Path) -> (u64, u64, u64) {
    let out = bin()
        .args(["status", "--format", "json"])
        .arg(sock)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let size = v["size_sectors"]
        .as_u64()
        .map(|s| s * 512)
        .unwrap_or_else(|| panic!("no size in status: {v}"));
    (
        size,
        v["bitmap_chunk"].as_u64().unwrap_or(0),
        v["bitmap_chunks"].as_u64().unwrap_or(0),
    )
}

fn read_at(c: &mut Client, offset: u64) {
    c.q.read(offset, c.base as *mut u8, BS, 0, blkio::ReqFlags::empty());
    let mut comps: Vec<MaybeUninit<blkio::Completion>> = vec![MaybeUninit::uninit()];
    let n = c.q.do_io(&mut comps, 1, None, None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first completion.
    let cp = unsafe { comps[0].as_ptr().read() };
    assert_eq!(cp.ret, 0, "read at {offset} failed: {}", cp.ret);
}

fn main() {
    let o = opts();
    if o.many {
        many(&o);
    }
    if o.big {
        big(&o);
    }
}
