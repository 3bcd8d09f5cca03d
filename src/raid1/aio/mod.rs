//! The asynchronous I/O path of the mirror: one [`AsyncIo`] per worker thread turns
//! guest reads, writes and flushes into io_uring operations on the legs and reports
//! each request once every leg answered. Legs without a file descriptor, or buffers
//! that direct I/O cannot take, go through the synchronous path instead.

mod complete;
mod submit;

use super::array::{Array, Member};
use super::bufs::Buffers;
use super::offload::Offloaded;
use crate::bitmap::{FlushTicket, Intent};
use crate::storage::uring::{Cqe, Ring};
use std::io;
use std::sync::Arc;

/// A request's tag, chosen by the caller.
pub type Token = u64;

/// The most bytes one request may move: what one read or write system call
/// transfers at most (Linux `MAX_RW_COUNT`), so a leg's answer fits its `i32`.
pub const MAX_TRANSFER: usize = i32::MAX as usize & !4095;

enum Kind {
    Read {
        member: Arc<Member>,
        sector: u64,
    },
    Write {
        sector: u64,
        sectors: u64,
        ok_in_sync: usize,
        failed: Vec<(Arc<Member>, io::Error)>,
        /// A leg transferred less than asked without an error: the request
        /// fails, the leg stays.
        incomplete: Option<io::Error>,
        /// Times this write was started (see [`Array::rewrite_after_failure`]).
        attempts: usize,
    },
    Flush {
        ok_in_sync: usize,
        failed: Vec<(Arc<Member>, io::Error)>,
    },
}

/// What a request still needs once every leg answered: the record of the leg
/// failures seen meanwhile, then this.
enum Rest {
    Read(io::Result<()>),
    Write {
        sector: u64,
        ok_in_sync: usize,
        last_err: Option<io::Error>,
        incomplete: Option<io::Error>,
        /// Written again once the failures are recorded.
        rewrite: bool,
        attempts: usize,
        bufs: Buffers,
    },
    Flush {
        ok_in_sync: usize,
        last_err: Option<io::Error>,
    },
}

/// A request waiting for the settler thread to record leg failures.
struct Parked {
    token: Token,
    /// Failures seen when it parked: it goes on once that many are recorded.
    seen: u64,
    rest: Rest,
}

/// A write counted in the bitmap, waiting for the flusher thread to put its
/// bits on disk before it goes to the legs.
pub(super) struct Awaiting {
    token: Token,
    sector: u64,
    sectors: u64,
    bytes: usize,
    bufs: Buffers,
    attempts: usize,
    ticket: FlushTicket,
}

/// How one leg's part of a request ended.
enum LegOutcome {
    Done,
    /// The device reported an error: the leg fails.
    Failed(io::Error),
    /// The transfer stopped short without a device error: only the request fails.
    Incomplete(io::Error),
}

struct Op {
    token: Token,
    kind: Kind,
    /// Sub-operations (one per leg) still in flight.
    remaining: usize,
    /// Expected bytes per leg operation.
    bytes: usize,
    /// The request's buffers (their iovecs stay where they are while the kernel
    /// uses them).
    bufs: Buffers,
    /// Legs of the sub-operations, by index in the tag.
    legs: Vec<Arc<Member>>,
    /// Bytes each leg transferred so far (short completions are continued).
    done: Vec<usize>,
    /// Per leg: the iovecs of the remainder in flight after a short completion;
    /// boxed so their address is stable while the kernel uses them.
    rest: Vec<Box<[libc::iovec]>>,
}

impl Op {
    fn new(token: Token, kind: Kind, bytes: usize, bufs: Buffers, legs: Vec<Arc<Member>>) -> Op {
        let n = legs.len();
        Op {
            token,
            kind,
            remaining: n + 1, // +1 until every leg was started
            bytes,
            bufs,
            legs,
            done: vec![0; n],
            rest: (0..n).map(|_| Box::default()).collect(),
        }
    }
}

