//! A queue's worker: takes the available requests, runs or submits them, and
//! completes what the asynchronous path finished.

use super::*;
use crate::vhost::inflight::{self, InflightQueue};
use log::warn;
use std::io;
use std::sync::atomic::Ordering;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

/// One queue's requests in flight, used by that queue's worker.
pub(super) type QueueState = Engine<Mem>;

impl BlockBackend {
    /// Whether the guest must be signalled after used entries were added.
    pub(super) fn needs_signal(&self, state: &mut VringState<GuestMem>) -> io::Result<bool> {
        if self.event_idx.load(Ordering::Relaxed) {
            state
                .needs_notification()
                .map_err(|e| io::Error::other(format!("needs_notification: {e:?}")))
        } else {
            Ok(true)
        }
    }

    /// Takes every available request of `vring`: those that end at once complete
    /// here, the others are submitted to the mirror. Returns whether to signal the guest.
    pub(super) fn process_queue(
        &self,
        qi: usize,
        vring: &Vring,
        mut snapshot: Snapshot,
    ) -> io::Result<bool> {
        let mut qs = lock(&self.queues[qi]);
        if self.stopped[qi].load(Ordering::SeqCst) {
            return Ok(false);
        }
        // After the queue lock: a stop (and the role's release) waits for us.
        let ctx = self.context();
        let mut state = vring.get_mut();
        let mut used_any = false;
        let region = self.inflight_region();
        let iq = region.as_deref().and_then(|r| r.queue(qi));
        let iq = iq.as_ref();
        // Heads a previous back-end left inflight run first, in the order it took them.
        let mut resubmit = iq
            .map(|q| q.take_resubmit())
            .unwrap_or_default()
            .into_iter();
        loop {
            let (head, descs) = if let Some(head) = resubmit.next() {
                (head, None)
            } else if let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*snapshot.mem) {
                let head = chain.head_index();
                if let Some(iq) = iq {
                    iq.get(head);
                }
                if self.memory_changed(&snapshot) {
                    // The front-end changed its memory table (ADD_MEM_REG) after this
                    // pass took its snapshot, then made this request available: its
                    // buffers (and indirect table) may lie in the new region.
                    (head, None)
                } else {
                    (head, Some(chain.collect::<Vec<_>>()))
                }
            } else {
                break;
            };
            let descs = match descs {
                Some(descs) => descs,
                None => {
                    if self.memory_changed(&snapshot) {
                        snapshot = self.current_memory()?;
                    }
                    let queue = state.get_queue();
                    let table = GuestAddress(queue.desc_table());
                    match inflight::read_chain(&*snapshot.mem, table, queue.size(), head) {
                        Ok(descs) => descs,
                        Err(e) => {
                            warn!("queue {qi}: head {head}: {e}");
                            inflight::add_used(&mut state, iq, head, 0)?;
                            used_any = true;
                            continue;
                        }
                    }
                }
            };
            let first = self.first_request.get(qi);
            if let Some(f) = first {
                f.arrived();
            }
            match qs.start(&ctx, &snapshot.mem, head, &descs) {
                Some(used) => {
                    inflight::add_used(&mut state, iq, head, used)?;
                    self.completed.fetch_add(1, Ordering::Relaxed);
                    if let Some(f) = first {
                        f.ended(qi);
                    }
                    used_any = true;
                }
                None => qs.submit_if_busy()?,
            }
        }
        qs.submit()?;
        used_any |= self.complete_done(qi, &mut qs, &mut state, iq)?;
        if !used_any {
            return Ok(false);
        }
        self.needs_signal(&mut state)
    }

    /// Completes the requests the mirror finished; returns whether any.
    pub(super) fn complete_done(
        &self,
        qi: usize,
        qs: &mut QueueState,
        state: &mut VringState<GuestMem>,
        iq: Option<&InflightQueue<'_>>,
    ) -> io::Result<bool> {
        let done = qs.finished(&self.array, self.writethrough.load(Ordering::Relaxed))?;
        for &(head, used) in &done {
            inflight::add_used(state, iq, head, used)?;
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
        if !done.is_empty() {
            if let Some(f) = self.first_request.get(qi) {
                f.ended(qi);
            }
        }
        Ok(!done.is_empty())
    }

    /// Handles the completion eventfd of queue `qi`.
    pub(super) fn handle_completions(&self, qi: usize, vring: &Vring) -> io::Result<()> {
        let mut qs = lock(&self.queues[qi]);
        qs.io().reap(&self.array);
        let region = self.inflight_region();
        let iq = region.as_deref().and_then(|r| r.queue(qi));
        let mut state = vring.get_mut();
        if self.complete_done(qi, &mut qs, &mut state, iq.as_ref())?
            && self.needs_signal(&mut state)?
        {
            drop(state);
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}
