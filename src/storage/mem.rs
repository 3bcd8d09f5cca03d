//! An in-memory leg for tests.

use super::Leg;
use std::io;
use std::sync::Mutex;

/// A leg held in memory.
pub struct MemLeg {
    name: String,
    data: Mutex<Vec<u8>>,
}

impl MemLeg {
    /// A zero-filled leg of `size` bytes.
    pub fn new(name: &str, size: u64) -> Self {
        MemLeg {
            name: name.to_string(),
            data: Mutex::new(vec![0; size as usize]),
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, off: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.lock().len() as u64;
        match off.checked_add(len as u64) {
            Some(end) if end <= size => Ok(off as usize..end as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "I/O beyond the end of the leg",
            )),
        }
    }
}

impl Leg for MemLeg {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let r = self.range(off, buf.len())?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let r = self.range(off, buf.len())?;
        self.lock()[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let r = self.range(off, len as usize)?;
        self.lock()[r].fill(0);
        Ok(())
    }
}
