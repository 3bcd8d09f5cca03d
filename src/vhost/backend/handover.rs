//! What a front-end that stops or starts the vrings (a live migration's source
//! and destination) waits for on the storage side, logged once per stop and
//! start: the source's drain (GET_VRING_BASE) and the writer role's release, the
//! destination's taking of the role, and its first request's service.

use log::info;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A queue's first request since its vring started.
#[derive(Debug, Default)]
pub(super) struct FirstRequest {
    /// The queue started and its first request has not ended yet (the request
    /// path looks at this only).
    waiting: AtomicBool,
    /// When the queue started, and when its first request arrived.
    clock: Mutex<Option<(Instant, Option<Instant>)>>,
}

impl FirstRequest {
    /// The vring started at `at`; `role`: the writer role was asked for, which
    /// took that long, and whether it was granted.
    pub(super) fn started(&self, qi: usize, at: Instant, role: Option<(Duration, bool)>) {
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, None));
        self.waiting.store(true, Ordering::Release);
        match role {
            Some((took, true)) => info!(
                "queue {qi}: started; writer role taken in {:.3} ms",
                ms(took)
            ),
            Some((took, false)) => info!(
                "queue {qi}: started; writer role refused in {:.3} ms",
                ms(took)
            ),
            None => info!("queue {qi}: started"),
        }
    }

    /// A request was taken from the ring.
    pub(super) fn arrived(&self) {
        if !self.waiting.load(Ordering::Acquire) {
            return;
        }
        if let Some((_, arrived)) = self
            .clock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            arrived.get_or_insert_with(Instant::now);
        }
    }

    /// A request ended (its used entry written).
    pub(super) fn ended(&self, qi: usize) {
        // A plain load first: this runs for every completion.
        if !self.waiting.load(Ordering::Relaxed) || !self.waiting.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some((start, arrived)) = self.clock.lock().unwrap_or_else(|e| e.into_inner()).take()
        else {
            return;
        };
        let now = Instant::now();
        let arrived = arrived.unwrap_or(now);
        info!(
            "queue {qi}: first request since the start ended {:.3} ms after it (arrived after {:.3} ms, served in {:.3} ms)",
            ms(now - start),
            ms(arrived.saturating_duration_since(start)),
            ms(now.saturating_duration_since(arrived))
        );
    }

    /// The vring stopped: a first request not ended by now is not waited for.
    pub(super) fn stopped(&self) {
        self.waiting.store(false, Ordering::Release);
        *self.clock.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Logs a vring stop: its drain took `drain`, with `in_flight` requests then.
pub(super) fn log_stop(qi: usize, drain: Duration, in_flight: usize) {
    info!(
        "queue {qi}: stopped (GET_VRING_BASE) in {:.3} ms, {in_flight} requests in flight drained",
        ms(drain)
    );
}

/// Logs the writer role's release, which held the front-end up for `took` (the
/// lock manager's round trip runs in the background).
pub(super) fn log_role_given_back(took: Duration) {
    info!("writer role given back in {:.3} ms", ms(took));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_request_after_a_start_is_timed() {
        let f = FirstRequest::default();
        f.arrived();
        f.ended(0);
        assert!(f.clock.lock().unwrap().is_none(), "timed before any start");
        f.started(0, Instant::now(), None);
        f.arrived();
        let arrived = f.clock.lock().unwrap().unwrap().1;
        assert!(arrived.is_some());
        f.arrived();
        assert_eq!(
            f.clock.lock().unwrap().unwrap().1,
            arrived,
            "a second arrival counted"
        );
        f.ended(0);
        assert!(f.clock.lock().unwrap().is_none());
        assert!(!f.waiting.load(Ordering::Relaxed));
        f.started(0, Instant::now(), None);
        f.stopped();
        assert!(!f.waiting.load(Ordering::Relaxed));
    }
}
