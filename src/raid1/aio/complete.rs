//! Completions: each leg's answer accounted, short transfers continued, leg failures
//! recorded (or parked for the settler), and the request reported once.

use super::*;
use crate::raid1::array::{Array, LegState, Member};
use crate::storage::uring::Cqe;
use std::io;
use std::sync::Arc;

impl AsyncIo {
    pub(super) fn complete_one(&mut self, array: &Array, c: Cqe) {
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
    pub(super) fn finish(&mut self, array: &Array, op: Op, last: io::Result<()>) {
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
                    Rest::Read(array.read_legs(sector, &mut op.bufs.slices_mut()))
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
                    bufs: op.bufs,
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
    pub(super) fn settle(&mut self, array: &Array, token: Token, rest: Rest) {
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
    pub(super) fn resume_parked(&mut self, array: &Array) {
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

    pub(super) fn complete(
        &mut self,
        array: &Array,
        token: Token,
        rest: Rest,
        settled: io::Result<()>,
    ) {
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
                bufs,
            } => {
                match (settled, incomplete) {
                    (Err(e), _) | (Ok(()), Some(e)) => Err(e),
                    (Ok(()), None) if ok_in_sync == 0 => Err(last_err
                        .unwrap_or_else(|| io::Error::other("no in-sync leg took the write"))),
                    (Ok(()), None) if rewrite => {
                        array.start_write(self, token, sector, bufs, attempts + 1);
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
    pub(super) fn progress(&mut self, idx: usize, leg: usize, n: usize) -> Option<LegOutcome> {
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
        op.rest[leg] = remainder(op.bufs.iovecs(), done);
        let (ptr, len) = (op.rest[leg].as_ptr(), op.rest[leg].len());
        // SAFETY: the boxed remainder lives in the op until this leg's completion
        // is taken (it is replaced only by the next continuation, after that), and
        // points into the op's `Buffers`.
        let rest = unsafe { std::slice::from_raw_parts(ptr, len) };
        let tag = ((idx as u64) << LEG_BITS) | leg as u64;
        let queued = match ring_fd(&self.ring, &m, rest, off) {
            // SAFETY: as above.
            Some(fd) if write => unsafe { self.ring.writev(fd, rest, off, tag) },
            // SAFETY: as above.
            Some(fd) => unsafe { self.ring.readv(fd, rest, off, tag) },
            None => {
                // Not aligned for the ring any more: the leg finishes it in place.
                let r = if write {
                    // SAFETY: as above.
                    m.leg
                        .writev_at(&unsafe { crate::raid1::bufs::slices(rest) }, off)
                } else {
                    // SAFETY: as above; only this leg's read uses the buffers.
                    m.leg
                        .readv_at(&mut unsafe { crate::raid1::bufs::slices_mut(rest) }, off)
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

pub(super) fn record_failures(
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
