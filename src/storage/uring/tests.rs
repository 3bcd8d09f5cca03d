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
