//! Joining an md-cluster array without DLM callbacks (spec §7.2, profile U32):
//! a node claims the first free `bitmapNNNN` slot lock (in [`claim_order`]: slot 0
//! last) with NOQUEUE PW under the `token`, announces itself with NODE_JOINED, and
//! watches every occupied slot with a blocking NL→PW request that the DLM grants only
//! when the owner's PW is gone — that grant is how a peer's death is seen.

mod lvb;

pub use lvb::{decode_owner, decode_window, encode_window};

use super::comms::{new_nl_lock, Comms, CommsError, Handler};
use crate::dlm::{flags, LockId, Mode, NodeId, Status};
use crate::md::message::{ClusterMsg, MsgType};
use crossbeam_channel::{unbounded, Receiver, Sender};
use log::{info, warn};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Only one node resyncs at a time: it holds this lock in EX.
pub const RESYNC: &[u8] = b"resync";

/// The `bitmapNNNN` lock of slot `s`.
pub fn bitmap_lock_name(s: u32) -> Vec<u8> {
    format!("bitmap{s:04}").into_bytes()
}

/// The order in which a joining node tries the slots: 1, 2, …, `nodes − 1`, then 0.
///
/// Slot 0 is the one a kernel md-cluster node takes when it assembles the array on
/// its own (the first member of a lockspace gets DLM slot 1, md slot 0), and the
/// kernel drops the dirty bits of the slot it takes whenever another free slot has
/// dirty bits too: `md_bitmap_load` (Linux 6.1) runs `load_bitmaps` →
/// `gather_all_resync_info` → `md_bitmap_copy_from_slot(…, clear_bits = false)`
/// before `md_bitmap_init_from_disk` has read its own slot, and the
/// `md_bitmap_unplug` there writes its own still blank bitmap pages, now holding only
/// the merged bits, over its slot on disk. The bits of the other slots are always
/// merged and resynced. So while fewer nodes of ours than slots run, slot 0 stays
/// clean, and a kernel node that takes the array over after all of ours died resyncs
/// every chunk they left dirty.
pub fn claim_order(nodes: u32) -> impl Iterator<Item = u32> {
    (1..nodes).chain(0..nodes.min(1))
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Messaging or locking failed.
    #[error(transparent)]
    Comms(#[from] CommsError),
    /// Every slot is held by a live node.
    #[error("all {0} node slots of the array are in use")]
    Full(u32),
}

/// Watches on other nodes' slots.
struct Watches {
    comms: Arc<Comms>,
    bitmaps: Vec<LockId>,
    armed: Mutex<HashSet<u32>>,
    /// Slots whose owner is gone and that are not recovered yet.
    gone: Mutex<HashSet<u32>>,
    /// How many other nodes corosync counts, when it is asked.
    live: Mutex<Option<usize>>,
    /// Who holds a slot (lock manager node id), where known: from the slot's
    /// value block at our join, or from the node's NODE_JOINED.
    owners: Mutex<HashMap<u32, NodeId>>,
    /// Slots whose known owner the lock manager or corosync reported down, until
    /// we recovered them (a survivor holds such a slot until the dead node's
    /// chunks are resynced: counting members cannot see that while another member
    /// has no slot yet).
    down: Mutex<HashSet<u32>>,
    /// Told whether reads must stay on one leg, whenever that may have changed.
    read_balancing: Mutex<Option<ReadBalancingSink>>,
    /// Slots a message came from (their owner has joined).
    heard: Mutex<HashSet<u32>>,
    dead: Sender<u32>,
}

/// Receives "reads must stay on one leg" (true) or "balance again" (false).
pub type ReadBalancingSink = Box<dyn Fn(bool) + Send + Sync>;

impl Watches {
    /// Reads stay on one leg while a slot's owner is gone and its bits are not merged
    /// (from the watch's grant to the slot's release), and, with corosync's count
    /// or the embedded lock managers' member reports, while fewer other nodes are
    /// alive than hold slots (a node died and its slot is not recovered yet: the
    /// node that recovers it holds it until the dead node's chunks are resynced).
    fn update_read_balancing(&self) {
        // Decided and applied under the sink's lock: the last update applied is
        // the one that saw the last change.
        let sink = self
            .read_balancing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(f) = sink.as_ref() else { return };
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner()).len();
        let armed = self.armed.lock().unwrap_or_else(|e| e.into_inner()).len();
        let live = *self.live.lock().unwrap_or_else(|e| e.into_inner());
        let down = !self
            .down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        f(gone > 0 || down || live.is_some_and(|n| armed + gone > n));
    }
}

