//! This node's write-intent bitmap: per-chunk counters in memory, bits on disk.
//!
//! The guarantee (md's): a chunk's bit is durable on every in-sync leg before any
//! data write to that chunk is issued, and is cleared only after every write to the
//! chunk completed, the legs were flushed, the chunk stayed idle for a daemon period,
//! and the array is not degraded. Many writers waiting for the same bitmap write
//! share one flush.

use crate::md::bitmap::{BitmapBits, BitmapGeometry, BitmapSuper, BITMAP_SB_LEN};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use vmm_sys_util::eventfd::EventFd;

mod doorbell;
mod flusher;
mod resync;

use resync::Window;
pub use resync::RESYNC_WINDOW;

pub use doorbell::Doorbell;

/// Where the bitmap goes: implemented by the mirror, which knows the in-sync legs.
pub trait BitmapStore: Send + Sync {
    /// Writes `data` at byte offset `off` on every in-sync leg and makes it durable.
    /// Succeeds when at least one in-sync leg has it (failed legs are failed).
    fn write_bitmap(&self, off: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every completed data write durable on every in-sync leg.
    fn flush_data(&self) -> io::Result<()>;
}

struct Inner {
    sb: BitmapSuper,
    /// Writes in flight per chunk.
    pending: Vec<u32>,
    /// The bits as they are (or are about to be) on disk.
    bits: BitmapBits,
    /// Bits set on disk for certain: those of the last bitmap write that
    /// succeeded, less those cleared by a write on its way.
    on_disk: BitmapBits,
    /// Chunks whose legs may differ: must be resynced before both legs are trusted.
    needed: BitmapBits,
    /// Chunks seen idle by the previous daemon pass.
    idle: BitmapBits,
    /// The window being resynced right now: the chunk, and the sectors
    /// `[lo, hi)` of it being copied (writes overlapping them wait).
    resyncing: Option<Window>,
    /// The chunk a resync copies window by window, from its first window to its
    /// end: a write to it that ends degraded meanwhile (`redo`) keeps it needed.
    copying: Option<resync::ChunkCopy>,
    /// Chunks `[lo, hi)` another node is resyncing: writes wait, reads use the
    /// first leg (md-cluster's suspend window).
    remote: Option<(u64, u64)>,
    /// The node slot whose window `remote` is.
    remote_from: u32,
    /// Some mirror slot is not in sync: bits must stay set.
    hold_bits: bool,
    /// Writes miss a mirror slot: their chunks stay needed for a later recovery.
    incomplete_writes: bool,
    /// Generation of the in-memory bits; `flushed` is the generation on disk.
    generation: u64,
    flushed: u64,
    flushing: bool,
    /// The generation the flusher thread was asked to put on disk.
    flush_wanted: u64,
    /// Bitmap writes begun so far (numbers them).
    flush_attempts: u64,
    /// The last bitmap write that failed: its number, the generation it was to
    /// put on disk, and why.
    flush_failed: Option<(u64, u64, String)>,
    /// The generation on disk the flusher last woke the workers for.
    announced: u64,
    /// Threads waiting on `changed` (a write's end wakes them only if any: the
    /// wake is a system call, and most writes end with nobody waiting).
    waiters: u32,
}

/// Where a write stands with its bits (see [`WriteIntent::begin_write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// A resync covers the range: nothing counted; retry after a waker fired.
    Blocked,
    /// Counted, and the bits covering the range are on disk: write.
    Durable,
    /// Counted; the bits are on disk once this flush is ([`WriteIntent::flush_outcome`]).
    Flushing(FlushTicket),
}

/// A write's wait for the bitmap generation holding its bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket {
    generation: u64,
    /// Bitmap writes begun before the write's bits were set: only a write begun
    /// after them can fail it.
    attempts: u64,
}

/// Counters of what the bitmap did, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BitmapStats {
    /// Chunks with the bit set.
    pub dirty: u64,
    /// Chunks that need a resync.
    pub needed: u64,
    /// Total chunks.
    pub chunks: u64,
}

