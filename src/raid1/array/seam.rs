//! The array's side of the cluster port ([`ClusterMirror`]): how another node's
//! doings are applied to this node's mirror, and what recovery and resync do.

use super::*;
use crate::raid1::port::{ClusterEvent, ClusterMirror};

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
                let requested = settler.wait_request(IDLE_BACKSTOP);
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
}

impl ClusterMirror for Array {
    fn assemble_as_node(legs: Vec<Arc<dyn Leg>>, slot: u32) -> Result<Array, String> {
        let (array, report) = Array::assemble_as(legs, slot).map_err(|e| e.to_string())?;
        // Assembly has logged why each of them is left out.
        array.set_detached(report.left_out_legs);
        Ok(array)
    }

    fn attach(self: &Arc<Self>, sync: Arc<dyn MetadataSync>) -> io::Result<()> {
        self.set_metadata_sync(sync);
        self.settle_in_background()
            .map_err(|e| io::Error::other(format!("cannot start the settler thread: {e}")))
    }

    fn apply(&self, event: ClusterEvent) -> io::Result<()> {
        match event {
            // Returns once our writes in the window finished.
            ClusterEvent::WindowSet { slot, lo, hi } => {
                self.bitmap.set_remote_window(slot, lo, hi);
                Ok(())
            }
            ClusterEvent::WindowCleared { slot } => {
                self.bitmap.clear_remote_window_of(slot);
                Ok(())
            }
            ClusterEvent::MetadataUpdated { from } => self.reload_superblocks(Some(from)),
            ClusterEvent::NewDisk {
                slot,
                dev_number,
                uuid,
                leg,
            } => self
                .offer_candidate(leg, dev_number, uuid, slot)
                .map_err(|e| io::Error::other(e.to_string())),
            ClusterEvent::ReadsFromOneLeg(on) => {
                self.suspend_read_balancing(on);
                Ok(())
            }
        }
    }

    fn bitmap(&self) -> &WriteIntent {
        &self.bitmap
    }

    fn sectors(&self) -> u64 {
        self.size
    }

    fn first_good_dev(&self) -> Option<u32> {
        Array::first_good_dev(self)
    }

    fn reads_from_one_leg(&self) -> bool {
        self.read_balancing_suspended()
    }

    fn gather_for_rebuild(&self) -> io::Result<()> {
        let guided =
            self.members().iter().flatten().any(|m| {
                m.state() == LegState::Recovering && m.bitmap_guided.load(Ordering::Relaxed)
            });
        if guided {
            self.gather_other_slots()?;
        }
        Ok(())
    }

    fn take_over_slot(&self, slot: u32) -> io::Result<u64> {
        self.merge_slot(slot, true)
    }

    fn take_over_recoveries(&self, slot: u32) -> io::Result<bool> {
        Array::take_over_recoveries(self, slot)
    }

    fn resync_halted(&self) -> bool {
        Array::resync_halted(self)
    }

    fn resync_chunk(&self, chunk: u64) -> io::Result<u64> {
        Array::resync_chunk(self, chunk)
    }
}