impl Watches {
    /// Node `id` holds `slot` (0: not known).
    fn set_owner(&self, slot: u32, id: NodeId) {
        if id != 0 && slot != self.comms.slot() {
            self.owners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(slot, id);
        }
    }

    /// Node `id` is down: the slot it held stays suspect until we recovered it.
    fn node_down(&self, id: NodeId) {
        let slots: Vec<u32> = {
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            let slots = owners
                .iter()
                .filter(|&(_, &o)| o == id)
                .map(|(&s, _)| s)
                .collect::<Vec<_>>();
            for s in &slots {
                owners.remove(s);
            }
            slots
        };
        if slots.is_empty() {
            return;
        }
        {
            let armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
            let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
            let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
            for s in slots {
                if armed.contains(&s) || gone.contains(&s) {
                    info!("node {id} (slot {s}) is down: reads stay on one leg until its slot is recovered");
                    down.insert(s);
                }
            }
        }
        self.update_read_balancing();
    }

    /// `n` other members are alive (corosync's group, or the lock manager's report).
    fn set_live(&self, n: usize) {
        *self.live.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
        self.update_read_balancing();
    }

    /// Queues a blocking NL→PW on `slot`'s lock; its grant reports the owner dead.
    fn arm(self: &Arc<Self>, slot: u32) {
        if self.reserve(slot) {
            self.arm_reserved(slot);
        }
    }

    /// Marks `slot` as watched, so that nothing else converts its lock; false when
    /// it is ours, out of range or already watched.
    fn reserve(&self, slot: u32) -> bool {
        if slot == self.comms.slot() || slot as usize >= self.bitmaps.len() {
            return false;
        }
        self.armed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot)
    }

    /// A message came from `slot`: its owner has joined. Watches it.
    fn heard_from(self: &Arc<Self>, slot: u32) {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(slot);
        self.arm(slot);
    }

    /// Gives up a reservation without watching (the slot turned out free).
    fn unreserve(&self, slot: u32) {
        self.armed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
    }

    /// Arms the watch on a slot [`Watches::reserve`] marked.
    fn arm_reserved(self: &Arc<Self>, slot: u32) {
        let lock = self.bitmaps[slot as usize];
        let rx = self.comms.router().expect(lock);
        if let Err(e) =
            self.comms
                .ls()
                .convert(lock, Mode::Pw, flags::CONVERT | flags::VALBLK, None)
        {
            warn!("cannot watch node slot {slot}: {e}");
            self.armed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&slot);
            return;
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{slot}"))
            .spawn(move || match rx.recv() {
                Ok((Status::Granted, _)) => {
                    me.gone
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(slot);
                    me.armed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&slot);
                    me.update_read_balancing();
                    info!("node in slot {slot} is gone: its bitmap is ours to recover");
                    let _ = me.dead.send(slot);
                }
                Ok((st, _)) => {
                    me.armed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&slot);
                    warn!("watch on slot {slot} ended with {st:?}");
                }
                Err(_) => {}
            });
        if let Err(e) = spawned {
            warn!("cannot start the watch on slot {slot}: {e}");
        }
    }
}

/// A joined node.
pub struct Node {
    /// Messaging.
    pub comms: Arc<Comms>,
    /// Our 0-based slot.
    pub slot: u32,
    watches: Arc<Watches>,
    /// Slots whose owner died, one report per death; the slot's lock is held in PW
    /// until [`Node::release_slot`].
    pub dead: Receiver<u32>,
    /// Slots after ours (in [`claim_order`]) found free at join; their locks are held in PW until
    /// [`Node::release_slot`], after their bitmaps (a departed node's bits) were merged.
    pub free_at_join: Vec<u32>,
    /// Resync windows `(slot, lo, hi)` live nodes had announced when we joined.
    pub windows_at_join: Vec<(u32, u64, u64)>,
    resync: LockId,
    own: LockId,
}

/// The pause before a failed recovery of a dead node's slot is tried again.
pub const RECOVERY_RETRY: Duration = Duration::from_millis(500);

