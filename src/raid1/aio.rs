//! The asynchronous I/O path of the mirror: one [`AsyncIo`] per worker thread turns
//! guest reads, writes and flushes into io_uring operations on the legs and reports
//! each request once every leg answered. Legs without a file descriptor, or buffers
//! that direct I/O cannot take, go through the synchronous path instead.

use super::array::{Array, LegState, Member};
use super::offload::Offloaded;
use crate::storage::uring::{Cqe, Ring};
use std::io::{self, IoSlice, IoSliceMut};
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
        iovs: Box<[libc::iovec]>,
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
    /// The buffers; boxed so their address is stable while the kernel uses them.
    iovs: Box<[libc::iovec]>,
    /// Legs of the sub-operations, by index in the tag.
    legs: Vec<Arc<Member>>,
    /// Bytes each leg transferred so far (short completions are continued).
    done: Vec<usize>,
    /// Per leg: the iovecs of the remainder in flight after a short completion;
    /// boxed so their address is stable while the kernel uses them.
    rest: Vec<Box<[libc::iovec]>>,
}

impl Op {
    fn new(
        token: Token,
        kind: Kind,
        bytes: usize,
        iovs: Box<[libc::iovec]>,
        legs: Vec<Arc<Member>>,
    ) -> Op {
        let n = legs.len();
        Op {
            token,
            kind,
            remaining: n + 1, // +1 until every leg was started
            bytes,
            iovs,
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

/// The bytes `iovs` describe, refused beyond what one request may move.
fn transfer_len(iovs: &[libc::iovec]) -> io::Result<usize> {
    let bytes = iovs
        .iter()
        .try_fold(0usize, |t, v| t.checked_add(v.iov_len))
        .filter(|&b| b <= MAX_TRANSFER);
    bytes.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("request larger than {MAX_TRANSFER} bytes"),
        )
    })
}

// SAFETY: the raw iovec pointers refer to guest memory the submitter guarantees
// valid until completion; the op is only moved between threads as a whole.
unsafe impl Send for Op {}

/// Per-worker asynchronous I/O state.
pub struct AsyncIo {
    ring: Ring,
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    done: Vec<(Token, io::Result<()>)>,
    cqes: Vec<Cqe>,
    /// Writes waiting for a chunk's resync to end (with their attempt count).
    deferred: Vec<(Token, u64, Vec<libc::iovec>, usize)>,
    /// Requests waiting for a leg failure to be recorded.
    parked: Vec<Parked>,
    /// Leg writes running on threads of their own (slow legs), and their results.
    offloaded: Arc<Offloaded>,
    offloaded_running: usize,
    /// Whole requests running on threads of their own.
    jobs_running: usize,
}

// SAFETY: the deferred iovecs point to guest memory the submitter keeps valid until
// completion; the state is only used by one thread at a time (behind a mutex).
unsafe impl Send for AsyncIo {}

const LEG_BITS: u32 = 8;

