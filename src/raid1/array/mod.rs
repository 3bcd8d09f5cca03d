//! An assembled mirror: its members and their states (here), and by concern in
//! the submodules: assembly (`assemble`), leg failures and superblock updates
//! (`superblocks`), the synchronous I/O paths (`paths`), other nodes' bitmaps,
//! resync and recovery (`recovery`). The asynchronous paths are `raid1::aio`,
//! the operator's changes `raid1::manage`.

mod assemble;
mod paths;
mod recovery;
mod seam;
mod superblocks;

use super::metadata::{LegMetadata, MetaError};
use crate::bitmap::{BitmapStore, WriteIntent};
use crate::md::superblock::{feature, role, Superblock};
use crate::md::{Uuid, MAX_SECTOR};
use crate::storage::{Fence, Leg};
use arc_swap::ArcSwap;
use log::{error, info, warn};
use serde::Serialize;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use super::port::MetadataSync;

/// State of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LegState {
    /// Holds a complete copy; reads may go here.
    InSync,
    /// Receives writes and is being rebuilt; never read.
    Recovering,
    /// Failed: no I/O goes here.
    Faulty,
}

impl LegState {
    fn from_u8(v: u8) -> LegState {
        match v {
            0 => LegState::InSync,
            1 => LegState::Recovering,
            _ => LegState::Faulty,
        }
    }
}

/// One leg in a mirror slot.
pub struct Member {
    /// The leg.
    pub leg: Arc<dyn Leg>,
    /// Index in `dev_roles[]`.
    pub dev_number: u32,
    /// Per-device uuid.
    pub device_uuid: Uuid,
    /// Sector where data starts on this leg.
    pub data_offset: u64,
    /// Sectors usable for data on this leg.
    pub data_size: u64,
    pub(super) state: AtomicU8,
    pub(super) inflight: AtomicU64,
    /// Where the last read this leg served ended (sequential streams stay here).
    pub(super) next_seq: AtomicU64,
    /// The events this leg's superblock had when it joined (re-add decisions).
    pub joined_events: u64,
    /// Another node rebuilds this leg: we write it but never declare it in sync.
    pub(super) remote_recovery: AtomicBool,
    /// The node slot that rebuilds it, when told ([`NOBODY`]: not known).
    pub(super) rebuilt_by: std::sync::atomic::AtomicU32,
    /// Its rebuild copies only chunks dirty in the bitmaps (a re-add), recorded
    /// as RECOVERY_BITMAP; otherwise the whole array is copied.
    pub(crate) bitmap_guided: AtomicBool,
    /// A re-add has not yet marked every chunk the leg lacks (the other nodes'
    /// are gathered after the metadata update): it is not declared in sync.
    pub(super) gathering: AtomicBool,
}

impl Member {
    /// Current state.
    pub fn state(&self) -> LegState {
        LegState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub(super) fn set_state(&self, s: LegState) -> LegState {
        LegState::from_u8(self.state.swap(s as u8, Ordering::AcqRel))
    }

    pub(super) fn byte_offset(&self, sector: u64) -> u64 {
        (self.data_offset + sector) * 512
    }

    /// The leg's name.
    pub fn name(&self) -> &str {
        self.leg.name()
    }
}

/// Why an array could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A leg's metadata is unreadable or invalid.
    #[error("leg {leg}: {source}")]
    Leg {
        /// The leg.
        leg: String,
        /// What is wrong.
        #[source]
        source: MetaError,
    },
    /// A leg belongs to another array.
    #[error("leg {leg} belongs to array {found}, not to array {expected} of leg {first}")]
    OtherArray {
        /// The leg.
        leg: String,
        /// Its uuid.
        found: Uuid,
        /// The uuid of the first leg.
        expected: Uuid,
        /// The first leg.
        first: String,
    },
    /// Two legs claim the same device number.
    #[error("legs {a} and {b} both have dev_number {dev}: the same leg given twice?")]
    Duplicate {
        /// One leg.
        a: String,
        /// The other.
        b: String,
        /// The number.
        dev: u32,
    },
    /// No leg holds a complete copy.
    #[error("no in-sync leg: {0}")]
    NoInSyncLeg(String),
}

/// Array-wide superblock state, changed only under its mutex.
pub(super) struct Meta {
    /// The freshest superblock (common fields); per-leg fields are filled on write.
    pub(super) sb: Superblock,
    /// dev_numbers that once were in this array but are faulty.
    pub(super) faulty: Vec<u32>,
}

