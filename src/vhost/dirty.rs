//! Dirty-page logging for live migration.
//!
//! The front-end shares a log with `SET_LOG_BASE` (one bit per 4 KiB guest page) and
//! switches logging on and off with `VHOST_F_LOG_ALL` in `SET_FEATURES`. Every guest
//! region's memory carries a [`DirtyLog`]: writes made through vm-memory (status bytes,
//! used-ring entries, GET_ID answers) mark it by themselves; writes that bypass
//! vm-memory (reads done in place by io_uring or through raw pointers) are marked by
//! the worker with [`vm_memory::bitmap::Bitmap::mark_dirty`] before their used-ring
//! entry is written.
//!
//! vhost-user-backend maps the log and installs it in every region on `SET_LOG_BASE`,
//! and would mark it from then on, whatever `VHOST_F_LOG_ALL` says. A [`DirtyLog`]
//! also has a switch, which the device sets from the acked features (and on every new
//! memory table): a page is marked only while the region has a log **and** the
//! front-end has `VHOST_F_LOG_ALL` acked, as the vhost-user specification says (and as
//! libvhost-user does).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The dirty log of one guest memory region (and of every slice taken from it).
#[derive(Default, Debug, Clone)]
pub struct DirtyLog {
    log: BitmapMmapRegion,
    /// Shared by the region and its slices: VHOST_F_LOG_ALL is acked.
    on: Arc<AtomicBool>,
}

impl DirtyLog {
    /// Switches marking on or off for this region (a region without a log marks
    /// nothing either way).
    pub fn set_logging(&self, on: bool) {
        self.on.store(on, Ordering::Release);
    }

    /// Whether marking is switched on.
    pub fn logging(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging() {
            self.log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyLog {
            log: self.log.slice_at(offset),
            on: self.on.clone(),
        }
    }
}

impl BitmapSlice for DirtyLog {}

impl WithBitmapSlice<'_> for DirtyLog {
    type S = Self;
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    /// `SET_LOG_BASE`: the region's log from now on (marked while logging is on).
    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.log.replace(bitmap);
    }
}

/// Switches logging on or off in every region of `mem`.
pub fn set_logging(mem: &GuestMemoryMmap<DirtyLog>, on: bool) {
    for region in mem.iter() {
        region.bitmap().set_logging(on);
    }
}
