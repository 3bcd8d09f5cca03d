//! Inflight I/O tracking across a back-end crash, with the `vhost` crate's front-end
//! playing QEMU: GET_INFLIGHT_FD + SET_INFLIGHT_FD, a batch of requests of which one
//! write stalls on a leg (fault drill) while a later request already completed, kill -9,
//! a new `serve`, SET_INFLIGHT_FD with the same buffer and the ring restarted at the
//! used index (what QEMU sends after losing its back-end). Every request must complete
//! exactly once with OK status, without a new kick from the guest, and every write must
//! be on both legs.

mod common;

use common::vring::{connect, header, regions, set_up_vring, Chain, Guest, HIGH, QSIZE};
use common::vring::{T_GET_ID, T_OUT};
use common::{data_area, pattern, Serve};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
/// Leg 1 writes at or beyond this byte offset stall in the first `serve`.
const STALL_FROM: u64 = 32 * MIB;
const STATUS: u64 = 0x2_0000;
const ID: u64 = 0x2_4000;
const LEN: usize = 16 << 10;

fn proto() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Memory table, inflight buffer and queue 0 (next available index `base`), enabled.
fn attach(
    fe: &mut Frontend,
    g: &Guest,
    inflight: &VhostUserInflight,
    file: &File,
    base: u16,
) -> (EventFd, EventFd) {
    let (low, high) = regions(g);
    fe.set_mem_table(&[low, high]).unwrap();
    // QEMU sets the buffer before it starts the rings, on every start.
    fe.set_inflight_fd(inflight, file.as_raw_fd()).unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    set_up_vring(fe, g, base, &kick, &call);
    fe.set_vring_enable(0, true).unwrap();
    (kick, call)
}

/// A write of `LEN` bytes of `pattern(seed)` at `sector`, using header/status slot
/// `slot`.
fn write_chain(g: &Guest, slot: u64, seed: u64, sector: u64) -> Chain {
    let buf = HIGH + 0x4_0000 + slot * LEN as u64;
    g.put(buf, &pattern(seed, sector * 512, LEN));
    g.put(STATUS + slot, &[0xff]);
    vec![
        (header(g, slot, T_OUT, sector), 16, false),
        (buf, LEN as u32, false),
        (STATUS + slot, 1, true),
    ]
}

#[test]
fn requests_in_flight_when_the_backend_dies_complete_once_after_restart() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let stall = format!("1:stall-writes-from={STALL_FROM}");
    let legs = [a.to_str().unwrap(), b.to_str().unwrap()];
    let mut serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "64M",
            "--queues",
            "1",
            "--inject-fault",
            &stall,
            legs[0],
            legs[1],
        ],
    );

    let (mut fe, _) = connect(&sock, proto());
    let (inflight, file) = fe
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: QSIZE,
        })
        .unwrap();
    assert_eq!(inflight.num_queues, 1);
    assert_eq!(inflight.queue_size, QSIZE);
    assert!(inflight.mmap_size >= 16 + 16 * u64::from(QSIZE));
    let mut g = Guest::new();
    let (kick, _call) = attach(&mut fe, &g, &inflight, &file, 0);

    // A write that completes normally.
    let w0 = write_chain(&g, 0, 100, 1000);
    g.run(&kick, &[w0]);
    assert_eq!(g.get(STATUS, 1)[0], 0);

    // A batch: A (write, low: goes through), B (GET_ID: completes at once, before A),
    // C (write beyond STALL_FROM on leg 1: stalls the queue), D and E (not taken yet).
    // Sector 40 MiB of the array lies beyond STALL_FROM on the leg.
    let writes: [(u64, u64, u64); 4] = [
        (1, 101, 0),                // A
        (3, 103, (40 * MIB) / 512), // C
        (4, 104, 100),              // D
        (5, 105, 200),              // E
    ];
    g.put(STATUS + 2, &[0xff]);
    let get_id: Chain = vec![
        (header(&g, 2, T_GET_ID, 0), 16, false),
        (ID, 20, true),
        (STATUS + 2, 1, true),
    ];
    let chains = vec![
        write_chain(&g, 1, 101, writes[0].2),
        get_id,
        write_chain(&g, 3, 103, writes[1].2),
        write_chain(&g, 4, 104, writes[2].2),
        write_chain(&g, 5, 105, writes[3].2),
    ];
    let heads = g.publish(0, &chains);
    kick.write(1).unwrap();
    // W0 and B reach the used ring; A waits for the end of the batch, C stalls.
    assert!(
        g.wait_used(2, Duration::from_secs(20)),
        "used index {}: {}",
        g.used_idx(),
        serve.log_text()
    );
    let start = std::time::Instant::now();
    while !serve.log_text().contains("stalls until the process ends") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.used_idx(), 2, "requests completed past the stalled write");
    assert_eq!(g.used_elem(1).0, heads[1], "GET_ID completed before A");
    serve.kill9();
    drop(fe);
    let used_before = g.used_idx();

    // A new back-end; QEMU restarts the ring at the used index and hands over the
    // same inflight buffer. The guest does not kick again.
    let mut serve = Serve::start(&sock, &["--queues", "1", legs[0], legs[1]]);
    let (mut fe, _) = connect(&sock, proto());
    let (_kick, _call) = attach(&mut fe, &g, &inflight, &file, used_before);
    let total = 1 + chains.len() as u16;
    let done = g.wait_used(total, Duration::from_secs(20));
    // Nothing more may arrive.
    std::thread::sleep(Duration::from_millis(300));
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 1..g.used_idx() {
        *seen.entry(g.used_elem(i).0).or_default() += 1;
    }
    let want: BTreeMap<u16, usize> = heads.iter().map(|&h| (h, 1)).collect();
    assert!(
        done && g.used_idx() == total && seen == want,
        "used index {} (want {total}); heads used after W0 {seen:?}, want each of {heads:?} once\n{}",
        g.used_idx(),
        serve.log_text()
    );
    for slot in 0..6 {
        assert_eq!(
            g.get(STATUS + slot, 1)[0],
            0,
            "status of request slot {slot}"
        );
    }
    assert!(serve
        .log_text()
        .contains("resubmitting 2 inflight requests"));
    // A clean stop: every request done.
    assert_eq!(fe.get_vring_base(0).unwrap(), u32::from(total));
    drop(fe);
    assert!(serve.stop().success());

    // Every write is on both legs.
    let legs_data = [data_area(&a), data_area(&b)];
    for (slot, seed, sector) in [(0u64, 100u64, 1000u64)].into_iter().chain(writes) {
        let off = (sector * 512) as usize;
        let want = pattern(seed, sector * 512, LEN);
        for (i, leg) in legs_data.iter().enumerate() {
            assert!(
                leg[off..off + LEN] == want[..],
                "write of slot {slot} (sector {sector}) missing on leg {i}"
            );
        }
    }
}

