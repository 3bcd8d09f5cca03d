//! Assembly: which legs form the mirror, in which state, from their superblocks
//! and bitmaps (like `mdadm --assemble`).

use super::*;

impl Array {
    /// Assembles a mirror from `legs` (in any order), like `mdadm --assemble`:
    /// refuses legs of another array, leaves out stale and faulty legs, and marks
    /// every chunk dirty in any bitmap slot as needing a resync.
    pub fn assemble(legs: Vec<Arc<dyn Leg>>) -> Result<(Array, AssembleReport), AssembleError> {
        Self::assemble_as(legs, 0)
    }

    /// As [`Array::assemble`], writing this node's bitmap in node slot `own_slot`.
    pub fn assemble_as(
        legs: Vec<Arc<dyn Leg>>,
        own_slot: u32,
    ) -> Result<(Array, AssembleReport), AssembleError> {
        let mut loaded = Vec::new();
        for leg in legs {
            let meta = LegMetadata::load(&*leg).map_err(|source| AssembleError::Leg {
                leg: leg.name().to_string(),
                source,
            })?;
            if let Err(source) = meta.sb.check_raid1() {
                return Err(AssembleError::Leg {
                    leg: leg.name().to_string(),
                    source: source.into(),
                });
            }
            loaded.push((leg, meta));
        }
        let Some((first_leg, first)) = loaded.first() else {
            return Err(AssembleError::NoInSyncLeg("no legs given".into()));
        };
        let uuid = first.sb.set_uuid;
        for (leg, m) in &loaded {
            if m.sb.set_uuid != uuid {
                return Err(AssembleError::OtherArray {
                    leg: leg.name().to_string(),
                    found: m.sb.set_uuid,
                    expected: uuid,
                    first: first_leg.name().to_string(),
                });
            }
        }
        for (i, (a, ma)) in loaded.iter().enumerate() {
            for (b, mb) in &loaded[..i] {
                if ma.sb.dev_number == mb.sb.dev_number {
                    return Err(AssembleError::Duplicate {
                        a: b.name().to_string(),
                        b: a.name().to_string(),
                        dev: ma.sb.dev_number,
                    });
                }
            }
        }
        // The freshest superblock decides the roles.
        let newest = loaded
            .iter()
            .max_by_key(|(_, m)| m.sb.events)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| AssembleError::NoInSyncLeg("no legs".into()))?;
        let sb = newest.sb.clone();
        let mut report = AssembleReport::default();
        let mut slots: Vec<Option<Arc<Member>>> = vec![None; sb.raid_disks as usize];
        let mut faulty = Vec::new();
        for (leg, m) in &loaded {
            let name = leg.name().to_string();
            let r = sb
                .dev_roles
                .get(m.sb.dev_number as usize)
                .copied()
                .unwrap_or(role::SPARE);
            let recovering = m.sb.feature_map & feature::RECOVERY_OFFSET != 0
                && m.sb.recovery_offset != MAX_SECTOR;
            let member = |state: LegState| {
                Arc::new(Member {
                    leg: leg.clone(),
                    dev_number: m.sb.dev_number,
                    device_uuid: m.sb.device_uuid,
                    data_offset: m.sb.data_offset,
                    data_size: m.sb.data_size,
                    state: AtomicU8::new(state as u8),
                    inflight: AtomicU64::new(0),
                    next_seq: AtomicU64::new(u64::MAX),
                    joined_events: m.sb.events,
                    remote_recovery: AtomicBool::new(false),
                    rebuilt_by: std::sync::atomic::AtomicU32::new(NOBODY),
                    bitmap_guided: AtomicBool::new(
                        m.sb.feature_map & feature::RECOVERY_BITMAP != 0,
                    ),
                    gathering: AtomicBool::new(false),
                })
            };
            let why = if r == role::FAULTY {
                Some(format!(
                    "marked faulty in the array's superblock (events {}); re-add it to resync",
                    sb.events
                ))
            } else if u32::from(r) >= sb.raid_disks {
                Some("has no role in the array (spare); add it to use it".to_string())
            } else if m.sb.events + 1 < sb.events {
                Some(format!(
                    "events {} is behind {} (stale); re-add it to resync",
                    m.sb.events, sb.events
                ))
            } else if slots[r as usize].is_some() {
                Some(format!("role {r} is already taken by another leg"))
            } else {
                None
            };
            match why {
                Some(why) => {
                    report.left_out.push(format!("leg {name}: {why}"));
                    if r != role::SPARE && !faulty.contains(&m.sb.dev_number) {
                        faulty.push(m.sb.dev_number);
                    }
                    report.left_out_legs.push(member(LegState::Faulty));
                }
                None => {
                    let state = if recovering {
                        LegState::Recovering
                    } else {
                        LegState::InSync
                    };
                    slots[r as usize] = Some(member(state));
                }
            }
        }
        if !slots
            .iter()
            .flatten()
            .any(|m| m.state() == LegState::InSync)
        {
            return Err(AssembleError::NoInSyncLeg(report.left_out.join("; ")));
        }
        // This node's bitmap is slot 0; with one node, every other slot is free:
        // its dirty bits are merged into ours and resynced.
        let Some(own) = newest.bitmaps.get(own_slot as usize) else {
            return Err(AssembleError::NoInSyncLeg(format!(
                "node slot {own_slot} does not exist: the array has {} bitmap slots",
                newest.bitmaps.len()
            )));
        };
        let slot_offset = newest.bitmaps[0]
            .sb
            .geometry()
            .slot_offset(sb.super_offset, sb.bitmap_offset, own_slot)
            .unwrap_or(8192);
        // Our slot's bits on every leg in service together, as for another node's
        // slot (`merge_slot`): our previous run may have stopped while a bitmap
        // write had reached some legs only, and the writes under those bits may
        // have reached some legs too.
        let mut bits = own.bits.clone();
        for (leg, m) in &loaded {
            let in_slot = slots.iter().flatten().any(|s| Arc::ptr_eq(&s.leg, leg));
            if let Some(b) = m.bitmaps.get(own_slot as usize).filter(|_| in_slot) {
                if b.bits.chunks() == bits.chunks() {
                    bits.merge(&b.bits);
                }
            }
        }
        let bitmap = WriteIntent::new(own.sb.clone(), bits, slot_offset);
        if own.sb.state & crate::md::bitmap::state::STALE != 0 {
            warn!("bitmap is marked stale: the whole array will be resynced");
            bitmap.mark_all_needed();
        }
        let clustered = own.sb.is_clustered();
        let array = Array {
            uuid,
            size: sb.size,
            clustered,
            own_slot,
            members: ArcSwap::from_pointee(slots),
            meta: Mutex::new(Meta { sb, faulty }),
            bitmap,
            failures_seen: AtomicU64::new(0),
            failures_recorded: AtomicU64::new(0),
            settler: Arc::default(),
            failing: Mutex::new(()),
            next_read: AtomicUsize::new(0),
            balancing_suspended: AtomicBool::new(false),
            detached: Mutex::new(Vec::new()),
            recovery: Mutex::new(0),
            manage: Mutex::new(()),
            resync_halted: AtomicBool::new(false),
            halt: Default::default(),
            metadata_sync: Mutex::new(None),
            candidates: Mutex::new(Vec::new()),
            repairs: Mutex::new(Vec::new()),
            counters: Counters::default(),
            fence: std::sync::OnceLock::new(),
        };
        // A leg being rebuilt (by this node before a crash, or by another node) is
        // rebuilt here too: a bitmap-guided rebuild from the bits (this node's are
        // kept until copied; a cluster node gathers the others'), a full one whole.
        if array
            .members()
            .iter()
            .flatten()
            .any(|m| m.state() == LegState::Recovering && !m.bitmap_guided.load(Ordering::Relaxed))
        {
            info!("a leg was being rebuilt completely: its recovery starts again");
            array.bitmap.mark_all_needed();
        }
        array.update_bitmap_state();
        report.needed_chunks = array.bitmap.stats().needed;
        for l in &report.left_out {
            warn!("{l}");
        }
        Ok((array, report))
    }
}
