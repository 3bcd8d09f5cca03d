//! Leg failures and superblock updates: recording a failure on disk before any
//! request it touched completes, and reading another node's update.

use super::*;

impl Array {
    /// Marks `m` faulty (no more I/O). The superblocks are updated by
    /// [`Array::settle_failures`], which every request runs before completing.
    ///
    /// Like md, the last in-sync leg is never failed: it stays in service (its
    /// data is the only copy, still readable where it is intact) and the request
    /// that failed on it fails (every caller fails a request that no in-sync leg
    /// completed).
    pub fn fail(&self, m: &Member, why: &dyn std::fmt::Display) {
        if self.is_fenced() {
            // The node may not write: the fence refused the I/O, not the leg.
            warn!("leg {}: {why} (not failed: this node is fenced)", m.name());
            return;
        }
        let guard = lock(&self.failing);
        if m.state() == LegState::Faulty {
            return;
        }
        let last = m.state() == LegState::InSync
            && self
                .in_sync()
                .iter()
                .all(|o| std::ptr::eq::<Member>(&**o, m));
        if last {
            drop(guard);
            error!(
                "leg {}: {why}; it is the last in-sync leg: kept in service, the request fails",
                m.name()
            );
            return;
        }
        m.set_state(LegState::Faulty);
        // Counted under the lock: a request that finds the leg faulty already
        // (above) also finds the failure counted, and waits for its record.
        self.failures_seen.fetch_add(1, Ordering::AcqRel);
        drop(guard);
        error!(
            "leg {}: {why}; marking it faulty, the array continues degraded",
            m.name()
        );
        self.update_bitmap_state();
    }

    /// Records failed legs in the superblocks of the survivors (events++). Returns an
    /// error only when no leg could record it.
    pub fn settle_failures(&self) -> io::Result<()> {
        // Not "is an update running": a request that saw a leg fail after another
        // request's update began must wait for an update that includes it, or it
        // could complete before the failure is on disk.
        let seen = self.failures_seen.load(Ordering::Acquire);
        let unrecorded = || self.failures_recorded.load(Ordering::Acquire) < seen;
        if !unrecorded() {
            return Ok(());
        }
        // Asked again once the update may begin: threads that saw the same
        // failures (a request, the operator's `fail`, the repair pass) queue for
        // the token together, and the first one's update records them for all.
        self.update_superblocks_if(unrecorded, |_| {})
    }

    /// Rewrites every non-faulty leg's superblock after `change`, with events + 1,
    /// and this node's bitmap superblock before them.
    pub fn update_superblocks(&self, change: impl FnOnce(&mut Superblock)) -> io::Result<()> {
        self.update_superblocks_if(|| true, change)
    }

    /// [`Array::update_superblocks`] if `needed` still holds once the update has
    /// the token and the superblock lock.
    fn update_superblocks_if(
        &self,
        needed: impl Fn() -> bool,
        change: impl FnOnce(&mut Superblock),
    ) -> io::Result<()> {
        let sync = lock(&self.metadata_sync).clone();
        let mut change = Some(change);
        let mut write = || {
            self.update_superblocks_local_if(&needed, |sb| {
                if let Some(c) = change.take() {
                    c(sb)
                }
            })
        };
        match sync {
            Some(sync) => sync.update(&mut write),
            None => write().map(|_| ()),
        }
    }

    /// The `dev_number` of the first leg with a role that is not faulty (what a
    /// METADATA_UPDATED names).
    pub fn first_good_dev(&self) -> Option<u32> {
        self.members()
            .iter()
            .flatten()
            .find(|m| m.state() != LegState::Faulty)
            .map(|m| m.dev_number)
    }

