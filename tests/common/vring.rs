//! Playing QEMU with the `vhost` crate's front-end: guest RAM in a memfd (two regions,
//! as QEMU splits RAM around a hole) and one split virtqueue the test drives.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const PAGE: u64 = 4096;
pub const MIB: u64 = 1 << 20;
/// Guest RAM: region 0 at GPA 0, region 1 at GPA 16 MiB, 4 MiB each, one memfd.
pub const REGION: u64 = 4 * MIB;
pub const HIGH: u64 = 16 * MIB;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const HDRS: u64 = 0x1_0000;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_GET_ID: u32 = 8;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// A shared mapping of a memfd.
pub struct Shm {
    pub fd: OwnedFd,
    pub ptr: *mut u8,
    pub len: usize,
}

impl Shm {
    pub fn new(name: &str, len: u64) -> Shm {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: plain memfd_create/ftruncate/mmap on a new descriptor; results checked.
        unsafe {
            let fd = libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
            Self::map(fd, len)
        }
    }

    /// Maps `len` bytes of `fd` shared.
    pub fn map(fd: OwnedFd, len: u64) -> Shm {
        // SAFETY: a new shared mapping of a descriptor we own; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Shm {
            fd,
            ptr: ptr as *mut u8,
            len: len as usize,
        }
    }

    pub fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= self.len);
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: inside the mapping (checked above); the backend writes concurrently,
            // hence volatile.
            *b = unsafe { std::ptr::read_volatile(self.ptr.add(off + i)) };
        }
    }

    pub fn write(&self, off: usize, data: &[u8]) {
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

/// A chain: guest buffers (address, length, device-writable).
pub type Chain = Vec<(u64, u32, bool)>;

/// Guest RAM as the test (the "driver") sees it.
pub struct Guest {
    pub ram: Shm,
    /// Our avail index.
    pub avail_idx: u16,
}

impl Guest {
    pub fn new() -> Guest {
        Guest {
            ram: Shm::new("guest-ram", 2 * REGION),
            avail_idx: 0,
        }
    }

    /// Offset in the memfd of guest address `gpa`.
    pub fn off(gpa: u64) -> usize {
        if gpa < REGION {
            gpa as usize
        } else {
            assert!((HIGH..HIGH + REGION).contains(&gpa), "{gpa:#x}");
            (REGION + gpa - HIGH) as usize
        }
    }

    pub fn va(&self, gpa: u64) -> u64 {
        self.ram.ptr as u64 + Self::off(gpa) as u64
    }

    pub fn put(&self, gpa: u64, data: &[u8]) {
        self.ram.write(Self::off(gpa), data);
    }

    pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.ram.read(Self::off(gpa), &mut v);
        v
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.get(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    pub fn used_idx(&self) -> u16 {
        self.u16_at(USED + 2)
    }

    /// The used ring's element `i`: (head, length).
    pub fn used_elem(&self, i: u16) -> (u16, u32) {
        let b = self.get(USED + 4 + u64::from(i % QSIZE) * 8, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()) as u16,
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// Writes `chains` into the descriptor table from index `first` on and publishes
    /// their heads in the avail ring (no kick); returns the heads.
    pub fn publish(&mut self, first: u16, chains: &[Chain]) -> Vec<u16> {
        let mut d = first;
        let mut heads = Vec::new();
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
            heads.push(head);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.put(AVAIL + 2, &self.avail_idx.to_le_bytes());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        heads
    }

    /// Waits until the used index reaches `want` (at most `limit`); returns whether.
    pub fn wait_used(&self, want: u16, limit: Duration) -> bool {
        let start = Instant::now();
        while self.used_idx() != want {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Puts `chains` on the ring, kicks, and waits until the device used them all.
    pub fn run(&mut self, kick: &EventFd, chains: &[Chain]) {
        self.publish(0, chains);
        kick.write(1).unwrap();
        assert!(
            self.wait_used(self.avail_idx, Duration::from_secs(20)),
            "device used {} of {} requests",
            self.used_idx(),
            self.avail_idx
        );
    }
}

impl Default for Guest {
    fn default() -> Self {
        Guest::new()
    }
}

/// A virtio-blk request header for `ty` at `sector` in header slot `slot`; its address.
pub fn header(g: &Guest, slot: u64, ty: u32, sector: u64) -> u64 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    let gpa = HDRS + slot * 16;
    g.put(gpa, &h);
    gpa
}

/// Connects and negotiates as QEMU does: `proto` protocol features, VERSION_1 and
/// PROTOCOL_FEATURES, replies to every request. Returns the front-end and the
/// features acked.
pub fn connect(sock: &Path, proto: VhostUserProtocolFeatures) -> (Frontend, u64) {
    let mut fe = Frontend::connect(sock, 1).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    let offered_proto = fe.get_protocol_features().unwrap();
    assert!(
        offered_proto.contains(proto),
        "protocol features {proto:?} not all offered: {offered_proto:?}"
    );
    fe.set_protocol_features(proto).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let acked = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    fe.set_features(acked).unwrap();
    (fe, acked)
}

/// The two memory regions of `g` (low, high).
pub fn regions(g: &Guest) -> (VhostUserMemoryRegionInfo, VhostUserMemoryRegionInfo) {
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
    (low, high)
}

/// Queue 0's addresses, size, next available index `base`, call and kick; not enabled.
pub fn set_up_vring(fe: &mut Frontend, g: &Guest, base: u16, kick: &EventFd, call: &EventFd) {
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
    fe.set_vring_base(0, base).unwrap();
    fe.set_vring_call(0, call).unwrap();
    fe.set_vring_kick(0, kick).unwrap();
}