/// The iovecs of `iovs` after its first `skip` bytes.
fn remainder(iovs: &[libc::iovec], mut skip: usize) -> Box<[libc::iovec]> {
    let mut rest = Vec::with_capacity(iovs.len());
    for v in iovs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            // Stays inside the iovec: `skip < iov_len`.
            iov_base: (v.iov_base as *mut u8).wrapping_add(skip) as *mut libc::c_void,
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    rest.into_boxed_slice()
}

/// The bytes `bufs` hold, refused beyond what one request may move.
fn transfer_len(bufs: &Buffers) -> io::Result<usize> {
    Some(bufs.len())
        .filter(|&b| b <= MAX_TRANSFER)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("request larger than {MAX_TRANSFER} bytes"),
            )
        })
}

// SAFETY: the remainder iovecs point into the op's own `Buffers`; the op is only
// moved between threads as a whole.
unsafe impl Send for Op {}

/// Per-worker asynchronous I/O state.
pub struct AsyncIo {
    ring: Ring,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    done: Vec<(Token, io::Result<()>)>,
    cqes: Vec<Cqe>,
    /// Writes waiting for a chunk's resync to end (with their attempt count).
    deferred: Vec<(Token, u64, Buffers, usize)>,
    /// Requests waiting for a leg failure to be recorded.
    parked: Vec<Parked>,
    /// Writes waiting for their bitmap bits to be on disk.
    awaiting: Vec<Awaiting>,
    /// Leg writes running on threads of their own (slow legs), and their results.
    offloaded: Arc<Offloaded>,
    offloaded_running: usize,
    /// Whole requests running on threads of their own.
    jobs_running: usize,
}

const LEG_BITS: u32 = 8;

impl AsyncIo {
    /// A ring with `entries` slots; where the kernel has no io_uring, a
    /// synchronous one (every leg's I/O is then done in place, as for legs
    /// without a file descriptor).
    pub fn new(entries: u32) -> io::Result<AsyncIo> {
        let (ring, why) = Ring::new_or_synchronous(entries)?;
        if let Some(e) = why {
            // Said once per process, not once per queue.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| log::warn!("io_uring unavailable ({e}): leg I/O runs synchronously"));
        }
        AsyncIo::with_ring(ring)
    }

    /// Leg I/O done in place, completions reported as from a ring (tests, and
    /// callers that wait for each request).
    pub fn synchronous() -> io::Result<AsyncIo> {
        AsyncIo::with_ring(Ring::synchronous()?)
    }

    fn with_ring(ring: Ring) -> io::Result<AsyncIo> {
        let offloaded = Arc::new(Offloaded::new(ring.waker()?));
        Ok(AsyncIo {
            ring,
            ops: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            cqes: Vec::new(),
            deferred: Vec::new(),
            parked: Vec::new(),
            awaiting: Vec::new(),
            offloaded,
            offloaded_running: 0,
            jobs_running: 0,
        })
    }

    /// A second handle on the completion eventfd (to wake this worker).
    pub fn waker(&self) -> io::Result<vmm_sys_util::eventfd::EventFd> {
        self.ring.waker()
    }

    /// The eventfd that becomes readable when completions are ready to reap.
    pub fn eventfd(&self) -> std::os::fd::RawFd {
        self.ring.eventfd()
    }

