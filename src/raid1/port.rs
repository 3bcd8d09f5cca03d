//! The mirror's side of its seam with the cluster, as the kernel's
//! `md_cluster_operations` is md's: what the mirror asks of the cluster, and what a
//! cluster node may read of the array before it joins. A cluster node uses nothing
//! else of `raid1` (see ARCHITECTURE.md; `tests/layers.rs` checks it).

use super::metadata::LegMetadata;
use crate::md::Uuid;
use crate::storage::Leg;
use std::io;

/// Coordinates superblock updates with other nodes: runs `write` while no other
/// node can write superblocks, then tells the others to re-read them.
pub trait MetadataSync: Send + Sync {
    /// Runs `write` (which writes the superblocks) under the cluster's token.
    fn update(&self, write: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()>;
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
