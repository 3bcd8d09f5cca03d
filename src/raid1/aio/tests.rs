use super::*;
use crate::raid1::metadata::{create_array, NewArray};
use crate::raid1::Buffers;
use crate::raid1::LegState;
use crate::storage::{FileLeg, Leg, OpenMode};
use std::io::IoSliceMut;

/// A two-leg array on sparse image files of `size` bytes (the ring takes their I/O).
fn file_array(dir: &std::path::Path, size: u64) -> Array {
    let legs: Vec<Arc<dyn Leg>> = ["a", "b"]
        .iter()
        .map(|n| {
            let leg = FileLeg::open(&dir.join(n), OpenMode::CreateSize(size)).unwrap();
            Arc::new(leg) as Arc<dyn Leg>
        })
        .collect();
    let refs: Vec<&dyn Leg> = legs.iter().map(|l| &**l).collect();
    create_array(
        &refs,
        &NewArray {
            name: "t".into(),
            cluster_name: None,
            nodes: 1,
            bitmap_chunk: Some(1 << 20),
            assume_clean: true,
            now: 0,
            uuid: None,
        },
    )
    .unwrap();
    Array::assemble(legs).unwrap().0
}

/// Starts a write of `data` at `sector` whose leg operations the test completes
/// by hand; returns the op's index.
fn start_write(array: &Array, io: &mut AsyncIo, sector: u64, data: &[u8]) -> usize {
    let bufs = Buffers::owned_in_pieces(data.to_vec(), 20 << 10);
    let sectors = data.len() as u64 / 512;
    array.bitmap.start_write(sector, sectors, array).unwrap();
    io.insert(Op::new(
        7,
        Kind::Write {
            sector,
            sectors,
            ok_in_sync: 0,
            failed: Vec::new(),
            incomplete: None,
            attempts: 1,
        },
        data.len(),
        bufs,
        array.writable(),
    ))
}

#[test]
fn a_write_held_by_another_nodes_window_fails_once_the_node_is_fenced() {
    let d = tempfile::tempdir().unwrap();
    let array = file_array(d.path(), 16 << 20);
    let fence = crate::storage::Fence::new();
    array.set_fence(fence.clone());
    let mut io = AsyncIo::new(8).unwrap();
    // Another node resyncs the first chunk: a write there waits for it.
    array.bitmap.set_remote_window(1, 0, 2048);
    array.submit_write(&mut io, 1, 8, Buffers::owned(vec![0x5au8; 4096]));
    io.submit().unwrap();
    io.reap(&array);
    assert_eq!(io.in_flight(), 1, "held by the window");
    assert!(io.take_done().is_empty());
    // The lock manager goes: that node's death can no longer be seen, so its
    // window is never lifted. The write, on no leg yet, fails instead of
    // holding up the drain before the rejoin for ever.
    fence.raise("lock manager lost");
    io.reap(&array);
    assert_eq!(io.in_flight(), 0, "the write still waits");
    let done = io.take_done();
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_err(), "a fenced node's write succeeded");
    let mut back = vec![0u8; 4096];
    array.read(8, &mut [IoSliceMut::new(&mut back)]).unwrap();
    assert!(back.iter().all(|&b| b == 0), "nothing was written");
}

#[test]
fn a_short_leg_write_is_continued_and_a_stopped_one_fails_the_request_not_the_leg() {
    let d = tempfile::tempdir().unwrap();
    let array = file_array(d.path(), 16 << 20);
    let mut io = AsyncIo::new(8).unwrap();
    let data: Vec<u8> = (0..64u32 << 10).map(|i| (i * 7 % 251) as u8).collect();
    let sector = 2048;
    let legs = array.writable();
    let in_sync = |array: &Array| {
        array
            .writable()
            .iter()
            .all(|m| m.state() == LegState::InSync)
    };

    // Each leg took the first 24 KiB only (inside the second iovec), as the
    // kernel may answer a large write: the rest is written, nothing fails.
    let half = 24 << 10;
    let idx = start_write(&array, &mut io, sector, &data);
    for (i, m) in legs.iter().enumerate() {
        m.leg
            .write_at(&data[..half], m.byte_offset(sector))
            .unwrap();
        let tag = ((idx as u64) << LEG_BITS) | i as u64;
        io.complete_one(
            &array,
            Cqe {
                tag,
                result: half as i32,
            },
        );
    }
    array.release_extra(&mut io, idx);
    io.drain(&array).unwrap();
    let done = io.take_done();
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_ok(), "{:?}", done[0].1);
    assert!(in_sync(&array), "no leg failed");
    for m in &legs {
        let mut back = vec![0u8; data.len()];
        m.leg.read_at(&mut back, m.byte_offset(sector)).unwrap();
        assert!(back == data, "leg {} has the whole write", m.name());
    }

    // A leg answers 0 bytes without an error: the write fails, the leg stays,
    // and the chunk is left to be resynced.
    let sector = 4 * 2048;
    let idx = start_write(&array, &mut io, sector, &data);
    for (i, result) in [(0, 0), (1, data.len() as i32)] {
        let tag = ((idx as u64) << LEG_BITS) | i as u64;
        io.complete_one(&array, Cqe { tag, result });
    }
    array.release_extra(&mut io, idx);
    let done = io.take_done();
    assert_eq!(done.len(), 1);
    assert!(done[0].1.is_err(), "the write fails");
    assert!(in_sync(&array), "no leg failed");
    assert!(array.bitmap.is_needed(sector, 8));

    // A device error still fails the leg.
    let idx = start_write(&array, &mut io, sector, &data);
    for (i, result) in [(0, -libc::EIO), (1, data.len() as i32)] {
        let tag = ((idx as u64) << LEG_BITS) | i as u64;
        io.complete_one(&array, Cqe { tag, result });
    }
    array.release_extra(&mut io, idx);
    let done = io.take_done();
    assert!(done[0].1.is_ok(), "the other leg has it");
    assert_eq!(legs[0].state(), LegState::Faulty);
    assert_eq!(legs[1].state(), LegState::InSync);
}

#[test]
fn a_request_larger_than_one_leg_operation_is_refused_before_any_leg_io() {
    let d = tempfile::tempdir().unwrap();
    // Large enough for the request: only its size is wrong.
    let array = file_array(d.path(), 4 << 30);
    assert!(array.size >= 3 << 21);
    let mut io = AsyncIo::new(8).unwrap();
    // Three 1 GiB segments over the same guest memory (mapped, never touched).
    let mem = Arc::new(
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 30)])
            .unwrap(),
    );
    let segs = vec![(vm_memory::GuestAddress(0), 1usize << 30); 3];
    let bufs = || Buffers::guest(&mem, &segs).unwrap();
    array.submit_write(&mut io, 1, 0, bufs());
    array.submit_read(&mut io, 2, 0, bufs());
    io.submit().unwrap();
    io.drain(&array).unwrap();
    let done = io.take_done();
    assert_eq!(done.len(), 2);
    for (t, r) in done {
        let e = r.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "request {t}: {e}");
    }
    assert!(array
        .writable()
        .iter()
        .all(|m| m.state() == LegState::InSync));
}