/// This node's write-intent bitmap.
pub struct WriteIntent {
    geometry: BitmapGeometry,
    /// Byte offset of this node's bitmap slot on every leg.
    slot_offset: u64,
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Number of needed chunks, readable without the lock (reads check it per request).
    needed_count: AtomicU64,
    /// Signalled when a resync of a chunk ends.
    wakers: Mutex<Vec<EventFd>>,
    /// A remote resync window is installed.
    remote_active: std::sync::atomic::AtomicBool,
    /// Signalled when a flush is asked of the flusher thread.
    flush_asked: Condvar,
    /// A flusher thread writes the bits that asynchronous writes wait for.
    flusher: std::sync::atomic::AtomicBool,
    /// Rung when a flush is asked: the flusher thread waits on it without holding
    /// the array.
    flush_bell: Arc<Doorbell>,
    /// Rung when the resync thread may have work: chunks became needed, legs
    /// changed state, a repair was queued, the process stops.
    resync_bell: Doorbell,
    /// Rung when a bit is set: the bitmap daemon, with no bit to clear, waits on it.
    daemon_bell: Doorbell,
}

impl WriteIntent {
    /// A bitmap whose on-disk state is `sb` + `bits` at `slot_offset`. Every set bit
    /// is also marked needed (it may cover a write that reached only some legs).
    pub fn new(sb: BitmapSuper, bits: BitmapBits, slot_offset: u64) -> Self {
        let geometry = sb.geometry();
        let chunks = geometry.chunks();
        let needed = bits.clone();
        WriteIntent {
            geometry,
            slot_offset,
            inner: Mutex::new(Inner {
                sb,
                pending: vec![0; chunks as usize],
                on_disk: bits.clone(),
                bits,
                needed,
                idle: BitmapBits::new(chunks),
                resyncing: None,
                copying: None,
                remote: None,
                remote_from: 0,
                hold_bits: false,
                incomplete_writes: false,
                generation: 0,
                flushed: 0,
                flushing: false,
                flush_wanted: 0,
                flush_attempts: 0,
                flush_failed: None,
                announced: 0,
                waiters: 0,
            }),
            changed: Condvar::new(),
            needed_count: AtomicU64::new(0),
            wakers: Mutex::new(Vec::new()),
            remote_active: std::sync::atomic::AtomicBool::new(false),
            flush_asked: Condvar::new(),
            flusher: std::sync::atomic::AtomicBool::new(false),
            flush_bell: Arc::new(Doorbell::default()),
            resync_bell: Doorbell::default(),
            daemon_bell: Doorbell::default(),
        }
        .with_needed_counted()
    }

    fn with_needed_counted(self) -> Self {
        let n = self.lock().needed.count_dirty();
        self.needed_count.store(n, Ordering::Release);
        if n > 0 {
            self.resync_bell.ring();
        }
        self
    }

