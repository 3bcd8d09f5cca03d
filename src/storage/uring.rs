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
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
                        && refusals < REFUSALS =>
                {
                    refusals += 1;
                    for c in ring.completion() {
                        self.reaped += 1;
                        self.held.push(Cqe {
                            tag: c.user_data(),
                            result: c.result(),
                        });
                    }
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
            for c in ring.completion() {
                self.reaped += 1;
                out.push(Cqe {
                    tag: c.user_data(),
                    result: c.result(),
                });
            }
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
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                for c in ring.completion() {
                    self.reaped += 1;
                    self.held.push(Cqe {
                        tag: c.user_data(),
                        result: c.result(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
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
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn iov(buf: &mut [u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]
    }

    /// Queues a read of the first 4 KiB of `f` (page-cache data: the kernel
    /// finishes it within the submission) into the buffer `iovs` describes.
    fn queue_cached_read(ring: &mut Ring, f: &std::fs::File, iovs: &[libc::iovec; 1], tag: u64) {
        // SAFETY: each test keeps `iovs` and its buffer until the completion is
        // reaped (the kernel reads the vector when the entry is submitted).
        unsafe { ring.readv(f.as_raw_fd(), iovs, 0, tag).unwrap() };
    }

    fn cached_file() -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f
    }

    #[test]
    fn a_submission_interrupted_or_refused_for_a_moment_is_tried_again() {
        let Ok(mut ring) = Ring::new(8) else {
            return;
        };
        let f = cached_file();
        let mut buf = vec![0u8; 4096];
        let iovs = iov(&mut buf);
        queue_cached_read(&mut ring, &f, &iovs, 5);
        // Popped from the end: EINTR first, then EAGAIN, then EBUSY.
        ring.refuse = vec![libc::EBUSY, libc::EAGAIN, libc::EINTR];
        ring.flush().unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1, "the read never reached the kernel");
        assert_eq!((out[0].tag, out[0].result), (5, 4096));
        assert_eq!(buf[4095], 7);
    }

    #[test]
    fn completions_beyond_the_completion_queue_are_all_reaped() {
        // Two submission slots, four completion slots; eight reads that end
        // within their submissions: four of them find no room.
        let Ok(mut ring) = Ring::new(2) else {
            return;
        };
        let f = cached_file();
        let mut bufs = vec![vec![0u8; 4096]; 8];
        let iovs: Vec<_> = bufs.iter_mut().map(|b| iov(b)).collect();
        for (i, v) in iovs.iter().enumerate() {
            queue_cached_read(&mut ring, &f, v, i as u64);
        }
        ring.flush().unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            (0..8).collect::<Vec<_>>(),
            "completions left in the kernel"
        );
    }

    #[test]
    fn entries_after_one_the_kernel_could_not_start_go_to_it_too() {
        let Ok(mut ring) = Ring::new(8) else {
            return;
        };
        // An entry with an unknown flag: the kernel fails it and stops there.
        let bad = opcode::Nop::new()
            .build()
            .flags(io_uring::squeue::Flags::from_bits_retain(0x80))
            .user_data(1);
        ring.push(bad).unwrap();
        let f = cached_file();
        let mut buf = vec![0u8; 4096];
        let iovs = iov(&mut buf);
        queue_cached_read(&mut ring, &f, &iovs, 2);
        ring.flush().unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        let mut tags: Vec<(u64, bool)> = out.iter().map(|c| (c.tag, c.result >= 0)).collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            [(1, false), (2, true)],
            "the read after it was left queued"
        );
    }

    /// The probe's blocking read waits on a pipe; a signal interrupts its wait.
    /// It must keep waiting for the read: returning would free the buffer the
    /// kernel still reads into.
    #[test]
    fn the_leg_probe_waits_for_its_read_through_a_signal() {
        extern "C" fn nothing(_: libc::c_int) {}
        let sig = libc::SIGRTMIN() + 7;
        // SAFETY: a handler that does nothing, without SA_RESTART.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
        }
        let (rx, tx) = std::io::pipe().unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let probe = std::thread::spawn(move || {
            let inline = issues_inline(rx.as_raw_fd(), 4096);
            let _ = done_tx.send(());
            drop(rx);
            inline
        });
        // The non-blocking read finds nothing; the blocking one waits.
        std::thread::sleep(std::time::Duration::from_millis(200));
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the thread is alive (it waits on the pipe).
        assert_eq!(unsafe { libc::pthread_kill(probe.as_pthread_t(), sig) }, 0);
        assert!(
            done_rx
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the probe returned with its read still in flight"
        );
        (&tx).write_all(&[1u8; 4096]).unwrap();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the probe did not end once its read did");
        // A pipe takes no non-blocking read of data that is not there: not inline.
        assert!(!probe.join().unwrap());
    }

    #[test]
    fn a_read_the_kernel_finishes_within_the_submission_leaves_the_ring_idle() {
        let Ok(mut ring) = Ring::new(8) else {
            return; // no io_uring in this kernel: nothing to measure
        };
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let mut buf = vec![0u8; 4096];
        let iovs = iov(&mut buf);
        // SAFETY: `buf` and `iovs` outlive the completion, reaped below.
        unsafe { ring.readv(f.as_raw_fd(), &iovs, 0, 1).unwrap() };
        ring.flush().unwrap();
        // Page-cache data: read within the submission.
        assert!(!ring.busy_after_flush());
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].result, 4096);
        assert_eq!(buf[4095], 7);
    }

    #[test]
    fn a_read_that_continues_the_previous_one_on_its_file_is_sequential() {
        let Ok(mut ring) = Ring::new(8) else {
            return;
        };
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 16384]).unwrap();
        let mut g = tempfile::tempfile().unwrap();
        g.write_all(&[2u8; 16384]).unwrap();
        let mut bufs = vec![vec![0u8; 4096]; 5];
        let iovs: Vec<_> = bufs.iter_mut().map(|b| iov(b)).collect();
        let mut queue = |fd: &std::fs::File, i: usize, off: u64| {
            // SAFETY: `bufs` and `iovs` outlive the completions, reaped below.
            unsafe { ring.readv(fd.as_raw_fd(), &iovs[i], off, i as u64).unwrap() };
            ring.last_was_sequential()
        };
        assert!(!queue(&f, 0, 0)); // the first on its file
        assert!(!queue(&g, 1, 4096)); // the first on its file
        assert!(queue(&f, 2, 4096)); // continues f's last, with g's between
        assert!(!queue(&f, 3, 12288)); // skips a block
        assert!(queue(&g, 4, 8192)); // continues g's last
        ring.flush().unwrap();
        ring.wait().unwrap();
        let mut out = Vec::new();
        while out.len() < 5 {
            ring.reap(&mut out);
        }
    }

    #[test]
    fn a_worker_thread_entry_counts_for_its_own_submission_only() {
        let Ok(mut ring) = Ring::new(8) else {
            return;
        };
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[9u8; 4096]).unwrap();
        let mut buf = vec![0u8; 4096];
        let iovs = iov(&mut buf);
        // An entry for the kernel's workers, finished within its submission.
        ring.note_target(false);
        // SAFETY: `buf` and `iovs` outlive the completion, reaped below.
        unsafe { ring.readv(f.as_raw_fd(), &iovs, 0, 1).unwrap() };
        ring.flush().unwrap();
        assert!(!ring.busy_after_flush());
        let mut out = Vec::new();
        ring.reap(&mut out);
        // The next submission, a read still in flight, is judged on its own.
        let (rx, tx) = std::io::pipe().unwrap();
        let mut pbuf = vec![0u8; 16];
        let piovs = iov(&mut pbuf);
        // SAFETY: as above; waited for below.
        unsafe { ring.readv(rx.as_raw_fd(), &piovs, u64::MAX, 2).unwrap() };
        ring.flush().unwrap();
        assert!(ring.busy_after_flush());
        (&tx).write_all(b"x").unwrap();
        ring.wait().unwrap();
        ring.reap(&mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_read_the_device_still_works_on_leaves_the_ring_busy_until_it_ends() {
        let Ok(mut ring) = Ring::new(8) else {
            return;
        };
        let (rx, tx) = std::io::pipe().unwrap();
        let mut buf = vec![0u8; 16];
        let iovs = iov(&mut buf);
        // SAFETY: `buf` and `iovs` outlive the completion, waited for below.
        unsafe { ring.readv(rx.as_raw_fd(), &iovs, u64::MAX, 1).unwrap() };
        ring.flush().unwrap();
        // Nothing to read yet: the read is in flight.
        assert!(ring.busy_after_flush());
        (&tx).write_all(b"hello").unwrap();
        ring.wait().unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].result, 5);
        // The same read, marked as going to a file the kernel hands to its worker
        // threads: in flight, but no device was started by the submission.
        ring.note_target(false);
        // SAFETY: as above.
        unsafe { ring.readv(rx.as_raw_fd(), &iovs, u64::MAX, 3).unwrap() };
        ring.flush().unwrap();
        assert!(!ring.busy_after_flush());
        (&tx).write_all(b"again").unwrap();
        ring.wait().unwrap();
        out.clear();
        ring.reap(&mut out);
        assert_eq!(out.len(), 1);
        // The next submission, finished within the call, finds the ring idle again.
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 512]).unwrap();
        let mut buf2 = vec![0u8; 512];
        let iovs2 = iov(&mut buf2);
        // SAFETY: as above.
        unsafe { ring.readv(f.as_raw_fd(), &iovs2, 0, 2).unwrap() };
        ring.flush().unwrap();
        assert!(!ring.busy_after_flush());
        ring.reap(&mut out);
    }

    fn open_direct(dir: &std::path::Path) -> (tempfile::TempDir, std::fs::File) {
        use std::os::unix::fs::OpenOptionsExt;
        let d = tempfile::tempdir_in(dir).unwrap();
        let path = d.path().join("leg");
        std::fs::write(&path, vec![5u8; 1 << 16]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .or_else(|_| std::fs::File::open(&path))
            .unwrap();
        (d, f)
    }

    fn fs_type(f: &std::fs::File) -> i64 {
        // SAFETY: statfs is plain data; all zeroes is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs fills the live `st` for a live descriptor.
        assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
        st.f_type as i64
    }

    #[test]
    fn direct_io_on_a_disk_file_system_is_issued_inline_and_tmpfs_is_not() {
        const TMPFS: i64 = 0x0102_1994;
        const EXT4: i64 = 0xEF53;
        const XFS: i64 = 0x5846_5342;
        if IoUring::new(2).is_err() {
            return; // no io_uring in this kernel: nothing to measure
        }
        let (_d, shm) = open_direct(std::path::Path::new("/dev/shm"));
        assert_eq!(fs_type(&shm), TMPFS);
        assert!(!issues_inline(shm.as_raw_fd(), 4096));
        // /var/tmp lies on the machine's disk (where it is another kind of file
        // system, an overlay say, only tmpfs is checked).
        let (_d, disk) = open_direct(std::path::Path::new("/var/tmp"));
        let t = fs_type(&disk);
        if t == EXT4 || t == XFS {
            assert!(issues_inline(disk.as_raw_fd(), 4096));
        }
    }
}
