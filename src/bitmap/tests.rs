use super::*;
use crate::md::Uuid;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Default)]
struct Recorder {
    writes: Mutex<Vec<Vec<u8>>>,
    flushes: AtomicUsize,
}

impl BitmapStore for Recorder {
    fn write_bitmap(&self, _off: u64, data: &[u8]) -> io::Result<()> {
        self.writes.lock().unwrap().push(data.to_vec());
        Ok(())
    }
    fn flush_data(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn bitmap() -> WriteIntent {
    let sb = BitmapSuper {
        version: 4,
        uuid: Uuid([1; 16]),
        events: 3,
        events_cleared: 3,
        sync_size: 1024 * 1024, // 512 MiB
        state: 0,
        chunksize: 1 << 20,
        daemon_sleep: 5,
        write_behind: 0,
        sectors_reserved: 0,
        nodes: 0,
        cluster_name: [0; 64],
    };
    let bits = BitmapBits::new(sb.geometry().chunks());
    WriteIntent::new(sb, bits, 8192)
}

fn on_disk_bits(rec: &Recorder) -> BitmapBits {
    let w = rec.writes.lock().unwrap();
    let last = w.last().expect("a bitmap write");
    BitmapBits::from_bytes(&last[256..], 512).unwrap()
}

#[test]
fn bit_is_on_disk_before_start_write_returns() {
    let b = bitmap();
    let rec = Recorder::default();
    b.start_write(2048 * 3 + 5, 8, &rec).unwrap();
    assert!(on_disk_bits(&rec).get(3));
    // A second write to the same chunk needs no bitmap write.
    b.start_write(2048 * 3 + 100, 8, &rec).unwrap();
    assert_eq!(rec.writes.lock().unwrap().len(), 1);
    // A write spanning chunks 4 and 5 sets both.
    b.start_write(2048 * 5 - 4, 8, &rec).unwrap();
    let bits = on_disk_bits(&rec);
    assert!(bits.get(4) && bits.get(5));
    assert_eq!(b.writes_in_flight(), 4);
}

#[test]
fn bits_clear_only_after_two_idle_passes_and_a_data_flush() {
    let b = bitmap();
    let rec = Recorder::default();
    b.start_write(0, 8, &rec).unwrap();
    assert_eq!(b.daemon_pass(4, &rec).unwrap(), 0, "write still in flight");
    b.end_write(0, 8, false);
    assert_eq!(
        b.daemon_pass(4, &rec).unwrap(),
        0,
        "first idle pass only marks"
    );
    assert_eq!(rec.flushes.load(Ordering::SeqCst), 0);
    assert_eq!(b.daemon_pass(4, &rec).unwrap(), 1);
    assert_eq!(
        rec.flushes.load(Ordering::SeqCst),
        1,
        "data flushed before clearing"
    );
    assert!(!on_disk_bits(&rec).get(0));
    assert_eq!(b.superblock().events_cleared, 4);
}

#[test]
fn degraded_writes_stay_needed() {
    let b = bitmap();
    let rec = Recorder::default();
    b.set_state(true, true);
    b.start_write(0, 8, &rec).unwrap();
    b.end_write(0, 8, false);
    for _ in 0..3 {
        assert_eq!(b.daemon_pass(4, &rec).unwrap(), 0);
    }
    assert!(b.is_needed(0, 8));
    b.set_state(false, false);
    assert_eq!(
        b.daemon_pass(5, &rec).unwrap(),
        0,
        "needed chunks are not cleared"
    );
    b.begin_resync(0);
    b.end_resync(0, true);
    b.daemon_pass(5, &rec).unwrap();
    assert_eq!(b.daemon_pass(5, &rec).unwrap(), 1);
}

#[test]
fn a_remote_resync_window_holds_writes_and_redirects_reads() {
    let b = std::sync::Arc::new(bitmap());
    let rec = std::sync::Arc::new(Recorder::default());
    // A write in chunk 3 is in flight when the window [2, 6) arrives.
    b.start_write(2048 * 3, 8, &*rec).unwrap();
    let (b2, done) = (
        b.clone(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let d2 = done.clone();
    let t = std::thread::spawn(move || {
        b2.set_remote_window(1, 2048 * 2, 2048 * 6);
        d2.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "waits for the write in flight"
    );
    b.end_write(2048 * 3, 8, false);
    t.join().unwrap();
    assert!(
        !b.try_start_write(2048 * 5, 8, &*rec).unwrap(),
        "writes inside wait"
    );
    assert!(
        b.try_start_write(2048 * 6, 8, &*rec).unwrap(),
        "writes outside go"
    );
    assert!(b.is_needed(2048 * 4, 8), "reads inside use the first leg");
    assert!(b.is_needed(2048 * 7, 8), "and above: not resynced yet");
    assert!(!b.is_needed(2048, 8), "below: resynced");
    b.set_remote_window(1, 0, 0);
    assert!(b.try_start_write(2048 * 5, 8, &*rec).unwrap());
    assert!(!b.is_needed(2048 * 4, 8));
}

#[test]
fn writes_wait_for_a_chunk_under_resync() {
    let b = std::sync::Arc::new(bitmap());
    let rec = std::sync::Arc::new(Recorder::default());
    b.begin_resync(7);
    let (b2, r2) = (b.clone(), rec.clone());
    let t = std::thread::spawn(move || b2.start_write(2048 * 7, 8, &*r2).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(b.writes_in_flight(), 0, "write must wait for the resync");
    b.end_resync(7, true);
    t.join().unwrap();
    assert_eq!(b.writes_in_flight(), 1);
}

#[test]
fn a_resync_window_holds_the_writes_overlapping_it_only() {
    let b = bitmap();
    let rec = Recorder::default();
    // Chunk 7 is sectors 14336..16384; its window 14336+256..14336+512.
    let lo = 2048 * 7 + 256;
    b.begin_resync_window(7, lo, lo + 256);
    assert!(
        !b.try_start_write(lo + 255, 2, &rec).unwrap(),
        "overlaps the window's end"
    );
    assert!(
        !b.try_start_write(lo - 1, 2, &rec).unwrap(),
        "overlaps its start"
    );
    assert!(
        b.try_start_write(lo - 8, 8, &rec).unwrap(),
        "ends where the window starts"
    );
    assert!(
        b.try_start_write(lo + 256, 8, &rec).unwrap(),
        "starts where it ends"
    );
    assert!(
        b.try_start_write(2048 * 7, 8, &rec).unwrap(),
        "the chunk's start"
    );
    b.end_resync_window();
    assert!(b.try_start_write(lo, 8, &rec).unwrap());
    assert_eq!(b.next_needed(0), None);
    // The next window of the chunk waits for the chunk's writes in flight.
    let b = std::sync::Arc::new(b);
    let b2 = b.clone();
    let t = std::thread::spawn(move || b2.begin_resync_window(7, lo + 256, lo + 512));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !t.is_finished(),
        "a window began with writes in flight on its chunk"
    );
    for s in [lo - 8, lo + 256, 2048 * 7, lo] {
        b.end_write(s, 8, false);
    }
    t.join().unwrap();
    b.end_resync_window();
}

/// A write that ends degraded between two windows of its chunk's copy (after its
/// window was copied) keeps the chunk needed: the legs may differ there again.
#[test]
fn a_degraded_write_during_a_chunks_copy_keeps_it_needed() {
    let b = bitmap();
    let rec = Recorder::default();
    b.mark_all_needed();
    let cs = 2048 * 7;
    for degraded in [true, false] {
        b.start_chunk_copy(7);
        b.begin_resync_window(7, cs, cs + 256);
        b.end_resync_window();
        assert!(b.try_start_write(cs, 8, &rec).unwrap());
        b.end_write(cs, 8, degraded);
        b.begin_resync_window(7, cs + 256, cs + 2048);
        b.end_resync_window();
        b.finish_chunk_copy(7, true);
        assert_eq!(b.is_needed(cs, 8), degraded, "degraded write: {degraded}");
    }
    // A copy that did not reach the chunk's end leaves it needed.
    b.mark_all_needed();
    b.start_chunk_copy(7);
    b.finish_chunk_copy(7, false);
    assert!(b.is_needed(cs, 8));
}

/// A store whose bitmap writes fail while `failing`, and wait while `held`.
#[derive(Default)]
struct Switchable {
    failing: std::sync::atomic::AtomicBool,
    held: Mutex<bool>,
    release: Condvar,
    entered: AtomicUsize,
    writes: AtomicUsize,
}

impl BitmapStore for Switchable {
    fn write_bitmap(&self, _off: u64, _data: &[u8]) -> io::Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.release.wait(held).unwrap();
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(io::Error::other("no in-sync leg took it"));
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush_data(&self) -> io::Result<()> {
        Ok(())
    }
}

fn ticket(i: Intent) -> FlushTicket {
    match i {
        Intent::Flushing(t) => t,
        other => panic!("expected a wait for a bitmap write, got {other:?}"),
    }
}

#[test]
fn a_write_waits_for_the_flusher_and_later_writes_to_its_chunk_do_not() {
    let b = bitmap();
    let store = Switchable::default();
    let t = ticket(b.begin_write(2048 * 3, 8));
    assert!(b.flush_outcome(t).is_none(), "nothing written yet");
    // Another write to the same chunk before the bit is on disk waits too.
    let t2 = ticket(b.begin_write(2048 * 3 + 8, 8));
    b.request_flush(t2);
    b.serve_flush(&store, std::time::Duration::from_secs(5))
        .unwrap();
    assert_eq!(store.writes.load(Ordering::SeqCst), 1, "one write for both");
    assert!(matches!(b.flush_outcome(t), Some(Ok(()))));
    assert!(matches!(b.flush_outcome(t2), Some(Ok(()))));
    assert_eq!(b.begin_write(2048 * 3 + 16, 8), Intent::Durable);
    assert_eq!(b.writes_in_flight(), 3);
}

#[test]
fn a_failed_bitmap_write_fails_the_writes_that_waited_for_it_only() {
    let b = bitmap();
    let store = Switchable::default();
    store.failing.store(true, Ordering::SeqCst);
    let t = ticket(b.begin_write(0, 8));
    b.request_flush(t);
    assert!(b
        .serve_flush(&store, std::time::Duration::from_secs(5))
        .is_err());
    let e = b.flush_outcome(t).and_then(Result::err).expect("failed");
    assert!(e.to_string().contains("no in-sync leg took it"), "{e}");
    // A write that comes after the failure is not failed by it: it waits for
    // a write of its own, which succeeds.
    b.end_write(0, 8, true);
    store.failing.store(false, Ordering::SeqCst);
    let t2 = ticket(b.begin_write(0, 8));
    assert!(b.flush_outcome(t2).is_none(), "failed by an older write");
    b.request_flush(t2);
    b.serve_flush(&store, std::time::Duration::from_secs(5))
        .unwrap();
    assert!(matches!(b.flush_outcome(t2), Some(Ok(()))));
}

#[test]
fn a_write_to_a_chunk_whose_clear_is_on_its_way_waits_for_the_bit_again() {
    let b = std::sync::Arc::new(bitmap());
    let store = std::sync::Arc::new(Switchable::default());
    let t = ticket(b.begin_write(0, 8));
    b.flush_for(t, &*store).unwrap();
    b.end_write(0, 8, false);
    assert_eq!(b.begin_write(0, 8), Intent::Durable);
    b.end_write(0, 8, false);
    // Shutdown clears the idle bit; its bitmap write is held on its way.
    *store.held.lock().unwrap() = true;
    let clearing = {
        let (b, store) = (b.clone(), store.clone());
        std::thread::spawn(move || b.clear_idle_now(4, &*store))
    };
    while store.entered.load(Ordering::SeqCst) < 2 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The legs may hold the cleared bit any moment now: a write must not go
    // to them before its bit is written again.
    let t = ticket(b.begin_write(0, 8));
    *store.held.lock().unwrap() = false;
    store.release.notify_all();
    assert_eq!(clearing.join().unwrap().unwrap(), 1);
    assert!(b.flush_outcome(t).is_none(), "the clear is what is on disk");
    b.flush_for(t, &*store).unwrap();
    assert_eq!(b.begin_write(0, 8), Intent::Durable);
}

#[test]
fn the_flusher_wakes_the_workers_when_another_bitmap_write_did_its_work() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let b = bitmap();
    let store = Switchable::default();
    let worker = EventFd::new(EFD_NONBLOCK).unwrap();
    b.add_waker(worker.try_clone().unwrap());
    // A worker parks a write and asks for its bits...
    let t = ticket(b.begin_write(2048 * 7, 8));
    b.request_flush(t);
    // ...which another thread's bitmap write (a synchronous write, the daemon)
    // puts on disk before the flusher gets to it.
    b.flush_for(t, &store).unwrap();
    assert!(worker.read().is_err(), "nothing woke the worker yet");
    b.serve_flush(&store, std::time::Duration::from_millis(100))
        .unwrap();
    assert_eq!(store.writes.load(Ordering::SeqCst), 1, "no second write");
    assert!(
        worker.read().is_ok(),
        "the parked write would wait for ever: its worker was not woken"
    );
}
