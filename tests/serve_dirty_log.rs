//! Migration dirty logging, with the `vhost` crate's front-end playing QEMU: guest RAM
//! in a memfd (two regions, as QEMU splits RAM around a hole), one split virtqueue
//! written by the test, a dirty log shared with SET_LOG_BASE, VHOST_F_LOG_ALL switched
//! on and off with SET_FEATURES. The log must hold exactly the pages the backend wrote
//! while LOG_ALL was acked: read data (zero-copy and bounced), status bytes, GET_ID
//! answers and the used ring; never the pages it only read.

mod common;

use common::vring::Shm;
use common::vring::{connect, header, regions, set_up_vring, Guest, HIGH, PAGE, USED};
use common::vring::{AVAIL, DESC, HDRS, REGION, T_GET_ID, T_IN, T_OUT};
use common::{pattern, Serve};
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vmm_sys_util::eventfd::EventFd;

/// One bit per 4 KiB page up to the end of region 1.
const LOG_LEN: u64 = (HIGH + REGION) / PAGE / 8;
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// The guest pages (addresses) marked in the log.
fn dirty_pages(log: &Shm) -> BTreeSet<u64> {
    let mut bytes = vec![0u8; LOG_LEN as usize];
    log.read(0, &mut bytes);
    let mut pages = BTreeSet::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert((i as u64 * 8 + bit) * PAGE);
            }
        }
    }
    pages
}

fn hex(s: &BTreeSet<u64>) -> Vec<String> {
    s.iter().map(|p| format!("{p:#x}")).collect()
}

