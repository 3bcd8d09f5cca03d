//! Other nodes' bitmaps merged into ours, resync of needed chunks and recovery
//! of legs being rebuilt.

use super::*;
use crate::bitmap::RESYNC_WINDOW;

impl Array {
    /// Merges node `slot`'s on-disk bitmap into ours (its dirty chunks become
    /// needed and dirty in our bitmap, which is flushed first); with `clear`, the
    /// slot's bits are then cleared on every leg (recovery of a departed node, whose
    /// slot lock we hold). The slot's bits are those of every in-sync leg together:
    /// a node that died while writing its bitmap left it updated on some legs only.
    /// Returns how many chunks were dirty there.
    pub fn merge_slot(&self, slot: u32, clear: bool) -> io::Result<u64> {
        let sb = self.superblock();
        let g = self.bitmap.geometry();
        let legs = self.in_sync();
        if legs.is_empty() {
            return Err(io::Error::other("no in-sync leg to read the bitmap from"));
        }
        // Every readable copy adds its bits. A leg whose copy cannot be read is
        // left out, as a read of guest data skips it: the node set a bit on every
        // in-sync leg before writing under it, so the other copies have it too.
        let mut theirs: Option<crate::raid1::metadata::SlotBitmap> = None;
        let mut unread = None;
        for m in &legs {
            match crate::raid1::metadata::read_slot(&*m.leg, &sb, g, slot) {
                Ok(b) => match theirs.as_mut() {
                    Some(t) => {
                        t.bits.merge(&b.bits);
                    }
                    None => theirs = Some(b),
                },
                Err(e) => {
                    warn!("leg {}: bitmap of node slot {slot}: {e}", m.name());
                    unread = Some(e);
                }
            }
        }
        let theirs = match (theirs, unread.as_ref()) {
            (Some(t), _) => t,
            (None, e) => {
                return Err(io::Error::other(format!(
                    "bitmap of node slot {slot}: {}",
                    e.map(|e| e.to_string()).unwrap_or_default()
                )))
            }
        };
        let dirty = theirs.bits.count_dirty();
        // A copy that was not read (unreadable, or on a leg being rebuilt) may still
        // hold bits, of a bitmap write the node did not finish: cleared too.
        let all_read = unread.is_none() && self.writable().len() == legs.len();
        if dirty == 0 && (!clear || all_read) {
            return Ok(0);
        }
        if dirty > 0 {
            self.bitmap.mark_needed(&theirs.bits);
            self.bitmap.flush(self)?;
        }
        if clear {
            let off = g
                .slot_offset(sb.super_offset, sb.bitmap_offset, slot)
                .ok_or_else(|| io::Error::other("bitmap slot outside the leg"))?;
            let mut data = vec![0u8; g.slot_len() as usize];
            let mut their_sb = theirs.sb.clone();
            their_sb.events_cleared = sb.events;
            data[..crate::md::bitmap::BITMAP_SB_LEN].copy_from_slice(&their_sb.encode());
            self.write_bitmap(off, &data)?;
        }
        self.settle_failures()?;
        Ok(dirty)
    }

    /// Marks every chunk dirty in any other node slot as needed here, without
    /// clearing them there (a bitmap-guided rebuild covers all nodes' writes).
    pub fn gather_other_slots(&self) -> io::Result<u64> {
        let own = self.own_slot;
        let mut n = 0;
        for s in (0..self.bitmap.superblock().slots()).filter(|&s| s != own) {
            n += self.merge_slot(s, false)?;
        }
        Ok(n)
    }

    /// As the only node of the array: takes over every other slot's dirty bits
    /// (they become ours to resync) and clears them. Returns the chunks taken over.
    pub fn merge_other_slots(&self) -> io::Result<u64> {
        let slots = self.bitmap.superblock().slots();
        let own = self.own_slot;
        let mut n = 0;
        for s in (0..slots).filter(|&s| s != own) {
            n += self.merge_slot(s, true)?;
        }
        Ok(n)
    }

