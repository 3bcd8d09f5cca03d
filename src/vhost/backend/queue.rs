//! A queue's worker: takes the available requests, runs or submits them, and
//! completes what the asynchronous path finished.

use super::*;
use crate::raid1::AsyncIo;
use crate::vhost::inflight::{self, InflightQueue};
use crate::vhost::request::{self, Prepared, RequestError};
use log::warn;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// A request handed to the asynchronous path, until it completes.
pub(super) struct Pending {
    head: u16,
    status: GuestAddress,
    /// Bytes written into guest memory on success (read data).
    used: u32,
    /// Keeps the guest memory the buffers live in mapped.
    mem: Arc<Mem>,
    /// Guest buffers a read fills (marked in the dirty log when it ends, whether it
    /// succeeded or not: a failed read may have written part of them).
    read_segs: Vec<(GuestAddress, usize)>,
    write: bool,
}

impl Pending {
    /// A request whose only answer is its status (flush, discard, write-zeroes).
    pub(super) fn status_only(head: u16, status: GuestAddress, mem: Arc<Mem>) -> Pending {
        Pending {
            head,
            status,
            used: 0,
            mem,
            read_segs: Vec::new(),
            write: false,
        }
    }
}

/// Per-queue asynchronous state, used by that queue's worker.
pub(super) struct QueueState {
    pub(super) io: AsyncIo,
    pub(super) pending: Vec<Option<Pending>>,
    pub(super) free: Vec<usize>,
}

