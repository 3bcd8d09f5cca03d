//! The `VhostUserBackend` implementation: what the device offers, its config space,
//! and the per-queue workers.

mod handover;
mod queue;

use super::dirty::{self, DirtyLog, LogCarrier};
use super::engine::Engine;
use super::gate::{LocalGate, WriterGate};
use super::inflight::{self, InflightRegion};
use super::request::{Context, Limits, ID_LEN};
use super::stats::DeviceStats;
use crate::raid1::Array;
use crate::raid1::AsyncIo;
use log::{debug, info, warn};
use queue::QueueState;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest memory with a dirty-page log (for live migration).
pub type Mem = dirty::LoggedMemory;
/// The atomic handle the daemon updates on SET_MEM_TABLE / ADD_MEM_REG.
pub type GuestMem = GuestMemoryAtomic<Mem>;
/// A vring.
pub type Vring = VringRwLock<GuestMem>;

/// A memory table as a worker took it.
struct Snapshot {
    /// [`BlockBackend`]'s `mem_generation` when it was taken.
    generation: u64,
    mem: Arc<Mem>,
}

pub use super::{QUEUE_SIZE, SEG_MAX, SIZE_MAX};

/// How often a wait for requests in flight says it still waits.
const STILL_WAITING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the device is.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Number of virtqueues.
    pub queues: usize,
    /// Refuse writes.
    pub read_only: bool,
    /// Logical block size reported to the guest.
    pub block_size: u32,
}

/// The vhost-user-blk device backed by a mirror.
pub struct BlockBackend {
    array: Arc<Array>,
    config: BlockConfig,
    serial: [u8; ID_LEN],
    limits: Limits,
    event_idx: AtomicBool,
    /// The front-end acked VHOST_F_LOG_ALL (migration dirty logging).
    log_all: AtomicBool,
    /// Gives regions of a new memory table the dirty log of the previous ones.
    log_carrier: Mutex<LogCarrier>,
    writethrough: AtomicBool,
    mem: RwLock<Option<GuestMem>>,
    /// Bumped after every change of `mem`: a worker that took a request from the
    /// ring with an older table parses it against the new one (see
    /// [`BlockBackend::memory_changed`]).
    mem_generation: AtomicU64,
    /// Held shared by a worker while it runs requests; taken exclusively to drain.
    io_gate: RwLock<()>,
    stopping: AtomicBool,
    /// Requests completed, for status.
    pub completed: AtomicU64,
    /// Guest writes refused because another node holds the writer role.
    pub writes_refused: AtomicU64,
    /// Who may write the array: taken when the front-end starts the vrings.
    role: Arc<dyn WriterGate>,
    /// Queues the front-end started (bit per queue), since their last stop.
    started: Mutex<u64>,
    /// One asynchronous I/O state per queue (`None`: synchronous I/O). A worker
    /// holds its queue's lock while it takes and runs requests, synchronous ones
    /// included.
    queues: Vec<Mutex<QueueState>>,
    /// Queues stopped (GET_VRING_BASE, front-end gone): they take no request until
    /// the front-end starts them again. Changed under the queue's lock.
    stopped: Vec<AtomicBool>,
    /// The front-end's inflight buffer (`SET_INFLIGHT_FD`), if any.
    inflight: RwLock<Option<Arc<InflightRegion>>>,
    /// Request and vring-stop statistics, when kept.
    stats: Option<DeviceStats>,
    /// Per queue: its first request since the vring started, timed.
    first_request: Vec<handover::FirstRequest>,
}

fn serial_of(array: &Array) -> [u8; ID_LEN] {
    let hex: String = array.uuid.mdadm().chars().filter(|c| *c != ':').collect();
    let mut s = [0u8; ID_LEN];
    for (d, b) in s.iter_mut().zip(hex.bytes()) {
        *d = b;
    }
    s
}

