//! A cluster node serving a mirror: joins the array's lockspace, writes its own
//! bitmap slot, takes over the bits of free slots, resyncs under the cluster-wide
//! resync lock with announced windows, and recovers the slots of nodes that died.

use super::comms::CommsError;
use super::membership::{JoinError, Node};
use crate::dlm::LockSpace;
use crate::md::message::{ClusterMsg, MsgType};
use crate::raid1::port::{ClusterEvent, ClusterMirror, MetadataSync};
use crate::storage::Leg;
use log::info;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes a resync window covers at most, as the kernel's md-cluster: writes of the
/// other nodes into the window wait until it moves on. A window is whole bitmap
/// chunks (resync copies a chunk at a time), so with chunks above this size it
/// is one chunk.
pub const WINDOW_BYTES: u64 = 32 << 20;

/// Chunks per resync window for chunks of `chunk_bytes`.
pub fn window_chunks(chunk_bytes: u64) -> u64 {
    (WINDOW_BYTES / chunk_bytes.max(1)).max(1)
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Joining the lockspace failed.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// Messaging failed.
    #[error(transparent)]
    Comms(#[from] CommsError),
    /// The legs could not be assembled.
    #[error("{0}")]
    Array(String),
    /// Leg I/O failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Superblock updates under the token, announced with METADATA_UPDATED.
struct ClusterMetadata<M> {
    comms: Arc<super::comms::Comms>,
    array: std::sync::Weak<M>,
}

impl<M: ClusterMirror> ClusterMetadata<M> {
    /// METADATA_UPDATED naming the first good leg, whose superblock receivers read.
    fn metadata_updated(array: &std::sync::Weak<M>) -> ClusterMsg {
        let mut m = ClusterMsg::new(MsgType::MetadataUpdated, 0);
        m.raid_slot = array
            .upgrade()
            .and_then(|a| a.first_good_dev())
            .unwrap_or(0);
        m
    }
}

impl<M: ClusterMirror> MetadataSync for ClusterMetadata<M> {
    fn update(&self, write: &mut dyn FnMut() -> io::Result<bool>) -> io::Result<()> {
        let array = self.array.clone();
        self.comms
            .under_token(|| match write() {
                Ok(false) => (Ok(()), None),
                // Also when the update failed: a leg may hold it all the same (a
                // write that failed after its first sectors), and a node that did
                // not re-read it would count its next update from behind the disk,
                // giving two different superblocks the same events.
                r => (r.map(|_| ()), Some(Self::metadata_updated(&array))),
            })
            .map_err(|e| io::Error::other(format!("cluster metadata update: {e}")))?
    }

    fn add_device(
        &self,
        dev_number: u32,
        device_uuid: crate::md::Uuid,
        write: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut m = ClusterMsg::new(MsgType::NewDisk, 0);
        m.uuid = device_uuid;
        m.raid_slot = dev_number;
        let array = self.array.clone();
        self.comms
            .add_device(m, || {
                let r = write();
                let msg = r.is_ok().then(|| Self::metadata_updated(&array));
                (r, msg)
            })
            .map_err(|e| io::Error::other(format!("cluster add: {e}")))?
    }

    fn removing(&self, dev_number: u32) -> io::Result<()> {
        let mut m = ClusterMsg::new(MsgType::Remove, 0);
        m.raid_slot = dev_number;
        self.comms
            .send(m)
            .map_err(|e| io::Error::other(format!("cluster remove message: {e}")))
    }

    fn re_adding(&self, dev_number: u32) -> io::Result<()> {
        let mut m = ClusterMsg::new(MsgType::ReAdd, 0);
        m.raid_slot = dev_number;
        self.comms
            .send(m)
            .map_err(|e| io::Error::other(format!("cluster re-add message: {e}")))
    }
}

/// What the receive loop of a joining node has before its array exists.
struct Early<M> {
    array: Option<Arc<M>>,
    queued: Vec<ClusterMsg>,
}

impl<M> Default for Early<M> {
    fn default() -> Self {
        Early {
            array: None,
            queued: Vec::new(),
        }
    }
}

/// What the receive path needs besides the array.
#[derive(Default)]
struct Receiving {
    comms: OnceLock<Arc<super::comms::Comms>>,
    finder: Mutex<Option<DeviceFinder>>,
}

impl Receiving {
    /// Applies another node's message to our array.
    fn apply<M: ClusterMirror>(&self, a: &M, m: &ClusterMsg) {
        if m.kind != MsgType::NewDisk {
            // Whatever add we confirmed is over: back to refusing new devices.
            if let Some(Err(e)) = self.comms.get().map(|c| c.rearm_new_device()) {
                log::warn!("cannot take no-new-dev back: {e}");
            }
        }
        match m.kind {
            // Returns once our writes in the window finished: then ack.
            MsgType::Resyncing => {
                let window = ClusterEvent::WindowSet {
                    slot: m.slot,
                    lo: m.low,
                    hi: m.high,
                };
                if let Err(e) = a.apply(window) {
                    log::warn!("cannot take node slot {}'s resync window: {e}", m.slot);
                }
            }
            MsgType::MetadataUpdated => {
                if let Err(e) = a.apply(ClusterEvent::MetadataUpdated { from: m.slot }) {
                    log::warn!("cannot re-read the superblocks: {e}");
                }
            }
            MsgType::NewDisk => self.new_disk(a, m),
            MsgType::ReAdd => info!(
                "node slot {} re-adds leg #{}; its role comes with the next metadata update",
                m.slot, m.raid_slot
            ),
            MsgType::Remove => info!("node slot {} removes leg #{}", m.slot, m.raid_slot),
            MsgType::BitmapNeedsSync => info!(
                "node slot {} leaves with dirty bits; they are recovered when its slot lock is released",
                m.slot
            ),
            MsgType::NodeLeaving => info!("node slot {} leaves", m.slot),
            MsgType::NodeJoined => info!(
                "node slot {} joined (node id {}, pid {})",
                m.slot, m.low, m.high
            ),
            _ => {}
        }
    }

    /// NEWDISK: confirms (releases `no-new-dev`) only when the device is found here.
    fn new_disk<M: ClusterMirror>(&self, a: &M, m: &ClusterMsg) {
        let found = self
            .finder
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|f| f(&m.uuid));
        let Some(leg) = found else {
            log::warn!(
                "node slot {} adds device {} (uuid {}), which this node cannot find: not confirming, the add fails",
                m.slot, m.raid_slot, m.uuid
            );
            return;
        };
        let event = ClusterEvent::NewDisk {
            slot: m.slot,
            dev_number: m.raid_slot,
            uuid: m.uuid,
            leg,
        };
        match a.apply(event) {
            Ok(()) => {
                if let Some(Err(e)) = self.comms.get().map(|c| c.confirm_new_device()) {
                    log::warn!("cannot confirm the new device: {e}");
                }
            }
            Err(e) => log::warn!(
                "node slot {} adds device {}: {e}; not confirming",
                m.slot,
                m.raid_slot
            ),
        }
    }
}

/// A node of a clustered mirror `M` (the array; tests may use another).
pub struct ClusterNode<M: ClusterMirror> {
    /// Membership and messaging.
    pub node: Node,
    /// The mirror, writing this node's bitmap slot.
    pub array: Arc<M>,
    /// The receive path's state (device finder).
    receiving: Arc<Receiving>,
    resyncing: AtomicBool,
}

/// Looks for the leg with a given device uuid among what this node can open.
pub type DeviceFinder = Box<dyn Fn(&crate::md::Uuid) -> Option<Arc<dyn Leg>> + Send + Sync>;

/// What `status` shows of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterView {
    /// This node's bitmap slot.
    pub slot: u32,
    /// Slots of the other live nodes (watched for their death).
    pub peers: Vec<u32>,
    /// The slot of the node that holds the resync lock, when one is known to.
    pub resync_holder: Option<u32>,
    /// Array sectors `[lo, hi)` where our writes wait for another node's resync.
    pub suspended: Vec<[u64; 2]>,
    /// Reads go to one leg: a node left and its dirty chunks are not taken over yet.
    #[serde(default)]
    pub reads_from_one_leg: bool,
}

