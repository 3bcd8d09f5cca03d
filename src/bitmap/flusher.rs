//! Bitmap writes off the queue workers: an asynchronous write sets its bits in
//! memory ([`WriteIntent::begin_write`]) and waits, parked by its worker, while a
//! flusher thread puts them on disk; writes whose bits are set meanwhile share
//! that flush (md's raid1 likewise queues such writes until the bitmap is unplugged).

use super::{BitmapStore, FlushTicket, WriteIntent};
use std::io;
use std::sync::atomic::Ordering;

impl WriteIntent {
    /// Writes the bits `t` waits for, on this thread (shared with a concurrent
    /// bitmap write that covers them).
    pub fn flush_for(&self, t: FlushTicket, store: &dyn BitmapStore) -> io::Result<()> {
        self.flush_locked(self.lock(), t.generation, store)
    }

    /// Bitmap writes tried so far (tests).
    #[cfg(test)]
    pub(crate) fn flush_attempts(&self) -> u64 {
        self.lock().flush_attempts
    }

    /// Whether a flusher thread serves [`WriteIntent::request_flush`].
    pub fn flushes_in_background(&self) -> bool {
        self.flusher.load(Ordering::Acquire)
    }

    /// Marks the flusher thread as running (or gone).
    pub fn set_flusher(&self, running: bool) {
        self.flusher.store(running, Ordering::Release);
    }

    /// Asks the flusher thread for the flush `t` waits for; the workers are woken
    /// (their wakers) once it is done or failed.
    pub fn request_flush(&self, t: FlushTicket) {
        let mut g = self.lock();
        g.flush_wanted = g.flush_wanted.max(t.generation);
        drop(g);
        self.flush_asked.notify_all();
        self.flush_bell.ring();
    }

    /// Whether the flusher thread has nothing to do: no flush asked, and the
    /// workers heard of every bitmap write. It then waits on
    /// [`WriteIntent::flush_bell`], which [`WriteIntent::request_flush`] rings.
    pub fn flush_idle(&self) -> bool {
        let g = self.lock();
        g.flush_wanted <= g.flushed && g.flushed <= g.announced
    }

    /// How the flush `t` waits for ended: `None` while it is not over.
    pub fn flush_outcome(&self, t: FlushTicket) -> Option<io::Result<()>> {
        let g = self.lock();
        if g.flushed >= t.generation {
            return Some(Ok(()));
        }
        match &g.flush_failed {
            Some((attempt, upto, why)) if *attempt > t.attempts && *upto >= t.generation => {
                Some(Err(io::Error::other(format!("bitmap write failed: {why}"))))
            }
            _ => None,
        }
    }

    /// One turn of the flusher thread: waits up to `timeout` for a flush to be
    /// asked, writes the bits, then wakes the workers. Returns the error of a
    /// bitmap write that failed.
    pub fn serve_flush(
        &self,
        store: &dyn BitmapStore,
        timeout: std::time::Duration,
    ) -> io::Result<()> {
        let mut g = self.lock();
        if g.flush_wanted <= g.flushed && g.flushed <= g.announced {
            g = self
                .flush_asked
                .wait_timeout(g, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let want = g.flush_wanted;
        if want <= g.flushed {
            // Another thread's bitmap write (a synchronous write's, the daemon's)
            // may have put parked writes' bits on disk: their workers must hear it.
            let news = g.flushed > g.announced;
            g.announced = g.flushed;
            drop(g);
            if news {
                self.wake();
            }
            return Ok(());
        }
        let r = self.flush_locked(g, want, store);
        let mut g = self.lock();
        g.announced = g.announced.max(g.flushed);
        drop(g);
        self.wake();
        r
    }
}
