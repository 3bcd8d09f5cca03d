//! Helpers shared by the integration tests: reading mdadm's output, loop devices.
#![allow(dead_code)]

pub mod vring;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `Key : Value` lines of an `mdadm -E` / `-X` text, in order, with values
/// right-trimmed. Lines that are not of that form are dropped.
pub fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            Some((k.trim().to_string(), v.trim_end().to_string()))
        })
        .collect()
}

/// The first value of `key`.
pub fn value<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Every value of `key`, in order.
pub fn values<'a>(kv: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    kv.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Keys mdadm prints that depend on the device mdadm looked at rather than on the
/// metadata (the fixtures are 1 MiB cuts of 64 MiB legs).
const DEVICE_DEPENDENT: &[&str] = &["Unused Space"];

/// Asserts that `ours` shows every `Key : Value` line of `mdadm`, in the same order.
pub fn assert_same_lines(mdadm: &str, ours: &str, what: &str) {
    let theirs: Vec<_> = key_values(mdadm)
        .into_iter()
        .filter(|(k, _)| !DEVICE_DEPENDENT.contains(&k.as_str()))
        .collect();
    let mine = key_values(ours);
    let mut at = 0;
    for (k, v) in &theirs {
        match mine[at..].iter().position(|(mk, mv)| mk == k && mv == v) {
            Some(p) => at += p + 1,
            None => panic!(
                "{what}: mdadm shows `{k} : {v}` but ours (from line {at}) does not:\n--- mdadm\n{mdadm}\n--- ours\n{ours}"
            ),
        }
    }
}

/// Makes a clean array (`create --assume-clean`, 1 MiB bitmap chunks) of `size`
/// on new image files `names` in `dir`; clustered when `cluster` names a cluster.
pub fn create_array(dir: &Path, names: &[&str], size: &str, cluster: Option<&str>) -> Vec<PathBuf> {
    let legs: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let mut cmd = bin();
    cmd.args([
        "create",
        "--assume-clean",
        "--size",
        size,
        "--bitmap-chunk",
        "1M",
    ]);
    if let Some(c) = cluster {
        cmd.args(["--cluster-name", c]);
    }
    let out = cmd.args(&legs).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    legs
}

/// Runs `cmd`, which must exit non-zero within `limit` (a command that keeps
/// running, e.g. a second `serve` that started, is killed and fails the test).
/// Returns its stderr.
pub fn refused(mut cmd: Command, limit: std::time::Duration, what: &str) -> String {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(!st.success(), "{what} succeeded: {err}");
            return err;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} was not refused within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The line a refused command prints beside its log: exactly one `vhost-user-md:` line.
pub fn one_error_line(err: &str) -> &str {
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vhost-user-md:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0]
}