    fn set_needed(&self, g: &mut Inner, c: u64) {
        if let Some(copy) = g.copying.as_mut().filter(|copy| copy.chunk == c) {
            // Already needed, but a window copied before this write ended: the
            // chunk must not be taken for in sync when its copy ends.
            copy.redo = true;
        }
        if c < g.needed.chunks() && !g.needed.get(c) {
            g.needed.set(c);
            self.needed_count.fetch_add(1, Ordering::AcqRel);
            self.resync_bell.ring();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for `changed`, counted in `waiters`.
    fn wait_changed<'a>(&self, mut g: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        g.waiters += 1;
        g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        g.waiters -= 1;
        g
    }

    /// The geometry.
    pub fn geometry(&self) -> BitmapGeometry {
        self.geometry
    }

    /// The chunks touched by `sectors` sectors at array sector `sector`.
    pub fn chunk_range(&self, sector: u64, sectors: u64) -> std::ops::RangeInclusive<u64> {
        let first = self.geometry.chunk_of(sector);
        let last = self
            .geometry
            .chunk_of(sector + sectors.max(1) - 1)
            .min(self.geometry.chunks().saturating_sub(1));
        first..=last
    }

    /// Marks chunks needed (e.g. dirty bits merged from another node's slot) and sets
    /// their bits; they are written with the next flush.
    pub fn mark_needed(&self, bits: &BitmapBits) {
        let mut g = self.lock();
        for c in bits.dirty() {
            self.set_needed(&mut g, c);
            g.bits.set(c);
        }
        g.generation += 1;
        self.daemon_bell.ring();
    }

    /// Marks every chunk needed (full resync).
    pub fn mark_all_needed(&self) {
        let mut g = self.lock();
        g.needed.set_all();
        g.bits.set_all();
        self.needed_count
            .store(g.needed.chunks(), Ordering::Release);
        g.generation += 1;
        self.resync_bell.ring();
        self.daemon_bell.ring();
    }

    /// Records the array's state: with `hold_bits` (some mirror slot not in sync)
    /// bits are never cleared; with `incomplete_writes` (writes miss a mirror slot)
    /// every completed write leaves its chunk needed, for a later recovery.
    pub fn set_state(&self, hold_bits: bool, incomplete_writes: bool) {
        let mut g = self.lock();
        g.hold_bits = hold_bits;
        g.incomplete_writes = incomplete_writes;
        drop(g);
        // Called whenever a leg changes state: a leg to copy to may have come.
        self.resync_bell.ring();
    }

    /// Called before a data write: counts the write and makes its chunks' bits
    /// durable. Waits while one of the chunks is being resynced.
    pub fn start_write(
        &self,
        sector: u64,
        sectors: u64,
        store: &dyn BitmapStore,
    ) -> io::Result<()> {
        loop {
            if self.try_start_write(sector, sectors, store)? {
                return Ok(());
            }
            let range = self.chunk_range(sector, sectors);
            let mut g = self.lock();
            while Self::blocked(&g, sector, sectors, &range) {
                g = self.wait_changed(g);
            }
        }
    }

    /// Like [`WriteIntent::start_write`] but never waits for a resync: returns
    /// `Ok(false)` (nothing counted) when a chunk of the range is being resynced. The
    /// caller retries after a waker registered with [`WriteIntent::add_waker`] fired.
    pub fn try_start_write(
        &self,
        sector: u64,
        sectors: u64,
        store: &dyn BitmapStore,
    ) -> io::Result<bool> {
        let ticket = match self.begin_write(sector, sectors) {
            Intent::Blocked => return Ok(false),
            Intent::Durable => return Ok(true),
            Intent::Flushing(t) => t,
        };
        let r = self.flush_for(ticket, store);
        if r.is_err() {
            self.end_write(sector, sectors, true);
        }
        r.map(|()| true)
    }

    /// Counts a write to `sectors` at `sector` and sets the bits covering it in
    /// memory, without writing them: [`Intent::Flushing`] says the write must wait
    /// for a flush ([`WriteIntent::request_flush`]). Never waits.
    pub fn begin_write(&self, sector: u64, sectors: u64) -> Intent {
        let range = self.chunk_range(sector, sectors);
        let mut g = self.lock();
        if Self::blocked(&g, sector, sectors, &range) {
            return Intent::Blocked;
        }
        let mut newly_set = false;
        for c in range.clone() {
            let p = &mut g.pending[c as usize];
            *p = p.saturating_add(1);
            g.idle.clear(c);
            if !g.bits.get(c) {
                g.bits.set(c);
                newly_set = true;
            }
        }
        if newly_set {
            g.generation += 1;
            self.daemon_bell.ring();
        }
        if range.clone().all(|c| g.on_disk.get(c)) {
            return Intent::Durable;
        }
        Intent::Flushing(FlushTicket {
            generation: g.generation,
            attempts: g.flush_attempts,
        })
    }

    /// Wakes the workers (their completion eventfds registered with
    /// [`WriteIntent::add_waker`]).
    pub fn wake_workers(&self) {
        self.wake();
    }

    fn wake(&self) {
        for w in self.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = w.write(1);
        }
    }

