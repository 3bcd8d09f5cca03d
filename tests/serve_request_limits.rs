//! Requests beyond the advertised `size_max`/`seg_max`, with the `vhost` crate's
//! front-end playing a driver that ignores them: descriptors aliasing one guest
//! buffer make a large request out of little guest memory. The request fails with
//! IOERR before any leg is touched; no leg is failed for it and the device serves on.

mod common;

use common::vring::{connect, header, regions, set_up_vring, Guest, HIGH, MIB, REGION};
use common::vring::{T_IN, T_OUT};
use common::{leg_state, pattern, Serve};
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::EventFd;

const IOERR: u8 = 1;
/// What the device advertises (`size_max`).
const SIZE_MAX: u32 = 1 << 20;

#[test]
fn oversized_requests_over_aliased_buffers_fail_alone_and_no_leg_is_failed() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    let sock = d.path().join("vm.sock");
    let serve = Serve::start(
        &sock,
        &[
            "--create-size",
            "128M",
            "--queues",
            "1",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    let (mut fe, _) = connect(
        &sock,
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    );
    let mut g = Guest::new();
    let (low, high) = regions(&g);
    fe.set_mem_table(&[low, high]).unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    set_up_vring(&mut fe, &g, 0, &kick, &call);
    fe.set_vring_enable(0, true).unwrap();

    const ST: u64 = 0x2_0000;
    let buf = HIGH;
    let data = pattern(3, 0, 64 << 10);
    g.put(buf, &data);
    // Fourteen descriptors over the whole 4 MiB region: a 56 MiB request whose
    // segments are each four times size_max.
    let big = REGION as u32;
    assert!(big > SIZE_MAX);
    let aliased = |h: u64, len: u32, writable: bool| {
        let mut c = vec![(h, 16, false)];
        c.extend(std::iter::repeat_n((buf, len, writable), 14));
        c.push((ST, 1, true));
        c
    };
    for (i, (ty, len, writable)) in [
        (T_OUT, big, false),
        (T_IN, big, true),
        (T_OUT, SIZE_MAX + 4096, false),
    ]
    .into_iter()
    .enumerate()
    {
        g.put(ST, &[0xee]);
        let h = header(&g, 0, ty, 0);
        g.run(&kick, &[aliased(h, len, writable)]);
        assert_eq!(
            g.get(ST, 1)[0],
            IOERR,
            "request {i} (type {ty}, {len}-byte segments)"
        );
        // Nothing was written over the pattern by the refused read.
        assert!(g.get(buf, data.len()) == data, "request {i}");
    }

    let s = serve.status();
    assert_eq!(s["degraded"], false, "{s}");
    assert_eq!(leg_state(&s, &a), "in-sync", "{s}");
    assert_eq!(leg_state(&s, &b), "in-sync", "{s}");

    // A normal write and read afterwards.
    g.put(ST, &[0xee, 0xee]);
    let hw = header(&g, 1, T_OUT, 2048);
    g.run(
        &kick,
        &[vec![(hw, 16, false), (buf, 64 << 10, false), (ST, 1, true)]],
    );
    assert_eq!(g.get(ST, 1)[0], 0, "write after the refused requests");
    let back = HIGH + 2 * MIB;
    let hr = header(&g, 2, T_IN, 2048);
    g.run(
        &kick,
        &[vec![
            (hr, 16, false),
            (back, 64 << 10, true),
            (ST + 1, 1, true),
        ]],
    );
    assert_eq!(g.get(ST + 1, 1)[0], 0);
    assert!(g.get(back, data.len()) == data, "read back");
    let s = serve.status();
    assert_eq!(s["degraded"], false, "{s}");
    drop(fe);
    drop(serve);
}