/// How long a join waits for a slot while every slot is held: a slot may be held
/// only for a moment, by a node that joined at the same time and merges the free
/// slots' bits, or by a survivor that recovers a dead node's slot.
pub const SLOT_WAIT: Duration = Duration::from_secs(10);

impl Node {
    /// Joins the lockspace of `comms`-to-be as a node of an array with `nodes`
    /// slots, waiting up to [`SLOT_WAIT`] for a slot.
    pub fn join(
        ls: Arc<dyn crate::dlm::LockSpace>,
        nodes: u32,
        handler: Handler,
    ) -> Result<Node, JoinError> {
        Node::join_waiting(ls, nodes, handler, SLOT_WAIT)
    }

    /// Joins as [`Node::join`] does, waiting up to `slot_wait` while every slot is
    /// held (zero: refuse at once).
    pub fn join_waiting(
        ls: Arc<dyn crate::dlm::LockSpace>,
        nodes: u32,
        mut handler: Handler,
        slot_wait: Duration,
    ) -> Result<Node, JoinError> {
        let (comms, basts) = Comms::create(ls.clone())?;
        let router = comms.router().clone();
        let resync = new_nl_lock(&*ls, &router, RESYNC, 0)?;
        let mut bitmaps = Vec::with_capacity(nodes as usize);
        for s in 0..nodes {
            bitmaps.push(new_nl_lock(
                &*ls,
                &router,
                &bitmap_lock_name(s),
                flags::VALBLK,
            )?);
        }
        let started = std::time::Instant::now();
        let (slot, occupied) = loop {
            comms.step("token NL->EX", comms.token(), Mode::Ex, 0, None)?;
            let claimed = (|| -> Result<Option<(u32, Vec<u32>)>, CommsError> {
                let mut occupied = Vec::new();
                for s in claim_order(nodes) {
                    let rx = router.expect(bitmaps[s as usize]);
                    ls.convert(
                        bitmaps[s as usize],
                        Mode::Pw,
                        flags::CONVERT | flags::NOQUEUE | flags::VALBLK,
                        None,
                    )
                    .map_err(CommsError::Dlm)?;
                    match rx.recv_timeout(super::comms::STEP_TIMEOUT) {
                        Ok((Status::Granted, _)) => return Ok(Some((s, occupied))),
                        Ok((Status::Again, _)) => occupied.push(s),
                        Ok((st, _)) => return Err(CommsError::Status("slot probe", st)),
                        Err(_) => {
                            return Err(CommsError::Timeout(
                                "slot probe",
                                super::comms::STEP_TIMEOUT,
                            ))
                        }
                    }
                }
                Ok(None)
            })();
            let armed = match claimed {
                Ok(Some((slot, occupied))) => {
                    comms.set_slot(slot);
                    comms
                        .step("ack NL->CR", comms.ack(), Mode::Cr, 0, None)
                        .and_then(|_| {
                            comms.step("no-new-dev NL->CR", comms.no_new_dev(), Mode::Cr, 0, None)
                        })
                        .map(|_| (slot, occupied))
                }
                Ok(None) => Err(CommsError::Status("slot claim", Status::Again)),
                Err(e) => Err(e),
            };
            let token_back = comms.step("token EX->NL", comms.token(), Mode::Nl, 0, None);
            match armed {
                Ok(x) => {
                    token_back?;
                    break x;
                }
                Err(CommsError::Status("slot claim", _)) if started.elapsed() < slot_wait => {
                    token_back?;
                    // Another node may hold a free slot only while it merges its bits:
                    // ask again once it let go (with a pause of its own per node, so
                    // that joiners do not keep meeting each other).
                    let pause = 20 + u64::from(ls.node() % 8) * 10;
                    std::thread::sleep(Duration::from_millis(pause));
                }
                Err(CommsError::Status("slot claim", _)) => return Err(JoinError::Full(nodes)),
                Err(e) => return Err(e.into()),
            }
        };
        let (dead_tx, dead_rx) = unbounded();
        let watches = Arc::new(Watches {
            comms: comms.clone(),
            bitmaps,
            armed: Mutex::new(HashSet::new()),
            gone: Mutex::new(HashSet::new()),
            live: Mutex::new(None),
            owners: Mutex::new(HashMap::new()),
            down: Mutex::new(HashSet::new()),
            read_balancing: Mutex::new(None),
            heard: Mutex::new(HashSet::new()),
            dead: dead_tx,
        });
        // Our slot's value block names us, for the nodes that join later.
        let own_lvb = encode_window(0, 0, ls.node(), ls.lvb_len());
        comms.step(
            "own slot PW->PW",
            watches.bitmaps[slot as usize],
            Mode::Pw,
            flags::VALBLK,
            Some(&own_lvb),
        )?;
        // Where the lock manager reports members (the embedded ones), its count
        // stands for corosync's: a death is known before the slot's lock is free.
        let w_live = Arc::downgrade(&watches);
        comms.peers().on_change(Box::new(move |n| {
            if let Some(w) = w_live.upgrade() {
                w.set_live(n);
            }
        }));
        let w_down = Arc::downgrade(&watches);
        comms.peers().on_down(Box::new(move |id| {
            if let Some(w) = w_down.upgrade() {
                w.node_down(id);
            }
        }));
        // Live nodes' resync windows, read with CR before anything else converts
        // these locks: before the receive loop, which arms the watch on the slot
        // of every message's sender. A window announced from now on reaches us as
        // a message (our ack lock is armed), processed once the loop runs.
        //
        // A slot held with no owner in its value block is no node's: another
        // joiner holds it for a moment to merge its bits (or a node that has
        // just claimed it has not named itself yet, and its NODE_JOINED will
        // arm the watch). Watched, it would be reported dead once let go.
        let mut windows_at_join = Vec::new();
        let mut taken = Vec::new();
        for &s in &occupied {
            let lock = watches.bitmaps[s as usize];
            let lvb = comms.step("slot NL->CR", lock, Mode::Cr, flags::VALBLK, None)?;
            comms.step("slot CR->NL", lock, Mode::Nl, 0, None)?;
            let lvb = lvb.as_deref().unwrap_or(&[]);
            let (lo, hi) = decode_window(lvb);
            if hi > 0 {
                windows_at_join.push((s, lo, hi));
            }
            let owner = decode_owner(lvb);
            if owner != 0 {
                watches.set_owner(s, owner);
                taken.push(s);
            }
        }
        let w2 = watches.clone();
        comms.start_receiving(
            basts,
            Box::new(move |m: ClusterMsg| {
                // Watch a (re)joined slot before this message is acknowledged.
                w2.heard_from(m.slot);
                if m.kind == MsgType::NodeJoined {
                    w2.set_owner(m.slot, NodeId::try_from(m.low).unwrap_or(0));
                }
                handler(m)
            }),
        )?;
        for &s in &taken {
            watches.arm(s);
        }
        let mut joined = ClusterMsg::new(MsgType::NodeJoined, slot);
        joined.low = u64::from(ls.node());
        joined.high = u64::from(std::process::id());
        comms.send(joined)?;
        // Slots after ours in the claim order: free ones are reported (their bits
        // need merging), taken ones are watched. A slot whose node sent us a
        // message meanwhile is watched already (the receive loop armed it): taken,
        // and its lock busy.
        let mut free_at_join = Vec::new();
        for s in claim_order(nodes).skip_while(|&s| s != slot).skip(1) {
            if !watches.reserve(s) {
                continue;
            }
            let lock = watches.bitmaps[s as usize];
            let rx = router.expect(lock);
            if let Err(e) = ls.convert(
                lock,
                Mode::Pw,
                flags::CONVERT | flags::NOQUEUE | flags::VALBLK,
                None,
            ) {
                watches.unreserve(s);
                return Err(CommsError::Dlm(e).into());
            }
            match rx.recv_timeout(super::comms::STEP_TIMEOUT) {
                Ok((Status::Granted, _)) => {
                    // Kept in PW until the caller merged its bits (release_slot).
                    watches.unreserve(s);
                    free_at_join.push(s);
                }
                Ok((Status::Again, _)) => {
                    // Held: who holds it is in its value block; held by nobody
                    // named, it is free (see above) and not watched.
                    let lvb = comms.step("slot NL->CR", lock, Mode::Cr, flags::VALBLK, None)?;
                    comms.step("slot CR->NL", lock, Mode::Nl, 0, None)?;
                    let owner = decode_owner(lvb.as_deref().unwrap_or(&[]));
                    if owner != 0 {
                        watches.set_owner(s, owner);
                        watches.arm_reserved(s);
                    } else {
                        watches.unreserve(s);
                        // A NODE_JOINED from it while it was reserved armed nothing.
                        let heard = watches
                            .heard
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .contains(&s);
                        if heard {
                            watches.arm(s);
                        }
                    }
                }
                Ok((st, _)) => return Err(CommsError::Status("slot probe", st).into()),
                Err(_) => {
                    return Err(
                        CommsError::Timeout("slot probe", super::comms::STEP_TIMEOUT).into(),
                    )
                }
            }
        }
        info!("joined as node slot {slot}");
        let own = watches.bitmaps[slot as usize];
        Ok(Node {
            comms,
            slot,
            watches,
            dead: dead_rx,
            free_at_join,
            windows_at_join,
            resync,
            own,
        })
    }