impl<M: ClusterMirror> ClusterNode<M> {
    /// Joins: claims a slot, assembles the legs with that slot's bitmap, installs
    /// live nodes' resync windows, and takes over the bits of free slots.
    pub fn join(ls: Arc<dyn LockSpace>, legs: Vec<Arc<dyn Leg>>) -> Result<Self, NodeError> {
        ClusterNode::join_waiting(ls, legs, crate::cluster::membership::SLOT_WAIT)
    }

    /// Joins as [`ClusterNode::join`] does, waiting up to `slot_wait` for a slot
    /// while every slot is held (see [`Node::join_waiting`]).
    pub fn join_waiting(
        ls: Arc<dyn LockSpace>,
        legs: Vec<Arc<dyn Leg>>,
        slot_wait: std::time::Duration,
    ) -> Result<Self, NodeError> {
        let first = legs
            .first()
            .ok_or_else(|| NodeError::Array("no legs".into()))?;
        let nodes = crate::raid1::port::node_slots(&**first)
            .map_err(|e| NodeError::Array(e.to_string()))?;
        // Messages that arrive before the array exists are kept and applied once
        // it does: a window announced or ended meanwhile must not be lost.
        let early: Arc<Mutex<Early<M>>> = Arc::new(Mutex::new(Early::default()));
        let e2 = early.clone();
        let ctx = Arc::new(Receiving::default());
        let ctx2 = ctx.clone();
        let node = Node::join_waiting(
            ls,
            nodes,
            Box::new(move |m| {
                let a = {
                    let mut g = e2.lock().unwrap_or_else(|e| e.into_inner());
                    match &g.array {
                        Some(a) => a.clone(),
                        None => {
                            g.queued.push(m);
                            return;
                        }
                    }
                };
                ctx2.apply(&*a, &m);
            }),
            slot_wait,
        )?;
        let _ = ctx.comms.set(node.comms.clone());
        // Under the token: another node's superblock update (also under it) writes
        // the legs one after the other, and read in between they would disagree (a
        // leg would look stale, be left out, and be recorded faulty by us).
        let array = node
            .comms
            .under_token(|| (M::assemble_as_node(legs, node.slot), None))?
            .map_err(NodeError::Array)?;
        let array = Arc::new(array);
        array
            .attach(Arc::new(ClusterMetadata {
                comms: node.comms.clone(),
                array: Arc::downgrade(&array),
            }))
            .map_err(|e| NodeError::Array(e.to_string()))?;
        {
            // The windows read at join, then what was announced since, in order.
            let mut g = early.lock().unwrap_or_else(|e| e.into_inner());
            for &(slot, lo, hi) in &node.windows_at_join {
                info!("node slot {slot} is resyncing sectors {lo}..{hi}");
                array.apply(ClusterEvent::WindowSet { slot, lo, hi })?;
            }
            for m in std::mem::take(&mut g.queued) {
                ctx.apply(&*array, &m);
            }
            g.array = Some(array.clone());
        }
        // A bitmap-guided rebuild in progress covers every node's bits.
        array.gather_for_rebuild()?;
        for &s in &node.free_at_join {
            let n = array.take_over_slot(s)?;
            if n > 0 {
                info!("took over {n} dirty chunks of free node slot {s}");
            }
            node.release_slot(s)?;
        }
        let weak = Arc::downgrade(&array);
        node.set_read_balancing_sink(Box::new(move |on| {
            if let Some(a) = weak.upgrade() {
                // Cannot fail: it changes what reads do, nothing on disk.
                let _ = a.apply(ClusterEvent::ReadsFromOneLeg(on));
            }
        }));
        Ok(ClusterNode {
            node,
            array,
            receiving: ctx,
            resyncing: AtomicBool::new(false),
        })
    }