#[test]
fn dirty_log_marks_exactly_the_pages_the_backend_wrote_while_log_all_is_on() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "64M",
            "--queues",
            "1",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );

    // Negotiation, as QEMU does it.
    let proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    let (mut fe, acked) = connect(&sock, proto);
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & VHOST_F_LOG_ALL, 0, "VHOST_F_LOG_ALL not offered");

    // Guest RAM: one memfd, two regions (SET_MEM_TABLE, then ADD_MEM_REG).
    let mut g = Guest::new();
    let (low, high) = regions(&g);
    fe.set_mem_table(std::slice::from_ref(&low)).unwrap();
    fe.add_mem_region(&high).unwrap();

    // One split virtqueue in region 0.
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    set_up_vring(&mut fe, &g, 0, &kick, &call);
    fe.set_vring_enable(0, true).unwrap();

    // The dirty log is shared, but LOG_ALL is not acked yet.
    let log = Shm::new("dirty-log", LOG_LEN);
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: LOG_LEN,
            mmap_offset: 0,
            mmap_handle: log.fd.as_raw_fd(),
        }),
    )
    .unwrap();

    // Status bytes: one page for reads, one for writes.
    const ST_R: u64 = 0x2_0000;
    const ST_W: u64 = 0x2_2000;
    const ID: u64 = 0x2_4000;
    // Read buffers in region 1: 8 KiB + 4 KiB page-aligned (zero copy), and 4 KiB
    // at an address no leg can take directly (bounced).
    const R_A: u64 = HIGH + 0x1_0000;
    const R_B: u64 = HIGH + 0x2_0000;
    const R_U: u64 = HIGH + 0x1_8100;
    const W_BUF: u64 = HIGH + 0x3_0000;
    let data = pattern(7, 0, 16 << 10);

    // Before logging: write 16 KiB at sector 0, read 12 KiB of it back.
    g.put(W_BUF, &data);
    let h0 = header(&g, 0, T_OUT, 0);
    let h1 = header(&g, 1, T_IN, 0);
    g.run(
        &kick,
        &[vec![
            (h0, 16, false),
            (W_BUF, 16 << 10, false),
            (ST_W, 1, true),
        ]],
    );
    g.run(
        &kick,
        &[vec![
            (h1, 16, false),
            (R_A, 8192, true),
            (R_B, 4096, true),
            (ST_R, 1, true),
        ]],
    );
    assert_eq!(g.get(ST_W, 1)[0], 0);
    assert_eq!(g.get(ST_R, 1)[0], 0);
    assert_eq!(g.get(R_A, 8192), data[..8192]);
    assert_eq!(g.get(R_B, 4096), data[8192..12288]);
    assert!(
        dirty_pages(&log).is_empty(),
        "pages marked before VHOST_F_LOG_ALL: {:?}",
        hex(&dirty_pages(&log))
    );

    // Logging on.
    fe.set_features(acked | VHOST_F_LOG_ALL).unwrap();
    let batch = |g: &mut Guest| {
        for (gpa, len) in [(R_A, 8192), (R_B, 4096), (R_U, 4096)] {
            g.put(gpa, &vec![0xee; len]);
        }
        let h = [
            header(g, 0, T_IN, 0),
            header(g, 1, T_IN, 24),
            header(g, 2, T_OUT, 64),
            header(g, 3, T_GET_ID, 0),
        ];
        g.run(
            &kick,
            &[
                vec![
                    (h[0], 16, false),
                    (R_A, 8192, true),
                    (R_B, 4096, true),
                    (ST_R, 1, true),
                ],
                vec![(h[1], 16, false), (R_U, 4096, true), (ST_R + 1, 1, true)],
                vec![(h[2], 16, false), (W_BUF, 8192, false), (ST_W, 1, true)],
                vec![(h[3], 16, false), (ID, 20, true), (ID + 64, 1, true)],
            ],
        );
        assert_eq!(g.get(ST_R, 2), [0, 0]);
        assert_eq!(g.get(ST_W, 1)[0], 0);
        assert_eq!(g.get(ID + 64, 1)[0], 0);
        assert_eq!(g.get(R_A, 8192), data[..8192]);
        assert_eq!(g.get(R_B, 4096), data[8192..12288]);
        assert_eq!(g.get(R_U, 4096), data[12288..]);
    };
    batch(&mut g);
    let want: BTreeSet<u64> = [
        USED,
        ST_R,
        ST_W,
        ID,
        R_A,
        R_A + PAGE,
        R_B,
        R_U & !(PAGE - 1),
        (R_U & !(PAGE - 1)) + PAGE,
    ]
    .into_iter()
    .collect();
    let got = dirty_pages(&log);
    assert_eq!(
        hex(&got),
        hex(&want),
        "log while LOG_ALL is on (descriptors {DESC:#x}, avail {AVAIL:#x}, headers {HDRS:#x} \
         and written data {W_BUF:#x} are only read by the device)"
    );

    // Logging off (a cancelled migration): nothing is marked any more.
    log.write(0, &vec![0; LOG_LEN as usize]);
    fe.set_features(acked).unwrap();
    batch(&mut g);
    assert!(
        dirty_pages(&log).is_empty(),
        "pages marked after VHOST_F_LOG_ALL was cleared: {:?}",
        hex(&dirty_pages(&log))
    );

    // And on again.
    fe.set_features(acked | VHOST_F_LOG_ALL).unwrap();
    batch(&mut g);
    assert_eq!(hex(&dirty_pages(&log)), hex(&want));

    // The memory table changes while logging (QEMU's vhost_commit during a migration
    // keeps the log): a region removed and added again, then a whole new table. The
    // new regions log into the same log.
    log.write(0, &vec![0; LOG_LEN as usize]);
    fe.remove_mem_region(&high).unwrap();
    fe.add_mem_region(&high).unwrap();
    batch(&mut g);
    assert_eq!(
        hex(&dirty_pages(&log)),
        hex(&want),
        "after REM_MEM_REG + ADD_MEM_REG"
    );
    log.write(0, &vec![0; LOG_LEN as usize]);
    fe.set_mem_table(&[low, high]).unwrap();
    batch(&mut g);
    assert_eq!(hex(&dirty_pages(&log)), hex(&want), "after SET_MEM_TABLE");

    // GET_VRING_BASE stops the ring with every request done.
    assert_eq!(fe.get_vring_base(0).unwrap(), u32::from(g.avail_idx));
    drop(fe);
    drop(serve);
}
