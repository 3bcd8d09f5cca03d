use super::*;
use crate::dlm::local::{HoldingMember, LocalDlm};
use crate::dlm::LockSpace;
use std::time::{Duration, Instant};

const LS: &str = "e88edab4-15cf-da55-5971-384545de2349";

fn join(dlm: &LocalDlm) -> (Node, u32) {
    let m = dlm.join(LS, 32);
    let id = m.node();
    let ls: Arc<dyn LockSpace> = Arc::new(m);
    (settled(Node::join(ls, 4, Box::new(|_| {})).unwrap()), id)
}

/// Releases the free slots a join holds (nothing to merge here).
fn settled(n: Node) -> Node {
    for &s in &n.free_at_join {
        n.release_slot(s).unwrap();
    }
    n
}

fn wait_watched(n: &Node, want: &[u32]) {
    let start = Instant::now();
    while n.watched() != want {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "watched {:?}, want {want:?}",
            n.watched()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn nodes_take_the_first_free_slots_slot_0_last_and_watch_each_other() {
    assert_eq!(claim_order(4).collect::<Vec<_>>(), vec![1, 2, 3, 0]);
    assert_eq!(claim_order(1).collect::<Vec<_>>(), vec![0]);
    let dlm = LocalDlm::new();
    let (a, _) = join(&dlm);
    let (b, _) = join(&dlm);
    let (c, _) = join(&dlm);
    assert_eq!((a.slot, b.slot, c.slot), (1, 2, 3));
    assert_eq!(a.free_at_join, vec![2, 3, 0]);
    assert_eq!(c.free_at_join, vec![0]);
    wait_watched(&a, &[2, 3]);
    wait_watched(&b, &[1, 3]);
    wait_watched(&c, &[1, 2]);
    let (d, _) = join(&dlm);
    assert_eq!(d.slot, 0);
    assert!(d.free_at_join.is_empty());
    wait_watched(&d, &[1, 2, 3]);
    let e = Node::join_waiting(
        Arc::new(dlm.join(LS, 32)),
        4,
        Box::new(|_| {}),
        Duration::ZERO,
    );
    assert!(matches!(e, Err(JoinError::Full(4))));
}

#[test]
fn a_join_waits_for_a_slot_another_joiner_holds_while_it_merges() {
    let dlm = LocalDlm::new();
    // A joins and holds the free slots 2, 3 and 0 (to merge their bits).
    let a = Node::join(Arc::new(dlm.join(LS, 32)), 4, Box::new(|_| {})).unwrap();
    assert_eq!((a.slot, a.free_at_join.clone()), (1, vec![2, 3, 0]));
    // B joins meanwhile: every slot is held, but only for a moment.
    let ls: Arc<dyn LockSpace> = Arc::new(dlm.join(LS, 32));
    let b = std::thread::spawn(move || Node::join(ls, 4, Box::new(|_| {})));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!b.is_finished(), "B gave up while A merged");
    let a = settled(a);
    let b = b
        .join()
        .unwrap()
        .expect("B was refused a slot A held only to merge it");
    assert_eq!(b.slot, 2);
    drop(a);
}

#[test]
fn resync_is_serialised_and_windows_reach_every_node() {
    let dlm = LocalDlm::new();
    let (tx, windows) = crossbeam_channel::unbounded();
    let ls: Arc<dyn LockSpace> = Arc::new(dlm.join(LS, 32));
    let a = settled(Node::join(ls, 4, Box::new(|_| {})).unwrap());
    let ls: Arc<dyn LockSpace> = Arc::new(dlm.join(LS, 32));
    let b = Arc::new(settled(
        Node::join(
            ls,
            4,
            Box::new(move |m| {
                if m.kind == MsgType::Resyncing {
                    let _ = tx.send((m.slot, m.low, m.high));
                }
            }),
        )
        .unwrap(),
    ));
    a.acquire_resync().unwrap();
    a.announce_window(0, 65536).unwrap();
    assert_eq!(
        windows.try_recv().unwrap(),
        (1, 0, 65536),
        "received before the send returned"
    );
    // A node joining now reads a's window from its slot lock.
    let (c, _) = join(&dlm);
    assert_eq!(c.windows_at_join, vec![(1, 0, 65536)]);
    // b cannot resync while a does.
    let b2 = b.clone();
    let t = std::thread::spawn(move || b2.acquire_resync().unwrap());
    std::thread::sleep(Duration::from_millis(100));
    assert!(!t.is_finished());
    a.release_resync().unwrap();
    assert_eq!(
        windows.recv_timeout(Duration::from_secs(5)).unwrap(),
        (1, 0, 0)
    );
    t.join().unwrap();
    b.release_resync().unwrap();
}

/// Node a (slot 1) dies while resyncing, with a window announced; node b's
/// watch on slot 1 has fired (b holds the slot until it releases it).
fn a_died_resyncing(dlm: &LocalDlm) -> Node {
    let m = dlm.join(LS, 32);
    let a_id = m.node();
    let a = settled(Node::join(Arc::new(m), 4, Box::new(|_| {})).unwrap());
    let (b, _) = join(dlm);
    a.acquire_resync().unwrap();
    a.announce_window(0, 65536).unwrap();
    dlm.kill(LS, a_id);
    assert_eq!(b.dead.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    b
}

#[test]
fn a_dead_nodes_window_is_not_installed_by_a_joiner() {
    let dlm = LocalDlm::new();
    // b holds a's slot while recovering it; a joiner reads the slot's value
    // block, which the DLM marks not valid: no window.
    let b = a_died_resyncing(&dlm);
    let (c, _) = join(&dlm);
    assert!(c.windows_at_join.is_empty(), "{:?}", c.windows_at_join);
    b.release_slot(1).unwrap();
}

#[test]
fn a_dead_node_is_seen_by_every_survivor_one_after_the_other_and_its_slot_reused() {
    let dlm = LocalDlm::new();
    let (a, _) = join(&dlm);
    let (b, b_id) = join(&dlm);
    let (c, _) = join(&dlm);
    wait_watched(&a, &[2, 3]);
    wait_watched(&c, &[1, 2]);
    dlm.kill(LS, b_id);
    // The survivors queue on slot 2; the first recovers while holding it.
    let (first, second) = match (
        a.dead.recv_timeout(Duration::from_millis(500)),
        c.dead.recv_timeout(Duration::from_millis(500)),
    ) {
        (Ok(2), Err(_)) => (&a, &c),
        (Err(_), Ok(2)) => (&c, &a),
        other => panic!("exactly one survivor recovers first: {other:?}"),
    };
    first.release_slot(2).unwrap();
    assert_eq!(second.dead.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
    second.release_slot(2).unwrap();
    drop(b);
    // A new node takes the freed slot and is watched again.
    let (n, n_id) = join(&dlm);
    assert_eq!(n.slot, 2);
    wait_watched(&a, &[2, 3]);
    wait_watched(&c, &[1, 2]);
    dlm.kill(LS, n_id);
    let got = crossbeam_channel::select! {
        recv(a.dead) -> s => s,
        recv(c.dead) -> s => s,
        default(Duration::from_secs(5)) => panic!("nobody saw the second death"),
    };
    assert_eq!(got.unwrap(), 2);
}

#[test]
fn a_message_received_while_joining_does_not_break_the_probe_of_its_senders_slot() {
    let dlm = LocalDlm::new();
    let (_a, a_id) = join(&dlm);
    let (b, _) = join(&dlm);
    dlm.kill(LS, a_id);
    assert_eq!(b.dead.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    b.release_slot(1).unwrap();
    // c takes slot 1 and, before it probes the slots after its own, receives a
    // message from b (slot 2), which makes it watch slot 2.
    let (m, reached, go) = HoldingMember::new(
        dlm.join(LS, 32),
        |name, mode| name == super::super::comms::TOKEN && mode == Mode::Ex,
        1,
    );
    let ls: Arc<dyn LockSpace> = Arc::new(m);
    let joining = std::thread::spawn(move || Node::join(ls, 4, Box::new(|_| {})));
    reached.recv_timeout(Duration::from_secs(5)).unwrap();
    b.comms
        .send(ClusterMsg::new(MsgType::MetadataUpdated, 0))
        .unwrap();
    go.send(()).unwrap();
    let c = settled(joining.join().unwrap().expect("c joins"));
    assert_eq!(c.slot, 1);
    assert!(
        c.free_at_join.iter().all(|&s| s == 3 || s == 0),
        "{:?}",
        c.free_at_join
    );
    wait_watched(&c, &[2]);
}

#[test]
fn a_message_received_while_joining_does_not_break_the_window_read_of_its_senders_slot() {
    let dlm = LocalDlm::new();
    let (a, _) = join(&dlm);
    // b (slot 2) stops where it reads a's (slot 1) resync window; a sends meanwhile.
    let (m, reached, go) = HoldingMember::new(
        dlm.join(LS, 32),
        |name, mode| name == bitmap_lock_name(1).as_slice() && mode == Mode::Cr,
        0,
    );
    let ls: Arc<dyn LockSpace> = Arc::new(m);
    let joining = std::thread::spawn(move || Node::join(ls, 4, Box::new(|_| {})));
    reached.recv_timeout(Duration::from_secs(5)).unwrap();
    let a = Arc::new(a);
    let a2 = a.clone();
    let sending =
        std::thread::spawn(move || a2.comms.send(ClusterMsg::new(MsgType::MetadataUpdated, 0)));
    // Give the message time to arrive (it is acknowledged once b receives).
    std::thread::sleep(Duration::from_millis(100));
    go.send(()).unwrap();
    let b = settled(joining.join().unwrap().expect("b joins"));
    sending.join().unwrap().unwrap();
    assert_eq!(b.slot, 2);
    wait_watched(&b, &[1]);
}

#[test]
fn a_dead_nodes_window_is_not_installed_once_its_slot_has_a_new_owner() {
    let dlm = LocalDlm::new();
    let b = a_died_resyncing(&dlm);
    b.release_slot(1).unwrap();
    // c takes slot 1; d, joining next, reads slot 1's value block.
    let (c, _) = join(&dlm);
    assert_eq!(c.slot, 1);
    let (d, _) = join(&dlm);
    assert!(d.windows_at_join.is_empty(), "{:?}", d.windows_at_join);
}

#[test]
fn free_slots_another_joiner_holds_to_merge_them_are_not_taken_for_dead_nodes() {
    let dlm = LocalDlm::new();
    // A joins (slot 1) and holds the free slots 2, 3, 4 and 0 to merge their bits;
    // it has merged slot 3 when B joins.
    let a = Node::join(Arc::new(dlm.join(LS, 32)), 5, Box::new(|_| {})).unwrap();
    assert_eq!((a.slot, a.free_at_join.clone()), (1, vec![2, 3, 4, 0]));
    a.release_slot(3).unwrap();
    // B finds slot 1 taken (A), slot 2 held (by A, to merge), takes slot 3, and
    // finds slots 4 and 0 held (by A, to merge).
    let b = Node::join(Arc::new(dlm.join(LS, 32)), 5, Box::new(|_| {})).unwrap();
    assert_eq!(b.slot, 3);
    assert!(b.free_at_join.is_empty(), "{:?}", b.free_at_join);
    for s in [2, 4, 0] {
        a.release_slot(s).unwrap();
    }
    // Nobody died: slots 2, 4 and 0 were free, held only for a moment.
    if let Ok(s) = b.dead.recv_timeout(Duration::from_millis(300)) {
        panic!("B took free slot {s} for a dead node's");
    }
    wait_watched(&b, &[1]);
    // A node that takes one of them later is watched (its NODE_JOINED arms it).
    let c = settled(Node::join(Arc::new(dlm.join(LS, 32)), 5, Box::new(|_| {})).unwrap());
    assert_eq!(c.slot, 2);
    wait_watched(&b, &[1, 2]);
}