/// Counters for status and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes copied by resync and recovery.
    pub resync_bytes: AtomicU64,
    /// Reads that failed on one leg and were served by another.
    pub read_retries: AtomicU64,
    /// Resync and recovery copy at most this many bytes per second (0: no limit).
    pub resync_max_rate: AtomicU64,
}

/// `Member::rebuilt_by` when the rebuilding node is not known.
pub const NOBODY: u32 = u32::MAX;

/// An assembled RAID1.
pub struct Array {
    /// Array uuid.
    pub uuid: Uuid,
    /// Array size in sectors.
    pub size: u64,
    /// Whether the bitmap is clustered (md-cluster).
    pub clustered: bool,
    /// The node slot whose bitmap this node writes.
    pub own_slot: u32,
    /// Mirror slots (index = role); `None` = missing.
    pub(super) members: ArcSwap<Vec<Option<Arc<Member>>>>,
    pub(super) meta: Mutex<Meta>,
    /// This node's write-intent bitmap.
    pub bitmap: WriteIntent,
    /// Leg failures seen (a leg turned faulty), counted.
    failures_seen: AtomicU64,
    /// `failures_seen` as it was when the last superblock update that succeeded
    /// began: every failure up to it is on disk.
    failures_recorded: AtomicU64,
    /// Serialises leg failures (the last in-sync leg is never failed).
    failing: Mutex<()>,
    next_read: AtomicUsize,
    /// Reads go to the first in-sync leg only (a peer node left and its dirty bits
    /// are not merged into ours yet).
    balancing_suspended: AtomicBool,
    /// Legs that belong to the array but are not in a slot (left out or removed).
    pub(super) detached: Mutex<Vec<Arc<Member>>>,
    /// Serialises chunk copies against legs joining a recovery; counts the legs
    /// that joined (a chunk copy that let it go meanwhile starts the chunk again).
    pub(super) recovery: Mutex<u64>,
    /// Serialises operator changes (fail, remove, re-add, add): each checks the
    /// legs' states before it changes them.
    pub(super) manage: Mutex<()>,
    /// The process is stopping: resync passes end, and a throttled copy stops waiting.
    resync_halted: AtomicBool,
    /// `resync_halted` for threads that wait for it (the bitmap daemon).
    pub(super) halt: (Mutex<bool>, std::sync::Condvar),
    /// How superblock updates are coordinated with other nodes (none: alone).
    pub(super) metadata_sync: Mutex<Option<Arc<dyn MetadataSync>>>,
    /// Devices another node is adding, found here by their uuid; the metadata
    /// update that gives one a role puts it into its slot.
    pub(super) candidates: Mutex<Vec<Arc<Member>>>,
    /// Ranges a leg failed to read, to be rewritten from another leg while no
    /// write runs there ([`Array::run_repairs`]).
    repairs: Mutex<Vec<(Arc<Member>, u64, u64)>>,
    /// Counters.
    pub counters: Counters,
    /// Raised when this node may no longer write (see [`Fence`]).
    fence: std::sync::OnceLock<Arc<Fence>>,
    /// Records leg failures for the I/O workers (cluster nodes).
    settler: Arc<super::settle::Settler>,
}

/// How long an idle background thread of the array (bitmap flusher, settler)
/// sleeps before it looks again unasked: it is woken when it has work, and when
/// the array is dropped. Hundreds of idle arrays on a host cost no CPU.
pub(crate) const IDLE_BACKSTOP: std::time::Duration = std::time::Duration::from_secs(30);

/// How long the bitmap flusher waits before it tries a failed bitmap write again
/// (unless asked again meanwhile).
const FAILED_FLUSH_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

