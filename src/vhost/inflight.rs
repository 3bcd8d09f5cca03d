//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a buffer shared
//! with the front-end that records which descriptor heads of each split virtqueue were
//! taken from the avail ring and not yet put in the used ring. The front-end keeps it
//! across a back-end crash or restart and hands it to the next back-end
//! (`SET_INFLIGHT_FD`), which resubmits those heads: no request the guest is waiting
//! for is lost and none already completed runs again.
//!
//! Layout (vhost-user specification, "Inflight I/O tracking", split virtqueue; the same
//! as QEMU's libvhost-user): per queue, at multiples of [`queue_region_size`],
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! Protocol, per head, as libvhost-user does it:
//! * taken from the avail ring: `counter = next counter`, then `inflight = 1`;
//! * completed: `last_batch_head = head` (pre-put), used element and used index
//!   written, then `inflight = 0` and `used_idx = new used index` (post-put).
//!
//! On start after `SET_INFLIGHT_FD`: if the region's `used_idx` differs from the ring's
//! used index, the back-end died between the used-index update and the post-put, so
//! `last_batch_head` is done; every head still marked is resubmitted in counter order
//! and the ring's next available index becomes `used index + number of marked heads`.
//!
//! The buffer is shared with another process and its contents are not trusted: every
//! index is bounds-checked and a malformed buffer is refused, never a panic.

use log::warn;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::VringState;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::event::EventNotifier;

/// The version this back-end writes into a fresh queue region.
pub const VERSION: u16 = 1;
/// Queue regions start at multiples of this.
const ALIGNMENT: u64 = 64;
/// Bytes of a queue region's header.
const HEADER: u64 = 16;
/// Bytes of one descriptor's state.
const DESC_STATE: u64 = 16;
/// Largest buffer accepted from a front-end.
const MAX_MMAP: u64 = 64 << 20;

// Header field offsets.
const H_VERSION: u64 = 8;
const H_DESC_NUM: u64 = 10;
const H_LAST_BATCH_HEAD: u64 = 12;
const H_USED_IDX: u64 = 14;
// Descriptor state field offsets.
const D_INFLIGHT: u64 = 0;
const D_COUNTER: u64 = 8;

/// Bytes one queue of `queue_size` entries takes in the buffer.
///
/// libvhost-user computes `ALIGN_UP(16 * queue_size + 2, 64)`; this is the same for
/// every queue size that is a multiple of 4 (every size QEMU uses) and never smaller
/// than header plus descriptors.
pub fn queue_region_size(queue_size: u16) -> u64 {
    let raw = HEADER + DESC_STATE * u64::from(queue_size);
    raw.div_ceil(ALIGNMENT) * ALIGNMENT
}

/// A shared read-write mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, only accessed through atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are a mapping this value owns.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What starting a queue found in its region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (version 0): nothing to resubmit, the ring's next
    /// available index stays as the front-end set it.
    pub fresh: bool,
    /// Heads still marked, in the order they were taken (counter order).
    pub resubmit: Vec<u16>,
    /// The heads marked (the ring's next available index is `used index + inuse`).
    pub inuse: u16,
    /// `last_batch_head` was cleared: it had reached the used ring.
    pub fixed_last_batch: bool,
}

/// Per-queue state of this process (not shared).
#[derive(Default)]
struct QueueLocal {
    counter: AtomicU64,
    resubmit: Mutex<Vec<u16>>,
}

