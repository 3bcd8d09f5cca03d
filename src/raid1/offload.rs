//! Leg writes that may block for long (a leg without a file descriptor that says
//! so, e.g. a fault drill's stalled leg) run on a thread of their own; their
//! results come back to the worker as ring completions would, through the
//! completion eventfd.

use crate::storage::uring::Cqe;
use crate::storage::Leg;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Completions of offloaded writes, waiting for the worker.
pub struct Offloaded {
    done: Mutex<Vec<Cqe>>,
    waker: EventFd,
}

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
            waker,
        }
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
    pub unsafe fn write(
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
