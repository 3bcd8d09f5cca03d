//! Leg writes that may block for long (a leg without a file descriptor that says
//! so, e.g. a fault drill's stalled leg) run on a thread of their own; their
//! results come back to the worker as ring completions would, through the
//! completion eventfd. So do whole requests that may wait for other nodes and
//! have no asynchronous path (discard, write-zeroes): a worker never blocks on
//! the cluster while it has completions to reap.

use crate::storage::uring::Cqe;
use crate::storage::Leg;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Completions of offloaded writes and requests, waiting for the worker.
pub struct Offloaded {
    done: Mutex<Vec<Cqe>>,
    /// Whole requests run off the worker, by their token.
    requests: Mutex<Vec<(u64, io::Result<()>)>>,
    waker: EventFd,
}

/// A whole request run off the worker.
pub type Job = Box<dyn FnOnce() -> io::Result<()> + Send>;

/// The buffers of one offloaded write.
struct Buffers {
    ptr: *const libc::iovec,
    len: usize,
}

// SAFETY: the iovecs (and the memory they describe) stay valid and untouched until
// the write's completion was taken by the worker (see `Offloaded::write`).
unsafe impl Send for Buffers {}

impl Offloaded {
    /// Completions signalled on `waker` (the worker's completion eventfd).
    pub fn new(waker: EventFd) -> Offloaded {
        Offloaded {
            done: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            waker,
        }
    }

    /// Takes the results of the requests run by [`Offloaded::run`] that ended.
    pub fn take_requests(&self) -> Vec<(u64, io::Result<()>)> {
        std::mem::take(&mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs request `token` (`job`, which owns what it uses) on a new thread; its
    /// result comes from [`Offloaded::take_requests`]. Fails when no thread could
    /// be started (nothing ran then).
    pub fn run(self: &Arc<Self>, token: u64, job: Job) -> io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("request".into())
            .spawn(move || {
                let result = job();
                me.requests
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((token, result));
                if let Err(e) = me.waker.write(1) {
                    log::error!("cannot wake the worker after a request: {e}");
                }
            })
            .map(|_| ())
    }

    /// Takes the completions of the writes that ended.
    pub fn take(&self) -> Vec<Cqe> {
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes `iovs` to `leg` at `off` on a new thread; its completion (`tag`,
    /// bytes or -errno) comes from [`Offloaded::take`]. Fails when no thread could
    /// be started (nothing was written then).
    ///
    /// # Safety
    /// `iovs` and the memory it describes must stay valid and unused by others
    /// until the completion was taken.
    pub(super) unsafe fn write(
        self: &Arc<Self>,
        leg: Arc<dyn Leg>,
        iovs: &[libc::iovec],
        off: u64,
        tag: u64,
    ) -> io::Result<()> {
        let bufs = Buffers {
            ptr: iovs.as_ptr(),
            len: iovs.len(),
        };
        let me = self.clone();
        std::thread::Builder::new()
            .name("slow-write".into())
            .spawn(move || {
                let bufs = bufs;
                // SAFETY: guaranteed by the caller of `write` until the completion
                // pushed below is taken.
                let iovs = unsafe { std::slice::from_raw_parts(bufs.ptr, bufs.len) };
                let slices: Vec<IoSlice<'_>> = iovs
                    .iter()
                    .map(|v| {
                        // SAFETY: as above.
                        let buf = unsafe {
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        };
                        IoSlice::new(buf)
                    })
                    .collect();
                let bytes: usize = iovs.iter().map(|v| v.iov_len).sum();
                let result = match leg.writev_at(&slices, off) {
                    Ok(()) => i32::try_from(bytes).unwrap_or(i32::MAX),
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                };
                me.done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Cqe { tag, result });
                if let Err(e) = me.waker.write(1) {
                    log::error!("cannot wake the worker after a slow write: {e}");
                }
            })
            .map(|_| ())
    }
}
