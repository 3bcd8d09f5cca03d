//! The seam between the mirror and the cluster, as the kernel's
//! `md_cluster_operations` is md's. Both directions are here: what the mirror asks
//! of the cluster ([`MetadataSync`]), and what a cluster node may do to the mirror
//! ([`ClusterMirror`]: typed [`ClusterEvent`]s from other nodes, the recovery of a
//! dead node's slot, the resync copy). A cluster node is generic over
//! [`ClusterMirror`] and uses nothing else of `raid1` (see ARCHITECTURE.md;
//! `tests/layers.rs` checks it); the array implements it in `raid1::array::seam`.

use super::metadata::LegMetadata;
use crate::bitmap::WriteIntent;
use crate::md::Uuid;
use crate::storage::Leg;
use std::io;
use std::sync::Arc;

/// What another node did that changes this node's mirror, as its messages and
/// the lock manager tell it.
pub enum ClusterEvent {
    /// Node `slot` resyncs array sectors `[lo, hi)` (`lo == hi`: its resync
    /// ended): our writes there wait. Applied once this node's writes in the range
    /// have finished, so the message may then be acknowledged.
    WindowSet {
        /// The resyncing node's slot.
        slot: u32,
        /// First sector.
        lo: u64,
        /// End sector.
        hi: u64,
    },
    /// Node `slot`'s window holds our writes no more (it died; its chunks are
    /// ours to resync).
    WindowCleared {
        /// The node's slot.
        slot: u32,
    },
    /// Node `from` wrote the superblocks: read them again and apply what changed.
    MetadataUpdated {
        /// The writing node's slot.
        from: u32,
    },
    /// Node `slot` adds device `dev_number` (`uuid`), found here as `leg`: take it
    /// as a candidate for the role the next metadata update gives it.
    NewDisk {
        /// The adding node's slot.
        slot: u32,
        /// The role it is to get.
        dev_number: u32,
        /// Its device uuid.
        uuid: Uuid,
        /// This node's handle on it.
        leg: Arc<dyn Leg>,
    },
    /// A node left with its dirty chunks not yet taken over (`true`), or they
    /// are (`false`): reads stay on one leg meanwhile.
    ReadsFromOneLeg(bool),
}

/// What a cluster node may do to the mirror it serves.
pub trait ClusterMirror: Send + Sync + Sized + 'static {
    /// Assembles `legs` as node slot `slot` (under the cluster's token: no other
    /// node writes superblocks meanwhile). Legs left out are logged and kept for
    /// a later re-add.
    fn assemble_as_node(legs: Vec<Arc<dyn Leg>>, slot: u32) -> Result<Self, String>;
    /// Superblock updates go through `sync` from now on, and leg failures are
    /// recorded by a thread of the mirror's own (a record waits for the token).
    fn attach(self: &Arc<Self>, sync: Arc<dyn MetadataSync>) -> io::Result<()>;
    /// Applies what another node did.
    fn apply(&self, event: ClusterEvent) -> io::Result<()>;
    /// This node's write-intent bitmap (read only: needed chunks, windows, geometry).
    fn bitmap(&self) -> &WriteIntent;
    /// The array's size in sectors.
    fn sectors(&self) -> u64;
    /// The device number of the first in-sync leg, whose superblock others read.
    fn first_good_dev(&self) -> Option<u32>;
    /// Whether reads go to one leg (see [`ClusterEvent::ReadsFromOneLeg`]).
    fn reads_from_one_leg(&self) -> bool;
    /// A rebuild guided by the bitmaps is under way: every other slot's dirty
    /// chunks are needed here too (without clearing them there).
    fn gather_for_rebuild(&self) -> io::Result<()>;
    /// Takes over slot `slot`'s dirty chunks (merged from every leg) and clears
    /// them on disk; returns how many there were.
    fn take_over_slot(&self, slot: u32) -> io::Result<u64>;
    /// Legs node `slot` was rebuilding become this node's to finish; returns
    /// whether there were any.
    fn take_over_recoveries(&self, slot: u32) -> io::Result<bool>;
    /// The process is stopping: a resync ends after the chunk it copies.
    fn resync_halted(&self) -> bool;
    /// Copies chunk `chunk` to every leg that needs it; returns the bytes copied
    /// per target.
    fn resync_chunk(&self, chunk: u64) -> io::Result<u64>;
}

/// Coordinates superblock updates with other nodes: runs `write` while no other
/// node can write superblocks, then tells the others to re-read them.
pub trait MetadataSync: Send + Sync {
    /// Runs `write` under the cluster's token: it writes the superblocks, or
    /// returns `Ok(false)` when it found nothing left to write (another update
    /// wrote it meanwhile), which is then not announced.
    fn update(&self, write: &mut dyn FnMut() -> io::Result<bool>) -> io::Result<()>;
    /// Tells the other nodes that leg `dev_number` is being re-added here.
    fn re_adding(&self, dev_number: u32) -> io::Result<()>;
    /// Tells the other nodes that faulty leg `dev_number` is being removed here.
    fn removing(&self, dev_number: u32) -> io::Result<()>;
    /// Announces new device `dev_number` (`device_uuid`) and, once every other
    /// node found it, runs `write` (the superblocks giving it its role).
    fn add_device(
        &self,
        dev_number: u32,
        device_uuid: Uuid,
        write: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()>;
}

/// Why a leg cannot be joined as a cluster node.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The leg's metadata cannot be read.
    #[error("leg {leg}: {why}")]
    Metadata {
        /// The leg.
        leg: String,
        /// What went wrong.
        why: String,
    },
    /// The array is not clustered.
    #[error("the array's bitmap is not clustered (create it with --cluster-name)")]
    NotClustered,
}

/// How many node slots the clustered array on `leg` has (its bitmap's `nodes`).
pub fn node_slots(leg: &dyn Leg) -> Result<u32, PortError> {
    let meta = LegMetadata::load(leg).map_err(|e| PortError::Metadata {
        leg: leg.name().to_string(),
        why: e.to_string(),
    })?;
    if !meta.bitmap().is_clustered() {
        return Err(PortError::NotClustered);
    }
    Ok(meta.bitmap().slots())
}
