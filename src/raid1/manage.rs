//! Operator changes to a running mirror: fail, remove, re-add and add legs.

use super::array::{lock, Array, LegState, Member};
use super::metadata::read_superblock;
use crate::md::superblock::{feature, role, MAX_DEVS};
use crate::md::Uuid;
use crate::storage::{read_vec, Leg};
use log::info;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::Arc;

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// No leg of that name.
    #[error("no leg named {0} in this array")]
    UnknownLeg(String),
    /// The change needs a faulty leg.
    #[error("leg {0} is not faulty; fail it first")]
    NotFaulty(String),
    /// Already failed.
    #[error("leg {0} is already faulty")]
    AlreadyFaulty(String),
    /// The leg is in use in a slot.
    #[error("leg {0} is already part of the array")]
    InUse(String),
    /// Every mirror slot has a leg.
    #[error("no free mirror slot: remove a faulty leg first")]
    NoFreeSlot,
    /// Failing the last in-sync leg would lose the data.
    #[error("leg {0} is the last in-sync leg; failing it would stop the array")]
    LastLeg(String),
    /// The leg cannot join.
    #[error("{}{why}", if leg.is_empty() { String::new() } else { format!("leg {leg}: ") })]
    Unsuitable {
        /// The leg.
        leg: String,
        /// Why.
        why: String,
    },
    /// I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Whether a re-add copies only the bitmap's dirty chunks or everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryKind {
    /// Only chunks dirty in the bitmap.
    Bitmap,
    /// The whole array.
    Full,
}

impl Array {
    fn find_in_slots(&self, name: &str) -> Option<(usize, Arc<Member>)> {
        self.members().iter().enumerate().find_map(|(i, m)| {
            m.as_ref()
                .filter(|m| m.name() == name)
                .map(|m| (i, m.clone()))
        })
    }

    fn set_slot(&self, slot: usize, m: Option<Arc<Member>>) {
        self.members.rcu(|cur| {
            let mut v: Vec<Option<Arc<Member>>> = (**cur).clone();
            v[slot] = m.clone();
            v
        });
    }

    /// Fails a leg on operator request (like `mdadm --fail`).
    pub fn fail_leg(&self, name: &str) -> Result<(), ManageError> {
        let _one_at_a_time = lock(&self.manage);
        let (_, m) = self
            .find_in_slots(name)
            .ok_or_else(|| ManageError::UnknownLeg(name.into()))?;
        if m.state() == LegState::Faulty {
            return Err(ManageError::AlreadyFaulty(name.into()));
        }
        if m.state() == LegState::InSync && self.in_sync_count() <= 1 {
            return Err(ManageError::LastLeg(name.into()));
        }
        self.fail(&m, &"failed by the operator");
        self.settle_failures()?;
        Ok(())
    }

    /// Takes a faulty leg out of its slot (like `mdadm --remove`).
    pub fn remove_leg(&self, name: &str) -> Result<(), ManageError> {
        let _one_at_a_time = lock(&self.manage);
        let (slot, m) = self
            .find_in_slots(name)
            .ok_or_else(|| ManageError::UnknownLeg(name.into()))?;
        if m.state() != LegState::Faulty {
            return Err(ManageError::NotFaulty(name.into()));
        }
        let sync = lock(&self.metadata_sync).clone();
        if let Some(sync) = sync {
            sync.removing(m.dev_number)?;
        }
        self.set_slot(slot, None);
        let dev = m.dev_number;
        lock(&self.detached).push(m);
        {
            let mut meta = lock(&self.meta);
            meta.faulty.retain(|&d| d != dev);
        }
        self.update_superblocks(|sb| {
            if let Some(r) = sb.dev_roles.get_mut(dev as usize) {
                *r = role::SPARE;
            }
        })?;
        info!("leg {name}: removed from the array");
        Ok(())
    }

