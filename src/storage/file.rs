//! Legs on block devices and regular (image) files.

use super::Leg;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
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
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(file: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
    // live, properly aligned u64; the fd is owned by `file` and open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

impl FileLeg {
    /// Opens `path` as a leg.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<FileLeg> {
        let mut opts = OpenOptions::new();
        opts.read(true);
        match mode {
            OpenMode::ReadOnly => {}
            OpenMode::ReadWrite => {
                opts.write(true);
            }
            OpenMode::CreateSize(_) => {
                opts.write(true).create(true).truncate(false);
            }
        }
        let file = opts.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            block_device_size(&file)?
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
        Ok(FileLeg {
            name: path.display().to_string(),
            file,
            size,
            block_device,
        })
    }

    /// True for a block device, false for an image file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
}

impl Leg for FileLeg {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
