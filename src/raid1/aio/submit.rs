//! Submission: a guest read, write or flush turned into operations on the legs'
//! rings (or the synchronous path where a ring cannot take them).

use super::*;
use crate::raid1::array::Array;
use crate::storage::uring::Cqe;
use std::io;

impl Array {
    /// Starts a read into `bufs` at `sector`; the result comes from
    /// [`AsyncIo::take_done`]. The request holds the buffers until then.
    pub fn submit_read(&self, io: &mut AsyncIo, token: Token, sector: u64, bufs: Buffers) {
        let checked = transfer_len(&bufs)
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
        let async_leg = first.as_ref().and_then(|m| {
            ring_fd(&io.ring, m, bufs.iovecs(), m.byte_offset(sector)).map(|fd| (m.clone(), fd))
        });
        let Some((member, fd)) = async_leg else {
            let r = self.read_legs(sector, &mut bufs.slices_mut());
            io.settle(self, token, Rest::Read(r));
            return;
        };
        let off = member.byte_offset(sector);
        member
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut op = Op::new(
            token,
            Kind::Read {
                member: member.clone(),
                sector,
            },
            bytes,
            bufs,
            vec![member],
        );
        op.remaining = 1;
        let idx = io.insert(op);
        let op = io.ops[idx]
            .as_ref()
            .map(|o| (o.bufs.iovecs().as_ptr(), o.bufs.iovecs().len()));
        let Some((ptr, len)) = op else { return };
        // SAFETY: the iovecs and the memory they describe live in the op's
        // `Buffers` until its completion is taken.
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

    /// Starts a write of `bufs` at `sector` to every non-faulty leg, after the
    /// bitmap bits covering it are durable; the result comes from
    /// [`AsyncIo::take_done`]. The request holds the buffers until then.
    pub fn submit_write(&self, io: &mut AsyncIo, token: Token, sector: u64, bufs: Buffers) {
        self.start_write(io, token, sector, bufs, 1)
    }

    /// Attempt `attempts` of [`Array::submit_write`].
    pub(super) fn start_write(
        &self,
        io: &mut AsyncIo,
        token: Token,
        sector: u64,
        bufs: Buffers,
        attempts: usize,
    ) {
        let checked = transfer_len(&bufs).and_then(|bytes| {
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
        match self.bitmap.begin_write(sector, sectors) {
            Intent::Durable => {}
            Intent::Blocked => {
                // The chunk is being resynced: retried when the resync of it ends.
                io.deferred.push((token, sector, bufs, attempts));
                return;
            }
            Intent::Flushing(ticket) if self.bitmap.flushes_in_background() => {
                // The worker goes on with other requests meanwhile; the flusher
                // wakes it (`AsyncIo::resume_awaiting`).
                self.bitmap.request_flush(ticket);
                io.awaiting.push(Awaiting {
                    token,
                    sector,
                    sectors,
                    bytes,
                    bufs,
                    attempts,
                    ticket,
                });
                return;
            }
            Intent::Flushing(ticket) => {
                if let Err(e) = self.bitmap.flush_for(ticket, self) {
                    self.bitmap.end_write(sector, sectors, true);
                    io.done.push((token, Err(e)));
                    return;
                }
            }
        }
        self.write_legs(io, token, sector, sectors, (bytes, full), bufs, attempts);
    }

    /// A write whose bits are on disk: fails it if the node was fenced meanwhile,
    /// else issues it to every non-faulty leg.
    pub(super) fn resume_write(&self, io: &mut AsyncIo, w: Awaiting) {
        if let Some(why) = self.fence_reason() {
            self.bitmap.end_write(w.sector, w.sectors, false);
            io.done.push((
                w.token,
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("this node is fenced ({why}): nothing is written"),
                )),
            ));
            return;
        }
        // `bytes` fits an i32: it was checked against `MAX_TRANSFER`.
        let full = i32::try_from(w.bytes).unwrap_or(i32::MAX);
        self.write_legs(
            io,
            w.token,
            w.sector,
            w.sectors,
            (w.bytes, full),
            w.bufs,
            w.attempts,
        );
    }

    /// Issues a counted write, its bits on disk, to every non-faulty leg.
    #[allow(clippy::too_many_arguments)]
    fn write_legs(
        &self,
        io: &mut AsyncIo,
        token: Token,
        sector: u64,
        sectors: u64,
        (bytes, full): (usize, i32),
        bufs: Buffers,
        attempts: usize,
    ) {
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
            bufs,
            legs.clone(),
        ));
        for (i, m) in legs.iter().enumerate() {
            let tag = ((idx as u64) << LEG_BITS) | i as u64;
            let off = m.byte_offset(sector);
            let Some(Some(op)) = io.ops.get(idx) else {
                return;
            };
            let (ptr, len) = (op.bufs.iovecs().as_ptr(), op.bufs.iovecs().len());
            // SAFETY: the iovecs and the memory they describe live in the op's
            // `Buffers` until the op completes (after every leg's completion).
            let iovs = unsafe { std::slice::from_raw_parts(ptr, len) };
            let result = match ring_fd(&io.ring, m, iovs, off) {
                // SAFETY: as above.
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
                    let bufs = unsafe { crate::raid1::bufs::slices(iovs) };
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
            Buffers::owned(Vec::new()),
            legs.clone(),
        ));
        for (i, m) in legs.iter().enumerate() {
            let tag = ((idx as u64) << LEG_BITS) | i as u64;
            let result = match m.leg.raw_fd().filter(|_| io.ring.is_async()) {
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
    pub(super) fn release_extra(&self, io: &mut AsyncIo, idx: usize) {
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