/// An inflight buffer: the front-end's file, mapped.
pub struct InflightRegion {
    map: Mapping,
    num_queues: u16,
    queue_size: u16,
    local: Vec<QueueLocal>,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("len", &self.map.len)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Checks the geometry a front-end asks for; returns the bytes it needs.
pub fn check_geometry(num_queues: u16, queue_size: u16, max_queues: usize) -> io::Result<u64> {
    if num_queues == 0 || usize::from(num_queues) > max_queues {
        return Err(invalid(format!(
            "inflight buffer for {num_queues} queues (the device has {max_queues})"
        )));
    }
    if queue_size == 0 || usize::from(queue_size) > super::QUEUE_SIZE {
        return Err(invalid(format!(
            "inflight buffer for queues of {queue_size} entries (1 to {})",
            super::QUEUE_SIZE
        )));
    }
    Ok(queue_region_size(queue_size) * u64::from(num_queues))
}

/// A new zeroed memfd of `len` bytes whose size cannot change any more.
pub fn new_memfd(len: u64) -> io::Result<File> {
    let name = c"vhost-user-md-inflight";
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    // SAFETY: fcntl on our own descriptor.
    let r = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

impl InflightRegion {
    /// Maps `len` bytes at `offset` of `file` for `num_queues` queues of `queue_size`
    /// entries, refusing sizes that do not fit (in the request or in the file).
    pub fn map(
        file: &File,
        offset: u64,
        len: u64,
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
    ) -> io::Result<InflightRegion> {
        let need = check_geometry(num_queues, queue_size, max_queues)?;
        if len < need || len > MAX_MMAP {
            return Err(invalid(format!(
                "inflight buffer of {len} bytes for {num_queues} queues of {queue_size} \
                 (needs {need}, at most {MAX_MMAP})"
            )));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| invalid("inflight buffer offset overflows".into()))?;
        let file_len = file.metadata()?.len();
        if end > file_len {
            return Err(invalid(format!(
                "inflight buffer ends at {end} beyond its file ({file_len} bytes)"
            )));
        }
        let off = libc::off_t::try_from(offset)
            .map_err(|_| invalid(format!("inflight buffer offset {offset}")))?;
        let ulen = usize::try_from(len).map_err(|_| invalid(format!("length {len}")))?;
        // SAFETY: a new shared mapping of a file we hold; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let region = InflightRegion {
            map: Mapping {
                ptr: ptr.cast(),
                len: ulen,
            },
            num_queues,
            queue_size,
            local: (0..num_queues).map(|_| QueueLocal::default()).collect(),
        };
        for q in 0..num_queues {
            // As libvhost-user: the entries of each queue are the negotiated queue size.
            region
                .u16_at(region.queue_base(usize::from(q)) + H_DESC_NUM)
                .store(queue_size, Ordering::Release);
        }
        Ok(region)
    }

    /// Number of queues the buffer covers.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn queue_base(&self, q: usize) -> u64 {
        queue_region_size(self.queue_size) * q as u64
    }

    fn u8_at(&self, off: u64) -> &AtomicU8 {
        assert!(off < self.map.len as u64);
        // SAFETY: inside the mapping (asserted; every offset is computed from indexes
        // checked against the geometry `map` validated), which lives as long as `self`.
        unsafe { &*(self.map.ptr.add(off as usize) as *const AtomicU8) }
    }

    fn u16_at(&self, off: u64) -> &AtomicU16 {
        assert!(off % 2 == 0 && off + 2 <= self.map.len as u64);
        // SAFETY: as in `u8_at`; aligned because the mapping is page-aligned and the
        // offset even.
        unsafe { &*(self.map.ptr.add(off as usize) as *const AtomicU16) }
    }

    fn u64_at(&self, off: u64) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= self.map.len as u64);
        // SAFETY: as in `u16_at`.
        unsafe { &*(self.map.ptr.add(off as usize) as *const AtomicU64) }
    }

    /// Queue `q`'s view, if the buffer covers it.
    pub fn queue(&self, q: usize) -> Option<InflightQueue<'_>> {
        (q < usize::from(self.num_queues)).then_some(InflightQueue {
            region: self,
            q,
            base: self.queue_base(q),
        })
    }
}

/// One queue of an [`InflightRegion`].
pub struct InflightQueue<'a> {
    region: &'a InflightRegion,
    q: usize,
    base: u64,
}

