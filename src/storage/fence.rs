//! Fencing: a node that may no longer own its legs stops writing them.
//!
//! A node is fenced when it can no longer prove it may write: its lock manager went
//! away (the locks that made its slot and writer role exclusive are gone, and a
//! node joining now may be granted them), or another host's heartbeat appeared on
//! its legs. From then on the node writes nothing: [`FencedLeg`] fails every write,
//! flush of new data, discard and write-zeroes of the leg it wraps, and the layers
//! above check [`Fence::is_fenced`] before they start I/O of their own (guest writes
//! through the writer role, resync, bitmap clearing). Reads go on.

use super::Leg;
use std::io::{self, IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Whether this node is fenced, and why.
#[derive(Debug, Default)]
pub struct Fence {
    on: AtomicBool,
    why: Mutex<Option<(String, Instant)>>,
}

impl Fence {
    /// A fence that is not raised.
    pub fn new() -> Arc<Fence> {
        Arc::new(Fence::default())
    }

    /// Raises the fence (the first reason is kept). Returns whether it was down.
    pub fn raise(&self, why: &str) -> bool {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        self.on.store(true, Ordering::SeqCst);
        if w.is_none() {
            *w = Some((why.to_string(), Instant::now()));
            log::error!("fenced: {why}; this node writes nothing until it has rejoined");
            true
        } else {
            false
        }
    }

    /// Says more about why the fence is up (what it takes to lift it); the time
    /// it went up is kept.
    pub fn amend(&self, why: &str) {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((reason, _)) = w.as_mut() {
            log::error!("fenced: {why}");
            *reason = why.to_string();
        }
    }

    /// Whether the fence is up: nothing may be written.
    pub fn is_fenced(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Why the fence is up, and since when.
    pub fn reason(&self) -> Option<(String, Instant)> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn refuse(&self) -> io::Result<()> {
        if !self.is_fenced() {
            return Ok(());
        }
        let why = self
            .reason()
            .map(|(w, _)| w)
            .unwrap_or_else(|| "fenced".into());
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("this node is fenced ({why}): nothing is written"),
        ))
    }
}

/// A leg that writes nothing while its node is fenced.
pub struct FencedLeg {
    inner: Arc<dyn Leg>,
    fence: Arc<Fence>,
}

impl FencedLeg {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Leg>, fence: Arc<Fence>) -> FencedLeg {
        FencedLeg { inner, fence }
    }
}

impl Leg for FencedLeg {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.fence.refuse()?;
        self.inner.write_at(buf, off)
    }
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<()> {
        self.inner.readv_at(bufs, off)
    }
    fn writev_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        self.fence.refuse()?;
        self.inner.writev_at(bufs, off)
    }
    fn flush(&self) -> io::Result<()> {
        // Flushing what was written before the fence went up is harmless and keeps
        // acknowledged data durable.
        self.inner.flush()
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.fence.refuse()?;
        self.inner.discard(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.fence.refuse()?;
        self.inner.write_zeroes(off, len)
    }
    fn slow_writes(&self) -> bool {
        self.inner.slow_writes()
    }
    fn issues_inline(&self) -> bool {
        self.inner.issues_inline()
    }
    fn raw_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        // Asynchronous I/O only carries guest requests, which the writer role stops
        // while the node is fenced.
        self.inner.raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemLeg;

    #[test]
    fn a_fenced_leg_reads_but_writes_nothing() {
        let fence = Fence::new();
        let leg = FencedLeg::new(Arc::new(MemLeg::new("m", 8192)), fence.clone());
        leg.write_at(&[1; 512], 0).unwrap();
        assert!(fence.raise("lock manager lost"));
        assert!(!fence.raise("again"));
        let e = leg.write_at(&[2; 512], 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("lock manager lost"), "{e}");
        let since = fence.reason().unwrap().1;
        fence.amend("lock manager lost; reboot");
        assert_eq!(
            fence.reason().unwrap(),
            ("lock manager lost; reboot".into(), since)
        );
        assert!(leg.discard(0, 512).is_err());
        assert!(leg.write_zeroes(0, 512).is_err());
        assert!(leg.writev_at(&[IoSlice::new(&[3; 512])], 0).is_err());
        let mut b = [0u8; 512];
        leg.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 512]);
        leg.flush().unwrap();
    }
}
