//! Recording leg failures off the I/O workers.
//!
//! A request that saw a leg fail completes only once the failure is in the
//! superblocks. On a cluster node that record is a cluster round trip: it waits for
//! the token, which another node may hold while it waits for this node's
//! acknowledgement of a resync window — and that acknowledgement waits for this
//! node's writes in the window to end, which only the I/O worker can end. So a
//! worker never records a failure itself: it parks the request, asks the settler
//! thread to record, and goes on reaping; the settler wakes the workers when the
//! record is done (or failed), and they complete what they parked (as md's raid1
//! holds such bios for its daemon thread, which writes the superblock).

use std::io;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The settler's side of an array: requests and the outcome of failed records.
#[derive(Default)]
pub(crate) struct Settler {
    state: Mutex<State>,
    wake: Condvar,
    /// A settler thread runs for this array.
    pub(crate) running: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    /// A worker parked a request since the settler last began a record.
    requested: bool,
    /// Woken without a request (the array is gone) since the last wait.
    woken: bool,
    /// Failures up to this count could not be recorded (no leg took the update).
    failed_upto: u64,
    /// Why, for the requests that fail because of it.
    error: String,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Settler {
    /// Whether failures are recorded by a settler thread (workers must not record
    /// them themselves).
    pub(crate) fn in_background(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks the settler thread to record the failures seen so far.
    pub(crate) fn request(&self) {
        lock(&self.state).requested = true;
        self.wake.notify_all();
    }

    /// How the record of the first `seen` failures ended: `None` while it is not
    /// over, else `recorded` (failures on disk) decides, or the error of the
    /// record that could not be written.
    pub(crate) fn outcome(&self, seen: u64, recorded: u64) -> Option<io::Result<()>> {
        if recorded >= seen {
            return Some(Ok(()));
        }
        let st = lock(&self.state);
        (st.failed_upto >= seen).then(|| Err(io::Error::other(st.error.clone())))
    }

    /// The record of the first `upto` failures could not be written.
    pub(crate) fn failed(&self, upto: u64, e: &io::Error) {
        let mut st = lock(&self.state);
        st.failed_upto = st.failed_upto.max(upto);
        st.error = format!("a leg failure could not be recorded: {e}");
    }

    /// Wakes the settler thread without a request (the array is gone).
    pub(crate) fn wake(&self) {
        // Kept for a thread not waiting yet (between two waits).
        lock(&self.state).woken = true;
        self.wake.notify_all();
    }

    /// Waits until a record is requested; `false` when none came within `timeout`.
    pub(crate) fn wait_request(&self, timeout: Duration) -> bool {
        let mut st = lock(&self.state);
        if !st.requested && !std::mem::take(&mut st.woken) {
            st = self
                .wake
                .wait_timeout(st, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            st.woken = false;
        }
        std::mem::take(&mut st.requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The array's drop wakes its settler thread; a thread not waiting at that
    /// moment (between two records) must see it at its next wait, not sleep the
    /// whole backstop with its array gone.
    #[test]
    fn a_wake_before_the_wait_is_not_lost() {
        let s = Settler::default();
        s.wake();
        let t = std::time::Instant::now();
        assert!(
            !s.wait_request(Duration::from_secs(5)),
            "no record was asked"
        );
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "the wake-up was lost: slept the whole wait"
        );
    }

    #[test]
    fn an_outcome_waits_for_the_record_or_its_failure() {
        let s = Settler::default();
        assert!(s.outcome(2, 1).is_none());
        assert!(matches!(s.outcome(2, 2), Some(Ok(()))));
        s.failed(1, &io::Error::other("no leg"));
        assert!(
            s.outcome(2, 1).is_none(),
            "a failed record of fewer failures"
        );
        s.failed(3, &io::Error::other("no leg"));
        let e = s.outcome(2, 1).and_then(Result::err).map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("a leg failure could not be recorded: no leg")
        );
    }
}
