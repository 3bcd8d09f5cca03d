//! Leg failures and crashes: the guest sees no error, survivors record the failed
//! leg, acknowledged writes survive `kill -9`, and resync/re-add copy only the chunks
//! dirty in the bitmap.

mod common;

use common::{bin, data_area, leg_state, pattern, Client, Serve};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 64 * 1024;

/// Creates a mirror on `a` and `b` with `create --assume-clean` and `args`.
fn create_legs(a: &Path, b: &Path, args: &[&str]) {
    let out = bin()
        .args(["create", "--assume-clean"])
        .args(args)
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two 64 MiB legs with 1 MiB bitmap chunks (63 chunks), known identical.
fn make_array(dir: &Path) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    create_legs(&a, &b, &["--size", "64M", "--bitmap-chunk", "1M"]);
    (a, b)
}

fn examine(legs: &[&Path]) -> serde_json::Value {
    let out = bin()
        .args(["examine", "--json"])
        .args(legs)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Writes block `i` of a region with seed `seed`; panics on a guest-visible error.
fn write_block(c: &mut Client, region: u64, i: u64, seed: u64) {
    let off = region + i * BLOCK as u64;
    let data = pattern(seed, off, BLOCK);
    c.buf()[..BLOCK].copy_from_slice(&data);
    assert_eq!(c.write(0, off, 0, BLOCK), 0, "write at {off} failed");
}

fn verify_block(c: &mut Client, off: u64, seeds: &[u64]) {
    assert_eq!(c.read(0, off, 0, BLOCK), 0);
    let got = c.buf()[..BLOCK].to_vec();
    assert!(
        seeds.iter().any(|&s| got == pattern(s, off, BLOCK)),
        "block at {off} holds none of seeds {seeds:?}"
    );
}

#[test]
fn kill_9_mid_writes_resyncs_only_dirty_chunks_and_keeps_acknowledged_writes() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path());
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    // Writer thread: 64 KiB writes over MiB 8..16 (chunks 8-15), one at a time; the
    // write in flight and every acknowledged write are recorded under one lock.
    type Log = (Vec<(u64, u64)>, Option<(u64, u64)>);
    let log = std::sync::Arc::new(std::sync::Mutex::new(Log::default()));
    let (log2, sock2) = (log.clone(), sock.clone());
    // The thread is not joined: after the kill its last request never completes.
    std::thread::spawn(move || {
        let mut c = Client::connect(&sock2, 1, BLOCK);
        let blocks = 8 * MIB / BLOCK as u64;
        for seed in 1u64.. {
            let i = (seed * 37) % blocks;
            let off = 8 * MIB + i * BLOCK as u64;
            log2.lock().unwrap().1 = Some((off, seed));
            let data = pattern(seed, off, BLOCK);
            c.buf()[..BLOCK].copy_from_slice(&data);
            let p = c.buf().as_mut_ptr();
            c.queues[0].write(off, p, BLOCK, 0, blkio::ReqFlags::empty());
            let mut comps = [std::mem::MaybeUninit::<blkio::Completion>::uninit()];
            match c.queues[0].do_io(&mut comps, 1, None, None) {
                // SAFETY: do_io returned one initialised completion.
                Ok(1) if unsafe { comps[0].as_ptr().read() }.ret == 0 => {
                    log2.lock().unwrap().0.push((off, seed));
                }
                _ => return,
            }
        }
    });
    while log.lock().unwrap().0.len() < 300 {
        std::thread::sleep(Duration::from_millis(5));
    }
    serve.kill9();
    let (acked, inflight) = log.lock().unwrap().clone();
    // The bitmap on disk still marks the chunks that were being written.
    let ex = examine(&[&a]);
    let dirty = ex["legs"][0]["bitmap"]["slots"][0]["dirty"]
        .as_u64()
        .unwrap();
    assert!(
        (1..=8).contains(&dirty),
        "dirty chunks after the crash: {dirty}"
    );
    assert_eq!(ex["legs"][0]["superblock"]["state"], "active");

    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let s = serve.wait_for("resync", |s| {
        s["resync"]["remaining_chunks"] == 0 && !s["resync"]["active"].as_bool().unwrap()
    });
    assert_eq!(
        s["resync"]["bytes_copied"].as_u64().unwrap(),
        dirty * MIB,
        "resync must copy exactly the dirty chunks"
    );
    let mut c = Client::connect(&sock, 1, BLOCK);
    let mut last = std::collections::HashMap::new();
    for &(off, seed) in &acked {
        last.insert(off, seed);
    }
    for (&off, &seed) in &last {
        let mut ok = vec![seed];
        if let Some((ioff, iseed)) = inflight {
            if ioff == off {
                ok.push(iseed);
            }
        }
        verify_block(&mut c, off, &ok);
    }
    drop(c);
    assert!(serve.stop().success());
    assert!(data_area(&a) == data_area(&b), "legs differ after resync");
    assert!(last.len() > 50, "the test wrote too little: {}", last.len());
}

