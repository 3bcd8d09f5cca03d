//! The array's background threads: what wakes them, and what must not.

use super::tests::two_legs;
use super::*;

/// While another node rebuilds a leg, this node's resync thread finds nothing to
/// copy and looks whether recovery is over: a look that changes nothing must not
/// ring the resync doorbell, or the thread wakes itself at once, for ever (a core
/// spinning on every other node for the whole rebuild).
#[test]
fn a_look_at_a_recovery_another_node_runs_does_not_wake_the_resync_thread() {
    let (a, b, _) = two_legs(None, 1);
    let (array, _) = Array::assemble(vec![a, b]).unwrap();
    let m = array.members()[1].clone().unwrap();
    m.state.store(LegState::Recovering as u8, Ordering::Release);
    m.remote_recovery.store(true, Ordering::Release);
    let bell = array.bitmap.resync_bell();
    while bell.wait(std::time::Duration::ZERO) {}
    array.finish_recovery().unwrap();
    assert_eq!(
        m.state(),
        LegState::Recovering,
        "another node's rebuild ended here"
    );
    assert!(
        !bell.wait(std::time::Duration::ZERO),
        "the look rang the resync thread's doorbell"
    );
}

/// Every leg refuses the bitmap write a parked write waits for (a node whose
/// storage went away, or fenced): the write fails, and the flusher thread tries
/// again now and then or when asked — not in a loop that spins a core and fills
/// the log for as long as the legs refuse.
#[test]
fn a_bitmap_write_every_leg_refuses_is_not_retried_in_a_tight_loop() {
    use crate::raid1::{AsyncIo, Buffers};
    use crate::storage::{Faults, FaultyLeg};
    let (a, b, _) = two_legs(None, 1);
    let faults = Faults::none();
    let legs: Vec<Arc<dyn Leg>> = [a, b]
        .into_iter()
        .map(|l| Arc::new(FaultyLeg::new(l, faults.clone())) as Arc<dyn Leg>)
        .collect();
    let (array, _) = Array::assemble(legs).unwrap();
    let array = Arc::new(array);
    array.mark_active().unwrap();
    array.flush_bitmap_in_background().unwrap();
    faults.fail_writes_now();
    let mut io = AsyncIo::synchronous().unwrap();
    array.submit_write(&mut io, 1, 9 * 2048, Buffers::owned(vec![9u8; 4096]));
    io.drain(&array).unwrap();
    let done = io.take_done();
    assert!(done.len() == 1 && done[0].1.is_err(), "{done:?}");
    let before = array.bitmap.flush_attempts();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let tries = array.bitmap.flush_attempts() - before;
    assert!(tries <= 10, "{tries} bitmap writes tried in 0.5 s");
}
