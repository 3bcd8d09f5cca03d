//! A leg wrapper that injects faults, for tests and fault drills.

use super::Leg;
use std::io::{self, IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Fault knobs and counters, shared with whoever drives the drill.
#[derive(Debug, Default)]
pub struct Faults {
    /// Writes left before every write fails (negative: never).
    pub writes_until_failure: AtomicI64,
    /// Writes at or beyond this byte offset of the leg fail with ENOSPC, as on a
    /// full file system where only blocks not yet allocated fail (0: off).
    pub no_space_from: AtomicU64,
    /// Every read fails.
    pub fail_reads: AtomicBool,
    /// Every flush fails.
    pub fail_flushes: AtomicBool,
    /// Writes at or beyond this byte offset of the leg never finish: the writing
    /// thread blocks until the process ends (0: off). For crash drills.
    pub stall_writes_from: AtomicU64,
    /// When set, a stalled write waits until this file exists instead, and the
    /// leg asks for its writes to run off the worker thread: the write stays in
    /// flight as on a device that stopped answering (see [`Leg::slow_writes`]).
    pub stall_until: OnceLock<PathBuf>,
    /// Bytes written through the wrapper.
    pub bytes_written: AtomicU64,
    /// Bytes read through the wrapper.
    pub bytes_read: AtomicU64,
}

impl Faults {
    /// Knobs that inject nothing.
    pub fn none() -> Arc<Faults> {
        let f = Faults::default();
        f.writes_until_failure.store(-1, Ordering::Relaxed);
        Arc::new(f)
    }

    /// Makes every write fail from now on.
    pub fn fail_writes_now(&self) {
        self.writes_until_failure.store(0, Ordering::Relaxed);
    }

    /// Whether a write at `off` stalls now: it is at or beyond the stall offset
    /// and the release file, if there is one, does not exist (while it does, the
    /// leg answers: a drill stalls a leg for a while by removing the file).
    fn stalls(&self, off: u64) -> bool {
        let from = self.stall_writes_from.load(Ordering::Relaxed);
        from != 0 && off >= from && !self.stall_until.get().is_some_and(|f| f.exists())
    }

    /// Blocks when a write at `off` is to stall: until the release file exists, or
    /// forever.
    fn maybe_stall(&self, off: u64) {
        if !self.stalls(off) {
            return;
        }
        let Some(until) = self.stall_until.get() else {
            log::warn!("fault drill: write at byte {off} stalls until the process ends");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        };
        log::warn!(
            "fault drill: write at byte {off} stalls until {} exists",
            until.display()
        );
        while !until.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        log::warn!("fault drill: write at byte {off} released");
    }

    /// Whether a write at `off` may go on (counts writes towards a failure).
    fn check_write(&self, off: u64) -> io::Result<()> {
        let from = self.no_space_from.load(Ordering::Relaxed);
        if from != 0 && off >= from {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if !self.write_allowed() {
            return Err(injected());
        }
        Ok(())
    }

    fn write_allowed(&self) -> bool {
        let left = self.writes_until_failure.load(Ordering::Relaxed);
        if left < 0 {
            return true;
        }
        if left == 0 {
            return false;
        }
        self.writes_until_failure.fetch_sub(1, Ordering::Relaxed) > 0
    }
}

fn injected() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A leg that fails on command.
pub struct FaultyLeg {
    inner: Arc<dyn Leg>,
    faults: Arc<Faults>,
}

impl FaultyLeg {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Leg>, faults: Arc<Faults>) -> Self {
        FaultyLeg { inner, faults }
    }
}

impl Leg for FaultyLeg {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn slow_writes(&self) -> bool {
        self.faults.stall_until.get().is_some() || self.inner.slow_writes()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.faults.fail_reads.load(Ordering::Relaxed) {
            return Err(injected());
        }
        self.faults
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.faults.maybe_stall(off);
        self.faults.check_write(off)?;
        self.faults
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, off)
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<()> {
        if self.faults.fail_reads.load(Ordering::Relaxed) {
            return Err(injected());
        }
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.faults
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        self.inner.readv_at(bufs, off)
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        self.faults.maybe_stall(off);
        self.faults.check_write(off)?;
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.faults
            .bytes_written
            .fetch_add(n as u64, Ordering::Relaxed);
        self.inner.writev_at(bufs, off)
    }

    fn flush(&self) -> io::Result<()> {
        if self.faults.fail_flushes.load(Ordering::Relaxed) {
            return Err(injected());
        }
        self.inner.flush()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.faults.write_allowed() {
            return Err(injected());
        }
        self.inner.discard(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.faults.write_allowed() {
            return Err(injected());
        }
        self.inner.write_zeroes(off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_stall_only_from_the_offset_and_while_the_release_file_is_missing() {
        let d = tempfile::tempdir().unwrap();
        let release = d.path().join("release");
        let f = Faults::none();
        assert!(!f.stalls(1 << 20), "no stall offset: no stall");
        f.stall_writes_from.store(4096, Ordering::Relaxed);
        assert!(f.stalls(4096), "without a release file: stalls for good");
        f.stall_until.set(release.clone()).unwrap();
        assert!(!f.stalls(0), "below the offset");
        assert!(f.stalls(4096), "release file missing");
        std::fs::File::create(&release).unwrap();
        assert!(!f.stalls(4096), "release file present: the leg answers");
        std::fs::remove_file(&release).unwrap();
        assert!(f.stalls(1 << 30), "removed again: stalls again");
    }
}