impl BlockBackend {
    /// A device for `array`, each queue with its I/O (io_uring where the kernel
    /// has it; see [`AsyncIo::new`]).
    pub fn new(array: Arc<Array>, config: BlockConfig) -> io::Result<BlockBackend> {
        let block_size = config.block_size;
        let queues_n = config.queues;
        let mut queues = Vec::with_capacity(config.queues);
        for _ in 0..config.queues {
            let io = AsyncIo::new(QUEUE_SIZE as u32)?;
            // Writes deferred behind a resync are retried when it moves on.
            array.bitmap.add_waker(io.waker()?);
            queues.push(Mutex::new(QueueState::new(io)));
        }
        Ok(BlockBackend {
            queues,
            stopped: (0..config.queues).map(|_| AtomicBool::new(false)).collect(),
            serial: serial_of(&array),
            array,
            config,
            limits: Limits {
                block_size,
                ..Limits::default()
            },
            event_idx: AtomicBool::new(false),
            log_all: AtomicBool::new(false),
            log_carrier: Mutex::new(LogCarrier::default()),
            writethrough: AtomicBool::new(false),
            mem: RwLock::new(None),
            mem_generation: AtomicU64::new(0),
            io_gate: RwLock::new(()),
            stopping: AtomicBool::new(false),
            completed: AtomicU64::new(0),
            writes_refused: AtomicU64::new(0),
            role: Arc::new(LocalGate::default()),
            started: Mutex::new(0),
            inflight: RwLock::new(None),
            stats: None,
            first_request: (0..queues_n).map(|_| Default::default()).collect(),
        })
    }

    /// Records the requests of every queue, and the vring stops, in `stats`.
    pub fn with_stats(mut self, stats: &DeviceStats) -> BlockBackend {
        for (i, q) in self.queues.iter().enumerate() {
            lock(q).set_stats(stats.queue(i as u16));
        }
        self.stats = Some(stats.clone());
        self
    }

    /// The statistics kept, if any (see [`BlockBackend::with_stats`]).
    pub fn stats(&self) -> Option<&DeviceStats> {
        self.stats.as_ref()
    }

    /// Uses `role` to decide whether this node may write (default: the array's
    /// only node, granted whenever taken).
    pub fn with_writer_gate(mut self, role: Arc<dyn WriterGate>) -> BlockBackend {
        self.role = role;
        self
    }

    /// This node's writer gate.
    pub fn writer_gate(&self) -> &dyn WriterGate {
        &*self.role
    }

    /// The front-end started queue `qi`: the first started queue takes the writer
    /// role (a read-only disk never does).
    fn take_writer_role(&self, qi: usize) {
        let start = std::time::Instant::now();
        self.set_stopped(qi, false);
        let bit = queue_bit(qi);
        let mut started = lock(&self.started);
        let mut took = None;
        if *started & bit == 0 {
            *started |= bit;
            if !self.config.read_only && self.role.idle() {
                self.role.take();
                took = Some((start.elapsed(), self.role.held()));
            }
        }
        drop(started);
        if let Some(f) = self.first_request.get(qi) {
            f.started(qi, start, took);
        }
    }

    /// Queue `qi` was stopped and its requests finished: once no queue runs and
    /// none has a request in flight, the writer role goes back, in the background:
    /// the front-end (a migration's source, its VM standing still) is answered
    /// without waiting for the lock manager; the next start waits for it instead.
    fn give_back_writer_role(&self, qi: usize) {
        let mut started = lock(&self.started);
        *started &= !queue_bit(qi);
        if *started != 0 {
            return;
        }
        // Stopped queues take no new request: this ends.
        for i in 0..self.queues.len() {
            self.wait_idle(i, "before giving the writer role back");
        }
        let start = std::time::Instant::now();
        self.role.give_back_soon();
        handover::log_role_given_back(start.elapsed());
    }

    /// Marks queue `qi` stopped or not. Stopping waits for the request its worker
    /// runs, if any: none runs after this (synchronous I/O included).
    fn set_stopped(&self, qi: usize, stopped: bool) {
        if let (Some(q), Some(flag)) = (self.queues.get(qi), self.stopped.get(qi)) {
            let _running = lock(q);
            flag.store(stopped, Ordering::SeqCst);
        }
    }

    /// The inflight buffer in use, if any.
    fn inflight_region(&self) -> Option<Arc<InflightRegion>> {
        self.inflight
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_inflight_region(&self, region: InflightRegion) {
        debug!("inflight buffer: {region:?}");
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(region));
    }

