//! md-cluster messaging between separate lockd clients (as separate `serve`
//! processes on one host would be): every message reaches every other node once.

mod common;

use std::sync::Arc;
use std::time::Duration;
use vhost_user_md::cluster::comms::Comms;
use vhost_user_md::dlm::lockd::LockdMember;
use vhost_user_md::dlm::LockSpace;
use vhost_user_md::md::message::{ClusterMsg, MsgType};

#[test]
fn messages_travel_between_lockd_clients() {
    let d = common::Lockd::start();
    let ls = "c7dadcf9-2a65-8cf6-d0c6-eac4930cc737";
    let mut nodes = Vec::new();
    for slot in 0..3 {
        let (tx, rx) = crossbeam_channel::unbounded();
        let m: Arc<dyn LockSpace> = Arc::new(LockdMember::connect(&d.socket, ls, 32).unwrap());
        let c = Comms::join(
            m,
            slot,
            Box::new(move |msg| {
                let _ = tx.send(msg);
            }),
        )
        .unwrap();
        nodes.push((c, rx));
    }
    let mut nd = ClusterMsg::new(MsgType::NewDisk, 0);
    nd.uuid = vhost_user_md::md::Uuid(*b"0123456789abcdef");
    nd.raid_slot = 2;
    nodes[1].0.send(nd).unwrap();
    nodes[2]
        .0
        .send(ClusterMsg::new(MsgType::ResyncingStart, 0))
        .unwrap();
    let got0: Vec<_> = nodes[0].1.try_iter().collect();
    assert_eq!(got0.len(), 2);
    assert_eq!(
        (got0[0].kind, got0[0].slot, got0[0].uuid, got0[0].raid_slot),
        (MsgType::NewDisk, 1, nd.uuid, 2)
    );
    assert_eq!((got0[1].kind, got0[1].slot), (MsgType::ResyncingStart, 2));
    assert_eq!(
        nodes[1]
            .1
            .recv_timeout(Duration::from_secs(1))
            .unwrap()
            .kind,
        MsgType::ResyncingStart
    );
    assert_eq!(
        nodes[2]
            .1
            .recv_timeout(Duration::from_secs(1))
            .unwrap()
            .kind,
        MsgType::NewDisk
    );
}
