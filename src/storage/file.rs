//! Legs on block devices and regular (image) files.

use super::aligned::AlignedBuf;
use super::claim::{self, Claim};
use super::Leg;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// How to open a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only (examine).
    ReadOnly,
    /// Read and write an existing leg.
    ReadWrite,
    /// Read and write; a regular file is created if missing and extended (sparse) to
    /// at least this many bytes. Block devices are used as they are.
    CreateSize(u64),
}

/// A leg on a block device or a regular file.
pub struct FileLeg {
    name: String,
    file: File,
    size: u64,
    block_device: bool,
    /// Alignment direct I/O needs (0: the file is not open with O_DIRECT).
    align: usize,
    /// io_uring issues this leg's direct I/O inline ([`Leg::issues_inline`]).
    inline: bool,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKSSZGET`: `_IO(0x12, 104)`, logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn ioctl_u64(file: &File, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes at most 8 bytes through the pointer, which points
    // to a live u64; the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_range(file: &File, req: libc::c_ulong, off: u64, len: u64) -> io::Result<()> {
    let range = [off, len];
    // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 from the pointer, which points to a
    // live array of two u64.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "short read at the end of the leg",
    )
}

impl FileLeg {
    /// Opens `path` as a leg with buffered I/O, without claiming it.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<FileLeg> {
        Self::open_with(path, mode, false, Claim::None)
    }

    /// Opens `path` as a leg; with `direct`, I/O bypasses the page cache (O_DIRECT)
    /// when the file system supports it. The leg is held with `claim` until it is
    /// dropped; a leg another process holds is refused (`ResourceBusy`, naming it).
    pub fn open_with(
        path: &Path,
        mode: OpenMode,
        direct: bool,
        claim: Claim,
    ) -> io::Result<FileLeg> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        match mode {
            OpenMode::ReadOnly => {}
            OpenMode::ReadWrite => {
                opts.write(true);
            }
            OpenMode::CreateSize(_) => {
                // A new image holds a guest's disk: readable by its owner only.
                opts.write(true).create(true).truncate(false).mode(0o600);
            }
        }
        // An exclusive claim of a block device opens it O_EXCL (as md claims its
        // members): the kernel then refuses other exclusive openers, mounts and md.
        let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let excl = claim.open_flags(is_block);
        if excl != 0 {
            opts.custom_flags(excl);
        }
        let mut file = None;
        if direct {
            let mut d = opts.clone();
            d.custom_flags(libc::O_DIRECT | excl);
            match d.open(path) {
                Ok(f) => file = Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && excl != 0 => {
                    return Err(claim::exclusive_open_refused(path));
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "{}: direct I/O not supported here, using the page cache",
                        path.display()
                    );
                }
                Err(e) => return Err(e),
            }
        }
        let direct = file.is_some();
        let file = match file {
            Some(f) => f,
            None => opts.open(path).map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) if excl != 0 => claim::exclusive_open_refused(path),
                _ => e,
            })?,
        };
        claim::take(&file, claim)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            ioctl_u64(&file, BLKGETSIZE64)?
        } else if meta.is_file() {
            let mut size = meta.len();
            if let OpenMode::CreateSize(want) = mode {
                if size < want {
                    file.set_len(want)?;
                    size = want;
                }
            }
            size
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a block device or a regular file",
            ));
        };
        let align = match (direct, block_device) {
            (false, _) => 0,
            (true, true) => {
                let mut lbs: libc::c_int = 0;
                // SAFETY: BLKSSZGET writes one int through the pointer to a live int.
                let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut lbs) };
                if rc == 0 && lbs >= 512 {
                    lbs as usize
                } else {
                    4096
                }
            }
            (true, false) => 512,
        };
        let inline = align > 0 && super::uring::issues_inline(file.as_raw_fd(), align.max(4096));
        Ok(FileLeg {
            name: path.display().to_string(),
            file,
            size,
            block_device,
            align,
            inline,
        })
    }

    /// True for a block device, false for an image file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The smallest I/O unit: the logical block size for direct I/O, else 512.
    pub fn block_size(&self) -> usize {
        self.align.max(512)
    }

    fn aligned(&self, off: u64, ptrs: impl Iterator<Item = (usize, usize)>) -> bool {
        let a = self.align;
        if a == 0 {
            return true;
        }
        if off % a as u64 != 0 {
            return false;
        }
        let mut ok = true;
        for (p, l) in ptrs {
            ok &= p % a == 0 && l % a == 0;
        }
        ok
    }

    fn preadv_all(&self, mut bufs: &mut [IoSliceMut<'_>], mut off: u64) -> io::Result<()> {
        while !bufs.is_empty() {
            let cnt = bufs.len().min(1024) as libc::c_int;
            // SAFETY: IoSliceMut is ABI-compatible with iovec; each points to live,
            // writable memory of its length for the duration of the call.
            let n = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    bufs.as_ptr() as *const libc::iovec,
                    cnt,
                    off as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(eof());
            }
            off += n as u64;
            IoSliceMut::advance_slices(&mut bufs, n as usize);
        }
        Ok(())
    }

    fn pwritev_all(&self, mut bufs: &mut [IoSlice<'_>], mut off: u64) -> io::Result<()> {
        while !bufs.is_empty() {
            let cnt = bufs.len().min(1024) as libc::c_int;
            // SAFETY: IoSlice is ABI-compatible with iovec; each points to live memory
            // of its length for the duration of the call.
            let n = unsafe {
                libc::pwritev(
                    self.file.as_raw_fd(),
                    bufs.as_ptr() as *const libc::iovec,
                    cnt,
                    off as libc::off_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"));
            }
            off += n as u64;
            IoSlice::advance_slices(&mut bufs, n as usize);
        }
        Ok(())
    }

    /// The block-aligned span around `[off, off + len)` for bounce I/O.
    fn span(&self, off: u64, len: usize) -> (u64, usize) {
        let a = self.align.max(1) as u64;
        let start = off / a * a;
        let end = (off + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }
}

impl Leg for FileLeg {
    fn name(&self) -> &str {
        &self.name
    }

    fn raw_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        Some((self.file.as_raw_fd(), self.align))
    }

    fn issues_inline(&self) -> bool {
        self.inline
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.readv_at(&mut [IoSliceMut::new(buf)], off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.writev_at(&[IoSlice::new(buf)], off)
    }

    fn readv_at(&self, bufs: &mut [IoSliceMut<'_>], off: u64) -> io::Result<()> {
        if self.aligned(off, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            return self.preadv_all(bufs, off);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (start, span) = self.span(off, total);
        let mut bounce = AlignedBuf::zeroed(span);
        self.preadv_all(&mut [IoSliceMut::new(bounce.as_mut_slice())], start)?;
        let mut pos = (off - start) as usize;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&bounce.as_slice()[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    fn writev_at(&self, bufs: &[IoSlice<'_>], off: u64) -> io::Result<()> {
        if self.aligned(off, bufs.iter().map(|b| (b.as_ptr() as usize, b.len()))) {
            let mut v: Vec<IoSlice<'_>> = bufs.to_vec();
            return self.pwritev_all(&mut v, off);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let (start, span) = self.span(off, total);
        let mut bounce = AlignedBuf::zeroed(span);
        if start != off || span != total {
            // Partial blocks at either end: read them first.
            self.preadv_all(&mut [IoSliceMut::new(bounce.as_mut_slice())], start)?;
        }
        let mut pos = (off - start) as usize;
        for b in bufs {
            bounce.as_mut_slice()[pos..pos + b.len()].copy_from_slice(b);
            pos += b.len();
        }
        self.pwritev_all(&mut [IoSlice::new(bounce.as_slice())], start)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return ioctl_range(&self.file, BLKDISCARD, off, len);
        }
        // SAFETY: plain syscall on an open fd with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return ioctl_range(&self.file, BLKZEROOUT, off, len);
        }
        // SAFETY: plain syscall on an open fd with integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return super::write_zero_buffers(self, off, len);
        }
        Err(e)
    }
}