impl InflightQueue<'_> {
    fn local(&self) -> &QueueLocal {
        &self.region.local[self.q]
    }

    fn desc(&self, head: u16) -> Option<u64> {
        (head < self.region.queue_size).then(|| self.base + HEADER + DESC_STATE * u64::from(head))
    }

    /// The header's `version`.
    pub fn version(&self) -> u16 {
        self.region
            .u16_at(self.base + H_VERSION)
            .load(Ordering::Acquire)
    }

    /// The header's `used_idx`.
    pub fn used_idx(&self) -> u16 {
        self.region
            .u16_at(self.base + H_USED_IDX)
            .load(Ordering::Acquire)
    }

    /// Whether `head` is marked inflight.
    pub fn is_inflight(&self, head: u16) -> bool {
        self.desc(head)
            .is_some_and(|d| self.region.u8_at(d + D_INFLIGHT).load(Ordering::Acquire) != 0)
    }

    /// The counter recorded for `head`.
    pub fn counter(&self, head: u16) -> Option<u64> {
        self.desc(head)
            .map(|d| self.region.u64_at(d + D_COUNTER).load(Ordering::Acquire))
    }

    /// `head` was taken from the avail ring (libvhost-user's `vu_queue_inflight_get`).
    pub fn get(&self, head: u16) {
        let Some(d) = self.desc(head) else {
            warn!("queue {}: head {head} beyond the inflight buffer", self.q);
            return;
        };
        let c = self.local().counter.fetch_add(1, Ordering::Relaxed);
        self.region
            .u64_at(d + D_COUNTER)
            .store(c, Ordering::Release);
        self.region.u8_at(d + D_INFLIGHT).store(1, Ordering::SeqCst);
    }

    /// `head` is about to be put in the used ring (`vu_queue_inflight_pre_put`).
    pub fn pre_put(&self, head: u16) {
        if head < self.region.queue_size {
            self.region
                .u16_at(self.base + H_LAST_BATCH_HEAD)
                .store(head, Ordering::SeqCst);
        }
    }

    /// `head` is in the used ring, whose index is now `used_idx`
    /// (`vu_queue_inflight_post_put`).
    pub fn post_put(&self, head: u16, used_idx: u16) {
        if let Some(d) = self.desc(head) {
            self.region.u8_at(d + D_INFLIGHT).store(0, Ordering::SeqCst);
        }
        self.region
            .u16_at(self.base + H_USED_IDX)
            .store(used_idx, Ordering::SeqCst);
    }

    /// The queue starts with `ring_used_idx` in its used ring and `ring_size` entries
    /// (libvhost-user's `vu_check_queue_inflights`): repairs the last batch, returns
    /// the heads to resubmit and keeps them for [`take_resubmit`](Self::take_resubmit).
    pub fn recover(&self, ring_used_idx: u16, ring_size: u16) -> io::Result<Recovery> {
        let r = &self.region;
        if self.version() == 0 {
            r.u64_at(self.base).store(0, Ordering::Relaxed);
            r.u16_at(self.base + H_VERSION)
                .store(VERSION, Ordering::SeqCst);
            self.local().counter.store(0, Ordering::Relaxed);
            *self.lock_resubmit() = Vec::new();
            return Ok(Recovery {
                fresh: true,
                ..Recovery::default()
            });
        }
        let mut rec = Recovery::default();
        if self.used_idx() != ring_used_idx {
            let last = r
                .u16_at(self.base + H_LAST_BATCH_HEAD)
                .load(Ordering::Acquire);
            if let Some(d) = self.desc(last) {
                r.u8_at(d + D_INFLIGHT).store(0, Ordering::SeqCst);
                rec.fixed_last_batch = true;
            }
            r.u16_at(self.base + H_USED_IDX)
                .store(ring_used_idx, Ordering::SeqCst);
        }
        let mut marked: Vec<(u64, u16)> = Vec::new();
        for head in 0..r.queue_size {
            if self.is_inflight(head) {
                if head >= ring_size {
                    return Err(invalid(format!(
                        "queue {}: inflight head {head} beyond the ring ({ring_size} entries)",
                        self.q
                    )));
                }
                marked.push((self.counter(head).unwrap_or(0), head));
            }
        }
        marked.sort_unstable();
        rec.inuse = marked.len() as u16;
        rec.resubmit = marked.iter().map(|&(_, h)| h).collect();
        let next = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        self.local().counter.store(next, Ordering::Relaxed);
        *self.lock_resubmit() = rec.resubmit.clone();
        Ok(rec)
    }

    fn lock_resubmit(&self) -> std::sync::MutexGuard<'_, Vec<u16>> {
        self.local()
            .resubmit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The heads [`recover`](Self::recover) found, once.
    pub fn take_resubmit(&self) -> Vec<u16> {
        std::mem::take(&mut *self.lock_resubmit())
    }
}

