//! A cluster node serving a mirror: joins the array's lockspace, writes its own
//! bitmap slot, takes over the bits of free slots, resyncs under the cluster-wide
//! resync lock with announced windows, and recovers the slots of nodes that died.

use super::comms::CommsError;
use super::membership::{JoinError, Node};
use crate::dlm::LockSpace;
use crate::md::message::{ClusterMsg, MsgType};
use crate::raid1::array::MetadataSync;
use crate::raid1::metadata::LegMetadata;
use crate::raid1::Array;
use crate::storage::Leg;
use log::info;
use std::io;
use std::sync::{Arc, Mutex};

/// Chunks announced per resync window.
pub const WINDOW_CHUNKS: u64 = 32;

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
struct ClusterMetadata {
    comms: Arc<super::comms::Comms>,
    array: std::sync::Weak<Array>,
}

impl MetadataSync for ClusterMetadata {
    fn update(&self, write: &mut dyn FnMut() -> io::Result<()>) -> io::Result<()> {
        let array = self.array.clone();
        self.comms
            .under_token(|| {
                let r = write();
                let msg = r.is_ok().then(|| {
                    let mut m = ClusterMsg::new(MsgType::MetadataUpdated, 0);
                    m.raid_slot = array
                        .upgrade()
                        .and_then(|a| a.first_good_dev())
                        .unwrap_or(0);
                    m
                });
                (r, msg)
            })
            .map_err(|e| io::Error::other(format!("cluster metadata update: {e}")))?
    }
}

/// What the receive loop of a joining node has before its array exists.
#[derive(Default)]
struct Early {
    array: Option<Arc<Array>>,
    queued: Vec<ClusterMsg>,
}

/// Applies another node's message to our array.
fn apply(a: &Array, m: &ClusterMsg) {
    match m.kind {
        // Returns once our writes in the window finished: then ack.
        MsgType::Resyncing => a.bitmap.set_remote_window(m.slot, m.low, m.high),
        MsgType::MetadataUpdated => {
            if let Err(e) = a.reload_superblocks() {
                log::warn!("cannot re-read the superblocks: {e}");
            }
        }
        _ => {}
    }
}

/// A node of a clustered mirror.
pub struct ClusterNode {
    /// Membership and messaging.
    pub node: Node,
    /// The mirror, writing this node's bitmap slot.
    pub array: Arc<Array>,
}

