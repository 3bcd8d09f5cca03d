//! A wake-up for an idle thread: rung whenever it has something to do, so that it
//! waits without polling. One ring is kept until it is taken.

use super::WriteIntent;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

/// Rung by whoever gives a waiting thread work; the thread waits on it.
pub struct Doorbell {
    tx: Sender<()>,
    rx: Receiver<()>,
}

impl Default for Doorbell {
    fn default() -> Self {
        let (tx, rx) = bounded(1);
        Doorbell { tx, rx }
    }
}

impl Doorbell {
    /// Wakes the waiter, or the next wait if nobody waits now.
    pub fn ring(&self) {
        let _ = self.tx.try_send(());
    }

    /// Waits up to `timeout` for a ring; `true` if it rang.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.rx.recv_timeout(timeout).is_ok()
    }

    /// The receiving end, to wait for a ring among other events (`select!`).
    pub fn receiver(&self) -> &Receiver<()> {
        &self.rx
    }
}

/// The bitmap's doorbells, for the threads that wait on them.
impl WriteIntent {
    /// The doorbell of the resync thread (see [`Doorbell`]).
    pub fn resync_bell(&self) -> &Doorbell {
        &self.resync_bell
    }

    /// The doorbell of the bitmap daemon: rung when a bit is set (see
    /// [`WriteIntent::is_clean`]).
    pub fn daemon_bell(&self) -> &Doorbell {
        &self.daemon_bell
    }

    /// Whether no bit is set: the bitmap daemon has nothing to clear until
    /// [`WriteIntent::daemon_bell`] rings.
    pub fn is_clean(&self) -> bool {
        self.lock().bits.dirty().next().is_none()
    }

    /// The doorbell the flusher thread waits on.
    pub fn flush_bell(&self) -> Arc<Doorbell> {
        self.flush_bell.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_kept_for_the_next_wait_and_taken_once() {
        let d = Doorbell::default();
        d.ring();
        d.ring();
        assert!(d.wait(Duration::ZERO));
        assert!(!d.wait(Duration::from_millis(1)));
    }

    #[test]
    fn a_ring_wakes_a_waiter() {
        let d = std::sync::Arc::new(Doorbell::default());
        let d2 = d.clone();
        let t = std::thread::spawn(move || d2.wait(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        d.ring();
        assert!(t.join().unwrap());
    }
}
