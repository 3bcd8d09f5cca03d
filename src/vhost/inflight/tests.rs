use super::*;

fn region(queues: u16, size: u16) -> (File, InflightRegion) {
    let len = check_geometry(queues, size, 8).unwrap();
    let f = new_memfd(len).unwrap();
    let r = InflightRegion::map(&f, 0, len, queues, size, 8).unwrap();
    (f, r)
}

/// The raw bytes of the memfd (as another process sees them).
fn bytes(f: &File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0; f.metadata().unwrap().len() as usize];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

#[test]
fn queue_region_size_matches_libvhost_user_for_qemu_sizes() {
    for qs in [4u16, 64, 128, 256, 1024] {
        let lib = (16 * u64::from(qs) + 2).div_ceil(64) * 64;
        assert_eq!(queue_region_size(qs), lib, "{qs}");
    }
    // Odd sizes still hold header and descriptors.
    for qs in 1..300u16 {
        assert!(queue_region_size(qs) >= 16 + 16 * u64::from(qs));
        assert_eq!(queue_region_size(qs) % 64, 0);
    }
}

#[test]
fn layout_is_the_specs() {
    let (f, r) = region(2, 8);
    let q1 = r.queue(1).unwrap();
    assert!(q1.recover(0, 8).unwrap().fresh);
    q1.get(5);
    q1.get(3);
    q1.pre_put(5);
    q1.post_put(5, 0x1234);
    let b = bytes(&f);
    let base = queue_region_size(8) as usize;
    assert_eq!(base, 192);
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    // Queue 0 untouched but for desc_num.
    assert_eq!(u16_at(10), 8);
    assert_eq!(u16_at(8), 0);
    // Queue 1 header.
    assert_eq!(u64_at(base), 0, "features");
    assert_eq!(u16_at(base + 8), VERSION);
    assert_eq!(u16_at(base + 10), 8, "desc_num");
    assert_eq!(u16_at(base + 12), 5, "last_batch_head");
    assert_eq!(u16_at(base + 14), 0x1234, "used_idx");
    // Descriptor 3: inflight, counter 1; descriptor 5: done, counter 0.
    let d = |i: usize| base + 16 + 16 * i;
    assert_eq!(b[d(3)], 1);
    assert_eq!(u64_at(d(3) + 8), 1);
    assert_eq!(b[d(5)], 0);
    assert_eq!(u64_at(d(5) + 8), 0);
    assert!(q1.is_inflight(3) && !q1.is_inflight(5));
}

#[test]
fn recovery_resubmits_in_counter_order_and_counts_inuse() {
    let (f, r) = region(1, 16);
    let q = r.queue(0).unwrap();
    q.recover(0, 16).unwrap();
    // Taken in this order; 9 completes (used index 1), the others stay.
    for h in [7u16, 2, 9, 12, 0] {
        q.get(h);
    }
    q.pre_put(9);
    q.post_put(9, 1);
    drop(r);
    // A new back-end maps the same buffer.
    let len = f.metadata().unwrap().len();
    let r = InflightRegion::map(&f, 0, len, 1, 16, 8).unwrap();
    let q = r.queue(0).unwrap();
    let rec = q.recover(1, 16).unwrap();
    assert_eq!(rec.resubmit, vec![7, 2, 12, 0]);
    assert_eq!(rec.inuse, 4);
    assert!(!rec.fresh && !rec.fixed_last_batch);
    assert_eq!(q.take_resubmit(), vec![7, 2, 12, 0]);
    assert!(q.take_resubmit().is_empty());
    // New heads continue after the highest counter.
    q.get(3);
    assert_eq!(q.counter(3), Some(5));
}