    /// Requests in flight (including deferred and parked ones).
    pub fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len()
            + self.deferred.len()
            + self.parked.len()
            + self.awaiting.len()
            + self.jobs_running
    }

    /// Runs request `token` on a thread of its own (a request without an
    /// asynchronous path that may wait for other nodes); its result comes from
    /// [`AsyncIo::take_done`] like any other.
    pub fn run_detached(
        &mut self,
        token: Token,
        job: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) {
        match self.offloaded.run(token, Box::new(job)) {
            Ok(()) => self.jobs_running += 1,
            Err(e) => self.done.push((token, Err(e))),
        }
    }

    fn insert(&mut self, op: Op) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.ops[i] = Some(op);
                i
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    /// Hands queued operations to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.flush()
    }

    /// Whether each request should be handed to the kernel as soon as it is
    /// queued rather than with the rest of its batch: the last submission left
    /// operations in flight, so the legs' devices work while the next requests
    /// are taken. A batch handed over whole starts only once its last request is
    /// prepared and, on a device that answers a batch at once, comes back whole:
    /// the guest then refills its queue in step with it and the device idles
    /// while each batch crosses the rings. Where the kernel finishes operations
    /// within the submission (page cache, tmpfs), batches only save system calls.
    /// A request that continues the previous one on its leg waits for the end
    /// of the batch too: the kernel merges a sequential stream's pieces into
    /// larger device requests only when they reach it together.
    pub fn submit_each(&self) -> bool {
        self.ring.busy_after_flush() && !self.ring.last_was_sequential()
    }

    /// Takes the requests that finished.
    pub fn take_done(&mut self) -> Vec<(Token, io::Result<()>)> {
        std::mem::take(&mut self.done)
    }

    /// Processes completions from the kernel; finished requests go to the done list.
    pub fn reap(&mut self, array: &Array) {
        self.resume_parked(array);
        self.resume_awaiting(array);
        self.retry_deferred(array);
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(&mut cqes);
        let slow = self.offloaded.take();
        self.offloaded_running = self.offloaded_running.saturating_sub(slow.len());
        cqes.extend(slow);
        for c in cqes.drain(..) {
            self.complete_one(array, c);
        }
        self.cqes = cqes;
        if self.jobs_running > 0 {
            let jobs = self.offloaded.take_requests();
            self.jobs_running = self.jobs_running.saturating_sub(jobs.len());
            self.done.extend(jobs);
        }
    }

    /// Issues the writes whose bits are on disk now; fails those whose bitmap
    /// write failed.
    fn resume_awaiting(&mut self, array: &Array) {
        if self.awaiting.is_empty() {
            return;
        }
        for w in std::mem::take(&mut self.awaiting) {
            match array.bitmap.flush_outcome(w.ticket) {
                None => self.awaiting.push(w),
                Some(Ok(())) => array.resume_write(self, w),
                Some(Err(e)) => {
                    array.bitmap.end_write(w.sector, w.sectors, true);
                    self.done.push((w.token, Err(e)));
                }
            }
        }
    }

    /// Resubmits writes that waited for a resync.
    pub fn retry_deferred(&mut self, array: &Array) {
        for (token, sector, bufs, attempts) in std::mem::take(&mut self.deferred) {
            array.start_write(self, token, sector, bufs, attempts);
        }
        let _ = self.ring.flush();
    }

    /// Waits for and processes completions until nothing is in flight.
    pub fn drain(&mut self, array: &Array) -> io::Result<()> {
        while self.in_flight() > 0 {
            // Offloaded writes and parked requests do not complete through the
            // kernel: poll for them.
            if self.ops.len() > self.free.len()
                && self.offloaded_running == 0
                && self.parked.is_empty()
                && self.awaiting.is_empty()
                && self.jobs_running == 0
            {
                self.ring.wait()?;
            } else {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.reap(array);
        }
        Ok(())
    }
}

/// Whether a leg can take `iovs` at byte `off` through `ring` (the entry is
/// then queued there).
fn ring_fd(ring: &Ring, m: &Member, iovs: &[libc::iovec], off: u64) -> Option<std::os::fd::RawFd> {
    if !ring.is_async() {
        return None;
    }
    let (fd, align) = m.leg.raw_fd()?;
    if align > 1 {
        let a = align as u64;
        if off % a != 0
            || iovs
                .iter()
                .any(|v| v.iov_base as u64 % a != 0 || v.iov_len as u64 % a != 0)
        {
            return None;
        }
    }
    if iovs.len() > 1024 {
        return None;
    }
    ring.note_target(m.leg.issues_inline());
    Some(fd)
}

#[cfg(test)]
mod tests;