    /// A recovery of dead `slot` failed (it still holds the slot): report the slot
    /// on [`Node::dead`] again, after a pause, to be recovered once more.
    pub fn retry_recovery(&self, slot: u32) {
        let dead = self.watches.dead.clone();
        let spawned = std::thread::Builder::new()
            .name("recovery-retry".into())
            .spawn(move || {
                std::thread::sleep(RECOVERY_RETRY);
                let _ = dead.send(slot);
            });
        if let Err(e) = spawned {
            warn!("cannot schedule another recovery of node slot {slot}: {e}");
        }
    }

    /// After recovering a dead node's slot (or merging a free one): lets a new node
    /// take it. The slot's value block is rewritten with no resync window: the
    /// dead node's window, read (flagged not valid) when we took the lock, must
    /// not be written back as valid for the slot's next owner.
    pub fn release_slot(&self, slot: u32) -> Result<(), CommsError> {
        let lock = self.watches.bitmaps[slot as usize];
        let none = encode_window(0, 0, 0, self.comms.ls().lvb_len());
        self.comms.step(
            "recovered slot PW->NL",
            lock,
            Mode::Nl,
            flags::VALBLK,
            Some(&none),
        )?;
        self.watches
            .gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
        self.watches
            .down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&slot);
        self.watches.update_read_balancing();
        Ok(())
    }

    /// Takes the cluster-wide `resync` lock (EX): only one node resyncs at a time.
    /// Waits as long as another node resyncs.
    pub fn acquire_resync(&self) -> Result<(), CommsError> {
        loop {
            match self
                .comms
                .step("resync NL->EX", self.resync, Mode::Ex, 0, None)
            {
                Ok(_) => return Ok(()),
                Err(CommsError::Timeout(..)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Publishes our resync window `[lo, hi)` (array sectors) in our slot lock's
    /// LVB and tells every node, which hold writes there before acknowledging.
    /// `hi == 0` announces that our resync finished.
    pub fn announce_window(&self, lo: u64, hi: u64) -> Result<(), CommsError> {
        let lvb = encode_window(lo, hi, self.comms.ls().node(), self.comms.ls().lvb_len());
        self.comms.step(
            "own slot PW->PW",
            self.own,
            Mode::Pw,
            flags::VALBLK,
            Some(&lvb),
        )?;
        let mut m = ClusterMsg::new(MsgType::Resyncing, self.slot);
        m.low = lo;
        m.high = hi;
        self.comms.send(m)
    }

    /// Announces the end of our resync and lets another node resync.
    pub fn release_resync(&self) -> Result<(), CommsError> {
        self.announce_window(0, 0)?;
        self.comms
            .step("resync EX->NL", self.resync, Mode::Nl, 0, None)?;
        Ok(())
    }

    /// Where the read-balancing decision goes (the array); applied at once.
    pub fn set_read_balancing_sink(&self, f: ReadBalancingSink) {
        *self
            .watches
            .read_balancing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
        self.watches.update_read_balancing();
    }

    /// Corosync counts `n` other members in this array's group.
    pub fn set_live_peers(&self, n: usize) {
        self.watches.set_live(n);
    }

    /// Corosync reports node `id` left: the slot it held, when we know it, keeps
    /// reads on one leg until we recovered it.
    pub fn peer_left(&self, id: NodeId) {
        self.watches.node_down(id);
    }

    /// Slots currently watched.
    pub fn watched(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .watches
            .armed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests;
