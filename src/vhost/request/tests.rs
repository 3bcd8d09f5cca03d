use super::*;
use crate::raid1::metadata::{create_array, NewArray};
use crate::storage::{Leg, MemLeg};
use crate::vhost::engine::process;
use std::sync::Arc;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

const W: u16 = VRING_DESC_F_WRITE as u16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

struct Rig {
    mem: Arc<GuestMemoryMmap<()>>,
    array: Arc<Array>,
}

fn rig() -> Rig {
    rig_with(|l| l)
}

/// A rig whose legs are wrapped by `wrap` once the array is made.
fn rig_with(wrap: impl Fn(Arc<dyn Leg>) -> Arc<dyn Leg>) -> Rig {
    let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 8 << 20));
    let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 8 << 20));
    create_array(
        &[&*a, &*b],
        &NewArray {
            name: "t".into(),
            cluster_name: None,
            nodes: 4,
            bitmap_chunk: Some(1 << 20),
            assume_clean: true,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    let (array, _) = Array::assemble(vec![wrap(a), wrap(b)]).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    Rig {
        mem: Arc::new(mem),
        array: Arc::new(array),
    }
}

fn ctx(r: &Rig) -> Context<'_> {
    Context {
        array: &r.array,
        read_only: false,
        not_writer: false,
        refused: None,
        writethrough: false,
        serial: *b"0123456789abcdefghij",
        limits: Limits::default(),
    }
}

