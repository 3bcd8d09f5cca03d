//! Tests of a cluster node on in-memory legs and the in-process lock manager.
//!
//! Long file: each scenario builds two or three nodes of one array with the
//! helpers at the top; they are one suite.

use super::*;
use crate::dlm::local::{HoldingMember, LocalDlm};
use crate::raid1::metadata::{create_array, LegMetadata, NewArray};
use crate::raid1::Array;
use crate::storage::MemLeg;
use std::io::IoSlice;
use std::time::Duration;

/// The node the product runs: serving the array.
type ClusterNode = super::ClusterNode<Array>;

const MIB: u64 = 1 << 20;

/// A clustered array on two in-memory legs, and the lock manager its nodes join.
struct Cluster {
    a: Arc<MemLeg>,
    b: Arc<MemLeg>,
    metas: Vec<LegMetadata>,
    dlm: LocalDlm,
    ls_name: String,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_chunk(MIB)
    }

    fn with_chunk(chunk: u64) -> Cluster {
        let (a, b, metas) = clustered_legs(chunk);
        let ls_name = metas[0].sb.set_uuid.lockspace_name();
        Cluster {
            a,
            b,
            metas,
            dlm: LocalDlm::new(),
            ls_name,
        }
    }

    fn legs(&self) -> Vec<Arc<dyn Leg>> {
        vec![
            self.a.clone() as Arc<dyn Leg>,
            self.b.clone() as Arc<dyn Leg>,
        ]
    }

    /// A node joining: the node and its lock manager id (for `dlm.kill`).
    fn join(&self) -> (ClusterNode, crate::dlm::NodeId) {
        let m = self.dlm.join(&self.ls_name, 32);
        let id = m.node();
        (ClusterNode::join(Arc::new(m), self.legs()).unwrap(), id)
    }
}