    /// Sets how this node finds a device another node adds (NEWDISK).
    pub fn set_device_finder(&self, f: DeviceFinder) {
        *self
            .receiving
            .finder
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// The cluster as this node sees it.
    pub fn view(&self) -> ClusterView {
        let g = self.array.bitmap().geometry();
        let remote = self.array.bitmap().remote_window().map(|(slot, lo, hi)| {
            (
                slot,
                g.chunk_start(lo),
                g.chunk_start(hi).min(self.array.sectors()),
            )
        });
        ClusterView {
            slot: self.node.slot,
            peers: self.node.watched(),
            resync_holder: if self.resyncing.load(Ordering::Relaxed) {
                Some(self.node.slot)
            } else {
                remote.map(|(s, _, _)| s)
            },
            suspended: remote.map(|(_, lo, hi)| vec![[lo, hi]]).unwrap_or_default(),
            reads_from_one_leg: self.array.reads_from_one_leg(),
        }
    }

    /// Corosync reports how many other members this array's group has. When fewer
    /// than the node slots other nodes hold, a node has left (or died) before its
    /// slot lock was released and its dirty bits merged: until then the legs may
    /// differ where it was writing, and reads go to one leg (the kernel's
    /// `recover_prep`, which suspends read balancing on a DLM "node down"). Without
    /// corosync, reads stay on one leg from the watch's grant to the merge only. A
    /// member that has joined the group but not yet claimed a slot counts as alive
    /// and would hide a death from the count: [`ClusterNode::peer_left`] covers that
    /// for the nodes whose slot is known.
    pub fn peers_alive(&self, n: usize) {
        self.node.set_live_peers(n);
    }

    /// Corosync reports that node `id` left this array's group: the slot it
    /// held, when known, keeps reads on one leg until this node recovered it
    /// (also while another member has no slot yet, which the count cannot see).
    pub fn peer_left(&self, id: crate::dlm::NodeId) {
        self.node.peer_left(id);
    }

    /// Copies every needed chunk under the cluster-wide resync lock, announcing
    /// each window so the other nodes hold their writes there. Returns bytes copied
    /// (before the end once the mirror's resync was halted: the process stops).
    pub fn resync(&self) -> Result<u64, NodeError> {
        if self.array.resync_halted() || self.array.bitmap().next_needed(0).is_none() {
            return Ok(0);
        }
        self.node.acquire_resync()?;
        self.resyncing.store(true, Ordering::Relaxed);
        let r = self.resync_locked();
        self.resyncing.store(false, Ordering::Relaxed);
        let released = self.node.release_resync();
        let n = r?;
        released?;
        Ok(n)
    }

    fn resync_locked(&self) -> Result<u64, NodeError> {
        let bitmap = self.array.bitmap();
        let g = bitmap.geometry();
        let mut copied = 0;
        let mut from = 0;
        while let Some(c) = bitmap.next_needed(from) {
            if self.array.resync_halted() {
                info!(
                    "stopping: resync left off with {} chunks to go",
                    bitmap.stats().needed
                );
                break;
            }
            let end = (c + window_chunks(u64::from(g.chunksize))).min(g.chunks());
            let hi = g.chunk_start(end).min(self.array.sectors());
            self.node.announce_window(g.chunk_start(c), hi)?;
            for chunk in c..end {
                if self.array.resync_halted() {
                    break;
                }
                if bitmap.is_needed(g.chunk_start(chunk), 1) {
                    copied += self.array.resync_chunk(chunk)?;
                }
            }
            from = end;
        }
        Ok(copied)
    }

    /// Leaves cleanly: tells the others, and whether our slot still has dirty bits
    /// (BITMAP_NEEDS_SYNC), before the process releases its locks.
    pub fn leave(&self) -> Result<(), NodeError> {
        let slot = self.node.slot;
        if self.array.bitmap().stats().dirty > 0 {
            self.node
                .comms
                .send(ClusterMsg::new(MsgType::BitmapNeedsSync, slot))?;
        }
        self.node
            .comms
            .send(ClusterMsg::new(MsgType::NodeLeaving, slot))?;
        Ok(())
    }

    /// Recovers the slot of a node that died: takes over and clears its bits,
    /// lifts its resync window, releases the slot, resyncs. Returns the bytes copied.
    pub fn recover(&self, slot: u32) -> Result<u64, NodeError> {
        let merged = self.array.take_over_slot(slot);
        // Its window holds our writes no more, whatever happens next: with its bits
        // merged its chunks are ours to resync; if the merge failed, the slot stays
        // held (reads stay on one leg) and its recovery is tried again.
        let cleared = self.array.apply(ClusterEvent::WindowCleared { slot });
        let merged = merged.and_then(|n| cleared.map(|()| n));
        let taken = merged.map_err(NodeError::from).and_then(|n| {
            info!("node slot {slot} died with {n} dirty chunks");
            // It may have been rebuilding a leg: nobody else finishes that.
            self.array.take_over_recoveries(slot)?;
            Ok(())
        });
        if let Err(e) = taken {
            // The slot is still held: nobody else recovers it, so we try again.
            self.node.retry_recovery(slot);
            return Err(e);
        }
        // Its bits are ours now: our reads of its chunks go to one leg until they
        // are resynced. The other survivors' reads go to one leg as long as the
        // slot is held (their watch is not granted, or corosync counts fewer
        // members than slots held): it is released once the chunks are resynced
        // (or the resync stopped: then our own slot holds the bits), not before —
        // the resync may wait long behind another node's. Meanwhile a new node
        // cannot take this slot.
        let resynced = self.resync();
        self.node.release_slot(slot)?;
        resynced
    }
}

#[cfg(test)]
mod tests;