impl ClusterNode {
    /// Joins: claims a slot, assembles the legs with that slot's bitmap, installs
    /// live nodes' resync windows, and takes over the bits of free slots.
    pub fn join(ls: Arc<dyn LockSpace>, legs: Vec<Arc<dyn Leg>>) -> Result<ClusterNode, NodeError> {
        let first = legs
            .first()
            .ok_or_else(|| NodeError::Array("no legs".into()))?;
        let meta = LegMetadata::load(&**first)
            .map_err(|e| NodeError::Array(format!("leg {}: {e}", first.name())))?;
        if !meta.bitmap().is_clustered() {
            return Err(NodeError::Array(
                "the array's bitmap is not clustered (create it with --cluster-name)".into(),
            ));
        }
        let nodes = meta.bitmap().slots();
        // Messages that arrive before the array exists are kept and applied once
        // it does: a window announced or ended meanwhile must not be lost.
        let early: Arc<Mutex<Early>> = Arc::new(Mutex::new(Early::default()));
        let e2 = early.clone();
        let node = Node::join(
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
                apply(&a, &m);
            }),
        )?;
        let (array, report) =
            Array::assemble_as(legs, node.slot).map_err(|e| NodeError::Array(e.to_string()))?;
        for l in &report.left_out {
            log::warn!("{l}");
        }
        let array = Arc::new(array);
        array.set_metadata_sync(Arc::new(ClusterMetadata {
            comms: node.comms.clone(),
            array: Arc::downgrade(&array),
        }));
        {
            // The windows read at join, then what was announced since, in order.
            let mut g = early.lock().unwrap_or_else(|e| e.into_inner());
            for &(slot, lo, hi) in &node.windows_at_join {
                info!("node slot {slot} is resyncing sectors {lo}..{hi}");
                array.bitmap.set_remote_window(slot, lo, hi);
            }
            for m in std::mem::take(&mut g.queued) {
                apply(&array, &m);
            }
            g.array = Some(array.clone());
        }
        for &s in &node.free_at_join {
            let n = array.merge_slot(s, true)?;
            if n > 0 {
                info!("took over {n} dirty chunks of free node slot {s}");
            }
            node.release_slot(s)?;
        }
        Ok(ClusterNode { node, array })
    }

    /// Copies every needed chunk under the cluster-wide resync lock, announcing
    /// each window so the other nodes hold their writes there. Returns bytes copied.
    pub fn resync(&self) -> Result<u64, NodeError> {
        if self.array.bitmap.next_needed(0).is_none() {
            return Ok(0);
        }
        self.node.acquire_resync()?;
        let r = self.resync_locked();
        let released = self.node.release_resync();
        let n = r?;
        released?;
        Ok(n)
    }

    fn resync_locked(&self) -> Result<u64, NodeError> {
        let g = self.array.bitmap.geometry();
        let mut copied = 0;
        let mut from = 0;
        while let Some(c) = self.array.bitmap.next_needed(from) {
            let end = (c + WINDOW_CHUNKS).min(g.chunks());
            let hi = g.chunk_start(end).min(self.array.size);
            self.node.announce_window(g.chunk_start(c), hi)?;
            for chunk in c..end {
                if self.array.bitmap.is_needed(g.chunk_start(chunk), 1) {
                    copied += self.array.resync_chunk(chunk)?;
                }
            }
            from = end;
        }
        Ok(copied)
    }

    /// Recovers the slot of a node that died: takes over and clears its bits,
    /// lifts its resync window, releases the slot, resyncs. Returns the bytes copied.
    pub fn recover(&self, slot: u32) -> Result<u64, NodeError> {
        let n = self.array.merge_slot(slot, true)?;
        info!("node slot {slot} died with {n} dirty chunks");
        // Its window's chunks are needed now (in its bits, merged): ours to resync.
        self.array.bitmap.clear_remote_window_of(slot);
        self.node.release_slot(slot)?;
        self.resync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlm::local::{HoldingMember, LocalDlm};
    use crate::raid1::metadata::{create_array, NewArray};
    use crate::storage::MemLeg;
    use std::io::IoSlice;
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    /// Two 64 MiB in-memory legs of a clustered array (4 slots, 1 MiB chunks).
    fn clustered_legs() -> (Arc<MemLeg>, Arc<MemLeg>, Vec<LegMetadata>) {
        let a: Arc<MemLeg> = Arc::new(MemLeg::new("a", 64 * MIB));
        let b: Arc<MemLeg> = Arc::new(MemLeg::new("b", 64 * MIB));
        let (_, metas) = create_array(
            &[&*a, &*b],
            &NewArray {
                name: "t".into(),
                cluster_name: Some("prod".into()),
                nodes: 4,
                bitmap_chunk: Some(MIB),
                assume_clean: true,
                now: 0,
                uuid: None,
            },
        )
        .unwrap();
        (a, b, metas)
    }

    #[test]
    fn a_leg_failed_on_one_node_is_failed_on_the_others() {
        let (a, b, metas) = clustered_legs();
        let ls_name = metas[0].sb.set_uuid.lockspace_name();
        let legs = || vec![a.clone() as Arc<dyn Leg>, b.clone() as Arc<dyn Leg>];
        let dlm = LocalDlm::new();
        let n1 = ClusterNode::join(Arc::new(dlm.join(&ls_name, 32)), legs()).unwrap();
        let n2 = ClusterNode::join(Arc::new(dlm.join(&ls_name, 32)), legs()).unwrap();
        let before = n2.array.events();
        n1.array.fail_leg("b").unwrap();
        // When fail_leg returned, node 2 had processed METADATA_UPDATED.
        assert!(n2.array.is_degraded(), "node 2 stopped using leg b");
        assert_eq!(n2.array.events(), before + 1);
        assert_eq!(n1.array.events(), n2.array.events());
        // Node 2 now writes to leg a only.
        n2.array.write(0, &[IoSlice::new(&[7u8; 4096])]).unwrap();
        let off = (metas[0].sb.data_offset * 512) as usize;
        assert_eq!(a.contents()[off], 7);
        assert_eq!(b.contents()[off], 0);
        // Bringing the leg back needs the other nodes' cooperation: refused for now.
        let e = n1.array.re_add_leg("b").unwrap_err().to_string();
        assert!(e.contains("other nodes"), "{e}");
    }

    #[test]
    fn a_survivor_resyncs_exactly_what_a_dead_node_left_dirty() {
        let (a, b, metas) = clustered_legs();
        let ls_name = metas[0].sb.set_uuid.lockspace_name();
        let legs = || vec![a.clone() as Arc<dyn Leg>, b.clone() as Arc<dyn Leg>];
        let dlm = LocalDlm::new();
        let m1 = dlm.join(&ls_name, 32);
        let id1 = m1.node();
        let n1 = ClusterNode::join(Arc::new(m1), legs()).unwrap();
        let n2 = ClusterNode::join(Arc::new(dlm.join(&ls_name, 32)), legs()).unwrap();
        assert_eq!((n1.node.slot, n2.node.slot), (0, 1));
        // Node 1 writes chunk 3 on both legs, then "crashes" in the middle of a
        // second write to chunk 3 that reached only leg a.
        let data = vec![0x11u8; 4096];
        n1.array.write(3 * 2048, &[IoSlice::new(&data)]).unwrap();
        let data_offset = metas[0].sb.data_offset * 512;
        a.write_at(&[0x22u8; 4096], data_offset + 3 * MIB + 8192)
            .unwrap();
        dlm.kill(&ls_name, id1);
        // Node 2 sees the death through its watch, recovers node 1's slot.
        let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(slot, 0);
        let copied = n2.recover(slot).unwrap();
        assert_eq!(copied, MIB, "exactly the one dirty chunk");
        let (ca, cb) = (a.contents(), b.contents());
        let data = (data_offset as usize)..(data_offset + 63 * MIB) as usize;
        assert!(
            ca[data.clone()] == cb[data],
            "legs identical after recovery"
        );
        let m = LegMetadata::load(&*b).unwrap();
        assert_eq!(
            m.bitmaps[0].bits.count_dirty(),
            0,
            "the dead node's bits are cleared"
        );
        assert!(
            m.bitmaps[1].bits.get(3),
            "the survivor carries them until its daemon clears them"
        );
    }

    #[test]
    fn a_window_that_ends_while_a_node_joins_does_not_hold_its_writes() {
        let (a, b, metas) = clustered_legs();
        let ls_name = metas[0].sb.set_uuid.lockspace_name();
        let legs = || vec![a.clone() as Arc<dyn Leg>, b.clone() as Arc<dyn Leg>];
        let dlm = LocalDlm::new();
        let n1 = ClusterNode::join(Arc::new(dlm.join(&ls_name, 32)), legs()).unwrap();
        n1.node.acquire_resync().unwrap();
        n1.node.announce_window(0, 4 * 2048).unwrap();
        // Node 2 reads that window while joining and stops before announcing
        // itself; meanwhile node 1's resync ends.
        let (m, reached, go) = HoldingMember::new(
            dlm.join(&ls_name, 32),
            |name, mode| name == crate::cluster::comms::TOKEN && mode == crate::dlm::Mode::Ex,
            1,
        );
        let ls: Arc<dyn crate::dlm::LockSpace> = Arc::new(m);
        let l2 = legs();
        let joining = std::thread::spawn(move || ClusterNode::join(ls, l2));
        reached.recv_timeout(Duration::from_secs(5)).unwrap();
        n1.node.release_resync().unwrap();
        go.send(()).unwrap();
        let n2 = Arc::new(joining.join().unwrap().unwrap());
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let n2w = n2.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(n2w.array.write(2048, &[IoSlice::new(&[5u8; 4096])]));
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("the write is not held by the window that ended")
            .unwrap();
    }

    #[test]
    fn the_window_of_a_node_that_died_while_resyncing_is_lifted_by_its_recovery() {
        let (a, b, metas) = clustered_legs();
        let ls_name = metas[0].sb.set_uuid.lockspace_name();
        let legs = || vec![a.clone() as Arc<dyn Leg>, b.clone() as Arc<dyn Leg>];
        let dlm = LocalDlm::new();
        let m1 = dlm.join(&ls_name, 32);
        let id1 = m1.node();
        let n1 = ClusterNode::join(Arc::new(m1), legs()).unwrap();
        let n2 = Arc::new(ClusterNode::join(Arc::new(dlm.join(&ls_name, 32)), legs()).unwrap());
        n1.node.acquire_resync().unwrap();
        n1.node.announce_window(0, 4 * 2048).unwrap();
        dlm.kill(&ls_name, id1);
        let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
        n2.recover(slot).unwrap();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let n2w = n2.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(n2w.array.write(2048, &[IoSlice::new(&[5u8; 4096])]));
        });
        done.recv_timeout(Duration::from_secs(5))
            .expect("the dead node's window no longer holds writes")
            .unwrap();
    }
}