    /// Copies chunk `c` from the first in-sync leg to every other non-faulty leg,
    /// one window of [`RESYNC_WINDOW`] sectors at a time (a guest write elsewhere
    /// in the chunk waits for one window's copy at most), at no more than the
    /// resync rate limit (array bytes per second, as md's `speed_limit_max`). The
    /// throttle sleeps between windows with writes going on and without the
    /// recovery lock (a leg joining meanwhile is not held up; the chunk is then
    /// copied again from its start, for the new leg). Returns the bytes copied.
    pub fn resync_chunk(&self, c: u64) -> io::Result<u64> {
        let g = self.bitmap.geometry();
        let start = g.chunk_start(c);
        let end = (start + g.chunk_sectors()).min(self.size);
        let mut joining = lock(&self.recovery);
        let t0 = std::time::Instant::now();
        let step = RESYNC_WINDOW.min(end.saturating_sub(start)).max(1);
        let mut buf = crate::storage::AlignedBuf::zeroed((step * 512) as usize);
        let mut copied = 0;
        let mut progress = 0;
        let mut done = start;
        let mut result = Ok(());
        self.bitmap.start_chunk_copy(c);
        while done < end {
            let hi = (done + step).min(end);
            self.bitmap.begin_resync_window(c, done, hi);
            let r = self.copy_range(done, hi, buf.as_mut_slice());
            self.bitmap.end_resync_window();
            match r {
                Ok(n) => copied += n,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            progress += (hi - done) * 512;
            done = hi;
            if self.resync_halted() {
                break;
            }
            if done < end && self.throttle_due(t0, progress).is_some() {
                let joins = *joining;
                drop(joining);
                self.throttle_resync(t0, progress);
                joining = lock(&self.recovery);
                if *joining != joins {
                    // A leg joined while the lock was free: it has none of the
                    // windows copied so far.
                    done = start;
                }
            }
        }
        self.bitmap
            .finish_chunk_copy(c, result.is_ok() && done >= end);
        drop(joining);
        let settled = self.settle_failures();
        result?;
        settled?;
        self.throttle_resync(t0, progress);
        Ok(copied)
    }

    /// How long the copy of `bytes` since `t0` is ahead of the resync rate limit.
    fn throttle_due(&self, t0: std::time::Instant, bytes: u64) -> Option<std::time::Duration> {
        let rate = self.counters.resync_max_rate.load(Ordering::Relaxed);
        if rate == 0 {
            return None;
        }
        let due = std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
        due.checked_sub(t0.elapsed()).filter(|w| !w.is_zero())
    }

    /// Sleeps until `bytes` copied since `t0` are within the resync rate limit, if
    /// one is set; in short naps, so that a stop does not wait for the throttle.
    fn throttle_resync(&self, t0: std::time::Instant, bytes: u64) {
        while let Some(wait) = self.throttle_due(t0, bytes) {
            if self.resync_halted() {
                break;
            }
            std::thread::sleep(wait.min(std::time::Duration::from_millis(100)));
        }
    }

    /// The process is stopping: resync and recovery passes end after the chunk
    /// they copy (the chunks not reached stay needed, and dirty in the bitmap).
    pub fn halt_resync(&self) {
        self.resync_halted.store(true, Ordering::SeqCst);
        self.bitmap.resync_bell().ring();
        self.bitmap.daemon_bell().ring();
        let mut halted = lock(&self.halt.0);
        *halted = true;
        self.halt.1.notify_all();
    }

    /// Waits up to `timeout` for [`Array::halt_resync`]; whether it was called.
    pub fn wait_halt(&self, timeout: std::time::Duration) -> bool {
        let halted = lock(&self.halt.0);
        let (halted, _) = self
            .halt
            .1
            .wait_timeout_while(halted, timeout, |h| !*h)
            .unwrap_or_else(|e| e.into_inner());
        *halted
    }

    /// Whether [`Array::halt_resync`] was called.
    pub fn resync_halted(&self) -> bool {
        self.resync_halted.load(Ordering::SeqCst)
    }

    /// Copies sectors `[start, end)` from the first in-sync leg to the other
    /// writable legs, through `buf` (a multiple of 512 bytes, aligned for direct
    /// I/O). Returns the bytes written to the other legs.
    fn copy_range(&self, start: u64, end: u64, buf: &mut [u8]) -> io::Result<u64> {
        let step = (buf.len() as u64 / 512).max(1);
        let mut pos = start;
        let mut copied = 0;
        while pos < end {
            let n = step.min(end - pos);
            let data = &mut buf[..(n * 512) as usize];
            let mut src = None;
            for m in self.in_sync() {
                match m.leg.read_at(data, m.byte_offset(pos)) {
                    Ok(()) => {
                        src = Some(m);
                        break;
                    }
                    Err(e) => self.fail(&m, &format!("read error during resync: {e}")),
                }
            }
            let Some(src) = src else {
                return Err(io::Error::other("no in-sync leg to resync from"));
            };
            let data = &buf[..(n * 512) as usize];
            for m in self.writable() {
                if Arc::ptr_eq(&m, &src) {
                    continue;
                }
                if let Err(e) = m.leg.write_at(data, m.byte_offset(pos)) {
                    self.fail(&m, &format!("write error during resync: {e}"));
                } else {
                    copied += n * 512;
                    self.counters
                        .resync_bytes
                        .fetch_add(n * 512, Ordering::Relaxed);
                }
            }
            pos += n;
        }
        Ok(copied)
    }

    /// After every needed chunk was copied: recovering legs become in sync.
    pub fn finish_recovery(&self) -> io::Result<()> {
        let guard = lock(&self.recovery);
        if self.bitmap.next_needed(0).is_some() {
            return Ok(());
        }
        let mut promoted = false;
        for m in self.members().iter().flatten() {
            if m.state() == LegState::Recovering
                && !m.remote_recovery.load(Ordering::Acquire)
                && !m.gathering.load(Ordering::Acquire)
            {
                m.state
                    .compare_exchange(
                        LegState::Recovering as u8,
                        LegState::InSync as u8,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .ok();
                info!("leg {}: recovery complete, in sync", m.name());
                promoted = true;
            }
        }
        drop(guard);
        if promoted {
            // Only a change rings the resync doorbell: a look that found the
            // recovery still running (another node's) must not wake its caller.
            self.update_bitmap_state();
            self.update_superblocks(|_| {})?;
        }
        Ok(())
    }

    /// Takes over the rebuild of legs another node was rebuilding (it may have
    /// died): they become ours to finish. Returns whether there were any.
    pub fn take_over_recoveries(&self, dead: u32) -> io::Result<bool> {
        let mut taken = Vec::new();
        let mut guided = true;
        for m in self.members().iter().flatten() {
            let by = m.rebuilt_by.load(Ordering::Acquire);
            // Only the dead node's rebuilds: a live node goes on with its own.
            if by != dead && by != NOBODY {
                continue;
            }
            if m.state() == LegState::Recovering && m.remote_recovery.swap(false, Ordering::AcqRel)
            {
                info!("leg {}: this node takes over its rebuild", m.name());
                taken.push(m.clone());
                guided &= m.bitmap_guided.load(Ordering::Relaxed);
            }
        }
        if !taken.is_empty() {
            if guided {
                if let Err(e) = self.gather_other_slots() {
                    // Not ours yet: taken over again when the recovery is retried.
                    for m in &taken {
                        m.remote_recovery.store(true, Ordering::Release);
                    }
                    return Err(e);
                }
            } else {
                self.bitmap.mark_all_needed();
            }
        }
        Ok(!taken.is_empty())
    }

    /// Whether any leg is recovering.
    pub fn recovering(&self) -> bool {
        self.members()
            .iter()
            .flatten()
            .any(|m| m.state() == LegState::Recovering)
    }
}
