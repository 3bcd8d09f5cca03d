//! Benchmark: vhost-user-md against qemu-storage-daemon (one file, and a quorum of
//! two files), driven by libblkio's virtio-blk-vhost-user client on the same machine
//! in the same run.
//!
//! cargo bench --bench vs_qsd -- [--seconds N] [--size-mib N] [--dir PATH]
//!     [--devices files|loop --dev-iops N --dev-mbps N] [--bitmap-chunk BYTES]
//!     [--workloads 4k-randwrite,...] [--no-qsd] [--also LABEL=PATH] [--fio]
//!
//! `--devices files` (default) puts every image in `--dir` as a plain file, so every
//! backend shares that directory's disk. `--devices loop` (root, cgroup v1 `blkio`)
//! models separate devices such as SAN LUNs: each image (put them in RAM with
//! `--dir /dev/shm`) is attached as its own loop device with direct I/O, and each
//! backend runs in a cgroup that limits every one of those devices to `--dev-iops`
//! reads and writes per second and `--dev-mbps` MiB/s each way. A mirror's legs then
//! have a device each, as the single-file peer has one.
//!
//! Workloads: 4 KiB random read / write at queue depth 32 per queue, 128 KiB
//! sequential read / write at queue depth 32 per queue, with 1 and 2 queues (one
//! client thread per queue). Images are prefilled with written zeroes. Prints a
//! Markdown table: IOPS, MiB/s, p50/p99 latency, backend CPU%, p99.9 latency (last, so
//! that scripts reading the earlier columns by position keep working).
//!
//! `--fio` measures the device's limit for the read workloads in the same run: `fio`
//! (io_uring, O_DIRECT, the same block size, queue depth and one job per queue) reads
//! the mirror's first leg file before every backend and after the last one, and each
//! backend's row gets a last column, its IOPS over the mean of the fio runs just
//! before and just after it. The disk's pace drifts within seconds (a burst allowance
//! spent and refilled), so a backend is compared with its neighbours in time.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const QD: usize = 32;

struct Opts {
    seconds: u64,
    size_mib: u64,
    dir: PathBuf,
    /// Per-device limits (IOPS, MiB/s) when every image is its own loop device.
    loop_devices: Option<(u64, u64)>,
    /// Only these workloads (names with `-` for spaces, e.g. `4k-randwrite`).
    workloads: Option<Vec<String>>,
    /// Leave out qemu-storage-daemon.
    no_qsd: bool,
    /// Other vhost-user-md binaries to measure beside this build (A/B runs):
    /// (label, path).
    other_bins: Vec<(String, PathBuf)>,
    /// The mirror's bitmap chunk (`create --bitmap-chunk`), when not mdadm's default.
    bitmap_chunk: Option<String>,
    /// Interleave fio runs on a leg file (the device's limit) for read workloads.
    fio: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        seconds: 5,
        size_mib: 1024,
        dir: PathBuf::from("/var/tmp"),
        loop_devices: None,
        workloads: None,
        no_qsd: false,
        other_bins: Vec::new(),
        bitmap_chunk: None,
        fio: false,
    };
    let mut devices = String::from("files");
    let (mut iops, mut mbps) = (25_000u64, 500u64);
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seconds" => o.seconds = val.parse().expect("--seconds N"),
            "--size-mib" => o.size_mib = val.parse().expect("--size-mib N"),
            "--dir" => o.dir = PathBuf::from(val),
            "--devices" => devices = val,
            "--dev-iops" => iops = val.parse().expect("--dev-iops N"),
            "--dev-mbps" => mbps = val.parse().expect("--dev-mbps N"),
            "--bitmap-chunk" => o.bitmap_chunk = Some(val),
            "--workloads" => o.workloads = Some(val.split(',').map(str::to_string).collect()),
            "--no-qsd" => {
                o.no_qsd = true;
                i += 1;
                continue;
            }
            "--fio" => {
                o.fio = true;
                i += 1;
                continue;
            }
            "--also" => {
                let (label, path) = val.split_once('=').expect("--also LABEL=PATH");
                o.other_bins.push((label.to_string(), PathBuf::from(path)));
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    match devices.as_str() {
        "files" => {}
        "loop" => o.loop_devices = Some((iops, mbps)),
        other => panic!("--devices files|loop, not {other}"),
    }
    o
}

/// Loop devices attached for the run, detached when dropped.
struct Loops(Vec<PathBuf>);

