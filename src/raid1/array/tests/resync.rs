//! Resync of a chunk while the guest writes.

use super::*;

/// Two 64 MiB in-memory legs of a new array with 4 MiB chunks (four resync
/// windows each), and the legs' data offset in bytes.
fn legs_with_4_mib_chunks() -> (Arc<dyn Leg>, Arc<dyn Leg>, u64) {
    let a: Arc<dyn Leg> = Arc::new(MemLeg::new("a", 64 << 20));
    let b: Arc<dyn Leg> = Arc::new(MemLeg::new("b", 64 << 20));
    let (_, metas) = create_array(
        &[&*a, &*b],
        &crate::raid1::metadata::NewArray {
            name: "t".into(),
            cluster_name: None,
            nodes: 1,
            bitmap_chunk: Some(4 << 20),
            assume_clean: true,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    (a, b, metas[1].sb.data_offset * 512)
}

/// A resync copies a chunk window by window: a guest write to another part of the
/// chunk being copied goes on while one window's copy is held up, and the legs
/// agree afterwards (the write included).
#[test]
fn a_write_elsewhere_in_the_chunk_being_resynced_does_not_wait_for_the_chunk() {
    let (a, b, data_offset) = legs_with_4_mib_chunks();
    // Leg a holds data leg b lacks, in chunk 0.
    a.write_at(&vec![0x11u8; 4 << 20], data_offset).unwrap();
    // The resync's first write to leg b (its first window) waits at the gate.
    let gated = Gated::new(b, data_offset, true);
    let (closed, waiting) = (gated.closed.clone(), gated.waiting.clone());
    let (array, _) = Array::assemble(vec![a.clone(), Arc::new(gated)]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    array.bitmap.mark_all_needed();
    Gated::close(&closed, true);
    let resync = {
        let array = array.clone();
        std::thread::spawn(move || array.resync_chunk(0))
    };
    let start = std::time::Instant::now();
    while !waiting.load(Ordering::SeqCst) {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // A write 2 MiB into chunk 0, outside the window being copied.
    let (tx, rx) = crossbeam_channel::unbounded();
    let writer = {
        let array = array.clone();
        std::thread::spawn(move || {
            let r = array.write(4096, &[IoSlice::new(&[0x22u8; 4096])]);
            let _ = tx.send(r.is_ok());
        })
    };
    let done = rx.recv_timeout(std::time::Duration::from_secs(5));
    Gated::close(&closed, false);
    assert_eq!(
        done,
        Ok(true),
        "the write waited for the copy of another part of its chunk"
    );
    writer.join().unwrap();
    assert_eq!(resync.join().unwrap().unwrap(), 4 << 20);
    let mut on_a = vec![0u8; 4 << 20];
    let mut on_b = vec![0u8; 4 << 20];
    a.read_at(&mut on_a, data_offset).unwrap();
    array.members()[1]
        .as_ref()
        .unwrap()
        .leg
        .read_at(&mut on_b, data_offset)
        .unwrap();
    assert!(on_a == on_b, "the legs differ after the resync");
    assert!(on_b[4096 * 512..4097 * 512].iter().all(|&x| x == 0x22));
    assert_eq!(array.bitmap.next_needed(0), Some(1), "chunk 0 still needed");
}

/// A throttled resync sleeps between windows without the recovery lock: a leg
/// joining meanwhile gets it at once, not after the chunk's copy at the limited
/// rate; and the chunk is then copied again from its start (the new leg has none
/// of the windows copied before it joined).
#[test]
fn a_throttled_resync_lets_a_joining_leg_in_and_copies_the_chunk_again() {
    let (a, b, _) = legs_with_4_mib_chunks();
    let (array, _) = Array::assemble(vec![a, b]).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    array.bitmap.mark_all_needed();
    // 4 MiB at 1 MiB/s: four seconds for the chunk.
    array
        .counters
        .resync_max_rate
        .store(1 << 20, Ordering::Relaxed);
    let resync = {
        let array = array.clone();
        std::thread::spawn(move || array.resync_chunk(0))
    };
    let start = std::time::Instant::now();
    while array.counters.resync_bytes.load(Ordering::Relaxed) == 0 {
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // The first window is copied; the resync throttles. A leg joins.
    let asked = std::time::Instant::now();
    {
        let mut joining = lock(&array.recovery);
        *joining += 1;
    }
    let waited = asked.elapsed();
    // No limit from now on: the copy goes on at once.
    array.counters.resync_max_rate.store(0, Ordering::Relaxed);
    let copied = resync.join().unwrap().unwrap();
    assert!(
        waited < std::time::Duration::from_secs(2),
        "the joining leg waited {waited:?} for the throttled chunk copy"
    );
    assert!(
        copied >= 5 << 20,
        "the chunk was not copied again from its start after the join: {copied} bytes"
    );
    assert_eq!(array.bitmap.next_needed(0), Some(1), "chunk 0 still needed");
}