#[test]
fn injected_write_errors_degrade_without_guest_errors_and_re_add_copies_dirty_chunks() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path());
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &[
            "--inject-fault",
            "1:writes-after=100",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect(&sock, 1, BLOCK);
    // 16 MiB in 64 KiB writes: leg b fails after 100 writes, the guest sees nothing.
    let region = 0;
    for i in 0..256 {
        write_block(&mut c, region, i, 7);
    }
    let s = serve.status();
    assert_eq!(s["degraded"], true);
    assert_eq!(leg_state(&s, &b), "faulty");
    assert_eq!(leg_state(&s, &a), "in-sync");
    for i in 0..256 {
        verify_block(&mut c, region + i * BLOCK as u64, &[7]);
    }
    drop(c);
    assert!(serve.stop().success());
    // The survivor's superblock records b as faulty, with newer events.
    let ex = examine(&[&a, &b]);
    assert_eq!(ex["legs"][0]["superblock"]["array_state"], "A.");
    assert!(
        ex["legs"][0]["superblock"]["events"].as_u64()
            > ex["legs"][1]["superblock"]["events"].as_u64()
    );
    assert!(serve.log_text().contains("marking it faulty"));

    // Restart without the fault: b is left out until re-added.
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let s = serve.status();
    assert_eq!(s["degraded"], true);
    assert_eq!(leg_state(&s, &b), "removed");
    let dirty = s["bitmap_dirty"].as_u64().unwrap();
    assert!((1..63).contains(&dirty), "dirty chunks: {dirty}");
    let (ok, out) = serve.manage("re-add", &b);
    assert!(ok, "{out}");
    assert!(out.contains("dirty in the bitmap"), "{out}");
    let s = serve.wait_for("recovery", |s| s["degraded"] == false);
    assert_eq!(
        s["resync"]["bytes_copied"].as_u64().unwrap(),
        dirty * MIB,
        "only dirty chunks are copied"
    );
    assert!(serve.stop().success());
    assert!(data_area(&a) == data_area(&b), "legs differ after re-add");
    assert_eq!(examine(&[&a, &b])["array"]["consistent"], true);
}

#[test]
fn operator_fail_then_re_add_copies_only_chunks_written_meanwhile() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path());
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &["--queues", "2", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    let mut c = Client::connect(&sock, 2, BLOCK);
    for i in 0..64 {
        write_block(&mut c, 0, i, 1);
    }
    // Let the bitmap daemon clear the bits (two idle passes of 5 s).
    serve.wait_for("bits cleared", |s| s["bitmap_dirty"] == 0);
    let (ok, out) = serve.manage("fail", &b);
    assert!(ok, "{out}");
    let (ok, out) = serve.manage("fail", &a);
    assert!(!ok && out.contains("last in-sync leg"), "{out}");
    // Writes while degraded touch exactly chunks 20, 21 and 40.
    write_block(&mut c, 20 * MIB, 0, 2);
    write_block(&mut c, 21 * MIB, 3, 2);
    write_block(&mut c, 40 * MIB, 15, 2);
    let (ok, out) = serve.manage("re-add", &b);
    assert!(ok, "{out}");
    let s = serve.wait_for("recovery", |s| s["degraded"] == false);
    assert_eq!(s["resync"]["bytes_copied"].as_u64().unwrap(), 3 * MIB);
    drop(c);
    assert!(serve.stop().success());
    assert!(data_area(&a) == data_area(&b));
}

