//! Asynchronous leg I/O with io_uring: positional vectored reads and writes and data
//! syncs on file descriptors, completions signalled through an eventfd. Where the
//! kernel offers no io_uring, a synchronous ring has the eventfd only: its users
//! do every leg's I/O in place (see [`Ring::is_async`]).

use io_uring::{opcode, types, IoUring};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One completed operation: its tag and the kernel's result (bytes or -errno).
#[derive(Debug, Clone, Copy)]
pub struct Cqe {
    /// The tag given at submission.
    pub tag: u64,
    /// Bytes transferred, or a negative errno.
    pub result: i32,
}

/// An io_uring with an eventfd that becomes readable when completions arrive.
pub struct Ring {
    /// `None`: a synchronous ring, which queues nothing.
    ring: Option<IoUring>,
    eventfd: EventFd,
    queued: usize,
}

impl Ring {
    /// A ring of `entries` submission slots.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::new(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Ring {
            ring: Some(ring),
            eventfd,
            queued: 0,
        })
    }

    /// A ring without io_uring: its eventfd only (completions of work done on
    /// other threads are signalled there); reads, writes and syncs are refused.
    pub fn synchronous() -> io::Result<Ring> {
        Ok(Ring {
            ring: None,
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            queued: 0,
        })
    }

    /// A ring of `entries` slots, or a synchronous one where io_uring is not
    /// available (with the reason).
    pub fn new_or_synchronous(entries: u32) -> io::Result<(Ring, Option<io::Error>)> {
        match Ring::new(entries) {
            Ok(r) => Ok((r, None)),
            Err(e) => Ok((Ring::synchronous()?, Some(e))),
        }
    }

    /// Whether this ring queues I/O to the kernel (else its users do I/O in place).
    pub fn is_async(&self) -> bool {
        self.ring.is_some()
    }

    /// A second handle on the eventfd, to wake whoever waits on it.
    pub fn waker(&self) -> io::Result<EventFd> {
        self.eventfd.try_clone()
    }

    /// The eventfd to wait on.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        loop {
            let Some(ring) = self.ring.as_mut() else {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a synchronous ring queues no I/O",
                ));
            };
            // SAFETY: the caller of the public submit functions guarantees that the
            // buffers the entry points to stay valid until its completion is reaped.
            let pushed = unsafe { ring.submission().push(&entry) };
            if pushed.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            self.flush()?;
        }
    }

    /// Queues a vectored read of `iovs` at `off` of `fd`.
    ///
    /// # Safety
    /// `iovs` and the memory it describes must stay valid (and not be moved) until
    /// the completion with `tag` has been reaped.
    pub unsafe fn readv(
        &mut self,
        fd: RawFd,
        iovs: &[libc::iovec],
        off: u64,
        tag: u64,
    ) -> io::Result<()> {
        let e = opcode::Readv::new(types::Fd(fd), iovs.as_ptr(), iovs.len() as u32)
            .offset(off)
            .build()
            .user_data(tag);
        self.push(e)
    }

    /// Queues a vectored write of `iovs` at `off` of `fd`.
    ///
    /// # Safety
    /// As for [`Ring::readv`].
    pub unsafe fn writev(
        &mut self,
        fd: RawFd,
        iovs: &[libc::iovec],
        off: u64,
        tag: u64,
    ) -> io::Result<()> {
        let e = opcode::Writev::new(types::Fd(fd), iovs.as_ptr(), iovs.len() as u32)
            .offset(off)
            .build()
            .user_data(tag);
        self.push(e)
    }

    /// Queues an fdatasync of `fd`.
    pub fn fdatasync(&mut self, fd: RawFd, tag: u64) -> io::Result<()> {
        let e = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(tag);
        self.push(e)
    }

    /// Hands queued entries to the kernel.
    pub fn flush(&mut self) -> io::Result<()> {
        if let (true, Some(ring)) = (self.queued > 0, self.ring.as_mut()) {
            ring.submit()?;
            self.queued = 0;
        }
        Ok(())
    }

    /// Takes every available completion (clearing the eventfd first, so none is
    /// missed).
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        let _ = self.eventfd.read();
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        for c in ring.completion() {
            out.push(Cqe {
                tag: c.user_data(),
                result: c.result(),
            });
        }
    }

    /// Waits until at least one completion is available (a synchronous ring has
    /// none in flight: it returns at once).
    pub fn wait(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        ring.submit_and_wait(1)?;
        self.queued = 0;
        Ok(())
    }
}
