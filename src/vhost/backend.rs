//! The `VhostUserBackend` implementation: what the device offers, its config space,
//! and the per-queue workers.

use super::request::{self, Context, Limits, ID_LEN};
use crate::raid1::Array;
use log::{debug, info, warn};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest memory with a dirty bitmap (for live-migration logging).
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// The atomic handle the daemon updates on SET_MEM_TABLE / ADD_MEM_REG.
pub type GuestMem = GuestMemoryAtomic<Mem>;
/// A vring.
pub type Vring = VringRwLock<GuestMem>;

/// Largest queue the device accepts.
pub const QUEUE_SIZE: usize = 1024;
/// Data segments per request (`seg_max`), as the queue size allows.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest segment (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;

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
    writethrough: AtomicBool,
    mem: RwLock<Option<GuestMem>>,
    /// Held shared by a worker while it runs requests; taken exclusively to drain.
    io_gate: RwLock<()>,
    stopping: AtomicBool,
    /// Requests completed, for status.
    pub completed: AtomicU64,
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
    /// A device for `array`.
    pub fn new(array: Arc<Array>, config: BlockConfig) -> BlockBackend {
        BlockBackend {
            serial: serial_of(&array),
            array,
            config,
            limits: Limits::default(),
            event_idx: AtomicBool::new(false),
            writethrough: AtomicBool::new(false),
            mem: RwLock::new(None),
            io_gate: RwLock::new(()),
            stopping: AtomicBool::new(false),
            completed: AtomicU64::new(0),
        }
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
    }

    /// The `virtio_blk_config` bytes.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put32 =
            |c: &mut Vec<u8>, off: usize, v: u32| c[off..off + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&self.array.size.to_le_bytes());
        put32(&mut c, 8, SIZE_MAX);
        put32(&mut c, 12, SEG_MAX);
        put32(&mut c, 20, self.config.block_size);
        // topology: physical block exponent, alignment offset, min/opt io size.
        let exp = (self.config.block_size / 512).trailing_zeros() as u8;
        c[24] = exp;
        c[26..28].copy_from_slice(&1u16.to_le_bytes());
        c[32] = u8::from(!self.writethrough.load(Ordering::Relaxed));
        c[34..36].copy_from_slice(&(self.config.queues as u16).to_le_bytes());
        let sectors_per_block = self.config.block_size / 512;
        put32(&mut c, 36, self.limits.max_discard_sectors);
        put32(&mut c, 40, self.limits.max_discard_seg);
        put32(&mut c, 44, sectors_per_block);
        put32(&mut c, 48, self.limits.max_write_zeroes_sectors);
        put32(&mut c, 52, self.limits.max_write_zeroes_seg);
        c[56] = 1;
        c
    }

    /// Runs every available request of `vring`; returns whether to signal the guest.
    fn process_queue(&self, vring: &Vring, mem: &Mem) -> io::Result<bool> {
        let ctx = Context {
            array: &self.array,
            read_only: self.config.read_only,
            writethrough: self.writethrough.load(Ordering::Relaxed),
            serial: self.serial,
            limits: self.limits,
        };
        let mut used_any = false;
        let mut state = vring.get_mut();
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            let used = request::process(&ctx, mem, &descs);
            state
                .add_used(head, used)
                .map_err(|e| io::Error::other(format!("add_used: {e:?}")))?;
            self.completed.fetch_add(1, Ordering::Relaxed);
            used_any = true;
        }
        if !used_any {
            return Ok(false);
        }
        if self.event_idx.load(Ordering::Relaxed) {
            state
                .needs_notification()
                .map_err(|e| io::Error::other(format!("needs_notification: {e:?}")))
        } else {
            Ok(true)
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = BitmapMmapRegion;
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
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.config.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn acked_features(&self, features: u64) {
        debug!("guest acked features {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
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
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            warn!("event for unknown queue {device_event}");
            return Ok(());
        };
        let gate = self.io_gate.read().unwrap_or_else(|e| e.into_inner());
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mem = self
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| io::Error::other("no guest memory"))?;
        let mem = mem.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            if self.process_queue(vring, &mem)? {
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