/// Two 64 MiB in-memory legs of a clustered array (4 slots, `chunk` bytes a chunk).
fn clustered_legs(chunk: u64) -> (Arc<MemLeg>, Arc<MemLeg>, Vec<LegMetadata>) {
    let a: Arc<MemLeg> = Arc::new(MemLeg::new("a", 64 * MIB));
    let b: Arc<MemLeg> = Arc::new(MemLeg::new("b", 64 * MIB));
    let (_, metas) = create_array(
        &[&*a, &*b],
        &NewArray {
            name: "t".into(),
            cluster_name: Some("prod".into()),
            nodes: 4,
            bitmap_chunk: Some(chunk),
            assume_clean: true,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    (a, b, metas)
}

#[test]
fn a_resync_window_holds_at_most_32_mib_of_the_other_nodes_writes() {
    assert_eq!(window_chunks(MIB), 32);
    assert_eq!(window_chunks(64 * MIB), 1);
    // 4 MiB chunks: windows of 8 chunks, not 32 (128 MiB).
    let c = Cluster::with_chunk(4 * MIB);
    let (n1, _) = c.join();
    let (n2, _) = c.join();
    n1.array.bitmap.mark_all_needed();
    n1.array
        .counters
        .resync_max_rate
        .store(64 * MIB, Ordering::Relaxed);
    let n1 = Arc::new(n1);
    let r = {
        let n1 = n1.clone();
        std::thread::spawn(move || n1.resync())
    };
    let mut widest = 0;
    while !r.is_finished() {
        if let Some((_, lo, hi)) = n2.array.bitmap.remote_window() {
            widest = widest.max(hi - lo);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.join().unwrap().unwrap(), n1.array.size * 512, "copied");
    // (The window as installed on node 2: in chunks.)
    assert!(widest > 0, "no window seen");
    assert!(
        widest * 4 * MIB <= WINDOW_BYTES,
        "a window of {} MiB",
        widest * 4
    );
}

#[test]
fn a_leg_failed_on_one_node_is_failed_on_the_others() {
    let c = Cluster::new();
    let (n1, _) = c.join();
    let (n2, _) = c.join();
    let before = n2.array.events();
    n1.array.fail_leg("b").unwrap();
    // When fail_leg returned, node 2 had processed METADATA_UPDATED.
    assert!(n2.array.is_degraded(), "node 2 stopped using leg b");
    assert_eq!(n2.array.events(), before + 1);
    assert_eq!(n1.array.events(), n2.array.events());
    // Node 2 now writes to leg a only.
    n2.array.write(0, &[IoSlice::new(&[7u8; 4096])]).unwrap();
    let off = (c.metas[0].sb.data_offset * 512) as usize;
    assert_eq!(c.a.contents()[off], 7);
    assert_eq!(c.b.contents()[off], 0);
    // Node 2 re-adds it: node 1 writes it again at once, node 2 rebuilds it,
    // including the chunk node 1 wrote while it was out.
    n1.array
        .write(5 * 2048, &[IoSlice::new(&[9u8; 4096])])
        .unwrap();
    assert_eq!(
        n2.array.re_add_leg("b").unwrap(),
        crate::raid1::manage::RecoveryKind::Bitmap
    );
    let b_state = |n: &ClusterNode| {
        n.array
            .members()
            .iter()
            .flatten()
            .find(|m| m.name() == "b")
            .map(|m| m.state())
    };
    assert_eq!(b_state(&n1), Some(crate::raid1::LegState::Recovering));
    n1.array
        .write(7 * 2048, &[IoSlice::new(&[5u8; 4096])])
        .unwrap();
    assert_eq!(
        c.b.contents()[off + 7 * MIB as usize],
        5,
        "node 1 writes leg b again"
    );
    // Node 1's recovery pass must not declare the leg in sync: node 2 rebuilds it.
    n1.array.finish_recovery().unwrap();
    assert_eq!(b_state(&n1), Some(crate::raid1::LegState::Recovering));
    let copied = n2.resync().unwrap();
    assert!(copied >= 2 * MIB, "chunks 0 and 5 rebuilt: {copied}");
    n2.array.finish_recovery().unwrap();
    assert_eq!(b_state(&n2), Some(crate::raid1::LegState::InSync));
    assert_eq!(b_state(&n1), Some(crate::raid1::LegState::InSync));
    assert!(!n1.array.is_degraded());
    assert_eq!(
        c.b.contents()[off + 5 * MIB as usize],
        9,
        "node 1's write while out"
    );
    assert_eq!(c.b.contents()[off], 7);
}

#[test]
fn a_leg_added_on_one_node_must_be_found_by_the_others() {
    let cl = Cluster::new();
    let c: Arc<MemLeg> = Arc::new(MemLeg::new("c", 64 * MIB));
    let (n1, _) = cl.join();
    let (n2, _) = cl.join();
    n1.array.fail_leg("b").unwrap();
    n1.array.remove_leg("b").unwrap();
    n1.array
        .write(9 * 2048, &[IoSlice::new(&[3u8; 4096])])
        .unwrap();
    // Node 1 cannot see leg c: the add is refused and changes nothing.
    let e = n2.array.add_leg(c.clone()).unwrap_err().to_string();
    assert!(e.contains("did not find"), "{e}");
    assert!(n2.array.members().iter().flatten().all(|m| m.name() != "c"));
    assert!(n1.array.is_degraded() && n2.array.is_degraded());
    // Once node 1 can, it is added everywhere; node 2 rebuilds it.
    let c2 = c.clone();
    n1.set_device_finder(Box::new(move |u| {
        let sb = crate::raid1::metadata::read_superblock(&*c2).ok()?;
        (sb.device_uuid == *u).then(|| c2.clone() as Arc<dyn Leg>)
    }));
    let slot = n2.array.add_leg(c.clone()).unwrap();
    let c_state = |n: &ClusterNode| {
        n.array.members()[slot]
            .as_ref()
            .filter(|m| m.name() == "c")
            .map(|m| m.state())
    };
    assert_eq!(c_state(&n1), Some(crate::raid1::LegState::Recovering));
    n1.array
        .write(11 * 2048, &[IoSlice::new(&[4u8; 4096])])
        .unwrap();
    let off = (cl.metas[0].sb.data_offset * 512) as usize;
    assert_eq!(
        c.contents()[off + 11 * MIB as usize],
        4,
        "node 1 writes leg c"
    );
    n1.array.finish_recovery().unwrap();
    assert_eq!(c_state(&n1), Some(crate::raid1::LegState::Recovering));
    n2.resync().unwrap();
    n2.array.finish_recovery().unwrap();
    assert_eq!(c_state(&n2), Some(crate::raid1::LegState::InSync));
    assert_eq!(c_state(&n1), Some(crate::raid1::LegState::InSync));
    let data = off..off + 63 * MIB as usize;
    assert!(
        cl.a.contents()[data.clone()] == c.contents()[data],
        "leg c is a full copy"
    );
    // A third add of an unknown device is refused again (node 1 took no-new-dev back).
    let d: Arc<MemLeg> = Arc::new(MemLeg::new("d", 64 * MIB));
    n1.array.fail_leg("c").unwrap();
    n1.array.remove_leg("c").unwrap();
    let e = n2.array.add_leg(d).unwrap_err().to_string();
    assert!(e.contains("did not find"), "{e}");
}

#[test]
fn recovering_a_dead_node_leaves_a_live_nodes_rebuild_alone() {
    let c = Cluster::new();
    let (n1, _) = c.join();
    let (n2, _) = c.join();
    let (n3, id3) = c.join();
    let b_state = |n: &ClusterNode| {
        n.array
            .members()
            .iter()
            .flatten()
            .find(|m| m.name() == "b")
            .map(|m| m.state())
    };
    // Node 1 takes leg b out, writes while it is out, and puts it back: node 1
    // rebuilds it (chunk 5), the others write it and wait for node 1.
    n1.array.fail_leg("b").unwrap();
    n1.array
        .write(5 * 2048, &[IoSlice::new(&[9u8; 4096])])
        .unwrap();
    n1.array.re_add_leg("b").unwrap();
    assert_eq!(b_state(&n2), Some(crate::raid1::LegState::Recovering));
    // Node 3 dies; node 2 recovers its slot: node 1's rebuild is not node 2's.
    c.dlm.kill(&c.ls_name, id3);
    // The survivors see the death one after the other; node 1 may be first.
    if let Ok(slot) = n1.node.dead.recv_timeout(Duration::from_millis(500)) {
        assert_eq!(slot, n3.node.slot);
        n1.recover(slot).unwrap();
    }
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(slot, n3.node.slot);
    n2.recover(slot).unwrap();
    n2.array.finish_recovery().unwrap();
    assert_eq!(
        b_state(&n2),
        Some(crate::raid1::LegState::Recovering),
        "node 2 took over (and ended) the rebuild node 1 runs"
    );
    // Node 1 finishes its rebuild; everybody sees leg b in sync.
    n1.resync().unwrap();
    n1.array.finish_recovery().unwrap();
    assert_eq!(b_state(&n1), Some(crate::raid1::LegState::InSync));
    assert_eq!(b_state(&n2), Some(crate::raid1::LegState::InSync));
    drop(n3);
}

#[test]
fn a_survivor_resyncs_exactly_what_a_dead_node_left_dirty() {
    let c = Cluster::new();
    let (n1, id1) = c.join();
    let (n2, _) = c.join();
    assert_eq!((n1.node.slot, n2.node.slot), (1, 2));
    // Node 1 writes chunk 3 on both legs, then "crashes" in the middle of a
    // second write to chunk 3 that reached only leg a.
    let data = vec![0x11u8; 4096];
    n1.array.write(3 * 2048, &[IoSlice::new(&data)]).unwrap();
    let data_offset = c.metas[0].sb.data_offset * 512;
    c.a.write_at(&[0x22u8; 4096], data_offset + 3 * MIB + 8192)
        .unwrap();
    c.dlm.kill(&c.ls_name, id1);
    // Node 2 sees the death through its watch, recovers node 1's slot.
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(slot, 1);
    let copied = n2.recover(slot).unwrap();
    assert_eq!(copied, MIB, "exactly the one dirty chunk");
    let (ca, cb) = (c.a.contents(), c.b.contents());
    let data = (data_offset as usize)..(data_offset + 63 * MIB) as usize;
    assert!(
        ca[data.clone()] == cb[data],
        "legs identical after recovery"
    );
    let m = LegMetadata::load(&*c.b).unwrap();
    assert_eq!(
        m.bitmaps[1].bits.count_dirty(),
        0,
        "the dead node's bits are cleared"
    );
    assert!(
        m.bitmaps[2].bits.get(3),
        "the survivor carries them until its daemon clears them"
    );
}

#[test]
fn a_stopping_node_leaves_its_resync_undone_and_the_lock_free() {
    let c = Cluster::new();
    let (_n1, id1, n2) = node_died_mid_write(&c);
    c.dlm.kill(&c.ls_name, id1);
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    n2.array.halt_resync();
    assert_eq!(n2.recover(slot).unwrap(), 0, "nothing copied once halted");
    assert_eq!(n2.array.bitmap.stats().needed, 1, "chunk 3 still needed");
    let m = LegMetadata::load(&*c.b).unwrap();
    assert!(m.bitmaps[2].bits.get(3), "and dirty in node 2's slot");
    // The resync lock is free for the next node.
    let (n3, _) = c.join();
    n3.node.acquire_resync().unwrap();
    n3.node.release_resync().unwrap();
}

/// Two nodes; node 1 wrote chunk 3, then "died" in the middle of a second write
/// there that reached leg a only. Returns node 1 (its process lives on until its
/// lock manager member is killed), its lock manager id, and node 2.
fn node_died_mid_write(c: &Cluster) -> (ClusterNode, crate::dlm::NodeId, ClusterNode) {
    let (n1, id1) = c.join();
    let (n2, _) = c.join();
    write_torn_by_death(c, &n1);
    (n1, id1, n2)
}

/// Node `n` writes chunk 3, then a second write there reaches leg a only.
fn write_torn_by_death(c: &Cluster, n: &ClusterNode) {
    n.array
        .write(3 * 2048, &[IoSlice::new(&[0x11u8; 4096])])
        .unwrap();
    let data_offset = c.metas[0].sb.data_offset * 512;
    c.a.write_at(&[0x22u8; 4096], data_offset + 3 * MIB)
        .unwrap();
}

/// How many different versions of chunk 3 eight reads through `n` return.
fn versions_read(n: &ClusterNode) -> usize {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let mut buf = vec![0u8; 4096];
        n.array
            .read(3 * 2048, &mut [std::io::IoSliceMut::new(&mut buf)])
            .unwrap();
        seen.insert(buf[0]);
    }
    seen.len()
}

#[test]
fn reads_stay_on_one_leg_from_a_nodes_departure_until_its_bits_are_taken_over() {
    let c = Cluster::new();
    let (_n1, id1, n2) = node_died_mid_write(&c);
    // Corosync counts node 1 as a member: reads are balanced, and show both legs.
    n2.peers_alive(1);
    assert!(!n2.view().reads_from_one_leg);
    assert_eq!(versions_read(&n2), 2, "balanced reads see both legs");
    // Corosync reports node 1 gone; the DLM has not recovered it yet (its slot
    // lock is still held): every read comes from the same leg.
    n2.peers_alive(0);
    assert!(n2.view().reads_from_one_leg);
    assert_eq!(
        versions_read(&n2),
        1,
        "one leg while node 1's bits are not ours"
    );
    // The DLM releases node 1's locks; the survivor takes its bits over and
    // resyncs: balancing resumes, the legs agree.
    c.dlm.kill(&c.ls_name, id1);
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(n2.view().reads_from_one_leg);
    n2.recover(slot).unwrap();
    assert!(!n2.view().reads_from_one_leg);
    assert_eq!(
        versions_read(&n2),
        1,
        "after resync both legs hold the same"
    );
}

/// Three survivors of node 1, which died in the middle of a write (the legs
/// differ in chunk 3); node 4 is resyncing, so the survivor that takes node 1's
/// bits over cannot resync them yet. Until it has, no survivor balances reads
/// there: the one without the bits must not return one leg's version and then
/// the other's. Without corosync: the embedded lock managers report members.
#[test]
fn no_survivor_balances_reads_over_a_dead_nodes_chunks_before_their_resync() {
    survivors_read_one_leg_until_the_resync(false);
}

/// The same while a fifth node starts: a member of the lockspace without a
/// slot yet must not hide the dead node's slot, which a survivor holds.
#[test]
fn a_starting_node_does_not_let_survivors_balance_reads_before_the_resync() {
    survivors_read_one_leg_until_the_resync(true);
}

fn survivors_read_one_leg_until_the_resync(starting_member: bool) {
    let c = Cluster::new();
    let (n1, id1) = c.join();
    let n2 = Arc::new(c.join().0);
    let n3 = Arc::new(c.join().0);
    let (n4, _) = c.join();
    write_torn_by_death(&c, &n1);
    n4.node.acquire_resync().unwrap();
    c.dlm.kill(&c.ls_name, id1);
    let starting = starting_member.then(|| c.dlm.join(&c.ls_name, 32));
    // Whichever survivor's watch fires first recovers node 1; its resync waits
    // for node 4's. The other recovers the slot when it gets it.
    let (slot, r, o) = crossbeam_channel::select! {
        recv(n2.node.dead) -> s => (s.unwrap(), n2.clone(), n3.clone()),
        recv(n3.node.dead) -> s => (s.unwrap(), n3.clone(), n2.clone()),
        default(Duration::from_secs(5)) => panic!("no survivor saw node 1 die"),
    };
    let r2 = r.clone();
    let recovered = std::thread::spawn(move || r2.recover(slot));
    let o2 = o.clone();
    let other = std::thread::spawn(move || {
        let s = o2.node.dead.recv_timeout(Duration::from_secs(20)).unwrap();
        o2.recover(s)
    });
    std::thread::sleep(Duration::from_millis(500));
    for (n, who) in [(&r, "the recovering survivor"), (&o, "the other survivor")] {
        assert_eq!(
            versions_read(n),
            1,
            "{who} balanced reads over chunks not resynced yet"
        );
    }
    // The starting node gives up (a node that gets a slot is watched).
    drop(starting);
    n4.node.release_resync().unwrap();
    recovered.join().unwrap().unwrap();
    other.join().unwrap().unwrap();
    assert!(!o.view().reads_from_one_leg && !r.view().reads_from_one_leg);
    for n in [&r, &o] {
        assert_eq!(versions_read(n), 1, "after the resync the legs agree");
    }
}

#[test]
fn without_corosync_reads_stay_on_one_leg_from_the_watch_to_the_merge() {
    let c = Cluster::new();
    let (_n1, id1, n2) = node_died_mid_write(&c);
    assert!(!n2.view().reads_from_one_leg, "both nodes alive");
    c.dlm.kill(&c.ls_name, id1);
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    // The watch fired; node 1's bits are not merged yet.
    assert!(n2.view().reads_from_one_leg);
    assert_eq!(versions_read(&n2), 1, "one leg until the merge");
    n2.recover(slot).unwrap();
    assert!(!n2.view().reads_from_one_leg);
}

#[test]
fn a_window_that_ends_while_a_node_joins_does_not_hold_its_writes() {
    let c = Cluster::new();
    let (n1, _) = c.join();
    n1.node.acquire_resync().unwrap();
    n1.node.announce_window(0, 4 * 2048).unwrap();
    // Node 2 reads that window while joining and stops before announcing
    // itself; meanwhile node 1's resync ends.
    let (m, reached, go) = HoldingMember::new(
        c.dlm.join(&c.ls_name, 32),
        |name, mode| name == crate::cluster::comms::TOKEN && mode == crate::dlm::Mode::Ex,
        1,
    );
    let ls: Arc<dyn crate::dlm::LockSpace> = Arc::new(m);
    let l2 = c.legs();
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

/// Node `n` writes into the first window chunks; the write must complete in 5 s.
fn write_completes(n: &Arc<ClusterNode>, held: &str) {
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let n = n.clone();
    std::thread::spawn(move || {
        let _ = done_tx.send(n.array.write(2048, &[IoSlice::new(&[5u8; 4096])]));
    });
    done.recv_timeout(Duration::from_secs(5))
        .expect(held)
        .unwrap();
}

#[test]
fn a_recovery_that_fails_lifts_the_window_and_is_tried_again() {
    use crate::storage::{Faults, FaultyLeg};
    let c = Cluster::new();
    let (n1, id1) = c.join();
    let faults = Faults::none();
    let legs: Vec<Arc<dyn Leg>> = c
        .legs()
        .into_iter()
        .map(|l| Arc::new(FaultyLeg::new(l, faults.clone())) as Arc<dyn Leg>)
        .collect();
    let n2 = Arc::new(ClusterNode::join(Arc::new(c.dlm.join(&c.ls_name, 32)), legs).unwrap());
    n1.node.acquire_resync().unwrap();
    n1.node.announce_window(0, 4 * 2048).unwrap();
    c.dlm.kill(&c.ls_name, id1);
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    // Its bitmap cannot be read now: the recovery fails...
    faults.fail_reads.store(true, Ordering::SeqCst);
    assert!(n2.recover(slot).is_err());
    faults.fail_reads.store(false, Ordering::SeqCst);
    // ...but its window no longer holds writes,
    write_completes(
        &n2,
        "a failed recovery left the dead node's window holding writes",
    );
    // and the slot comes back to be recovered again, which then succeeds.
    let again = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(again, slot);
    n2.recover(again).unwrap();
    assert_eq!(n2.array.bitmap.stats().needed, 0);
}

/// Node 2 has a write in flight when node 1 announces a resync window over it;
/// the write then fails on one leg. Recording that failure needs the token, which
/// node 1 holds until node 2 acknowledges the window; node 2 acknowledges once its
/// writes in the window are over. Neither may wait for the other: the window is
/// acknowledged, the failure recorded, and the write completes once the window
/// has moved on, on the leg still in sync.
#[test]
fn a_leg_failing_under_another_nodes_new_resync_window_does_not_deadlock() {
    leg_failing_under_a_new_window(false);
}

/// The same through the asynchronous path (the write runs off the worker, as it
/// does on a leg that stopped answering).
#[test]
fn an_asynchronous_write_failing_under_a_new_window_does_not_deadlock() {
    leg_failing_under_a_new_window(true);
}

/// Legs a (whose writes from array sector `from` on stall until the returned
/// release file exists) and b of `c`; the directory of the release file.
fn legs_stalling_a(
    c: &Cluster,
    tag: &str,
    from: u64,
) -> (
    Vec<Arc<dyn Leg>>,
    Arc<crate::storage::Faults>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use crate::storage::{Faults, FaultyLeg};
    let dir = std::env::temp_dir().join(format!("vumd-node-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let release = dir.join("release");
    let _ = std::fs::remove_file(&release);
    let faults = Faults::none();
    // The bitmap and superblocks lie before the data.
    let data_start = c.metas[0].sb.data_offset * 512;
    faults
        .stall_writes_from
        .store(data_start + from * 512, Ordering::SeqCst);
    faults.stall_until.set(release.clone()).unwrap();
    let legs: Vec<Arc<dyn Leg>> = vec![
        Arc::new(FaultyLeg::new(c.a.clone(), faults.clone())),
        c.b.clone(),
    ];
    (legs, faults, release, dir)
}

fn leg_failing_under_a_new_window(async_io: bool) {
    let c = Cluster::new();
    let (n1, _) = c.join();
    // Data writes to leg a stall.
    let (legs, faults, release, dir) = legs_stalling_a(&c, &format!("{async_io}"), 0);
    let data_start = c.metas[0].sb.data_offset * 512;
    let n2 = Arc::new(ClusterNode::join(Arc::new(c.dlm.join(&c.ls_name, 32)), legs).unwrap());
    let (wrote_tx, wrote) = crossbeam_channel::bounded(1);
    let n2w = n2.clone();
    std::thread::spawn(move || {
        let data = [7u8; 4096];
        let r = if async_io {
            let mut io = crate::raid1::AsyncIo::new(8).unwrap();
            let bufs = crate::raid1::Buffers::owned(data.to_vec());
            n2w.array.submit_write(&mut io, 1, 2048, bufs);
            io.submit().unwrap();
            io.drain(&n2w.array).unwrap();
            let mut done = io.take_done();
            assert_eq!(done.len(), 1);
            done.remove(0).1
        } else {
            n2w.array.write(2048, &[IoSlice::new(&data)])
        };
        let _ = wrote_tx.send(r);
    });
    std::thread::sleep(Duration::from_millis(300));
    n1.node.acquire_resync().unwrap();
    let (announced_tx, announced) = crossbeam_channel::bounded(1);
    let n1 = Arc::new(n1);
    let n1a = n1.clone();
    std::thread::spawn(move || {
        let _ = announced_tx.send(n1a.node.announce_window(0, 4 * 2048));
    });
    // Node 2 now waits for its write before acknowledging; the write fails.
    std::thread::sleep(Duration::from_millis(300));
    faults.fail_writes_now();
    std::fs::write(&release, b"").unwrap();
    announced
        .recv_timeout(Duration::from_secs(10))
        .expect("node 2 never acknowledged the window: its failed write waits for the token")
        .unwrap();
    // Node 1 resyncs its window taking leg a for in sync, as it does until it
    // hears of the failure: leg a's old data lands on leg b, over the write.
    let mut old = [0u8; 4096];
    c.a.read_at(&mut old, data_start + 2048 * 512).unwrap();
    c.b.write_at(&old, data_start + 2048 * 512).unwrap();
    assert!(
        wrote.recv_timeout(Duration::from_millis(500)).is_err(),
        "the write completed inside node 1's resync window"
    );
    n1.node.release_resync().unwrap();
    wrote
        .recv_timeout(Duration::from_secs(10))
        .expect("the write never completed")
        .unwrap();
    // The failure is on disk and node 1 knows it; the data is on leg b: the
    // write went there again once the failure was recorded.
    assert_eq!(
        n1.array.members()[0].as_ref().unwrap().state(),
        crate::raid1::LegState::Faulty
    );
    let mut got = [0u8; 4096];
    c.b.read_at(&mut got, data_start + 2048 * 512).unwrap();
    assert!(got.iter().all(|&x| x == 7), "leg b lacks the write");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An operator's `fail` on node 2 while node 1 announces a resync window over
/// one of node 2's writes: node 2's receive thread waits for that write, and
/// node 1 holds the token until it acknowledges. A second write on the same
/// worker finishes while the failure is not on disk yet: recording it waits for
/// the token, and the worker must go on completing the write in the window
/// meanwhile, or no node can send a message again.
#[test]
fn a_write_waiting_for_a_failure_record_does_not_stop_its_worker() {
    let c = Cluster::new();
    let (n1, _) = c.join();
    let win = 8 * 2048u64;
    // Leg a's data writes from the window on stall.
    let (legs, _faults, release, dir) = legs_stalling_a(&c, "park", win);
    let data_start = c.metas[0].sb.data_offset * 512;
    let n2 = Arc::new(ClusterNode::join(Arc::new(c.dlm.join(&c.ls_name, 32)), legs).unwrap());
    let (go_tx, go) = crossbeam_channel::bounded::<()>(1);
    let (done_tx, done) = crossbeam_channel::bounded(1);
    let n2w = n2.clone();
    std::thread::spawn(move || {
        let in_window = [2u8; 4096];
        let outside = [1u8; 4096];
        let iov = |d: &[u8; 4096]| crate::raid1::Buffers::owned(d.to_vec());
        let mut io = crate::raid1::AsyncIo::new(8).unwrap();
        n2w.array.submit_write(&mut io, 2, win, iov(&in_window));
        io.submit().unwrap();
        let _ = go.recv();
        n2w.array.submit_write(&mut io, 1, 0, iov(&outside));
        io.submit().unwrap();
        io.drain(&n2w.array).unwrap();
        let _ = done_tx.send(io.take_done());
    });
    std::thread::sleep(Duration::from_millis(300));
    n1.node.acquire_resync().unwrap();
    let (announced_tx, announced) = crossbeam_channel::bounded(1);
    let n1 = Arc::new(n1);
    let n1a = n1.clone();
    std::thread::spawn(move || {
        let _ = announced_tx.send(n1a.node.announce_window(win, win + 2048));
    });
    // Node 2's receive thread now waits for the write in the window.
    std::thread::sleep(Duration::from_millis(300));
    let (failed_tx, failed) = crossbeam_channel::bounded(1);
    let n2f = n2.clone();
    std::thread::spawn(move || {
        let _ = failed_tx.send(n2f.array.fail_leg("b"));
    });
    std::thread::sleep(Duration::from_millis(300));
    // The second write ends on leg a while the failure of b is not recorded.
    go_tx.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&release, b"").unwrap();
    announced
        .recv_timeout(Duration::from_secs(10))
        .expect("node 2 never acknowledged the window: its worker waits for the token")
        .unwrap();
    n1.node.release_resync().unwrap();
    failed
        .recv_timeout(Duration::from_secs(10))
        .expect("the operator's fail never returned")
        .unwrap();
    let mut results = done
        .recv_timeout(Duration::from_secs(10))
        .expect("the writes never completed");
    results.sort_by_key(|r| r.0);
    assert_eq!(results.len(), 2);
    for (token, r) in results {
        assert!(r.is_ok(), "write {token}: {r:?}");
    }
    for (sector, byte) in [(0u64, 1u8), (win, 2)] {
        let mut got = [0u8; 4096];
        c.a.read_at(&mut got, data_start + sector * 512).unwrap();
        assert!(
            got.iter().all(|&x| x == byte),
            "leg a lacks the write at {sector}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_window_of_a_node_that_died_while_resyncing_is_lifted_by_its_recovery() {
    let c = Cluster::new();
    let (n1, id1) = c.join();
    let n2 = Arc::new(ClusterNode::join(Arc::new(c.dlm.join(&c.ls_name, 32)), c.legs()).unwrap());
    n1.node.acquire_resync().unwrap();
    n1.node.announce_window(0, 4 * 2048).unwrap();
    c.dlm.kill(&c.ls_name, id1);
    let slot = n2.node.dead.recv_timeout(Duration::from_secs(5)).unwrap();
    n2.recover(slot).unwrap();
    write_completes(&n2, "the dead node's window still holds writes");
}

/// The chunks a kernel md-cluster node (Linux 6.1) resyncs when it assembles the
/// array alone in `own` slot, from what is on disk (`md_bitmap_load`):
/// `gather_all_resync_info` merges every other (free) slot's bits into its own
/// bitmap pages, which are still blank then, and writes them over its slot
/// (`md_bitmap_copy_from_slot` → `md_bitmap_unplug`); `resync_offset` becomes
/// the first merged chunk if lower; `md_bitmap_init_from_disk` then reads its slot
/// back and marks a set bit NEEDED if the chunk ends at or after `resync_offset`.
fn kernel_assembly_resyncs(meta: &LegMetadata, own: usize) -> Vec<u64> {
    let bm = &meta.bitmaps;
    let chunks = bm[own].bits.chunks();
    let chunk_sectors = u64::from(bm[own].sb.chunksize) / 512;
    // Bitmap page p of a slot holds these chunks (the first page starts with
    // the 256-byte superblock).
    let page = |c: u64| (c + 256 * 8) / (4096 * 8);
    let merged: Vec<u64> = (0..bm.len())
        .filter(|&s| s != own)
        .flat_map(|s| (0..chunks).filter(move |&c| bm[s].bits.get(c)))
        .collect();
    let written: std::collections::HashSet<u64> = merged.iter().map(|&c| page(c)).collect();
    let mut start = meta.sb.resync_offset;
    if let Some(&lo) = merged.iter().min() {
        start = start.min(lo * chunk_sectors);
    }
    (0..chunks)
        .filter(|&c| {
            if written.contains(&page(c)) {
                merged.contains(&c)
            } else {
                bm[own].bits.get(c)
            }
        })
        .filter(|&c| (c + 1) * chunk_sectors >= start)
        .collect()
}

#[test]
fn a_kernel_node_taking_over_after_all_of_ours_died_resyncs_what_they_left_dirty() {
    let c = Cluster::new();
    let (n1, id1) = c.join();
    let (n2, id2) = c.join();
    n1.array.mark_active().unwrap();
    // Both write and die before their bits are cleared: two slots are dirty.
    for c in [3u64, 4, 40] {
        n1.array
            .write(c * 2048, &[IoSlice::new(&[1u8; 4096])])
            .unwrap();
    }
    for c in [7u64, 50] {
        n2.array
            .write(c * 2048, &[IoSlice::new(&[2u8; 4096])])
            .unwrap();
    }
    c.dlm.kill(&c.ls_name, id1);
    c.dlm.kill(&c.ls_name, id2);
    let m = LegMetadata::load(&*c.a).unwrap();
    let dirty: Vec<Vec<u64>> = m
        .bitmaps
        .iter()
        .map(|bm| (0..bm.bits.chunks()).filter(|&c| bm.bits.get(c)).collect())
        .collect();
    assert!(
        dirty[0].is_empty(),
        "no node of ours wrote slot 0: {dirty:?}"
    );
    assert_eq!(
        dirty.iter().filter(|d| !d.is_empty()).count(),
        2,
        "{dirty:?}"
    );
    // A kernel node assembling alone takes slot 0 and resyncs all of them.
    assert_eq!(kernel_assembly_resyncs(&m, 0), vec![3, 4, 7, 40, 50]);
    // (Had it taken a dirty slot, that slot's bits would be lost, as observed on
    // Debian's 6.1 kernel.)
    let s1 = n1.node.slot as usize;
    assert_eq!(kernel_assembly_resyncs(&m, s1), vec![7, 50]);
    drop((n1, n2));
}
