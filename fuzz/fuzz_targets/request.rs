//! A virtio-blk request chain from arbitrary bytes, run through the synchronous
//! request path (`vhost::engine::process`) on a mirror of two in-memory legs.
//!
//! The input's first byte holds flags (read-only, not the writer, write-through) and
//! the descriptor count (low 4 bits, up to 15); then come the descriptors, 11 bytes
//! each: address (u32, in a 64 KiB guest or beyond it), length (u32), flags (bit 0:
//! device-writable, bit 1: 4096-byte logical blocks), and two bytes choosing
//! wild values; the rest fills guest memory from address 0 (headers, segments,
//! data), so short inputs put a header at the start. Checked: nothing panics; the used
//! length never exceeds what the device-writable descriptors hold; when the chain
//! was used, its status byte (the last byte of a device-writable last descriptor)
//! is OK, IOERR or UNSUPP.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use vhost_user_md::raid1::metadata::{create_array, NewArray};
use vhost_user_md::raid1::Array;
use vhost_user_md::storage::{Leg, MemLeg};
use vhost_user_md::vhost::engine::process;
use vhost_user_md::vhost::request::{Context, Limits};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const GUEST: u64 = 64 << 10;

fn array() -> &'static Arc<Array> {
    static A: OnceLock<Arc<Array>> = OnceLock::new();
    A.get_or_init(|| {
        let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 4 << 20));
        let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 4 << 20));
        create_array(
            &[&*a, &*b],
            &NewArray {
                name: "fuzz".into(),
                cluster_name: None,
                nodes: 1,
                bitmap_chunk: Some(1 << 20),
                assume_clean: true,
                now: 0,
                uuid: None,
            },
        )
        .expect("create");
        Arc::new(Array::assemble(vec![a, b]).expect("assemble").0)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(head & 0x0f).min(rest.len() / 11);
    let (desc_bytes, mem_init) = rest.split_at(n * 11);
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST as usize)])
            .expect("guest memory"),
    );
    let mem_init = &mem_init[..mem_init.len().min(GUEST as usize)];
    mem.write_slice(mem_init, GuestAddress(0)).expect("fill");
    let mut descs = Vec::new();
    let mut four_k = false;
    for d in desc_bytes.chunks_exact(11) {
        let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
        // Mostly inside the guest, sometimes anywhere.
        let addr = if d[10] & 0x80 == 0 {
            addr % GUEST
        } else {
            addr
        };
        let len = u32::from_le_bytes([d[4], d[5], d[6], d[7]]);
        let len = if d[10] & 0x40 == 0 { len % 16384 } else { len };
        let flags = if d[8] & 1 != 0 {
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        four_k |= d[8] & 2 != 0;
        descs.push(Descriptor::new(addr, len, flags, 0));
    }
    let limits = Limits {
        block_size: if four_k { 4096 } else { 512 },
        ..Limits::default()
    };
    let ctx = Context {
        array: array(),
        read_only: head & 0x10 != 0,
        not_writer: head & 0x20 != 0,
        refused: None,
        writethrough: head & 0x40 != 0,
        serial: *b"fuzz-serial-00000000",
        limits,
    };
    // The status byte is the last byte of the last descriptor.
    let status = descs
        .last()
        .filter(|s| s.flags() & virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16 != 0)
        .filter(|s| s.len() >= 1)
        .map(|s| GuestAddress(s.addr().0 + u64::from(s.len()) - 1))
        .filter(|a| a.0 < GUEST);
    let used = process(&ctx, &mem, &descs);
    let writable: u64 = descs
        .iter()
        .filter(|d| d.flags() & virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16 != 0)
        .map(|d| u64::from(d.len()))
        .sum();
    assert!(
        u64::from(used) <= writable,
        "used {used} > writable {writable}"
    );
    if let Some(s) = status.filter(|_| used > 0) {
        let st = mem.read_obj::<u8>(s).expect("status");
        assert!(st <= 2, "status byte {st}");
    }
});