    /// The eventfd of queue `i`'s completions, to register with its worker's epoll.
    pub fn completion_fd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        self.queues.get(i).map(|q| lock(q).eventfd())
    }

    /// The epoll data value of completion events (past the queues and exit event).
    pub fn completion_event(&self) -> u64 {
        self.config.queues as u64 + 1
    }

    /// Waits until queue `i` has no request in flight, however long that takes
    /// (a leg that stopped answering, writes held by another node's resync): a
    /// request given up on could still land after another node took over. Says
    /// every few seconds what it waits for (`why`).
    fn wait_idle(&self, i: usize, why: &str) {
        let start = std::time::Instant::now();
        let mut next_warning = STILL_WAITING_EVERY;
        loop {
            let busy = self.queues.get(i).map(|q| lock(q).in_flight()).unwrap_or(0);
            if busy == 0 {
                if start.elapsed() >= STILL_WAITING_EVERY {
                    info!(
                        "queue {i}: the last request in flight ended after {:.1} s",
                        start.elapsed().as_secs_f64()
                    );
                }
                return;
            }
            if start.elapsed() >= next_warning {
                warn!(
                    "queue {i}: {why}: still waiting for requests in flight ({busy}) after {} s",
                    next_warning.as_secs()
                );
                next_warning += STILL_WAITING_EVERY;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// After the front-end went away: finishes every request still in flight on the
    /// legs (nobody is left to tell) and forgets its dirty log.
    pub fn abandon_in_flight(&self) {
        self.log_all.store(false, Ordering::SeqCst);
        lock(&self.log_carrier).clear();
        for (q, stopped) in self.queues.iter().zip(&self.stopped) {
            // Waits for the request a worker runs; no other starts after this.
            let mut s = lock(q);
            stopped.store(true, Ordering::SeqCst);
            // No time limit: the role must not go while one of ours is on a leg.
            if let Err(e) = s.drain(&self.array) {
                warn!("draining in-flight I/O: {e}");
            }
            let n = s.forget_finished();
            if n > 0 {
                warn!("{n} requests finished after the front-end left");
            }
        }
        // Their heads stay marked in the inflight buffer: the front-end hands it to
        // the next connection, which resubmits them. This one no longer uses it.
        *self.inflight.write().unwrap_or_else(|e| e.into_inner()) = None;
        // Nothing of ours is in flight any more: another node may write.
        *lock(&self.started) = 0;
        self.role.give_back();
        // Unmap the departed front-end's memory now: when it was the last user of a
        // VM's RAM (the VM is gone), unmapping frees that RAM, which takes a while;
        // done later it would delay the next front-end's memory table (e.g. a VM
        // migrating back to this node, during its downtime).
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.mem_generation.fetch_add(1, Ordering::Release);
    }

    /// The memory table as it is now, and its generation.
    fn current_memory(&self) -> io::Result<Snapshot> {
        // The generation first: a table newer than it is only read again later.
        let generation = self.mem_generation.load(Ordering::Acquire);
        let mem = self
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("no guest memory"))?;
        Ok(Snapshot {
            generation,
            mem: mem.memory().into_inner(),
        })
    }

    /// Whether the memory table changed since `snapshot` was taken. Asked after a
    /// request was taken from the ring: a front-end adds a region (ADD_MEM_REG),
    /// waits for its reply, and only then makes a request in that region
    /// available, so a request seen in the ring after the reply was sent is seen
    /// with the new generation.
    fn memory_changed(&self, snapshot: &Snapshot) -> bool {
        self.mem_generation.load(Ordering::Acquire) != snapshot.generation
    }

    /// The serial number GET_ID returns.
    pub fn serial(&self) -> [u8; ID_LEN] {
        self.serial
    }

    /// Stops taking requests and waits until no request is running. Requests still
    /// in the rings stay there.
    pub fn drain(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        drop(self.io_gate.write().unwrap_or_else(|e| e.into_inner()));
        // Each worker looks at its deferred writes once more: on a fenced node they
        // fail (see `Array::submit_write`) rather than wait for a resync window
        // nobody will lift.
        for q in &self.queues {
            if let Ok(waker) = lock(q).waker() {
                let _ = waker.write(1);
            }
        }
        for i in 0..self.queues.len() {
            self.wait_idle(i, "shutting down");
        }
    }

    /// The `virtio_blk_config` bytes.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = super::wire::BlkConfig::default();
        let v = &mut c.0;
        v.capacity = self.array.size.to_le();
        v.size_max = SIZE_MAX.to_le();
        v.seg_max = SEG_MAX.to_le();
        v.blk_size = self.config.block_size.to_le();
        // Topology: physical block exponent 0 (physical = logical blocks), no
        // alignment offset, minimum I/O one logical block.
        v.physical_block_exp = 0;
        v.min_io_size = 1u16.to_le();
        v.wce = u8::from(!self.writethrough.load(Ordering::Relaxed));
        v.num_queues = (self.config.queues as u16).to_le();
        v.max_discard_sectors = self.limits.max_discard_sectors.to_le();
        v.max_discard_seg = self.limits.max_discard_seg.to_le();
        v.discard_sector_alignment = (self.config.block_size / 512).to_le();
        v.max_write_zeroes_sectors = self.limits.max_write_zeroes_sectors.to_le();
        v.max_write_zeroes_seg = self.limits.max_write_zeroes_seg.to_le();
        v.write_zeroes_may_unmap = 1;
        c.offered()
    }

    fn context(&self) -> Context<'_> {
        Context {
            array: &self.array,
            read_only: self.config.read_only,
            // A fenced node (lock manager lost, another host's heartbeat on the
            // legs) writes nothing, whatever its role said.
            not_writer: !self.role.held() || self.array.is_fenced(),
            refused: Some(&self.writes_refused),
            writethrough: self.writethrough.load(Ordering::Relaxed),
            serial: self.serial,
            limits: self.limits,
        }
    }
}

