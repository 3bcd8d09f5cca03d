use super::*;
use crate::dlm::local::LocalDlm;
use crate::md::message::MsgType;
use std::time::Instant;

fn node(dlm: &LocalDlm, slot: u32) -> (Arc<Comms>, Receiver<ClusterMsg>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let ls: Arc<dyn LockSpace> = Arc::new(dlm.join("3578507b-e0cb-6d4f-6322-696cd7b1b10c", 32));
    let c = Comms::join(
        ls,
        slot,
        Box::new(move |m| {
            let _ = tx.send(m);
        }),
    )
    .unwrap();
    (c, rx)
}

#[test]
fn a_wait_for_a_lock_ends_when_the_member_is_gone() {
    let dlm = LocalDlm::new();
    const LS: &str = "3578507b-e0cb-6d4f-6322-696cd7b1b10c";
    let (a, _ra) = node(&dlm, 0);
    let b = dlm.join(LS, 32);
    let b_id = b.node();
    let (cb, _rb) = {
        let ls: Arc<dyn LockSpace> = Arc::new(b);
        (Comms::join(ls, 1, Box::new(|_| {})).unwrap(), ())
    };
    // B waits for a lock A holds (as a watch on a slot does)...
    let held = new_nl_lock(&**a.ls(), a.router(), b"slot", 0).unwrap();
    let rx = a.router().expect(held);
    a.ls()
        .convert(held, Mode::Ex, flags::CONVERT, None)
        .unwrap();
    rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
    let wanted = new_nl_lock(&**cb.ls(), cb.router(), b"slot", 0).unwrap();
    let waiting = cb.router().expect(wanted);
    cb.ls()
        .convert(wanted, Mode::Ex, flags::CONVERT, None)
        .unwrap();
    // ...and B dies: no grant can reach it any more, and its waiter hears so
    // (a thread waiting on it would otherwise wait forever).
    dlm.kill(LS, b_id);
    assert!(matches!(
        waiting.recv_timeout(std::time::Duration::from_secs(5)),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected)
    ));
    // A later wait of the dead member ends at once too.
    assert!(cb.router().expect(wanted).recv().is_err());
}

#[test]
fn a_message_reaches_every_other_member_once_before_send_returns() {
    let dlm = LocalDlm::new();
    let (a, ra) = node(&dlm, 0);
    let (_b, rb) = node(&dlm, 1);
    let (_c, rc) = node(&dlm, 2);
    let mut m = ClusterMsg::new(MsgType::Resyncing, 99);
    m.low = 2048;
    m.high = 4096;
    a.send(m).unwrap();
    for rx in [&rb, &rc] {
        let got = rx.try_recv().expect("processed before send returned");
        assert_eq!(
            (got.kind, got.slot, got.low, got.high),
            (MsgType::Resyncing, 0, 2048, 4096)
        );
        assert!(rx.try_recv().is_err(), "exactly once");
    }
    assert!(
        ra.try_recv().is_err(),
        "the sender does not receive its own message"
    );
}

#[test]
fn concurrent_senders_are_serialised_and_nothing_is_lost() {
    let dlm = LocalDlm::new();
    let nodes: Vec<_> = (0..3).map(|s| node(&dlm, s)).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for (c, _) in &nodes {
            s.spawn(move || {
                for i in 0..20 {
                    let mut m = ClusterMsg::new(MsgType::MetadataUpdated, 0);
                    m.raid_slot = i;
                    c.send(m).unwrap();
                }
            });
        }
        // A second sender thread on node 0 (its messages carry raid_slot >= 100).
        let c0 = &nodes[0].0;
        s.spawn(move || {
            for i in 100..110 {
                let mut m = ClusterMsg::new(MsgType::MetadataUpdated, 0);
                m.raid_slot = i;
                c0.send(m).unwrap();
            }
        });
    });
    for (i, (_, rx)) in nodes.iter().enumerate() {
        let got: Vec<ClusterMsg> = rx.try_iter().collect();
        let want = if i == 0 { 40 } else { 50 };
        assert_eq!(
            got.len(),
            want,
            "node {i}: every message of the others, once"
        );
        for from in 0..3u32 {
            if from as usize == i {
                continue;
            }
            let seq: Vec<u32> = got
                .iter()
                .filter(|m| m.slot == from && m.raid_slot < 100)
                .map(|m| m.raid_slot)
                .collect();
            assert_eq!(
                seq,
                (0..20).collect::<Vec<_>>(),
                "in order from slot {from}"
            );
        }
    }
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn a_member_that_dies_does_not_block_senders() {
    let dlm = LocalDlm::new();
    let (a, _) = node(&dlm, 0);
    let (b, rb) = node(&dlm, 1);
    // A third member that never processes messages: its ack CR blocks senders
    // until it dies and the lock manager releases its locks.
    let dead = dlm.join("3578507b-e0cb-6d4f-6322-696cd7b1b10c", 32);
    let rx = dead.events();
    let ack = dead.lock(ACK, Mode::Cr, flags::EXPEDITE, None).unwrap();
    while !matches!(rx.recv().unwrap(), Event::Ast { lock, .. } if lock == ack) {}
    let sender = std::thread::spawn(move || a.send(ClusterMsg::new(MsgType::ChangeCapacity, 0)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!sender.is_finished(), "the silent member holds up the send");
    dead.kill();
    sender.join().unwrap().unwrap();
    assert_eq!(
        rb.recv_timeout(Duration::from_secs(5)).unwrap().kind,
        MsgType::ChangeCapacity
    );
    drop(b);
}
