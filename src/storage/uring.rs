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
    /// Operations handed to the kernel, and completions taken back from it.
    submitted: u64,
    reaped: u64,
    /// Whether the kernel still worked on operations when the last submission
    /// returned (see [`Ring::busy_after_flush`]).
    busy: bool,
    /// An entry queued since the last submission goes to a file whose reads
    /// and writes the kernel hands to its worker threads.
    to_workers: std::cell::Cell<bool>,
    /// Where the last read or write queued on each file ended, and whether the
    /// last one queued began where the one before it on its file ended.
    ends: Vec<(RawFd, u64)>,
    stream: bool,
    /// Completions taken from the kernel while a submission was refused (to
    /// make room), handed out by the next [`Ring::reap`].
    held: Vec<Cqe>,
    /// Errors the next submissions meet instead of calling the kernel (tests).
    #[cfg(test)]
    refuse: Vec<i32>,
}

/// How often in a row a submission refused for a moment (EAGAIN, EBUSY) is
/// tried again, a millisecond apart, before the error is reported.
const REFUSALS: u32 = 1000;

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
            submitted: 0,
            reaped: 0,
            busy: false,
            to_workers: std::cell::Cell::new(false),
            ends: Vec::new(),
            stream: false,
            held: Vec::new(),
            #[cfg(test)]
            refuse: Vec::new(),
        })
    }

    /// A ring without io_uring: its eventfd only (completions of work done on
    /// other threads are signalled there); reads, writes and syncs are refused.
    pub fn synchronous() -> io::Result<Ring> {
        Ok(Ring {
            ring: None,
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            queued: 0,
            submitted: 0,
            reaped: 0,
            busy: false,
            to_workers: std::cell::Cell::new(false),
            ends: Vec::new(),
            stream: false,
            held: Vec::new(),
            #[cfg(test)]
            refuse: Vec::new(),
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
        self.note_range(fd, off, iovs);
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
        self.note_range(fd, off, iovs);
        let e = opcode::Writev::new(types::Fd(fd), iovs.as_ptr(), iovs.len() as u32)
            .offset(off)
            .build()
            .user_data(tag);
        self.push(e)
    }

    fn note_range(&mut self, fd: RawFd, off: u64, iovs: &[libc::iovec]) {
        let end = off.saturating_add(iovs.iter().map(|v| v.iov_len as u64).sum::<u64>());
        match self.ends.iter_mut().find(|(f, _)| *f == fd) {
            Some(e) => {
                self.stream = e.1 == off;
                e.1 = end;
            }
            None => {
                self.stream = false;
                // A handful of legs: the oldest file's entry goes first.
                if self.ends.len() >= 16 {
                    self.ends.remove(0);
                }
                self.ends.push((fd, end));
            }
        }
    }

    /// Whether the last read or write queued began where the previous one on
    /// its file ended: part of a sequential stream, which the kernel merges
    /// into larger device requests when the pieces reach it in one submission.
    pub fn last_was_sequential(&self) -> bool {
        self.stream
    }

    /// Queues an fdatasync of `fd`.
    pub fn fdatasync(&mut self, fd: RawFd, tag: u64) -> io::Result<()> {
        // The kernel runs syncs on its worker threads.
        self.note_target(false);
        let e = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(tag);
        self.push(e)
    }

    /// Hands queued entries to the kernel. A submission interrupted by a signal,
    /// or refused for a moment (EAGAIN: the kernel lacked memory; EBUSY: it holds
    /// completions it had no room for, taken here to make room), is tried again;
    /// entries after one the kernel could not start stay queued and go next.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        if self.queued == 0 {
            return Ok(());
        }
        let mut refusals = 0;
        while self.queued > 0 {
            #[cfg(test)]
            let refused = self.refuse.pop().map(io::Error::from_raw_os_error);
            #[cfg(not(test))]
            let refused: Option<io::Error> = None;
            match refused.map_or_else(|| ring.submit(), Err) {
                Ok(n) => {
                    self.submitted += n as u64;
                    self.queued = ring.submission().len();
                    if n == 0 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if refused_for_a_moment(&e) && refusals < REFUSALS => {
                    refusals += 1;
                    take_completions(ring, &mut self.held, &mut self.reaped);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        }
        // What the kernel finished within the call is in the completion queue
        // already (page cache, tmpfs); what it did not is in flight.
        let ready = ring.completion().len() as u64 + self.held.len() as u64;
        let to_workers = self.to_workers.take();
        self.busy = self.submitted > self.reaped + ready && !to_workers;
        Ok(())
    }

    /// Records that an entry about to be queued goes to a file whose I/O the
    /// kernel issues to its device inline ([`issues_inline`]) or not.
    pub fn note_target(&self, inline: bool) {
        if !inline {
            self.to_workers.set(true);
        }
    }

    /// Whether operations were still in flight in the kernel when the last
    /// submission returned, on devices that the submission itself started: the
    /// legs' devices work asynchronously, so an operation handed over at once
    /// starts at once, while the next ones are being prepared. `false` where the
    /// kernel finished everything within the submission, or handed it to its
    /// worker threads (there, submitting in batches saves system calls and
    /// thread wake-ups and loses nothing), and before the first submission.
    pub fn busy_after_flush(&self) -> bool {
        self.busy
    }

    /// Takes every available completion (clearing the eventfd first, so none is
    /// missed), including those the kernel kept aside when its completion queue
    /// was full.
    pub fn reap(&mut self, out: &mut Vec<Cqe>) {
        let _ = self.eventfd.read();
        out.append(&mut self.held);
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        loop {
            take_completions(ring, out, &mut self.reaped);
            // Completions the queue had no room for wait in the kernel until a
            // call moves them over (they ring no eventfd again): now there is room.
            if !ring.submission().cq_overflow() {
                break;
            }
            match ring.submit() {
                Ok(n) => {
                    self.submitted += n as u64;
                    self.queued = ring.submission().len();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("cannot take the completions the kernel kept aside: {e}");
                    break;
                }
            }
        }
    }

    /// Waits until at least one completion is available (a synchronous ring has
    /// none in flight: it returns at once). A wait interrupted by a signal, or a
    /// submission refused for a moment, returns early: the caller reaps and waits
    /// again.
    pub fn wait(&mut self) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut() else {
            return Ok(());
        };
        match ring.submit_and_wait(1) {
            Ok(n) => {
                self.submitted += n as u64;
                self.queued = ring.submission().len();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) if refused_for_a_moment(&e) => {
                take_completions(ring, &mut self.held, &mut self.reaped);
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Moves the completions in `ring`'s completion queue to `into`, counting them
/// in `reaped`.
fn take_completions(ring: &mut IoUring, into: &mut Vec<Cqe>, reaped: &mut u64) {
    for c in ring.completion() {
        *reaped += 1;
        into.push(Cqe {
            tag: c.user_data(),
            result: c.result(),
        });
    }
}

/// A submission the kernel refused for a moment: EAGAIN (short of memory) or
/// EBUSY (completions waiting for room in the completion queue).
fn refused_for_a_moment(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
}

/// Whether io_uring issues reads of `fd` to its device from the submitting
/// thread (the file takes non-blocking direct I/O, as block devices and the
/// usual file systems' O_DIRECT files do), rather than handing each one to one
/// of the kernel's worker threads (tmpfs, FUSE). Tried with a
/// `RWF_NOWAIT` read of the first `len` bytes (a multiple of the file's
/// alignment), once more after a blocking read in case the first one only met
/// metadata not cached yet. `false` where io_uring is missing or anything fails.
pub fn issues_inline(fd: RawFd, len: usize) -> bool {
    let Ok(mut ring) = IoUring::new(2) else {
        return false;
    };
    let mut buf = super::aligned::AlignedBuf::zeroed(len.max(4096));
    for nowait in [true, false, true] {
        let iov = [libc::iovec {
            iov_base: buf.as_mut_slice().as_mut_ptr().cast(),
            iov_len: len,
        }];
        let e = opcode::Readv::new(types::Fd(fd), iov.as_ptr(), 1)
            .offset(0)
            .rw_flags(if nowait { libc::RWF_NOWAIT } else { 0 })
            .build()
            .user_data(0);
        // SAFETY: `iov` and `buf` outlive the completion, waited for below (or
        // `buf` is leaked); the kernel takes the vector itself at submission.
        if unsafe { ring.submission().push(&e) }.is_err() || ring.submit().is_err() {
            // Nothing was submitted: the kernel reports a count once it took an entry.
            return false;
        }
        let result = loop {
            if let Some(c) = ring.completion().next() {
                break c.result();
            }
            match ring.submit_and_wait(1) {
                // A signal during the wait returns the count submitted, or EINTR.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The read may still be in flight: its buffer must outlive it.
                    std::mem::forget(buf);
                    return false;
                }
            }
        };
        if nowait && result >= 0 {
            return true;
        }
        if nowait && result != -libc::EAGAIN {
            return false; // EOPNOTSUPP: the file takes no non-blocking I/O
        }
    }
    false
}

#[cfg(test)]
mod tests;