impl Drop for Array {
    fn drop(&mut self) {
        // Their threads hold no reference while idle: they see the array gone.
        self.bitmap.flush_bell().ring();
        self.settler.wake();
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What assembly decided about the legs it was given.
#[derive(Default)]
pub struct AssembleReport {
    /// Legs left out, with the reason (one line each).
    pub left_out: Vec<String>,
    /// The legs left out (faulty or stale), kept for a later re-add.
    pub left_out_legs: Vec<Arc<Member>>,
    /// Chunks that need a resync.
    pub needed_chunks: u64,
}

impl Array {
    /// A snapshot of the mirror slots.
    pub fn members(&self) -> Arc<Vec<Option<Arc<Member>>>> {
        self.members.load_full()
    }

    /// Number of in-sync legs.
    pub fn in_sync_count(&self) -> usize {
        self.in_sync().len()
    }

    /// Legs a resync would copy to (non-faulty legs besides the source).
    pub fn copy_targets(&self) -> usize {
        self.writable().len().saturating_sub(1)
    }

    /// Keeps legs that belong to the array but have no slot (for re-add).
    pub fn set_detached(&self, legs: Vec<Arc<Member>>) {
        lock(&self.detached).extend(legs);
    }

    /// Names of the detached legs.
    pub fn detached(&self) -> Vec<Arc<Member>> {
        lock(&self.detached).clone()
    }

    pub(super) fn in_sync(&self) -> Vec<Arc<Member>> {
        self.members()
            .iter()
            .flatten()
            .filter(|m| m.state() == LegState::InSync)
            .cloned()
            .collect()
    }

    pub(super) fn writable(&self) -> Vec<Arc<Member>> {
        self.members()
            .iter()
            .flatten()
            .filter(|m| m.state() != LegState::Faulty)
            .cloned()
            .collect()
    }

    /// True when some mirror slot lacks an in-sync leg.
    pub fn is_degraded(&self) -> bool {
        self.members()
            .iter()
            .any(|m| m.as_ref().is_none_or(|m| m.state() != LegState::InSync))
    }

    /// Tells the bitmap whether bits must be kept (any slot not in sync) and whether
    /// writes miss a mirror slot (then they stay needed for a later re-add).
    pub(super) fn update_bitmap_state(&self) {
        let members = self.members();
        let incomplete_writes = members
            .iter()
            .any(|m| m.as_ref().is_none_or(|m| m.state() == LegState::Faulty));
        self.bitmap.set_state(self.is_degraded(), incomplete_writes);
    }

    /// The current events counter.
    pub fn events(&self) -> u64 {
        lock(&self.meta).sb.events
    }

    /// A copy of the array's current superblock (common fields).
    pub fn superblock(&self) -> Superblock {
        lock(&self.meta).sb.clone()
    }

    /// Has every superblock update go through `sync` (cluster: under the token,
    /// announced to the other nodes).
    pub fn set_metadata_sync(&self, sync: Arc<dyn MetadataSync>) {
        *lock(&self.metadata_sync) = Some(sync);
    }

    /// Whether superblock updates are coordinated with other nodes.
    pub fn is_cluster_node(&self) -> bool {
        lock(&self.metadata_sync).is_some()
    }

    pub(super) fn check_range(&self, sector: u64, bytes: u64) -> io::Result<u64> {
        let sectors = bytes.div_ceil(512);
        match sector.checked_add(sectors) {
            Some(end) if end <= self.size && bytes % 512 == 0 => Ok(sectors),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{bytes} bytes at sector {sector} lie outside the {}-sector array",
                    self.size
                ),
            )),
        }
    }

    /// Ties the array to the fence its legs are wrapped in (once).
    pub fn set_fence(&self, fence: Arc<Fence>) {
        let _ = self.fence.set(fence);
    }

    /// Whether this node is fenced: it must write nothing (guest writes are
    /// refused, resync and bitmap clearing wait).
    pub fn is_fenced(&self) -> bool {
        self.fence.get().is_some_and(|f| f.is_fenced())
    }

    /// Why this node is fenced, if it is.
    pub fn fence_reason(&self) -> Option<String> {
        self.fence.get().and_then(|f| f.reason()).map(|(w, _)| w)
    }

    /// Suspends read balancing (every read goes to the first in-sync leg) or resumes
    /// it: while a peer node is gone but its dirty bits are not yet ours, the legs
    /// may differ where it was writing, and balancing could show a reader both.
    pub fn suspend_read_balancing(&self, on: bool) {
        if self.balancing_suspended.swap(on, Ordering::Relaxed) != on {
            if on {
                info!(
                    "read balancing suspended: a node left before its dirty chunks were taken over"
                );
            } else {
                info!("read balancing resumed");
            }
        }
    }

    /// Whether read balancing is suspended.
    pub fn read_balancing_suspended(&self) -> bool {
        self.balancing_suspended.load(Ordering::Relaxed)
    }

    /// Why a request whose I/O failed on some leg fails as a whole, when that is
    /// because this node is fenced: [`Array::fail`] fails no leg then, so the
    /// legs that took the request differ from those that refused it.
    pub(crate) fn refused_by_fence(&self) -> Option<String> {
        self.is_fenced().then(|| {
            format!(
                "this node is fenced ({}): the request reached only some legs",
                self.fence_reason().unwrap_or_default()
            )
        })
    }

    /// Whether a leg failure is not in the superblocks yet.
    pub(crate) fn failure_unrecorded(&self) -> bool {
        self.failures_recorded.load(Ordering::Acquire) < self.failures_seen.load(Ordering::Acquire)
    }

    /// Leg failures seen so far (a request that saw one waits until this many
    /// are recorded).
    pub(crate) fn failures_seen(&self) -> u64 {
        self.failures_seen.load(Ordering::Acquire)
    }

    pub(crate) fn settler(&self) -> &Arc<super::settle::Settler> {
        &self.settler
    }

    /// Has a thread of its own write the bitmap bits that asynchronous writes wait
    /// for, so that a queue worker goes on with other requests meanwhile (see
    /// `bitmap::flusher`). The thread ends once the array is dropped.
    pub fn flush_bitmap_in_background(self: &Arc<Self>) -> io::Result<()> {
        if self.bitmap.flushes_in_background() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        let bell = self.bitmap.flush_bell();
        std::thread::Builder::new()
            .name("bitmap-flush".into())
            .spawn(move || loop {
                let Some(array) = weak.upgrade() else {
                    return;
                };
                if array.bitmap.flush_idle() {
                    // Idle: waits without holding the array, which rings the bell
                    // when it is dropped.
                    drop(array);
                    bell.wait(IDLE_BACKSTOP);
                    continue;
                }
                if let Err(e) = array.bitmap.serve_flush(&*array, std::time::Duration::ZERO) {
                    warn!("bitmap write for waiting writes: {e}");
                    // The writes waiting for it failed; what asked stays asked:
                    // tried again after a pause, or at once when asked again.
                    drop(array);
                    bell.wait(FAILED_FLUSH_PAUSE);
                }
            })?;
        self.bitmap.set_flusher(true);
        Ok(())
    }

    /// How the record of the first `seen` leg failures ended (`None`: not yet).
    pub(crate) fn settle_outcome(&self, seen: u64) -> Option<io::Result<()>> {
        self.settler
            .outcome(seen, self.failures_recorded.load(Ordering::Acquire))
    }
}

