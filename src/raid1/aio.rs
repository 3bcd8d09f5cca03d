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
    },
    Flush {
        ok_in_sync: usize,
        failed: Vec<(Arc<Member>, io::Error)>,
    },
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
    /// Writes waiting for a chunk's resync to end.
    deferred: Vec<(Token, u64, Vec<libc::iovec>)>,
    /// Leg writes running on threads of their own (slow legs), and their results.
    offloaded: Arc<Offloaded>,
    offloaded_running: usize,
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
            offloaded,
            offloaded_running: 0,
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

    /// Requests in flight (including deferred writes).
    pub fn in_flight(&self) -> usize {
        self.ops.len() - self.free.len() + self.deferred.len()
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
    }

    /// Resubmits writes that waited for a resync.
    pub fn retry_deferred(&mut self, array: &Array) {
        for (token, sector, iovs) in std::mem::take(&mut self.deferred) {
            // SAFETY: the submitter of the deferred write guaranteed its buffers.
            unsafe { array.submit_write(self, token, sector, iovs) };
        }
        let _ = self.ring.flush();
    }

    /// Waits for and processes completions until nothing is in flight.
    pub fn drain(&mut self, array: &Array) -> io::Result<()> {
        while self.in_flight() > 0 {
            // Offloaded writes do not complete through the kernel: poll for them.
            if self.ops.len() > self.free.len() && self.offloaded_running == 0 {
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
        let Some(Some(op)) = self.ops.get_mut(idx) else {
            log::error!("completion for an unknown request {:#x}", c.tag);
            return;
        };
        let member = op.legs[leg].clone();
        let expected = if matches!(op.kind, Kind::Flush { .. }) {
            0
        } else {
            op.bytes
        };
        let result = if c.result < 0 {
            Err(io::Error::from_raw_os_error(-c.result))
        } else if c.result as usize != expected {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short transfer: {} of {expected} bytes", c.result),
            ))
        } else {
            Ok(())
        };
        let result = match &mut op.kind {
            Kind::Read { member, .. } => {
                member
                    .inflight
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                result
            }
            Kind::Write {
                ok_in_sync, failed, ..
            }
            | Kind::Flush { ok_in_sync, failed } => {
                match result {
                    Ok(()) => {
                        if member.state() == LegState::InSync {
                            *ok_in_sync += 1;
                        }
                    }
                    Err(e) => failed.push((member, e)),
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
        let outcome = finish(array, op.kind, &op.iovs, result);
        self.done.push((op.token, outcome));
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

/// The end of a request once every leg answered.
fn finish(array: &Array, kind: Kind, iovs: &[libc::iovec], last: io::Result<()>) -> io::Result<()> {
    match kind {
        Kind::Read { member, sector } => match last {
            Ok(()) => Ok(()),
            Err(e) => {
                // Retry synchronously over every in-sync leg; the failed leg gets the
                // good data written back, or is failed.
                log::warn!(
                    "leg {}: read error at sector {sector}: {e}; retrying",
                    member.name()
                );
                // SAFETY: the submitter keeps the buffers valid until completion.
                let mut bufs = unsafe { as_mut_slices(iovs) };
                array.read(sector, &mut bufs)
            }
        },
        Kind::Write {
            sector,
            sectors,
            ok_in_sync,
            failed,
        } => {
            let last_err = record_failures(array, failed, "write error");
            let settled = array.settle_failures();
            array.bitmap.end_write(sector, sectors, false);
            settled?;
            if ok_in_sync == 0 {
                return Err(
                    last_err.unwrap_or_else(|| io::Error::other("no in-sync leg took the write"))
                );
            }
            Ok(())
        }
        Kind::Flush { ok_in_sync, failed } => {
            let last_err = record_failures(array, failed, "flush failed");
            array.settle_failures()?;
            if ok_in_sync == 0 {
                return Err(
                    last_err.unwrap_or_else(|| io::Error::other("no in-sync leg could flush"))
                );
            }
            Ok(())
        }
    }
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
        let bytes: usize = iovs.iter().map(|v| v.iov_len).sum();
        if let Err(e) = self.check_range(sector, bytes as u64) {
            io.done.push((token, Err(e)));
            return;
        }
        let sectors = bytes as u64 / 512;
        let first = self.read_order(sector, sectors).into_iter().next();
        let async_leg = first
            .as_ref()
            .and_then(|m| ring_fd(m, &iovs, m.byte_offset(sector)).map(|fd| (m.clone(), fd)));
        let Some((member, fd)) = async_leg else {
            // SAFETY: guaranteed by the caller.
            let mut bufs = unsafe { as_mut_slices(&iovs) };
            let r = self.read(sector, &mut bufs);
            io.done.push((token, r));
            return;
        };
        let off = member.byte_offset(sector);
        member
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let iovs = iovs.into_boxed_slice();
        let idx = io.insert(Op {
            token,
            kind: Kind::Read {
                member: member.clone(),
                sector,
            },
            remaining: 1,
            bytes,
            iovs,
            legs: vec![member],
        });
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
        let bytes: usize = iovs.iter().map(|v| v.iov_len).sum();
        let sectors = match self.check_range(sector, bytes as u64) {
            Ok(s) => s,
            Err(e) => {
                io.done.push((token, Err(e)));
                return;
            }
        };
        match self.bitmap.try_start_write(sector, sectors, self) {
            Ok(true) => {}
            Ok(false) => {
                // The chunk is being resynced: retried when the resync of it ends.
                io.deferred.push((token, sector, iovs));
                return;
            }
            Err(e) => {
                io.done.push((token, Err(e)));
                return;
            }
        }
        let legs = self.writable();
        let n = legs.len();
        let idx = io.insert(Op {
            token,
            kind: Kind::Write {
                sector,
                sectors,
                ok_in_sync: 0,
                failed: Vec::new(),
            },
            remaining: n + 1, // +1 until every leg was started
            bytes,
            iovs: iovs.into_boxed_slice(),
            legs: legs.clone(),
        });
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
                        Ok(()) => bytes as i32,
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
        let n = legs.len();
        let idx = io.insert(Op {
            token,
            kind: Kind::Flush {
                ok_in_sync: 0,
                failed: Vec::new(),
            },
            remaining: n + 1,
            bytes: 0,
            iovs: Box::new([]),
            legs: legs.clone(),
        });
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
                let outcome = finish(self, op.kind, &op.iovs, Ok(()));
                io.done.push((op.token, outcome));
            }
        }
    }
}
