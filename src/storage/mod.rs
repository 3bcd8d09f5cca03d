//! Legs: positional I/O on the block devices or image files that hold the mirrors.
//!
//! Everything above talks to a leg through the narrow [`Leg`] trait, so tests can
//! put a fault-injecting or in-memory leg in place of a real one.

mod aligned;
mod claim;
mod faulty;
mod fence;
mod file;
mod mem;
pub mod uring;

pub use aligned::AlignedBuf;
pub use claim::Claim;
pub use faulty::{Faults, FaultyLeg};
pub use fence::{Fence, FencedLeg};
pub use file::{FileLeg, OpenMode};
pub use mem::MemLeg;

use std::io::{self, IoSlice, IoSliceMut};

/// One mirror leg: a fixed-size array of bytes with positional I/O.
pub trait Leg: Send + Sync {
    /// The name used in messages (the path given by the operator).
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at byte offset `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at byte offset `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Reads into several buffers, in order, starting at `off`.
    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<()> {
        let mut pos = off;
        for b in bufs.iter_mut() {
            self.read_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Writes several buffers, in order, starting at `off`.
    fn writev_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        let mut pos = off;
        for b in bufs {
            self.write_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tells the leg that `len` bytes at `off` are no longer needed.
    fn discard(&self, off: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `off` read as zeroes.
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()>;
    /// The file descriptor for asynchronous I/O and the alignment its buffers and
    /// offsets need (0: any), or `None` when the leg only does synchronous I/O.
    fn raw_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }
    /// Whether a write may block for long (without [`Leg::raw_fd`]): the
    /// asynchronous path then runs it on a thread of its own, so the worker goes
    /// on taking requests as it does while a device answers an io_uring late.
    fn slow_writes(&self) -> bool {
        false
    }
    /// Whether io_uring issues this leg's I/O on [`Leg::raw_fd`] to its device
    /// from the submitting thread ([`uring::issues_inline`]), rather than
    /// through the kernel's worker threads.
    fn issues_inline(&self) -> bool {
        false
    }
}

/// Reads `len` bytes at `off`, failing with `UnexpectedEof` when the leg is shorter.
pub fn read_vec(leg: &dyn Leg, off: u64, len: usize) -> io::Result<Vec<u8>> {
    let end = off.checked_add(len as u64);
    if !matches!(end, Some(e) if e <= leg.size()) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{} bytes at offset {} lie beyond the end of the leg ({} bytes)",
                len,
                off,
                leg.size()
            ),
        ));
    }
    let mut buf = vec![0u8; len];
    leg.read_at(&mut buf, off)?;
    Ok(buf)
}

/// Writes zeroes by writing a zero buffer (for legs without a native way).
pub(crate) fn write_zero_buffers(leg: &dyn Leg, off: u64, len: u64) -> io::Result<()> {
    const STEP: u64 = 1 << 20;
    let zeros = AlignedBuf::zeroed(STEP.min(len) as usize);
    let mut done = 0;
    while done < len {
        let n = STEP.min(len - done) as usize;
        leg.write_at(&zeros.as_slice()[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
