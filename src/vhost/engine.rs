//! One path for every request: a descriptor chain is parsed once
//! ([`request::prepare`]), submitted to the mirror through one [`AsyncIo`] (io_uring,
//! or leg I/O in place where the kernel or a leg offers no ring), and finished in
//! one place ([`Engine::finished`]: write-through flush, dirty log, status byte).
//! The queue workers and [`process`] both use it.

use super::request::{self, Context, Kind, Prepared, RequestError, UsedLen};
use super::stats::QueueStats;
use crate::raid1::{Array, AsyncIo, Buffers};
use log::warn;
use std::io;
use std::sync::Arc;
use std::time::Instant;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// A request submitted to the mirror, until it completes.
struct Pending<M> {
    head: u16,
    status: GuestAddress,
    /// Bytes written into guest memory on success (read data).
    used: u32,
    /// The guest memory the request's status (and buffers) live in.
    mem: Arc<M>,
    /// Guest buffers a read fills (marked in the dirty log when it ends, whether it
    /// succeeded or not: a failed read may have written part of them).
    read_segs: Vec<(GuestAddress, usize)>,
    write: bool,
    /// What it is, how many bytes it moves and when it was taken off the ring
    /// (for the statistics).
    kind: Kind,
    bytes: usize,
    started: Option<Instant>,
}

/// One queue's requests in flight and the I/O they run on.
pub struct Engine<M> {
    io: AsyncIo,
    pending: Vec<Option<Pending<M>>>,
    free: Vec<usize>,
    stats: Option<QueueStats>,
}