    /// Puts a leg that was part of the array back (like `mdadm --re-add`): only the
    /// chunks dirty in the bitmap are copied when the leg is recent enough.
    ///
    /// On a cluster node the others are told first (RE_ADD), then the superblocks
    /// give the leg its role back (METADATA_UPDATED: from then on every node writes
    /// it), and only then are the other slots' dirty bits gathered: every chunk a
    /// node wrote while the leg was out is in its bitmap by then, and this node
    /// rebuilds them all (spec §5.8).
    pub fn re_add_leg(&self, name: &str) -> Result<RecoveryKind, ManageError> {
        let _one_at_a_time = lock(&self.manage);
        let (slot, member) = match self.find_in_slots(name) {
            Some((slot, m)) => {
                if m.state() != LegState::Faulty {
                    return Err(ManageError::InUse(name.into()));
                }
                (slot, m)
            }
            None => {
                let m = self
                    .detached()
                    .into_iter()
                    .find(|m| m.name() == name)
                    .ok_or_else(|| ManageError::UnknownLeg(name.into()))?;
                let slot = self
                    .members()
                    .iter()
                    .position(|s| s.is_none())
                    .ok_or(ManageError::NoFreeSlot)?;
                (slot, m)
            }
        };
        let sb = read_superblock(&*member.leg).map_err(|e| ManageError::Unsuitable {
            leg: name.into(),
            why: e.to_string(),
        })?;
        if sb.set_uuid != self.uuid {
            return Err(ManageError::Unsuitable {
                leg: name.into(),
                why: format!("belongs to array {}, not {}", sb.set_uuid, self.uuid),
            });
        }
        let cleared = self.bitmap.superblock().events_cleared;
        let kind = if sb.events >= cleared {
            RecoveryKind::Bitmap
        } else {
            RecoveryKind::Full
        };
        let sync = lock(&self.metadata_sync).clone();
        if let Some(sync) = &sync {
            sync.re_adding(member.dev_number)?;
        }
        self.copy_bitmaps_to(&member)?;
        {
            let mut joining = lock(&self.recovery);
            *joining += 1;
            member.set_state(LegState::Recovering);
            member.bitmap_guided.store(
                kind == RecoveryKind::Bitmap,
                std::sync::atomic::Ordering::Relaxed,
            );
            member
                .remote_recovery
                .store(false, std::sync::atomic::Ordering::Relaxed);
            // Until the other nodes' chunks are marked below, the chunks needed so
            // far are not all the leg lacks: it must not be declared in sync (it
            // would then be read, and copied from, where it is stale). Left set if
            // the re-add fails: the leg stays recovering until it is re-added again.
            member.gathering.store(
                sync.is_some() && kind == RecoveryKind::Bitmap,
                std::sync::atomic::Ordering::Release,
            );
            self.set_slot(slot, Some(member.clone()));
            lock(&self.detached).retain(|m| !Arc::ptr_eq(m, &member));
            lock(&self.meta).faulty.retain(|&d| d != member.dev_number);
            match kind {
                RecoveryKind::Bitmap => {
                    let dirty = self.bitmap.dirty_bits();
                    self.bitmap.mark_needed(&dirty);
                }
                RecoveryKind::Full => self.bitmap.mark_all_needed(),
            }
            self.update_bitmap_state();
        }
        self.update_superblocks(|_| {})?;
        if sync.is_some() && kind == RecoveryKind::Bitmap {
            let n = self.gather_other_slots()?;
            if n > 0 {
                info!("leg {name}: the other nodes wrote {n} chunks while it was out");
            }
            member
                .gathering
                .store(false, std::sync::atomic::Ordering::Release);
        }
        info!(
            "leg {name}: re-added to slot {slot}; {} recovery of {} chunks",
            if kind == RecoveryKind::Bitmap {
                "bitmap-guided"
            } else {
                "full"
            },
            self.bitmap.stats().needed
        );
        Ok(kind)
    }

    /// Gives a leg coming back every node slot's bitmap as the in-sync legs have
    /// it: bits set or cleared while it was out would otherwise stay stale there.
    fn copy_bitmaps_to(&self, member: &Member) -> Result<(), ManageError> {
        let source = self
            .in_sync()
            .into_iter()
            .next()
            .ok_or_else(|| ManageError::Unsuitable {
                leg: member.name().into(),
                why: "no in-sync leg to copy the bitmaps from".into(),
            })?;
        let sb = self.superblock();
        let g = self.bitmap.geometry();
        for slot in 0..self.bitmap.superblock().slots() {
            let Some(off) = g.slot_offset(sb.super_offset, sb.bitmap_offset, slot) else {
                continue;
            };
            let area = read_vec(&*source.leg, off, g.slot_len() as usize)?;
            member.leg.write_at(&area, off)?;
        }
        member.leg.flush()?;
        Ok(())
    }

