//! The data buffers of one request, as the mirror takes them: host memory that
//! stays mapped as long as the [`Buffers`] value lives, so a request can hold its
//! buffers until every leg has answered without the caller promising anything.
//! Guest memory is kept mapped by the `Arc` of the guest memory the buffers were
//! resolved in; an owned buffer by its allocation.

use std::any::Any;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Why guest buffers could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// A segment lies outside guest memory.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The segments add up to more than the address space.
    #[error("buffers larger than the address space")]
    TooLarge,
}

/// What keeps the memory mapped.
enum Owner {
    /// Guest memory (any `GuestMemoryBackend` behind an `Arc`).
    Shared(#[allow(dead_code)] Arc<dyn Any + Send + Sync>),
    /// An allocation of our own.
    Owned(#[allow(dead_code)] Box<[u8]>),
}

/// One request's data buffers: host addresses of memory that stays valid while
/// this value lives.
pub struct Buffers {
    iovs: Box<[libc::iovec]>,
    bytes: usize,
    _owner: Owner,
}

// SAFETY: the iovecs point into memory owned (or kept mapped) by `_owner`, which
// is `Send + Sync`; the raw pointers are only dereferenced by the request that owns
// this value (one leg operation at a time writes through them).
unsafe impl Send for Buffers {}
// SAFETY: as above; shared access only reads the iovecs.
unsafe impl Sync for Buffers {}

impl Buffers {
    /// The segments `segs` of guest memory `mem` (a segment spanning memory
    /// regions becomes several buffers).
    pub fn guest<M>(mem: &Arc<M>, segs: &[(GuestAddress, usize)]) -> Result<Buffers, BufferError>
    where
        M: GuestMemoryBackend + Send + Sync + 'static,
    {
        let mut iovs = Vec::with_capacity(segs.len());
        let mut bytes = 0usize;
        for &(addr, len) in segs {
            for v in GuestMemoryBackend::get_slices(&**mem, addr, len) {
                let v = v.map_err(|e| BufferError::Memory(e.to_string()))?;
                bytes = bytes.checked_add(v.len()).ok_or(BufferError::TooLarge)?;
                iovs.push(libc::iovec {
                    iov_base: v.ptr_guard_mut().as_ptr().cast(),
                    iov_len: v.len(),
                });
            }
        }
        let owner: Arc<dyn Any + Send + Sync> = mem.clone();
        Ok(Buffers {
            iovs: iovs.into_boxed_slice(),
            bytes,
            _owner: Owner::Shared(owner),
        })
    }

    /// A buffer of our own holding `data` (what a write writes, or room a read
    /// fills and nobody reads back).
    pub fn owned(data: Vec<u8>) -> Buffers {
        let mut data = data.into_boxed_slice();
        let iovs = if data.is_empty() {
            Box::default()
        } else {
            Box::new([libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            }]) as Box<[libc::iovec]>
        };
        Buffers {
            bytes: data.len(),
            iovs,
            _owner: Owner::Owned(data),
        }
    }

    /// A buffer of our own holding `data`, described in pieces of `piece` bytes
    /// (as guest buffers spread over several descriptors are).
    #[cfg(test)]
    pub(crate) fn owned_in_pieces(data: Vec<u8>, piece: usize) -> Buffers {
        let mut b = Buffers::owned(data);
        let (base, len) = match b.iovs.first() {
            Some(v) => (v.iov_base as *mut u8, v.iov_len),
            None => return b,
        };
        b.iovs = (0..len)
            .step_by(piece.max(1))
            .map(|off| libc::iovec {
                iov_base: base.wrapping_add(off).cast(),
                iov_len: piece.min(len - off),
            })
            .collect();
        b
    }

    /// Bytes in all buffers.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The buffers as iovecs, for the kernel.
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.iovs
    }

    /// The buffers to read into. Only the request owning these buffers uses
    /// them, one leg at a time.
    pub(crate) fn slices_mut(&self) -> Vec<IoSliceMut<'_>> {
        // SAFETY: our own iovecs, valid while `self` lives.
        unsafe { slices_mut(&self.iovs) }
    }
}

/// Slices to write from over `iovs`.
///
/// # Safety
/// Every iovec must lie in memory a [`Buffers`] keeps valid for at least the
/// borrow of `iovs` (an iovec taken from one, or a part of one, does).
pub(crate) unsafe fn slices(iovs: &[libc::iovec]) -> Vec<IoSlice<'_>> {
    iovs.iter()
        .map(|v| {
            // SAFETY: guaranteed by the caller.
            IoSlice::new(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
        })
        .collect()
}

/// Slices to read into over `iovs`.
///
/// # Safety
/// As for [`slices`], and nothing else uses the memory meanwhile (the request
/// owning the buffers is their only user while it runs).
pub(crate) unsafe fn slices_mut(iovs: &[libc::iovec]) -> Vec<IoSliceMut<'_>> {
    iovs.iter()
        .map(|v| {
            // SAFETY: guaranteed by the caller.
            IoSliceMut::new(unsafe {
                std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len)
            })
        })
        .collect()
}