#[test]
fn remove_and_add_a_blank_leg_rebuilds_it_completely() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path());
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1, BLOCK);
    for i in 0..32 {
        write_block(&mut c, 3 * MIB, i, 9);
    }
    let (ok, out) = serve.manage("remove", &b);
    assert!(!ok && out.contains("not faulty"), "{out}");
    assert!(serve.manage("fail", &b).0);
    let (ok, out) = serve.manage("remove", &b);
    assert!(ok, "{out}");
    let fresh = d.path().join("c.img");
    std::fs::File::create(&fresh)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let (ok, out) = serve.manage("add", &fresh);
    assert!(ok, "{out}");
    let s = serve.wait_for("rebuild", |s| s["degraded"] == false);
    assert_eq!(s["resync"]["bytes_copied"].as_u64().unwrap(), 129_024 * 512);
    for i in 0..32 {
        verify_block(&mut c, 3 * MIB + i * BLOCK as u64, &[9]);
    }
    drop(c);
    assert!(serve.stop().success());
    assert!(data_area(&a) == data_area(&fresh));
    let ex = examine(&[&a, &fresh]);
    assert_eq!(ex["array"]["consistent"], true, "{ex}");
}

#[test]
fn a_rebuild_interrupted_by_a_crash_starts_again_after_restart() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = make_array(d.path());
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &[
            "--resync-max-rate",
            "8M",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    let mut c = Client::connect(&sock, 1, BLOCK);
    for i in 0..32 {
        write_block(&mut c, 40 * MIB, i, 5);
    }
    assert!(serve.manage("fail", &b).0);
    assert!(serve.manage("remove", &b).0);
    let fresh = d.path().join("c.img");
    std::fs::File::create(&fresh)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let (ok, out) = serve.manage("add", &fresh);
    assert!(ok, "{out}");
    serve.wait_for("part of the rebuild", |s| {
        s["resync"]["bytes_copied"].as_u64().unwrap() >= 4 * MIB
    });
    drop(c);
    serve.kill9();
    // The new leg is only partly written: after the restart its rebuild starts
    // again from the beginning instead of trusting it.
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), fresh.to_str().unwrap()]);
    let s = serve.status();
    assert_eq!(leg_state(&s, &fresh), "recovering", "{s}");
    let s = serve.wait_for("rebuild", |s| s["degraded"] == false);
    assert_eq!(s["resync"]["bytes_copied"].as_u64().unwrap(), 129_024 * 512);
    let mut c = Client::connect(&sock, 1, BLOCK);
    for i in 0..32 {
        verify_block(&mut c, 40 * MIB + i * BLOCK as u64, &[5]);
    }
    drop(c);
    assert!(serve.stop().success());
    assert!(data_area(&a) == data_area(&fresh));
}

#[test]
fn a_real_leg_running_out_of_space_is_failed_without_guest_errors() {
    // Leg b is a sparse image on a 12 MiB tmpfs: writes beyond that get ENOSPC
    // from the kernel.
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    let _guard = SmallFs::mount(&small, "12m");
    let a = d.path().join("a.img");
    let b = small.join("b.img");
    create_legs(&a, &b, &["--size", "64M", "--bitmap-chunk", "1M"]);
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1, BLOCK);
    for i in 0..(32 * MIB / BLOCK as u64) {
        write_block(&mut c, 0, i, 5);
    }
    let s = serve.status();
    assert_eq!(leg_state(&s, &b), "faulty", "{s}");
    for i in 0..(32 * MIB / BLOCK as u64) {
        verify_block(&mut c, i * BLOCK as u64, &[5]);
    }
    drop(c);
    assert!(serve.stop().success());
    let log = serve.log_text();
    assert!(
        log.contains("marking it faulty")
            && (log.contains("No space left") || log.contains("short transfer")),
        "{log}"
    );
}