fn header(r: &Rig, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    r.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Runs a chain through a real split queue; returns (used length, status byte).
fn run(r: &Rig, descs: &[(u64, u32, u16)]) -> (u32, u8) {
    run_q(r, 16, descs)
}

/// As [`run`], on a queue of `size` descriptors.
fn run_q(r: &Rig, size: u16, descs: &[(u64, u32, u16)]) -> (u32, u8) {
    r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(&*r.mem, size);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
        .collect();
    let chain = q.build_desc_chain(&raw).unwrap();
    let descs: Vec<Descriptor> = chain.collect();
    let used = process(&ctx(r), &r.mem, &descs);
    (used, r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

/// A discard (or write-zeroes) has no asynchronous path and may wait for
/// another node's resync window: the worker never runs it itself (while it
/// waited, the worker's other writes in that node's next window would never
/// end, and that node never move on).
#[test]
fn a_discard_is_left_to_run_off_the_worker() {
    let r = rig();
    // Another node resyncs chunk 0.
    r.array.bitmap.set_remote_window(1, 0, 2048);
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    let q = MockSplitQueue::new(&*r.mem, 16);
    let raw: Vec<RawDescriptor> = [(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)]
        .iter()
        .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
        .collect();
    for ty in [kind::DISCARD, kind::WRITE_ZEROES] {
        header(&r, ty, 0);
        let descs: Vec<Descriptor> = q.build_desc_chain(&raw).unwrap().collect();
        std::thread::scope(|sc| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (r, descs) = (&r, &descs);
            sc.spawn(move || {
                let p = prepare(&ctx(r), &*r.mem, descs);
                let _ = tx.send(match p {
                    Prepared::Ranges { zeroes, ranges, .. } => Some((zeroes, ranges)),
                    _ => None,
                });
            });
            let got = rx.recv_timeout(std::time::Duration::from_secs(2));
            if got.is_err() {
                // Lets the blocked request end, so that the test can.
                r.array.bitmap.set_remote_window(1, 0, 0);
            }
            assert_eq!(
                got.expect("the worker ran the request itself: it waited for the window"),
                Some((ty == kind::WRITE_ZEROES, vec![(0, 8)]))
            );
        });
    }
}

fn ok_write_read(r: &Rig) {
    header(r, kind::OUT, 8);
    r.mem
        .write_slice(&[0x5a; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        run(r, &[(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, W)]),
        (1, status::OK)
    );
    r.mem.write_slice(&[0; 4096], GuestAddress(DATA)).unwrap();
    header(r, kind::IN, 8);
    assert_eq!(
        run(r, &[(HDR, 16, 0), (DATA, 4096, W), (STATUS, 1, W)]),
        (4097, status::OK)
    );
    let mut back = [0u8; 4096];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|&x| x == 0x5a));
}

#[test]
fn well_formed_requests_work() {
    let r = rig();
    ok_write_read(&r);
    // Header split over two descriptors, data over three.
    header(&r, kind::IN, 8);
    let got = run(
        &r,
        &[
            (HDR, 6, 0),
            (HDR + 6, 10, 0),
            (DATA, 512, W),
            (DATA + 512, 1024, W),
            (DATA + 1536, 2560, W),
            (STATUS, 1, W),
        ],
    );
    assert_eq!(got, (4097, status::OK));
    header(&r, kind::GET_ID, 0);
    assert_eq!(
        run(&r, &[(HDR, 16, 0), (DATA, 20, W), (STATUS, 1, W)]),
        (21, status::OK)
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"0123456789abcdefghij");
    header(&r, kind::GET_ID, 0);
    assert_eq!(
        run(&r, &[(HDR, 16, 0), (DATA, 8, W), (STATUS, 1, W)]),
        (9, status::OK)
    );
    header(&r, kind::FLUSH, 0);
    assert_eq!(run(&r, &[(HDR, 16, 0), (STATUS, 1, W)]), (1, status::OK));
}

/// Descriptors: (address, length, flags).
type Chain = Vec<(u64, u32, u16)>;

/// A chain: header, `n` data descriptors of `len` bytes all on the same guest
/// buffer (aliasing it), status.
fn aliased(n: usize, len: u32, flags: u16) -> Chain {
    let mut d = vec![(HDR, 16, 0)];
    d.extend(std::iter::repeat_n((DATA, len, flags), n));
    d.push((STATUS, 1, W));
    d
}

#[test]
fn reads_and_writes_beyond_size_max_and_seg_max_fail_without_touching_the_disk() {
    let r = rig();
    ok_write_read(&r); // 0x5a at sector 8
                       // What the device advertises.
    let size_max = crate::vhost::SIZE_MAX;
    let seg_max = crate::vhost::SEG_MAX as usize;
    r.mem
        .write_slice(&vec![0xa5; 2 * size_max as usize], GuestAddress(DATA))
        .unwrap();
    let cases: Vec<(&str, u32, Chain)> = vec![
        (
            "write of one segment above size_max",
            kind::OUT,
            aliased(1, 2 * size_max, 0),
        ),
        (
            "read of one segment above size_max",
            kind::IN,
            aliased(1, size_max + 512, W),
        ),
        (
            "write of seg_max + 1 aliased segments",
            kind::OUT,
            aliased(seg_max + 1, 512, 0),
        ),
        (
            "read of seg_max + 1 aliased segments",
            kind::IN,
            aliased(seg_max + 1, 512, W),
        ),
    ];
    for (what, ty, descs) in cases {
        header(&r, ty, 8);
        assert_eq!(run_q(&r, 2048, &descs), (1, status::IOERR), "{what}");
    }
    // At the limits: served.
    header(&r, kind::IN, 8);
    let (used, st) = run_q(&r, 2048, &aliased(seg_max, 512, W));
    assert_eq!((used, st), (seg_max as u32 * 512 + 1, status::OK));
    header(&r, kind::IN, 8);
    assert_eq!(
        run(&r, &aliased(1, size_max, W)),
        (size_max + 1, status::OK)
    );
    // The refused writes left the data as it was; the device still serves.
    ok_write_read(&r);
    assert!(!r.array.is_degraded());
}

#[test]
fn a_transfer_larger_than_one_leg_operation_is_refused_when_parsed() {
    // Segments alias one buffer: three 1 GiB descriptors make a 3 GiB write.
    let r = rig();
    let limits = Limits {
        size_max: 1 << 30,
        seg_max: 8,
        ..Limits::default()
    };
    assert_eq!(limits.max_transfer(), crate::raid1::aio::MAX_TRANSFER);
    let seg = Seg {
        addr: GuestAddress(DATA),
        len: 1 << 30,
        writable: false,
    };
    let segs = [
        Seg {
            addr: GuestAddress(HDR),
            len: 16,
            writable: false,
        },
        seg,
        seg,
        seg,
    ];
    header(&r, kind::OUT, 0);
    assert!(matches!(
        parse(&*r.mem, &segs, &limits),
        Err(RequestError::Limits(_))
    ));
    assert!(
        parse(&*r.mem, &segs[..2], &limits).is_ok(),
        "one 1 GiB segment is fine"
    );
    // The default limits stay below it.
    assert!(Limits::default().max_transfer() <= crate::raid1::aio::MAX_TRANSFER);
    assert!(i32::try_from(Limits::default().max_transfer()).is_ok());
}

#[test]
fn reads_mark_their_buffers_in_the_dirty_log() {
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::GuestMemoryRegion;
    let r = rig();
    let mem = Arc::new(
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap(),
    );
    let dirty = |gpa: u64| {
        mem.iter()
            .next()
            .is_some_and(|reg| reg.bitmap().dirty_at(gpa as usize))
    };
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind::IN.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    // Read 8 KiB into two pages the test never touches; the leg I/O writes them
    // through raw pointers, so only the explicit marking logs them.
    let descs = [
        Descriptor::new(HDR, 16, 0, 0),
        Descriptor::new(DATA, 8192, W, 0),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    assert!(!dirty(DATA) && !dirty(DATA + 4096) && !dirty(STATUS));
    assert_eq!(process(&ctx(&r), &mem, &descs), 8193);
    assert!(dirty(DATA) && dirty(DATA + 4096) && dirty(STATUS));
    assert!(!dirty(DATA + 8192));
}

#[test]
fn malformed_chains_get_a_status_and_the_device_keeps_working() {
    let r = rig();
    let cap = r.array.size;
    type Case = (&'static str, u32, u64, Vec<(u64, u32, u16)>, u8);
    let cases: Vec<Case> = vec![
        (
            "short header",
            kind::IN,
            0,
            vec![(HDR, 8, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "writable header",
            kind::IN,
            0,
            vec![(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "read into read-only buffer",
            kind::IN,
            0,
            vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "write from writable buffer",
            kind::OUT,
            0,
            vec![(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "mixed directions",
            kind::IN,
            0,
            vec![
                (HDR, 16, 0),
                (DATA, 512, W),
                (DATA + 512, 512, 0),
                (STATUS, 1, W),
            ],
            status::IOERR,
        ),
        (
            "beyond capacity",
            kind::IN,
            cap - 1,
            vec![(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "sector overflow",
            kind::OUT,
            u64::MAX - 1,
            vec![(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "not a sector multiple",
            kind::OUT,
            0,
            vec![(HDR, 16, 0), (DATA, 100, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "outside guest memory",
            kind::IN,
            0,
            vec![(HDR, 16, 0), (0xf000_0000, 4096, W), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "header outside guest memory",
            kind::IN,
            0,
            vec![(0xf000_0000, 16, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "unknown type",
            99,
            0,
            vec![(HDR, 16, 0), (STATUS, 1, W)],
            status::UNSUPP,
        ),
        (
            "discard with flags",
            kind::DISCARD,
            0,
            vec![(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, W)],
            status::UNSUPP,
        ),
        (
            "discard of 10 bytes",
            kind::DISCARD,
            0,
            vec![(HDR, 16, 0), (DATA, 10, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "discard beyond capacity",
            kind::WRITE_ZEROES,
            0,
            vec![(HDR, 16, 0), (DATA + 64, 16, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
        (
            "get_id into read-only buffer",
            kind::GET_ID,
            0,
            vec![(HDR, 16, 0), (DATA, 20, 0), (STATUS, 1, W)],
            status::IOERR,
        ),
    ];
    // Segment for "discard with flags": sector 0, 8 sectors, flags 1.
    let mut seg = [0u8; 16];
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    seg[12..16].copy_from_slice(&1u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    // Segment at DATA+64: beyond the end.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&(cap - 4).to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    r.mem.write_slice(&seg, GuestAddress(DATA + 64)).unwrap();
    for (what, ty, sector, descs, want) in cases {
        header(&r, ty, sector);
        let (used, st) = run(&r, &descs);
        assert_eq!((used, st), (1, want), "{what}");
    }
    // No writable status byte: nothing can be reported, nothing is written.
    header(&r, kind::IN, 0);
    assert_eq!(run(&r, &[(HDR, 16, 0), (DATA, 512, 0)]), (0, 0xee));
    assert_eq!(run(&r, &[(HDR, 16, 0), (STATUS, 0, W)]), (0, 0xee));
    // Status byte outside guest memory: dropped, no panic.
    let q = MockSplitQueue::new(&*r.mem, 16);
    let raw = [
        RawDescriptor::from(Descriptor::new(HDR, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(0xf000_0000, 1, W, 0)),
    ];
    let descs: Vec<Descriptor> = q.build_desc_chain(&raw).unwrap().collect();
    assert_eq!(process(&ctx(&r), &r.mem, &descs), 0);
    assert_eq!(process(&ctx(&r), &r.mem, &[]), 0);
    // Read-only disk refuses writes.
    header(&r, kind::OUT, 0);
    let mut c = ctx(&r);
    c.read_only = true;
    r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let descs = [
        Descriptor::new(HDR, 16, 0, 0),
        Descriptor::new(DATA, 512, 0, 0),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    assert_eq!(process(&c, &r.mem, &descs), 1);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::IOERR
    );
    // So does a node without the writer role; it still reads.
    static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut c = ctx(&r);
    c.not_writer = true;
    c.refused = Some(&REFUSED);
    for ty in [kind::OUT, kind::WRITE_ZEROES, kind::DISCARD] {
        header(&r, ty, 0);
        r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let data = if ty == kind::OUT { 512 } else { 16 };
        let descs = [
            Descriptor::new(HDR, 16, 0, 0),
            Descriptor::new(DATA, data, 0, 0),
            Descriptor::new(STATUS, 1, W, 0),
        ];
        assert_eq!(process(&c, &r.mem, &descs), 1);
        assert_eq!(
            r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            status::IOERR,
            "type {ty}"
        );
    }
    assert_eq!(REFUSED.load(std::sync::atomic::Ordering::Relaxed), 3);
    header(&r, kind::IN, 0);
    let descs = [
        Descriptor::new(HDR, 16, 0, 0),
        Descriptor::new(DATA, 512, W, 0),
        Descriptor::new(STATUS, 1, W, 0),
    ];
    assert_eq!(process(&c, &r.mem, &descs), 513);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::OK
    );
    // After all of that the device still serves.
    ok_write_read(&r);
}

/// With the write cache off (write-through), a write completes only once a flush
/// after it did: a flush every leg fails fails the write, which succeeds with the
/// cache on.
#[test]
fn a_write_through_write_waits_for_a_flush_after_it() {
    use crate::storage::{Faults, FaultyLeg};
    let faults = Faults::none();
    let r = rig_with(|l| Arc::new(FaultyLeg::new(l, faults.clone())) as Arc<dyn Leg>);
    let write = |writethrough: bool| {
        header(&r, kind::OUT, 8);
        r.mem
            .write_slice(&[0x5a; 4096], GuestAddress(DATA))
            .unwrap();
        r.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(&*r.mem, 16);
        let raw: Vec<RawDescriptor> = [(HDR, 16, 0), (DATA, 4096, 0), (STATUS, 1, W)]
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)))
            .collect();
        let descs: Vec<Descriptor> = q.build_desc_chain(&raw).unwrap().collect();
        let c = Context {
            writethrough,
            ..ctx(&r)
        };
        process(&c, &r.mem, &descs);
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
    };
    // The chunk's bitmap bit goes to disk (with a flush) while flushes work.
    assert_eq!(write(false), status::OK);
    faults
        .fail_flushes
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(write(false), status::OK, "write-back: no flush");
    assert_eq!(
        write(true),
        status::IOERR,
        "write-through: the flush failed"
    );
}