/// Queue `qi`'s bit in a mask of queues (queues are fewer than 64).
fn queue_bit(qi: usize) -> u64 {
    u32::try_from(qi)
        .ok()
        .and_then(|q| 1u64.checked_shl(q))
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.config.queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.config.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn acked_features(&self, features: u64) {
        debug!("guest acked features {features:#x}");
        // VHOST_F_LOG_ALL on: mark the guest pages we write in the log SET_LOG_BASE
        // shares; off: stop marking (the log may stay mapped).
        let on = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.log_all.swap(on, Ordering::SeqCst) != on {
            info!("dirty-page logging {}", if on { "on" } else { "off" });
        }
        if let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            dirty::set_logging(&mem.memory(), on);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let (o, s) = (offset as usize, size as usize);
        match o.checked_add(s) {
            Some(end) if end <= c.len() => c[o..end].to_vec(),
            _ => vec![0; s],
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `writeback` (offset 32) is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset == 32 && buf.len() == 1 {
            let wt = buf[0] == 0;
            info!(
                "guest set the write cache to {}",
                if wt { "writethrough" } else { "writeback" }
            );
            self.writethrough.store(wt, Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("config offset {offset} length {} is read-only", buf.len()),
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // New regions log into the log the previous ones had (QEMU keeps it across
        // memory-table changes), and only while VHOST_F_LOG_ALL is acked.
        let snapshot = mem.memory().into_inner();
        dirty::set_logging(&snapshot, self.log_all.load(Ordering::SeqCst));
        lock(&self.log_carrier).carry(snapshot);
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        self.mem_generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queues).map(|i| 1u64 << i).collect()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring takes no more requests, and every request in
        // flight ends first, with no time limit (as QEMU's own drain waits): a
        // request given up on could land after a migration destination's writes,
        // and a read ending later would write guest memory and the used ring after
        // the front-end took the ring back. Then the writer role goes back once no
        // queue runs: the destination takes it when its front-end starts the vrings.
        let qi = queue_index as usize;
        let start = std::time::Instant::now();
        let in_flight = self
            .queues
            .get(qi)
            .map(|q| lock(q).in_flight())
            .unwrap_or(0);
        self.set_stopped(qi, true);
        self.wait_idle(qi, "GET_VRING_BASE");
        if let Some(f) = self.first_request.get(qi) {
            f.stopped();
        }
        handover::log_stop(qi, start.elapsed(), in_flight);
        if let Some(s) = &self.stats {
            s.vring_stopped(start.elapsed());
        }
        self.give_back_writer_role(qi);
        Ok(())
    }

    fn get_inflight_fd(
        &self,
        msg: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, std::fs::File)> {
        let (reply, file, region) = inflight::get_inflight_fd(msg, self.config.queues)?;
        self.set_inflight_region(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: std::fs::File) -> io::Result<()> {
        let region = inflight::set_inflight_fd(msg, &file, self.config.queues)?;
        self.set_inflight_region(region);
        Ok(())
    }

    fn vring_started(&self, queue_index: u32, vring: &Vring) -> io::Result<()> {
        // Before the ring's first request (resubmitted inflight ones included): a
        // migration destination takes the writer role here, and a source resumed
        // after its migration completed is refused it.
        self.take_writer_role(queue_index as usize);
        let Some(region) = self.inflight_region() else {
            return Ok(());
        };
        let mem = self.current_memory()?.mem;
        let mut state = vring.get_mut();
        inflight::start_vring(&region, queue_index as usize, &mut state, &*mem).map(|_| ())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        if u64::from(device_event) == self.completion_event() {
            let Some(vring) = vrings.first() else {
                return Ok(());
            };
            return self.handle_completions(thread_id, vring);
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        let gate = self.io_gate.read().unwrap_or_else(|e| e.into_inner());
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            // The memory table as it is now, at every pass (and again when it
            // changes while the pass takes requests: see `process_queue`).
            let mem = self.current_memory()?;
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            if self.process_queue(thread_id, vring, mem)? {
                vring.signal_used_queue()?;
            }
            if !event_idx
                || !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                break;
            }
        }
        drop(gate);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