/// A loop device over an image file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    /// Read-only.
    pub fn attach(file: &Path) -> Loop {
        Loop::attach_with(file, &["-r"])
    }

    /// Read-write with direct I/O: another path to the same data, as another host
    /// has to a shared LUN (no lock of one path reaches the other).
    pub fn attach_rw(file: &Path) -> Loop {
        Loop::attach_with(file, &["--direct-io=on"])
    }

    /// Read-write with direct I/O and 4 KiB logical blocks (a "4Kn" disk).
    pub fn attach_4k(file: &Path) -> Loop {
        Loop::attach_with(file, &["--direct-io=on", "--sector-size", "4096"])
    }

    fn attach_with(file: &Path, opts: &[&str]) -> Loop {
        let out = Command::new("losetup")
            .args(opts)
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "losetup -r -f --show {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Runs mdadm with `args`; panics with a clear message when mdadm is missing.
pub fn mdadm(args: &[&str], dev: &Path) -> String {
    let out = Command::new("mdadm")
        .args(args)
        .arg(dev)
        .output()
        .expect("mdadm must be installed (apt-get install mdadm); .ci/run installs it");
    assert!(
        out.status.success(),
        "mdadm {args:?} {} failed: {}{}",
        dev.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The project's binary.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-md"))
}

/// A running `vhost-user-md serve`, stopped with SIGTERM on drop.
pub struct Serve {
    pub child: Option<std::process::Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Serve {
    /// Starts `serve` with `args` (legs included) on `socket`, waits until it serves
    /// (its sockets appear before the array is assembled: wait for the announcement).
    pub fn start(socket: &Path, args: &[&str]) -> Serve {
        let log = socket.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        // A short heartbeat (arrays served alone) keeps starts quick: a start
        // checks its own heartbeat after two intervals.
        let child = bin()
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(["--heartbeat-interval", "100ms"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut s = Serve {
            child: Some(child),
            socket: socket.to_path_buf(),
            log,
        };
        for _ in 0..200 {
            if s.log_text().contains("vhost-user-md: serving array") {
                return s;
            }
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("serve exited with {st}: {}", s.log_text());
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("serve did not start: {}", s.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// SIGKILL and wait.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// Runs `vhost-user-md status --format json`.
    pub fn status(&self) -> serde_json::Value {
        let out = bin()
            .args(["status", "--format", "json"])
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Polls `status` until `cond` holds (60 s at most); returns that status.
    pub fn wait_for(
        &self,
        what: &str,
        cond: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = std::time::Instant::now();
        loop {
            let s = self.status();
            if cond(&s) {
                return s;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "timed out waiting for {what}: {s}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Runs `vhost-user-md manage SOCKET op leg`; returns (ok, output).
    pub fn manage(&self, op: &str, leg: &Path) -> (bool, String) {
        let out = bin()
            .arg("manage")
            .arg(&self.socket)
            .arg(op)
            .arg(leg)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A libblkio virtio-blk-vhost-user client with one shared buffer region.
pub struct Client {
    pub blkio: blkio::Blkio,
    pub queues: Vec<blkio::Blkioq>,
    pub capacity: u64,
    region: blkio::MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, queues: i32, buf_len: usize) -> Client {
        Client::connect_with(socket, queues, buf_len, false)
    }

    /// As `connect`; `read_only` for a device that offers VIRTIO_BLK_F_RO.
    pub fn connect_with(socket: &Path, queues: i32, buf_len: usize, read_only: bool) -> Client {
        let mut b = blkio::Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        if read_only {
            b.set_bool("read-only", true).unwrap();
        }
        b.connect().unwrap();
        b.set_i32("num-queues", queues).unwrap();
        let capacity = b.get_u64("capacity").unwrap();
        let out = b.start().unwrap();
        let region = b.alloc_mem_region(buf_len).unwrap();
        b.map_mem_region(&region).unwrap();
        Client {
            blkio: b,
            queues: out.queues,
            capacity,
            region,
        }
    }

    /// The shared buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        (self.region.addr + off) as *mut u8
    }

    /// Waits for `n` completions on queue `q`; returns their (user_data, ret).
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<(usize, i32)> {
        let mut got = Vec::new();
        let mut comps: Vec<std::mem::MaybeUninit<blkio::Completion>> = (0..n.max(1))
            .map(|_| std::mem::MaybeUninit::uninit())
            .collect();
        while got.len() < n {
            let want = n - got.len();
            let k = self.queues[q]
                .do_io(&mut comps[..want], want, None, None)
                .unwrap();
            for c in &comps[..k] {
                // SAFETY: do_io initialised the first k completions.
                let c = unsafe { c.as_ptr().read() };
                got.push((c.user_data, c.ret));
            }
        }
        got
    }

    /// Writes `len` bytes of the buffer at `buf_off` to disk offset `off`; returns ret.
    pub fn write(&mut self, q: usize, off: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].write(off, p, len, 0, blkio::ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn read(&mut self, q: usize, off: u64, buf_off: usize, len: usize) -> i32 {
        let p = self.ptr(buf_off);
        self.queues[q].read(off, p, len, 0, blkio::ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, blkio::ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn discard(&mut self, q: usize, off: u64, len: u64) -> i32 {
        self.queues[q].discard(off, len, 0, blkio::ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    pub fn write_zeroes(&mut self, q: usize, off: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(off, len, 0, blkio::ReqFlags::empty());
        self.wait(q, 1)[0].1
    }

    /// Submits many requests at once on queue `q`: (write?, disk off, buf off, len).
    pub fn batch(&mut self, q: usize, reqs: &[(bool, u64, usize, usize)]) -> Vec<(usize, i32)> {
        for (i, &(w, off, boff, len)) in reqs.iter().enumerate() {
            let p = self.ptr(boff);
            if w {
                self.queues[q].write(off, p, len, i, blkio::ReqFlags::empty());
            } else {
                self.queues[q].read(off, p, len, i, blkio::ReqFlags::empty());
            }
        }
        self.wait(q, reqs.len())
    }
}

/// Deterministic test data for disk offset `off` (same bytes every time).
pub fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = ((off + i) / 8) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8 ^ ((off + i) as u8)
        })
        .collect()
}

/// The data area of a leg image (after its data offset), for comparing legs.
pub fn data_area(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let sb = vhost_user_md::md::Superblock::decode(&bytes[4096..8192]).unwrap();
    let start = (sb.data_offset * 512) as usize;
    let end = start + (sb.size * 512) as usize;
    bytes[start..end].to_vec()
}

/// A `vhost-user-md lockd` process; members connect over its socket.
pub struct Lockd {
    child: std::process::Child,
    pub socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Lockd {
    pub fn start() -> Lockd {
        Lockd::start_with(|_| {})
    }

    /// Starts it with its command changed by `configure` first.
    pub fn start_with(configure: impl FnOnce(&mut Command)) -> Lockd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("lockd.sock");
        let mut cmd = bin();
        cmd.arg("lockd")
            .arg("--socket")
            .arg(&socket)
            .stderr(std::process::Stdio::null());
        configure(&mut cmd);
        let child = cmd.spawn().unwrap();
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Lockd {
            child,
            socket,
            _dir: dir,
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Kills the daemon (SIGKILL) and starts another on the same socket.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = bin()
            .arg("lockd")
            .arg("--socket")
            .arg(&self.socket)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("lockd did not start again");
    }
}

impl Drop for Lockd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A leg's state in a `status` answer ("" when the leg is not listed).
pub fn leg_state(s: &serde_json::Value, leg: &Path) -> String {
    s["legs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == leg.to_str().unwrap())
        .map(|l| l["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}