/// Reads the descriptor chain starting at `head` of the split queue whose descriptor
/// table is at `desc_table` with `queue_size` entries, as `virtio_queue`'s
/// `DescriptorChain` walks it (indirect tables followed, loops cut off).
pub fn read_chain<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, &'static str> {
    if head >= queue_size {
        return Err("head beyond the queue");
    }
    let mut table = desc_table;
    let mut size = queue_size;
    let mut next = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes: u32 = 0;
    let mut out = Vec::new();
    loop {
        if ttl == 0 || next >= size {
            return Err("chain longer than its table or index beyond it");
        }
        let addr = table
            .0
            .checked_add(u64::from(next) * 16)
            .ok_or("descriptor address overflows")?;
        let desc: Descriptor = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| "descriptor outside guest memory")?;
        if desc.refers_to_indirect_table() {
            if indirect {
                return Err("indirect descriptor inside an indirect table");
            }
            if desc.len() % 16 != 0 || desc.len() / 16 > u32::from(u16::MAX) || desc.len() == 0 {
                return Err("bad indirect table length");
            }
            table = desc.addr();
            size = (desc.len() / 16) as u16;
            ttl = size;
            next = 0;
            indirect = true;
            continue;
        }
        bytes = bytes
            .checked_add(desc.len())
            .ok_or("chain longer than 4 GiB")?;
        let more = desc.has_next();
        let n = desc.next();
        out.push(desc);
        if !more {
            return Ok(out);
        }
        next = n;
        ttl -= 1;
    }
}

/// `GET_INFLIGHT_FD`: a new zeroed buffer for the geometry asked for, mapped, and the
/// reply describing it.
pub fn get_inflight_fd(
    msg: &VhostUserInflight,
    max_queues: usize,
) -> io::Result<(VhostUserInflight, File, InflightRegion)> {
    let len = check_geometry(msg.num_queues, msg.queue_size, max_queues)?;
    let file = new_memfd(len)?;
    let region = InflightRegion::map(&file, 0, len, msg.num_queues, msg.queue_size, max_queues)?;
    let reply = VhostUserInflight {
        mmap_size: len,
        mmap_offset: 0,
        num_queues: msg.num_queues,
        queue_size: msg.queue_size,
    };
    Ok((reply, file, region))
}

/// `SET_INFLIGHT_FD`: maps the front-end's buffer.
pub fn set_inflight_fd(
    msg: &VhostUserInflight,
    file: &File,
    max_queues: usize,
) -> io::Result<InflightRegion> {
    InflightRegion::map(
        file,
        msg.mmap_offset,
        msg.mmap_size,
        msg.num_queues,
        msg.queue_size,
        max_queues,
    )
}

/// A vring of queue `q` starts with `region` in use: repairs the region, sets the
/// ring's next available index past the heads still marked (which are kept for
/// resubmission) and kicks the ring so they run without waiting for the guest (as
/// libvhost-user does; vhost-user-backend also runs a ring when it gets enabled).
pub fn start_vring<A: GuestAddressSpace, M: GuestMemoryBackend>(
    region: &InflightRegion,
    q: usize,
    state: &mut VringState<A>,
    mem: &M,
) -> io::Result<Recovery> {
    let Some(iq) = region.queue(q) else {
        warn!(
            "queue {q}: not covered by the inflight buffer ({} queues)",
            region.num_queues()
        );
        return Ok(Recovery::default());
    };
    let queue = state.get_queue();
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_err(|e| io::Error::other(format!("queue {q}: used index: {e:?}")))?
        .0;
    let size = queue.size();
    if size > region.queue_size() {
        warn!(
            "queue {q}: {size} entries but the inflight buffer tracks {}",
            region.queue_size()
        );
    }
    let rec = iq.recover(used, size)?;
    if rec.fresh {
        return Ok(rec);
    }
    let next = used.wrapping_add(rec.inuse);
    state.get_queue_mut().set_next_avail(next);
    if !rec.resubmit.is_empty() || rec.fixed_last_batch {
        log::info!(
            "queue {q}: resubmitting {} inflight requests (used index {used}, next avail {next})",
            rec.resubmit.len()
        );
    }
    if let Some(kick) = state.get_kick() {
        let own = kick.try_clone()?;
        // SAFETY: `own` is a duplicate of the ring's kick eventfd that this call owns;
        // ownership passes to the notifier, which closes it.
        let notifier = unsafe { EventNotifier::from_raw_fd(own.into_raw_fd()) };
        notifier.notify()?;
    }
    Ok(rec)
}

/// Puts `head` in the used ring with the inflight buffer's pre- and post-put steps.
pub fn add_used<A: GuestAddressSpace>(
    state: &mut VringState<A>,
    iq: Option<&InflightQueue<'_>>,
    head: u16,
    len: u32,
) -> io::Result<()> {
    if let Some(iq) = iq {
        iq.pre_put(head);
    }
    state
        .add_used(head, len)
        .map_err(|e| io::Error::other(format!("add_used: {e:?}")))?;
    if let Some(iq) = iq {
        iq.post_put(head, state.get_queue().next_used());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