impl Loops {
    fn attach(&mut self, image: &Path) -> PathBuf {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        self.0.push(dev.clone());
        dev
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("losetup").arg("-d").arg(d).status();
        }
    }
}

/// A cgroup v1 `blkio` group whose members get per-device throttle limits; removed
/// when dropped.
struct Throttle {
    dir: PathBuf,
    procs: std::ffi::CString,
}

impl Throttle {
    fn new(devices: &[PathBuf], iops: u64, mbps: u64) -> Throttle {
        use std::os::unix::fs::MetadataExt;
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/blkio/vumd-bench-{}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("cgroup v1 blkio (run as root)");
        for d in devices {
            let rdev = std::fs::metadata(d).unwrap().rdev();
            let (maj, min) = (libc::major(rdev), libc::minor(rdev));
            for (file, v) in [
                ("read_iops_device", iops),
                ("write_iops_device", iops),
                ("read_bps_device", mbps << 20),
                ("write_bps_device", mbps << 20),
            ] {
                std::fs::write(
                    dir.join(format!("blkio.throttle.{file}")),
                    format!("{maj}:{min} {v}"),
                )
                .unwrap();
            }
        }
        let procs = std::ffi::CString::new(
            dir.join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        Throttle { dir, procs }
    }

    /// Makes `cmd`'s process join the group before it runs.
    fn apply(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let procs = self.procs.clone();
        // SAFETY: the closure runs between fork and exec and only calls open(2),
        // write(2) and close(2) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if n != 2 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn prefill(path: &Path, bytes: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let buf = vec![0u8; 1 << 20];
    for _ in 0..bytes >> 20 {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

fn wait_socket(p: &Path, child: &mut Child) {
    for _ in 0..400 {
        if p.exists() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("backend exited: {st}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no socket {}", p.display());
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall -> [11], stime [12].
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    bs: usize,
}

struct Result {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu_pct: f64,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn run_queue(
    mut q: blkio::Blkioq,
    base: usize,
    cap: u64,
    w: Workload,
    secs: u64,
    qi: usize,
) -> (u64, Vec<u32>) {
    let blocks = cap / w.bs as u64;
    let mut rng = 0x1234_5678_9abc_def0u64 ^ ((qi as u64 + 1) * 0x9e37_79b9);
    let mut seq = (blocks / 2) * qi as u64;
    let mut start = [Instant::now(); QD];
    let mut lat = Vec::with_capacity(1 << 20);
    let mut done = 0u64;
    let submit = |q: &mut blkio::Blkioq, slot: usize, rng: &mut u64, seq: &mut u64| {
        let blk = if w.random {
            xorshift(rng) % blocks
        } else {
            *seq = (*seq + 1) % blocks;
            *seq
        };
        let ptr = (base + slot * w.bs) as *mut u8;
        if w.write {
            q.write(blk * w.bs as u64, ptr, w.bs, slot, blkio::ReqFlags::empty());
        } else {
            q.read(blk * w.bs as u64, ptr, w.bs, slot, blkio::ReqFlags::empty());
        }
    };
    for (slot, s) in start.iter_mut().enumerate() {
        *s = Instant::now();
        submit(&mut q, slot, &mut rng, &mut seq);
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut comps: Vec<MaybeUninit<blkio::Completion>> =
        (0..QD).map(|_| MaybeUninit::uninit()).collect();
    let mut inflight = QD;
    while inflight > 0 {
        let n = q.do_io(&mut comps, 1, None, None).expect("do_io");
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.as_ptr().read() };
            assert_eq!(c.ret, 0, "request failed: {}", c.ret);
            let slot = c.user_data;
            lat.push((now - start[slot]).as_micros() as u32);
            done += 1;
            if now < end {
                start[slot] = Instant::now();
                submit(&mut q, slot, &mut rng, &mut seq);
            } else {
                inflight -= 1;
            }
        }
    }
    (done, lat)
}

fn measure(sock: &Path, pid: u32, queues: usize, w: Workload, secs: u64) -> Result {
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", sock.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    b.set_i32("num-queues", queues as i32).unwrap();
    let cap = b.get_u64("capacity").unwrap();
    let out = b.start().unwrap();
    let region = b.alloc_mem_region(queues * QD * w.bs).unwrap();
    b.map_mem_region(&region).unwrap();
    let t0 = cpu_ticks(pid);
    let wall = Instant::now();
    let results: Vec<(u64, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = out
            .queues
            .into_iter()
            .enumerate()
            .map(|(qi, q)| {
                let base = region.addr + qi * QD * w.bs;
                s.spawn(move || run_queue(q, base, cap, w, secs, qi))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = wall.elapsed().as_secs_f64();
    let ticks = cpu_ticks(pid) - t0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let total: u64 = results.iter().map(|r| r.0).sum();
    let mut lat: Vec<u32> = results.into_iter().flat_map(|r| r.1).collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    Result {
        iops: total as f64 / elapsed,
        mib_s: total as f64 * w.bs as f64 / elapsed / (1 << 20) as f64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        cpu_pct: ticks as f64 / hz / elapsed * 100.0,
    }
}

fn qsd(sock: &Path, blockdevs: &[String], node: &str, throttle: Option<&Throttle>) -> Child {
    let mut cmd = Command::new("qemu-storage-daemon");
    if let Some(t) = throttle {
        t.apply(&mut cmd);
    }
    for b in blockdevs {
        cmd.arg("--blockdev").arg(b);
    }
    cmd.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on,num-queues=2",
        sock.display()
    ));
    cmd.stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-storage-daemon")
}

fn main() {
    let o = opts();
    let dir = tempfile::tempdir_in(&o.dir).unwrap();
    let d = dir.path();
    let bytes = o.size_mib << 20;
    eprintln!(
        "prefilling images ({} MiB each) in {}",
        o.size_mib,
        d.display()
    );
    // Ours: two legs of data + 2 MiB of metadata (data offset of small legs).
    let (la, lb) = (d.join("leg-a.img"), d.join("leg-b.img"));
    let meta = 8 << 20;
    prefill(&la, bytes + meta);
    prefill(&lb, bytes + meta);
    let single = d.join("single.img");
    prefill(&single, bytes);
    let (qa, qb) = (d.join("quorum-a.img"), d.join("quorum-b.img"));
    prefill(&qa, bytes);
    prefill(&qb, bytes);
    let mut loops = Loops(Vec::new());
    let mut throttle = None;
    let (la, lb, single, qa, qb) = match o.loop_devices {
        None => (la, lb, single, qa, qb),
        Some((iops, mbps)) => {
            let devs = [&la, &lb, &single, &qa, &qb].map(|p| loops.attach(p));
            throttle = Some(std::sync::Arc::new(Throttle::new(&devs, iops, mbps)));
            eprintln!("devices: {devs:?}, each limited to {iops} IOPS and {mbps} MiB/s each way");
            let [la, lb, single, qa, qb] = devs;
            (la, lb, single, qa, qb)
        }
    };
    let driver = if o.loop_devices.is_some() {
        "host_device"
    } else {
        "file"
    };
    let out = Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
        .args(["create", "--assume-clean"])
        .args(
            o.bitmap_chunk
                .iter()
                .flat_map(|c| ["--bitmap-chunk", c.as_str()]),
        )
        .arg(&la)
        .arg(&lb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = |n: &str, p: &Path| {
        format!(
            "driver={driver},node-name={n},filename={},cache.direct=on,aio=io_uring",
            p.display()
        )
    };
    let quorum = r#"{"driver":"quorum","node-name":"qq","children":["q0","q1"],"vote-threshold":1,"read-pattern":"fifo"}"#;

    let workloads = [
        Workload {
            name: "4k randread",
            write: false,
            random: true,
            bs: 4096,
        },
        Workload {
            name: "4k randwrite",
            write: true,
            random: true,
            bs: 4096,
        },
        Workload {
            name: "128k seqread",
            write: false,
            random: false,
            bs: 128 << 10,
        },
        Workload {
            name: "128k seqwrite",
            write: true,
            random: false,
            bs: 128 << 10,
        },
    ];
    type Start = Box<dyn Fn(&Path) -> Child>;
    let ours = |bin: PathBuf| -> Start {
        Box::new({
            let (la, lb) = (la.clone(), lb.clone());
            let throttle = throttle.clone();
            move |s: &Path| {
                let mut cmd = Command::new(&bin);
                if let Some(t) = &throttle {
                    t.apply(&mut cmd);
                }
                cmd.args(["serve", "--queues", "2", "--socket"])
                    .arg(s)
                    .arg(&la)
                    .arg(&lb)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            }
        })
    };
    let mut backends: Vec<(String, Start)> = vec![(
        "vhost-user-md (2 legs)".to_string(),
        ours(PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-md"))),
    )];
    for (label, bin) in &o.other_bins {
        backends.push((format!("vhost-user-md {label}"), ours(bin.clone())));
    }
    let peers: Vec<(&str, Start)> = vec![
        (
            "qsd file",
            Box::new({
                let b = vec![file("f0", &single)];
                let throttle = throttle.clone();
                move |s: &Path| qsd(s, &b, "f0", throttle.as_deref())
            }),
        ),
        (
            "qsd quorum (2 files)",
            Box::new({
                let b = vec![file("q0", &qa), file("q1", &qb), quorum.to_string()];
                let throttle = throttle.clone();
                move |s: &Path| qsd(s, &b, "qq", throttle.as_deref())
            }),
        ),
    ];
    if !o.no_qsd {
        backends.extend(peers.into_iter().map(|(n, f)| (n.to_string(), f)));
    }
    let wanted = |w: &Workload| {
        o.workloads
            .as_ref()
            .is_none_or(|ws| ws.iter().any(|x| *x == w.name.replace(' ', "-")))
    };
    if o.fio {
        println!(
            "| workload | queues | backend | IOPS | MiB/s | p50 µs | p99 µs | backend CPU% | p99.9 µs | of fio |"
        );
        println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        println!(
            "| workload | queues | backend | IOPS | MiB/s | p50 µs | p99 µs | backend CPU% | p99.9 µs |"
        );
        println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");
    }
    let leg_bytes = bytes + meta;
    for w in workloads.into_iter().filter(wanted) {
        let with_fio = o.fio && !w.write;
        for queues in [1, 2] {
            // The limit measured now: its IOPS and its row.
            let limit = || {
                let iops = fio_limit(&la, leg_bytes, queues, w, o.seconds);
                let row = format!(
                    "| {} | {queues} | fio on leg file (limit) | {iops:.0} | {:.1} | | | | | |",
                    w.name,
                    iops * w.bs as f64 / (1 << 20) as f64
                );
                (iops, row)
            };
            let mut before = 0.0;
            if with_fio {
                let (iops, row) = limit();
                println!("{row}");
                before = iops;
            }
            for (name, start) in &backends {
                let sock = d.join("bench.sock");
                let _ = std::fs::remove_file(&sock);
                let mut child = start(&sock);
                wait_socket(&sock, &mut child);
                std::thread::sleep(Duration::from_millis(200));
                let r = measure(&sock, child.id(), queues, w, o.seconds);
                // SAFETY: plain kill(2) on our child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
                let row = format!(
                    "| {} | {queues} | {name} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} |",
                    w.name, r.iops, r.mib_s, r.p50_us, r.p99_us, r.cpu_pct, r.p999_us
                );
                if with_fio {
                    let (after, limit_row) = limit();
                    println!("{row} {:.2} |", r.iops / ((before + after) / 2.0));
                    println!("{limit_row}");
                    before = after;
                } else if o.fio {
                    println!("{row} |");
                } else {
                    println!("{row}");
                }
            }
        }
    }
}

/// The device's limit for a read workload: fio on the leg file `path` with the
/// client's block size, queue depth and one job per queue. Returns IOPS.
fn fio_limit(path: &Path, size: u64, queues: usize, w: Workload, secs: u64) -> f64 {
    let pattern = if w.random { "randread" } else { "read" };
    let part = size / queues as u64 / w.bs as u64 * w.bs as u64;
    let out = Command::new("fio")
        .args([
            "--name=limit",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--group_reporting",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--rw={pattern}"))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={QD}"))
        .arg(format!("--numjobs={queues}"))
        // Each job reads its own part of the leg (fio's size is per job; a job
        // reaching past the file's end would make fio lay the file out anew,
        // over the superblock). `--readonly` refuses any write at all.
        .arg(format!("--size={part}"))
        .arg(format!("--offset_increment={part}"))
        .arg("--readonly")
        .arg(format!("--runtime={secs}"))
        .stderr(Stdio::inherit())
        .output()
        .expect("--fio needs fio installed (apt-get install fio)");
    assert!(out.status.success(), "fio failed");
    let text = String::from_utf8_lossy(&out.stdout);
    // The one number wanted from fio's JSON: jobs[0].read.iops (group reporting).
    let at = text
        .find("\"read\"")
        .expect("fio's JSON has a read section");
    let rest = &text[at..];
    let k = rest.find("\"iops\"").expect("fio's JSON has read IOPS");
    let num: String = rest[k + 6..]
        .chars()
        .skip_while(|c| *c == ' ' || *c == ':')
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().expect("fio's read IOPS is a number")
}
