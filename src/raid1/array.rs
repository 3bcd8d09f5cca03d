//! An assembled mirror: its members, their states, superblock updates and the
//! read/write/flush paths.

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
    /// Serialises chunk copies against legs joining a recovery.
    pub(super) recovery: Mutex<()>,
    /// Serialises operator changes (fail, remove, re-add, add): each checks the
    /// legs' states before it changes them.
    pub(super) manage: Mutex<()>,
    /// The process is stopping: resync passes end, and a throttled copy stops waiting.
    resync_halted: AtomicBool,
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
    /// Assembles a mirror from `legs` (in any order), like `mdadm --assemble`:
    /// refuses legs of another array, leaves out stale and faulty legs, and marks
    /// every chunk dirty in any bitmap slot as needing a resync.
    pub fn assemble(legs: Vec<Arc<dyn Leg>>) -> Result<(Array, AssembleReport), AssembleError> {
        Self::assemble_as(legs, 0)
    }

    /// As [`Array::assemble`], writing this node's bitmap in node slot `own_slot`.
    pub fn assemble_as(
        legs: Vec<Arc<dyn Leg>>,
        own_slot: u32,
    ) -> Result<(Array, AssembleReport), AssembleError> {
        let mut loaded = Vec::new();
        for leg in legs {
            let meta = LegMetadata::load(&*leg).map_err(|source| AssembleError::Leg {
                leg: leg.name().to_string(),
                source,
            })?;
            if let Err(source) = meta.sb.check_raid1() {
                return Err(AssembleError::Leg {
                    leg: leg.name().to_string(),
                    source: source.into(),
                });
            }
            loaded.push((leg, meta));
        }
        let Some((first_leg, first)) = loaded.first() else {
            return Err(AssembleError::NoInSyncLeg("no legs given".into()));
        };
        let uuid = first.sb.set_uuid;
        for (leg, m) in &loaded {
            if m.sb.set_uuid != uuid {
                return Err(AssembleError::OtherArray {
                    leg: leg.name().to_string(),
                    found: m.sb.set_uuid,
                    expected: uuid,
                    first: first_leg.name().to_string(),
                });
            }
        }
        for (i, (a, ma)) in loaded.iter().enumerate() {
            for (b, mb) in &loaded[..i] {
                if ma.sb.dev_number == mb.sb.dev_number {
                    return Err(AssembleError::Duplicate {
                        a: b.name().to_string(),
                        b: a.name().to_string(),
                        dev: ma.sb.dev_number,
                    });
                }
            }
        }
        // The freshest superblock decides the roles.
        let newest = loaded
            .iter()
            .max_by_key(|(_, m)| m.sb.events)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| AssembleError::NoInSyncLeg("no legs".into()))?;
        let sb = newest.sb.clone();
        let mut report = AssembleReport::default();
        let mut slots: Vec<Option<Arc<Member>>> = vec![None; sb.raid_disks as usize];
        let mut faulty = Vec::new();
        for (leg, m) in &loaded {
            let name = leg.name().to_string();
            let r = sb
                .dev_roles
                .get(m.sb.dev_number as usize)
                .copied()
                .unwrap_or(role::SPARE);
            let recovering = m.sb.feature_map & feature::RECOVERY_OFFSET != 0
                && m.sb.recovery_offset != MAX_SECTOR;
            let member = |state: LegState| {
                Arc::new(Member {
                    leg: leg.clone(),
                    dev_number: m.sb.dev_number,
                    device_uuid: m.sb.device_uuid,
                    data_offset: m.sb.data_offset,
                    data_size: m.sb.data_size,
                    state: AtomicU8::new(state as u8),
                    inflight: AtomicU64::new(0),
                    next_seq: AtomicU64::new(u64::MAX),
                    joined_events: m.sb.events,
                    remote_recovery: AtomicBool::new(false),
                    rebuilt_by: std::sync::atomic::AtomicU32::new(NOBODY),
                    bitmap_guided: AtomicBool::new(
                        m.sb.feature_map & feature::RECOVERY_BITMAP != 0,
                    ),
                    gathering: AtomicBool::new(false),
                })
            };
            let why = if r == role::FAULTY {
                Some(format!(
                    "marked faulty in the array's superblock (events {}); re-add it to resync",
                    sb.events
                ))
            } else if u32::from(r) >= sb.raid_disks {
                Some("has no role in the array (spare); add it to use it".to_string())
            } else if m.sb.events + 1 < sb.events {
                Some(format!(
                    "events {} is behind {} (stale); re-add it to resync",
                    m.sb.events, sb.events
                ))
            } else if slots[r as usize].is_some() {
                Some(format!("role {r} is already taken by another leg"))
            } else {
                None
            };
            match why {
                Some(why) => {
                    report.left_out.push(format!("leg {name}: {why}"));
                    if r != role::SPARE && !faulty.contains(&m.sb.dev_number) {
                        faulty.push(m.sb.dev_number);
                    }
                    report.left_out_legs.push(member(LegState::Faulty));
                }
                None => {
                    let state = if recovering {
                        LegState::Recovering
                    } else {
                        LegState::InSync
                    };
                    slots[r as usize] = Some(member(state));
                }
            }
        }
        if !slots
            .iter()
            .flatten()
            .any(|m| m.state() == LegState::InSync)
        {
            return Err(AssembleError::NoInSyncLeg(report.left_out.join("; ")));
        }
        // This node's bitmap is slot 0; with one node, every other slot is free:
        // its dirty bits are merged into ours and resynced.
        let Some(own) = newest.bitmaps.get(own_slot as usize) else {
            return Err(AssembleError::NoInSyncLeg(format!(
                "node slot {own_slot} does not exist: the array has {} bitmap slots",
                newest.bitmaps.len()
            )));
        };
        let slot_offset = newest.bitmaps[0]
            .sb
            .geometry()
            .slot_offset(sb.super_offset, sb.bitmap_offset, own_slot)
            .unwrap_or(8192);
        // Our slot's bits on every leg in service together, as for another node's
        // slot (`merge_slot`): our previous run may have stopped while a bitmap
        // write had reached some legs only, and the writes under those bits may
        // have reached some legs too.
        let mut bits = own.bits.clone();
        for (leg, m) in &loaded {
            let in_slot = slots.iter().flatten().any(|s| Arc::ptr_eq(&s.leg, leg));
            if let Some(b) = m.bitmaps.get(own_slot as usize).filter(|_| in_slot) {
                if b.bits.chunks() == bits.chunks() {
                    bits.merge(&b.bits);
                }
            }
        }
        let bitmap = WriteIntent::new(own.sb.clone(), bits, slot_offset);
        if own.sb.state & crate::md::bitmap::state::STALE != 0 {
            warn!("bitmap is marked stale: the whole array will be resynced");
            bitmap.mark_all_needed();
        }
        let clustered = own.sb.is_clustered();
        let array = Array {
            uuid,
            size: sb.size,
            clustered,
            own_slot,
            members: ArcSwap::from_pointee(slots),
            meta: Mutex::new(Meta { sb, faulty }),
            bitmap,
            failures_seen: AtomicU64::new(0),
            failures_recorded: AtomicU64::new(0),
            settler: Arc::default(),
            failing: Mutex::new(()),
            next_read: AtomicUsize::new(0),
            balancing_suspended: AtomicBool::new(false),
            detached: Mutex::new(Vec::new()),
            recovery: Mutex::new(()),
            manage: Mutex::new(()),
            resync_halted: AtomicBool::new(false),
            metadata_sync: Mutex::new(None),
            candidates: Mutex::new(Vec::new()),
            repairs: Mutex::new(Vec::new()),
            counters: Counters::default(),
            fence: std::sync::OnceLock::new(),
        };
        // A leg being rebuilt (by this node before a crash, or by another node) is
        // rebuilt here too: a bitmap-guided rebuild from the bits (this node's are
        // kept until copied; a cluster node gathers the others'), a full one whole.
        if array
            .members()
            .iter()
            .flatten()
            .any(|m| m.state() == LegState::Recovering && !m.bitmap_guided.load(Ordering::Relaxed))
        {
            info!("a leg was being rebuilt completely: its recovery starts again");
            array.bitmap.mark_all_needed();
        }
        array.update_bitmap_state();
        report.needed_chunks = array.bitmap.stats().needed;
        for l in &report.left_out {
            warn!("{l}");
        }
        Ok((array, report))
    }

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

    /// Marks `m` faulty (no more I/O). The superblocks are updated by
    /// [`Array::settle_failures`], which every request runs before completing.
    ///
    /// Like md, the last in-sync leg is never failed: it stays in service (its
    /// data is the only copy, still readable where it is intact) and the request
    /// that failed on it fails (every caller fails a request that no in-sync leg
    /// completed).
    pub fn fail(&self, m: &Member, why: &dyn std::fmt::Display) {
        if self.is_fenced() {
            // The node may not write: the fence refused the I/O, not the leg.
            warn!("leg {}: {why} (not failed: this node is fenced)", m.name());
            return;
        }
        let guard = lock(&self.failing);
        if m.state() == LegState::Faulty {
            return;
        }
        let last = m.state() == LegState::InSync
            && self
                .in_sync()
                .iter()
                .all(|o| std::ptr::eq::<Member>(&**o, m));
        if last {
            drop(guard);
            error!(
                "leg {}: {why}; it is the last in-sync leg: kept in service, the request fails",
                m.name()
            );
            return;
        }
        m.set_state(LegState::Faulty);
        // Counted under the lock: a request that finds the leg faulty already
        // (above) also finds the failure counted, and waits for its record.
        self.failures_seen.fetch_add(1, Ordering::AcqRel);
        drop(guard);
        error!(
            "leg {}: {why}; marking it faulty, the array continues degraded",
            m.name()
        );
        self.update_bitmap_state();
    }

    /// Records failed legs in the superblocks of the survivors (events++). Returns an
    /// error only when no leg could record it.
    pub fn settle_failures(&self) -> io::Result<()> {
        // Not "is an update running": a request that saw a leg fail after another
        // request's update began must wait for an update that includes it, or it
        // could complete before the failure is on disk.
        let seen = self.failures_seen.load(Ordering::Acquire);
        if self.failures_recorded.load(Ordering::Acquire) >= seen {
            return Ok(());
        }
        self.update_superblocks(|_| {})
    }

    /// Rewrites every non-faulty leg's superblock after `change`, with events + 1,
    /// and this node's bitmap superblock before them.
    pub fn update_superblocks(&self, change: impl FnOnce(&mut Superblock)) -> io::Result<()> {
        let sync = lock(&self.metadata_sync).clone();
        let mut change = Some(change);
        let mut write = || {
            self.update_superblocks_local(|sb| {
                if let Some(c) = change.take() {
                    c(sb)
                }
            })
        };
        match sync {
            Some(sync) => sync.update(&mut write),
            None => write(),
        }
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

    /// The `dev_number` of the first leg with a role that is not faulty (what a
    /// METADATA_UPDATED names).
    pub fn first_good_dev(&self) -> Option<u32> {
        self.members()
            .iter()
            .flatten()
            .find(|m| m.state() != LegState::Faulty)
            .map(|m| m.dev_number)
    }

    /// Another node (in slot `from`, when known) rewrote the superblocks: re-reads
    /// them and applies what changed (legs it failed, legs it finished recovering,
    /// legs it put back to rebuild, the events counter).
    pub fn reload_superblocks(&self, from: Option<u32>) -> io::Result<()> {
        let mut meta = lock(&self.meta);
        let mut newest: Option<Superblock> = None;
        for m in self.members().iter().flatten() {
            if m.state() == LegState::Faulty {
                continue;
            }
            match super::metadata::read_superblock(&*m.leg) {
                Ok(sb) if sb.set_uuid == self.uuid => {
                    if sb.feature_map & feature::RECOVERY_OFFSET == 0
                        && m.state() == LegState::Recovering
                        && sb
                            .dev_roles
                            .get(m.dev_number as usize)
                            .is_some_and(|&r| r < role::MAX)
                    {
                        m.set_state(LegState::InSync);
                        m.remote_recovery.store(false, Ordering::Release);
                        info!("leg {}: another node finished its recovery", m.name());
                    }
                    if newest.as_ref().is_none_or(|n| sb.events > n.events) {
                        newest = Some(sb);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("leg {}: cannot re-read the superblock: {e}", m.name()),
            }
        }
        let Some(sb) = newest else {
            return Err(io::Error::other("no leg's superblock could be re-read"));
        };
        if sb.events <= meta.sb.events {
            return Ok(());
        }
        let role_of = |m: &Member| {
            sb.dev_roles
                .get(m.dev_number as usize)
                .copied()
                .unwrap_or(role::SPARE)
        };
        for m in self.members().iter().flatten() {
            if role_of(m) == role::FAULTY && m.set_state(LegState::Faulty) != LegState::Faulty {
                warn!("leg {}: failed by another node", m.name());
                if !meta.faulty.contains(&m.dev_number) {
                    meta.faulty.push(m.dev_number);
                }
            }
        }
        // Legs another node took out of their slot or put back into one.
        let mut slots: Vec<Option<Arc<Member>>> = (*self.members()).clone();
        let mut detached = lock(&self.detached);
        for (i, cur) in slots.clone().iter().enumerate() {
            let Some(m) = cur else { continue };
            let r = role_of(m);
            if m.state() == LegState::Faulty && r >= role::MAX && r != role::FAULTY {
                info!("leg {}: removed from the array by another node", m.name());
                slots[i] = None;
                detached.push(m.clone());
            }
        }
        let mut back = Vec::new();
        for m in slots.iter().flatten().chain(detached.iter()) {
            if m.state() == LegState::Faulty && usize::from(role_of(m)) < slots.len() {
                back.push(m.clone());
            }
        }
        {
            let mut candidates = lock(&self.candidates);
            for m in candidates.iter() {
                if usize::from(role_of(m)) < slots.len() {
                    info!(
                        "leg {}: another node added it as device {}",
                        m.name(),
                        m.dev_number
                    );
                    back.push(m.clone());
                }
            }
            candidates
                .retain(|m| usize::from(role_of(m)) >= slots.len() && role_of(m) != role::FAULTY);
        }
        for m in back {
            let r = usize::from(role_of(&m));
            if slots[r].as_ref().is_some_and(|o| !Arc::ptr_eq(o, &m)) {
                warn!(
                    "leg {}: another node put it into mirror slot {r}, which holds a leg here",
                    m.name()
                );
                continue;
            }
            for s in slots.iter_mut() {
                if s.as_ref().is_some_and(|o| Arc::ptr_eq(o, &m)) {
                    *s = None;
                }
            }
            detached.retain(|o| !Arc::ptr_eq(o, &m));
            meta.faulty.retain(|&d| d != m.dev_number);
            let own = super::metadata::read_superblock(&*m.leg).ok();
            // The rebuild may be over already (this update is read late): the
            // leg's own superblock, written by that update, says so.
            let rebuilt = own.as_ref().is_some_and(|o| {
                o.set_uuid == self.uuid
                    && o.events >= sb.events
                    && o.feature_map & feature::RECOVERY_OFFSET == 0
            });
            slots[r] = Some(m.clone());
            if rebuilt {
                m.remote_recovery.store(false, Ordering::Release);
                m.set_state(LegState::InSync);
                info!(
                    "leg {}: in mirror slot {r}, rebuilt by another node: in sync",
                    m.name()
                );
                continue;
            }
            m.remote_recovery.store(true, Ordering::Release);
            m.rebuilt_by
                .store(from.unwrap_or(NOBODY), Ordering::Release);
            if let Some(own) = &own {
                m.bitmap_guided.store(
                    own.feature_map & feature::RECOVERY_BITMAP != 0,
                    Ordering::Relaxed,
                );
            }
            m.set_state(LegState::Recovering);
            info!(
                "leg {}: in mirror slot {r}; another node rebuilds it, this node writes it meanwhile",
                m.name()
            );
        }
        drop(detached);
        self.members.store(Arc::new(slots));
        meta.sb = sb;
        drop(meta);
        self.update_bitmap_state();
        Ok(())
    }

    pub(super) fn update_superblocks_local(
        &self,
        change: impl FnOnce(&mut Superblock),
    ) -> io::Result<()> {
        let mut meta = lock(&self.meta);
        let before = meta.sb.clone();
        change(&mut meta.sb);
        // The events of the last update some leg took, if any.
        let mut taken = None;
        loop {
            let seen = self.failures_seen.load(Ordering::Acquire);
            let members = self.members();
            meta.sb.events += 1;
            meta.sb.utime = now();
            let mut roles = meta.sb.dev_roles.clone();
            for &d in &meta.faulty {
                if let Some(r) = roles.get_mut(d as usize) {
                    *r = role::FAULTY;
                }
            }
            for (slot, m) in members.iter().enumerate() {
                let Some(m) = m else { continue };
                if let Some(r) = roles.get_mut(m.dev_number as usize) {
                    *r = if m.state() == LegState::Faulty {
                        role::FAULTY
                    } else {
                        slot as u16
                    };
                }
            }
            meta.sb.dev_roles = roles;
            let events = meta.sb.events;
            if let Err(e) = self.bitmap.set_events(events, self) {
                warn!("bitmap superblock update failed: {e}");
            }
            let mut written = 0;
            for m in members.iter().flatten() {
                if m.state() == LegState::Faulty {
                    continue;
                }
                let mut sb = meta.sb.clone();
                sb.dev_number = m.dev_number;
                sb.device_uuid = m.device_uuid;
                sb.data_offset = m.data_offset;
                sb.data_size = m.data_size;
                if m.state() == LegState::Recovering {
                    sb.feature_map |= feature::RECOVERY_OFFSET;
                    if m.bitmap_guided.load(Ordering::Relaxed) {
                        sb.feature_map |= feature::RECOVERY_BITMAP;
                    } else {
                        sb.feature_map &= !feature::RECOVERY_BITMAP;
                    }
                    sb.recovery_offset = 0;
                } else {
                    sb.feature_map &= !(feature::RECOVERY_OFFSET | feature::RECOVERY_BITMAP);
                    sb.recovery_offset = 0;
                }
                let r = m
                    .leg
                    .write_at(&sb.encode(), sb.super_offset * 512)
                    .and_then(|()| m.leg.flush());
                match r {
                    Ok(()) => written += 1,
                    Err(e) => self.fail(m, &format!("superblock write failed: {e}")),
                }
            }
            if written > 0 {
                taken = Some(events);
            }
            if self.failures_seen.load(Ordering::Acquire) == seen {
                if written == 0 {
                    // Our superblock counts from what the disk holds: counted ahead
                    // of it, this node would ignore the next updates of other nodes
                    // (`reload_superblocks` takes only newer ones); behind it (a
                    // write that failed after its first sectors landed all the
                    // same), its next update would give another superblock the
                    // same events.
                    match taken {
                        Some(e) => meta.sb.events = e,
                        None => meta.sb = before,
                    }
                    let on_disk = members
                        .iter()
                        .flatten()
                        .filter_map(|m| super::metadata::read_superblock(&*m.leg).ok())
                        .filter(|sb| sb.set_uuid == self.uuid)
                        .map(|sb| sb.events)
                        .max();
                    if let Some(e) = on_disk.filter(|&e| e > meta.sb.events) {
                        meta.sb.events = e;
                    }
                    return Err(io::Error::other("no leg accepted the superblock update"));
                }
                for m in members.iter().flatten() {
                    if m.state() == LegState::Faulty && !meta.faulty.contains(&m.dev_number) {
                        meta.faulty.push(m.dev_number);
                    }
                }
                self.failures_recorded.fetch_max(seen, Ordering::AcqRel);
                return Ok(());
            }
        }
    }

    /// Marks the array active (resync_offset 0) for serving.
    pub fn mark_active(&self) -> io::Result<()> {
        self.update_superblocks(|sb| sb.resync_offset = 0)
    }

    /// Marks the array clean when nothing needs a resync and no leg is missing.
    pub fn mark_clean_if_possible(&self) -> io::Result<bool> {
        let stats = self.bitmap.stats();
        let clean = stats.needed == 0 && !self.is_degraded();
        if clean {
            self.update_superblocks(|sb| sb.resync_offset = MAX_SECTOR)?;
        } else {
            self.update_superblocks(|_| {})?;
        }
        Ok(clean)
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

    /// Picks the leg to read `sectors` at `sector` from: the first in-sync leg for
    /// chunks that still need a resync; else the leg whose last read ended here (a
    /// sequential stream stays on one device, as md's read balancing does); else the
    /// least busy in-sync leg.
    pub(super) fn read_order(&self, sector: u64, sectors: u64) -> Vec<Arc<Member>> {
        let mut legs = self.in_sync();
        if legs.len() > 1
            && !self.balancing_suspended.load(Ordering::Relaxed)
            && !self.bitmap.is_needed(sector, sectors)
        {
            match legs
                .iter()
                .position(|m| m.next_seq.load(Ordering::Relaxed) == sector)
            {
                Some(i) => legs.swap(0, i),
                None => {
                    let start = self.next_read.fetch_add(1, Ordering::Relaxed) % legs.len();
                    legs.rotate_left(start);
                    legs.sort_by_key(|m| m.inflight.load(Ordering::Relaxed));
                }
            }
        }
        if let Some(m) = legs.first() {
            m.next_seq.store(sector + sectors, Ordering::Relaxed);
        }
        legs
    }

    /// Reads guest data. A leg that fails is skipped; the range is queued to be
    /// rewritten on it from another leg ([`Array::run_repairs`]).
    pub fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let result = self.read_legs(sector, bufs);
        // A leg failure (another request's) is recorded before the read completes.
        if !self.read_waits_for_record() {
            return result;
        }
        Self::read_settled(result, self.settle_failures())
    }

    /// Whether a read that finished waits for a failure record: a fenced node
    /// records nothing (that takes the lock manager it lost) and still serves reads.
    pub(crate) fn read_waits_for_record(&self) -> bool {
        !self.is_fenced() && self.failure_unrecorded()
    }

    /// A read's result once the record it waited for ended: when a failure cannot
    /// be recorded, data read from an in-sync leg is still good: the read goes on.
    pub(crate) fn read_settled(result: io::Result<()>, settled: io::Result<()>) -> io::Result<()> {
        match settled {
            Err(e) if result.is_ok() => {
                log::debug!("a leg failure is not recorded ({e}); the read completes");
                result
            }
            settled => settled.and(result),
        }
    }

    /// The legs' part of [`Array::read`], without waiting for failure records.
    pub(crate) fn read_legs(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let sectors = self.check_range(sector, bytes)?;
        let mut failed: Vec<(Arc<Member>, io::Error)> = Vec::new();
        let mut result = Err(io::Error::other("no in-sync leg to read from"));
        for m in self.read_order(sector, sectors) {
            m.inflight.fetch_add(1, Ordering::Relaxed);
            let r = m.leg.readv_at(bufs, m.byte_offset(sector));
            m.inflight.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => {
                    result = Ok(());
                    break;
                }
                Err(e) => failed.push((m, e)),
            }
        }
        if result.is_ok() && !failed.is_empty() {
            self.counters.read_retries.fetch_add(1, Ordering::Relaxed);
            // Not rewritten here with the data just read: a guest write to the range
            // could land between that read and the rewrite, and the rewrite would
            // put the old data back on this leg only. The repair reads again and
            // writes while writes to the range wait, as md freezes the array.
            let mut q = lock(&self.repairs);
            for (m, e) in failed {
                warn!(
                    "leg {}: read error at sector {sector}: {e}; it is rewritten from another leg",
                    m.name()
                );
                q.push((m, sector, sectors));
            }
        } else if let (Err(_), Some((_, e))) = (&result, failed.last()) {
            result = Err(io::Error::new(
                e.kind(),
                format!("read failed on every leg: {e}"),
            ));
        }
        result
    }

    /// Rewrites the ranges legs failed to read (see [`Array::read`]) from another
    /// in-sync leg, one bitmap chunk at a time while writes to that chunk wait
    /// (the resync exclusion); a leg whose rewrite fails is failed. Returns the
    /// ranges repaired. Run by the resync thread, never by an I/O worker (it waits
    /// for the writes in flight in the chunk).
    pub fn run_repairs(&self) -> usize {
        let todo = std::mem::take(&mut *lock(&self.repairs));
        let n = todo.len();
        for (m, sector, sectors) in todo {
            if m.state() == LegState::Faulty {
                continue;
            }
            let g = self.bitmap.geometry();
            for c in self.bitmap.chunk_range(sector, sectors) {
                let lo = sector.max(g.chunk_start(c));
                let hi = (sector + sectors).min(g.chunk_start(c) + g.chunk_sectors());
                if lo >= hi {
                    continue;
                }
                self.bitmap.begin_resync(c);
                let r = self.rewrite(&m, lo, hi);
                self.bitmap.end_resync(c, false);
                match r {
                    Ok(true) => info!("leg {}: sectors {lo}..{hi} rewritten", m.name()),
                    Ok(false) => {}
                    Err(e) => self.fail(&m, &format!("rewrite after a read error failed: {e}")),
                }
            }
        }
        if let Err(e) = self.settle_failures() {
            warn!("after read repairs: {e}");
        }
        n
    }

    /// Copies sectors `lo..hi` to `m` from another in-sync leg. `Ok(false)`: no
    /// other leg could give them.
    fn rewrite(&self, m: &Arc<Member>, lo: u64, hi: u64) -> io::Result<bool> {
        let mut buf = crate::storage::AlignedBuf::zeroed(((hi - lo) * 512) as usize);
        for src in self.in_sync() {
            if Arc::ptr_eq(&src, m) {
                continue;
            }
            if src
                .leg
                .read_at(buf.as_mut_slice(), src.byte_offset(lo))
                .is_ok()
            {
                m.leg.write_at(buf.as_slice(), m.byte_offset(lo))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes guest data to every non-faulty leg, after its bitmap bits are durable.
    /// Succeeds when at least one in-sync leg has it; legs that fail are failed and
    /// recorded before this returns.
    pub fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let sectors = self.check_range(sector, bytes)?;
        self.mutate(sector, sectors, |m| {
            m.leg.writev_at(bufs, m.byte_offset(sector))
        })
    }

    /// Discards a range on every leg (bitmap-gated like a write).
    pub fn discard(&self, sector: u64, sectors: u64) -> io::Result<()> {
        self.check_range(sector, sectors * 512)?;
        self.mutate(sector, sectors, |m| {
            m.leg.discard(m.byte_offset(sector), sectors * 512)
        })
    }

    /// Zeroes a range on every leg (bitmap-gated like a write).
    pub fn write_zeroes(&self, sector: u64, sectors: u64) -> io::Result<()> {
        self.check_range(sector, sectors * 512)?;
        self.mutate(sector, sectors, |m| {
            m.leg.write_zeroes(m.byte_offset(sector), sectors * 512)
        })
    }

    fn mutate(
        &self,
        sector: u64,
        sectors: u64,
        op: impl Fn(&Member) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.bitmap.start_write(sector, sectors, self)?;
            let mut ok_in_sync = 0;
            let mut last_err = None;
            for m in self.writable() {
                m.inflight.fetch_add(1, Ordering::Relaxed);
                let r = op(&m);
                m.inflight.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(()) => {
                        if m.state() == LegState::InSync {
                            ok_in_sync += 1;
                        }
                    }
                    Err(e) => {
                        self.fail(&m, &format!("write error at sector {sector}: {e}"));
                        last_err = Some(e);
                    }
                }
            }
            if let (Some(e), Some(fenced)) = (&last_err, self.refused_by_fence()) {
                // No leg was failed: the write is on some legs only.
                self.bitmap.end_write(sector, sectors, true);
                return Err(io::Error::new(e.kind(), fenced));
            }
            let unrecorded = self.failure_unrecorded();
            if unrecorded {
                // Recording the failure may wait for the token, which a node
                // announcing a resync window over this write holds until our writes
                // there are over: the write is over on the legs (see `rewrite_after_failure`).
                // A leg that failed the write and was kept (the last in-sync one)
                // differs there from a leg being rebuilt that took it: the chunk stays
                // to be resynced.
                self.bitmap.end_write(sector, sectors, last_err.is_some());
                self.settle_failures()?;
            } else {
                let settled = self.settle_failures();
                self.bitmap.end_write(sector, sectors, last_err.is_some());
                settled?;
            }
            if ok_in_sync == 0 {
                return Err(last_err.unwrap_or_else(|| io::Error::other("no in-sync leg")));
            }
            if !(unrecorded && self.rewrite_after_failure(attempts)) {
                return Ok(());
            }
        }
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

    /// How the record of the first `seen` leg failures ended (`None`: not yet).
    pub(crate) fn settle_outcome(&self, seen: u64) -> Option<io::Result<()>> {
        self.settler
            .outcome(seen, self.failures_recorded.load(Ordering::Acquire))
    }

    /// Whether a write that finished on the legs while a failure was unrecorded is
    /// written again (`attempts` so far) before it completes. On a cluster node, yes:
    /// until the failure was recorded, another node resyncing the write's chunks
    /// took the failed leg for in sync and may have copied its old data over the
    /// write on the good legs; the second write, once the failure is on disk, puts
    /// it back (and waits, like any write, until that node's window moved on).
    /// Bounded: every pass follows a new failure, and legs are few.
    pub(crate) fn rewrite_after_failure(&self, attempts: usize) -> bool {
        self.is_cluster_node() && attempts <= self.members().len() + 1
    }

    /// Makes every completed write durable on every non-faulty leg.
    pub fn flush(&self) -> io::Result<()> {
        let mut ok_in_sync = 0;
        for m in self.writable() {
            match m.leg.flush() {
                Ok(()) => {
                    if m.state() == LegState::InSync {
                        ok_in_sync += 1;
                    }
                }
                Err(e) => {
                    self.fail(&m, &format!("flush failed: {e}"));
                    if let Some(fenced) = self.refused_by_fence() {
                        return Err(io::Error::new(e.kind(), fenced));
                    }
                }
            }
        }
        self.settle_failures()?;
        if ok_in_sync == 0 {
            return Err(io::Error::other("no in-sync leg could flush"));
        }
        Ok(())
    }

    /// One pass of the bitmap daemon.
    pub fn bitmap_daemon_pass(&self) -> io::Result<u64> {
        let r = self.bitmap.daemon_pass(self.events(), self);
        self.settle_failures()?;
        r
    }

    /// Merges node `slot`'s on-disk bitmap into ours (its dirty chunks become
    /// needed and dirty in our bitmap, which is flushed first); with `clear`, the
    /// slot's bits are then cleared on every leg (recovery of a departed node, whose
    /// slot lock we hold). The slot's bits are those of every in-sync leg together:
    /// a node that died while writing its bitmap left it updated on some legs only.
    /// Returns how many chunks were dirty there.
    pub fn merge_slot(&self, slot: u32, clear: bool) -> io::Result<u64> {
        let sb = self.superblock();
        let g = self.bitmap.geometry();
        let legs = self.in_sync();
        if legs.is_empty() {
            return Err(io::Error::other("no in-sync leg to read the bitmap from"));
        }
        // Every readable copy adds its bits. A leg whose copy cannot be read is
        // left out, as a read of guest data skips it: the node set a bit on every
        // in-sync leg before writing under it, so the other copies have it too.
        let mut theirs: Option<super::metadata::SlotBitmap> = None;
        let mut unread = None;
        for m in &legs {
            match super::metadata::read_slot(&*m.leg, &sb, g, slot) {
                Ok(b) => match theirs.as_mut() {
                    Some(t) => {
                        t.bits.merge(&b.bits);
                    }
                    None => theirs = Some(b),
                },
                Err(e) => {
                    warn!("leg {}: bitmap of node slot {slot}: {e}", m.name());
                    unread = Some(e);
                }
            }
        }
        let theirs = match (theirs, unread.as_ref()) {
            (Some(t), _) => t,
            (None, e) => {
                return Err(io::Error::other(format!(
                    "bitmap of node slot {slot}: {}",
                    e.map(|e| e.to_string()).unwrap_or_default()
                )))
            }
        };
        let dirty = theirs.bits.count_dirty();
        // A copy that was not read (unreadable, or on a leg being rebuilt) may still
        // hold bits, of a bitmap write the node did not finish: cleared too.
        let all_read = unread.is_none() && self.writable().len() == legs.len();
        if dirty == 0 && (!clear || all_read) {
            return Ok(0);
        }
        if dirty > 0 {
            self.bitmap.mark_needed(&theirs.bits);
            self.bitmap.flush(self)?;
        }
        if clear {
            let off = g
                .slot_offset(sb.super_offset, sb.bitmap_offset, slot)
                .ok_or_else(|| io::Error::other("bitmap slot outside the leg"))?;
            let mut data = vec![0u8; g.slot_len() as usize];
            let mut their_sb = theirs.sb.clone();
            their_sb.events_cleared = sb.events;
            data[..crate::md::bitmap::BITMAP_SB_LEN].copy_from_slice(&their_sb.encode());
            self.write_bitmap(off, &data)?;
        }
        self.settle_failures()?;
        Ok(dirty)
    }

    /// Marks every chunk dirty in any other node slot as needed here, without
    /// clearing them there (a bitmap-guided rebuild covers all nodes' writes).
    pub fn gather_other_slots(&self) -> io::Result<u64> {
        let own = self.own_slot;
        let mut n = 0;
        for s in (0..self.bitmap.superblock().slots()).filter(|&s| s != own) {
            n += self.merge_slot(s, false)?;
        }
        Ok(n)
    }

    /// As the only node of the array: takes over every other slot's dirty bits
    /// (they become ours to resync) and clears them. Returns the chunks taken over.
    pub fn merge_other_slots(&self) -> io::Result<u64> {
        let slots = self.bitmap.superblock().slots();
        let own = self.own_slot;
        let mut n = 0;
        for s in (0..slots).filter(|&s| s != own) {
            n += self.merge_slot(s, true)?;
        }
        Ok(n)
    }

    /// Copies chunk `c` from the first in-sync leg to every other non-faulty leg.
    /// Returns the bytes copied per target.
    pub fn resync_chunk(&self, c: u64) -> io::Result<u64> {
        let g = self.bitmap.geometry();
        let start = g.chunk_start(c);
        let end = (start + g.chunk_sectors()).min(self.size);
        let t0 = std::time::Instant::now();
        let joining = lock(&self.recovery);
        self.bitmap.begin_resync(c);
        let r = self.copy_range(start, end);
        self.bitmap.end_resync(c, r.is_ok());
        drop(joining);
        let settled = self.settle_failures();
        let n = r?;
        settled?;
        let rate = self.counters.resync_max_rate.load(Ordering::Relaxed);
        if rate > 0 {
            let due = std::time::Duration::from_secs_f64(n as f64 / rate as f64);
            // In short naps, so that a stop does not wait for the throttle.
            while let Some(wait) = due.checked_sub(t0.elapsed()).filter(|w| !w.is_zero()) {
                if self.resync_halted() {
                    break;
                }
                std::thread::sleep(wait.min(std::time::Duration::from_millis(100)));
            }
        }
        Ok(n)
    }

    /// The process is stopping: resync and recovery passes end after the chunk
    /// they copy (the chunks not reached stay needed, and dirty in the bitmap).
    pub fn halt_resync(&self) {
        self.resync_halted.store(true, Ordering::SeqCst);
    }

    /// Whether [`Array::halt_resync`] was called.
    pub fn resync_halted(&self) -> bool {
        self.resync_halted.load(Ordering::SeqCst)
    }

    fn copy_range(&self, start: u64, end: u64) -> io::Result<u64> {
        const STEP: u64 = 2048; // 1 MiB
                                // No larger than the range: a chunk of a few KiB costs no 1 MiB buffer.
        let step = STEP.min(end.saturating_sub(start)).max(1);
        let mut buf = crate::storage::AlignedBuf::zeroed((step * 512) as usize);
        let mut pos = start;
        let mut copied = 0;
        while pos < end {
            let n = step.min(end - pos);
            let data = &mut buf.as_mut_slice()[..(n * 512) as usize];
            let mut src = None;
            for m in self.in_sync() {
                match m.leg.read_at(data, m.byte_offset(pos)) {
                    Ok(()) => {
                        src = Some(m);
                        break;
                    }
                    Err(e) => self.fail(&m, &format!("read error during resync: {e}")),
                }
            }
            let Some(src) = src else {
                return Err(io::Error::other("no in-sync leg to resync from"));
            };
            let data = &buf.as_slice()[..(n * 512) as usize];
            for m in self.writable() {
                if Arc::ptr_eq(&m, &src) {
                    continue;
                }
                if let Err(e) = m.leg.write_at(data, m.byte_offset(pos)) {
                    self.fail(&m, &format!("write error during resync: {e}"));
                } else {
                    copied += n * 512;
                    self.counters
                        .resync_bytes
                        .fetch_add(n * 512, Ordering::Relaxed);
                }
            }
            pos += n;
        }
        Ok(copied)
    }

    /// After every needed chunk was copied: recovering legs become in sync.
    pub fn finish_recovery(&self) -> io::Result<()> {
        let guard = lock(&self.recovery);
        if self.bitmap.next_needed(0).is_some() {
            return Ok(());
        }
        let mut promoted = false;
        for m in self.members().iter().flatten() {
            if m.state() == LegState::Recovering
                && !m.remote_recovery.load(Ordering::Acquire)
                && !m.gathering.load(Ordering::Acquire)
            {
                m.state
                    .compare_exchange(
                        LegState::Recovering as u8,
                        LegState::InSync as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .ok();
                info!("leg {}: recovery complete, in sync", m.name());
                promoted = true;
            }
        }
        drop(guard);
        self.update_bitmap_state();
        if promoted {
            self.update_superblocks(|_| {})?;
        }
        Ok(())
    }

    /// Takes over the rebuild of legs another node was rebuilding (it may have
    /// died): they become ours to finish. Returns whether there were any.
    pub fn take_over_recoveries(&self, dead: u32) -> io::Result<bool> {
        let mut taken = Vec::new();
        let mut guided = true;
        for m in self.members().iter().flatten() {
            let by = m.rebuilt_by.load(Ordering::Acquire);
            // Only the dead node's rebuilds: a live node goes on with its own.
            if by != dead && by != NOBODY {
                continue;
            }
            if m.state() == LegState::Recovering && m.remote_recovery.swap(false, Ordering::AcqRel)
            {
                info!("leg {}: this node takes over its rebuild", m.name());
                taken.push(m.clone());
                guided &= m.bitmap_guided.load(Ordering::Relaxed);
            }
        }
        if !taken.is_empty() {
            if guided {
                if let Err(e) = self.gather_other_slots() {
                    // Not ours yet: taken over again when the recovery is retried.
                    for m in &taken {
                        m.remote_recovery.store(true, Ordering::Release);
                    }
                    return Err(e);
                }
            } else {
                self.bitmap.mark_all_needed();
            }
        }
        Ok(!taken.is_empty())
    }

    /// Whether any leg is recovering.
    pub fn recovering(&self) -> bool {
        self.members()
            .iter()
            .flatten()
            .any(|m| m.state() == LegState::Recovering)
    }
}

impl BitmapStore for Array {
    fn write_bitmap(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let mut ok = 0;
        let mut last = None;
        for m in self.writable() {
            match m.leg.write_at(data, off).and_then(|()| m.leg.flush()) {
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
mod tests {
    use super::*;
    use crate::raid1::metadata::{create_array, LegMetadata};
    use crate::storage::MemLeg;

    /// Two 64 MiB in-memory legs of a new array with 1 MiB bitmap chunks.
    fn two_legs(
        cluster: Option<&str>,
        nodes: u32,
    ) -> (Arc<dyn Leg>, Arc<dyn Leg>, Vec<LegMetadata>) {
        let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 64 << 20));
        let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 64 << 20));
        let (_, metas) = create_array(
            &[&*a, &*b],
            &super::super::metadata::NewArray {
                name: "t".into(),
                cluster_name: cluster.map(str::to_string),
                nodes,
                bitmap_chunk: Some(1 << 20),
                assume_clean: true,
                now: 0,
                uuid: None,
            },
        )
        .unwrap();
        (a, b, metas)
    }

    /// A leg whose writes at byte `at` wait while a gate is closed (only the first
    /// one, with `once`).
    struct Gated {
        inner: Arc<dyn Leg>,
        at: u64,
        once: bool,
        passed: AtomicBool,
        closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
        waiting: Arc<AtomicBool>,
    }

    impl Gated {
        fn new(inner: Arc<dyn Leg>, at: u64, once: bool) -> Gated {
            Gated {
                inner,
                at,
                once,
                passed: AtomicBool::new(false),
                closed: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
                waiting: Arc::new(AtomicBool::new(false)),
            }
        }

        fn close(closed: &(Mutex<bool>, std::sync::Condvar), on: bool) {
            *lock(&closed.0) = on;
            closed.1.notify_all();
        }
    }

    impl Leg for Gated {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.inner.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            if off == self.at && !(self.once && self.passed.swap(true, Ordering::SeqCst)) {
                let (m, cv) = &*self.closed;
                let mut closed = lock(m);
                while *closed {
                    self.waiting.store(true, Ordering::SeqCst);
                    closed = cv.wait(closed).unwrap_or_else(|e| e.into_inner());
                }
            }
            self.inner.write_at(buf, off)
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
        fn discard(&self, off: u64, len: u64) -> io::Result<()> {
            self.inner.discard(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
            self.inner.write_zeroes(off, len)
        }
    }

    #[test]
    fn no_write_completes_before_a_failed_leg_is_recorded_faulty() {
        use crate::storage::{Faults, FaultyLeg};
        let (a, b, _) = two_legs(None, 1);
        let faults = Faults::none();
        let a: Arc<dyn Leg> = Arc::new(FaultyLeg::new(a, faults.clone()));
        let gated = Gated::new(b, 8 * 512, false);
        let (closed, waiting) = (gated.closed.clone(), gated.waiting.clone());
        let b: Arc<dyn Leg> = Arc::new(gated);
        let (array, _) = Array::assemble(vec![a, b.clone()]).unwrap();
        let array = Arc::new(array);
        array.mark_active().unwrap();
        // Leg a fails every write from now on; leg b's superblock writes stall.
        faults.fail_writes_now();
        Gated::close(&closed, true);
        let data = vec![0x5au8; 4096];
        let (tx, rx) = crossbeam_channel::unbounded();
        let spawn_write = |sector: u64| {
            let (array, data, tx) = (array.clone(), data.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = array.write(sector, &[IoSlice::new(&data)]);
                let _ = tx.send((sector, r.is_ok()));
            })
        };
        // Request 1 fails on leg a and records that in leg b's superblock: stalled.
        let t1 = spawn_write(0);
        let start = std::time::Instant::now();
        while !waiting.load(Ordering::SeqCst) {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Request 2 runs while leg a's failure is not on disk yet: it must not
        // complete either (a crash now would leave leg a "in sync", and a resync
        // from it would erase request 2's data on leg b).
        let t2 = spawn_write(4096);
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "a write completed while a leg's failure was not yet in the superblocks"
        );
        Gated::close(&closed, false);
        let mut done: Vec<(u64, bool)> = (0..2)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
            .collect();
        done.sort();
        assert_eq!(done, vec![(0, true), (4096, true)]);
        t1.join().unwrap();
        t2.join().unwrap();
        let sb = crate::raid1::metadata::read_superblock(&*b).unwrap();
        assert_eq!(sb.dev_roles[0], role::FAULTY, "leg a recorded faulty");
    }

    #[test]
    fn a_read_repair_never_puts_old_data_over_a_newer_write() {
        use crate::storage::{Faults, FaultyLeg};
        let (a, b, metas) = two_legs(None, 1);
        let sector = 8192;
        let at = metas[0].sb.data_offset * 512 + sector * 512;
        // Leg a: its first write at the sector waits at a gate; reads fail on demand.
        let gated = Gated::new(a.clone(), at, true);
        let (closed, waiting) = (gated.closed.clone(), gated.waiting.clone());
        let faults = Faults::none();
        let fa: Arc<dyn Leg> = Arc::new(FaultyLeg::new(Arc::new(gated), faults.clone()));
        let (array, _) = Array::assemble(vec![fa, b.clone()]).unwrap();
        let array = Arc::new(array);
        array.mark_active().unwrap();
        array.suspend_read_balancing(true); // reads try leg a first
                                            // Old data (zeroes) on both legs; leg a fails a read of it.
        let new = vec![0x22u8; 4096];
        Gated::close(&closed, true);
        faults.fail_reads.store(true, Ordering::SeqCst);
        let reader = {
            let array = array.clone();
            std::thread::spawn(move || {
                let mut got = vec![0u8; 4096];
                let r = array.read(sector, &mut [IoSliceMut::new(&mut got)]);
                array.run_repairs();
                (r.is_ok(), got)
            })
        };
        // The rewrite of leg a is at the gate (the repair holds the range).
        let start = std::time::Instant::now();
        while !waiting.load(Ordering::SeqCst) {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        faults.fail_reads.store(false, Ordering::SeqCst);
        // A guest write of new data to the same sector meanwhile.
        let writer = {
            let (array, new) = (array.clone(), new.clone());
            std::thread::spawn(move || array.write(sector, &[IoSlice::new(&new)]).is_ok())
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        Gated::close(&closed, false);
        assert!(writer.join().unwrap(), "the guest write failed");
        let (read_ok, _) = reader.join().unwrap();
        assert!(read_ok);
        let mut on_a = vec![0u8; 4096];
        let mut on_b = vec![0u8; 4096];
        a.read_at(&mut on_a, at).unwrap();
        b.read_at(&mut on_b, metas[1].sb.data_offset * 512 + sector * 512)
            .unwrap();
        assert!(on_b == new, "leg b does not hold the newer write");
        assert!(
            on_a == new,
            "the repair put old data back over a newer write on leg a"
        );
    }

    /// Two 64 MiB in-memory legs whose faults the test injects, assembled.
    fn faulty_legs() -> (Array, Vec<Arc<crate::storage::Faults>>) {
        use crate::storage::{Faults, FaultyLeg};
        let (a, b, _) = two_legs(None, 1);
        let faults = vec![Faults::none(), Faults::none()];
        let legs: Vec<Arc<dyn Leg>> = [a, b]
            .into_iter()
            .zip(&faults)
            .map(|(l, f)| Arc::new(FaultyLeg::new(l, f.clone())) as Arc<dyn Leg>)
            .collect();
        (Array::assemble(legs).unwrap().0, faults)
    }

    /// Both legs fail data writes with ENOSPC (metadata in place is rewritten).
    fn no_space_in_the_data_area(array: &Array, faults: &[Arc<crate::storage::Faults>]) {
        for (m, f) in array.writable().iter().zip(faults) {
            f.no_space_from.store(m.byte_offset(0), Ordering::Relaxed);
        }
    }

    #[test]
    fn a_write_failing_on_every_leg_fails_and_the_last_in_sync_leg_stays_readable() {
        let (array, faults) = faulty_legs();
        let old = vec![0x42u8; 8192];
        array.write(100, &[IoSlice::new(&old)]).unwrap();
        no_space_in_the_data_area(&array, &faults);
        let new = vec![0x17u8; 8192];
        assert!(array.write(100, &[IoSlice::new(&new)]).is_err());
        assert_eq!(
            array.in_sync_count(),
            1,
            "one leg failed, the last one kept"
        );
        assert!(array.write(100, &[IoSlice::new(&new)]).is_err(), "again");
        assert_eq!(array.in_sync_count(), 1);
        // Reads are served by the last leg (its writes failed, so it holds the old
        // data).
        let mut back = vec![0u8; 8192];
        array.read(100, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert!(back == old);
        // The failure of the first leg is recorded on the last one.
        assert_eq!(
            array
                .superblock()
                .dev_roles
                .iter()
                .filter(|&&r| r == role::FAULTY)
                .count(),
            1
        );
    }

    #[test]
    fn an_asynchronous_write_failing_on_every_leg_fails_and_keeps_one_leg_in_sync() {
        let (array, faults) = faulty_legs();
        let mut io = super::super::AsyncIo::new(8).unwrap();
        no_space_in_the_data_area(&array, &faults);
        let data = vec![0x17u8; 4096];
        let iovs = vec![libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: `data` outlives the request, which is drained below.
        unsafe { array.submit_write(&mut io, 1, 8, iovs) };
        io.submit().unwrap();
        io.drain(&array).unwrap();
        let done = io.take_done();
        assert_eq!(done.len(), 1);
        assert!(done[0].1.is_err(), "the write fails");
        assert_eq!(array.in_sync_count(), 1);
        let mut back = vec![0u8; 4096];
        array.read(8, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert!(back.iter().all(|&b| b == 0), "never written");
    }

    #[test]
    fn a_fenced_node_reads_what_its_legs_hold_although_a_leg_failure_cannot_be_recorded() {
        let (array, fence) = fenced_array();
        let old = vec![0x42u8; 8192];
        array.write(100, &[IoSlice::new(&old)]).unwrap();
        // The lock manager goes: a write still under way is refused by the legs;
        // that fails no leg (nothing could record it any more).
        fence.raise("lock manager lost");
        let new = vec![0x17u8; 8192];
        assert!(array.write(5000, &[IoSlice::new(&new)]).is_err());
        assert!(!array.failure_unrecorded(), "the fence failed a leg");
        // Reads go on: the data is on the legs.
        let mut back = vec![0u8; 8192];
        array
            .read(100, &mut [IoSliceMut::new(&mut back)])
            .expect("a fenced node's read fails");
        assert!(back == old);
    }

    #[test]
    fn a_sequential_stream_stays_on_one_leg_and_random_reads_alternate() {
        let (a, b, _) = two_legs(None, 1);
        let (array, _) = Array::assemble(vec![a, b]).unwrap();
        let first = |s: u64| array.read_order(s, 256)[0].name().to_string();
        let leg = first(0);
        // Two interleaved streams: each keeps its own leg.
        let other = first(50_000);
        assert_ne!(leg, other, "a new stream goes to the other (idle) leg");
        for i in 1..20 {
            assert_eq!(first(i * 256), leg, "stream 1 stays on {leg}");
            assert_eq!(first(50_000 + i * 256), other, "stream 2 stays on {other}");
        }
        // Random reads rotate over the legs.
        let picks: std::collections::HashSet<String> = [9_000, 21_000, 33_000, 77_000]
            .iter()
            .map(|&s| first(s))
            .collect();
        assert_eq!(picks.len(), 2, "{picks:?}");
    }

    /// An array on two legs that write nothing once the returned fence is up.
    fn fenced_array() -> (Array, Arc<crate::storage::Fence>) {
        use crate::storage::{Fence, FencedLeg};
        let (a, b, _) = two_legs(None, 1);
        let fence = Fence::new();
        let legs: Vec<Arc<dyn Leg>> = [a, b]
            .into_iter()
            .map(|l| Arc::new(FencedLeg::new(l, fence.clone())) as Arc<dyn Leg>)
            .collect();
        let (array, _) = Array::assemble(legs).unwrap();
        array.set_fence(fence.clone());
        (array, fence)
    }

    /// A fenced node's writes fail because it may not write, not because a leg
    /// broke: no leg is marked faulty (the status would tell the operator to
    /// replace a healthy leg, and a write after the fence saw one leg "left").
    #[test]
    fn a_fenced_nodes_refused_writes_fail_no_leg() {
        let (array, fence) = fenced_array();
        array.write(0, &[IoSlice::new(&[1u8; 4096])]).unwrap();
        fence.raise("test");
        assert!(array
            .write(8 * 2048, &[IoSlice::new(&[2u8; 4096])])
            .is_err());
        let _ = array.flush();
        assert_eq!(array.in_sync_count(), 2, "a leg was failed for the fence");
        let mut back = vec![0u8; 4096];
        array.read(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
        assert!(back.iter().all(|&x| x == 1));
    }

    /// The fence went up while a write was on its way: one leg took it, the
    /// other refused it. No leg is failed, so the write must fail: acknowledged,
    /// it would be on one leg while both are in sync, and a resync from the other
    /// would erase it.
    #[test]
    fn a_write_half_refused_by_the_fence_fails() {
        use crate::storage::{Fence, FencedLeg};
        let (a, b, _) = two_legs(None, 1);
        let fence = Fence::new();
        let legs: Vec<Arc<dyn Leg>> = vec![Arc::new(FencedLeg::new(a, fence.clone())), b];
        let (array, _) = Array::assemble(legs).unwrap();
        array.set_fence(fence.clone());
        fence.raise("test");
        assert!(array
            .write(8 * 2048, &[IoSlice::new(&[2u8; 4096])])
            .is_err());
        let mut io = super::super::AsyncIo::new(8).unwrap();
        let data = vec![3u8; 4096];
        let iovs = vec![libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: `data` outlives the request, which is drained below.
        unsafe { array.submit_write(&mut io, 1, 16 * 2048, iovs) };
        io.submit().unwrap();
        io.drain(&array).unwrap();
        let done = io.take_done();
        assert!(
            done[0].1.is_err(),
            "the asynchronous write was acknowledged"
        );
        assert_eq!(array.in_sync_count(), 2);
    }

    #[test]
    fn with_balancing_suspended_every_read_goes_to_the_same_leg() {
        let (a, b, _) = two_legs(None, 1);
        let (array, _) = Array::assemble(vec![a, b]).unwrap();
        let first = |s: u64| array.read_order(s, 8)[0].name().to_string();
        array.suspend_read_balancing(true);
        let picks: std::collections::HashSet<String> = (0..40u64)
            .map(|i| first((i * 7919) % 100_000 * 8))
            .collect();
        assert_eq!(picks.len(), 1, "suspended: {picks:?}");
        array.suspend_read_balancing(false);
        let picks: std::collections::HashSet<String> = (0..40u64)
            .map(|i| first((i * 7919) % 100_000 * 8))
            .collect();
        assert_eq!(picks.len(), 2, "resumed: {picks:?}");
    }

    #[test]
    fn another_slots_dirty_bits_are_taken_over_and_cleared() {
        let (a, b, metas) = two_legs(Some("c"), 4);
        // Node slot 2 left chunks 5 and 40 dirty.
        for (leg, m) in [(&a, &metas[0]), (&b, &metas[1])] {
            let mut m: LegMetadata = m.clone();
            m.bitmaps[2].bits.set(5);
            m.bitmaps[2].bits.set(40);
            super::super::metadata::write_leg_metadata(&**leg, &m).unwrap();
        }
        let (array, _) = Array::assemble(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(array.bitmap.stats().needed, 0);
        assert_eq!(array.merge_other_slots().unwrap(), 2);
        assert_eq!(array.bitmap.stats().needed, 2);
        assert!(array.bitmap.is_needed(5 * 2048, 8) && array.bitmap.is_needed(40 * 2048, 8));
        for leg in [&a, &b] {
            let m = LegMetadata::load(&**leg).unwrap();
            assert_eq!(m.bitmaps[2].bits.count_dirty(), 0, "their bits are cleared");
            assert!(
                m.bitmaps[0].bits.get(5) && m.bitmaps[0].bits.get(40),
                "ours are on disk"
            );
        }
    }

    #[test]
    fn a_slot_dirty_on_the_second_leg_only_is_taken_over_and_cleared_everywhere() {
        // A node died while its bitmap daemon cleared chunk 7: the cleared bitmap
        // reached leg a, not leg b.
        let (a, b, metas) = two_legs(Some("c"), 4);
        let mut m: LegMetadata = metas[1].clone();
        m.bitmaps[1].bits.set(7);
        super::super::metadata::write_leg_metadata(&*b, &m).unwrap();
        let (array, _) = Array::assemble(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(array.merge_slot(1, true).unwrap(), 1);
        assert!(array.bitmap.is_needed(7 * 2048, 8), "resynced, to be safe");
        for leg in [&a, &b] {
            let m = LegMetadata::load(&**leg).unwrap();
            assert_eq!(
                m.bitmaps[1].bits.count_dirty(),
                0,
                "leg {}: the slot is clean",
                leg.name()
            );
        }
    }
}