    /// Another node (in slot `from`, when known) rewrote the superblocks: re-reads
    /// them and applies what changed (legs it failed, legs it finished recovering,
    /// legs it put back to rebuild, the events counter).
    pub fn reload_superblocks(&self, from: Option<u32>) -> io::Result<()> {
        let mut meta = lock(&self.meta);
        let mut newest: Option<Superblock> = None;
        for m in self.members().iter().flatten() {
            if m.state() == LegState::Faulty {
                continue;
            }
            match crate::raid1::metadata::read_superblock(&*m.leg) {
                Ok(sb) if sb.set_uuid == self.uuid => {
                    if sb.feature_map & feature::RECOVERY_OFFSET == 0
                        && m.state() == LegState::Recovering
                        && sb
                            .dev_roles
                            .get(m.dev_number as usize)
                            .is_some_and(|&r| r < role::MAX)
                    {
                        m.set_state(LegState::InSync);
                        m.remote_recovery.store(false, Ordering::Release);
                        info!("leg {}: another node finished its recovery", m.name());
                    }
                    if newest.as_ref().is_none_or(|n| sb.events > n.events) {
                        newest = Some(sb);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!("leg {}: cannot re-read the superblock: {e}", m.name()),
            }
        }
        let Some(sb) = newest else {
            return Err(io::Error::other("no leg's superblock could be re-read"));
        };
        if sb.events <= meta.sb.events {
            // A leg may have been found in sync above: the resync thread looks.
            self.bitmap.resync_bell().ring();
            return Ok(());
        }
        let role_of = |m: &Member| {
            sb.dev_roles
                .get(m.dev_number as usize)
                .copied()
                .unwrap_or(role::SPARE)
        };
        for m in self.members().iter().flatten() {
            if role_of(m) == role::FAULTY && m.set_state(LegState::Faulty) != LegState::Faulty {
                warn!("leg {}: failed by another node", m.name());
                if !meta.faulty.contains(&m.dev_number) {
                    meta.faulty.push(m.dev_number);
                }
            }
        }
        // Legs another node took out of their slot or put back into one.
        let mut slots: Vec<Option<Arc<Member>>> = (*self.members()).clone();
        let mut detached = lock(&self.detached);
        for (i, cur) in slots.clone().iter().enumerate() {
            let Some(m) = cur else { continue };
            let r = role_of(m);
            if m.state() == LegState::Faulty && r >= role::MAX && r != role::FAULTY {
                info!("leg {}: removed from the array by another node", m.name());
                slots[i] = None;
                detached.push(m.clone());
            }
        }
        let mut back = Vec::new();
        for m in slots.iter().flatten().chain(detached.iter()) {
            if m.state() == LegState::Faulty && usize::from(role_of(m)) < slots.len() {
                back.push(m.clone());
            }
        }
        {
            let mut candidates = lock(&self.candidates);
            for m in candidates.iter() {
                if usize::from(role_of(m)) < slots.len() {
                    info!(
                        "leg {}: another node added it as device {}",
                        m.name(),
                        m.dev_number
                    );
                    back.push(m.clone());
                }
            }
            candidates
                .retain(|m| usize::from(role_of(m)) >= slots.len() && role_of(m) != role::FAULTY);
        }
        for m in back {
            let r = usize::from(role_of(&m));
            if slots[r].as_ref().is_some_and(|o| !Arc::ptr_eq(o, &m)) {
                warn!(
                    "leg {}: another node put it into mirror slot {r}, which holds a leg here",
                    m.name()
                );
                continue;
            }
            for s in slots.iter_mut() {
                if s.as_ref().is_some_and(|o| Arc::ptr_eq(o, &m)) {
                    *s = None;
                }
            }
            detached.retain(|o| !Arc::ptr_eq(o, &m));
            meta.faulty.retain(|&d| d != m.dev_number);
            let own = crate::raid1::metadata::read_superblock(&*m.leg).ok();
            // The rebuild may be over already (this update is read late): the
            // leg's own superblock, written by that update, says so.
            let rebuilt = own.as_ref().is_some_and(|o| {
                o.set_uuid == self.uuid
                    && o.events >= sb.events
                    && o.feature_map & feature::RECOVERY_OFFSET == 0
            });
            slots[r] = Some(m.clone());
            if rebuilt {
                m.remote_recovery.store(false, Ordering::Release);
                m.set_state(LegState::InSync);
                info!(
                    "leg {}: in mirror slot {r}, rebuilt by another node: in sync",
                    m.name()
                );
                continue;
            }
            m.remote_recovery.store(true, Ordering::Release);
            m.rebuilt_by
                .store(from.unwrap_or(NOBODY), Ordering::Release);
            if let Some(own) = &own {
                m.bitmap_guided.store(
                    own.feature_map & feature::RECOVERY_BITMAP != 0,
                    Ordering::Relaxed,
                );
            }
            m.set_state(LegState::Recovering);
            info!(
                "leg {}: in mirror slot {r}; another node rebuilds it, this node writes it meanwhile",
                m.name()
            );
        }
        drop(detached);
        self.members.store(Arc::new(slots));
        meta.sb = sb;
        drop(meta);
        self.update_bitmap_state();
        Ok(())
    }

    pub(in crate::raid1) fn update_superblocks_local(
        &self,
        change: impl FnOnce(&mut Superblock),
    ) -> io::Result<()> {
        self.update_superblocks_local_if(&|| true, change)
            .map(|_| ())
    }

    /// Writes the superblocks unless `needed` no longer holds under the superblock
    /// lock; whether it wrote them.
    fn update_superblocks_local_if(
        &self,
        needed: &dyn Fn() -> bool,
        change: impl FnOnce(&mut Superblock),
    ) -> io::Result<bool> {
        let mut meta = lock(&self.meta);
        if !needed() {
            return Ok(false);
        }
        let before = meta.sb.clone();
        change(&mut meta.sb);
        // The events of the last update some leg took, if any.
        let mut taken = None;
        loop {
            let seen = self.failures_seen.load(Ordering::Acquire);
            let members = self.members();
            meta.sb.events += 1;
            meta.sb.utime = now();
            let mut roles = meta.sb.dev_roles.clone();
            for &d in &meta.faulty {
                if let Some(r) = roles.get_mut(d as usize) {
                    *r = role::FAULTY;
                }
            }
            for (slot, m) in members.iter().enumerate() {
                let Some(m) = m else { continue };
                if let Some(r) = roles.get_mut(m.dev_number as usize) {
                    *r = if m.state() == LegState::Faulty {
                        role::FAULTY
                    } else {
                        slot as u16
                    };
                }
            }
            meta.sb.dev_roles = roles;
            let events = meta.sb.events;
            if let Err(e) = self.bitmap.set_events(events, self) {
                warn!("bitmap superblock update failed: {e}");
            }
            let mut written = 0;
            for m in members.iter().flatten() {
                if m.state() == LegState::Faulty {
                    continue;
                }
                let mut sb = meta.sb.clone();
                sb.dev_number = m.dev_number;
                sb.device_uuid = m.device_uuid;
                sb.data_offset = m.data_offset;
                sb.data_size = m.data_size;
                if m.state() == LegState::Recovering {
                    sb.feature_map |= feature::RECOVERY_OFFSET;
                    if m.bitmap_guided.load(Ordering::Relaxed) {
                        sb.feature_map |= feature::RECOVERY_BITMAP;
                    } else {
                        sb.feature_map &= !feature::RECOVERY_BITMAP;
                    }
                    sb.recovery_offset = 0;
                } else {
                    sb.feature_map &= !(feature::RECOVERY_OFFSET | feature::RECOVERY_BITMAP);
                    sb.recovery_offset = 0;
                }
                let r = m
                    .leg
                    .write_at(&sb.encode(), sb.super_offset * 512)
                    .and_then(|()| m.leg.flush());
                match r {
                    Ok(()) => written += 1,
                    Err(e) => self.fail(m, &format!("superblock write failed: {e}")),
                }
            }
            if written > 0 {
                taken = Some(events);
            }
            if self.failures_seen.load(Ordering::Acquire) == seen {
                if written == 0 {
                    // Our superblock counts from what the disk holds: counted ahead
                    // of it, this node would ignore the next updates of other nodes
                    // (`reload_superblocks` takes only newer ones); behind it (a
                    // write that failed after its first sectors landed all the
                    // same), its next update would give another superblock the
                    // same events.
                    match taken {
                        Some(e) => meta.sb.events = e,
                        None => meta.sb = before,
                    }
                    let on_disk = members
                        .iter()
                        .flatten()
                        .filter_map(|m| crate::raid1::metadata::read_superblock(&*m.leg).ok())
                        .filter(|sb| sb.set_uuid == self.uuid)
                        .map(|sb| sb.events)
                        .max();
                    if let Some(e) = on_disk.filter(|&e| e > meta.sb.events) {
                        meta.sb.events = e;
                    }
                    return Err(io::Error::other("no leg accepted the superblock update"));
                }
                for m in members.iter().flatten() {
                    if m.state() == LegState::Faulty && !meta.faulty.contains(&m.dev_number) {
                        meta.faulty.push(m.dev_number);
                    }
                }
                self.failures_recorded.fetch_max(seen, Ordering::AcqRel);
                return Ok(true);
            }
        }
    }

    /// Marks the array active (resync_offset 0) for serving.
    pub fn mark_active(&self) -> io::Result<()> {
        self.update_superblocks(|sb| sb.resync_offset = 0)
    }

    /// Marks the array clean when nothing needs a resync and no leg is missing.
    pub fn mark_clean_if_possible(&self) -> io::Result<bool> {
        let stats = self.bitmap.stats();
        let clean = stats.needed == 0 && !self.is_degraded();
        if clean {
            self.update_superblocks(|sb| sb.resync_offset = MAX_SECTOR)?;
        } else {
            self.update_superblocks(|_| {})?;
        }
        Ok(clean)
    }
}
