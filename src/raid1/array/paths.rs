//! The synchronous I/O paths: read balancing and repair, writes, discard,
//! write-zeroes and flush over the in-sync and recovering legs.

use super::*;

impl Array {
    /// Picks the leg to read `sectors` at `sector` from: the first in-sync leg for
    /// chunks that still need a resync; else the leg whose last read ended here (a
    /// sequential stream stays on one device, as md's read balancing does); else the
    /// least busy in-sync leg.
    pub(in crate::raid1) fn read_order(&self, sector: u64, sectors: u64) -> Vec<Arc<Member>> {
        let mut legs = self.in_sync();
        if legs.len() > 1
            && !self.balancing_suspended.load(Ordering::Relaxed)
            && !self.bitmap.is_needed(sector, sectors)
        {
            match legs
                .iter()
                .position(|m| m.next_seq.load(Ordering::Relaxed) == sector)
            {
                Some(i) => legs.swap(0, i),
                None => {
                    let start = self.next_read.fetch_add(1, Ordering::Relaxed) % legs.len();
                    legs.rotate_left(start);
                    legs.sort_by_key(|m| m.inflight.load(Ordering::Relaxed));
                }
            }
        }
        if let Some(m) = legs.first() {
            m.next_seq.store(sector + sectors, Ordering::Relaxed);
        }
        legs
    }

    /// Reads guest data. A leg that fails is skipped; the range is queued to be
    /// rewritten on it from another leg ([`Array::run_repairs`]).
    pub fn read(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let result = self.read_legs(sector, bufs);
        // A leg failure (another request's) is recorded before the read completes.
        if !self.read_waits_for_record() {
            return result;
        }
        Self::read_settled(result, self.settle_failures())
    }

    /// Whether a read that finished waits for a failure record: a fenced node
    /// records nothing (that takes the lock manager it lost) and still serves reads.
    pub(crate) fn read_waits_for_record(&self) -> bool {
        !self.is_fenced() && self.failure_unrecorded()
    }

    /// A read's result once the record it waited for ended: when a failure cannot
    /// be recorded, data read from an in-sync leg is still good: the read goes on.
    pub(crate) fn read_settled(result: io::Result<()>, settled: io::Result<()>) -> io::Result<()> {
        match settled {
            Err(e) if result.is_ok() => {
                log::debug!("a leg failure is not recorded ({e}); the read completes");
                result
            }
            settled => settled.and(result),
        }
    }

