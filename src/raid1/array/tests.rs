use super::*;
use crate::raid1::metadata::{create_array, LegMetadata};
use crate::storage::MemLeg;

mod resync;

/// Two 64 MiB in-memory legs of a new array with 1 MiB bitmap chunks.
pub(super) fn two_legs(
    cluster: Option<&str>,
    nodes: u32,
) -> (Arc<dyn Leg>, Arc<dyn Leg>, Vec<LegMetadata>) {
    let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 64 << 20));
    let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 64 << 20));
    let (_, metas) = create_array(
        &[&*a, &*b],
        &super::super::metadata::NewArray {
            name: "t".into(),
            cluster_name: cluster.map(str::to_string),
            nodes,
            bitmap_chunk: Some(1 << 20),
            assume_clean: true,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    (a, b, metas)
}

/// A leg whose writes at byte `at` wait while a gate is closed (only the first
/// one, with `once`).
struct Gated {
    inner: Arc<dyn Leg>,
    at: u64,
    once: bool,
    passed: AtomicBool,
    closed: Arc<(Mutex<bool>, std::sync::Condvar)>,
    waiting: Arc<AtomicBool>,
}

impl Gated {
    fn new(inner: Arc<dyn Leg>, at: u64, once: bool) -> Gated {
        Gated {
            inner,
            at,
            once,
            passed: AtomicBool::new(false),
            closed: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
            waiting: Arc::new(AtomicBool::new(false)),
        }
    }

    fn close(closed: &(Mutex<bool>, std::sync::Condvar), on: bool) {
        *lock(&closed.0) = on;
        closed.1.notify_all();
    }
}

impl Leg for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if off == self.at && !(self.once && self.passed.swap(true, Ordering::SeqCst)) {
            let (m, cv) = &*self.closed;
            let mut closed = lock(m);
            while *closed {
                self.waiting.store(true, Ordering::SeqCst);
                closed = cv.wait(closed).unwrap_or_else(|e| e.into_inner());
            }
        }
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(off, len)
    }
}