impl<M> Engine<M>
where
    M: GuestMemoryBackend + Send + Sync + 'static,
{
    /// Requests run on `io`.
    pub fn new(io: AsyncIo) -> Engine<M> {
        Engine {
            io,
            pending: Vec::new(),
            free: Vec::new(),
            stats: None,
        }
    }

    /// Records every request's end in `stats`.
    pub fn set_stats(&mut self, stats: QueueStats) {
        self.stats = Some(stats);
    }

    fn record(&self, kind: Kind, bytes: usize, started: Option<Instant>, status: u8) {
        if let (Some(s), Some(started)) = (&self.stats, started) {
            s.record(kind, bytes, started, status);
        }
    }

    /// The I/O the requests run on (its eventfd, reaping, draining).
    pub fn io(&mut self) -> &mut AsyncIo {
        &mut self.io
    }

    /// The eventfd that becomes readable when requests finish.
    pub fn eventfd(&self) -> std::os::fd::RawFd {
        self.io.eventfd()
    }

    /// A handle that wakes whoever waits on [`Engine::eventfd`].
    pub fn waker(&self) -> io::Result<vmm_sys_util::eventfd::EventFd> {
        self.io.waker()
    }

    /// Requests submitted and not finished yet.
    pub fn in_flight(&self) -> usize {
        self.pending.len() - self.free.len()
    }

    fn insert(&mut self, p: Pending<M>) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.pending[i] = Some(p);
                i as u64
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u64
            }
        }
    }

    fn take(&mut self, token: u64) -> Option<Pending<M>> {
        let p = self.pending.get_mut(token as usize)?.take();
        if p.is_some() {
            self.free.push(token as usize);
        }
        p
    }

    /// Starts chain `head`; returns its used length when it ended at once (its
    /// status is written), `None` when it was submitted (see [`Engine::finished`]).
    pub fn start(
        &mut self,
        ctx: &Context<'_>,
        mem: &Arc<M>,
        head: u16,
        descs: &[Descriptor],
    ) -> Option<UsedLen> {
        let array = ctx.array;
        // The clock is read only when the statistics are kept.
        let started = self.stats.as_ref().map(|_| Instant::now());
        let pending = |status, used, read_segs, write, kind, bytes| Pending {
            head,
            status,
            used,
            mem: mem.clone(),
            read_segs,
            write,
            kind,
            bytes,
            started,
        };
        match request::prepare(ctx, &**mem, descs) {
            Prepared::Done(ended) => {
                self.record(ended.kind, 0, started, ended.status);
                return Some(ended.used);
            }
            Prepared::Flush { status } => {
                let p = pending(status, 0, Vec::new(), false, Kind::Flush, 0);
                let token = self.insert(p);
                array.submit_flush(&mut self.io, token);
            }
            Prepared::Ranges {
                zeroes,
                ranges,
                status,
            } => {
                let kind = if zeroes {
                    Kind::WriteZeroes
                } else {
                    Kind::Discard
                };
                let token = self.insert(pending(status, 0, Vec::new(), false, kind, 0));
                let array = array.clone();
                self.io.run_detached(token, move || {
                    request::apply_ranges(&array, zeroes, &ranges)
                });
            }
            Prepared::Transfer(t) => {
                let bufs = match Buffers::guest(mem, &t.segs) {
                    Ok(b) => b,
                    Err(e) => {
                        let e = RequestError::Memory(e.to_string());
                        let kind = if t.write { Kind::Write } else { Kind::Read };
                        let (st, used) = request::finish(&**mem, t.status, Err(e));
                        self.record(kind, 0, started, st);
                        return Some(used);
                    }
                };
                let (used, read_segs, kind) = if t.write {
                    (0, Vec::new(), Kind::Write)
                } else {
                    (t.len as u32, t.segs, Kind::Read)
                };
                let p = pending(t.status, used, read_segs, t.write, kind, t.len);
                let token = self.insert(p);
                if t.write {
                    array.submit_write(&mut self.io, token, t.sector, bufs);
                } else {
                    array.submit_read(&mut self.io, token, t.sector, bufs);
                }
            }
        }
        None
    }

    /// Hands what [`Engine::start`] queued to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.io.submit()
    }

    /// After [`Engine::start`]: hands what it queued to the kernel now where
    /// the legs' devices work asynchronously ([`AsyncIo::submit_each`]); else
    /// it waits for [`Engine::submit`] at the end of the batch.
    pub fn submit_if_busy(&mut self) -> io::Result<()> {
        if self.io.submit_each() {
            self.io.submit()
        } else {
            Ok(())
        }
    }

    /// Finishes the requests the mirror completed: with `writethrough`, a write
    /// first has a flush after it; a read's buffers are logged dirty; the status
    /// is written. Returns `(head, used length)` for each, in completion order.
    pub fn finished(
        &mut self,
        array: &Array,
        writethrough: bool,
    ) -> io::Result<Vec<(u16, UsedLen)>> {
        let mut out = Vec::new();
        loop {
            let mut flushing = false;
            for (token, result) in self.io.take_done() {
                let Some(p) = self.take(token) else {
                    warn!("completion for an unknown request {token}");
                    continue;
                };
                // The read data went into guest memory behind vm-memory's back: log
                // it before the used entry tells the guest it is there.
                for &(addr, len) in &p.read_segs {
                    for v in GuestMemoryBackend::get_slices(&*p.mem, addr, len).flatten() {
                        v.bitmap().mark_dirty(0, v.len());
                    }
                }
                if result.is_ok() && p.write && writethrough {
                    // Write-through: the write completes once a flush after it did.
                    // Recorded as the write it is, when the flush ends.
                    let token = self.insert(Pending { write: false, ..p });
                    array.submit_flush(&mut self.io, token);
                    flushing = true;
                    continue;
                }
                let result = result.map(|()| p.used).map_err(RequestError::Io);
                let (st, used) = request::finish(&*p.mem, p.status, result);
                self.record(p.kind, p.bytes, p.started, st);
                out.push((p.head, used));
            }
            if !flushing {
                return Ok(out);
            }
            // A flush of legs without a ring may have finished already.
            self.io.submit()?;
        }
    }

    /// Waits until every request submitted finished on the mirror (their results
    /// are then taken by [`Engine::finished`]).
    pub fn drain(&mut self, array: &Array) -> io::Result<()> {
        self.io.drain(array)
    }

    /// Forgets the requests that finished without telling anybody (the
    /// front-end is gone); returns how many.
    pub fn forget_finished(&mut self) -> usize {
        let done = self.io.take_done();
        let n = done.len();
        for (t, _) in done {
            self.take(t);
        }
        n
    }
}

/// Runs one descriptor chain to its end and writes its status; returns the used
/// length. The same path as a queue worker's, waiting for the request.
pub fn process<M>(ctx: &Context<'_>, mem: &Arc<M>, descs: &[Descriptor]) -> UsedLen
where
    M: GuestMemoryBackend + Send + Sync + 'static,
{
    let io = match AsyncIo::synchronous() {
        Ok(io) => io,
        Err(e) => {
            warn!("request: {e}");
            return 0;
        }
    };
    let mut engine = Engine::new(io);
    if let Some(used) = engine.start(ctx, mem, 0, descs) {
        return used;
    }
    loop {
        if let Err(e) = engine.drain(ctx.array) {
            warn!("request: {e}");
        }
        match engine.finished(ctx.array, ctx.writethrough) {
            Ok(done) => {
                if let Some(&(_, used)) = done.first() {
                    return used;
                }
            }
            Err(e) => warn!("request: {e}"),
        }
        if engine.in_flight() == 0 {
            // Nothing in flight and nothing finished: not reachable for a started
            // request; the guest gets no status rather than a wrong one.
            return 0;
        }
    }
}