impl AsyncIo {
    /// A ring with `entries` slots.
    pub fn new(entries: u32) -> io::Result<AsyncIo> {
        let ring = Ring::new(entries)?;
        let offloaded = Arc::new(Offloaded::new(ring.waker()?));
        Ok(AsyncIo {
            ring,
            ops: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            cqes: Vec::new(),
            deferred: Vec::new(),
            parked: Vec::new(),
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

    /// Takes the requests that finished.
    pub fn take_done(&mut self) -> Vec<(Token, io::Result<()>)> {
        std::mem::take(&mut self.done)
    }

    /// Processes completions from the kernel; finished requests go to the done list.
    pub fn reap(&mut self, array: &Array) {
        self.resume_parked(array);
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

    /// Resubmits writes that waited for a resync.
    pub fn retry_deferred(&mut self, array: &Array) {
        for (token, sector, iovs, attempts) in std::mem::take(&mut self.deferred) {
            // SAFETY: the submitter of the deferred write guaranteed its buffers.
            unsafe { array.start_write(self, token, sector, iovs, attempts) };
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

    fn complete_one(&mut self, array: &Array, c: Cqe) {
        let idx = (c.tag >> LEG_BITS) as usize;
        let leg = (c.tag & ((1 << LEG_BITS) - 1)) as usize;
        let Some(Some(op)) = self.ops.get(idx) else {
            log::error!("completion for an unknown request {:#x}", c.tag);
            return;
        };
        let Some(member) = op.legs.get(leg).cloned() else {
            log::error!("completion for an unknown leg {:#x}", c.tag);
            return;
        };
        let outcome = if c.result < 0 {
            LegOutcome::Failed(io::Error::from_raw_os_error(-c.result))
        } else {
            match self.progress(idx, leg, c.result as usize) {
                Some(outcome) => outcome,
                // The remainder is in flight.
                None => return,
            }
        };
        let Some(Some(op)) = self.ops.get_mut(idx) else {
            return;
        };
        let result = match &mut op.kind {
            Kind::Read { member, .. } => {
                member
                    .inflight
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match outcome {
                    LegOutcome::Done => Ok(()),
                    LegOutcome::Failed(e) | LegOutcome::Incomplete(e) => Err(e),
                }
            }
            Kind::Write {
                ok_in_sync,
                failed,
                incomplete,
                ..
            } => {
                match outcome {
                    LegOutcome::Done => {
                        if member.state() == LegState::InSync {
                            *ok_in_sync += 1;
                        }
                    }
                    LegOutcome::Failed(e) => failed.push((member, e)),
                    LegOutcome::Incomplete(e) => {
                        log::warn!("leg {}: {e}; the write fails", member.name());
                        *incomplete = Some(e);
                    }
                }
                Ok(())
            }
            Kind::Flush { ok_in_sync, failed } => {
                match outcome {
                    LegOutcome::Done => {
                        if member.state() == LegState::InSync {
                            *ok_in_sync += 1;
                        }
                    }
                    LegOutcome::Failed(e) | LegOutcome::Incomplete(e) => failed.push((member, e)),
                }
                Ok(())
            }
        };
        op.remaining -= 1;
        if op.remaining > 0 {
            return;
        }
        let Some(op) = self.ops[idx].take() else {
            return;
        };
        self.free.push(idx);
        self.finish(array, op, result);
    }

    /// The end of a request once every leg answered.
    fn finish(&mut self, array: &Array, op: Op, last: io::Result<()>) {
        let token = op.token;
        let rest = match op.kind {
            Kind::Read { member, sector } => match last {
                Ok(()) => {
                    self.done.push((token, Ok(())));
                    return;
                }
                Err(e) => {
                    // Retry synchronously over every in-sync leg; the range is
                    // rewritten on the failed leg later.
                    log::warn!(
                        "leg {}: read error at sector {sector}: {e}; retrying",
                        member.name()
                    );
                    // SAFETY: the submitter keeps the buffers valid until completion.
                    let mut bufs = unsafe { as_mut_slices(&op.iovs) };
                    Rest::Read(array.read_legs(sector, &mut bufs))
                }
            },
            Kind::Write {
                sector,
                sectors,
                ok_in_sync,
                failed,
                incomplete,
                attempts,
            } => {
                let any_failed = !failed.is_empty();
                let last_err = record_failures(array, failed, "write error");
                if let (Some(e), Some(fenced)) = (&last_err, array.refused_by_fence()) {
                    // No leg was failed: the write is on some legs only.
                    array.bitmap.end_write(sector, sectors, true);
                    self.done
                        .push((token, Err(io::Error::new(e.kind(), fenced))));
                    return;
                }
                // The write is over on the legs before a failure is recorded: the
                // record may wait for the token, held by a node whose new resync
                // window waits for this write. It is written again then (see
                // `Array::rewrite_after_failure`). A leg that took only part of the
                // write, or failed it and was kept (the last in-sync one), differs
                // from the others there: the chunk stays to be resynced.
                let rewrite = array.failure_unrecorded() && array.rewrite_after_failure(attempts);
                array
                    .bitmap
                    .end_write(sector, sectors, incomplete.is_some() || any_failed);
                Rest::Write {
                    sector,
                    ok_in_sync,
                    last_err,
                    incomplete,
                    rewrite,
                    attempts,
                    iovs: op.iovs,
                }
            }
            Kind::Flush { ok_in_sync, failed } => {
                let last_err = record_failures(array, failed, "flush failed");
                if let (Some(e), Some(fenced)) = (&last_err, array.refused_by_fence()) {
                    self.done
                        .push((token, Err(io::Error::new(e.kind(), fenced))));
                    return;
                }
                Rest::Flush {
                    ok_in_sync,
                    last_err,
                }
            }
        };
        self.settle(array, token, rest);
    }

    /// Completes `rest` once the leg failures seen so far are recorded: at once
    /// when they are, parked for the settler thread when it runs, else after
    /// recording them here.
    fn settle(&mut self, array: &Array, token: Token, rest: Rest) {
        let waits = match rest {
            Rest::Read(_) => array.read_waits_for_record(),
            _ => array.failure_unrecorded(),
        };
        if !waits {
            self.complete(array, token, rest, Ok(()));
        } else if array.settler().in_background() {
            let seen = array.failures_seen();
            array.settler().request();
            self.parked.push(Parked { token, seen, rest });
        } else {
            let settled = array.settle_failures();
            self.complete(array, token, rest, settled);
        }
    }

    /// Completes the parked requests whose failure record ended.
    fn resume_parked(&mut self, array: &Array) {
        if self.parked.is_empty() {
            return;
        }
        for p in std::mem::take(&mut self.parked) {
            match array.settle_outcome(p.seen) {
                Some(settled) => self.complete(array, p.token, p.rest, settled),
                None => self.parked.push(p),
            }
        }
    }

    fn complete(&mut self, array: &Array, token: Token, rest: Rest, settled: io::Result<()>) {
        let result = match rest {
            Rest::Read(result) => Array::read_settled(result, settled),
            Rest::Flush {
                ok_in_sync,
                last_err,
            } => settled.and_then(|()| {
                if ok_in_sync == 0 {
                    Err(last_err.unwrap_or_else(|| io::Error::other("no in-sync leg could flush")))
                } else {
                    Ok(())
                }
            }),
            Rest::Write {
                sector,
                ok_in_sync,
                last_err,
                incomplete,
                rewrite,
                attempts,
                iovs,
            } => {
                match (settled, incomplete) {
                    (Err(e), _) | (Ok(()), Some(e)) => Err(e),
                    (Ok(()), None) if ok_in_sync == 0 => Err(last_err
                        .unwrap_or_else(|| io::Error::other("no in-sync leg took the write"))),
                    (Ok(()), None) if rewrite => {
                        // SAFETY: the submitter keeps the buffers valid until completion.
                        unsafe {
                            array.start_write(self, token, sector, iovs.into_vec(), attempts + 1)
                        };
                        return;
                    }
                    (Ok(()), None) => Ok(()),
                }
            }
        };
        self.done.push((token, result));
    }
}

impl AsyncIo {
    /// Accounts `n` more bytes transferred by leg `leg` of op `idx`. A short
    /// transfer is continued for the remainder (`None`: it is in flight); one that
    /// cannot go on is an error of the request, not of the leg.
    fn progress(&mut self, idx: usize, leg: usize, n: usize) -> Option<LegOutcome> {
        let Some(Some(op)) = self.ops.get_mut(idx) else {
            return Some(LegOutcome::Done);
        };
        let (write, sector) = match op.kind {
            Kind::Flush { .. } => return Some(LegOutcome::Done),
            Kind::Read { sector, .. } => (false, sector),
            Kind::Write { sector, .. } => (true, sector),
        };
        let done = op.done[leg].saturating_add(n);
        op.done[leg] = done;
        if done >= op.bytes {
            return Some(LegOutcome::Done);
        }
        let short = || {
            LegOutcome::Incomplete(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("transfer stopped at {done} of {} bytes", op.bytes),
            ))
        };
        if n == 0 {
            return Some(short());
        }
        let m = op.legs[leg].clone();
        let off = m.byte_offset(sector) + done as u64;
        op.rest[leg] = remainder(&op.iovs, done);
        let (ptr, len) = (op.rest[leg].as_ptr(), op.rest[leg].len());
        // SAFETY: the boxed remainder lives in the op until this leg's completion
        // is taken (it is replaced only by the next continuation, after that).
        let rest = unsafe { std::slice::from_raw_parts(ptr, len) };
        let tag = ((idx as u64) << LEG_BITS) | leg as u64;
        let queued = match ring_fd(&m, rest, off) {
            // SAFETY: as above; the guest memory is guaranteed by the submitter.
            Some(fd) if write => unsafe { self.ring.writev(fd, rest, off, tag) },
            // SAFETY: as above.
            Some(fd) => unsafe { self.ring.readv(fd, rest, off, tag) },
            None => {
                // Not aligned for the ring any more: the leg finishes it in place.
                let r = if write {
                    // SAFETY: as above.
                    m.leg.writev_at(&unsafe { as_slices(rest) }, off)
                } else {
                    // SAFETY: as above.
                    m.leg.readv_at(&mut unsafe { as_mut_slices(rest) }, off)
                };
                return Some(match r {
                    Ok(()) => LegOutcome::Done,
                    Err(e) if e.raw_os_error().is_some() => LegOutcome::Failed(e),
                    Err(_) => short(),
                });
            }
        };
        match queued.and_then(|()| self.ring.flush()) {
            Ok(()) => None,
            Err(e) => {
                log::warn!("leg {}: cannot continue a short transfer: {e}", m.name());
                Some(short())
            }
        }
    }
}

/// Slices over raw iovecs.
///
/// # Safety
/// Every iovec must describe valid memory for the returned lifetime.
unsafe fn as_mut_slices<'a>(iovs: &[libc::iovec]) -> Vec<IoSliceMut<'a>> {
    iovs.iter()
        .map(|v| {
            // SAFETY: guaranteed by the caller.
            IoSliceMut::new(unsafe {
                std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len)
            })
        })
        .collect()
}

/// # Safety
/// As for [`as_mut_slices`].
unsafe fn as_slices<'a>(iovs: &[libc::iovec]) -> Vec<IoSlice<'a>> {
    iovs.iter()
        .map(|v| {
            // SAFETY: guaranteed by the caller.
            IoSlice::new(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
        })
        .collect()
}

fn record_failures(
    array: &Array,
    failed: Vec<(Arc<Member>, io::Error)>,
    what: &str,
) -> Option<io::Error> {
    let mut last = None;
    for (m, e) in failed {
        array.fail(&m, &format!("{what}: {e}"));
        last = Some(e);
    }
    last
}

/// Whether a leg can take `iovs` at byte `off` through the ring.
fn ring_fd(m: &Member, iovs: &[libc::iovec], off: u64) -> Option<std::os::fd::RawFd> {
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
    Some(fd)
}

impl Array {
    /// Has a thread of its own record leg failures for the I/O workers, which
    /// then park requests waiting for a record instead of writing it (see
    /// `raid1::settle`). Cluster nodes need it: the record waits for the token.
    /// The thread ends once the array is dropped.
    pub fn settle_in_background(self: &Arc<Self>) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        let settler = self.settler().clone();
        if settler.running.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("settle".into())
            .spawn(move || loop {
                let requested = settler.wait_request(std::time::Duration::from_millis(500));
                let Some(array) = weak.upgrade() else {
                    return;
                };
                if !requested {
                    continue;
                }
                let seen = array.failures_seen();
                if let Err(e) = array.settle_failures() {
                    log::warn!("{e}");
                    settler.failed(seen, &e);
                }
                array.bitmap.wake_workers();
            });
        if let Err(e) = spawned {
            self.settler().running.store(false, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// Starts a read of `iovs` at `sector`; the result comes from [`AsyncIo::take_done`].
    ///
    /// # Safety
    /// The memory `iovs` describes must stay valid and unused by others until the
    /// request's completion has been taken.
    pub unsafe fn submit_read(
        &self,
        io: &mut AsyncIo,
        token: Token,
        sector: u64,
        iovs: Vec<libc::iovec>,
    ) {
        let checked = transfer_len(&iovs)
            .and_then(|bytes| self.check_range(sector, bytes as u64).map(|_| bytes));
        let bytes = match checked {
            Ok(b) => b,
            Err(e) => {
                io.done.push((token, Err(e)));
                return;
            }
        };
        let sectors = bytes as u64 / 512;
        let first = self.read_order(sector, sectors).into_iter().next();
        let async_leg = first
            .as_ref()
            .and_then(|m| ring_fd(m, &iovs, m.byte_offset(sector)).map(|fd| (m.clone(), fd)));
        let Some((member, fd)) = async_leg else {
            // SAFETY: guaranteed by the caller.
            let mut bufs = unsafe { as_mut_slices(&iovs) };
            let r = self.read_legs(sector, &mut bufs);
            io.settle(self, token, Rest::Read(r));
            return;
        };
        let off = member.byte_offset(sector);
        member
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let iovs = iovs.into_boxed_slice();
        let mut op = Op::new(
            token,
            Kind::Read {
                member: member.clone(),
                sector,
            },
            bytes,
            iovs,
            vec![member],
        );
        op.remaining = 1;
        let idx = io.insert(op);
        let op = io.ops[idx]
            .as_ref()
            .map(|o| (o.iovs.as_ptr(), o.iovs.len()));
        let Some((ptr, len)) = op else { return };
        // SAFETY: the iovecs live in the boxed slice owned by the op until completion;
        // the memory they describe is guaranteed by the caller.
        let r = unsafe {
            io.ring.readv(
                fd,
                std::slice::from_raw_parts(ptr, len),
                off,
                (idx as u64) << LEG_BITS,
            )
        };
        if let Err(e) = r {
            let c = Cqe {
                tag: (idx as u64) << LEG_BITS,
                result: -e.raw_os_error().unwrap_or(libc::EIO),
            };
            io.complete_one(self, c);
        }
    }

    /// Starts a write of `iovs` at `sector` to every non-faulty leg, after the
    /// bitmap bits covering it are durable.
    ///
    /// # Safety
    /// As for [`Array::submit_read`].
    pub unsafe fn submit_write(
        &self,
        io: &mut AsyncIo,
        token: Token,
        sector: u64,
        iovs: Vec<libc::iovec>,
    ) {
        // SAFETY: guaranteed by the caller.
        unsafe { self.start_write(io, token, sector, iovs, 1) }
    }

    /// Attempt `attempts` of [`Array::submit_write`].
    ///
    /// # Safety
    /// As for [`Array::submit_read`].
    unsafe fn start_write(
        &self,
        io: &mut AsyncIo,
        token: Token,
        sector: u64,
        iovs: Vec<libc::iovec>,
        attempts: usize,
    ) {
        let checked = transfer_len(&iovs).and_then(|bytes| {
            let sectors = self.check_range(sector, bytes as u64)?;
            // Fits: `bytes <= MAX_TRANSFER`.
            let full = i32::try_from(bytes).map_err(io::Error::other)?;
            Ok((bytes, sectors, full))
        });
        let (bytes, sectors, full) = match checked {
            Ok(c) => c,
            Err(e) => {
                io.done.push((token, Err(e)));
                return;
            }
        };
        if let Some(why) = self.fence_reason() {
            // A fenced node writes nothing. A write that waited for another node's
            // resync window ends here: with the lock manager gone, that window
            // may never be lifted (its node's death cannot be seen any more).
            io.done.push((
                token,
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("this node is fenced ({why}): nothing is written"),
                )),
            ));
            return;
        }
        match self.bitmap.try_start_write(sector, sectors, self) {
            Ok(true) => {}
            Ok(false) => {
                // The chunk is being resynced: retried when the resync of it ends.
                io.deferred.push((token, sector, iovs, attempts));
                return;
            }
            Err(e) => {
                io.done.push((token, Err(e)));
                return;
            }
        }
        let legs = self.writable();
        let idx = io.insert(Op::new(
            token,
            Kind::Write {
                sector,
                sectors,
                ok_in_sync: 0,
                failed: Vec::new(),
                incomplete: None,
                attempts,
            },
            bytes,
            iovs.into_boxed_slice(),
            legs.clone(),
        ));
        for (i, m) in legs.iter().enumerate() {
            let tag = ((idx as u64) << LEG_BITS) | i as u64;
            let off = m.byte_offset(sector);
            let Some(Some(op)) = io.ops.get(idx) else {
                return;
            };
            let (ptr, len) = (op.iovs.as_ptr(), op.iovs.len());
            // SAFETY: the boxed iovecs live until the op completes.
            let iovs = unsafe { std::slice::from_raw_parts(ptr, len) };
            let result = match ring_fd(m, iovs, off) {
                // SAFETY: as above; guest memory is guaranteed by the caller.
                Some(fd) => match unsafe { io.ring.writev(fd, iovs, off, tag) } {
                    Ok(()) => continue,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                },
                None if m.leg.slow_writes() => {
                    // SAFETY: as above: the op keeps the iovecs until this leg's
                    // completion is taken.
                    match unsafe { io.offloaded.write(m.leg.clone(), iovs, off, tag) } {
                        Ok(()) => {
                            io.offloaded_running += 1;
                            continue;
                        }
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                }
                None => {
                    // SAFETY: as above.
                    let bufs = unsafe { as_slices(iovs) };
                    match m.leg.writev_at(&bufs, off) {
                        Ok(()) => full,
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                }
            };
            io.complete_one(self, Cqe { tag, result });
        }
        self.release_extra(io, idx);
    }

    /// Starts a flush of every non-faulty leg.
    pub fn submit_flush(&self, io: &mut AsyncIo, token: Token) {
        let legs = self.writable();
        let idx = io.insert(Op::new(
            token,
            Kind::Flush {
                ok_in_sync: 0,
                failed: Vec::new(),
            },
            0,
            Box::new([]),
            legs.clone(),
        ));
        for (i, m) in legs.iter().enumerate() {
            let tag = ((idx as u64) << LEG_BITS) | i as u64;
            let result = match m.leg.raw_fd() {
                Some((fd, _)) => match io.ring.fdatasync(fd, tag) {
                    Ok(()) => continue,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                },
                None => match m.leg.flush() {
                    Ok(()) => 0,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                },
            };
            io.complete_one(self, Cqe { tag, result });
        }
        self.release_extra(io, idx);
    }

    /// Drops the "still starting" reference of op `idx`, finishing it if every leg
    /// already answered.
    fn release_extra(&self, io: &mut AsyncIo, idx: usize) {
        let finished = match io.ops.get_mut(idx) {
            Some(Some(op)) => {
                op.remaining -= 1;
                op.remaining == 0
            }
            _ => false,
        };
        if finished {
            if let Some(op) = io.ops[idx].take() {
                io.free.push(idx);
                io.finish(self, op, Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raid1::metadata::{create_array, NewArray};
    use crate::storage::{FileLeg, Leg, OpenMode};

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
        let iovs: Vec<libc::iovec> = data
            .chunks(20 << 10)
            .map(|c| libc::iovec {
                iov_base: c.as_ptr() as *mut libc::c_void,
                iov_len: c.len(),
            })
            .collect();
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
            iovs.into_boxed_slice(),
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
        let data = vec![0x5au8; 4096];
        let iovs = vec![libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        }];
        // SAFETY: `data` outlives the request, which ends below.
        unsafe { array.submit_write(&mut io, 1, 8, iovs) };
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
        let buf = vec![0u8; 4096];
        // Three 1 GiB iovecs over the same buffer: never dereferenced.
        let iovs = vec![
            libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: 1 << 30,
            };
            3
        ];
        // SAFETY: the request is refused before any iovec is used.
        unsafe { array.submit_write(&mut io, 1, 0, iovs.clone()) };
        // SAFETY: as above.
        unsafe { array.submit_read(&mut io, 2, 0, iovs) };
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
}