/// A memfd of `len` bytes with `fill` written at offset 0.
fn memfd_with(len: u64, fill: &[u8]) -> File {
    use std::os::unix::fs::FileExt;
    let name = std::ffi::CString::new("bad-inflight").unwrap();
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nobody else owns.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f.write_all_at(fill, 0).unwrap();
    f
}

#[test]
fn malformed_inflight_buffers_get_error_replies_and_serve_survives() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "16M",
            "--queues",
            "1",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    let region = 16 + 16 * u64::from(QSIZE);
    let good = |mmap_size, mmap_offset, num_queues, queue_size| VhostUserInflight {
        mmap_size,
        mmap_offset,
        num_queues,
        queue_size,
    };
    // Each gets an error reply; the vhost crate then ends the connection (as after any
    // failed request) and the back-end serves the next one.
    let f = memfd_with(4096, &[]);
    for (what, msg) in [
        ("too small", good(region - 1, 0, 1, QSIZE)),
        ("beyond the file", good(region, 4096, 1, QSIZE)),
        ("more queues than the device", good(8192, 0, 5, QSIZE)),
        ("no queue", good(4096, 0, 0, QSIZE)),
        ("empty queues", good(4096, 0, 1, 0)),
        ("huge queues", good(4096, 0, 1, u16::MAX)),
        ("huge buffer", good(u64::MAX, 0, 1, QSIZE)),
        ("unaligned offset", good(region, 1, 1, QSIZE)),
    ] {
        let (mut fe, _) = connect(&sock, proto());
        assert!(
            fe.set_inflight_fd(&msg, f.as_raw_fd()).is_err(),
            "SET_INFLIGHT_FD {what} accepted"
        );
    }
    let (mut fe, _) = connect(&sock, proto());
    assert!(fe.get_inflight_fd(&good(0, 0, 1, 0)).is_err());
    let (mut fe, _) = connect(&sock, proto());
    assert!(fe.get_inflight_fd(&good(0, 0, 2, QSIZE)).is_err());
    drop(fe);

    // A buffer full of garbage: every head marked with random counters, the last batch
    // head and used index out of range. The ring starts; the heads' descriptors are
    // empty chains, used with length 0; nothing crashes.
    let mut junk = vec![0u8; 4096];
    for (i, b) in junk.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(7) | 1;
    }
    junk[8..10].copy_from_slice(&1u16.to_le_bytes()); // version
    junk[12..14].copy_from_slice(&0xfff0u16.to_le_bytes()); // last_batch_head
    let f = memfd_with(4096, &junk);
    let (mut fe, _) = connect(&sock, proto());
    let g = Guest::new();
    let (_kick, _call) = attach(&mut fe, &g, &good(4096, 0, 1, QSIZE), &f, 0);
    assert!(
        g.wait_used(QSIZE, Duration::from_secs(20)),
        "used {}",
        g.used_idx()
    );
    assert_eq!(fe.get_vring_base(0).unwrap(), u32::from(QSIZE));
    drop(fe);

    // Still serving.
    let (fe, _) = connect(&sock, proto());
    fe.get_features().unwrap();
    assert!(serve.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(
        !serve.log_text().contains("panicked"),
        "{}",
        serve.log_text()
    );
    drop(fe);
    assert!(serve.stop().success());
}