#[test]
fn guest_writes_into_chunks_under_resync_complete_and_land_on_both_legs() {
    // 64 MiB bitmap chunks: resyncing one takes long enough that guest writes hit it.
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    create_legs(&a, &b, &["--size", "256M"]);
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1, 32 * 4096);
    for chunk in 0..3u64 {
        write_block(&mut c, chunk * 64 * MIB, 0, 1);
    }
    drop(c);
    serve.kill9();
    let dirty = examine(&[&a])["legs"][0]["bitmap"]["slots"][0]["dirty"]
        .as_u64()
        .unwrap();
    assert_eq!(dirty, 3);

    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let (tx, rx) = std::sync::mpsc::channel();
    let sock2 = sock.clone();
    std::thread::spawn(move || {
        let mut c = Client::connect(&sock2, 1, 32 * 4096);
        let blocks = c.capacity / 4096;
        let mut last = std::collections::HashMap::new();
        let mut x = 0x2545_f491u64;
        let start = Instant::now();
        let mut round = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            round += 1;
            let mut reqs = Vec::new();
            for k in 0..32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly into the three dirty chunks, which are being resynced.
                let blk = x % (3 * 64 * MIB / 4096).min(blocks);
                let off = blk * 4096;
                if last.contains_key(&off)
                    && reqs.iter().any(|r: &(bool, u64, usize, usize)| r.1 == off)
                {
                    continue;
                }
                let data = pattern(round, off, 4096);
                c.buf()[k * 4096..(k + 1) * 4096].copy_from_slice(&data);
                reqs.push((true, off, k * 4096, 4096));
                last.insert(off, round);
            }
            for (_, ret) in c.batch(0, &reqs) {
                assert_eq!(ret, 0);
            }
        }
        for (&off, &seed) in &last {
            assert_eq!(c.read(0, off, 0, 4096), 0);
            assert!(
                c.buf()[..4096] == pattern(seed, off, 4096)[..],
                "block at {off}"
            );
        }
        let _ = tx.send(last.len());
    });
    let n = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("guest writes into resyncing chunks must not hang");
    assert!(n > 100, "{n} blocks written");
    let s = serve.wait_for("resync", |s| {
        s["resync"]["remaining_chunks"] == 0 && !s["resync"]["active"].as_bool().unwrap()
    });
    assert!(s["resync"]["bytes_copied"].as_u64().unwrap() >= 3 * 64 * MIB);
    assert!(serve.stop().success());
    assert!(data_area(&a) == data_area(&b), "legs differ");
}

#[test]
fn both_legs_out_of_space_fail_the_write_and_keep_the_last_leg_in_service() {
    // Both legs are sparse 64 MiB images on one 12 MiB tmpfs: once it is full,
    // every leg fails writes with ENOSPC. Like md, the last in-sync leg is kept:
    // the guest's write fails, the data written before stays readable.
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    let _guard = SmallFs::mount(&small, "12m");
    let (a, b) = (small.join("a.img"), small.join("b.img"));
    create_legs(&a, &b, &["--size", "64M", "--bitmap-chunk", "1M"]);
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(&sock, &[a.to_str().unwrap(), b.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1, BLOCK);
    let mut written = 0;
    let mut failed = None;
    for i in 0..(48 * MIB / BLOCK as u64) {
        let off = i * BLOCK as u64;
        c.buf()[..BLOCK].copy_from_slice(&pattern(9, off, BLOCK));
        let ret = c.write(0, off, 0, BLOCK);
        if ret != 0 {
            failed = Some(ret);
            break;
        }
        written = i + 1;
    }
    let ret = failed.expect("the file system never filled up");
    assert!(ret < 0, "the guest's write fails: {ret}");
    assert!(written > 0);
    let s = serve.status();
    let states = [leg_state(&s, &a), leg_state(&s, &b)];
    assert!(
        states.iter().any(|st| st == "in-sync"),
        "the last leg stays in sync: {s}"
    );
    for i in 0..written {
        verify_block(&mut c, i * BLOCK as u64, &[9]);
    }
    drop(c);
    assert!(serve.stop().success());
    let log = serve.log_text();
    assert!(log.contains("last in-sync leg"), "{log}");
}

/// A small tmpfs mounted at a directory (root), unmounted on drop: files on it run
/// out of space with ENOSPC from the kernel.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount (root) is needed for this test");
        assert!(st.success(), "mounting a tmpfs needs root");
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
