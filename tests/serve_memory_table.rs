//! A front-end memory region larger than the file that backs it, with the `vhost`
//! crate's front-end playing QEMU: the back-end must refuse it (an error on
//! SET_MEM_TABLE or ADD_MEM_REG), not map it and die of SIGBUS at the first guest
//! access to the missing part. `serve` survives and serves the next front-end.

mod common;

use common::vring::{connect, header, regions, set_up_vring, Guest, HIGH, REGION, T_GET_ID};
use common::{pattern, Client, Serve};
use std::time::Duration;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

const STATUS: u64 = 0x2_0000;
const BLOCK: usize = 64 << 10;

fn proto() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// What a back-end that accepted the table would meet: a GET_ID whose answer goes
/// to the high region (past the end of the memfd).
fn touch_high_region(fe: &mut Frontend, g: &mut Guest) {
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    set_up_vring(fe, g, 0, &kick, &call);
    fe.set_vring_enable(0, true).unwrap();
    g.put(STATUS, &[0xff]);
    let chain = vec![
        (header(g, 0, T_GET_ID, 0), 16, false),
        (HIGH + 0x1000, 20, true),
        (STATUS, 1, true),
    ];
    g.publish(0, &[chain]);
    kick.write(1).unwrap();
    g.wait_used(1, Duration::from_secs(2));
}

fn assert_alive(serve: &mut Serve, what: &str) {
    std::thread::sleep(Duration::from_millis(200));
    let st = serve.child.as_mut().unwrap().try_wait().unwrap();
    assert!(
        st.is_none(),
        "{what}: serve died ({st:?}): {}",
        serve.log_text()
    );
}

#[test]
fn a_memory_region_beyond_the_end_of_its_file_is_refused_and_serve_survives() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let mut serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "64M",
            "--queues",
            "1",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    // Guest RAM whose memfd only holds the low region: the high one (file offset
    // REGION) lies wholly beyond its end. The test never touches the high region.
    let mut g = Guest::new();
    std::fs::File::from(g.ram.fd.try_clone().unwrap())
        .set_len(REGION)
        .unwrap();
    let (low, high) = regions(&g);

    let (mut fe, _) = connect(&sock, proto());
    let table = fe.set_mem_table(&[low, high]);
    if table.is_ok() {
        touch_high_region(&mut fe, &mut g);
    }
    drop(fe);
    assert_alive(&mut serve, "SET_MEM_TABLE");
    assert!(
        table.is_err(),
        "SET_MEM_TABLE accepted a region beyond its file"
    );

    let (mut fe, _) = connect(&sock, proto());
    fe.set_mem_table(&[low]).unwrap();
    let added = fe.add_mem_region(&high);
    if added.is_ok() {
        touch_high_region(&mut fe, &mut g);
    }
    drop(fe);
    assert_alive(&mut serve, "ADD_MEM_REG");
    assert!(
        added.is_err(),
        "ADD_MEM_REG accepted a region beyond its file"
    );

    // The process answers and serves a proper front-end.
    serve.status();
    let mut c = Client::connect(&sock, 1, BLOCK);
    let data = pattern(3, 0, BLOCK);
    c.buf()[..BLOCK].copy_from_slice(&data);
    assert_eq!(c.write(0, 0, 0, BLOCK), 0);
    c.buf()[..BLOCK].fill(0);
    assert_eq!(c.read(0, 0, 0, BLOCK), 0);
    assert!(c.buf()[..BLOCK] == data[..], "data read back");
    drop(c);
    assert!(serve.stop().success());
}