#[test]
fn a_head_in_the_used_ring_but_not_post_put_is_not_resubmitted() {
    let (f, r) = region(1, 8);
    let q = r.queue(0).unwrap();
    q.recover(0, 8).unwrap();
    q.get(1);
    q.get(4);
    // Died after the used index became 1 and before post-put.
    q.pre_put(4);
    drop(r);
    let r = InflightRegion::map(&f, 0, f.metadata().unwrap().len(), 1, 8, 8).unwrap();
    let q = r.queue(0).unwrap();
    let rec = q.recover(1, 8).unwrap();
    assert!(rec.fixed_last_batch);
    assert_eq!(rec.resubmit, vec![1]);
    assert_eq!(q.used_idx(), 1);
    // Died before the used index changed: the head is resubmitted.
    q.get(6);
    q.pre_put(6);
    drop(r);
    let r = InflightRegion::map(&f, 0, f.metadata().unwrap().len(), 1, 8, 8).unwrap();
    let rec = r.queue(0).unwrap().recover(1, 8).unwrap();
    assert!(!rec.fixed_last_batch);
    assert_eq!(rec.resubmit, vec![1, 6]);
}

#[test]
fn malformed_buffers_are_refused() {
    let len = check_geometry(1, 8, 8).unwrap();
    let f = new_memfd(len).unwrap();
    assert!(
        InflightRegion::map(&f, 0, len - 1, 1, 8, 8).is_err(),
        "too small"
    );
    assert!(
        InflightRegion::map(&f, 4096, len, 1, 8, 8).is_err(),
        "beyond the file"
    );
    assert!(
        InflightRegion::map(&f, 0, len, 9, 8, 8).is_err(),
        "too many queues"
    );
    assert!(
        InflightRegion::map(&f, 0, len, 0, 8, 8).is_err(),
        "no queue"
    );
    assert!(
        InflightRegion::map(&f, 0, len, 1, 0, 8).is_err(),
        "empty queues"
    );
    assert!(
        InflightRegion::map(&f, 0, len, 1, 4096, 8).is_err(),
        "huge queues"
    );
    assert!(InflightRegion::map(&f, u64::MAX - 8, len, 1, 8, 8).is_err());
    assert!(check_geometry(1, u16::MAX, 8).is_err());
    // A marked head beyond the ring the front-end set up.
    let r = InflightRegion::map(&f, 0, len, 1, 8, 8).unwrap();
    let q = r.queue(0).unwrap();
    q.recover(0, 8).unwrap();
    q.get(7);
    assert!(q.recover(0, 4).is_err());
    assert!(r.queue(1).is_none());
    // Out-of-range heads are ignored, not a panic.
    q.get(8);
    q.pre_put(100);
    q.post_put(100, 0);
}

#[test]
fn read_chain_follows_next_and_indirect_and_stops_loops() {
    use vm_memory::GuestMemoryMmap;
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let put = |i: u64, table: u64, d: Descriptor| {
        mem.write_obj(d, GuestAddress(table + i * 16)).unwrap();
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    // 0 -> 3 -> 1 (end).
    put(0, 0x1000, Descriptor::new(0x4000, 16, NEXT, 3));
    put(3, 0x1000, Descriptor::new(0x5000, 512, NEXT, 1));
    put(1, 0x1000, Descriptor::new(0x6000, 1, WRITE, 0));
    let c = read_chain(&mem, GuestAddress(0x1000), 8, 0).unwrap();
    let addrs: Vec<u64> = c.iter().map(|d| d.addr().0).collect();
    assert_eq!(addrs, [0x4000, 0x5000, 0x6000]);
    // Indirect: head 2 points at a table of two.
    put(2, 0x1000, Descriptor::new(0x2000, 32, INDIRECT, 0));
    put(0, 0x2000, Descriptor::new(0x7000, 16, NEXT, 1));
    put(1, 0x2000, Descriptor::new(0x8000, 1, WRITE, 0));
    let c = read_chain(&mem, GuestAddress(0x1000), 8, 2).unwrap();
    let addrs: Vec<u64> = c.iter().map(|d| d.addr().0).collect();
    assert_eq!(addrs, [0x7000, 0x8000]);
    // A loop: 4 -> 5 -> 4.
    put(4, 0x1000, Descriptor::new(0x4000, 16, NEXT, 5));
    put(5, 0x1000, Descriptor::new(0x4000, 16, NEXT, 4));
    assert!(read_chain(&mem, GuestAddress(0x1000), 8, 4).is_err());
    assert!(read_chain(&mem, GuestAddress(0x1000), 8, 8).is_err());
    assert!(read_chain(&mem, GuestAddress(0xfff0), 8, 1).is_err());
}