    /// Registers an eventfd to signal whenever a chunk's resync ends (wakes workers
    /// that deferred writes to it).
    pub fn add_waker(&self, fd: EventFd) {
        self.wakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fd);
    }

    /// Called when a data write finished (on every leg it went to).
    pub fn end_write(&self, sector: u64, sectors: u64, degraded: bool) {
        let range = self.chunk_range(sector, sectors);
        let mut g = self.lock();
        let degraded = degraded || g.incomplete_writes;
        for c in range {
            let p = &mut g.pending[c as usize];
            *p = p.saturating_sub(1);
            if degraded {
                self.set_needed(&mut g, c);
            }
        }
        let waiting = g.waiters > 0;
        drop(g);
        if waiting {
            self.changed.notify_all();
        }
    }

    /// Writes the bitmap if its generation `want` is not on disk yet; concurrent
    /// callers share one write.
    fn flush_locked<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        want: u64,
        store: &dyn BitmapStore,
    ) -> io::Result<()> {
        loop {
            if g.flushed >= want {
                return Ok(());
            }
            if g.flushing {
                g = self.wait_changed(g);
                continue;
            }
            g.flushing = true;
            g.flush_attempts += 1;
            let attempt = g.flush_attempts;
            let target = g.generation;
            let data = self.encode(&g);
            // While it is on its way, a leg holds either bits: only those set in
            // both are set for certain.
            let snapshot = g.bits.clone();
            g.on_disk.keep_common(&snapshot);
            drop(g);
            let r = store.write_bitmap(self.slot_offset, &data);
            g = self.lock();
            g.flushing = false;
            match &r {
                Ok(()) => {
                    g.flushed = g.flushed.max(target);
                    g.on_disk = snapshot;
                }
                Err(e) => g.flush_failed = Some((attempt, target, e.to_string())),
            }
            self.changed.notify_all();
            r?;
        }
    }

    fn encode(&self, g: &Inner) -> Vec<u8> {
        let mut data = vec![0u8; self.geometry.slot_len() as usize];
        data[..BITMAP_SB_LEN].copy_from_slice(&g.sb.encode());
        let bits = g.bits.as_bytes();
        data[BITMAP_SB_LEN..BITMAP_SB_LEN + bits.len()].copy_from_slice(bits);
        data
    }

    /// Writes the bitmap now (superblock fields and bits).
    pub fn flush(&self, store: &dyn BitmapStore) -> io::Result<()> {
        let mut g = self.lock();
        g.generation += 1;
        let want = g.generation;
        self.flush_locked(g, want, store)
    }

    /// Updates the bitmap superblock's `events` (as on every md superblock write)
    /// and writes it.
    pub fn set_events(&self, events: u64, store: &dyn BitmapStore) -> io::Result<()> {
        {
            let mut g = self.lock();
            g.sb.events = events;
        }
        self.flush(store)
    }

    /// One pass of the bitmap daemon: clears the bits of chunks that stayed idle
    /// since the previous pass, after flushing the legs. Returns how many were cleared.
    pub fn daemon_pass(&self, events: u64, store: &dyn BitmapStore) -> io::Result<u64> {
        let candidates: Vec<u64> = {
            let mut g = self.lock();
            if g.hold_bits {
                return Ok(0);
            }
            let mut ready = Vec::new();
            let set: Vec<u64> = g.bits.dirty().collect();
            for c in set {
                let busy = g.pending[c as usize] > 0
                    || g.needed.get(c)
                    || g.resyncing.is_some_and(|w| w.chunk == c);
                if busy {
                    g.idle.clear(c);
                } else if g.idle.get(c) {
                    ready.push(c);
                } else {
                    g.idle.set(c);
                }
            }
            ready
        };
        if candidates.is_empty() {
            return Ok(0);
        }
        // The writes that set these bits must be durable on every leg first.
        store.flush_data()?;
        let mut g = self.lock();
        if g.hold_bits {
            return Ok(0);
        }
        let mut cleared = 0;
        for c in candidates {
            let busy = g.pending[c as usize] > 0
                || g.needed.get(c)
                || g.resyncing.is_some_and(|w| w.chunk == c);
            if !busy && g.idle.get(c) {
                g.bits.clear(c);
                g.idle.clear(c);
                cleared += 1;
            }
        }
        if cleared > 0 {
            g.sb.events_cleared = events;
            g.generation += 1;
            let want = g.generation;
            self.flush_locked(g, want, store)?;
        }
        Ok(cleared)
    }

    /// At shutdown: flushes the legs and clears every bit whose chunk has no write in
    /// flight and needs no resync (unless bits must be held). Returns how many.
    pub fn clear_idle_now(&self, events: u64, store: &dyn BitmapStore) -> io::Result<u64> {
        if self.lock().hold_bits {
            return Ok(0);
        }
        store.flush_data()?;
        let mut g = self.lock();
        if g.hold_bits {
            return Ok(0);
        }
        let set: Vec<u64> = g.bits.dirty().collect();
        let mut cleared = 0;
        for c in set {
            if g.pending[c as usize] == 0
                && !g.needed.get(c)
                && g.resyncing.is_none_or(|w| w.chunk != c)
            {
                g.bits.clear(c);
                cleared += 1;
            }
        }
        g.sb.events_cleared = events;
        g.generation += 1;
        let want = g.generation;
        self.flush_locked(g, want, store)?;
        Ok(cleared)
    }

    /// A copy of the bits that are set (for a bitmap-guided recovery).
    pub fn dirty_bits(&self) -> BitmapBits {
        self.lock().bits.clone()
    }

    /// Writes in flight, over all chunks.
    pub fn writes_in_flight(&self) -> u64 {
        self.lock().pending.iter().map(|&p| u64::from(p)).sum()
    }

    /// Counters for status.
    pub fn stats(&self) -> BitmapStats {
        let g = self.lock();
        BitmapStats {
            dirty: g.bits.count_dirty(),
            needed: g.needed.count_dirty(),
            chunks: self.geometry.chunks(),
        }
    }

    /// A copy of the bitmap superblock.
    pub fn superblock(&self) -> BitmapSuper {
        self.lock().sb.clone()
    }
}

#[cfg(test)]
mod tests;