impl QueueState {
    pub(super) fn insert(&mut self, p: Pending) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.pending[i] = Some(p);
                i as u64
            }
            None => {
                self.pending.push(Some(p));
                (self.pending.len() - 1) as u64
            }
        }
    }

    pub(super) fn take(&mut self, token: u64) -> Option<Pending> {
        let p = self.pending.get_mut(token as usize)?.take();
        if p.is_some() {
            self.free.push(token as usize);
        }
        p
    }

    pub(super) fn in_flight(&self) -> usize {
        self.pending.len() - self.free.len()
    }
}

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

    /// Takes every available request of `vring`: synchronous ones complete here, reads,
    /// writes and flushes are submitted. Returns whether to signal the guest.
    pub(super) fn process_queue(
        &self,
        qi: usize,
        vring: &Vring,
        mem: &Arc<Mem>,
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
                let queue = state.get_queue();
                let table = GuestAddress(queue.desc_table());
                match inflight::read_chain(&**mem, table, queue.size(), head) {
                    Ok(descs) => (head, descs),
                    Err(e) => {
                        warn!("queue {qi}: inflight head {head}: {e}");
                        inflight::add_used(&mut state, iq, head, 0)?;
                        used_any = true;
                        continue;
                    }
                }
            } else if let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&**mem) {
                let head = chain.head_index();
                if let Some(iq) = iq {
                    iq.get(head);
                }
                (head, chain.collect::<Vec<_>>())
            } else {
                break;
            };
            let Some(qs) = qs.as_mut() else {
                let used = request::process(&ctx, &**mem, &descs);
                inflight::add_used(&mut state, iq, head, used)?;
                self.completed.fetch_add(1, Ordering::Relaxed);
                used_any = true;
                continue;
            };
            match request::prepare(&ctx, &**mem, &descs) {
                Prepared::Done(used) => {
                    inflight::add_used(&mut state, iq, head, used)?;
                    self.completed.fetch_add(1, Ordering::Relaxed);
                    used_any = true;
                }
                Prepared::Flush { status } => {
                    let token = qs.insert(Pending::status_only(head, status, mem.clone()));
                    self.array.submit_flush(&mut qs.io, token);
                }
                Prepared::Ranges {
                    zeroes,
                    ranges,
                    status,
                } => {
                    let token = qs.insert(Pending::status_only(head, status, mem.clone()));
                    let array = self.array.clone();
                    qs.io.run_detached(token, move || {
                        request::apply_ranges(&array, zeroes, &ranges)
                    });
                }
                Prepared::Transfer(t) => {
                    let mut iovs = Vec::with_capacity(t.segs.len());
                    let mut bad = None;
                    for &(addr, len) in &t.segs {
                        for v in GuestMemoryBackend::get_slices(&**mem, addr, len) {
                            match v {
                                Ok(v) => iovs.push(libc::iovec {
                                    iov_base: v.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                                    iov_len: v.len(),
                                }),
                                Err(e) => bad = Some(e.to_string()),
                            }
                        }
                    }
                    if let Some(e) = bad {
                        let used = request::finish(&**mem, t.status, Err(RequestError::Memory(e)));
                        inflight::add_used(&mut state, iq, head, used)?;
                        used_any = true;
                        continue;
                    }
                    let token = qs.insert(Pending {
                        head,
                        status: t.status,
                        used: if t.write { 0 } else { t.len as u32 },
                        mem: mem.clone(),
                        read_segs: if t.write { Vec::new() } else { t.segs.clone() },
                        write: t.write,
                    });
                    // SAFETY: the buffers are guest memory kept mapped by the `mem`
                    // Arc in the pending entry until the completion is taken; the guest
                    // does not touch buffers it handed to the device before completion.
                    unsafe {
                        if t.write {
                            self.array.submit_write(&mut qs.io, token, t.sector, iovs);
                        } else {
                            self.array.submit_read(&mut qs.io, token, t.sector, iovs);
                        }
                    }
                }
            }
        }
        if let Some(qs) = qs.as_mut() {
            qs.io.submit()?;
            used_any |= self.complete_done(qs, &mut state, iq)?;
        }
        if !used_any {
            return Ok(false);
        }
        self.needs_signal(&mut state)
    }

    /// Completes the requests the asynchronous path finished; returns whether any.
    pub(super) fn complete_done(
        &self,
        qs: &mut QueueState,
        state: &mut VringState<GuestMem>,
        iq: Option<&InflightQueue<'_>>,
    ) -> io::Result<bool> {
        let mut any = false;
        loop {
            let mut flushing = false;
            for (token, result) in qs.io.take_done() {
                let Some(p) = qs.take(token) else {
                    warn!("completion for an unknown request {token}");
                    continue;
                };
                // The read data went into guest memory behind vm-memory's back: log
                // it before the used entry tells the guest it is there.
                for &(addr, len) in &p.read_segs {
                    for v in GuestMemoryBackend::get_slices(&*p.mem, addr, len).flatten() {
                        v.bitmap().mark_dirty(0, v.len());
                    }
                }
                if result.is_ok() && p.write && self.writethrough.load(Ordering::Relaxed) {
                    // Write-through: the write completes once a flush after it did.
                    let token = qs.insert(Pending { write: false, ..p });
                    self.array.submit_flush(&mut qs.io, token);
                    flushing = true;
                    continue;
                }
                let result = result.map(|()| p.used).map_err(RequestError::Io);
                let used = request::finish(&*p.mem, p.status, result);
                inflight::add_used(state, iq, p.head, used)?;
                self.completed.fetch_add(1, Ordering::Relaxed);
                any = true;
            }
            if !flushing {
                return Ok(any);
            }
            // A flush of legs without a ring may have finished already.
            qs.io.submit()?;
        }
    }

    /// Handles the completion eventfd of queue `qi`.
    pub(super) fn handle_completions(&self, qi: usize, vring: &Vring) -> io::Result<()> {
        let mut qs = lock(&self.queues[qi]);
        let Some(qs) = qs.as_mut() else {
            return Ok(());
        };
        qs.io.reap(&self.array);
        let region = self.inflight_region();
        let iq = region.as_deref().and_then(|r| r.queue(qi));
        let mut state = vring.get_mut();
        if self.complete_done(qs, &mut state, iq.as_ref())? && self.needs_signal(&mut state)? {
            drop(state);
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}