    /// Adds a blank leg into a free slot and rebuilds it completely (like `mdadm --add`).
    ///
    /// On a cluster node the leg first gets a spare's superblock, then every other
    /// node must find it by its device uuid (NEWDISK, `no-new-dev`): only then do
    /// the superblocks give it its slot, and every node writes it from there on.
    pub fn add_leg(&self, leg: Arc<dyn Leg>) -> Result<usize, ManageError> {
        let _one_at_a_time = lock(&self.manage);
        let name = leg.name().to_string();
        if self.find_in_slots(&name).is_some() {
            return Err(ManageError::InUse(name));
        }
        let slot = self
            .members()
            .iter()
            .position(|s| s.is_none())
            .ok_or(ManageError::NoFreeSlot)?;
        let source = self
            .in_sync()
            .into_iter()
            .next()
            .ok_or_else(|| ManageError::Unsuitable {
                leg: name.clone(),
                why: "no in-sync leg to copy from".into(),
            })?;
        let sb = self.superblock();
        let data_offset = source.data_offset;
        let sectors = leg.size() / 512;
        if sectors < data_offset + self.size {
            return Err(ManageError::Unsuitable {
                leg: name,
                why: format!(
                    "{sectors} sectors is too small: needs {} (data offset {data_offset} + array {})",
                    data_offset + self.size,
                    self.size
                ),
            });
        }
        if let Ok(other) = read_superblock(&*leg) {
            if other.set_uuid != self.uuid {
                return Err(ManageError::Unsuitable {
                    leg: name,
                    why: format!("carries array {}; wipe it first", other.set_uuid),
                });
            }
        }
        let mut used: Vec<u32> = self
            .members()
            .iter()
            .flatten()
            .map(|m| m.dev_number)
            .collect();
        used.extend(self.detached().iter().map(|m| m.dev_number));
        used.extend(lock(&self.meta).faulty.iter().copied());
        let dev_number = (0..MAX_DEVS.min(sb.max_dev()))
            .find(|d| !used.contains(d))
            .ok_or_else(|| ManageError::Unsuitable {
                leg: name.clone(),
                why: "no free device number in the role table".into(),
            })?;
        // Every node's bitmap goes along, so the new leg carries the whole metadata.
        let start = (sb.super_offset + 8) * 512;
        let end = data_offset * 512;
        let area = read_vec(&*source.leg, start, (end - start) as usize)?;
        leg.write_at(&area, start)?;
        let member = Arc::new(Member {
            leg,
            dev_number,
            device_uuid: Uuid::random()?,
            data_offset,
            data_size: sectors - data_offset,
            state: AtomicU8::new(LegState::Recovering as u8),
            inflight: AtomicU64::new(0),
            next_seq: AtomicU64::new(u64::MAX),
            joined_events: 0,
            remote_recovery: std::sync::atomic::AtomicBool::new(false),
            rebuilt_by: std::sync::atomic::AtomicU32::new(super::array::NOBODY),
            bitmap_guided: std::sync::atomic::AtomicBool::new(false),
            gathering: std::sync::atomic::AtomicBool::new(false),
        });
        let activate = || {
            let mut joining = lock(&self.recovery);
            *joining += 1;
            self.set_slot(slot, Some(member.clone()));
            self.bitmap.mark_all_needed();
            self.update_bitmap_state();
        };
        let sync = lock(&self.metadata_sync).clone();
        match sync {
            None => {
                activate();
                self.update_superblocks(|_| {})?;
            }
            Some(sync) => {
                // A spare's superblock, so the other nodes can find the leg.
                let mut spare = sb.clone();
                spare.dev_number = dev_number;
                spare.device_uuid = member.device_uuid;
                spare.data_offset = data_offset;
                spare.data_size = member.data_size;
                spare.feature_map &= !(feature::RECOVERY_OFFSET | feature::RECOVERY_BITMAP);
                spare.recovery_offset = 0;
                member
                    .leg
                    .write_at(&spare.encode(), spare.super_offset * 512)
                    .and_then(|()| member.leg.flush())?;
                let mut activated = false;
                let mut write = || {
                    if !activated {
                        activate();
                        activated = true;
                    }
                    self.update_superblocks_local(|_| {})
                };
                sync.add_device(dev_number, member.device_uuid, &mut write)
                    .map_err(|e| ManageError::Unsuitable {
                        leg: name.clone(),
                        why: e.to_string(),
                    })?;
            }
        }
        info!("leg {name}: added to slot {slot} as device {dev_number}; full recovery");
        Ok(slot)
    }

    /// Another node adds device `dev_number` (`device_uuid`), and `leg` is that
    /// device as seen from here: it waits as a candidate for the metadata update
    /// that gives it its slot (then this node writes it, the other rebuilds it).
    pub fn offer_candidate(
        &self,
        leg: Arc<dyn Leg>,
        dev_number: u32,
        device_uuid: Uuid,
        from: u32,
    ) -> Result<(), ManageError> {
        let name = leg.name().to_string();
        let sb = read_superblock(&*leg).map_err(|e| ManageError::Unsuitable {
            leg: name.clone(),
            why: e.to_string(),
        })?;
        if sb.set_uuid != self.uuid || sb.device_uuid != device_uuid || sb.dev_number != dev_number
        {
            return Err(ManageError::Unsuitable {
                leg: name,
                why: format!(
                    "is device {} ({}) of array {}, not device {dev_number} ({device_uuid}) of {}",
                    sb.dev_number, sb.device_uuid, sb.set_uuid, self.uuid
                ),
            });
        }
        let member = Arc::new(Member {
            leg,
            dev_number,
            device_uuid,
            data_offset: sb.data_offset,
            data_size: sb.data_size,
            state: AtomicU8::new(LegState::Recovering as u8),
            inflight: AtomicU64::new(0),
            next_seq: AtomicU64::new(u64::MAX),
            joined_events: sb.events,
            remote_recovery: std::sync::atomic::AtomicBool::new(true),
            rebuilt_by: std::sync::atomic::AtomicU32::new(from),
            bitmap_guided: std::sync::atomic::AtomicBool::new(false),
            gathering: std::sync::atomic::AtomicBool::new(false),
        });
        let mut c = lock(&self.candidates);
        c.retain(|m| m.dev_number != dev_number);
        c.push(member);
        info!("leg {name}: found as device {dev_number} that another node adds");
        Ok(())
    }
}