#[test]
fn no_write_completes_before_a_failed_leg_is_recorded_faulty() {
    use crate::storage::{Faults, FaultyLeg};
    let (a, b, _) = two_legs(None, 1);
    let faults = Faults::none();
    let a: Arc<dyn Leg> = Arc::new(FaultyLeg::new(a, faults.clone()));
    let gated = Gated::new(b, 8 * 512, false);
    let (closed, waiting) = (gated.closed.clone(), gated.waiting.clone());
    let b: Arc<dyn Leg> = Arc::new(gated);
    let (array, _) = Array::assemble(vec![a, b.clone()]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    // Leg a fails every write from now on; leg b's superblock writes stall.
    faults.fail_writes_now();
    Gated::close(&closed, true);
    let data = vec![0x5au8; 4096];
    let (tx, rx) = crossbeam_channel::unbounded();
    let spawn_write = |sector: u64| {
        let (array, data, tx) = (array.clone(), data.clone(), tx.clone());
        std::thread::spawn(move || {
            let r = array.write(sector, &[IoSlice::new(&data)]);
            let _ = tx.send((sector, r.is_ok()));
        })
    };
    // Request 1 fails on leg a and records that in leg b's superblock: stalled.
    let t1 = spawn_write(0);
    let start = std::time::Instant::now();
    while !waiting.load(Ordering::SeqCst) {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Request 2 runs while leg a's failure is not on disk yet: it must not
    // complete either (a crash now would leave leg a "in sync", and a resync
    // from it would erase request 2's data on leg b).
    let t2 = spawn_write(4096);
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "a write completed while a leg's failure was not yet in the superblocks"
    );
    Gated::close(&closed, false);
    let mut done: Vec<(u64, bool)> = (0..2)
        .map(|_| rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap())
        .collect();
    done.sort();
    assert_eq!(done, vec![(0, true), (4096, true)]);
    t1.join().unwrap();
    t2.join().unwrap();
    let sb = crate::raid1::metadata::read_superblock(&*b).unwrap();
    assert_eq!(sb.dev_roles[0], role::FAULTY, "leg a recorded faulty");
}

#[test]
fn a_read_repair_never_puts_old_data_over_a_newer_write() {
    use crate::storage::{Faults, FaultyLeg};
    let (a, b, metas) = two_legs(None, 1);
    let sector = 8192;
    let at = metas[0].sb.data_offset * 512 + sector * 512;
    // Leg a: its first write at the sector waits at a gate; reads fail on demand.
    let gated = Gated::new(a.clone(), at, true);
    let (closed, waiting) = (gated.closed.clone(), gated.waiting.clone());
    let faults = Faults::none();
    let fa: Arc<dyn Leg> = Arc::new(FaultyLeg::new(Arc::new(gated), faults.clone()));
    let (array, _) = Array::assemble(vec![fa, b.clone()]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    array.suspend_read_balancing(true); // reads try leg a first
                                        // Old data (zeroes) on both legs; leg a fails a read of it.
    let new = vec![0x22u8; 4096];
    Gated::close(&closed, true);
    faults.fail_reads.store(true, Ordering::SeqCst);
    let reader = {
        let array = array.clone();
        std::thread::spawn(move || {
            let mut got = vec![0u8; 4096];
            let r = array.read(sector, &mut [IoSliceMut::new(&mut got)]);
            array.run_repairs();
            (r.is_ok(), got)
        })
    };
    // The rewrite of leg a is at the gate (the repair holds the range).
    let start = std::time::Instant::now();
    while !waiting.load(Ordering::SeqCst) {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    faults.fail_reads.store(false, Ordering::SeqCst);
    // A guest write of new data to the same sector meanwhile.
    let writer = {
        let (array, new) = (array.clone(), new.clone());
        std::thread::spawn(move || array.write(sector, &[IoSlice::new(&new)]).is_ok())
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    Gated::close(&closed, false);
    assert!(writer.join().unwrap(), "the guest write failed");
    let (read_ok, _) = reader.join().unwrap();
    assert!(read_ok);
    let mut on_a = vec![0u8; 4096];
    let mut on_b = vec![0u8; 4096];
    a.read_at(&mut on_a, at).unwrap();
    b.read_at(&mut on_b, metas[1].sb.data_offset * 512 + sector * 512)
        .unwrap();
    assert!(on_b == new, "leg b does not hold the newer write");
    assert!(
        on_a == new,
        "the repair put old data back over a newer write on leg a"
    );
}

/// Two 64 MiB in-memory legs whose faults the test injects, assembled.
fn faulty_legs() -> (Array, Vec<Arc<crate::storage::Faults>>) {
    use crate::storage::{Faults, FaultyLeg};
    let (a, b, _) = two_legs(None, 1);
    let faults = vec![Faults::none(), Faults::none()];
    let legs: Vec<Arc<dyn Leg>> = [a, b]
        .into_iter()
        .zip(&faults)
        .map(|(l, f)| Arc::new(FaultyLeg::new(l, f.clone())) as Arc<dyn Leg>)
        .collect();
    (Array::assemble(legs).unwrap().0, faults)
}

/// Both legs fail data writes with ENOSPC (metadata in place is rewritten).
fn no_space_in_the_data_area(array: &Array, faults: &[Arc<crate::storage::Faults>]) {
    for (m, f) in array.writable().iter().zip(faults) {
        f.no_space_from.store(m.byte_offset(0), Ordering::Relaxed);
    }
}

#[test]
fn a_write_failing_on_every_leg_fails_and_the_last_in_sync_leg_stays_readable() {
    let (array, faults) = faulty_legs();
    let old = vec![0x42u8; 8192];
    array.write(100, &[IoSlice::new(&old)]).unwrap();
    no_space_in_the_data_area(&array, &faults);
    let new = vec![0x17u8; 8192];
    assert!(array.write(100, &[IoSlice::new(&new)]).is_err());
    assert_eq!(
        array.in_sync_count(),
        1,
        "one leg failed, the last one kept"
    );
    assert!(array.write(100, &[IoSlice::new(&new)]).is_err(), "again");
    assert_eq!(array.in_sync_count(), 1);
    // Reads are served by the last leg (its writes failed, so it holds the old
    // data).
    let mut back = vec![0u8; 8192];
    array.read(100, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert!(back == old);
    // The failure of the first leg is recorded on the last one.
    assert_eq!(
        array
            .superblock()
            .dev_roles
            .iter()
            .filter(|&&r| r == role::FAULTY)
            .count(),
        1
    );
}

#[test]
fn an_asynchronous_write_failing_on_every_leg_fails_and_keeps_one_leg_in_sync() {
    let (array, faults) = faulty_legs();
    let mut io = super::super::AsyncIo::new(8).unwrap();
    no_space_in_the_data_area(&array, &faults);
    let data = vec![0x17u8; 4096];
    let bufs = crate::raid1::Buffers::owned(data.clone());
    array.submit_write(&mut io, 1, 8, bufs);
    io.submit().unwrap();
    io.drain(&array).unwrap();
    let done = io.take_done();
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_err(), "the write fails");
    assert_eq!(array.in_sync_count(), 1);
    let mut back = vec![0u8; 4096];
    array.read(8, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert!(back.iter().all(|&b| b == 0), "never written");
}

#[test]
fn a_fenced_node_reads_what_its_legs_hold_although_a_leg_failure_cannot_be_recorded() {
    let (array, fence) = fenced_array();
    let old = vec![0x42u8; 8192];
    array.write(100, &[IoSlice::new(&old)]).unwrap();
    // The lock manager goes: a write still under way is refused by the legs;
    // that fails no leg (nothing could record it any more).
    fence.raise("lock manager lost");
    let new = vec![0x17u8; 8192];
    assert!(array.write(5000, &[IoSlice::new(&new)]).is_err());
    assert!(!array.failure_unrecorded(), "the fence failed a leg");
    // Reads go on: the data is on the legs.
    let mut back = vec![0u8; 8192];
    array
        .read(100, &mut [IoSliceMut::new(&mut back)])
        .expect("a fenced node's read fails");
    assert!(back == old);
}

#[test]
fn a_sequential_stream_stays_on_one_leg_and_random_reads_alternate() {
    let (a, b, _) = two_legs(None, 1);
    let (array, _) = Array::assemble(vec![a, b]).unwrap();
    let first = |s: u64| array.read_order(s, 256)[0].name().to_string();
    let leg = first(0);
    // Two interleaved streams: each keeps its own leg.
    let other = first(50_000);
    assert_ne!(leg, other, "a new stream goes to the other (idle) leg");
    for i in 1..20 {
        assert_eq!(first(i * 256), leg, "stream 1 stays on {leg}");
        assert_eq!(first(50_000 + i * 256), other, "stream 2 stays on {other}");
    }
    // Random reads rotate over the legs.
    let picks: std::collections::HashSet<String> = [9_000, 21_000, 33_000, 77_000]
        .iter()
        .map(|&s| first(s))
        .collect();
    assert_eq!(picks.len(), 2, "{picks:?}");
}

/// An array on two legs that write nothing once the returned fence is up.
fn fenced_array() -> (Array, Arc<crate::storage::Fence>) {
    use crate::storage::{Fence, FencedLeg};
    let (a, b, _) = two_legs(None, 1);
    let fence = Fence::new();
    let legs: Vec<Arc<dyn Leg>> = [a, b]
        .into_iter()
        .map(|l| Arc::new(FencedLeg::new(l, fence.clone())) as Arc<dyn Leg>)
        .collect();
    let (array, _) = Array::assemble(legs).unwrap();
    array.set_fence(fence.clone());
    (array, fence)
}

/// A fenced node's writes fail because it may not write, not because a leg
/// broke: no leg is marked faulty (the status would tell the operator to
/// replace a healthy leg, and a write after the fence saw one leg "left").
#[test]
fn a_fenced_nodes_refused_writes_fail_no_leg() {
    let (array, fence) = fenced_array();
    array.write(0, &[IoSlice::new(&[1u8; 4096])]).unwrap();
    fence.raise("test");
    assert!(array
        .write(8 * 2048, &[IoSlice::new(&[2u8; 4096])])
        .is_err());
    let _ = array.flush();
    assert_eq!(array.in_sync_count(), 2, "a leg was failed for the fence");
    let mut back = vec![0u8; 4096];
    array.read(0, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert!(back.iter().all(|&x| x == 1));
}

/// The fence went up while a write was on its way: one leg took it, the
/// other refused it. No leg is failed, so the write must fail: acknowledged,
/// it would be on one leg while both are in sync, and a resync from the other
/// would erase it.
#[test]
fn a_write_half_refused_by_the_fence_fails() {
    use crate::storage::{Fence, FencedLeg};
    let (a, b, _) = two_legs(None, 1);
    let fence = Fence::new();
    let legs: Vec<Arc<dyn Leg>> = vec![Arc::new(FencedLeg::new(a, fence.clone())), b];
    let (array, _) = Array::assemble(legs).unwrap();
    array.set_fence(fence.clone());
    fence.raise("test");
    assert!(array
        .write(8 * 2048, &[IoSlice::new(&[2u8; 4096])])
        .is_err());
    let mut io = super::super::AsyncIo::new(8).unwrap();
    let data = vec![3u8; 4096];
    let bufs = crate::raid1::Buffers::owned(data.clone());
    array.submit_write(&mut io, 1, 16 * 2048, bufs);
    io.submit().unwrap();
    io.drain(&array).unwrap();
    let done = io.take_done();
    assert!(
        done[0].1.is_err(),
        "the asynchronous write was acknowledged"
    );
    assert_eq!(array.in_sync_count(), 2);
}

#[test]
fn with_balancing_suspended_every_read_goes_to_the_same_leg() {
    let (a, b, _) = two_legs(None, 1);
    let (array, _) = Array::assemble(vec![a, b]).unwrap();
    let first = |s: u64| array.read_order(s, 8)[0].name().to_string();
    array.suspend_read_balancing(true);
    let picks: std::collections::HashSet<String> = (0..40u64)
        .map(|i| first((i * 7919) % 100_000 * 8))
        .collect();
    assert_eq!(picks.len(), 1, "suspended: {picks:?}");
    array.suspend_read_balancing(false);
    let picks: std::collections::HashSet<String> = (0..40u64)
        .map(|i| first((i * 7919) % 100_000 * 8))
        .collect();
    assert_eq!(picks.len(), 2, "resumed: {picks:?}");
}

#[test]
fn another_slots_dirty_bits_are_taken_over_and_cleared() {
    let (a, b, metas) = two_legs(Some("c"), 4);
    // Node slot 2 left chunks 5 and 40 dirty.
    for (leg, m) in [(&a, &metas[0]), (&b, &metas[1])] {
        let mut m: LegMetadata = m.clone();
        m.bitmaps[2].bits.set(5);
        m.bitmaps[2].bits.set(40);
        super::super::metadata::write_leg_metadata(&**leg, &m).unwrap();
    }
    let (array, _) = Array::assemble(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(array.bitmap.stats().needed, 0);
    assert_eq!(array.merge_other_slots().unwrap(), 2);
    assert_eq!(array.bitmap.stats().needed, 2);
    assert!(array.bitmap.is_needed(5 * 2048, 8) && array.bitmap.is_needed(40 * 2048, 8));
    for leg in [&a, &b] {
        let m = LegMetadata::load(&**leg).unwrap();
        assert_eq!(m.bitmaps[2].bits.count_dirty(), 0, "their bits are cleared");
        assert!(
            m.bitmaps[0].bits.get(5) && m.bitmaps[0].bits.get(40),
            "ours are on disk"
        );
    }
}

#[test]
fn a_slot_dirty_on_the_second_leg_only_is_taken_over_and_cleared_everywhere() {
    // A node died while its bitmap daemon cleared chunk 7: the cleared bitmap
    // reached leg a, not leg b.
    let (a, b, metas) = two_legs(Some("c"), 4);
    let mut m: LegMetadata = metas[1].clone();
    m.bitmaps[1].bits.set(7);
    super::super::metadata::write_leg_metadata(&*b, &m).unwrap();
    let (array, _) = Array::assemble(vec![a.clone(), b.clone()]).unwrap();
    assert_eq!(array.merge_slot(1, true).unwrap(), 1);
    assert!(array.bitmap.is_needed(7 * 2048, 8), "resynced, to be safe");
    for leg in [&a, &b] {
        let m = LegMetadata::load(&**leg).unwrap();
        assert_eq!(
            m.bitmaps[1].bits.count_dirty(),
            0,
            "leg {}: the slot is clean",
            leg.name()
        );
    }
}

/// A token held by one update at a time, whose first holder waits at a gate.
struct Token {
    held: Mutex<()>,
    queued: std::sync::atomic::AtomicUsize,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    announced: std::sync::atomic::AtomicUsize,
}

impl MetadataSync for Token {
    fn update(&self, write: &mut dyn FnMut() -> io::Result<bool>) -> io::Result<()> {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let _held = self.held.lock().unwrap();
        let (open, cv) = &*self.gate;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
        drop(o);
        if write()? {
            self.announced.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
    fn re_adding(&self, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn removing(&self, _: u32) -> io::Result<()> {
        Ok(())
    }
    fn add_device(
        &self,
        _: u32,
        _: crate::md::Uuid,
        write: &mut dyn FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        write()
    }
}

#[test]
fn threads_recording_the_same_failure_make_one_superblock_update() {
    let (a, b, _) = two_legs(None, 1);
    let (array, _) = Array::assemble(vec![a, b]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    let before = array.events();
    let token = Arc::new(Token {
        held: Mutex::new(()),
        queued: Default::default(),
        gate: Arc::new((Mutex::new(false), std::sync::Condvar::new())),
        announced: Default::default(),
    });
    array.set_metadata_sync(token.clone());
    // The operator fails leg b; its record waits for the token...
    let op = {
        let array = array.clone();
        std::thread::spawn(move || array.fail_leg("b"))
    };
    let start = std::time::Instant::now();
    while token.queued.load(Ordering::SeqCst) < 1 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // ...and so does another thread that saw the failure (the repair pass).
    let other = {
        let array = array.clone();
        std::thread::spawn(move || array.settle_failures())
    };
    while token.queued.load(Ordering::SeqCst) < 2 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let (open, cv) = &*token.gate;
    *open.lock().unwrap() = true;
    cv.notify_all();
    op.join().unwrap().unwrap();
    other.join().unwrap().unwrap();
    assert_eq!(
        array.events(),
        before + 1,
        "one update records the failure for both"
    );
    assert_eq!(token.announced.load(Ordering::SeqCst), 1, "announced once");
}

#[test]
fn a_worker_goes_on_with_other_requests_while_a_bitmap_write_is_on_its_way() {
    use crate::raid1::{AsyncIo, Buffers};
    let (a, b, _) = two_legs(None, 1);
    let sb = crate::raid1::metadata::read_superblock(&*a).unwrap();
    let bitmap_at = (sb.super_offset as i64 + i64::from(sb.bitmap_offset)) as u64 * 512;
    let gated = Gated::new(b, bitmap_at, false);
    let closed = gated.closed.clone();
    let (array, _) = Array::assemble(vec![a, Arc::new(gated)]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    array.flush_bitmap_in_background().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let (shut_tx, shut_rx) = crossbeam_channel::bounded::<()>(1);
    let worker = {
        let array = array.clone();
        std::thread::spawn(move || {
            let mut io = AsyncIo::synchronous().unwrap();
            // Chunk 0's bit goes to disk while the gate is open.
            array.submit_write(&mut io, 1, 0, Buffers::owned(vec![1u8; 4096]));
            io.drain(&array).unwrap();
            let _ = tx.send(io.take_done());
            // The test closes the gate: chunk 5's bit cannot reach leg b.
            let _ = shut_rx.recv();
            array.submit_write(&mut io, 2, 5 * 2048, Buffers::owned(vec![2u8; 4096]));
            array.submit_write(&mut io, 3, 8, Buffers::owned(vec![3u8; 4096]));
            array.submit_read(&mut io, 4, 16, Buffers::owned(vec![0u8; 4096]));
            let mut done = Vec::new();
            while done.len() < 2 {
                io.reap(&array);
                done.extend(io.take_done());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = tx.send(done);
            io.drain(&array).unwrap();
            let _ = tx.send(io.take_done());
        })
    };
    let first = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(first.iter().all(|(t, r)| *t == 1 && r.is_ok()), "{first:?}");
    Gated::close(&closed, true);
    shut_tx.send(()).unwrap();
    let during = rx.recv_timeout(std::time::Duration::from_secs(5));
    // Open the gate whatever happened, so that the worker ends.
    Gated::close(&closed, false);
    let during = during.expect("the worker stalled behind a bitmap write");
    let mut tokens: Vec<u64> = during.iter().map(|(t, _)| *t).collect();
    tokens.sort();
    assert_eq!(tokens, vec![3, 4], "{during:?}");
    assert!(during.iter().all(|(_, r)| r.is_ok()), "{during:?}");
    let last = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    assert!(
        last.len() == 1 && last[0].0 == 2 && last[0].1.is_ok(),
        "{last:?}"
    );
    worker.join().unwrap();
    let mut back = vec![0u8; 4096];
    array
        .read(5 * 2048, &mut [IoSliceMut::new(&mut back)])
        .unwrap();
    assert!(back.iter().all(|&x| x == 2));
}

#[test]
fn a_leg_failing_its_bitmap_write_is_failed_and_the_write_goes_on_with_the_other() {
    use crate::raid1::{AsyncIo, Buffers};
    use crate::storage::{Faults, FaultyLeg};
    let (a, b, _) = two_legs(None, 1);
    let faults = Faults::none();
    let b: Arc<dyn Leg> = Arc::new(FaultyLeg::new(b, faults.clone()));
    let (array, _) = Array::assemble(vec![a.clone(), b]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    array.flush_bitmap_in_background().unwrap();
    faults.fail_writes_now();
    let mut io = AsyncIo::synchronous().unwrap();
    array.submit_write(&mut io, 1, 9 * 2048, Buffers::owned(vec![9u8; 4096]));
    io.drain(&array).unwrap();
    let done = io.take_done();
    assert!(done.len() == 1 && done[0].1.is_ok(), "{done:?}");
    let states: Vec<LegState> = array
        .members()
        .iter()
        .flatten()
        .map(|m| m.state())
        .collect();
    assert_eq!(states, vec![LegState::InSync, LegState::Faulty]);
    // Leg a holds the bit, and the superblocks say leg b failed.
    let sb = crate::raid1::metadata::read_superblock(&*a).unwrap();
    assert_eq!(sb.dev_roles[1], role::FAULTY);
    let bitmap_at = (sb.super_offset as i64 + i64::from(sb.bitmap_offset)) as u64 * 512;
    let mut slot = vec![0u8; 512];
    a.read_at(&mut slot, bitmap_at).unwrap();
    assert_ne!(slot[256 + 1] & (1 << 1), 0, "chunk 9's bit on leg a");
}
