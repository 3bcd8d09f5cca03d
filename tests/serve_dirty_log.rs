//! Migration dirty logging, with the `vhost` crate's front-end playing QEMU: guest RAM
//! in a memfd (two regions, as QEMU splits RAM around a hole), one split virtqueue
//! written by the test, a dirty log shared with SET_LOG_BASE, VHOST_F_LOG_ALL switched
//! on and off with SET_FEATURES. The log must hold exactly the pages the backend wrote
//! while LOG_ALL was acked: read data (zero-copy and bounced), status bytes, GET_ID
//! answers and the used ring; never the pages it only read.

mod common;

use common::{pattern, Serve};
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Guest RAM: region 0 at GPA 0, region 1 at GPA 16 MiB, 4 MiB each, one memfd.
const REGION: u64 = 4 * MIB;
const HIGH: u64 = 16 * MIB;
/// One bit per 4 KiB page up to the end of region 1.
const LOG_LEN: u64 = (HIGH + REGION) / PAGE / 8;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDRS: u64 = 0x1_0000;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_GET_ID: u32 = 8;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VHOST_F_LOG_ALL: u64 = 1 << 26;

/// A shared mapping of a memfd.
struct Shm {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

impl Shm {
    fn new(name: &str, len: u64) -> Shm {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: plain memfd_create/ftruncate/mmap on a new descriptor; results checked.
        unsafe {
            let fd = libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            Shm {
                fd,
                ptr: ptr as *mut u8,
                len: len as usize,
            }
        }
    }

    fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= self.len);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside the mapping (checked above); the backend writes concurrently,
            // hence volatile.
            *b = unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) };
        }
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: as in `read`.
            unsafe { std::ptr::write_volatile(self.ptr.add(off + i), *b) };
        }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// Guest RAM as the test (the "driver") sees it.
struct Guest {
    ram: Shm,
    /// Next free descriptor and our avail index.
    avail_idx: u16,
}

impl Guest {
    /// Offset in the memfd of guest address `gpa`.
    fn off(gpa: u64) -> usize {
        if gpa < REGION {
            gpa as usize
        } else {
            assert!((HIGH..HIGH + REGION).contains(&gpa), "{gpa:#x}");
            (REGION + gpa - HIGH) as usize
        }
    }

    fn va(&self, gpa: u64) -> u64 {
        self.ram.ptr as u64 + Self::off(gpa) as u64
    }

    fn put(&self, gpa: u64, data: &[u8]) {
        self.ram.write(Self::off(gpa), data);
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.ram.read(Self::off(gpa), &mut v);
        v
    }

    fn used_idx(&self) -> u16 {
        let b = self.get(USED + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Puts `chains` (each: guest buffers (address, length, device-writable)) on the
    /// ring, kicks, and waits until the device used them all.
    fn run(&mut self, kick: &EventFd, chains: &[Vec<(u64, u32, bool)>]) {
        let mut d: u16 = 0;
        for chain in chains {
            let head = d;
            for (i, &(addr, len, writable)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let mut desc = [0u8; 16];
                desc[0..8].copy_from_slice(&addr.to_le_bytes());
                desc[8..12].copy_from_slice(&len.to_le_bytes());
                let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                desc[12..14].copy_from_slice(&flags.to_le_bytes());
                desc[14..16].copy_from_slice(&(d + 1).to_le_bytes());
                self.put(DESC + u64::from(d) * 16, &desc);
                d += 1;
            }
            assert!(d <= QSIZE);
            let slot = u64::from(self.avail_idx % QSIZE);
            self.put(AVAIL + 4 + slot * 2, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        kick.write(1).unwrap();
        let start = Instant::now();
        while self.used_idx() != self.avail_idx {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "device used {} of {} requests",
                self.used_idx(),
                self.avail_idx
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn header(g: &Guest, slot: u64, ty: u32, sector: u64) -> u64 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    let gpa = HDRS + slot * 16;
    g.put(gpa, &h);
    gpa
}

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
    let mut fe = Frontend::connect(&sock, 1).unwrap();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & VHOST_F_LOG_ALL, 0, "VHOST_F_LOG_ALL not offered");
    let proto = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    // GET_PROTOCOL_FEATURES needs PROTOCOL_FEATURES offered (checked by the crate).
    let offered_proto = fe.get_protocol_features().unwrap();
    assert!(
        offered_proto.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD not offered: {offered_proto:?}"
    );
    fe.set_protocol_features(proto).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let acked = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    fe.set_features(acked).unwrap();

    // Guest RAM: one memfd, two regions (SET_MEM_TABLE, then ADD_MEM_REG).
    let mut g = Guest {
        ram: Shm::new("guest-ram", 2 * REGION),
        avail_idx: 0,
    };
    let fd = g.ram.fd.as_raw_fd();
    let base = g.ram.ptr as u64;
    let low = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: REGION,
        userspace_addr: base,
        mmap_offset: 0,
        mmap_handle: fd,
    };
    let high = VhostUserMemoryRegionInfo {
        guest_phys_addr: HIGH,
        memory_size: REGION,
        userspace_addr: base + REGION,
        mmap_offset: REGION,
        mmap_handle: fd,
    };
    fe.set_mem_table(std::slice::from_ref(&low)).unwrap();
    fe.add_mem_region(&high).unwrap();

    // One split virtqueue in region 0.
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: g.va(DESC),
            used_ring_addr: g.va(USED),
            avail_ring_addr: g.va(AVAIL),
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
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