impl BitmapStore for Array {
    fn write_bitmap(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let mut ok = 0;
        let mut last = None;
        let legs = self.writable();
        let write = |m: &Arc<Member>| m.leg.write_at(data, off).and_then(|()| m.leg.flush());
        // The legs' writes and syncs run side by side: the writes parked for these
        // bits wait for the slowest leg, not for the sum of them.
        let results: Vec<io::Result<()>> = match legs.split_first() {
            Some((first, rest)) if !rest.is_empty() => std::thread::scope(|s| {
                let others: Vec<_> = rest
                    .iter()
                    .map(|m| {
                        let t = std::thread::Builder::new().name("bitmap-leg".into());
                        (m, t.spawn_scoped(s, move || write(m)))
                    })
                    .collect();
                let mut results = vec![write(first)];
                for (m, t) in others {
                    results.push(match t {
                        Ok(t) => t.join().unwrap_or_else(|_| {
                            Err(io::Error::other("the bitmap write's thread panicked"))
                        }),
                        // No thread to be had: this one writes it.
                        Err(_) => write(m),
                    });
                }
                results
            }),
            _ => legs.iter().map(write).collect(),
        };
        for (m, r) in legs.into_iter().zip(results) {
            match r {
                Ok(()) => {
                    if m.state() == LegState::InSync {
                        ok += 1;
                    }
                }
                Err(e) => {
                    self.fail(&m, &format!("bitmap write failed: {e}"));
                    last = Some(e);
                }
            }
        }
        if ok == 0 {
            return Err(last.unwrap_or_else(|| io::Error::other("no in-sync leg for the bitmap")));
        }
        Ok(())
    }

    fn flush_data(&self) -> io::Result<()> {
        let mut ok = 0;
        for m in self.writable() {
            match m.leg.flush() {
                Ok(()) => ok += 1,
                Err(e) => self.fail(&m, &format!("flush failed: {e}")),
            }
        }
        if ok == 0 {
            return Err(io::Error::other("no leg could flush"));
        }
        Ok(())
    }
}

pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod background_tests;
#[cfg(test)]
mod tests;