    /// The legs' part of [`Array::read`], without waiting for failure records.
    pub(crate) fn read_legs(&self, sector: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let sectors = self.check_range(sector, bytes)?;
        let mut failed: Vec<(Arc<Member>, io::Error)> = Vec::new();
        let mut result = Err(io::Error::other("no in-sync leg to read from"));
        for m in self.read_order(sector, sectors) {
            m.inflight.fetch_add(1, Ordering::Relaxed);
            let r = m.leg.readv_at(bufs, m.byte_offset(sector));
            m.inflight.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(()) => {
                    result = Ok(());
                    break;
                }
                Err(e) => failed.push((m, e)),
            }
        }
        if result.is_ok() && !failed.is_empty() {
            self.counters.read_retries.fetch_add(1, Ordering::Relaxed);
            // Not rewritten here with the data just read: a guest write to the range
            // could land between that read and the rewrite, and the rewrite would
            // put the old data back on this leg only. The repair reads again and
            // writes while writes to the range wait, as md freezes the array.
            let mut q = lock(&self.repairs);
            for (m, e) in failed {
                warn!(
                    "leg {}: read error at sector {sector}: {e}; it is rewritten from another leg",
                    m.name()
                );
                q.push((m, sector, sectors));
            }
            drop(q);
            self.bitmap.resync_bell().ring();
        } else if let (Err(_), Some((_, e))) = (&result, failed.last()) {
            result = Err(io::Error::new(
                e.kind(),
                format!("read failed on every leg: {e}"),
            ));
        }
        result
    }

    /// Rewrites the ranges legs failed to read (see [`Array::read`]) from another
    /// in-sync leg, one bitmap chunk at a time while writes to that chunk wait
    /// (the resync exclusion); a leg whose rewrite fails is failed. Returns the
    /// ranges repaired. Run by the resync thread, never by an I/O worker (it waits
    /// for the writes in flight in the chunk).
    pub fn run_repairs(&self) -> usize {
        let todo = std::mem::take(&mut *lock(&self.repairs));
        let n = todo.len();
        for (m, sector, sectors) in todo {
            if m.state() == LegState::Faulty {
                continue;
            }
            let g = self.bitmap.geometry();
            for c in self.bitmap.chunk_range(sector, sectors) {
                let lo = sector.max(g.chunk_start(c));
                let hi = (sector + sectors).min(g.chunk_start(c) + g.chunk_sectors());
                if lo >= hi {
                    continue;
                }
                self.bitmap.begin_resync(c);
                let r = self.rewrite(&m, lo, hi);
                self.bitmap.end_resync(c, false);
                match r {
                    Ok(true) => info!("leg {}: sectors {lo}..{hi} rewritten", m.name()),
                    Ok(false) => {}
                    Err(e) => self.fail(&m, &format!("rewrite after a read error failed: {e}")),
                }
            }
        }
        if let Err(e) = self.settle_failures() {
            warn!("after read repairs: {e}");
        }
        n
    }

    /// Copies sectors `lo..hi` to `m` from another in-sync leg. `Ok(false)`: no
    /// other leg could give them.
    fn rewrite(&self, m: &Arc<Member>, lo: u64, hi: u64) -> io::Result<bool> {
        let mut buf = crate::storage::AlignedBuf::zeroed(((hi - lo) * 512) as usize);
        for src in self.in_sync() {
            if Arc::ptr_eq(&src, m) {
                continue;
            }
            if src
                .leg
                .read_at(buf.as_mut_slice(), src.byte_offset(lo))
                .is_ok()
            {
                m.leg.write_at(buf.as_slice(), m.byte_offset(lo))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Writes guest data to every non-faulty leg, after its bitmap bits are durable.
    /// Succeeds when at least one in-sync leg has it; legs that fail are failed and
    /// recorded before this returns.
    pub fn write(&self, sector: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let bytes: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let sectors = self.check_range(sector, bytes)?;
        self.mutate(sector, sectors, |m| {
            m.leg.writev_at(bufs, m.byte_offset(sector))
        })
    }

    /// Discards a range on every leg (bitmap-gated like a write).
    pub fn discard(&self, sector: u64, sectors: u64) -> io::Result<()> {
        self.check_range(sector, sectors * 512)?;
        self.mutate(sector, sectors, |m| {
            m.leg.discard(m.byte_offset(sector), sectors * 512)
        })
    }

    /// Zeroes a range on every leg (bitmap-gated like a write).
    pub fn write_zeroes(&self, sector: u64, sectors: u64) -> io::Result<()> {
        self.check_range(sector, sectors * 512)?;
        self.mutate(sector, sectors, |m| {
            m.leg.write_zeroes(m.byte_offset(sector), sectors * 512)
        })
    }

    fn mutate(
        &self,
        sector: u64,
        sectors: u64,
        op: impl Fn(&Member) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.bitmap.start_write(sector, sectors, self)?;
            let mut ok_in_sync = 0;
            let mut last_err = None;
            for m in self.writable() {
                m.inflight.fetch_add(1, Ordering::Relaxed);
                let r = op(&m);
                m.inflight.fetch_sub(1, Ordering::Relaxed);
                match r {
                    Ok(()) => {
                        if m.state() == LegState::InSync {
                            ok_in_sync += 1;
                        }
                    }
                    Err(e) => {
                        self.fail(&m, &format!("write error at sector {sector}: {e}"));
                        last_err = Some(e);
                    }
                }
            }
            if let (Some(e), Some(fenced)) = (&last_err, self.refused_by_fence()) {
                // No leg was failed: the write is on some legs only.
                self.bitmap.end_write(sector, sectors, true);
                return Err(io::Error::new(e.kind(), fenced));
            }
            let unrecorded = self.failure_unrecorded();
            if unrecorded {
                // Recording the failure may wait for the token, which a node
                // announcing a resync window over this write holds until our writes
                // there are over: the write is over on the legs (see `rewrite_after_failure`).
                // A leg that failed the write and was kept (the last in-sync one)
                // differs there from a leg being rebuilt that took it: the chunk stays
                // to be resynced.
                self.bitmap.end_write(sector, sectors, last_err.is_some());
                self.settle_failures()?;
            } else {
                let settled = self.settle_failures();
                self.bitmap.end_write(sector, sectors, last_err.is_some());
                settled?;
            }
            if ok_in_sync == 0 {
                return Err(last_err.unwrap_or_else(|| io::Error::other("no in-sync leg")));
            }
            if !(unrecorded && self.rewrite_after_failure(attempts)) {
                return Ok(());
            }
        }
    }

    /// Whether a write that finished on the legs while a failure was unrecorded is
    /// written again (`attempts` so far) before it completes. On a cluster node, yes:
    /// until the failure was recorded, another node resyncing the write's chunks
    /// took the failed leg for in sync and may have copied its old data over the
    /// write on the good legs; the second write, once the failure is on disk, puts
    /// it back (and waits, like any write, until that node's window moved on).
    /// Bounded: every pass follows a new failure, and legs are few.
    pub(crate) fn rewrite_after_failure(&self, attempts: usize) -> bool {
        self.is_cluster_node() && attempts <= self.members().len() + 1
    }

    /// Makes every completed write durable on every non-faulty leg.
    pub fn flush(&self) -> io::Result<()> {
        let mut ok_in_sync = 0;
        for m in self.writable() {
            match m.leg.flush() {
                Ok(()) => {
                    if m.state() == LegState::InSync {
                        ok_in_sync += 1;
                    }
                }
                Err(e) => {
                    self.fail(&m, &format!("flush failed: {e}"));
                    if let Some(fenced) = self.refused_by_fence() {
                        return Err(io::Error::new(e.kind(), fenced));
                    }
                }
            }
        }
        self.settle_failures()?;
        if ok_in_sync == 0 {
            return Err(io::Error::other("no in-sync leg could flush"));
        }
        Ok(())
    }

    /// One pass of the bitmap daemon.
    pub fn bitmap_daemon_pass(&self) -> io::Result<u64> {
        let r = self.bitmap.daemon_pass(self.events(), self);
        self.settle_failures()?;
        r
    }
}
