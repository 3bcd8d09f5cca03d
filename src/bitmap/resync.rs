//! Resync windows: the window this node copies, and the one another node
//! announced; which writes they hold and which reads they send to the source.

use super::{Inner, WriteIntent};
use std::sync::atomic::Ordering;

/// Sectors a resync copies at a time (1 MiB): writes overlapping the window being
/// copied wait for it, the chunk's other writes go on.
pub const RESYNC_WINDOW: u64 = 2048;

/// A chunk being copied window by window.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChunkCopy {
    pub(super) chunk: u64,
    /// A write to the chunk ended degraded during the copy.
    pub(super) redo: bool,
}

/// A window of a local resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) chunk: u64,
    /// Array sectors `[lo, hi)`.
    pub(super) lo: u64,
    pub(super) hi: u64,
}

impl WriteIntent {
    /// Whether a write to `sectors` at `sector` (chunks `range`) must wait (a
    /// local or remote resync covers it).
    pub(super) fn blocked(
        g: &Inner,
        sector: u64,
        sectors: u64,
        range: &std::ops::RangeInclusive<u64>,
    ) -> bool {
        g.resyncing
            .is_some_and(|w| sector < w.hi && sector + sectors.max(1) > w.lo)
            || g.remote
                .is_some_and(|(lo, hi)| *range.start() < hi && *range.end() >= lo)
    }

    /// Installs (or with `hi_sector == 0` clears) the window of array sectors
    /// the node in slot `from` resyncs. Returns once every write already started
    /// inside the window has finished, so the resyncing node never races one of ours.
    pub fn set_remote_window(&self, from: u32, lo_sector: u64, hi_sector: u64) {
        let mut g = self.lock();
        if hi_sector == 0 || hi_sector <= lo_sector {
            g.remote = None;
            self.remote_active.store(false, Ordering::Release);
        } else {
            let lo = self.geometry.chunk_of(lo_sector);
            let hi = self.geometry.chunk_of(hi_sector - 1) + 1;
            g.remote = Some((lo, hi.min(self.geometry.chunks())));
            g.remote_from = from;
            self.remote_active.store(true, Ordering::Release);
            while let Some((lo, hi)) = g.remote {
                if (lo..hi).all(|c| g.pending.get(c as usize).is_none_or(|&p| p == 0)) {
                    break;
                }
                g = self.wait_changed(g);
            }
        }
        drop(g);
        self.changed.notify_all();
        self.wake();
    }

    /// The window another node resyncs: `(its slot, first chunk, end chunk)`.
    pub fn remote_window(&self) -> Option<(u32, u64, u64)> {
        let g = self.lock();
        g.remote.map(|(lo, hi)| (g.remote_from, lo, hi))
    }

    /// The node in slot `from` died: its resync window, if installed, is void
    /// (its chunks are needed in its bitmap, which the recovery merges).
    pub fn clear_remote_window_of(&self, from: u32) {
        let mut g = self.lock();
        if g.remote.is_none() || g.remote_from != from {
            return;
        }
        g.remote = None;
        self.remote_active.store(false, Ordering::Release);
        drop(g);
        self.changed.notify_all();
        self.wake();
    }

    /// Whether any chunk of the range must be read from the resync source only:
    /// chunks this node must resync, and, while another node resyncs, everything
    /// from its window on (it works upwards, and the chunks it has yet to reach may
    /// differ between the legs).
    pub fn is_needed(&self, sector: u64, sectors: u64) -> bool {
        if self.needed_count.load(Ordering::Acquire) == 0
            && !self.remote_active.load(Ordering::Acquire)
        {
            return false;
        }
        let range = self.chunk_range(sector, sectors);
        let g = self.lock();
        let in_remote = g.remote.is_some_and(|(lo, _)| *range.end() >= lo);
        in_remote || range.into_iter().any(|c| g.needed.get(c))
    }

    /// The next needed chunk at or after `from`.
    pub fn next_needed(&self, from: u64) -> Option<u64> {
        let g = self.lock();
        (from..self.geometry.chunks()).find(|&c| g.needed.get(c))
    }

    /// Takes chunk `c` for resync: waits until no write is in flight on it and
    /// holds new writes off until [`WriteIntent::end_resync`].
    pub fn begin_resync(&self, c: u64) {
        let start = self.geometry.chunk_start(c);
        self.begin_resync_window(c, start, start + self.geometry.chunk_sectors());
    }

    /// Takes sectors `[lo, hi)` of chunk `c` for resync: waits until no write is in
    /// flight on the chunk, then holds off new writes overlapping the window (only)
    /// until [`WriteIntent::end_resync_window`]. A chunk is copied window by window,
    /// so that a guest write elsewhere in it waits for one window's copy at most,
    /// not the whole chunk's (md holds writes for one resync request at a time).
    pub fn begin_resync_window(&self, c: u64, lo: u64, hi: u64) {
        let mut g = self.lock();
        while g.resyncing.is_some() {
            g = self.wait_changed(g);
        }
        // The whole chunk first: the writes in flight on it are counted per chunk,
        // and one of them may overlap the window.
        let start = self.geometry.chunk_start(c);
        g.resyncing = Some(Window {
            chunk: c,
            lo: start,
            hi: start + self.geometry.chunk_sectors(),
        });
        while g.pending.get(c as usize).is_some_and(|&p| p > 0) {
            g = self.wait_changed(g);
        }
        // No write is in flight on the chunk: those that start from now on and
        // miss the window may go.
        g.resyncing = Some(Window { chunk: c, lo, hi });
        drop(g);
        self.changed.notify_all();
        self.wake();
    }

    /// Ends a window of [`WriteIntent::begin_resync_window`]; the chunk stays needed.
    pub fn end_resync_window(&self) {
        let mut g = self.lock();
        g.resyncing = None;
        drop(g);
        self.changed.notify_all();
        self.wake();
    }

    /// Ends the whole-chunk window of [`WriteIntent::begin_resync`]; `in_sync`
    /// clears the chunk's needed mark (no write ran on it meanwhile).
    pub fn end_resync(&self, c: u64, in_sync: bool) {
        let mut g = self.lock();
        if in_sync && g.needed.get(c) {
            g.needed.clear(c);
            self.needed_count.fetch_sub(1, Ordering::AcqRel);
        }
        if g.resyncing.is_some_and(|w| w.chunk == c) {
            g.resyncing = None;
        }
        drop(g);
        self.changed.notify_all();
        self.wake();
    }

    /// Chunk `c` is to be copied window by window ([`WriteIntent::begin_resync_window`]);
    /// ends with [`WriteIntent::finish_chunk_copy`].
    pub fn start_chunk_copy(&self, c: u64) {
        self.lock().copying = Some(ChunkCopy {
            chunk: c,
            redo: false,
        });
    }

    /// The copy of chunk `c` ended; `copied`: every window of it was copied. The
    /// chunk stays needed unless it was, and no write to it ended degraded
    /// meanwhile (its data may differ between the legs again). Leaves the windows
    /// alone: only their owner ends them.
    pub fn finish_chunk_copy(&self, c: u64, copied: bool) {
        let mut g = self.lock();
        let redo = match g.copying.take() {
            Some(copy) if copy.chunk == c => copy.redo,
            other => {
                g.copying = other;
                true
            }
        };
        if copied && !redo && g.needed.get(c) {
            g.needed.clear(c);
            self.needed_count.fetch_sub(1, Ordering::AcqRel);
        }
        drop(g);
        self.changed.notify_all();
        self.wake();
    }
}
